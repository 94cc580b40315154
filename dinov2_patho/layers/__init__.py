"""ViT building blocks, named as in DINOv2 so its checkpoints map key for key."""

from dinov2_patho.layers.attention import Attention
from dinov2_patho.layers.block import Block, canonical_ffn
from dinov2_patho.layers.drop_path import add_residual_on_subset, drop_path
from dinov2_patho.layers.layerscale import LayerScale
from dinov2_patho.layers.mlp import Mlp
from dinov2_patho.layers.patch_embed import PatchEmbed
from dinov2_patho.layers.swiglu import SwiGLUFFN, swiglu_hidden_dim

__all__ = [
    "Attention",
    "Block",
    "LayerScale",
    "Mlp",
    "PatchEmbed",
    "SwiGLUFFN",
    "add_residual_on_subset",
    "canonical_ffn",
    "drop_path",
    "swiglu_hidden_dim",
]
