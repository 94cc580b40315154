"""Samples/s of a DINOv2 student+teacher training step, ours against the reference model code.

(a) backbones: on one multi-crop batch (2 global 224 px + 8 local 98 px crops per sample, iBOT
    masks on the global crops), the teacher's forward (eval, no grad) on the global crops plus the
    student's forward (train mode, stochastic depth 0.3 uniform, LayerScale 1e-5) and backward on
    all crops; ours and facebookresearch/dinov2's DinoVisionTransformer with the same weights,
    timed alternately on the same machine. The reference runs with XFORMERS_DISABLED=1 on CPU (its
    only CPU path; without xformers it also cannot batch crop sizes, so both run crop sets one by one).
(b) full step: our SSLMetaArch.forward_backward (DINO + iBOT + KoLeo, heads of the default config),
    an AdamW step and the teacher EMA update. The reference's meta-architecture needs xformers, so
    (b) has no reference figure; its FLOPs are counted (train/flops.py) and, on a GPU of known
    peak, its model FLOPs utilisation printed.
CPU: ViT-S/14 at a small batch in float32. GPU (when available): ViT-L/14, batch 32, bf16 autocast.

    git clone https://github.com/facebookresearch/dinov2 /tmp/dinov2_ref     # outside the project
    flock /tmp/dinov2_patho_heavy.lock .venv/bin/python benchmarks/train_step.py --dinov2-repo /tmp/dinov2_ref
    .venv/bin/python benchmarks/train_step.py --quick                          # batch 1, 2 steps
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from dinov2_reference import import_reference

from dinov2_patho.models import build_backbone, load_pretrained

GLOBAL, LOCAL, N_LOCAL = 224, 98, 8
DROP_PATH = 0.3
LAYERSCALE = 1e-5


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_inputs(batch: int, patch: int, device: torch.device, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    global_crops = torch.randn(2 * batch, 3, GLOBAL, GLOBAL, generator=gen).to(device)
    local_crops = torch.randn(N_LOCAL * batch, 3, LOCAL, LOCAL, generator=gen).to(device)
    # half of the global crops masked at 10-50% of their patches, as the default config
    masks = torch.rand(2 * batch, (GLOBAL // patch) ** 2, generator=gen) < 0.3
    masks[batch:] = False
    return global_crops, local_crops, masks.to(device)


def backbone_step(student, teacher, inputs, autocast: Callable[[], object]) -> Callable[[], None]:
    global_crops, local_crops, masks = inputs

    def step() -> None:
        with autocast():
            with torch.no_grad():
                teacher.forward_features(global_crops)
            g = student.forward_features(global_crops, masks=masks)
            loc = student.forward_features(local_crops)
            loss = (g["x_norm_clstoken"].float().square().mean() + g["x_norm_patchtokens"].float().mean()
                    + loc["x_norm_clstoken"].float().square().mean())
        loss.backward()
        student.zero_grad(set_to_none=True)

    return step


def time_alternating(steps: dict[str, Callable[[], None]], iters: int,
                     device: torch.device) -> dict[str, tuple[float, float]]:
    """(best, median) seconds per step of each, interleaved so that load changes hit all alike.

    The best of N is the figure compared: on a shared machine other jobs only ever add time."""
    for step in steps.values():  # warm-up: allocator, kernels, autotuning
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    order = list(steps.items())
    for i in range(iters):
        # ABBA order: neither model always runs right after the other's allocations
        for name, step in order if i % 2 == 0 else order[::-1]:
            sync(device)
            t0 = time.perf_counter()
            step()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return {name: (min(ts), statistics.median(ts)) for name, ts in times.items()}


def bench_backbones(args, device, autocast) -> None:
    ours = build_backbone(args.arch, patch_size=14, img_size=GLOBAL, layerscale_init=LAYERSCALE,
                          drop_path_rate=DROP_PATH, drop_path_uniform=True).to(device)
    teacher = copy.deepcopy(ours).eval().requires_grad_(False)
    inputs = make_inputs(args.batch, 14, device)
    steps = {"ours": backbone_step(ours.train(), teacher, inputs, autocast)}
    if args.dinov2_repo and (args.dinov2_repo / "dinov2").is_dir():
        ref_vits = import_reference(args.dinov2_repo, device)
        ref = getattr(ref_vits, args.arch)(patch_size=14, img_size=GLOBAL, init_values=LAYERSCALE,
                                           block_chunks=0, drop_path_rate=DROP_PATH,
                                           drop_path_uniform=True).to(device)
        load_pretrained(ours, ref.state_dict(), format="dinov2")  # the same weights in both
        teacher.load_state_dict(ours.state_dict())
        ref_teacher = copy.deepcopy(ref).eval().requires_grad_(False)
        with torch.no_grad(), autocast():
            x = inputs[0][:2]
            diff = (ref_teacher.forward_features(x)["x_norm_clstoken"].float()
                    - teacher.forward_features(x)["x_norm_clstoken"].float()).abs().max().item()
        print(f"  same weights, teacher CLS max |ours - reference| = {diff:.2e}")
        steps["reference"] = backbone_step(ref.train(), ref_teacher, inputs, autocast)
    else:
        print(f"  reference not measured: no dinov2 checkout at {args.dinov2_repo} (see --help)")
    timings = time_alternating(steps, args.iters, device)
    for name, (best, median) in timings.items():
        print(f"  {name:9s}: best {best:7.3f} s/step = {args.batch / best:6.2f} samples/s "
              f"(median {median:.3f} s)")
    if "reference" in timings:
        (ours_best, ours_median), (ref_best, ref_median) = timings["ours"], timings["reference"]
        print(f"  ratio ours/reference (samples/s): {ref_best / ours_best:.3f}x best-of-{args.iters}, "
              f"{ref_median / ours_median:.3f}x median (target >= 1.0x)")


def bench_full_step(args, device) -> None:
    try:
        from dinov2_patho.data.collate import collate_multicrop
        from dinov2_patho.data.masking import MaskingGenerator
        from dinov2_patho.train.config import load_train_config
        from dinov2_patho.train.flops import counted, peak_flops, utilisation
        from dinov2_patho.train.ssl_meta_arch import SSLMetaArch, autocast_dtype
    except ImportError as exc:
        print(f"  not measured: {exc}")
        return
    amp = "bf16" if device.type == "cuda" else "off"
    cfg = load_train_config(None, [f"student.arch={args.arch}", "student.patch_size=14",
                                   f"student.drop_path_rate={DROP_PATH}", f"compute_precision.amp={amp}",
                                   f"crops.global_crops_size={GLOBAL}", f"crops.local_crops_size={LOCAL}",
                                   f"crops.local_crops_number={N_LOCAL}"])
    torch.manual_seed(0)
    model = SSLMetaArch(cfg).to(device)
    model.train()
    optimizer = torch.optim.AdamW([{"params": g["params"]} for g in model.get_params_groups()], lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    samples = [({"global_crops": [torch.randn(3, GLOBAL, GLOBAL, generator=gen) for _ in range(2)],
                 "local_crops": [torch.randn(3, LOCAL, LOCAL, generator=gen) for _ in range(N_LOCAL)]}, i)
               for i in range(args.batch)]
    grid = GLOBAL // 14
    batch = collate_multicrop(samples, mask_ratio_min_max=(0.1, 0.5), mask_probability=0.5,
                              mask_generator=MaskingGenerator(grid, max_num_patches=0.5 * grid * grid),
                              generator=gen)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        model.forward_backward(batch, teacher_temp=0.07)
        optimizer.step()
        model.update_teacher(0.994)

    sec, median = time_alternating({"full": step}, args.iters, device)["full"]
    _, flops = counted(step)
    heads = f"{cfg.dino.head_n_prototypes} prototypes, {'separate' if cfg.ibot.separate_head else 'shared'}"
    print(f"  ours full SSL step ({heads} iBOT head): best {sec:7.3f} s/step = "
          f"{args.batch / sec:6.2f} samples/s (median {median:.3f} s)")
    peak = peak_flops(device, autocast_dtype(amp, device))
    rate = utilisation(flops, sec, peak)
    mfu = f"MFU {rate['mfu']:.3f} of the {peak / 1e12:.0f} TFLOP/s peak" if peak else "no known peak: no MFU"
    print(f"  {flops / 1e12:.3f} TFLOP/step (counted): {rate['tflops']:.2f} TFLOP/s at best; {mfu}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="batch 1, 2 timed steps")
    parser.add_argument("--arch", default=None, help="vit_small on CPU, vit_large on GPU")
    parser.add_argument("--batch", type=int, default=None, help="4 on CPU, 32 on GPU")
    parser.add_argument("--iters", type=int, default=None, help="timed steps per model")
    parser.add_argument("--dinov2-repo", type=Path,
                        default=Path(os.environ.get("DINOV2_REPO", "/tmp/dinov2_ref")))
    parser.add_argument("--part", choices=("backbone", "full", "all"), default="all")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    args.arch = args.arch or ("vit_large" if gpu else "vit_small")
    args.batch = args.batch or (1 if args.quick else 32 if gpu else 4)
    args.iters = args.iters or (2 if args.quick else 5)

    def autocast():
        return torch.autocast("cuda", dtype=torch.bfloat16) if gpu else torch.autocast("cpu", enabled=False)

    torch.manual_seed(0)
    where = torch.cuda.get_device_name(device) + ", bf16 autocast" if gpu else (
        f"CPU, {torch.get_num_threads()} threads, float32")
    print(f"train_step: {args.arch}/14, batch {args.batch} "
          f"(2x{GLOBAL} + {N_LOCAL}x{LOCAL} crops per sample), "
          f"{where}, {args.iters} timed steps each")
    if not gpu:
        print("  GPU figure (ViT-L/14, batch 32, bf16): not measured (no GPU)")
    if args.part in ("backbone", "all"):
        print("(a) student forward/backward + teacher forward, backbones only")
        bench_backbones(args, device, autocast)
    if args.part in ("full", "all"):
        print("(b) full SSL step: losses, backward, AdamW, teacher EMA")
        bench_full_step(args, device)


if __name__ == "__main__":
    main()
