"""GPU readiness: checks and times, in one run, what CPU CI cannot, and prints one table.

  bf16 autocast      SSLMetaArch's loss on a fixed batch, bf16 autocast against fp32 (same weights)
  xformers attention dinov2_patho.layers.attention with xformers against SDPA ('not installed' otherwise)
  NCCL DDP / FSDP2   a training step under DDP and under train.distributed=fsdp on one batch per rank:
                     the losses must agree (2 processes with >= 2 GPUs, else a 1-rank NCCL group)
  faiss k-means      curation k-means with faiss-gpu against faiss-cpu, from the same centroids
  ViT-L/14 step      the full SSL step at the paper's per-GPU batch (64), samples/s and MFU, its FLOPs
                     counted by train/flops.py (FlopCounterMode)

Rows that need CUDA say 'skipped (no CUDA)' on a CPU; their code still runs there on stand-ins (gloo
for NCCL, the torch k-means engine for faiss-gpu, a tiny ViT), so a failure there is still a FAIL.
Exit status 1 when any row FAILs. Under 8 minutes on one H200 (budgeted, not yet measured).

    .venv/bin/python benchmarks/gpu_check.py                       # on a GPU machine
    .venv/bin/python benchmarks/gpu_check.py --device cpu --tiny   # CI (tests/test_gpu_check.py)
    .venv/bin/python benchmarks/gpu_check.py --device cpu --tiny --ranks 2   # the 2-process path, gloo
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from dinov2_patho.curation.kmeans import LloydOptions, Points, init_centroids, kmeans
from dinov2_patho.data.collate import collate_multicrop
from dinov2_patho.data.masking import MaskingGenerator
from dinov2_patho.errors import UserError
from dinov2_patho.layers import attention
from dinov2_patho.train import fsdp
from dinov2_patho.train.config import load_train_config
from dinov2_patho.train.flops import counted, peak_flops, utilisation
from dinov2_patho.train.ssl_meta_arch import SSLMetaArch, autocast_dtype

NO_CUDA = "skipped (no CUDA)"
LOSS_RTOL = 1e-2  # bf16 keeps 8 bits of mantissa; measured 7e-4 on the tiny model on CPU
ATTN_ATOL = 2e-2  # two bf16 attention kernels, outputs of order 1
KMEANS_RTOL = 1e-3  # relative objective difference of two nearest-centroid kernels from one init


@dataclass(frozen=True)
class Sizes:
    model: tuple[str, ...]  # training-config overrides
    batch: int  # per-GPU batch of the timed step
    parity_batch: int  # batch of the parity checks
    kmeans: tuple[int, int, int]  # points, dim, k


FULL = Sizes(("student.arch=vit_large", "student.patch_size=14"), batch=64, parity_batch=8,
             kmeans=(200_000, 256, 1024))
TINY = Sizes(("student.embed_dim=48", "student.depth=2", "student.num_heads=2", "student.patch_size=16",
              "dino.head_n_prototypes=64", "dino.head_hidden_dim=64", "dino.head_bottleneck_dim=32",
              "ibot.head_n_prototypes=64", "ibot.head_hidden_dim=64", "ibot.head_bottleneck_dim=32",
              "crops.global_crops_size=64", "crops.local_crops_size=32", "crops.local_crops_number=2"),
             batch=4, parity_batch=2, kmeans=(2000, 16, 8))


@dataclass
class Row:
    check: str
    status: str
    detail: str
    seconds: float = 0.0


def config(sizes: Sizes, amp: str):
    return load_train_config(None, [*sizes.model, f"compute_precision.amp={amp}"])


def fixed_batch(cfg, batch: int, seed: int) -> dict:
    """A collated multi-crop batch of seeded noise, with iBOT masks as the default config draws them."""
    gen = torch.Generator().manual_seed(seed)
    g, loc, n_local = cfg.crops.global_crops_size, cfg.crops.local_crops_size, cfg.crops.local_crops_number
    samples = [({"global_crops": [torch.randn(3, g, g, generator=gen) for _ in range(2)],
                 "local_crops": [torch.randn(3, loc, loc, generator=gen) for _ in range(n_local)]}, i)
               for i in range(batch)]
    grid = g // cfg.student.patch_size
    return collate_multicrop(samples, mask_ratio_min_max=tuple(cfg.ibot.mask_ratio_min_max),
                             mask_probability=cfg.ibot.mask_sample_probability,
                             mask_generator=MaskingGenerator(grid, max_num_patches=0.5 * grid * grid),
                             generator=gen)


def relative(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def outcome(passed: bool, cuda_needed: bool, device: torch.device) -> str:
    if not passed:
        return "FAIL"
    return NO_CUDA if cuda_needed and device.type != "cuda" else "ok"


# --- checks ---------------------------------------------------------------------------------------

def check_bf16(sizes: Sizes, device: torch.device) -> Row:
    torch.manual_seed(0)
    reference = SSLMetaArch(config(sizes, "off")).to(device)
    batch = fixed_batch(reference.cfg, sizes.parity_batch, seed=0)
    bf16 = SSLMetaArch(config(sizes, "bf16")).to(device)
    bf16.load_state_dict(reference.state_dict())
    losses = []
    for model in (reference, bf16):
        torch.manual_seed(1)  # the same stochastic-depth draws in both
        losses.append(model.forward_backward(batch, teacher_temp=0.07)["total_loss"])
    fp32_loss, bf16_loss = losses
    rel = relative(bf16_loss, fp32_loss)
    ok = math.isfinite(bf16_loss) and rel < LOSS_RTOL
    return Row("bf16 autocast loss vs fp32", outcome(ok, False, device),
               f"fp32 {fp32_loss:.4f}, bf16 {bf16_loss:.4f}, rel diff {rel:.1e} (< {LOSS_RTOL:g})")


def check_xformers(device: torch.device) -> Row:
    name = "xformers vs SDPA attention"
    if attention._XFORMERS is None:
        return Row(name, "not installed", "xformers not importable (or XFORMERS_DISABLED set)")
    if device.type != "cuda":
        return Row(name, NO_CUDA, "xformers runs on CUDA inputs only")
    torch.manual_seed(0)
    module = attention.Attention(1024, 16).to(device)
    x = torch.randn(8, 257, 1024, device=device)
    xformers_ops = attention._XFORMERS
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        with_xformers = module(x).float()
        try:
            attention._XFORMERS = None
            with_sdpa = module(x).float()
        finally:
            attention._XFORMERS = xformers_ops
    diff = (with_xformers - with_sdpa).abs().max().item()
    return Row(name, outcome(diff < ATTN_ATOL, True, device),
               f"ViT-L attention, 8x257 tokens, bf16: max |diff| {diff:.1e} (< {ATTN_ATOL:g})")


def distributed_worker(rank: int, world: int, backend: str, init_file: str, sizes: Sizes, out: str) -> None:
    """Two steps under DDP, then two under FSDP2, from the same weights on the same per-rank batches;
    rank 0 writes the losses and the second step's seconds."""
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world)
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    cfg = config(sizes, "bf16" if device.type == "cuda" else "off")
    batch = fixed_batch(cfg, sizes.parity_batch, seed=rank)
    result = {}
    for mode in ("ddp", "fsdp"):
        torch.manual_seed(0)
        model = SSLMetaArch(cfg).to(device)
        model.train()
        if mode == "ddp":
            ids = [device.index] if device.type == "cuda" else None
            for name in list(model.student.keys()):
                model.student[name] = torch.nn.parallel.DistributedDataParallel(model.student[name],
                                                                                device_ids=ids)
        else:
            fsdp.shard_model(model, device)
        optimizer = torch.optim.AdamW([{"params": g["params"]} for g in model.get_params_groups()], lr=1e-4)
        losses, seconds = [], 0.0
        for _ in range(2):
            sync(device)
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            losses.append(model.forward_backward(batch, teacher_temp=0.07)["total_loss"])
            optimizer.step()
            model.update_teacher(0.994)
            sync(device)
            seconds = time.perf_counter() - start
        result[mode] = {"losses": losses, "seconds": seconds}
    if rank == 0:
        Path(out).write_text(json.dumps(result))
    dist.destroy_process_group()


