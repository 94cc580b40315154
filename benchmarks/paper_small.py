"""The paper's experiment in miniature (Chen et al. 2025, T1-BS vs uniform vs a curated subset), on the
second round of the method's own loop, over cohort seeds.

Per seed, the demo's cohort and recipe (`dinov2-patho demo`):
  round 1   curation with a frozen random-init ViT-Ti -> the demo's round 1 (stratified over that tree's
            top level) -> re-curation of the same tiles with its teacher (a competent embedder);
  round 2   training from scratch on the re-curated tree, three ways with everything else equal:
              uniform     uniform batches over every curated tile,
              subset      uniform batches over the `curate sample` balanced subset (SUBSET_SHARE of
                          the tiles),
              stratified  batches stratified over the re-curated tree's top level (the paper's T1-BS;
                          the demo's round 2);
-> each teacher (both rounds) and the random initialisation on the tile probe: balanced accuracy of the
out-of-fold predictions (4-fold CV by slide) of the linear probe and kNN, and the linear probe's recall of
the rare types. Then, over seeds: mean ± std per arm, and for each comparison the paired per-seed
differences (mean, t interval, min / max, minimum detectable effect at this many seeds) and the paired
slide-bootstrap interval of each seed.

    python benchmarks/paper_small.py --seeds 0 1 2 3 4 5 --out runs/paper_small

Seeds already done under --out are reused (run two processes with different --seeds to use both
cores); the tables cover every seed found.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from dinov2_patho.curation.pipeline import Curation, tree_agreement
from dinov2_patho.curation.sampling import balanced_subset
from dinov2_patho.demo.method import (
    DEMO_SLIDES,
    class_groups,
    curate_cohort,
    make_demo_cohort,
    random_init,
    tile_probe,
    train_config,
)
from dinov2_patho.eval.power import paired_bootstrap_difference, paired_seed_differences
from dinov2_patho.io import atomic_write_text

ARMS = ("uniform", "subset", "stratified")
BACKBONES = (*ARMS, "round_1", "random_init")
SUBSET_SHARE = 0.4
HEADS = {"linear": "linear", "kNN": "knn_20"}  # metric name -> prediction key
METRICS = (*HEADS, "rare recall")
COMPARISONS = (("stratified", "uniform"), ("stratified", "subset"), ("subset", "uniform"),
               ("uniform", "random_init"), ("stratified", "random_init"), ("round_1", "random_init"))


def arm_overrides(arm: str, subset: Path) -> list[str]:
    if arm == "stratified":
        return []  # train_config's default: cluster_stratified at the tree's top level
    extra = [f"data.subset={subset}"] if arm == "subset" else []
    return ["sampler.name=uniform", "sampler.level=null", *extra]


def run_seed(seed: int, out: Path, num_slides: int, overrides: list[str], rounds: int = 2) -> dict:
    """One seed's rounds and evaluations under `out`; results.json is reused when it holds `rounds`.
    With rounds=1: the demo's training (round_1) and the random initialisation only."""
    from dinov2_patho.backbones.teacher import teacher_backbone
    from dinov2_patho.data.index import TileIndex
    from dinov2_patho.train.trainer import run_training

    done = out / "results.json"
    if done.is_file() and json.loads(done.read_text())["rounds"] >= rounds:
        return json.loads(done.read_text())
    cohort = make_demo_cohort(out / "cohort", num_slides, seed)
    cfg = train_config(Curation(out / "curation").index, cohort.slides_dir, seed, overrides)
    size = cfg.crops.global_crops_size
    first = curate_cohort(cohort, out / "curation", size, progress=False)
    round_1 = run_training(cfg, out / "round_1", progress=False)
    backbones = {"round_1": teacher_backbone(round_1["checkpoint"])}
    second = curate_cohort(cohort, out / "recuration", size, progress=False, backbone=out / "round_1",
                           tiles=first.tiles)
    num_tiles = len(TileIndex.open(second.index))
    subset = out / "subset.npy"
    if rounds == 2 and not subset.is_file():
        balanced_subset(second.tree, round(SUBSET_SHARE * num_tiles), subset, seed=seed)
    for arm in ARMS if rounds == 2 else ():
        arm_cfg = train_config(second.index, cohort.slides_dir, seed,
                               [*arm_overrides(arm, subset), *overrides])
        backbones[arm] = teacher_backbone(run_training(arm_cfg, out / arm, progress=False)["checkpoint"])
    backbones["random_init"] = random_init(cfg)  # the weights every training of this seed starts from
    rare = class_groups(cohort.labels_csv)["rare"]
    results = {name: tile_probe(bb, cohort, size, out / "eval" / name, progress=False)
               for name, bb in backbones.items()}
    preds = {name: r["predictions"] for name, r in results.items()}
    y, groups = preds["random_init"]["y"], preds["random_init"]["groups"]
    classes = results["random_init"]["classes"]
    per_fold = {c: int((y == classes.index(c)).sum() / 4) for c in classes}
    record = {"seed": seed, "rounds": rounds, "tiles": num_tiles, "subset": round(SUBSET_SHARE * num_tiles),
              "rare": rare, "test_tiles_per_fold": per_fold,
              "scores": {name: scores(result, rare) for name, result in results.items()},
              "paired": {f"{a} - {b}": {metric: paired_bootstrap_difference(
                  y, preds[a][key], preds[b][key], groups, len(classes)).as_dict()
                  for metric, key in HEADS.items()} for a, b in COMPARISONS if a in preds and b in preds},
              "ari": {name: [r["ari"] for r in tree_agreement(c.index, cohort.labels_csv)]
                      for name, c in (("random-init ViT-Ti", first), ("round-1 teacher", second))}}
    atomic_write_text(done, json.dumps(record, indent=1))
    return record


