"""FLOP counts for MFU: what the counter reports for a ViT is the textbook count."""

from __future__ import annotations

import pytest
import torch

from dinov2_patho.models import VisionTransformer
from dinov2_patho.train.flops import counted, peak_flops, utilisation


@pytest.mark.parametrize("depth, dim, heads, size", [(2, 48, 2, 64), (1, 32, 4, 48)])
def test_vit_forward_flops_are_the_textbook_count(depth, dim, heads, size):
    patch, batch = 16, 3
    vit = VisionTransformer(embed_dim=dim, depth=depth, num_heads=heads, patch_size=patch, img_size=size)
    vit.eval()
    with torch.no_grad():
        _, flops = counted(vit, torch.zeros(batch, 3, size, size))
    patches = (size // patch) ** 2
    tokens = patches + 1
    embed = 2 * batch * patches * dim * 3 * patch**2
    # per block: qkv (3 D^2), projection (D^2), MLP (2 x 4 D^2) matmuls, and attention QK^T + AV
    block = 2 * batch * tokens * 12 * dim**2 + 4 * batch * tokens**2 * dim
    assert flops == embed + depth * block


def test_utilisation_needs_a_known_peak():
    assert utilisation(2e12, 0.5, None) == {"tflops": 4.0}
    assert utilisation(2e12, 0.5, 8e12) == {"tflops": 4.0, "mfu": 0.5}
    assert peak_flops(torch.device("cpu"), torch.bfloat16) is None
