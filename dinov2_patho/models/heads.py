"""DINO / iBOT projection heads: MLP, bottleneck, L2 normalisation, weight-normalised prototypes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class WeightNormLinear(nn.Module):
    """Bias-free Linear with weight = g * v / ||v|| per output row.

    Written out rather than `torch.nn.utils.weight_norm` (deprecated) or its parametrization (which
    renames the parameters): `weight_g` [out, 1] and `weight_v` [out, in] match DINOv2 checkpoints.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        linear = nn.Linear(in_features, out_features, bias=False)
        self.weight_v = nn.Parameter(linear.weight.detach().clone())
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))

    @property
    def weight(self) -> Tensor:
        return self.weight_v * (self.weight_g / self.weight_v.norm(dim=1, keepdim=True))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)


class DINOHead(nn.Module):
    """`nlayers` Linear layers (GELU between) down to `bottleneck_dim`, L2-normalised, then prototypes."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        nlayers: int = 3,
        mlp_bias: bool = True,
    ) -> None:
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"nlayers must be >= 1, got {nlayers}")
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            if i:
                layers.append(nn.GELU())
            layers.append(nn.Linear(d_in, d_out, bias=mlp_bias))
        # A single Linear is stored bare, as in DINOv2 (`mlp.weight`, not `mlp.0.weight`).
        self.mlp = layers[0] if nlayers == 1 else nn.Sequential(*layers)
        for module in self.mlp.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.mlp(x)
        # fp16 underflows 1e-12; the eps only guards an all-zero vector.
        eps = 1e-6 if x.dtype == torch.float16 else 1e-12
        return self.last_layer(F.normalize(x, dim=-1, eps=eps))


def build_ssl_heads(
    in_dim: int,
    dino: dict,
    ibot: dict | None = None,
    *,
    separate_ibot_head: bool = False,
) -> tuple[DINOHead, DINOHead]:
    """(dino_head, ibot_head): the same module when shared, as DINOv2's `ibot.separate_head: false`.

    `dino`/`ibot` hold DINOHead keyword arguments (`out_dim`, `hidden_dim`, `bottleneck_dim`,
    `nlayers`); `ibot` is used only for a separate head.
    """
    dino_head = DINOHead(in_dim, **dino)
    if not separate_ibot_head:
        return dino_head, dino_head
    if ibot is None:
        raise ValueError("a separate iBOT head needs its own settings (ibot=...)")
    return dino_head, DINOHead(in_dim, **ibot)
