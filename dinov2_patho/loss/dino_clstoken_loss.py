"""DINO loss on the CLS token: cross-entropy between teacher targets and student softmax."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from dinov2_patho.loss.centering import TeacherTargets


def cross_entropy(teacher_probs: torch.Tensor, student_logits: torch.Tensor,
                  student_temp: float) -> torch.Tensor:
    """Per-row H(t, softmax(s / temp)) = -sum_k t_k log softmax(s / temp)_k."""
    log_p = F.log_softmax(student_logits.float() / student_temp, dim=-1)
    return -(teacher_probs * log_p).sum(dim=-1)


class DINOLoss(TeacherTargets):
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
