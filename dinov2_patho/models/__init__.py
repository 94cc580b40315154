"""Backbones by name (`build_backbone("vit_large", patch_size=14)`), heads, and weight loading."""

from __future__ import annotations

from typing import Any

from dinov2_patho.models.heads import DINOHead, build_ssl_heads
from dinov2_patho.models.vision_transformer import VisionTransformer
from dinov2_patho.models.weights import (
    LoadReport,
    load_pretrained,
    to_dinov2_state_dict,
    to_timm_state_dict,
)
from dinov2_patho.registry import Registry

BACKBONES = Registry("backbone")

# (embed_dim, depth, num_heads, default ffn): DINOv2's sizes; ViT-g ("giant2") has 64-dim heads.
_ARCHS: dict[str, tuple[int, int, int, str]] = {
    "vit_small": (384, 12, 6, "mlp"),
    "vit_base": (768, 12, 12, "mlp"),
    "vit_large": (1024, 24, 16, "mlp"),
    "vit_giant2": (1536, 40, 24, "swiglu"),
}
_ALIASES = {"vit_giant": "vit_giant2"}


def _register(name: str, arch: str) -> None:
    embed_dim, depth, num_heads, default_ffn = _ARCHS[arch]

    @BACKBONES.register(name)
    def build(*, patch_size: int = 14, ffn: str | None = None, **kwargs: Any) -> VisionTransformer:
        return VisionTransformer(embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                                 patch_size=patch_size, ffn=ffn or default_ffn, **kwargs)


for _arch in _ARCHS:
    _register(_arch, _arch)
for _alias, _arch in _ALIASES.items():
    _register(_alias, _arch)


def build_backbone(name: str, **kwargs: Any) -> VisionTransformer:
    """A ViT by registry name; keyword arguments are those of `VisionTransformer` (sizes are fixed).

    Common ones: patch_size (14), img_size (224), num_register_tokens (0), ffn ("mlp"; "swiglu" for
    ViT-g), layerscale_init (1e-5, None for none), drop_path_rate (0.0), drop_path_uniform (False).
    """
    return BACKBONES.build(name, **kwargs)


__all__ = [
    "BACKBONES",
    "DINOHead",
    "LoadReport",
    "VisionTransformer",
    "build_backbone",
    "build_ssl_heads",
    "load_pretrained",
    "to_dinov2_state_dict",
    "to_timm_state_dict",
]
