"""Pre-norm transformer block: x + ls1(attn(norm1(x))), then x + ls2(ffn(norm2(x)))."""

from __future__ import annotations

from functools import partial

from torch import Tensor, nn

from dinov2_patho.layers.attention import Attention
from dinov2_patho.layers.drop_path import add_residual_on_subset, drop_path
from dinov2_patho.layers.layerscale import LayerScale
from dinov2_patho.layers.mlp import Mlp
from dinov2_patho.layers.swiglu import SwiGLUFFN, swiglu_hidden_dim

FFN_KINDS = ("mlp", "swiglu")
# Above this rate, computing the branches on a batch subset beats masking (DINOv2's threshold).
SUBSET_DROP_MIN_RATE = 0.1

LayerNorm = partial(nn.LayerNorm, eps=1e-6)


def canonical_ffn(ffn: str) -> str:
    """`swiglufused` is DINOv2's config name for the same packed SwiGLU."""
    name = "swiglu" if ffn == "swiglufused" else ffn
    if name not in FFN_KINDS:
        raise ValueError(f"unknown ffn {ffn!r}; valid: mlp, swiglu")
    return name


class Block(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        ffn: str = "mlp",
        qkv_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        layerscale_init: float | None = None,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias)
        self.ls1 = LayerScale(dim, layerscale_init) if layerscale_init else nn.Identity()
        self.norm2 = LayerNorm(dim)
        if canonical_ffn(ffn) == "swiglu":
            self.mlp = SwiGLUFFN(dim, swiglu_hidden_dim(dim, mlp_ratio), bias=ffn_bias)
        else:
            self.mlp = Mlp(dim, int(dim * mlp_ratio), bias=ffn_bias)
        self.ls2 = LayerScale(dim, layerscale_init) if layerscale_init else nn.Identity()
        self.drop_path_rate = drop_path_rate

    def _attn_branch(self, x: Tensor) -> Tensor:
        return self.ls1(self.attn(self.norm1(x)))

    def _ffn_branch(self, x: Tensor) -> Tensor:
        return self.ls2(self.mlp(self.norm2(x)))

    def forward(self, x: Tensor) -> Tensor:
        rate = self.drop_path_rate if self.training else 0.0
        if rate > SUBSET_DROP_MIN_RATE:
            x = add_residual_on_subset(x, self._attn_branch, rate)
            return add_residual_on_subset(x, self._ffn_branch, rate)
        x = x + drop_path(self._attn_branch(x), rate, self.training)
        return x + drop_path(self._ffn_branch(x), rate, self.training)
