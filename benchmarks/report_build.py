"""The report of a 170k-iteration run: build time, HTML size, and time to open in headless Chromium.

A synthetic cohort (16 slides) is indexed; a run directory gets a config.yaml (the paper's sampler:
cluster-stratified at level 4, global batch 2048), a 170,000-line metrics.jsonl with the keys the
trainer logs (losses, schedules, timings, sampler telemetry), and random float16 embeddings aligned
with the index. `write_report` builds every panel (replays 200 batches of each sampler, 6+6 mosaic
rows, an 800-point map with tiles). Limits (issue 15): HTML under 5 MB, open in under 2 s.

    .venv/bin/python benchmarks/report_build.py [--iterations 170000] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from dinov2_patho.data.index import build_index
from dinov2_patho.demo.cohort import make_cohort
from dinov2_patho.report import write_report

MAX_MB = 5.0
MAX_OPEN_S = 2.0
GLOBAL_BATCH = 2048


def write_metrics(path: Path, iterations: int, rng: np.random.Generator) -> None:
    """Records shaped like the trainer's: decaying losses with noise, cosine schedules, timings."""
    with open(path, "w") as f:
        for i in range(iterations):
            t = i / iterations
            cos = 0.5 * (1 + math.cos(math.pi * t))
            noise = rng.standard_normal(4) * 0.05
            record = {
                "iteration": i, "pseudo_epoch": i * GLOBAL_BATCH // 350_000,
                "dino_global_crops_loss": 1 + 9 * math.exp(-5 * t) + noise[0],
                "dino_local_crops_loss": 2 + 8 * math.exp(-5 * t) + noise[1],
                "ibot_loss": 1.5 + 6 * math.exp(-4 * t) + noise[2], "koleo_loss": -0.2 + noise[3],
                "n_masked_patches": 40000.0, "total_loss": 4.3 + 23 * math.exp(-5 * t),
                "lr": 2e-3 * min(1.0, i / 10_000) * cos, "last_layer_lr": 2e-3 * cos,
                "wd": 0.04 + 0.16 * (1 - cos),
                "momentum": 1 - 0.006 * cos, "teacher_temp": 0.04 + 0.03 * min(1.0, i / 30_000),
                "grad_norm": 1.0 + noise[0], "data_time": 0.05 + abs(noise[1]), "step_time": 1.1,
                "iter_time": 1.2, "samples_per_s": GLOBAL_BATCH / 1.2,
                "batch_digest": int(rng.integers(2**31)), "sampler/clusters_level_1": 2000,
                "sampler/clusters_level_2": 1500, "sampler/clusters_level_3": 340,
                "sampler/clusters_level_4": 62, "sampler/slides": 780, "sampler/clusters": 62,
                "sampler/per_cluster_min": 33, "sampler/per_cluster_max": 34, "sampler/step": i,
                "sampler/pseudo_epoch": i * GLOBAL_BATCH // 350_000, "sampler/slide_group": 0,
            }
            f.write(json.dumps(record) + "\n")


def open_time(html: Path) -> float | None:
    """Seconds from navigation to the load event in headless Chromium; None without chromium."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from chromium import Browser, ChromiumUnavailable, find_chromium

    try:
        binary = find_chromium()
    except ChromiumUnavailable as e:
        print(f"no browser timing: {e}")
        return None
    with Browser(binary) as browser:
        t0 = time.perf_counter()
        browser.open(html)
        seconds = time.perf_counter() - t0
        if browser.errors:
            raise SystemExit(f"page errors: {browser.errors}")
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=170_000)
    parser.add_argument("--workdir", help="keep the cohort, run and report here (default: a temporary dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        cohort = make_cohort(work / "cohort", num_slides=16, seed=0)
        index = build_index(cohort.clusters_csv, work / "index", progress=False)
        run = work / "run"
        run.mkdir(parents=True, exist_ok=True)
        # the sections the report reads (the paper's recipe: 170k iterations, 32 ranks x 64)
        cfg = {"train": {"iterations": args.iterations, "batch_size_per_gpu": 64},
               "data": {"backend": "openslide", "index": str(index.path), "slides": str(cohort.slides_dir)},
               "sampler": {"name": "cluster_stratified", "seed": 0, "level": 4}}
        (run / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(cfg)))
        rng = np.random.default_rng(0)
        t0 = time.perf_counter()
        write_metrics(run / "metrics.jsonl", args.iterations, rng)
        size = (run / "metrics.jsonl").stat().st_size / 1e6
        print(f"metrics.jsonl: {args.iterations:,} lines, {size:.0f} MB "
              f"(written in {time.perf_counter() - t0:.0f} s)")
        np.save(work / "embeddings.npy", rng.standard_normal((len(index), 384)).astype(np.float16))
        t0 = time.perf_counter()
        out = write_report(run, work / "report.html", embeddings=work / "embeddings.npy",
                           metadata=cohort.metadata_csv, progress=False)
        build = time.perf_counter() - t0
        mb = out.stat().st_size / 1e6
        seconds = open_time(out)
        print(f"report build: {build:.1f} s; HTML {mb:.2f} MB (limit {MAX_MB} MB, ratio {mb / MAX_MB:.2f})")
        if seconds is not None:
            print(f"chromium open to load event: {seconds:.2f} s (limit {MAX_OPEN_S} s, ratio "
                  f"{seconds / MAX_OPEN_S:.2f})")
        ok = mb <= MAX_MB and (seconds is None or seconds <= MAX_OPEN_S)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
