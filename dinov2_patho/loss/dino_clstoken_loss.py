"""DINO loss on the CLS token: cross-entropy between teacher targets and student softmax."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dinov2_patho.loss.centering import sinkhorn_knopp, softmax_centered, update_ema_center


def cross_entropy(teacher_probs: torch.Tensor, student_logits: torch.Tensor,
                  student_temp: float) -> torch.Tensor:
    """Per-row H(t, softmax(s / temp)) = -sum_k t_k log softmax(s / temp)_k."""
    log_p = F.log_softmax(student_logits.float() / student_temp, dim=-1)
    return -(teacher_probs * log_p).sum(dim=-1)


class DINOLoss(nn.Module):
    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    @torch.no_grad()
    def softmax_center_teacher(self, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        return softmax_centered(teacher_logits, self.center, teacher_temp)

    @torch.no_grad()
    def update_center(self, teacher_logits: torch.Tensor) -> None:
        update_ema_center(self.center, teacher_logits, self.center_momentum)

    @torch.no_grad()
    def sinkhorn_knopp_teacher(self, teacher_logits: torch.Tensor, teacher_temp: float,
                               n_iterations: int = 3) -> torch.Tensor:
        return sinkhorn_knopp(teacher_logits, teacher_temp, n_iterations)

    def forward(self, student_logits: Sequence[torch.Tensor],
                teacher_probs: Sequence[torch.Tensor]) -> torch.Tensor:
        """Sum over every (student crop, teacher crop) pair of the batch-mean cross-entropy.
        Each element is [B, K]; the caller excludes same-view pairs by what it passes."""
        total = student_logits[0].new_zeros((), dtype=torch.float32)
        for s in student_logits:
            log_p = F.log_softmax(s.float() / self.student_temp, dim=-1)  # once per student crop
            for t in teacher_probs:
                total = total - (t * log_p).sum(dim=-1).mean()
        return total
