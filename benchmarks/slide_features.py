"""`eval slide --features` on the planted feature-file task over seeds, against its done-when limits.

For each seed, `eval.slide.planted_features.make_planted_features` writes 120 trident-style `.h5` files
(30-60 tiles of 32 standard normal numbers; a positive slide has 3 tiles moved 4 standard deviations
along one direction) and a labels CSV (train/val/test 60/24/36 slides), once as planted and once with
the labels shuffled; `dinov2-patho eval slide --features` scores eva's attention-MIL (1 run) and mean
pooling by AUROC on the test slides. Prints each seed, then the minimum planted and maximum shuffled
attention-MIL AUROC against the limits (>= 0.9, <= 0.7) `tests/test_feature_files.py` asserts on seed 0.

    .venv/bin/python benchmarks/slide_features.py --seeds 0 1 2 3 4 5 6 7     # a few seconds a seed
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from dinov2_patho.cli import main as cli
from dinov2_patho.eval.slide.planted_features import make_planted_features

PLANTED_MIN, SHUFFLED_MAX = 0.9, 0.7


def aurocs(seed: int, shuffle_labels: bool) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        labels = make_planted_features(tmp, seed=seed, shuffle_labels=shuffle_labels)
        assert cli(["eval", "slide", "--features", f"{tmp}/features", "--tasks", str(labels), "--output-dir",
                    f"{tmp}/out", "--no-progress", "heads.abmil.n_runs=1", "plot=false"]) == 0
        r = json.loads(Path(f"{tmp}/out/results.json").read_text())["labels"]
    return r["abmil"]["auroc"], r["mean_pool"]["auroc"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(8)))
    args = parser.parse_args()
    planted, shuffled = [], []
    for seed in args.seeds:
        start = time.perf_counter()
        (p, p_mean), (s, s_mean) = aurocs(seed, False), aurocs(seed, True)
        planted.append(p)
        shuffled.append(s)
        print(f"seed {seed}: attention-MIL AUROC {p:.3f} planted, {s:.3f} shuffled | mean pooling "
              f"{p_mean:.3f}, {s_mean:.3f} | {time.perf_counter() - start:.0f} s", flush=True)
    holds = min(planted) >= PLANTED_MIN and max(shuffled) <= SHUFFLED_MAX
    print(f"min planted {min(planted):.3f} (limit >= {PLANTED_MIN}), max shuffled {max(shuffled):.3f} "
          f"(limit <= {SHUFFLED_MAX}): {'holds' if holds else 'FAILS'}")


if __name__ == "__main__":
    main()
