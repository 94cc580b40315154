"""Slide-level evaluation: attention-MIL on bags of frozen tile features."""

from .runner import run_slide_tasks, slide_config
from .tasks import SlideTask, csv_task

__all__ = ["SlideTask", "csv_task", "run_slide_tasks", "slide_config"]
