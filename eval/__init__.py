"""Frozen-backbone evaluation: features, eva's linear probe, kNN, logistic regression,
benchmark adapters. `run_benchmarks` is what the CLI and the trainer call.

Loaded on first use, so that importing a submodule (`curate embed` takes the backbone and the
feature engine) does not load the heads, the benchmarks and scikit-learn."""

from __future__ import annotations

from typing import Any

__all__ = ["eval_config", "run_benchmarks"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import runner

        return getattr(runner, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
