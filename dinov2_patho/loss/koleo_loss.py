"""KoLeo regulariser (Sablayrolles et al. 2018): spread the batch's CLS embeddings apart."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class KoLeoLoss(nn.Module):
    def __init__(self, eps: float = 1e-8):
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """-mean_i log(distance of x_i to its nearest neighbour), on L2-normalised rows of x [B, D].
        With fewer than 2 rows there is no neighbour: the loss is 0 (and stays in the graph), where
        DINOv2 takes the distance of a row to itself and produces -log(eps) or NaN gradients."""
        if x.shape[0] < 2:
            return x.sum() * 0.0
        device_type = x.device.type
        with torch.autocast(device_type=device_type, enabled=False):
            x = F.normalize(x.float(), p=2, dim=-1, eps=self.eps)
            with torch.no_grad():
                dots = x @ x.t()
                dots.fill_diagonal_(-2.0)  # below any cosine: a row is never its own neighbour
                nearest = dots.argmax(dim=1)
            distances = F.pairwise_distance(x, x[nearest], p=2, eps=self.eps)
            return -torch.log(distances + self.eps).mean()
