"""The paper's experiment in miniature (Chen et al. 2025, T1-BS vs uniform): one curated pool, trained
three ways with everything else equal, over cohort seeds.

Per seed: the demo's long-tailed synthetic cohort -> curation with the demo's frozen random-init ViT-Ti
(tiles, embeddings, cpu_smoke tree) -> cpu_smoke training (300 iterations, batch 16) with
  uniform   uniform batches over every curated tile,
  subset    uniform batches over the `curate sample` balanced subset (SUBSET_SHARE of the tiles),
  stratified  batches stratified over the tree's top level (the paper's T1-BS analogue),
-> each teacher and the random initialisation on the tile probe (balanced accuracy overall and on the
rare types, linear and kNN; 4-fold CV by slide) and the slide task (attention-MIL AUROC, 4-fold CV).

    python benchmarks/paper_small.py --seeds 0 1 2 3 --out runs/paper_small

Seeds already done under --out are reused (run two processes with different --seeds to use both
cores); the table covers every seed found. Prints mean ± std per arm and the paired differences.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from dinov2_patho.curation.pipeline import run_command
from dinov2_patho.demo import (
    class_groups,
    curate_cohort,
    evaluate,
    group_recall,
    make_demo_cohort,
    probe_scores,
    train_config,
)
from dinov2_patho.io import atomic_write_text

ARMS = ("uniform", "subset", "stratified")
SUBSET_SHARE = 0.4
METRICS = ("tile linear", "tile kNN", "rare recall", "slide MIL AUROC")


def arm_overrides(arm: str, subset: Path) -> list[str]:
    if arm == "stratified":
        return []  # train_config's default: cluster_stratified at the tree's top level
    extra = [f"data.subset={subset}"] if arm == "subset" else []
    return ["sampler.name=uniform", "sampler.level=null", *extra]


def scores(result: dict, rare: list[str]) -> dict[str, float]:
    tiles = probe_scores(result["tiles"])
    return {"tile linear": tiles["linear"], "tile kNN": tiles["knn"],
            "rare recall": group_recall(result["tiles"], rare),
            "slide MIL AUROC": result["slides"]["abmil"]["auroc"]}


def run_seed(seed: int, out: Path, num_slides: int, overrides: list[str]) -> dict:
    """One seed's three trainings and evaluations under `out` (reused when results.json is there)."""
    import torch

    from dinov2_patho.data.index import TileIndex
    from dinov2_patho.train.export import teacher_backbone
    from dinov2_patho.train.student import build_student_backbone
    from dinov2_patho.train.trainer import run_training

    done = out / "results.json"
    if done.is_file():
        return json.loads(done.read_text())
    cohort = make_demo_cohort(out / "cohort", num_slides, seed)
    curation = curate_cohort(cohort, out / "curation", progress=False)
    num_tiles = len(TileIndex.open(curation.index))
    subset = out / "subset.npy"
    if not subset.is_file():
        run_command("curate", "sample", "--tree", str(curation.tree), "--target",
                    str(round(SUBSET_SHARE * num_tiles)), "--seed", str(seed), "--out", str(subset))
    backbones = {}
    for arm in ARMS:
        cfg = train_config(curation.index, cohort.slides_dir, seed, [*arm_overrides(arm, subset), *overrides])
        backbones[arm] = teacher_backbone(run_training(cfg, out / arm)["checkpoint"])
    torch.manual_seed(seed)
    backbones["random_init"] = build_student_backbone(cfg).eval()
    results = evaluate(backbones, cohort, cfg.crops.global_crops_size, out / "eval")
    rare = class_groups(cohort.labels_csv)["rare"]
    record = {"seed": seed, "tiles": num_tiles, "subset": round(SUBSET_SHARE * num_tiles), "rare": rare,
              "scores": {name: scores(result, rare) for name, result in results.items()}}
    atomic_write_text(done, json.dumps(record, indent=1))
    return record


