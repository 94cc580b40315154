"""Our linear probe vs kaiko-eva's, on the same features of a labelled synthetic task.

Task (`--task gaussian`, the default): 4 imbalanced classes (priors .4/.3/.2/.1) in a
384-d feature space (ViT-S's width) that overlap by design: class means at distance
about 2.5 noise-sd apart in a whitened space, mapped through a random rotation with a
1/sqrt(i) spectrum (mean feature variance 1) plus an offset, like layer-normed backbone
features. A linear head is the right model class but cannot reach 100%, and with 384
dims and 6,000 training rows it overfits, so early stopping and checkpoint selection
matter. The "oracle" line is the
balanced accuracy of the true-means rule, the best any head can expect. `--task cohort`:
mean patch tokens of a frozen random ViT-S/14 over the synthetic cohort's tiles, split
by slide (few hundred tiles: one test error moves the score by about a point).

Both probes follow eva's protocol (see dinov2_patho.eval.heads.linear) with 5 runs and
report mean ± std of test balanced accuracy over runs. eva runs in its own virtualenv
(`--eva-python`, not a project dependency) through its Python API (Trainer, HeadModule,
EmbeddingsClassificationDataset over one .pt file per row, seeded 42 as its CLI does);
its wall time includes its process start (the in-process session time is shown too).

    flock /tmp/dinov2_patho_heavy.lock .venv/bin/python benchmarks/linear_probe_vs_eva.py [--quick]
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np
import torch
from eva_session import EVA_SESSION, pct, run_eva

from dinov2_patho.backbones.features import extract_features
from dinov2_patho.backbones.preprocess import Preprocess
from dinov2_patho.demo.cohort import make_cohort
from dinov2_patho.eval.benchmarks import build_benchmark
from dinov2_patho.eval.heads import LinearProbeConfig, linear_probe
from dinov2_patho.eval.metrics import balanced_accuracy
from dinov2_patho.models import build_backbone

# Run by eva's own interpreter. eva's `eva fit --config` YAML route fails in that venv: its
# jsonargparse (4.53) rejects `criterion: torch.nn.CrossEntropyLoss` ("Expected a path ...
# not accessible or invalid"), so we build the same objects as eva's offline configs in Python.
EVA_DRIVER = """\
import functools, sys, time
import torch
from lightning.pytorch import callbacks, seed_everything
import eva
from eva.core.data import dataloaders, datamodules
from eva.core.data.datasets import EmbeddingsClassificationDataset
from eva.core.metrics import MulticlassClassificationMetrics
from eva.core.metrics.structs import MetricsSchema

root = sys.argv[1]
dim, classes, patience, n_runs = map(int, sys.argv[2:6])
seed_everything(42, workers=True)  # eva's CLI default (EVA_GLOBAL_SEED)
best = {"monitor": "val/MulticlassAccuracy", "mode": "max"}
trainer = eva.Trainer(default_root_dir=root + "/logs", n_runs=n_runs, max_steps=12500, checkpoint_type="best",
                      accelerator="cpu", devices=1, enable_progress_bar=False, logger=False,
                      callbacks=[
                          callbacks.ModelCheckpoint(filename="best", save_top_k=1, **best),
                          callbacks.EarlyStopping(min_delta=0, patience=patience, **best)])
# the head as a class_path dict, as eva's YAML configs pass it: every run builds a fresh one
head = {"class_path": "torch.nn.Linear", "init_args": {"in_features": dim, "out_features": classes}}
model = eva.HeadModule(head=head, criterion=torch.nn.CrossEntropyLoss(),
                       optimizer=functools.partial(torch.optim.AdamW, lr=3e-4),
                       metrics=MetricsSchema(common=MulticlassClassificationMetrics(num_classes=classes)))


class Embeddings(EmbeddingsClassificationDataset):
    # eva torch.loads the row's .pt file at every access (0.5 ms here, millions of accesses
    # per run); read each file once, everything else is eva's
    def load_embeddings(self, index):
        if index not in self.cache:
            self.cache[index] = super().load_embeddings(index)
        return self.cache[index]


def split(name):
    data = Embeddings(root=root + "/embeddings", manifest_file="manifest.csv", split=name)
    data.cache = {}
    return data


