"""kaiko-eva for the *_vs_eva benchmarks: eva lives in its own virtualenv (never a project
dependency) and runs a benchmark's driver script through its Python API in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

# The end of every driver, once it has built `trainer`, `model`, `split(name)` (a dataset) and
# `batch_size`: eva's DataModule over in-process loaders (eva's DataLoader defaults, prefetch
# and persistent workers, need workers) and the timed evaluation session.
EVA_SESSION = """\
loader = {"batch_size": batch_size, "num_workers": 0, "prefetch_factor": None, "persistent_workers": False}
data = eva.DataModule(
    datasets=datamodules.schemas.DatasetsSchema(train=split("train"), val=split("val"), test=split("test")),
    dataloaders=datamodules.schemas.DataloadersSchema(
        train=dataloaders.DataLoader(shuffle=True, **loader),
        val=dataloaders.DataLoader(**loader),
        test=dataloaders.DataLoader(**loader)))
start = time.perf_counter()
trainer.run_evaluation_session(model=model, datamodule=data)
print(f"SESSION_SECONDS {time.perf_counter() - start:.3f}")
"""


def run_eva(eva_python: Path, driver: str, root: Path, *args: object) -> tuple[dict, float, float]:
    """Runs `driver` (which writes eva's session logs under root/logs and prints SESSION_SECONDS)
    with argv root, *args; returns eva's session metrics, the subprocess's wall time (its process
    start included) and the in-process session time."""
    start = time.perf_counter()
    proc = subprocess.run([str(eva_python), "-c", driver, str(root), *map(str, args)], capture_output=True,
                          text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"eva failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    found = sorted((root / "logs").rglob("results.json"), key=lambda p: p.stat().st_mtime)
    session = float(proc.stdout.rsplit("SESSION_SECONDS", 1)[1].split()[0])
    return json.loads(found[-1].read_text())["metrics"], wall, session


def pct(mean: float, std: float) -> str:
    return f"{100 * mean:.2f} ± {100 * std:.2f}"