def check_distributed(sizes: Sizes, device: torch.device, world: int) -> list[Row]:
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    backend = "nccl" if gpus else "gloo"
    with tempfile.TemporaryDirectory() as tmp:
        init_file, out = str(Path(tmp, "init")), str(Path(tmp, "result.json"))
        start = time.perf_counter()
        args = (world, backend, init_file, sizes, out)
        if world > 1:
            torch.multiprocessing.spawn(distributed_worker, args=args, nprocs=world)
        else:
            distributed_worker(0, *args)
        elapsed = time.perf_counter() - start
        result = json.loads(Path(out).read_text())
    where = f"{world} rank{'s' if world > 1 else ''}, {backend}" + ("" if gpus else " instead of NCCL")
    ddp = result["ddp"]["losses"]
    rows = []
    for mode, name in (("ddp", "NCCL DDP step"), ("fsdp", "NCCL FSDP2 step")):
        losses = result[mode]["losses"]
        rel = max(relative(a, b) for a, b in zip(losses, ddp))
        ok = all(math.isfinite(v) for v in losses) and rel < LOSS_RTOL
        against = "" if mode == "ddp" else f", rel diff to DDP {rel:.1e}"
        rows.append(Row(name, outcome(ok, True, device),
                        f"{where}: losses {losses[0]:.4f} -> {losses[1]:.4f}{against}, "
                        f"step {result[mode]['seconds']:.2f} s", elapsed / 2))
    return rows


