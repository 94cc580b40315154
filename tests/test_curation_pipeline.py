"""The curation chain end to end on the synthetic cohort: slides -> tiles -> embeddings -> tree ->
clusters.csv + index -> training with batches stratified over the tree it made; and the score of a
tree against the cohort's planted tissue types."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from dinov2_patho.config_files import packaged_config
from dinov2_patho.curation.pipeline import curate, planted_labels, tree_agreement
from dinov2_patho.curation.tree import ClusterTree
from dinov2_patho.data.index import TileIndex
from dinov2_patho.errors import UserError
from dinov2_patho.train import trainer as trainer_mod
from dinov2_patho.train.config import load_train_config

# A random-init timm ViT-Ti: a real frozen ViT at a quarter of ViT-S's cost on a CPU.
EMBED_ARCH = "timm/vit_tiny_patch16_224"
TINY_TRAIN = [
    "student.embed_dim=48", "student.depth=2", "student.num_heads=2", "student.patch_size=16",
    "dino.head_n_prototypes=64", "dino.head_hidden_dim=64", "dino.head_bottleneck_dim=32",
    "ibot.head_n_prototypes=64", "ibot.head_hidden_dim=64", "ibot.head_bottleneck_dim=32",
    "crops.global_crops_size=64", "crops.local_crops_size=32", "crops.local_crops_number=2",
    "train.batch_size_per_gpu=8", "optim.warmup_iterations=1", "train.num_workers=0",
    "teacher.warmup_teacher_temp_iterations=2", "train.iterations=2", "checkpoint.every_n_iterations=2",
]


def test_planted_tree_agrees_perfectly_with_its_own_labels(cohort, cohort_index):
    """The cohort's planted tree: level 4 is the tissue type (ARI = NMI = 1); the finer levels
    split types, so their ARI is lower, and labels are found for every tile."""
    rows = {r["level"]: r for r in tree_agreement(cohort_index, cohort.labels_csv)}
    assert rows[4]["ari"] == pytest.approx(1.0) and rows[4]["nmi"] == pytest.approx(1.0)
    assert rows[1]["ari"] < 0.9
    assert all(r["tiles"] == len(cohort_index) for r in rows.values())


def test_planted_labels_follow_rows_and_leave_unknown_tiles_blank(cohort, cohort_index, tmp_path):
    truth = planted_labels(cohort_index, cohort.labels_csv)
    with open(cohort.labels_csv, newline="") as f:
        first = next(csv.DictReader(f))
    assert cohort_index.tile(0) == (first["slide_id"], int(first["tile_x"]), int(first["tile_y"]))
    assert truth[0] == first["tissue_type"]
    empty = tmp_path / "labels.csv"
    empty.write_text("slide_id,tile_x,tile_y,tissue_type\nnope,0,0,tumor\n")
    assert (planted_labels(cohort_index, empty) == "").all()
    with pytest.raises(UserError, match="none of the"):
        tree_agreement(cohort_index, empty)


@pytest.mark.slow
def test_chain_from_slides_to_training_on_the_tree_it_made(cohort, tmp_path):
    config = packaged_config("curation/cpu_smoke.yaml")
    out = curate(cohort.slides_dir, tmp_path / "curation", config_file=config, arch=EMBED_ARCH,
                 overrides=("embed.token=patch_mean", "tiles.workers=1"), progress=False)
    index = TileIndex.open(out.index)
    tree = ClusterTree.open(out.tree)
    tiles = TileIndex.open(out.tiles / "index")
    assert len(index) == len(tiles) == tree.num_points
    assert index.num_levels == tree.num_levels == 3
    for level in range(1, 4):  # the index's dense ids are the tree's labels, renamed in order of appearance
        labels = tree.tile_labels(level)
        _, first = np.unique(labels, return_index=True)
        assert len(np.unique(np.asarray(index.level(level)))) == len(first)
        pairs = set(zip(np.asarray(index.level(level)).tolist(), labels.tolist()))
        assert len(pairs) == len(first)  # one-to-one
    # the tree is better than chance at finding the planted tissue types, at its coarsest level
    assert tree_agreement(index, cohort.labels_csv)[-1]["ari"] > 0.1
    # a second call finds every stage complete and reruns none
    before = {p: p.stat().st_mtime_ns for p in out.root.rglob("*") if p.is_file()}
    curate(cohort.slides_dir, out.root, config_file=config, arch=EMBED_ARCH,
           overrides=("embed.token=patch_mean",), progress=False)
    assert {p: p.stat().st_mtime_ns for p in out.root.rglob("*") if p.is_file()} == before

    cfg = load_train_config(packaged_config("train/cpu_smoke.yaml"), [
        f"data.index={out.index}", f"data.slides={cohort.slides_dir}", "sampler.level=level_3", *TINY_TRAIN])
    summary = trainer_mod.run_training(cfg, tmp_path / "train")
    assert summary["iteration"] == 2
