"""Teacher targets: softmax around an EMA center, or Sinkhorn-Knopp (SwAV / DINOv2).

Both are correct across ranks: every sum they take is all-reduced when torch.distributed
is up, so W ranks with B rows each give the targets of one process with W*B rows. Every
rank must call these functions in the same order, even with zero local rows (a rank
without masked patches still takes part in the iBOT collectives).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from dinov2_patho.distributed import is_initialized


def _all_reduce(t: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> torch.Tensor:
    if is_initialized():
        dist.all_reduce(t, op=op)
    return t


@torch.no_grad()
def sinkhorn_knopp(logits: torch.Tensor, temp: float, n_iterations: int = 3) -> torch.Tensor:
    """Targets [B, K] from teacher logits [B, K]: each row sums to 1 and, over all ranks, each
    prototype gets 1/K of the mass (equipartition), which prevents collapse without a center."""
    logits = logits.float()
    # A global constant shift cancels out in the normalisations; it keeps exp() from overflowing.
    local_max = logits.max() if logits.numel() else logits.new_tensor(float("-inf"))
    shift = _all_reduce(local_max.clone(), dist.ReduceOp.MAX)
    q = torch.exp((logits - shift) / temp).t()  # [K, B]
    n_prototypes = q.shape[0]
    n_samples = _all_reduce(torch.tensor(float(q.shape[1]), device=q.device))
    q /= _all_reduce(q.sum())
    for _ in range(n_iterations):
        q /= _all_reduce(q.sum(dim=1, keepdim=True))  # rows: each prototype gets 1/K
        q /= n_prototypes
        q /= q.sum(dim=0, keepdim=True)  # columns: each sample gets 1/B (local: columns are per sample)
        q /= n_samples
    q *= n_samples  # columns sum to 1: one distribution per sample
    return q.t()


@torch.no_grad()
def softmax_centered(logits: torch.Tensor, center: torch.Tensor, temp: float) -> torch.Tensor:
    return F.softmax((logits.float() - center) / temp, dim=-1)


@torch.no_grad()
def update_ema_center(center: torch.Tensor, logits: torch.Tensor, momentum: float) -> None:
    """center <- momentum * center + (1 - momentum) * mean of `logits` rows over all ranks
    (in place; left as is when no rank has a row)."""
    rows = logits.reshape(-1, logits.shape[-1]).float()
    stats = torch.cat([rows.sum(dim=0), rows.new_tensor([rows.shape[0]])])
    _all_reduce(stats)
    count = stats[-1]
    if count > 0:
        batch_center = (stats[:-1] / count).reshape(center.shape)
        center.mul_(momentum).add_(batch_center, alpha=1 - momentum)


class TeacherTargets(nn.Module):
    """Teacher logits -> target distributions, by EMA centering or Sinkhorn-Knopp; the
    shared half of the DINO and iBOT losses (each keeps its own center)."""

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
