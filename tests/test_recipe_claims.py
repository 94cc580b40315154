"""Every shipped recipe (configs/**/*.yaml) does what its name and its comment say.

Each recipe is built the way its command builds it, without training: a training recipe's sampler by
the trainer's own `open_training_data` on the synthetic cohort's 4-level index and its model on the
meta device; a tree's levels scaled by `scale_levels` to the point counts its comment names; an eval
config's heads from their merged config. The claims below are the recipes' comments, written as
numbers: a recipe edited away from its comment, or a new recipe without claims here, fails.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from dinov2_patho.config_files import ConfigError
from dinov2_patho.curation import hierarchy
from dinov2_patho.curation.config import load_curation_config
from dinov2_patho.errors import UserError
from dinov2_patho.train.config import global_batch_size, load_train_config, validate_config
from dinov2_patho.train.schedules import scaled_lr
from dinov2_patho.train.ssl_meta_arch import SSLMetaArch
from dinov2_patho.train.trainer import open_training_data

CONFIGS = Path(__file__).parents[1] / "configs"
SHIPPED = sorted(p.relative_to(CONFIGS).as_posix() for p in CONFIGS.rglob("*.yaml"))
PAPER_TILES = 349_664_180
PAPER_ARMS = ("vitl14_t1_bs", "vitl14_t1_random", "vitl14_metadata")
SMALL_ARMS = ("vits14_small_uniform", "vits14_small_subset", "vits14_small_stratified")


class Built:
    """A training recipe as `train` builds it: config, sampler over the (view of the) index, model."""

    def __init__(self, name: str, index, gpus: int, *overrides: str):
        path = CONFIGS / "train" / f"{name}.yaml"
        self.cfg = load_train_config(path, [f"data.index={index.path}", *overrides])
        validate_config(self.cfg)
        self.global_batch = global_batch_size(self.cfg, gpus)
        self.index, self.sampler = open_training_data(self.cfg, self.global_batch)
        with torch.device("meta"):
            self.backbone = SSLMetaArch(self.cfg).student["backbone"]

    def model(self) -> tuple[int, int, int]:
        return self.backbone.embed_dim, self.backbone.n_blocks, self.backbone.patch_size

    def section(self, name: str) -> dict:
        return OmegaConf.to_container(self.cfg[name])


def metadata_overrides(cohort) -> list[str]:
    return [f"sampler.metadata_csv={cohort.metadata_csv}", "sampler.target_size=100"]


def build_train(name: str, cohort, cohort_index, tmp_path: Path, gpus: int) -> Built:
    extra = metadata_overrides(cohort) if name == "vitl14_metadata" else []
    if name == "vits14_small_subset":
        subset = tmp_path / "subset.npy"
        np.save(subset, np.arange(0, len(cohort_index), 3, dtype=np.int64))
        extra = [f"data.subset={subset}"]
    return Built(name, cohort_index, gpus, *extra)


def test_every_shipped_recipe_has_its_claims_checked():
    assert set(SHIPPED) == set(CLAIMED), "a recipe without claims here, or claims of a recipe not shipped"


# --- training ------------------------------------------------------------------------------------

def test_paper_recipes_vitl14_t1(cohort, cohort_index, tmp_path):
    """vitl14_t1_bs: ViT-L/14, batches stratified over t1's level 4 with the 800-slide cap, global
    batch 2048 = 64 x 32 GPUs, 170k iterations = 1000 x 170, the fork's epochs x 170, lr for 1024 x
    sqrt(2048 / 1024); _random: uniform batches, _metadata: the metadata sampler; nothing else differs."""
    arms = {name: build_train(name, cohort, cohort_index, tmp_path, gpus=32) for name in PAPER_ARMS}
    bs = arms["vitl14_t1_bs"]
    assert bs.model() == (1024, 24, 14) and bs.global_batch == 2048
    assert (bs.sampler.name, bs.sampler.label_name, bs.sampler.max_slides) == (
        "cluster_stratified", "level_4", 800)
    assert bs.cfg.sampler.pseudo_epoch_samples == 350_000 and bs.cfg.data.subset is None
    assert bs.cfg.train.iterations == 1000 * 170
    assert (bs.cfg.optim.warmup_iterations, bs.cfg.teacher.warmup_teacher_temp_iterations,
            bs.cfg.optim.freeze_last_layer_iterations) == (160 * 170, 30 * 170, 1 * 170)
    assert scaled_lr(bs.cfg.optim.base_lr, 2048, bs.cfg.optim.scaling_rule) == pytest.approx(
        2e-4 * math.sqrt(2048 / 1024))
    assert arms["vitl14_t1_random"].sampler.name == "uniform"
    metadata = arms["vitl14_metadata"]
    assert metadata.sampler.name == "uniform"  # stratify: false draws the subset uniformly
    assert (metadata.cfg.sampler.name, metadata.cfg.sampler.column, metadata.cfg.sampler.stratify) == (
        "metadata", "tissue_diagnosis", False)
    assert len(metadata.sampler.positions) == 100
    for arm in arms.values():
        assert {k: v for k, v in OmegaConf.to_container(arm.cfg).items() if k != "sampler"} == \
            {k: v for k, v in OmegaConf.to_container(bs.cfg).items() if k != "sampler"}


def test_metadata_recipe_needs_the_users_metadata(cohort_index):
    cfg = load_train_config(CONFIGS / "train" / "vitl14_metadata.yaml", [f"data.index={cohort_index.path}"])
    with pytest.raises(UserError, match=r"^sampler 'metadata' needs sampler.metadata_csv$"):
        validate_config(cfg)


def test_gpu_scale_comparison_vits14_small(cohort, cohort_index, tmp_path):
    """ViT-S/14, global batch 1024 = 128 x 8 GPUs, 25,000 iterations, vitl14_t1_bs's optimisation with
    warmups at the same share of the schedule; the arms differ only in sampler and data.subset:
    uniform over every tile, uniform over the subset, stratified over level 3 without a slide cap."""
    arms = {name: build_train(name, cohort, cohort_index, tmp_path, gpus=8) for name in SMALL_ARMS}
    paper = load_train_config(CONFIGS / "train" / "vitl14_t1_bs.yaml")
    shares = {"optim": "warmup_iterations", "teacher": "warmup_teacher_temp_iterations"}
    for arm in arms.values():
        assert arm.model() == (384, 12, 14) and arm.global_batch == 1024
        assert arm.cfg.train.iterations == 25_000
        for section, key in shares.items():
            assert arm.cfg[section][key] / arm.cfg.train.iterations == pytest.approx(
                paper[section][key] / paper.train.iterations)
            assert {k: v for k, v in arm.section(section).items() if k != key} == \
                {k: v for k, v in OmegaConf.to_container(paper[section]).items() if k != key}
    uniform, subset, stratified = (arms[name] for name in SMALL_ARMS)
    assert uniform.sampler.name == "uniform" and len(uniform.index) == len(cohort_index)
    assert subset.sampler.name == "uniform" and len(subset.index) == len(range(0, len(cohort_index), 3))
    assert (stratified.sampler.name, stratified.sampler.label_name, stratified.sampler.max_slides) == (
        "cluster_stratified", "level_3", None)
    assert uniform.cfg.data.subset is None and stratified.cfg.data.subset is None
    rest = [{k: v for k, v in OmegaConf.to_container(arm.cfg).items() if k not in ("sampler", "data")}
            for arm in arms.values()]
    assert rest[0] == rest[1] == rest[2]


def test_the_subset_arm_refuses_to_train_on_every_tile(cohort_index):
    with pytest.raises(ConfigError, match=r"^data.subset is required by .*vits14_small_subset.yaml"):
        load_train_config(CONFIGS / "train" / "vits14_small_subset.yaml", [f"data.index={cohort_index.path}"])


def test_cpu_smoke_is_a_tiny_vit_stratified_over_the_cohorts_tissue_types(cohort, cohort_index, tmp_path):
    """A tiny ViT on the synthetic cohort, CPU; stratified over its tree's coarsest level, tissue type
    (sizes are loose: the recipe is retuned)."""
    smoke = build_train("cpu_smoke", cohort, cohort_index, tmp_path, gpus=1)
    width, depth, _ = smoke.model()
    assert smoke.cfg.student.arch is None and width <= 192 and depth <= 6
    assert smoke.cfg.train.device == "cpu" and smoke.cfg.compute_precision.amp == "off"
    assert smoke.sampler.name == "cluster_stratified" and smoke.cfg.sampler.level == cohort_index.num_levels
    tissue = np.unique(np.asarray(cohort_index.level(cohort_index.num_levels)))
    assert smoke.sampler.num_labels >= len(tissue)


def test_train_defaults_build_vit_large_with_uniform_batches(cohort_index, tmp_path):
    """The defaults (train/config.py): `arch: null` is vit_large; local crops a multiple of the patch
    (7 x 14)."""
    cfg = load_train_config(None, [f"data.index={cohort_index.path}"])
    validate_config(cfg)
    with torch.device("meta"):
        backbone = SSLMetaArch(cfg).student["backbone"]
    assert (backbone.embed_dim, backbone.n_blocks) == (1024, 24)
    assert cfg.sampler.name == "uniform" and cfg.crops.local_crops_size == 7 * cfg.student.patch_size


# --- curation trees ------------------------------------------------------------------------------

def levels(name: str) -> list[hierarchy.LevelSpec]:
    return hierarchy.parse_levels(load_curation_config(CONFIGS / "curation" / f"{name}.yaml").kmeans.levels)


def clusters(specs: list[hierarchy.LevelSpec], points: int) -> list[int]:
    return [s.total_clusters for s in hierarchy.scale_levels(specs, points, "test")]


@pytest.mark.parametrize("name, paper, at_10m, fewest", [
    ("t1", [3_500_000, 35_000, 350, 62], [100_135, 1_002, 11, 2], 1_000_000),
    ("t2", [3_500_000, 100_000, 10_000, 2_048], [100_135, 2_861, 287, 59], 100_000)])
def test_paper_trees(name, paper, at_10m, fewest):
    """The paper's tree: level 1 100,000 x 35, resampling steps 1/10/10/10, closest, 50 Lloyd
    iterations, k-means++; sample_per_cluster about half a level's mean cluster size;
    min_mean_cluster_size the paper tree's own points per cluster; the counts at 10M tiles; four
    decreasing levels from about `fewest` tiles on."""
    specs = levels(name)
    assert clusters(specs, PAPER_TILES) == paper and (specs[0].clusters, specs[0].split) == (100_000, 35)
    assert [s.resampling_steps for s in specs] == [1, 10, 10, 10]
    assert all(s.iterations == 50 and s.init == "kmeans++" for s in specs)
    assert all(s.strategy == "closest" for s in specs[1:])
    below = [PAPER_TILES, *paper[:-1]]
    for spec, points, k in zip(specs, below, paper):
        assert spec.min_mean_cluster_size == pytest.approx(points / k, rel=1e-3)
    for spec, points, k in zip(specs[1:], below[1:], paper[1:]):
        assert abs(spec.sample_per_cluster - points / k / 2) <= 0.5
    assert clusters(specs, 10_000_000) == at_10m
    assert len(clusters(specs, fewest)) == 4
    with pytest.raises(UserError, match="not decreasing|asks for"):
        clusters(specs, fewest // 4)


def test_cpu_smoke_tree_fits_the_synthetic_cohort(cohort_index):
    """Three levels, small enough for a small synthetic cohort's ~1,000 tiles (here its 8-slide one)."""
    specs = levels("cpu_smoke")
    assert len(specs) == 3
    assert clusters(specs, 1_000) == [s.total_clusters for s in specs]
    assert len(clusters(specs, len(cohort_index))) == 3


