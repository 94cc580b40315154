"""The run report: one self-contained HTML page (training, batches, tree, embedding map, evaluation)."""

from dinov2_patho.report.build import write_report

__all__ = ["write_report"]
