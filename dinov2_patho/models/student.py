"""The student backbone a training config describes (its `student` section, `StudentConfig`), for the
trainer and for export.

`student.arch` names a registered ViT (null: vit_large); setting `student.embed_dim`, `depth`
and `num_heads` instead, with `arch` null, builds a ViT of those sizes (the tiny models of smoke
runs and tests; `StudentConfig` refuses both at once).
"""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig

from dinov2_patho.config_files import POSITIVE, UNIT_OPEN, ConfigError, check_section
from dinov2_patho.models import BACKBONES, VisionTransformer, build_backbone

SIZE_KEYS = ("embed_dim", "depth", "num_heads")
DEFAULT_ARCH = "vit_large"


@dataclass
class StudentConfig:
    """The `student` section of the training config: the ViT the student (and the teacher) is."""

    arch: str | None = None           # a registered ViT (vit_small, vit_base, vit_large, vit_giant2);
                                      # null: vit_large
    embed_dim: int | None = None      # embed_dim, depth, num_heads: all three, with arch null, to build a
    depth: int | None = None          # ViT of these sizes (tiny models for smoke runs)
    num_heads: int | None = None
    patch_size: int = 14
    num_register_tokens: int = 0
    ffn_layer: str = "mlp"            # mlp | swiglu
    layerscale: float | None = 1.0e-05  # null: no LayerScale
    drop_path_rate: float = 0.3
    drop_path_uniform: bool = True
    pretrained_weights: str | None = None  # initialise the student (and teacher) from these weights

    def __post_init__(self) -> None:
        check_section("student", self, numbers={"drop_path_rate": UNIT_OPEN, "layerscale": POSITIVE},
                      integers={"patch_size": 1, "num_register_tokens": 0}, optional=("layerscale",))
        if self.arch is not None and self.arch not in BACKBONES:
            valid = ", ".join(BACKBONES.names())
            raise ConfigError(f"student.arch={self.arch!r} is unknown (valid: {valid}; or null with "
                              f"student.embed_dim, depth and num_heads)")
        sizes = [k for k in SIZE_KEYS if getattr(self, k) is not None]
        if sizes and self.arch is not None:
            raise ConfigError(f"student.arch={self.arch} and student.{sizes[0]} are both set: explicit sizes "
                              f"build their own ViT, so set student.arch=null for them, or drop the sizes")
        dim, heads = self.embed_dim, self.num_heads
        if dim is not None and heads and dim % heads:  # attention splits embed_dim over the heads
            raise ConfigError(f"student.embed_dim={dim} is not divisible by student.num_heads={heads}")


def has_custom_size(cfg: DictConfig) -> bool:
    given = [k for k in SIZE_KEYS if cfg.student[k] is not None]
    if given and len(given) != len(SIZE_KEYS):
        missing = ", ".join(f"student.{k}" for k in SIZE_KEYS if k not in given)
        raise ConfigError(f"student.{given[0]} is set but {missing} is not: give all three sizes or none")
    return bool(given)


def build_student_backbone(cfg: DictConfig) -> VisionTransformer:
    s = cfg.student
    common = {"patch_size": s.patch_size, "img_size": cfg.crops.global_crops_size,
              "num_register_tokens": s.num_register_tokens, "ffn": s.ffn_layer,
              "layerscale_init": s.layerscale, "drop_path_rate": s.drop_path_rate,
              "drop_path_uniform": s.drop_path_uniform}
    if has_custom_size(cfg):
        return VisionTransformer(embed_dim=s.embed_dim, depth=s.depth, num_heads=s.num_heads, **common)
    return build_backbone(s.arch or DEFAULT_ARCH, **common)
