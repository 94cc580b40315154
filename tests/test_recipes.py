"""The shipped training recipes (configs/train/*.yaml) build the models they describe.

Each config is merged over the packaged defaults and its model built through the trainer's own
builder (SSLMetaArch) on the meta device: shapes only, no memory, about a second for ViT-L. What their
names and comments say (samplers, subsets, batches, schedules) is checked in test_recipe_claims.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from dinov2_patho.errors import UserError
from dinov2_patho.train.config import load_train_config, validate_config
from dinov2_patho.train.ssl_meta_arch import SSLMetaArch

CONFIGS = sorted((Path(__file__).parents[1] / "configs" / "train").glob("*.yaml"))
# Published widths, depths and parameter counts of DINOv2's released backbones (dinov2_vits14: 22.06M,
# dinov2_vitl14: 304.37M, as timm lists them), whose position embedding covers 518 px (37 x 37 patches + cls).
PUBLISHED = {"vit_small": (384, 12, 22_056_576), "vit_large": (1024, 24, 304_368_640)}
HUB_TOKENS = 1 + 37 ** 2
# The paper's recipe (Chen et al. 2025, as DINOv2's ViT-L): every shipped GPU recipe keeps its heads.
PAPER_HEAD = {"head_n_prototypes": 65536, "head_bottleneck_dim": 256}


def vit_parameters(cfg: DictConfig, width: int, depth: int) -> int:
    """Parameters of a pre-norm ViT with an MLP (ratio 4) FFN, counted from its definition."""
    s = cfg.student
    tokens = 1 + (cfg.crops.global_crops_size // s.patch_size) ** 2
    layerscale = 2 * width if s.layerscale is not None else 0
    block = (3 * width * width + 3 * width) + (width * width + width)  # qkv, projection
    block += (width * 4 * width + 4 * width) + (4 * width * width + width)  # MLP
    block += 2 * 2 * width + layerscale  # two LayerNorms
    patch_embed = 3 * s.patch_size ** 2 * width + width
    extra_tokens = (1 + s.num_register_tokens) * width + width  # cls (+ registers), mask token
    return depth * block + patch_embed + tokens * width + extra_tokens + 2 * width  # final norm


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_the_recipes_are_all_here():
    names = {p.stem for p in CONFIGS}
    assert {"vitl14_t1_bs", "vitl14_t1_random", "vitl14_metadata", "cpu_smoke"} <= names
    assert {f"vits14_small_{arm}" for arm in ("uniform", "subset", "stratified")} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_train_config_builds_its_model_on_meta(path: Path, tmp_path: Path):
    required = {"vits14_small_subset": [f"data.subset={tmp_path}"]}  # its ???: the user's subset
    cfg = load_train_config(path, [f"data.index={tmp_path}", *required.get(path.stem, [])])
    if cfg.sampler.name == "metadata":  # the recipe leaves the user's metadata to the command line
        with pytest.raises(UserError, match=r"^sampler 'metadata' needs sampler.metadata_csv$"):
            validate_config(cfg)
        cfg = load_train_config(path, [f"data.index={tmp_path}", "sampler.metadata_csv=m.csv",
                                       "sampler.target_size=1000"])
    validate_config(cfg)
    assert cfg.student.pretrained_weights is None  # a recipe never needs a file to build
    with torch.device("meta"):
        model = SSLMetaArch(cfg)
    assert all(p.is_meta for p in model.parameters())
    backbone = model.student["backbone"]
    if cfg.student.arch is None and cfg.student.embed_dim is not None:  # a smoke model of given sizes
        width, depth = cfg.student.embed_dim, cfg.student.depth
    else:
        width, depth, published = PUBLISHED[cfg.student.arch or "vit_large"]
        tokens = 1 + (cfg.crops.global_crops_size // cfg.student.patch_size) ** 2
        assert count(backbone) + (HUB_TOKENS - tokens) * width == published
        for section in (cfg.dino, cfg.ibot):
            assert {k: section[k] for k in PAPER_HEAD} == PAPER_HEAD
    assert count(backbone) == vit_parameters(cfg, width, depth)
    for name, section in (("dino_head", cfg.dino), ("ibot_head", cfg.ibot)):
        if name not in model.student:
            assert name == "ibot_head" and not cfg.ibot.separate_head
            continue
        head = model.student[name]
        assert head.last_layer.weight_v.shape == (section.head_n_prototypes, section.head_bottleneck_dim)
        assert [m.out_features for m in head.mlp if isinstance(m, torch.nn.Linear)][-1] \
            == section.head_bottleneck_dim
    assert count(model.teacher) == count(model.student)
    assert not any(p.requires_grad for p in model.teacher.parameters())