def check_kmeans(sizes: Sizes, device: torch.device) -> Row:
    name = "faiss-gpu k-means vs faiss-cpu"
    try:
        import faiss
    except ImportError:
        return Row(name, "not installed", "faiss not importable")
    on_gpu = device.type == "cuda"
    if on_gpu and not hasattr(faiss, "StandardGpuResources"):
        return Row(name, "not installed", "faiss has no GPU support (faiss-cpu build)")
    n, d, k = sizes.kmeans
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(k, d)) * 3)[rng.integers(k, size=n)] + rng.normal(size=(n, d))
    points = Points(x.astype(np.float32), shard=False)
    centroids = init_centroids(points, k, "kmeans++", rng, 64, device.type)
    timings, results = {}, {}
    candidate = ("faiss", "cuda") if on_gpu else ("torch", "cpu")  # the stand-in on a CPU
    for engine, dev in (("faiss", "cpu"), candidate):
        start = time.perf_counter()
        options = LloydOptions(iterations=10, engine=engine, device=dev)
        results[engine, dev] = kmeans(points, k, options=options, centroids=centroids)
        timings[engine, dev] = time.perf_counter() - start
    ref, cand = results["faiss", "cpu"], results[candidate]
    rel = relative(cand.objective, ref.objective)
    agree = float(np.mean(cand.assignment == ref.assignment))
    label = "faiss-gpu" if on_gpu else "torch engine (stand-in)"
    return Row(name, outcome(rel < KMEANS_RTOL, True, device),
               f"{n}x{d}, k={k}, 10 iters: {label} {timings[candidate]:.2f} s vs faiss-cpu "
               f"{timings['faiss', 'cpu']:.2f} s, objective rel diff {rel:.1e}, labels agree {agree:.4f}",
               sum(timings.values()))


