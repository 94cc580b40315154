"""The tile probe's logistic regression (eval/heads/logreg.py) at the demo's size and larger, on one BLAS
thread against the machine's default, on synthetic features (5 classes, C=1): seconds per fit and the
ratio. Sizes at or below ONE_THREAD_VALUES run on one thread in the product.

    .venv/bin/python benchmarks/logreg_threads.py
"""

from __future__ import annotations

import time

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_info, threadpool_limits

from dinov2_patho.eval.heads.logreg import ONE_THREAD_VALUES

SIZES = [(2544, 96), (10_000, 384), (20_000, 768)]  # the demo's fold; two larger tile probes
REPEATS = 3


def seconds(x: np.ndarray, y: np.ndarray, threads: int | None) -> float:
    best = float("inf")
    for _ in range(REPEATS):
        with threadpool_limits(limits=threads, user_api="blas"):
            start = time.perf_counter()
            make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=1000)).fit(x, y)
            best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    default = max((p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"), default=1)
    print(f"BLAS threads by default: {default}; one thread at or below {ONE_THREAD_VALUES:,} values")
    print("| rows x dims | values | 1 thread, s | default, s | default / 1 thread | product uses |")
    print("|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for n, d in SIZES:
        x = rng.standard_normal((n, d)).astype(np.float32)
        y = (x @ rng.standard_normal((d, 5)) + 3 * rng.standard_normal((n, 5))).argmax(1)
        one, many = seconds(x, y, 1), seconds(x, y, None)
        uses = "1 thread" if x.size <= ONE_THREAD_VALUES else "default"
        print(f"| {n:,} x {d} | {x.size:,} | {one:.3f} | {many:.3f} | {many / one:.1f}x | {uses} |")


if __name__ == "__main__":
    main()
