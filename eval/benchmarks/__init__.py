"""Benchmark adapters by name: `build_benchmark("bach", root=...)`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import generic, pathology, pcam, synthetic  # noqa: F401  (register adapters)
from .base import BENCHMARKS, Benchmark, BenchmarkError, ImageSplit


def build_benchmark(name: str, root: str | Path, **options: Any) -> Benchmark:
    try:
        adapter = BENCHMARKS.get(name)
    except KeyError as e:
        raise BenchmarkError(e.args[0]) from e
    BENCHMARKS.check_options(name, options, f"datasets.{name}", passed=("source",))
    return adapter(Path(root), **options)


__all__ = ["BENCHMARKS", "Benchmark", "BenchmarkError", "ImageSplit", "build_benchmark"]
