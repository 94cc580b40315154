"""Our losses, masks, schedules and one whole training step against facebookresearch/dinov2's (b8931f7),
on identical inputs and weights: one table of the largest value difference and the relative gradient
difference ||g_ours - g_dinov2|| / ||g_dinov2|| of each part, then each documented deviation shown.

Parts: the DINO CLS loss; softmax centering with its EMA center (3 steps) and Sinkhorn-Knopp, for the
DINO and the iBOT targets; the iBOT patch loss on masked patches; KoLeo; the iBOT masks (statistics
over many batches: the two draw from different generators); every schedule over all 125,000
iterations of the default config; the optimizer's per-parameter multipliers; SSLMetaArch.forward_backward
(ViT-S/14, 2 global + 2 local crops; shared and separate iBOT head; both centerings). Float32, CPU.

    git -C DINOV2_CLONE worktree add /work/refs/dinov2 b8931f7             # outside the project
    .venv/bin/python benchmarks/loss_fidelity.py --dinov2-repo /work/refs/dinov2
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import random
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
import torch.distributed as dist
from dinov2_reference import import_reference, load_module, reference_ssl_meta_arch
from omegaconf import DictConfig, OmegaConf
from scipy import ndimage

from dinov2_patho.data.collate import collate_multicrop, draw_masks
from dinov2_patho.data.masking import MaskingGenerator
from dinov2_patho.loss import DINOLoss, KoLeoLoss, iBOTPatchLoss
from dinov2_patho.loss.centering import sinkhorn_knopp
from dinov2_patho.models import load_pretrained
from dinov2_patho.train.config import load_train_config
from dinov2_patho.train.schedules import Schedules
from dinov2_patho.train.ssl_meta_arch import SSLMetaArch

Row = tuple[str, float | None, float | None, str]  # part, max |value diff|, relative gradient diff, note
TEACHER_TEMP = 0.07


def rel_diff(ours: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    """||ours - ref|| / ||ref||, the tensors of each list taken as one vector."""
    a, b = (torch.cat([t.flatten().double() for t in ts]) for ts in (ours, ref))
    return ((a - b).norm() / b.norm().clamp(min=1e-300)).item()


def head_logits(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """[n, k] logits as a DINO head makes them: cosines of an L2-normalised bottleneck with
    weight-normalised prototypes (weight_g at its initial 1), so in [-1, 1]."""
    x = torch.nn.functional.normalize(torch.randn(n, 64, generator=gen), dim=-1)
    w = torch.nn.functional.normalize(torch.randn(k, 64, generator=gen), dim=-1)
    return x @ w.t()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def compare_loss(name: str, ours: Callable, ref: Callable, x: torch.Tensor, note: str = "") -> Row:
    """Value and input gradient of two loss functions of the same input."""
    results = []
    for fn in (ours, ref):
        leaf = x.detach().clone().requires_grad_(True)
        loss = fn(leaf)
        loss.backward()
        results.append((loss.item(), leaf.grad))
    (v_ours, g_ours), (v_ref, g_ref) = results
    return name, abs(v_ours - v_ref), rel_diff([g_ours], [g_ref]), note


@contextlib.contextmanager
def single_process_group() -> Iterator[None]:
    """A 1-rank gloo group: dinov2's iBOT Sinkhorn-Knopp all-reduces even without one (ours and its other
    sums all-reduce when one is up: over one rank, no-ops)."""
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/pg", rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


# ---------------------------------------------------------------------------- losses and targets

def loss_rows(ref_loss: ModuleType, gen: torch.Generator, batch: int = 32, k: int = 256) -> list[Row]:
    rows = []
    student = head_logits(4 * batch, k, gen).reshape(4, batch, k)
    teacher = torch.softmax(head_logits(2 * batch, k, gen).reshape(2, batch, k) / TEACHER_TEMP, dim=-1)
    ours_dino, ref_dino = DINOLoss(k), ref_loss.DINOLoss(k)
    rows.append(compare_loss("DINO CLS loss (4 student x 2 teacher crops, 32 x 256)",
                             lambda s: ours_dino(list(s), list(teacher)),
                             lambda s: ref_dino(list(s), list(teacher)), student))

    # softmax centering: each step's targets, then the center after the last update
    for label, ours_t, ref_t, shape in (
            ("DINO", DINOLoss(k), ref_loss.DINOLoss(k), (2 * batch, k)),
            ("iBOT", iBOTPatchLoss(k), ref_loss.iBOTPatchLoss(k), (1, 3 * batch, k))):
        worst = 0.0
        for _ in range(3):
            t = head_logits(math.prod(shape[:-1]), k, gen).reshape(shape)
            worst = max(worst, max_diff(ours_t.softmax_center_teacher(t.reshape(-1, k), TEACHER_TEMP),
                                        ref_t.softmax_center_teacher(t, TEACHER_TEMP).reshape(-1, k)))
            ours_t.update_center(t.reshape(-1, k))
            ref_t.update_center(t)
        ref_t.apply_center_update()  # dinov2 applies an update at the next call; ours at once
        worst = max(worst, max_diff(ours_t.center.reshape(-1), ref_t.center.reshape(-1)))
        rows.append((f"{label} softmax centering + EMA center, 3 steps", worst, None, "targets and center"))

    t = head_logits(2 * batch, k, gen)
    rows.append(("DINO Sinkhorn-Knopp targets", max_diff(sinkhorn_knopp(t, TEACHER_TEMP),
                                                         ref_dino.sinkhorn_knopp_teacher(t, TEACHER_TEMP)),
                 None, "3 iterations"))
    m = head_logits(5 * batch, k, gen)
    ref_targets = ref_loss.iBOTPatchLoss(k).sinkhorn_knopp_teacher(
        m, TEACHER_TEMP, n_masked_patches_tensor=torch.tensor([m.shape[0]]))
    rows.append(("iBOT Sinkhorn-Knopp targets", max_diff(sinkhorn_knopp(m, TEACHER_TEMP), ref_targets), None,
                 "3 iterations"))

    masks = draw_masks(2 * batch, 64, (0.1, 0.5), 0.5, MaskingGenerator(8, max_num_patches=32), gen)
    weight = (1 / masks.sum(-1).clamp(min=1)).unsqueeze(-1).expand_as(masks)[masks]
    n = int(masks.sum())
    probs = torch.softmax(head_logits(n, k, gen) / TEACHER_TEMP, dim=-1)
    ours_ibot, ref_ibot = iBOTPatchLoss(k), ref_loss.iBOTPatchLoss(k)
    rows.append(compare_loss(f"iBOT patch loss ({n} masked patches of {2 * batch} crops)",
                             lambda s: ours_ibot(s, probs, weight, n_images=2 * batch),
                             lambda s: ref_ibot.forward_masked(s, probs, student_masks_flat=masks,
                                                               n_masked_patches=n, masks_weight=weight),
                             head_logits(n, k, gen)))
    rows.append(compare_loss("KoLeo (32 rows of 64)", KoLeoLoss(), ref_loss.KoLeoLoss(),
                             torch.randn(batch, 64, generator=gen)))
    return rows


def deviation_rows(ref_loss: ModuleType, gen: torch.Generator) -> list[Row]:
    """The documented deviations, each shown on the input where it matters."""
    # logits shifted by 8 (weight_g grown to ~9): 8 / 0.07 > 88.7, exp() overflows float32 in dinov2;
    # the targets do not depend on a constant shift, ours subtracts the maximum first
    logits = head_logits(32, 256, gen)
    ours, ref = sinkhorn_knopp(logits + 8, TEACHER_TEMP), ref_loss.DINOLoss(256).sinkhorn_knopp_teacher(
        logits + 8, TEACHER_TEMP)
    row = torch.randn(1, 64, generator=gen)
    return [
        ("deviation: Sinkhorn-Knopp on logits + 8 (exp overflows float32)",
         max_diff(ours, sinkhorn_knopp(logits, TEACHER_TEMP)), None,
         f"ours against ours unshifted; dinov2's targets finite: {bool(torch.isfinite(ref).all())}"),
        ("deviation: KoLeo of one row", None, None,
         f"ours {KoLeoLoss()(row).item():.3g} (no neighbour); dinov2 {ref_loss.KoLeoLoss()(row).item():.3g}"),
        ("deviation: iBOT EMA center over W ranks", None, None,
         "equal on one rank (above); ours weighs each masked patch, dinov2 each rank (not run here)"),
        ("deviation: blur odds and kernel", None, None,
         "not run (dinov2's augmentations need torchvision): our blur_p are the odds; dinov2's "
         "GaussianBlur(p) blurs with 1 - p; augmentation.blur_p=[0.0, 0.9, 0.5] and "
         "blur_kernel_size=9 match it"),
    ]


# ---------------------------------------------------------------------------- masks

def mask_statistics(masks: list[torch.Tensor], grid: int) -> dict[str, np.ndarray]:
    """Per crop: masked or not; of a masked crop, the masked fraction and its 4-connected blobs."""
    flat = torch.cat(masks).reshape(-1, grid, grid).numpy()
    counts = flat.reshape(len(flat), -1).sum(1)
    masked = counts > 0
    blobs = np.array([ndimage.label(m)[1] for m in flat[masked]], np.float64)
    return {"crops masked": masked.astype(np.float64),
            "masked fraction of a masked crop": counts[masked] / grid**2,
            "blobs per masked crop": blobs}


def mask_rows(repo: Path, n_batches: int, seed: int) -> list[Row]:
    """Masks of DINOv2's ViT-L/14 setting (16 x 16 patches, ratio 0.1-0.5 on half the crops), drawn by
    our draw_masks and by dinov2's collate_data_and_cast; their means, with the z of the difference."""
    ref_masking = load_module(repo, "dinov2/data/masking.py")
    ref_collate = load_module(repo, "dinov2/data/collate.py")
    grid, crops, ratio, probability = 16, 64, (0.1, 0.5), 0.5
    ours_gen = MaskingGenerator(grid, max_num_patches=0.5 * grid * grid)
    ref_gen = ref_masking.MaskingGenerator((grid, grid), max_num_patches=0.5 * grid * grid)
    random.seed(seed)  # dinov2 draws from Python's random
    g = torch.Generator().manual_seed(seed)
    samples = [({"global_crops": [torch.zeros(1)] * 2, "local_crops": [torch.zeros(1)]}, 0)] * (crops // 2)
    ours = [draw_masks(crops, grid * grid, ratio, probability, ours_gen, g) for _ in range(n_batches)]
    ref = [ref_collate.collate_data_and_cast(samples, ratio, probability, torch.float32, grid * grid,
                                             ref_gen)["collated_masks"] for _ in range(n_batches)]
    rows = []
    for (name, a), b in zip(mask_statistics(ours, grid).items(), mask_statistics(ref, grid).values()):
        se = math.sqrt(a.var() / len(a) + b.var() / len(b))
        rows.append((f"masks: {name}, {a.mean():.4f} vs {b.mean():.4f}", abs(a.mean() - b.mean()), None,
                     f"z = {(a.mean() - b.mean()) / se:+.2f}; {n_batches} batches of {crops} crops each"))
    return rows


# ---------------------------------------------------------------------------- schedules and groups

def schedule_rows(repo: Path, batch: int = 1024) -> list[Row]:
    """Ours from the training defaults (train/config.py) against dinov2's build_schedulers on its
    ssl_default_config."""
    utils = load_module(repo, "dinov2/utils/utils.py")
    cfg = OmegaConf.load(repo / "dinov2/configs/ssl_default_config.yaml")
    epoch, o, t = cfg.train.OFFICIAL_EPOCH_LENGTH, cfg.optim, cfg.teacher
    total = o.epochs * epoch
    lr = dict(base_value=o.base_lr * math.sqrt(batch / 1024), final_value=o.min_lr, total_iters=total,
              warmup_iters=o.warmup_epochs * epoch, start_warmup_value=0)
    last_layer = utils.CosineScheduler(**lr)
    last_layer.schedule[: o.freeze_last_layer_epochs * epoch] = 0
    temp_iters = t.warmup_teacher_temp_epochs * epoch
    ref = {"lr": utils.CosineScheduler(**lr),
           "wd": utils.CosineScheduler(o.weight_decay, o.weight_decay_end, total),
           "momentum": utils.CosineScheduler(t.momentum_teacher, t.final_momentum_teacher, total),
           "teacher_temp": utils.CosineScheduler(t.teacher_temp, t.teacher_temp, temp_iters,
                                                 warmup_iters=temp_iters,
                                                 start_warmup_value=t.warmup_teacher_temp),
           "last_layer_lr": last_layer}
    ours = Schedules(load_train_config(None, ["data.index=x"]), global_batch=batch)
    values = [ours.at(it).as_dict() for it in range(total + 10)]
    return [(f"schedule: {name}", max(abs(v[name] - float(sched[it])) for it, v in enumerate(values)), None,
             f"iterations 0-{total + 9}, default config, batch {batch}") for name, sched in ref.items()]


def group_rows(ours: SSLMetaArch, ref: torch.nn.Module) -> list[Row]:
    """(lr multiplier, weight-decay multiplier, is_last_layer) of every student parameter."""
    def table(groups: list[dict], names_of: Callable[[dict], list[str]]) -> dict[str, tuple]:
        return {name: (round(g["lr_multiplier"], 12), g["wd_multiplier"], g["is_last_layer"])
                for g in groups for name in names_of(g)}

    ref_names = {id(p): f"{part}.{name}" for part, module in ref.student.items()
                 for name, p in module.named_parameters()}
    theirs = table(list(ref.get_params_groups()), lambda g: [ref_names[id(p)] for p in g["params"]])
    rows = []
    for decay_tokens in (False, True):
        ours.cfg.optim.token_weight_decay = decay_tokens
        mine = table(ours.get_params_groups(), lambda g: g["names"])
        differ = sorted(n for n in theirs if mine.get(n) != theirs[n])
        rows.append((f"optimizer groups, optim.token_weight_decay={str(decay_tokens).lower()}", None, None,
                     f"{len(differ)} of {len(theirs)} parameters differ: {', '.join(differ) or 'none'}"))
    ours.cfg.optim.token_weight_decay = False
    return rows


# ---------------------------------------------------------------------------- forward_backward

@contextlib.contextmanager
def tensors_stay_on_cpu() -> Iterator[None]:
    """dinov2's forward_backward moves its inputs with .cuda(); without a GPU they stay where they are."""
    if torch.cuda.is_available():
        yield
        return
    cuda = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = cuda


def step_configs(repo: Path, centering: str, separate: bool, n_local: int,
                 extra: list[str]) -> tuple[DictConfig, DictConfig]:
    shared = {"crops": {"global_crops_size": 56, "local_crops_size": 28, "local_crops_number": n_local},
              "dino": {"head_n_prototypes": 256, "head_hidden_dim": 256, "head_bottleneck_dim": 64},
              "ibot": {"separate_head": separate, "head_n_prototypes": 192, "head_hidden_dim": 256,
                       "head_bottleneck_dim": 64}}
    # LayerScale 1 rather than 1e-5, so that the blocks, not only the embeddings, shape the outputs
    ours = load_train_config(None, [
        "data.index=x", "student.arch=vit_small", "student.patch_size=14", "student.drop_path_rate=0.0",
        "student.layerscale=1.0", "compute_precision.amp=off", f"teacher.centering={centering}",
        *(f"{section}.{k}={v}" for section, values in shared.items() for k, v in values.items()), *extra])
    ref = OmegaConf.merge(
        OmegaConf.load(repo / "dinov2/configs/ssl_default_config.yaml"), shared,
        {"student": {"arch": "vit_small", "patch_size": 14, "drop_path_rate": 0.0, "layerscale": 1.0,
                     "block_chunks": 0},
         "train": {"centering": centering}, "compute_precision": {"grad_scaler": False}})
    return ours, ref


def build_pair(repo: Path, ref_cls: type, centering: str, separate: bool, n_local: int,
               extra: tuple[str, ...] = ()) -> tuple[SSLMetaArch, torch.nn.Module]:
    """Our SSLMetaArch and dinov2's with the same weights (dinov2's random init; teacher = student)."""
    ours_cfg, ref_cfg = step_configs(repo, centering, separate, n_local, list(extra))
    torch.manual_seed(0)
    ref = ref_cls(ref_cfg)
    ref.teacher.load_state_dict(ref.student.state_dict())  # as its prepare_for_distributed_training
    ref.need_to_synchronize_fsdp_streams = False  # its stream sync is torch.cuda's
    backbone = ref.student.backbone
    # without xformers its blocks cannot take a list of crop sizes: one forward per crop size instead
    backbone.forward_features_list = lambda xs, ms: [backbone.forward_features(x, m) for x, m in zip(xs, ms)]
    ours = SSLMetaArch(ours_cfg)
    load_pretrained(ours.student["backbone"], ref.student.backbone.state_dict(), format="dinov2")
    for name in ours.student:
        if name != "backbone":
            ours.student[name].load_state_dict(ref.student[name].state_dict())
    ours.teacher.load_state_dict(ours.student.state_dict())
    ref.train()  # its train() returns None
    return ours.train(), ref


def step_batch(n_local: int, gen: torch.Generator, batch: int = 4) -> dict:
    samples = [({"global_crops": [torch.randn(3, 56, 56, generator=gen) for _ in range(2)],
                 "local_crops": [torch.randn(3, 28, 28, generator=gen) for _ in range(n_local)]}, i)
               for i in range(batch)]
    return collate_multicrop(samples, mask_ratio_min_max=(0.1, 0.5), mask_probability=0.5,
                             mask_generator=MaskingGenerator(4, max_num_patches=8), generator=gen)


def reference_inputs(b: dict) -> dict:
    """Our collated batch in dinov2's keys (its buffer `upperbound` a few rows above the masked count)."""
    n = b["n_masked_patches"]
    return {"collated_global_crops": b["global_crops"], "collated_local_crops": b["local_crops"],
            "collated_masks": b["masks"], "mask_indices_list": b["mask_indices"],
            "n_masked_patches": torch.tensor([n]), "upperbound": n + 3, "masks_weight": b["masks_weight"]}


def reference_total(losses: dict[str, float], cfg: DictConfig) -> float:
    """dinov2 returns its displayed losses (KoLeo and iBOT halved); this is the loss it backpropagated."""
    return (losses.get("dino_local_crops_loss", 0.0) + losses["dino_global_crops_loss"]
            + 2 * losses["koleo_loss"] + cfg.ibot.loss_weight * 2 * losses["ibot_loss"])


def grad_diff(ours: SSLMetaArch, ref: torch.nn.Module) -> float:
    """Relative difference of all student gradients, parameter by parameter under the same names."""
    def grads(arch: torch.nn.Module) -> dict[str, torch.Tensor]:
        return {n: torch.zeros_like(p) if p.grad is None else p.grad
                for n, p in arch.student.named_parameters()}

    mine, theirs = grads(ours), grads(ref)
    if mine.keys() != theirs.keys():
        raise SystemExit(f"loss_fidelity: parameter names differ: {sorted(mine.keys() ^ theirs.keys())[:5]}")
    return rel_diff([mine[n] for n in theirs], list(theirs.values()))


def run_step(ours: SSLMetaArch, ref: torch.nn.Module, batch: dict) -> tuple[dict, dict]:
    ours.zero_grad(set_to_none=True)
    ref.zero_grad(set_to_none=True)
    mine = ours.forward_backward(batch, TEACHER_TEMP)
    with tensors_stay_on_cpu():
        theirs = ref.forward_backward(reference_inputs(batch), TEACHER_TEMP)
    return mine, {k: float(v.detach()) for k, v in theirs.items()}


def forward_backward_rows(repo: Path, ref_cls: type, gen: torch.Generator) -> list[Row]:
    rows = []
    for centering, separate, steps in (("sinkhorn_knopp", False, 1), ("sinkhorn_knopp", True, 1),
                                       ("centering", False, 2)):
        ours, ref = build_pair(repo, ref_cls, centering, separate, 2)
        batch = step_batch(2, gen)
        worst_value, worst_grad = 0.0, 0.0
        for _ in range(steps):  # a second step applies the first one's EMA center
            mine, theirs = run_step(ours, ref, batch)
            worst_value = max(worst_value, abs(mine["total_loss"] - reference_total(theirs, ref.cfg)))
            worst_grad = max(worst_grad, grad_diff(ours, ref))
        head = "separate" if separate else "shared"
        rows.append((f"forward_backward: {centering}, {head} iBOT head, {steps} step(s)",
                     worst_value, worst_grad,
                     f"ViT-S/14, batch 4, 2 x 56 + 2 x 28 px, {batch['n_masked_patches']} masked patches"))
    # without local crops dinov2 divides the DINO term by 3 where we divide by the 2 pairs there are
    for weight in ("1.0", repr(2 / 3)):
        ours, ref = build_pair(repo, ref_cls, "sinkhorn_knopp", False, 0, (f"dino.loss_weight={weight}",))
        mine, theirs = run_step(ours, ref, step_batch(0, gen))
        ratio = mine["dino_global_crops_loss"] / theirs["dino_global_crops_loss"]
        rows.append((f"deviation: no local crops, ours at dino.loss_weight={float(weight):.4g}",
                     abs(mine["total_loss"] - reference_total(theirs, ref.cfg)), grad_diff(ours, ref),
                     f"DINO term ours / dinov2 = {ratio:.4f} (before loss_weight)"))
    return rows


# ---------------------------------------------------------------------------- table

def format_table(rows: list[Row]) -> str:
    lines = ["| part | max abs value diff | rel. gradient diff | note |", "|---|---|---|---|"]
    for name, value, grad, note in rows:
        v = "-" if value is None else f"{value:.1e}"
        lines.append(f"| {name} | {v} | {'-' if grad is None else f'{grad:.1e}'} | {note} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dinov2-repo", type=Path,
                        default=Path(os.environ.get("DINOV2_REPO", "/work/refs/dinov2")))
    parser.add_argument("--mask-batches", type=int, default=500,
                        help="batches of 64 crops drawn by each mask generator")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    repo = args.dinov2_repo
    if not (repo / "dinov2").is_dir():
        parser.exit(2, f"loss_fidelity: no dinov2 checkout at {repo} (see --help)\n")
    device = torch.device("cpu")
    import_reference(repo, device)
    ref_cls = reference_ssl_meta_arch(repo, device)
    import dinov2.loss as ref_loss

    gen = torch.Generator().manual_seed(args.seed)
    with single_process_group():
        rows = loss_rows(ref_loss, gen)
        rows += mask_rows(repo, args.mask_batches, args.seed)
        rows += schedule_rows(repo)
        rows += group_rows(*build_pair(repo, ref_cls, "sinkhorn_knopp", False, 2))
        rows += forward_backward_rows(repo, ref_cls, gen)
        rows += deviation_rows(ref_loss, gen)
    print(f"loss_fidelity: ours against dinov2 at {repo}, float32, CPU ({torch.get_num_threads()} threads)")
    print(format_table(rows))


if __name__ == "__main__":
    main()