def agreement(seed: int, out: Path, num_slides: int) -> dict:
    """Level-wise ARI of the random-init tree and of re-curations of the same tiles with each arm's
    teacher, against the planted tissue types (reused when agreement.json is there)."""
    from dinov2_patho.curation.pipeline import tree_agreement

    done = out / "agreement.json"
    if done.is_file():
        return json.loads(done.read_text())
    cohort = make_demo_cohort(out / "cohort", num_slides, seed)
    curation = curate_cohort(cohort, out / "curation", progress=False)
    rows = {"random-init ViT-Ti": tree_agreement(curation.index, cohort.labels_csv)}
    for arm in ARMS:
        again = curate_cohort(cohort, out / f"recuration_{arm}", progress=False, backbone=out / arm,
                              tiles=curation.tiles)
        rows[f"{arm} teacher"] = tree_agreement(again.index, cohort.labels_csv)
    record = {name: [r["ari"] for r in levels] for name, levels in rows.items()}
    atomic_write_text(done, json.dumps(record, indent=1))
    return record


def agreement_table(records: dict[int, dict]) -> str:
    """ARI per level, mean ± std over seeds, per curation embedding."""
    names = next(iter(records.values())).keys()
    levels = len(next(iter(next(iter(records.values())).values())))
    lines = ["Tree agreement with the planted tissue types: adjusted Rand index per level, mean ± std "
             "over seeds (min–max)", "", "| embedding | " + " | ".join(f"level {k}" for k in
                                                                   range(1, levels + 1)) + " |",
             "|---|" + "---|" * levels]
    for name in names:
        cells = []
        for k in range(levels):
            v = np.array([r[name][k] for r in records.values()])
            cells.append(f"{v.mean():.2f} ± {v.std():.2f} ({v.min():.2f}–{v.max():.2f})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def summary_table(records: list[dict]) -> str:
    """Mean ± std over seeds per arm, then paired differences (min / mean / max over seeds)."""
    names = (*ARMS, "random_init")
    lines = [f"{len(records)} seeds ({', '.join(str(r['seed']) for r in records)}); scores in %", "",
             "| arm | " + " | ".join(METRICS) + " |", "|---|" + "---|" * len(METRICS)]
    for name in names:
        cells = []
        for metric in METRICS:
            values = 100 * np.array([r["scores"][name][metric] for r in records])
            cells.append(f"{np.nanmean(values):.1f} ± {np.nanstd(values):.1f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Paired differences (points): min / mean / max over seeds; `all >0` or `all <0` when "
              "every seed agrees.", "", "| comparison | " + " | ".join(METRICS) + " |",
              "|---|" + "---|" * len(METRICS)]
    for a, b in (("stratified", "uniform"), ("stratified", "subset"), ("subset", "uniform"),
                 ("stratified", "random_init")):
        cells = []
        for metric in METRICS:
            d = 100 * np.array([r["scores"][a][metric] - r["scores"][b][metric] for r in records])
            sign = " all >0" if (d > 0).all() else " all <0" if (d < 0).all() else ""
            cells.append(f"{d.min():+.1f} / {d.mean():+.1f} / {d.max():+.1f}{sign}")
        lines.append(f"| {a} − {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--out", type=Path, default=Path("runs/paper_small"))
    parser.add_argument("--num-slides", type=int, default=16)
    parser.add_argument("overrides", nargs="*",
                        help="train overrides for every arm (e.g. train.iterations=100)")
    args = parser.parse_args()
    for seed in args.seeds:
        record = run_seed(seed, args.out / f"seed_{seed}", args.num_slides, args.overrides)
        print(f"seed {seed}: " + json.dumps(record["scores"]))
    records = sorted((json.loads(p.read_text()) for p in args.out.glob("seed_*/results.json")),
                     key=lambda r: r["seed"])
    trees = {r["seed"]: agreement(r["seed"], args.out / f"seed_{r['seed']}", args.num_slides)
             for r in records}
    table = summary_table(records) + "\n" + agreement_table(trees)
    atomic_write_text(args.out / "summary.md", table)
    print(table)


if __name__ == "__main__":
    main()
