"""Our linear probe vs kaiko-eva's, on the same extracted features of a labelled synthetic task.

Features: mean patch tokens of a frozen (randomly initialised, seed 0) ViT-S/14 over the
synthetic cohort's tissue-type tiles, split by slide. (Its CLS token is useless here: with
LayerScale 1e-5 the blocks barely touch it, so it is nearly the same for every image and
both probes sit at chance, 25%.) Both probes follow eva's protocol (one Linear,
AdamW 3e-4, batch 256, <= 12,500 steps, early stopping on validation balanced accuracy,
best checkpoint, 5 runs); both report mean test balanced accuracy. eva runs in its own
virtualenv (`--eva-python`, not a project dependency) through its Python API (Trainer,
HeadModule, EmbeddingsClassificationDataset over .pt files); its wall time includes its
process start.

    flock /tmp/dinov2_patho_heavy.lock .venv/bin/python benchmarks/linear_probe_vs_eva.py [--quick]
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from dinov2_patho.eval.benchmarks import build_benchmark
from dinov2_patho.eval.features import extract_features
from dinov2_patho.eval.heads import LinearProbeConfig, linear_probe
from dinov2_patho.eval.preprocess import Preprocess

from dinov2_patho.data.synthetic import make_cohort
from dinov2_patho.models import build_backbone

# Run by eva's own interpreter. eva's `eva fit --config` YAML route fails in that venv: its
# jsonargparse (4.53) rejects `criterion: torch.nn.CrossEntropyLoss` ("Expected a path ...
# not accessible or invalid"), so we build the same objects as eva's offline configs in Python.
EVA_DRIVER = """\
import functools, sys
import torch
from lightning.pytorch import callbacks
import eva
from eva.core.data import dataloaders, datamodules
from eva.core.data.datasets import EmbeddingsClassificationDataset
from eva.core.metrics import MulticlassClassificationMetrics
from eva.core.metrics.structs import MetricsSchema

root = sys.argv[1]
dim, classes, patience, n_runs = map(int, sys.argv[2:6])
best = {"monitor": "val/MulticlassAccuracy", "mode": "max"}
trainer = eva.Trainer(default_root_dir=root + "/logs", n_runs=n_runs, max_steps=12500, checkpoint_type="best",
                      accelerator="cpu", devices=1, enable_progress_bar=False, logger=False,
                      callbacks=[
                          callbacks.ModelCheckpoint(filename="best", save_top_k=1, **best),
                          callbacks.EarlyStopping(min_delta=0, patience=patience, **best)])
model = eva.HeadModule(head=torch.nn.Linear(dim, classes), criterion=torch.nn.CrossEntropyLoss(),
                       optimizer=functools.partial(torch.optim.AdamW, lr=3e-4),
                       metrics=MetricsSchema(common=MulticlassClassificationMetrics(num_classes=classes)))


def split(name):
    return EmbeddingsClassificationDataset(root=root + "/embeddings", manifest_file="manifest.csv",
                                           split=name)


# in-process loading: eva's DataLoader defaults (prefetch, persistent workers) need workers
loader = {"batch_size": 256, "num_workers": 0, "prefetch_factor": None, "persistent_workers": False}
data = eva.DataModule(
    datasets=datamodules.schemas.DatasetsSchema(train=split("train"), val=split("val"), test=split("test")),
    dataloaders=datamodules.schemas.DataloadersSchema(
        train=dataloaders.DataLoader(shuffle=True, **loader),
        val=dataloaders.DataLoader(**loader),
        test=dataloaders.DataLoader(**loader)))
trainer.run_evaluation_session(model=model, datamodule=data)
"""


def synthetic_features(out: Path, max_tiles: int | None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
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


def write_eva_embeddings(feats: dict[str, tuple[np.ndarray, np.ndarray]], root: Path) -> None:
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


def run_eva(eva_python: Path, root: Path, dim: int, classes: int, patience: int,
            n_runs: int) -> tuple[dict, float]:
    start = time.perf_counter()
    argv = [str(eva_python), "-c", EVA_DRIVER, str(root), *map(str, (dim, classes, patience, n_runs))]
    proc = subprocess.run(argv, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"eva failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    found = sorted((root / "logs").rglob("results.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(found[-1].read_text())["metrics"], wall


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="60 tiles per split, 2 runs")
    parser.add_argument("--out", type=Path, default=Path("/tmp/dinov2_patho_lp_vs_eva"))
    parser.add_argument("--eva-python", type=Path, default=Path("/tmp/eva-venv/bin/python"))
    args = parser.parse_args()
    out = args.out / ("quick" if args.quick else "full")
    n_runs = 2 if args.quick else 5
    feats = synthetic_features(out, 60 if args.quick else None)
    classes = [str(c) for c in range(int(max(y.max() for _, y in feats.values())) + 1)]
    sizes = {k: len(v[1]) for k, v in feats.items()}
    print(f"features: {sizes} rows, dim {feats['train'][0].shape[1]}")

    cfg = LinearProbeConfig(n_runs=n_runs)
    start = time.perf_counter()
    ours = linear_probe(feats["train"], feats["val"], feats["test"], classes, cfg)
    ours_wall = time.perf_counter() - start
    patience = ours["runs"][0]["patience"]  # eva's per-dataset rule, the same for both

    if not args.eva_python.is_file():
        print(f"eva: not run, {args.eva_python} is absent (python3 -m venv /tmp/eva-venv && "
              "/tmp/eva-venv/bin/pip install torch==2.13.0 kaiko-eva)")
        print(f"ours: test balanced accuracy {100 * ours['balanced_accuracy']:.2f} ± "
              f"{100 * ours['balanced_accuracy_std']:.2f}, {ours_wall:.2f} s")
        return 1
    eva_root = out / "eva"
    write_eva_embeddings(feats, eva_root)
    dim = feats["train"][0].shape[1]
    metrics, eva_wall = run_eva(args.eva_python, eva_root, dim, len(classes), patience, n_runs)
    eva_test = metrics["test"][0]["test/MulticlassAccuracy"]
    eva_val = metrics["val"][0]["val/MulticlassAccuracy"]
    ours_val = float(np.mean([r["val_balanced_accuracy"] for r in ours["runs"]]))
    diff = 100 * (ours["balanced_accuracy"] - eva_test["mean"])
    print(f"ours: test balanced accuracy {100 * ours['balanced_accuracy']:.2f} ± "
          f"{100 * ours['balanced_accuracy_std']:.2f} (val {100 * ours_val:.2f}), wall {ours_wall:.2f} s "
          f"for {n_runs} runs")
    print(f"eva:  test balanced accuracy {100 * eva_test['mean']:.2f} ± {100 * eva_test['stdev']:.2f} "
          f"(val {100 * eva_val['mean']:.2f}), wall {eva_wall:.2f} s for {n_runs} runs (incl. process start)")
    print(f"difference (ours - eva): {diff:+.2f} points (limit ±1); wall-time ratio eva/ours: "
          f"{eva_wall / ours_wall:.1f}x")
    return 0 if abs(diff) <= 1.0 else 1


if __name__ == "__main__":
    sys.exit(main())
