"""Load DINOv2 hub-format and timm-format ViT weights into our backbone, and export to both.

Our parameter names are DINOv2's, so DINOv2 checkpoints need only unwrapping (training
checkpoints: `teacher.`/`backbone.` prefixes, `blocks.<chunk>.<i>` chunking, DDP/compile prefixes).
timm checkpoints of the same architecture (e.g. UNI, a timm ViT-L/16 with init_values 1e-5) differ
in how CLS/register tokens meet the position embedding, and in the SwiGLU names; those are mapped
exactly, so the loaded model computes the same function as the source. Every load compares key
sets and shapes and refuses a partial load unless asked (strict=False), and then says what it skipped.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor

from dinov2_patho.errors import UserError
from dinov2_patho.logging import get_logger
from dinov2_patho.models.vision_transformer import VisionTransformer, resample_patch_pos_embed

log = get_logger(__name__)

FORMATS = ("auto", "dinov2", "timm", "ours")
# Containers that training checkpoints nest the weights in; the teacher is the model DINOv2 evaluates.
_NESTING_KEYS = ("teacher", "model", "state_dict", "module")
_SUBMODEL_PREFIXES = ("teacher.", "backbone.")
_CHUNKED_BLOCK = re.compile(r"^blocks\.\d+\.(\d+\.)")
_LISTED = 8


def import_timm() -> ModuleType:
    """timm, the one way the package imports it: without torchvision's image-extension warning.

    On the CPU torch wheel, timm's import of torchvision 0.16.2 (README, "torch and torchvision on a CPU
    machine") warns "Failed to load image Python extension": its compiled image ops cannot load, and
    nothing here uses them, so the warning would only alarm users. Filtered here, for this import and
    this message only, so that every command and library caller is covered and no other filter changes.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Failed to load image Python extension", UserWarning)
        import timm
    return timm


class WeightsMismatchError(UserError):
    """Weights whose keys or shapes differ from the model's; `first` names the first difference."""

    def __init__(self, message: str, first: str):
        super().__init__(message)
        self.first = first


def first_mismatch(own: Mapping[str, Tensor], sd: Mapping[str, Tensor]) -> str | None:
    """The first difference between a model's state dict and weights, in the model's key order (a
    shape, then a key the weights lack), else the first key the model lacks; None when they fit."""
    for key, value in own.items():
        if key in sd and sd[key].shape != value.shape:
            return f"{key} {list(sd[key].shape)} vs model {list(value.shape)}"
    missing = next((k for k in own if k not in sd), None)
    if missing is not None:
        return f"{missing} missing from the checkpoint"
    unexpected = next((k for k in sd if k not in own), None)
    return None if unexpected is None else f"{unexpected} not in the model"


@dataclass
class LoadReport:
    source: str
    format: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # not backbone (heads, student): not ours
    kept_init: list[str] = field(default_factory=list)  # the format has no such tensor (timm: mask_token)
    resized: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return not self.missing and not self.unexpected

    def summary(self) -> str:
        parts = [f"{self.source} ({self.format}): {len(self.loaded)} tensors loaded"]
        for name, keys in (("missing", self.missing), ("unexpected", self.unexpected),
                           ("skipped", self.skipped), ("left at init", self.kept_init)):
            if keys:
                parts.append(f"{len(keys)} {name} ({_list(keys)})")
        parts += [f"{k} resized {list(a)} -> {list(b)}" for k, (a, b) in self.resized.items()]
        return "; ".join(parts)


def _list(keys: list[str]) -> str:
    more = f", ... {len(keys) - _LISTED} more" if len(keys) > _LISTED else ""
    return ", ".join(keys[:_LISTED]) + more


