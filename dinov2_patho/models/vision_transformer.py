"""DINOv2-style Vision Transformer: CLS token, optional registers, iBOT mask token, any crop size.

Parameter names equal those of DINOv2's hub checkpoints (block_chunks=0), so a hub state dict
loads with no renaming and ours exports to it unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinov2_patho.layers import Block, PatchEmbed, canonical_ffn
from dinov2_patho.layers.block import LayerNorm


def resample_patch_pos_embed(
    pos: Tensor, new_grid: tuple[int, int], *, offset: float = 0.1, antialias: bool = False
) -> Tensor:
    """Bicubic resize of patch position embeddings [1, M*M, D] (square grid) to [1, h*w, D].

    `offset` > 0 reproduces DINOv2 exactly (a scale factor (h + offset) / M rather than an output
    size); `offset=0, antialias=True` reproduces timm's `resample_abs_pos_embed`.
    """
    _, n, dim = pos.shape
    side = round(n**0.5)
    if side * side != n:
        raise ValueError(f"position embedding has {n} patch entries, not a square grid")
    h, w = new_grid
    if (h, w) == (side, side):
        return pos
    grid = pos.float().reshape(1, side, side, dim).permute(0, 3, 1, 2)
    if offset:
        size_kw: dict[str, Any] = {"scale_factor": ((h + offset) / side, (w + offset) / side)}
    else:
        size_kw = {"size": (h, w)}
    grid = F.interpolate(grid, mode="bicubic", antialias=antialias, **size_kw)
    if grid.shape[-2:] != (h, w):
        raise ValueError(f"resampled grid {tuple(grid.shape[-2:])} != requested {(h, w)}")
    return grid.permute(0, 2, 3, 1).reshape(1, h * w, dim).to(pos.dtype)


class VisionTransformer(nn.Module):
    def __init__(
        self,
        *,
        img_size: int = 224,
        patch_size: int = 14,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        ffn: str = "mlp",
        qkv_bias: bool = True,
        proj_bias: bool = True,
        ffn_bias: bool = True,
        layerscale_init: float | None = 1e-5,
        drop_path_rate: float = 0.0,
        drop_path_uniform: bool = False,
        num_register_tokens: int = 0,
        interpolate_offset: float = 0.1,
        interpolate_antialias: bool = False,
    ) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        if num_register_tokens < 0:
            raise ValueError(f"num_register_tokens must be >= 0, got {num_register_tokens}")
        self.embed_dim = self.num_features = embed_dim
        self.patch_size = patch_size
        self.img_size = img_size
        self.num_heads = num_heads
        self.n_blocks = depth
        self.ffn = canonical_ffn(ffn)
        self.layerscale_init = layerscale_init
        self.num_register_tokens = num_register_tokens
        self.interpolate_offset = interpolate_offset
        self.interpolate_antialias = interpolate_antialias

        grid = img_size // patch_size
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, embed_dim))
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim)) if num_register_tokens else None
        )
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        if drop_path_uniform:
            rates = [drop_path_rate] * depth
        else:
            rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            Block(
                embed_dim, num_heads, mlp_ratio=mlp_ratio, ffn=self.ffn, qkv_bias=qkv_bias,
                proj_bias=proj_bias, ffn_bias=ffn_bias, layerscale_init=layerscale_init,
                drop_path_rate=rate,
            )
            for rate in rates
        )
        self.norm = LayerNorm(embed_dim)
        self.init_weights()

    def init_weights(self) -> None:
        """DINOv2's init: truncated-normal Linear weights, near-zero CLS/registers, zero mask token."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        nn.init.zeros_(self.mask_token)
        for module in self.blocks.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    @property
    def grid_size(self) -> int:
        """Side of the patch grid the stored position embeddings cover."""
        return self.img_size // self.patch_size

    def pos_embed_for(self, grid: tuple[int, int]) -> Tensor:
        """Position embeddings [1, 1 + h*w, D] for a patch grid of any size."""
        patch_pos = resample_patch_pos_embed(
            self.pos_embed[:, 1:], grid, offset=self.interpolate_offset, antialias=self.interpolate_antialias
        )
        return torch.cat((self.pos_embed[:, :1], patch_pos), dim=1)

    def prepare_tokens(self, x: Tensor, masks: Tensor | None = None) -> Tensor:
        """Patch tokens (masked ones replaced by the mask token), CLS, positions, then registers."""
        b, _, h, w = x.shape
        tokens = self.patch_embed(x)
        if masks is not None:
            tokens = torch.where(masks.unsqueeze(-1), self.mask_token.to(tokens.dtype), tokens)
        tokens = torch.cat((self.cls_token.expand(b, -1, -1), tokens), dim=1)
        tokens = tokens + self.pos_embed_for((h // self.patch_size, w // self.patch_size)).to(tokens.dtype)
        if self.register_tokens is not None:
            # Registers carry no position embedding and sit right after the CLS token (DINOv2 order).
            regs = self.register_tokens.expand(b, -1, -1).to(tokens.dtype)
            tokens = torch.cat((tokens[:, :1], regs, tokens[:, 1:]), dim=1)
        return tokens

    def _output(self, x: Tensor, masks: Tensor | None) -> dict[str, Tensor | None]:
        x_norm = self.norm(x)
        r = self.num_register_tokens
        return {
            "x_norm_clstoken": x_norm[:, 0],
            "x_norm_regtokens": x_norm[:, 1 : r + 1],
            "x_norm_patchtokens": x_norm[:, r + 1 :],
            "x_prenorm": x,
            "masks": masks,
        }

    def forward_features(
        self, x: Tensor | Sequence[Tensor], masks: Tensor | Sequence[Tensor | None] | None = None
    ) -> dict[str, Tensor | None] | list[dict[str, Tensor | None]]:
        """Token outputs for one batch, or a list of batches of different crop sizes (then a list)."""
        if isinstance(x, Sequence):
            masks_list = [None] * len(x) if masks is None else list(masks)
            if len(masks_list) != len(x):
                raise ValueError(f"{len(x)} crop batches but {len(masks_list)} masks")
            return [self.forward_features(xi, mi) for xi, mi in zip(x, masks_list)]
        tokens = self.prepare_tokens(x, masks)
        for block in self.blocks:
            tokens = block(tokens)
        return self._output(tokens, masks)

    def get_intermediate_layers(
        self, x: Tensor, n: int | Sequence[int] = 1, *, norm: bool = True, reshape: bool = False,
    ) -> list[tuple[Tensor, Tensor]]:
        """(patch tokens, CLS token) of the last `n` blocks, or of the block indices in `n`."""
        take = set(range(len(self.blocks) - n, len(self.blocks)) if isinstance(n, int) else n)
        b, _, h, w = x.shape
        tokens = self.prepare_tokens(x)
        outputs = []
        for i, block in enumerate(self.blocks):
            tokens = block(tokens)
            if i in take:
                out = self.norm(tokens) if norm else tokens
                patches = out[:, 1 + self.num_register_tokens :]
                if reshape:
                    gh, gw = h // self.patch_size, w // self.patch_size
                    patches = patches.reshape(b, gh, gw, -1).permute(0, 3, 1, 2).contiguous()
                outputs.append((patches, out[:, 0]))
        if len(outputs) != len(take):
            raise ValueError(f"block indices {sorted(take)} out of range for {len(self.blocks)} blocks")
        return outputs

    def forward(self, x: Tensor, masks: Tensor | None = None, is_training: bool = False) -> Tensor | Any:
        """The CLS embedding [B, D] after the final norm; with `is_training`, all of
        `forward_features` (as in DINOv2: training goes through `__call__`, so DDP sees it)."""
        features = self.forward_features(x, masks)
        return features if is_training else features["x_norm_clstoken"]
