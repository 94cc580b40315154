"""iBOT loss: DINO cross-entropy on the patch tokens the student saw masked."""

from __future__ import annotations

import torch

from dinov2_patho.loss.centering import TeacherTargets
from dinov2_patho.loss.dino_clstoken_loss import cross_entropy


class iBOTPatchLoss(TeacherTargets):
    def forward(self, student_logits: torch.Tensor, teacher_probs: torch.Tensor, masks_weight: torch.Tensor,
                n_images: int) -> torch.Tensor:
        """student_logits, teacher_probs: [M, K] for the M masked patches of the batch;
        masks_weight [M]: 1 / (masked patches of that patch's image). The result is the mean over
        the `n_images` images of each image's mean cross-entropy over its masked patches
        (an image without a mask counts as 0, as in DINOv2)."""
        loss = cross_entropy(teacher_probs, student_logits, self.student_temp)
        return (loss * masks_weight).sum() / max(n_images, 1)