def read_checkpoint(path: str | Path) -> Any:
    """A checkpoint from disk, tensors only: `weights_only=True`, or safetensors."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling arbitrary bytes fails in arbitrary ways
        first_line = (str(exc).strip().splitlines() or [""])[0]
        raise UserError(f"{path}: not a loadable weights-only torch checkpoint "
                        f"({type(exc).__name__}: {first_line})") from exc


def extract_state_dict(obj: Any, source: str = "checkpoint") -> tuple[dict[str, Tensor], list[str]]:
    """The backbone's tensors from a checkpoint object, and the keys left out as not backbone.

    Descends `teacher`/`model`/`state_dict`/`module` containers, keeps the `teacher.` then
    `backbone.` sub-model when present, drops DDP/torch.compile prefixes and DINOv2's block chunking.
    """
    while isinstance(obj, Mapping) and not all(isinstance(v, Tensor) for v in obj.values()):
        nested = next((k for k in _NESTING_KEYS if isinstance(obj.get(k), Mapping)), None)
        if nested is None:
            raise UserError(f"{source}: no state dict found; top-level keys: {_list(sorted(map(str, obj)))}")
        obj = obj[nested]
    if not isinstance(obj, Mapping) or not obj:
        raise UserError(f"{source}: expected a non-empty mapping of tensors, got {type(obj).__name__}")
    sd = {_strip_wrappers(k): v for k, v in obj.items()}
    skipped: list[str] = []
    for prefix in _SUBMODEL_PREFIXES:
        if any(k.startswith(prefix) for k in sd):
            skipped += [k for k in sd if not k.startswith(prefix)]
            sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return {_CHUNKED_BLOCK.sub(r"blocks.\1", k): v for k, v in sd.items()}, skipped


def _strip_wrappers(key: str) -> str:
    key = key.replace("_orig_mod.", "")
    while key.startswith("module."):
        key = key[len("module."):]
    return key


def detect_format(sd: Mapping[str, Tensor]) -> str:
    """DINOv2 checkpoints always carry the iBOT mask token; timm never does."""
    dinov2_only = ("mask_token", "register_tokens")
    if any(k in sd for k in dinov2_only) or any(".mlp.w12." in k for k in sd):
        return "dinov2"
    return "timm"


def _is_square(n: int) -> bool:
    return n >= 0 and math.isqrt(n) ** 2 == n


def timm_to_ours(sd: Mapping[str, Tensor], vit: VisionTransformer) -> tuple[dict[str, Tensor], list[str]]:
    """Map a timm ViT state dict onto our names; also returns the keys timm has no counterpart for.

    timm adds a position to the CLS token either through pos_embed[0] (like us) or folded into
    cls_token (`no_embed_class`, its DINOv2-register models); register tokens get a position only in
    the former. Both are rewritten into our layout, where registers carry their own values.
    """
    out = {k: v for k, v in sd.items() if k not in ("pos_embed", "reg_token")}
    if vit.ffn == "swiglu":  # timm's SwiGLUPacked: fc1 is DINOv2's packed w12, fc2 is w3.
        out = {re.sub(r"\.mlp\.fc([12])\.", lambda m: ".mlp.w12." if m[1] == "1" else ".mlp.w3.", k): v
               for k, v in out.items()}
    regs = sd.get("reg_token")
    n_regs = 0 if regs is None else regs.shape[1]
    if "pos_embed" in sd:
        pos = sd["pos_embed"]
        n = pos.shape[1]
        with_prefix = _is_square(n - 1 - n_regs)
        if with_prefix and _is_square(n):  # ambiguous length: trust the model's own grid
            with_prefix = n - 1 - n_regs == vit.grid_size**2 or n != vit.grid_size**2
        if not (with_prefix or _is_square(n)):
            raise UserError(f"pos_embed of {n} entries fits no square patch grid with {n_regs} registers")
        if with_prefix:
            cls_pos, reg_pos, patch_pos = pos[:, :1], pos[:, 1 : 1 + n_regs], pos[:, 1 + n_regs :]
            if regs is not None:
                regs = regs + reg_pos
        else:
            cls_pos, patch_pos = torch.zeros_like(pos[:, :1]), pos
        out["pos_embed"] = torch.cat((cls_pos, patch_pos), dim=1)
    if regs is not None:
        out["register_tokens"] = regs
    return out, ["mask_token"]


def load_pretrained(
    vit: VisionTransformer,
    source: str | Path | Mapping[str, Any],
    format: str = "auto",
    *,
    strict: bool = True,
) -> LoadReport:
    """Load DINOv2-format or timm-format weights into `vit` (in place) and report what happened.

    A missing or unexpected key, or a shape that differs, raises UserError unless `strict=False`
    (then the rest loads and the report, logged as a warning, lists what did not). The position
    embedding is resampled to the model's grid when the checkpoint's differs (e.g. DINOv2 hub 518 px).
    """
    if format not in FORMATS:
        raise UserError(f"unknown weights format {format!r}; valid: {', '.join(FORMATS)}")
    name = str(source) if isinstance(source, str | Path) else "state dict"
    obj = read_checkpoint(source) if isinstance(source, str | Path) else source
    sd, skipped = extract_state_dict(obj, name)
    fmt = detect_format(sd) if format == "auto" else ("dinov2" if format == "ours" else format)
    kept_init: list[str] = []
    if fmt == "timm":
        sd, kept_init = timm_to_ours(sd, vit)
    report = LoadReport(source=name, format=fmt, skipped=skipped)

    own = vit.state_dict()
    if "pos_embed" in sd and sd["pos_embed"].shape[1] != own["pos_embed"].shape[1]:
        old = tuple(sd["pos_embed"].shape)
        grid = (vit.grid_size, vit.grid_size)
        try:
            patch_pos = resample_patch_pos_embed(sd["pos_embed"][:, 1:], grid, offset=vit.interpolate_offset,
                                                 antialias=vit.interpolate_antialias)
        except ValueError as exc:
            raise UserError(f"{name}: pos_embed {list(old)}: {exc}") from exc
        sd["pos_embed"] = torch.cat((sd["pos_embed"][:, :1], patch_pos), dim=1)
        report.resized["pos_embed"] = (old, tuple(sd["pos_embed"].shape))
    report.kept_init = [k for k in kept_init if k in own and k not in sd]
    report.missing = sorted(k for k in own if k not in sd and k not in report.kept_init)
    report.unexpected = sorted(k for k in sd if k not in own)
    bad_shapes = [f"{k} {list(sd[k].shape)} vs model {list(own[k].shape)}"
                  for k in sd if k in own and sd[k].shape != own[k].shape]
    comparable = {k: v for k, v in own.items() if k not in report.kept_init}
    if bad_shapes:
        raise WeightsMismatchError(f"{name}: shapes differ from the model: {_list(bad_shapes)}",
                                   first_mismatch(comparable, sd) or bad_shapes[0])
    if not report.complete:
        message = (f"{report.summary()}. The checkpoint does not match the architecture (check arch, "
                   "patch_size, ffn, layerscale_init, num_register_tokens)")
        if strict:
            raise WeightsMismatchError(
                message + "; refusing a partial load (strict=False loads the matching keys)",
                first_mismatch(comparable, sd) or report.summary())
        log.warning(message)
    matched = {k: v for k, v in sd.items() if k in own}
    vit.load_state_dict(matched, strict=False)
    report.loaded = sorted(matched)
    log.info("loaded weights: %s", report.summary())
    return report


def to_dinov2_state_dict(vit: VisionTransformer) -> dict[str, Tensor]:
    """DINOv2 hub-format state dict (our names are DINOv2's), detached CPU copies."""
    return {k: v.detach().to("cpu", copy=True) for k, v in vit.state_dict().items()}


def to_timm_state_dict(vit: VisionTransformer) -> dict[str, Tensor]:
    """State dict for a timm `VisionTransformer` built with `timm_model_kwargs(vit)`.

    With registers this is timm's DINOv2-register layout (`no_embed_class`): the CLS position is
    folded into cls_token and pos_embed covers the patches only.
    """
    sd = to_dinov2_state_dict(vit)
    del sd["mask_token"]
    if vit.ffn == "swiglu":
        sd = {k.replace(".mlp.w12.", ".mlp.fc1.").replace(".mlp.w3.", ".mlp.fc2."): v for k, v in sd.items()}
    if vit.num_register_tokens:
        sd["reg_token"] = sd.pop("register_tokens")
        pos = sd["pos_embed"]
        sd["cls_token"] = sd["cls_token"] + pos[:, :1]
        sd["pos_embed"] = pos[:, 1:].clone()
    return sd


def timm_model_kwargs(vit: VisionTransformer) -> dict[str, Any]:
    """Keyword arguments of `timm.models.vision_transformer.VisionTransformer` for the same network."""
    block = vit.blocks[0]
    kwargs: dict[str, Any] = {
        "img_size": vit.img_size,
        "patch_size": vit.patch_size,
        "embed_dim": vit.embed_dim,
        "depth": vit.n_blocks,
        "num_heads": vit.num_heads,
        "qkv_bias": block.attn.qkv.bias is not None,
        "init_values": vit.layerscale_init,
        "reg_tokens": vit.num_register_tokens,
        "no_embed_class": vit.num_register_tokens > 0,
        "class_token": True,
        "global_pool": "token",
        "num_classes": 0,
        "dynamic_img_size": True,
    }
    if vit.ffn == "swiglu":
        kwargs.update(mlp_layer=import_timm().layers.SwiGLUPacked, act_layer=torch.nn.SiLU,
                      mlp_ratio=block.mlp.w12.out_features / vit.embed_dim)
    else:
        kwargs["mlp_ratio"] = block.mlp.fc1.out_features / vit.embed_dim
    return kwargs