batch_size = 256
""" + EVA_SESSION

Split = tuple[np.ndarray, np.ndarray]


def gaussian_features(sizes: dict[str, int], dim: int = 384, priors: tuple[float, ...] = (0.4, 0.3, 0.2, 0.1),
                      separation: float = 2.5, seed: int = 0) -> tuple[dict[str, Split], float]:
    """The overlapping-classes task; also returns the test balanced accuracy of the
    true-means rule (nearest class mean in the whitened space)."""
    rng = np.random.default_rng(seed)
    means = rng.normal(0, separation / np.sqrt(2 * dim), (len(priors), dim))  # pairwise distance ~ separation
    rotation = np.linalg.qr(rng.normal(size=(dim, dim)))[0]
    spectrum = 1 / np.sqrt(np.arange(1, dim + 1))
    mixing = (spectrum / np.sqrt(np.mean(spectrum**2)))[:, None] * rotation  # mean feature variance 1
    offset = rng.normal(0, 0.5, dim)
    feats, oracle = {}, 0.0
    for split, n in sizes.items():
        y = rng.choice(len(priors), n, p=priors)
        white = means[y] + rng.normal(size=(n, dim))
        feats[split] = ((white @ mixing + offset).astype(np.float32), y)
        if split == "test":
            nearest = ((white[:, None] - means[None]) ** 2).sum(-1).argmin(1)
            oracle = balanced_accuracy(y, nearest, len(priors))
    return feats, oracle


def cohort_features(out: Path, max_tiles: int | None) -> dict[str, Split]:
    cohort_dir = out / "cohort"
    if not (cohort_dir / "labels.csv").is_file():
        make_cohort(cohort_dir, num_slides=8, seed=0)
    bench = build_benchmark("synthetic", cohort_dir, max_tiles_per_split=max_tiles)
    torch.manual_seed(0)
    vit = build_backbone("vit_small", patch_size=14).eval()
    feats = {}
    for split, data in bench.splits.items():
        f = extract_features(vit, data.with_transform(Preprocess(bench.mpp)), out / "features" / split,
                             batch_size=32, desc=f"synthetic/{split}")
        feats[split] = (np.asarray(f.patch_mean), np.asarray(f.labels))
    return feats


def write_eva_embeddings(feats: dict[str, Split], root: Path) -> None:
    emb = root / "embeddings"
    emb.mkdir(parents=True, exist_ok=True)
    rows = []
    for split, (x, y) in feats.items():
        for i in range(len(y)):
            name = f"{split}_{i}.pt"
            torch.save(torch.from_numpy(x[i].copy()), emb / name)
            rows.append({"origin": name, "embeddings": name, "target": int(y[i]), "split": split})
    with open(emb / "manifest.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["origin", "embeddings", "target", "split"])
        writer.writeheader()
        writer.writerows(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="a quarter of the rows (cohort: 60 tiles a split), 2 runs")
    parser.add_argument("--task", choices=("gaussian", "cohort"), default="gaussian")
    parser.add_argument("--out", type=Path, default=Path("/tmp/dinov2_patho_lp_vs_eva"))
    parser.add_argument("--eva-python", type=Path, default=Path("/tmp/eva-venv/bin/python"))
    args = parser.parse_args()
    out = args.out / f"{args.task}_{'quick' if args.quick else 'full'}"
    n_runs = 2 if args.quick else 5
    if args.task == "gaussian":
        rows = {"train": 6000, "val": 2000, "test": 6000}
        feats, oracle = gaussian_features({k: v // 4 if args.quick else v for k, v in rows.items()})
        print(f"oracle (true-means rule) test balanced accuracy: {100 * oracle:.2f}")
    else:
        feats = cohort_features(out, 60 if args.quick else None)
    classes = [str(c) for c in range(int(max(y.max() for _, y in feats.values())) + 1)]
    dim = feats["train"][0].shape[1]
    print(f"features: { {k: len(v[1]) for k, v in feats.items()} } rows, dim {dim}")

    cfg = LinearProbeConfig(n_runs=n_runs)
    start = time.perf_counter()
    ours = linear_probe(feats["train"], feats["val"], feats["test"], classes, cfg)
    ours_wall = time.perf_counter() - start
    runs = ours["runs"]
    patience = runs[0]["patience"]  # eva's per-dataset rule, the same for both
    print(f"ours: test balanced accuracy {pct(ours['balanced_accuracy'], ours['balanced_accuracy_std'])} "
          f"(val {pct(ours['val_balanced_accuracy'], ours['val_balanced_accuracy_std'])}), "
          f"wall {ours_wall:.2f} s for {n_runs} runs; "
          f"per run {[round(100 * r['balanced_accuracy'], 2) for r in runs]}, "
          f"best/last epoch {[(r['best_epoch'] + 1, r['epochs']) for r in runs]}, patience {patience}")
    if not args.eva_python.is_file():
        print(f"eva: not run, {args.eva_python} is absent (python3 -m venv /tmp/eva-venv && "
              "/tmp/eva-venv/bin/pip install torch==2.13.0 kaiko-eva)")
        return 1
    eva_root = out / "eva"
    write_eva_embeddings(feats, eva_root)
    metrics, eva_wall, eva_session = run_eva(args.eva_python, EVA_DRIVER, eva_root, dim, len(classes),
                                             patience, n_runs)
    eva_test = metrics["test"][0]["test/MulticlassAccuracy"]
    eva_val = metrics["val"][0]["val/MulticlassAccuracy"]
    diff = 100 * (ours["balanced_accuracy"] - eva_test["mean"])
    # the runs are independent on both sides: the standard error of the difference of means
    se = 100 * np.hypot(ours["balanced_accuracy_std"], eva_test["stdev"]) / np.sqrt(n_runs)
    print(f"eva:  test balanced accuracy {pct(eva_test['mean'], eva_test['stdev'])} "
          f"(val {pct(eva_val['mean'], eva_val['stdev'])}), wall {eva_wall:.2f} s for {n_runs} runs incl. "
          f"process start ({eva_session:.2f} s in session); "
          f"per run {[round(100 * v, 2) for v in eva_test['values']]}")
    print(f"difference (ours - eva): {diff:+.2f} points (standard error {se:.2f}; limit ±1); wall-time ratio "
          f"eva/ours: {eva_wall / ours_wall:.1f}x ({eva_session / ours_wall:.1f}x in session)")
    return 0 if abs(diff) <= 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())
