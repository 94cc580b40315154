"""The synthetic slide task over cohort seeds: attention-MIL vs mean pooling, and where attention looks.

For each seed, `demo.mil_check.synthetic_mil_check`: a 96-slide cohort (5x5 tiles, half
of the slides with a 2-tile necrosis lesion), bags of colour/texture features, gated attention-MIL
(3 runs) and mean pooling + logistic regression scored by AUROC on the 24 test slides, and the share
of the top-2 attention tiles of positive test slides that lie in the lesion. Prints each seed and the
minimum over seeds of the AUROC gain and of the attention share, the figures that
`tests/test_eval_slide.py` may assert.

    .venv/bin/python benchmarks/slide_mil.py --seeds 0 1 2 3     # about 1-2 minutes per seed on 2 cores
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from dinov2_patho.demo.mil_check import synthetic_mil_check


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny tensors: more threads only contend on a shared CPU
    rows = []
    for seed in args.seeds:
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            r = synthetic_mil_check(tmp, seed)
        r["gain"] = r["abmil_auroc"] - r["mean_pool_auroc"]
        rows.append(r)
        print(f"seed {seed}: attention-MIL AUROC {100 * r['abmil_auroc']:.1f}"
              f" ± {100 * r['abmil_auroc_std']:.1f}"
              f" | mean pooling {100 * r['mean_pool_auroc']:.1f} | gain {100 * r['gain']:+.1f} | top-2 "
              f"attention in lesion {100 * r['attention_in_lesion']:.0f}% of {r['positive_test_slides']} "
              f"positive test slides | {time.perf_counter() - start:.0f} s", flush=True)
    print(f"min over seeds: AUROC gain {100 * min(r['gain'] for r in rows):+.1f} points, attention in lesion "
          f"{100 * min(r['attention_in_lesion'] for r in rows):.0f}%")


if __name__ == "__main__":
    main()
