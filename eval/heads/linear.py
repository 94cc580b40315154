"""eva's linear probe on precomputed features.

Protocol (kaiko-eva 0.4.5 `HeadModule` + its offline classification configs, run by
Lightning): one `nn.Linear`, freshly initialised per run (eva's configs give the head
as a class_path dict that each run instantiates anew), cross-entropy, AdamW (lr 3e-4,
torch's default weight decay 0.01) under torch's default `ConstantLR` (lr/3 for the
first 5 epochs, stepped per epoch), shuffled batches of 256 with a partial last batch,
validation after every complete epoch (Lightning does not validate the partial epoch
cut by `max_steps`), at most 12,500 steps, early stopping on validation balanced
accuracy (`min_delta=0`: only a strict improvement resets the patience), and the first
best epoch's head kept (ModelCheckpoint saves on a strict improvement only). eva sets
patience per dataset; every value in its configs is ceil(0.2 x the number of epochs
12,500 steps make), which is the default here. Binary tasks use eva's binary configs'
head: one logit, `BCEWithLogitsLoss`, positive when the logit is > 0.

Features live in one tensor, so a step is a gather and a tiny matmul: thousands of steps
per second on a CPU.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from dinov2_patho.errors import UserError

from ..metrics import classification_metrics


@dataclass(frozen=True)
class LinearProbeConfig:
    lr: float = 3e-4
    weight_decay: float = 0.01
    batch_size: int = 256
    max_steps: int = 12_500
    patience: int | None = None  # validation epochs; None: eva's rule, ceil(0.2 * epochs)
    warmup_epochs: int = 5  # torch ConstantLR defaults, as eva's HeadModule uses them
    warmup_factor: float = 1 / 3
    n_runs: int = 5
    seed: int = 0
    device: str = "cpu"


def _num_outputs(num_classes: int) -> int:
    return 1 if num_classes == 2 else num_classes


def _predicted_class(out: torch.Tensor) -> torch.Tensor:
    return (out[:, 0] > 0).long() if out.shape[1] == 1 else out.argmax(1)


def _balanced_accuracy(pred: torch.Tensor, y: torch.Tensor, num_classes: int) -> float:
    """torchmetrics' macro accuracy, which eva monitors: mean recall over the classes seen
    in the targets or the predictions (a predicted class absent from the targets scores 0)."""
    cm = torch.bincount(y * num_classes + pred, minlength=num_classes**2).view(num_classes, num_classes)
    support = cm.sum(1)
    seen = (support > 0) | (cm.sum(0) > 0)
    return float((cm.diag()[seen].float() / support[seen].clamp(min=1).float()).mean())


def _new_head(dim: int, num_classes: int, generator: torch.Generator) -> nn.Linear:
    head = nn.Linear(dim, _num_outputs(num_classes))
    # nn.Linear's own initialisation, drawn from our generator so a seed fixes the run
    with torch.no_grad():
        nn.init.kaiming_uniform_(head.weight, a=math.sqrt(5), generator=generator)
        bound = 1 / math.sqrt(dim)
        nn.init.uniform_(head.bias, -bound, bound, generator=generator)
    return head


def train_linear_probe(x_train: torch.Tensor, y_train: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor,
                       num_classes: int, cfg: LinearProbeConfig, seed: int) -> tuple[nn.Linear, dict]:
    """Train one head; return the best-on-validation head and what happened."""
    device = torch.device(cfg.device)
    x_train, y_train = x_train.to(device, torch.float32), y_train.to(device, torch.int64)
    x_val, y_val = x_val.to(device, torch.float32), y_val.to(device, torch.int64)
    n = x_train.shape[0]
    generator = torch.Generator().manual_seed(seed)
    head = _new_head(x_train.shape[1], num_classes, generator).to(device)
    optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    binary = num_classes == 2
    loss_fn = nn.BCEWithLogitsLoss() if binary else nn.CrossEntropyLoss()
    targets = y_train.float().unsqueeze(1) if binary else y_train
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    patience = cfg.patience if cfg.patience is not None else math.ceil(0.2 * cfg.max_steps / steps_per_epoch)
    best_score, best_state, best_epoch, waited, step, epoch = -math.inf, None, -1, 0, 0, 0
    for epoch in range(math.ceil(cfg.max_steps / steps_per_epoch)):
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * (cfg.warmup_factor if epoch < cfg.warmup_epochs else 1.0)
        order = torch.randperm(n, generator=generator).to(device)
        head.train()
        batches = range(0, n, cfg.batch_size)[:cfg.max_steps - step]
        for start in batches:
            idx = order[start:start + cfg.batch_size]
            loss = loss_fn(head(x_train[idx]), targets[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        step += len(batches)
        if len(batches) < steps_per_epoch:
            break  # max_steps cut this epoch short: Lightning stops without validating it
        head.eval()
        with torch.no_grad():
            score = _balanced_accuracy(_predicted_class(head(x_val)), y_val, num_classes)
        if score > best_score:
            best_score, best_epoch, waited = score, epoch, 0
            best_state = {k: v.detach().clone() for k, v in head.state_dict().items()}
        else:
            waited += 1
            if waited >= patience:
                break
    if best_state is None:
        raise UserError(f"linear probe: max_steps={cfg.max_steps} ends before the first full epoch "
                        f"({steps_per_epoch} steps): no validated head to keep")
    head.load_state_dict(best_state)
    return head.cpu(), {"steps": step, "epochs": epoch + 1, "best_epoch": best_epoch,
                        "val_balanced_accuracy": best_score, "patience": patience}


@contextlib.contextmanager
def _single_thread(device: str) -> Iterator[None]:
    """A probe step is a [256, D] x [D, C] matmul: too small to split across threads, and
    on a shared CPU extra threads only add contention (measured 4x slower with 2 here)."""
    if torch.device(device).type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def predict_proba(head: nn.Module, x: torch.Tensor) -> np.ndarray:
    """[N, classes] probabilities; a one-logit binary head gives [1 - p, p]."""
    with torch.no_grad():
        out = head(x.float())
    if out.shape[1] == 1:
        p = torch.sigmoid(out)
        return torch.cat([1 - p, p], dim=1).numpy()
    return torch.softmax(out, dim=1).numpy()


def linear_probe(train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray],
                 test: tuple[np.ndarray, np.ndarray], classes: list[str], cfg: LinearProbeConfig) -> dict:
    """`n_runs` heads (seeds seed, seed+1, ...) trained on `train`, early-stopped on `val`,
    scored on `test` (eva scores on `val` when a benchmark has no test split: pass it
    twice). Returns per-run metrics, mean/std of the scalar ones and the test `predictions`."""
    # copies: the inputs may be read-only memory maps of the feature cache
    x_tr, y_tr = torch.tensor(train[0], dtype=torch.float32), torch.tensor(train[1], dtype=torch.int64)
    x_va, y_va = torch.tensor(val[0], dtype=torch.float32), torch.tensor(val[1], dtype=torch.int64)
    x_te = torch.tensor(test[0], dtype=torch.float32)
    runs, probs = [], []
    with _single_thread(cfg.device):
        for r in range(cfg.n_runs):
            head, info = train_linear_probe(x_tr, y_tr, x_va, y_va, len(classes), cfg, cfg.seed + r)
            probs.append(predict_proba(head, x_te))
            runs.append({**classification_metrics(test[1], probs[-1], classes), **info})
    # the runs' mean probabilities decide one prediction per test image (for intervals: eval.power)
    return {**summarize_runs(runs), "predictions": np.mean(probs, axis=0).argmax(axis=1)}


def _nanmean(values: list[float]) -> float:
    """The mean of the values that are not NaN (NaN, without a warning, when all are)."""
    values = np.asarray(values, np.float64)
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else float("nan")


def summarize_runs(runs: list[dict]) -> dict:
    """mean and sample std (eva's `statistics.stdev`; 0 for one run) over runs of every
    scalar metric, plus the runs."""
    scalars = [k for k, v in runs[0].items() if isinstance(v, float | int) and not isinstance(v, bool)]
    out: dict = {"runs": runs}
    for key in scalars:
        values = np.array([run[key] for run in runs], np.float64)
        out[key] = float(values.mean())
        out[f"{key}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    for key, value in runs[0].items():
        if isinstance(value, dict):  # per-class metrics: each class's mean over runs
            out[key] = {c: _nanmean([run[key][c] for run in runs]) for c in value}
    return out