def check_train_step(sizes: Sizes, device: torch.device, iters: int) -> Row:
    cfg = config(sizes, "bf16" if device.type == "cuda" else "off")
    torch.manual_seed(0)
    model = SSLMetaArch(cfg).to(device)
    model.train()
    optimizer = torch.optim.AdamW([{"params": g["params"]} for g in model.get_params_groups()], lr=1e-4)
    batch = fixed_batch(cfg, sizes.batch, seed=0)

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = model.forward_backward(batch, teacher_temp=0.07)["total_loss"]
        optimizer.step()
        model.update_teacher(0.994)
        return loss

    _, flops = counted(step)  # also the warm-up
    times = []
    for _ in range(iters):
        sync(device)
        start = time.perf_counter()
        loss = step()
        sync(device)
        times.append(time.perf_counter() - start)
    best = min(times)
    rate = utilisation(flops, best, peak_flops(device, autocast_dtype(cfg.compute_precision.amp, device)))
    mfu = f"MFU {rate['mfu']:.3f}" if "mfu" in rate else "MFU n/a (no known peak)"
    model_name = "ViT-L/14" if sizes is FULL else "tiny ViT (stand-in)"
    return Row(f"ViT-L/14 train step, batch {FULL.batch}", outcome(math.isfinite(loss), True, device),
               f"{model_name}, batch {sizes.batch}: {sizes.batch / best:.2f} samples/s (best of {iters}), "
               f"{flops / 1e9:.3g} GFLOP/step counted, {rate['tflops']:.3g} TFLOP/s, {mfu}", sum(times))


# --- table ----------------------------------------------------------------------------------------

def timed(check: Callable[[], Row | list[Row]]) -> list[Row]:
    start = time.perf_counter()
    rows = check()
    rows = rows if isinstance(rows, list) else [rows]
    for row in rows:
        row.seconds = row.seconds or time.perf_counter() - start
    return rows


def print_table(rows: list[Row]) -> None:
    width = max(len(r.check) for r in rows)
    status = max(len(r.status) for r in rows)
    print(f"| {'check':{width}s} | {'result':{status}s} | {'seconds':>7s} | detail |")
    print(f"|{'-' * (width + 2)}|{'-' * (status + 2)}|{'-' * 9}|--------|")
    for r in rows:
        print(f"| {r.check:{width}s} | {r.status:{status}s} | {r.seconds:7.2f} | {r.detail} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--tiny", action="store_true", help="tiny model and data (CI on CPU)")
    parser.add_argument("--iters", type=int, default=3, help="timed train steps (best is reported)")
    parser.add_argument("--ranks", type=int, default=None,
                        help="processes of the DDP/FSDP check (default: 2 with >= 2 GPUs, else 1)")
    args = parser.parse_args()
    kind = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError("gpu_check: --device cuda but no CUDA device is visible")
    if kind == "cpu" and not args.tiny:
        raise UserError("gpu_check: full sizes (ViT-L/14, batch 64) need a GPU: add --tiny on a CPU")
    device = torch.device(kind)
    gpus = torch.cuda.device_count() if kind == "cuda" else 0
    ranks = args.ranks or (2 if gpus >= 2 else 1)
    if ranks < 1 or (gpus and ranks > gpus):
        raise UserError(f"gpu_check: --ranks {ranks} must be >= 1 and at most the {gpus} visible GPUs")
    sizes = TINY if args.tiny else FULL
    where = torch.cuda.get_device_name(device) if kind == "cuda" else "CPU, no CUDA"
    print(f"gpu_check: {where}, {'tiny' if args.tiny else 'full'} sizes, torch {torch.__version__}")
    checks = (lambda: check_bf16(sizes, device), lambda: check_xformers(device),
              lambda: check_distributed(sizes, device, ranks), lambda: check_kmeans(sizes, device),
              lambda: check_train_step(sizes, device, args.iters))
    rows = [row for check in checks for row in timed(check)]
    print_table(rows)
    return 1 if any(r.status == "FAIL" for r in rows) else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as e:
        sys.exit(f"error: {e}")
