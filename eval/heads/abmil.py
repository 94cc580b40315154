"""Gated attention-MIL (Ilse et al. 2018) on bags of frozen tile features, as eva's ABMIL.

Network (eva's defaults): a linear projection of each tile feature to 128, gated attention
(tanh and sigmoid branches of hidden size 128, multiplied, then one attention logit per
tile), a softmax over the tiles of a bag (padding masked out), the attention-weighted mean
of the projected tiles, and an MLP classifier (128, 64, ReLU). Training: AdamW (lr 1e-3),
cosine annealing over the epochs, batches of 32 bags padded to their longest bag with a
mask, at most 100 epochs, early stopping on validation balanced accuracy (patience 20,
first best epoch kept), `n_runs` seeds reported as mean ± std. Binary tasks use one logit
with BCE, as the linear probe does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..metrics import classification_metrics
from .linear import (
    _balanced_accuracy,
    _num_outputs,
    _predicted_class,
    _single_thread,
    predict_proba,
    summarize_runs,
)


@dataclass(frozen=True)
class AbmilConfig:
    projection: int = 128
    attention_hidden: int = 128
    mlp: tuple[int, ...] = (128, 64)
    lr: float = 1e-3
    weight_decay: float = 0.01  # torch's AdamW default
    batch_size: int = 32
    max_epochs: int = 100
    patience: int = 20
    n_runs: int = 5
    seed: int = 0
    standardize: bool = False  # not eva's: z-score tile features by the training tiles' mean and std
    device: str = "cpu"


class GatedAttentionMIL(nn.Module):
    def __init__(self, dim: int, num_outputs: int, cfg: AbmilConfig = AbmilConfig()):
        super().__init__()
        self.project = nn.Linear(dim, cfg.projection)
        self.attention_tanh = nn.Sequential(nn.Linear(cfg.projection, cfg.attention_hidden), nn.Tanh())
        self.attention_gate = nn.Sequential(nn.Linear(cfg.projection, cfg.attention_hidden), nn.Sigmoid())
        self.attention_logit = nn.Linear(cfg.attention_hidden, 1)
        layers, width = [], cfg.projection
        for hidden in cfg.mlp:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        self.classifier = nn.Sequential(*layers, nn.Linear(width, num_outputs))

    def attention(self, bags: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention weights [B, N] (0 on padding) and projected tiles [B, N, P] of bags [B, N, D]
        whose `mask` [B, N] is True on real tiles."""
        h = self.project(bags)
        logits = self.attention_logit(self.attention_tanh(h) * self.attention_gate(h)).squeeze(-1)
        return torch.softmax(logits.masked_fill(~mask, -math.inf), dim=1), h

    def forward(self, bags: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        weights, h = self.attention(bags, mask)
        return self.classifier(torch.einsum("bn,bnp->bp", weights, h))


def pad_bags(bags: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Bags [n_i, D] as one zero-padded tensor [B, max n_i, D] and its mask [B, max n_i]."""
    if any(len(bag) == 0 for bag in bags):
        raise ValueError("an empty bag reached the MIL head")  # the task checks make this unreachable
    longest = max(len(bag) for bag in bags)
    x = torch.zeros(len(bags), longest, bags[0].shape[1])
    mask = torch.zeros(len(bags), longest, dtype=torch.bool)
    for i, bag in enumerate(bags):
        x[i, :len(bag)] = torch.from_numpy(np.array(bag, np.float32))
        mask[i, :len(bag)] = True
    return x, mask


def _logits(net: GatedAttentionMIL, bags: list[np.ndarray], cfg: AbmilConfig) -> torch.Tensor:
    net.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(bags), cfg.batch_size):
            x, mask = pad_bags(bags[start:start + cfg.batch_size])
            out.append(net(x.to(cfg.device), mask.to(cfg.device)).cpu())
    return torch.cat(out)


def train_abmil(train: tuple[list[np.ndarray], np.ndarray], val: tuple[list[np.ndarray], np.ndarray],
                num_classes: int, cfg: AbmilConfig, seed: int) -> tuple[GatedAttentionMIL, dict]:
    """One run: the best-on-validation network and what happened."""
    device = torch.device(cfg.device)
    torch.manual_seed(seed)  # the network's initialisation
    generator = torch.Generator().manual_seed(seed)
    bags, y = train
    net = GatedAttentionMIL(bags[0].shape[1], _num_outputs(num_classes), cfg).to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.max_epochs)
    binary = num_classes == 2
    loss_fn = nn.BCEWithLogitsLoss() if binary else nn.CrossEntropyLoss()
    targets = torch.as_tensor(y, dtype=torch.float32 if binary else torch.int64)
    y_val = torch.as_tensor(val[1], dtype=torch.int64)
    best_score, best_state, best_epoch, waited, epoch = -math.inf, None, -1, 0, 0
    for epoch in range(cfg.max_epochs):
        net.train()
        order = torch.randperm(len(bags), generator=generator)
        for start in range(0, len(bags), cfg.batch_size):
            idx = order[start:start + cfg.batch_size]
            x, mask = pad_bags([bags[int(i)] for i in idx])
            out = net(x.to(device), mask.to(device))
            target = targets[idx].to(device)
            loss = loss_fn(out, target.unsqueeze(1) if binary else target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        schedule.step()
        score = _balanced_accuracy(_predicted_class(_logits(net, val[0], cfg)), y_val, num_classes)
        if score > best_score:
            best_score, best_epoch, waited = score, epoch, 0
            best_state = {k: v.detach().clone() for k, v in net.state_dict().items()}
        else:
            waited += 1
            if waited >= cfg.patience:
                break
    net.load_state_dict(best_state)
    return net, {"epochs": epoch + 1, "best_epoch": best_epoch, "val_balanced_accuracy": best_score}


def bag_probabilities(net: GatedAttentionMIL, bags: list[np.ndarray], cfg: AbmilConfig) -> np.ndarray:
    return predict_proba(nn.Identity(), _logits(net, bags, cfg))


def attention_weights(net: GatedAttentionMIL, bag: np.ndarray, device: str = "cpu") -> np.ndarray:
    """The attention weight [n] of each tile of one bag."""
    net.eval()
    x, mask = pad_bags([bag])
    with torch.no_grad():
        return net.attention(x.to(device), mask.to(device))[0][0].cpu().numpy()


def standardizer(bags: list[np.ndarray]) -> Callable[[np.ndarray], np.ndarray]:
    """z-scores by the mean and std of every tile of `bags` (the training bags)."""
    tiles = np.concatenate(bags)
    mean, std = tiles.mean(0), tiles.std(0) + 1e-6
    return lambda bag: (bag - mean) / std


def abmil(train: tuple[list[np.ndarray], np.ndarray], val: tuple[list[np.ndarray], np.ndarray],
          test: tuple[list[np.ndarray], np.ndarray], classes: list[str], cfg: AbmilConfig,
          ordinal: bool = False) -> dict:
    """`n_runs` networks (seeds seed, seed+1, ...) trained on `train`, early-stopped on `val`,
    scored on `test`; per-run metrics and mean/std of the scalar ones."""
    if cfg.standardize:
        standardize = standardizer(train[0])
        train, val, test = (([standardize(bag) for bag in bags], y) for bags, y in (train, val, test))
    runs = []
    with _single_thread(cfg.device):
        for r in range(cfg.n_runs):
            net, info = train_abmil(train, val, len(classes), cfg, cfg.seed + r)
            probs = bag_probabilities(net, test[0], cfg)
            runs.append({**classification_metrics(test[1], probs, classes, ordinal=ordinal), **info})
    return summarize_runs(runs)
