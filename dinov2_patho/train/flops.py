"""FLOPs of a training step, counted on the step itself, and model FLOPs utilisation (MFU).

torch's FlopCounterMode counts at the dispatcher what the step really runs (matmuls,
convolutions, attention; forward and backward, masked patches and heads included; blocks
that stochastic depth skips on part of the batch count only for the rest), in FLOPs of 2
per multiply-add, as MFU figures (PaLM, torchtitan) count them. fvcore, which
DINOv2 lists, counts by jit-tracing a forward: it cannot trace our ViT (position embeddings
resampled from traced shapes) and would leave backward to a 2x rule, so it is not used.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch.utils.flop_counter import (
    FlopCounterMode,
    flop_registry,
    register_flop_formula,
    sdpa_backward_flop_count,
    sdpa_flop_count,
)

T = TypeVar("T")

# Dense bf16/fp16 tensor-core peaks per GPU (NVIDIA datasheets), matched against the device
# name in this order; other devices, and fp32 runs, get no MFU.
PEAK_FLOPS_16BIT = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12))

# torch counts the CUDA attention kernels but not the CPU one (torch 2.4-2.13)
_CPU_SDPA = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_CPU_SDPA_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
if _CPU_SDPA not in flop_registry:
    register_flop_formula(_CPU_SDPA)(
        lambda query_shape, key_shape, value_shape, *_, **__: sdpa_flop_count(query_shape, key_shape,
                                                                               value_shape))
if _CPU_SDPA_BACKWARD not in flop_registry:
    register_flop_formula(_CPU_SDPA_BACKWARD)(
        lambda grad_out_shape, query_shape, key_shape, value_shape, *_, **__: sdpa_backward_flop_count(
            grad_out_shape, query_shape, key_shape, value_shape))


def counted(step: Callable[..., T], *args: Any, **kwargs: Any) -> tuple[T, int]:
    """`step(*args, **kwargs)`, and the FLOPs it ran on this process."""
    with FlopCounterMode(display=False) as counter:
        out = step(*args, **kwargs)
    return out, int(counter.get_total_flops())


def peak_flops(device: torch.device, dtype: torch.dtype | None) -> float | None:
    """The device's dense peak FLOP/s at `dtype` (the autocast dtype), when known."""
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_FLOPS_16BIT if key in name), None)


def utilisation(step_flops: float, seconds: float, peak: float | None) -> dict[str, float]:
    """Achieved TFLOP/s of a step of `step_flops` (all ranks) and, with a known `peak` (all
    ranks), the MFU."""
    achieved = step_flops / seconds
    out = {"tflops": achieved / 1e12}
    if peak:
        out["mfu"] = achieved / peak
    return out
