"""iBOT loss: DINO cross-entropy on the patch tokens the student saw masked."""

from __future__ import annotations

import torch
from torch import nn

from dinov2_patho.loss.centering import sinkhorn_knopp, softmax_centered, update_ema_center
from dinov2_patho.loss.dino_clstoken_loss import cross_entropy


class iBOTPatchLoss(nn.Module):
    def __init__(self, patch_out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, patch_out_dim))

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

    def forward(self, student_logits: torch.Tensor, teacher_probs: torch.Tensor, masks_weight: torch.Tensor,
                n_images: int) -> torch.Tensor:
        """student_logits, teacher_probs: [M, K] for the M masked patches of the batch;
        masks_weight [M]: 1 / (masked patches of that patch's image). The result is the mean over
        the `n_images` images of each image's mean cross-entropy over its masked patches
        (an image without a mask counts as 0, as in DINOv2)."""
        loss = cross_entropy(teacher_probs, student_logits, self.student_temp)
        return (loss * masks_weight).sum() / max(n_images, 1)
