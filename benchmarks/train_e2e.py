"""End-to-end throughput of `configs/train/cpu_smoke.yaml`, data loading included.

Makes the synthetic cohort and its index in a temporary directory, trains cpu_smoke with
`run_training` (tiles read from the pyramidal TIFFs and augmented in DataLoader workers),
and prints from its metrics.jsonl:
  - wall time of the whole run (model build, worker start, checkpoints) against the
    2-minute limit of the smoke config;
  - samples/s end to end (all iterations) and in steady state (after the first 5);
  - the data-time share of an iteration: time blocked waiting for the next batch over
    iteration time (0 when the workers keep ahead of the step).

    flock /tmp/dinov2_patho_heavy.lock .venv/bin/python benchmarks/train_e2e.py
    .venv/bin/python benchmarks/train_e2e.py --quick        # 10 iterations
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from dinov2_patho.data.index import build_index
from dinov2_patho.demo.cohort import make_cohort
from dinov2_patho.train.config import load_train_config
from dinov2_patho.train.metrics_log import read_metrics
from dinov2_patho.train.trainer import run_training

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "train" / "cpu_smoke.yaml"
LIMIT_S = 120.0
WARMUP = 5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10 iterations")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. train.num_workers=0")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cohort = make_cohort(tmp / "cohort", num_slides=8, seed=0)
        index = build_index(cohort.clusters_csv, tmp / "index", progress=False)
        overrides = [f"data.index={index.path}", f"data.slides={cohort.slides_dir}", *args.overrides]
        if args.quick:
            overrides.append("train.iterations=10")
        cfg = load_train_config(SMOKE, overrides)
        start = time.perf_counter()
        summary = run_training(cfg, tmp / "run")
        wall = time.perf_counter() - start
        records = read_metrics(tmp / "run" / "metrics.jsonl")

    batch = int(cfg.train.batch_size_per_gpu)
    iters = len(records)
    loop = sum(r["iter_time"] for r in records)
    steady = records[WARMUP:] or records
    data_share = sum(r["data_time"] for r in steady) / sum(r["iter_time"] for r in steady)
    print(f"cpu_smoke: {iters} iterations x batch {batch}, num_workers {cfg.train.num_workers}, "
          f"cpu_threads {cfg.train.cpu_threads}")
    print(f"wall time (build + workers + loop + checkpoints): {wall:.1f} s; limit {LIMIT_S:.0f} s; "
          f"ratio {wall / LIMIT_S:.2f}")
    print(f"samples/s end to end (loop): {iters * batch / loop:.1f}; over the whole wall time: "
          f"{iters * batch / wall:.1f}")
    print(f"samples/s steady state (iterations {WARMUP}+): "
          f"median {statistics.median(r['samples_per_s'] for r in steady):.1f}")
    print(f"data-time share of an iteration (steady state): {100 * data_share:.1f} %")
    print(f"first iteration: {records[0]['iter_time']:.2f} s (of which data {records[0]['data_time']:.2f} s)")
    print(f"total loss: {records[0]['total_loss']:.3f} -> {records[-1]['total_loss']:.3f}; "
          f"final iteration {summary['iteration']}")


if __name__ == "__main__":
    main()
