"""The student backbone a training config describes, for the trainer and for export.

`student.arch` names a registered ViT (null: vit_large); setting `student.embed_dim`, `depth`
and `num_heads` instead, with `arch` null, builds a ViT of those sizes (the tiny models of smoke
runs and tests; `check_values` refuses both at once).
"""

from __future__ import annotations

from omegaconf import DictConfig

from dinov2_patho.config_files import ConfigError
from dinov2_patho.models import VisionTransformer, build_backbone

SIZE_KEYS = ("embed_dim", "depth", "num_heads")
DEFAULT_ARCH = "vit_large"


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
