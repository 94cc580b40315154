"""What cpu_smoke's training buys on the synthetic tissue-type probe, over cohort seeds.

For each seed: `dinov2-patho demo --seed S` (a 16-slide cohort of that seed, cpu_smoke as
shipped, the trained teacher and its random initialisation probed on the held-out test
slides). Prints test balanced accuracy per head for both backbones and the gain in
points; `tests/test_demo.py` asks seed 0 for a gain of at least 3 points from the linear
probe and kNN.

    .venv/bin/python benchmarks/probe_gain.py --seeds 0 1 2 3     # about 3 minutes per seed
"""

from __future__ import annotations

import argparse
import tempfile
import time

from dinov2_patho.demo import HEADS, probe_scores, run_demo

MARGIN_POINTS = 3.0
GAINING_HEADS = ("linear", "knn")  # the heads the test asks a gain of


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("overrides", nargs="*", help="overrides of configs/train/cpu_smoke.yaml")
    args = parser.parse_args()
    rows = []
    for seed in args.seeds:
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            results = run_demo(tmp, seed=seed, overrides=args.overrides)
        trained, random_init = probe_scores(results["trained"]), probe_scores(results["random_init"])
        rows.append((seed, trained, random_init, time.perf_counter() - start))

    print("\nseed | head | trained | random init | gain (points)")
    for seed, trained, random_init, wall in rows:
        for head in HEADS:
            gain = 100 * (trained[head] - random_init[head])
            flag = "" if gain >= MARGIN_POINTS else "  < margin"
            print(f"{seed} | {head} | {100 * trained[head]:.1f} | {100 * random_init[head]:.1f} | "
                  f"{gain:+.1f}{flag}")
        print(f"{seed} | wall time {wall:.0f} s")
    wins = sum(all(100 * (t[h] - r[h]) >= MARGIN_POINTS for h in GAINING_HEADS) for _, t, r, _ in rows)
    print(f"seeds with a gain >= {MARGIN_POINTS:.0f} points from {' and '.join(GAINING_HEADS)}: "
          f"{wins}/{len(rows)}")


if __name__ == "__main__":
    main()