def scores(result: dict, rare: list[str]) -> dict[str, float]:
    from dinov2_patho.demo.method import group_recall, pooled_scores

    pooled = pooled_scores(result)
    return {"linear": pooled["linear"], "kNN": pooled["knn"], "rare recall": group_recall(result, rare)}


def summary_table(records: list[dict]) -> str:
    """Mean ± std over seeds per backbone, then the paired comparisons."""
    seeds = ", ".join(str(r["seed"]) for r in records)
    lines = [f"{len(records)} seeds ({seeds}); balanced accuracy of out-of-fold predictions, %; "
             "mean ± std over seeds (min–max)", "",
             "| backbone | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    for name in BACKBONES:
        cells, have = [], [r for r in records if name in r["scores"]]
        if not have:
            continue
        for metric in METRICS:
            v = 100 * np.array([r["scores"][name][metric] for r in have])
            cells.append(f"{np.nanmean(v):.1f} ± {np.nanstd(v, ddof=1):.1f} "
                         f"({np.nanmin(v):.1f}–{np.nanmax(v):.1f})")
        lines.append(f"| {name} ({len(have)} seeds) | " + " | ".join(cells) + " |")
    lines += ["", "Paired differences over seeds (points): mean [95 % t interval], min / max, and the "
              "minimum detectable effect at this many seeds (80 % power, 5 % two-sided); `all >0` / `all <0` "
              "when every seed agrees; `seeds CI>0` counts the seeds whose own slide-bootstrap interval "
              "excludes 0.",
              "", "| comparison | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    for a, b in COMPARISONS:
        cells, have = [], [r for r in records if f"{a} - {b}" in r["paired"]]
        if len(have) < 2:
            continue
        for metric in METRICS:
            d = paired_seed_differences([100 * r["scores"][a][metric] for r in have],
                                        [100 * r["scores"][b][metric] for r in have])
            sign = " all >0" if d["all_positive"] else " all <0" if d["all_negative"] else ""
            cell = (f"{d['mean']:+.1f} [{d['low']:+.1f}, {d['high']:+.1f}], "
                    f"{d['min']:+.1f} / {d['max']:+.1f}, MDE {d['mde']:.1f}{sign}")
            if metric in HEADS:
                above = sum(r["paired"][f"{a} - {b}"][metric]["low"] > 0 for r in have)
                below = sum(r["paired"][f"{a} - {b}"][metric]["high"] < 0 for r in have)
                cell += f"; seeds CI>0 {above}, CI<0 {below}"
            cells.append(cell)
        lines.append(f"| {a} − {b} ({len(have)} seeds) | " + " | ".join(cells) + " |")
    levels = len(records[0]["ari"]["random-init ViT-Ti"])
    lines += ["", "Tree agreement with the planted tissue types: ARI per level, mean (min–max) over seeds",
              "",
              "| embedding | " + " | ".join(f"level {k}" for k in range(1, levels + 1)) + " |",
              "|---|" + "---|" * levels]
    for name in records[0]["ari"]:
        cells = [f"{np.mean(v):.2f} ({np.min(v):.2f}–{np.max(v):.2f})"
                 for v in (np.array([r["ari"][name][k] for r in records]) for k in range(levels))]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    classes = records[0]["test_tiles_per_fold"]
    per_fold = {c: min(r["test_tiles_per_fold"][c] for r in records) for c in classes}
    lines += ["", "Fewest test tiles per fold of each type, over seeds: "
              + ", ".join(f"{c} {n}" for c, n in per_fold.items())]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    parser.add_argument("--out", type=Path, default=Path("runs/paper_small"))
    parser.add_argument("--num-slides", type=int, default=DEMO_SLIDES)
    parser.add_argument("--rounds", type=int, choices=(1, 2), default=2,
                        help="1: the demo's training and its random init only; 2: also the three arms")
    parser.add_argument("overrides", nargs="*",
                        help="train overrides for every training (e.g. train.iterations=100)")
    args = parser.parse_args()
    for seed in args.seeds:
        record = run_seed(seed, args.out / f"seed_{seed}", args.num_slides, args.overrides, args.rounds)
        print(f"seed {seed}: " + json.dumps(record["scores"]))
    records = sorted((json.loads(p.read_text()) for p in args.out.glob("seed_*/results.json")),
                     key=lambda r: r["seed"])
    table = summary_table(records)
    atomic_write_text(args.out / "summary.md", table)
    print(table)


if __name__ == "__main__":
    main()