def test_curation_defaults_point_to_the_shipped_trees():
    with pytest.raises(UserError, match="configs/curation/t1.yaml"):
        hierarchy.parse_levels(load_curation_config().kmeans.levels)


# --- evaluation ----------------------------------------------------------------------------------

def test_eval_default_is_evas_linear_probe():
    """The eval defaults (EvalConfig) are eva's protocol: AdamW lr 3e-4, batch 256, <= 12,500 steps, mean
    of 5 runs; the 8 benchmarks."""
    from dinov2_patho.eval.benchmarks import BENCHMARKS
    from dinov2_patho.eval.heads.linear import LinearProbeConfig
    from dinov2_patho.eval.runner import eval_config

    cfg = eval_config()
    linear = LinearProbeConfig(**{k: v for k, v in OmegaConf.to_container(cfg.heads.linear).items()
                                  if k != "enabled"})
    assert (linear.lr, linear.batch_size, linear.max_steps, linear.n_runs) == (3e-4, 256, 12_500, 5)
    assert len(cfg.benchmarks) == 8 and all(name in BENCHMARKS for name in cfg.benchmarks)


def test_eval_slide_is_evas_abmil():
    """The slide eval defaults (SlideEvalConfig) are eva's ABMIL: projection 128, gated attention 128, MLP
    128-64, AdamW 1e-3, 32 bags, <= 100 epochs, patience 20."""
    from dinov2_patho.eval.heads.abmil import GatedAttentionMIL
    from dinov2_patho.eval.slide.runner import abmil_config, slide_config

    head_cfg = abmil_config(slide_config())
    net = GatedAttentionMIL(384, 2, head_cfg)
    widths = [m.out_features for m in net.modules() if isinstance(m, torch.nn.Linear)]
    assert widths[0] == 128 and widths[-3:-1] == [128, 64]
    assert (head_cfg.lr, head_cfg.batch_size, head_cfg.max_epochs, head_cfg.patience) == (1e-3, 32, 100, 20)


CLAIMED = {
    **{f"train/{name}.yaml": test_paper_recipes_vitl14_t1 for name in PAPER_ARMS},
    **{f"train/{name}.yaml": test_gpu_scale_comparison_vits14_small for name in SMALL_ARMS},
    "train/cpu_smoke.yaml": test_cpu_smoke_is_a_tiny_vit_stratified_over_the_cohorts_tissue_types,
    "curation/t1.yaml": test_paper_trees, "curation/t2.yaml": test_paper_trees,
    "curation/cpu_smoke.yaml": test_cpu_smoke_tree_fits_the_synthetic_cohort,
}
