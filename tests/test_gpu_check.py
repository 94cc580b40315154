"""benchmarks/gpu_check.py --device cpu --tiny, as CI runs it so it cannot rot: every check runs (on
CPU stand-ins where it needs CUDA) and the table has one well-formed row per check."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
CHECKS = ["bf16 autocast loss vs fp32", "xformers vs SDPA attention", "NCCL DDP step", "NCCL FSDP2 step",
          "faiss-gpu k-means vs faiss-cpu", "ViT-L/14 train step, batch 64"]
NO_CUDA = "skipped (no CUDA)"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def table() -> dict[str, tuple[str, float, str]]:
    proc = _run("--device", "cpu", "--tiny")
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    rows = [line.split(" | ") for line in proc.stdout.splitlines() if line.startswith("| ")][1:]
    return {cells[0][2:].strip(): (cells[1].strip(), float(cells[2]), cells[3].rstrip(" |"))
            for cells in rows}


def _number(pattern: str, text: str) -> float:
    match = re.search(pattern, text)
    assert match, f"{pattern!r} not in {text!r}"
    return float(match.group(1))


def test_tiny_cpu_run_prints_one_row_per_check(table):
    assert list(table) == CHECKS
    assert all(seconds >= 0 for _, seconds, _ in table.values())
    for name in CHECKS[2:]:  # --device cpu: CUDA rows are skipped even where CUDA exists
        assert table[name][0] == NO_CUDA, table[name]
    assert table["xformers vs SDPA attention"][0] in ("not installed", NO_CUDA)


def test_checks_measure_what_they_name(table):
    status, _, detail = table["bf16 autocast loss vs fp32"]
    assert status == "ok"
    assert _number(r"rel diff ([\d.e+-]+)", detail) < 1e-2
    fsdp = table["NCCL FSDP2 step"][2]
    assert "gloo" in fsdp and _number(r"rel diff to DDP ([\d.e+-]+)", fsdp) < 1e-2
    kmeans = table["faiss-gpu k-means vs faiss-cpu"][2]
    assert _number(r"labels agree ([\d.]+)", kmeans) > 0.99
    step = table["ViT-L/14 train step, batch 64"][2]
    assert _number(r"([\d.]+) samples/s", step) > 0 and _number(r"([\d.e+-]+) GFLOP/step", step) > 0


def test_full_sizes_on_cpu_are_refused_in_one_line():
    proc = _run("--device", "cpu")
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines() == [
        "error: gpu_check: full sizes (ViT-L/14, batch 64) need a GPU: add --tiny on a CPU"]
