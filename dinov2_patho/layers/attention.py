"""Multi-head self-attention through `scaled_dot_product_attention`.

SDPA picks the flash or memory-efficient kernel on GPU and a fused kernel on CPU, so xformers
is never needed; where it is installed and the input is on CUDA it is used, as DINOv2 does.
`XFORMERS_DISABLED=1` turns it off (the reference code reads the same variable).
"""

from __future__ import annotations

import os

import torch.nn.functional as F
from torch import Tensor, nn


def _import_xformers():
    if os.environ.get("XFORMERS_DISABLED"):
        return None
    try:
        from xformers import ops
    except ImportError:
        return None
    return ops


_XFORMERS = _import_xformers()


class Attention(nn.Module):
    """Fused qkv projection (one matmul), SDPA, output projection; names as DINOv2 (`qkv`, `proj`)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, proj_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def forward(self, x: Tensor) -> Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, C // self.num_heads)
        if _XFORMERS is not None and x.is_cuda:
            # xformers wants [B, N, heads, head_dim]: no transposes at all.
            q, k, v = qkv.unbind(2)
            out = _XFORMERS.memory_efficient_attention(q, k, v)
        else:
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
        return self.proj(out.reshape(B, N, C))


