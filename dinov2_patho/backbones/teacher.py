"""A training run's teacher backbone: rebuilt from a checkpoint (`teacher_backbone`, what evaluation and
`curate embed` load for a run directory), or exported for downstream use (`export_teacher`, the
`dinov2-patho export` command).

    dinov2-patho export --checkpoint RUN_DIR_OR_CHECKPOINT --output-dir OUT [--format dinov2 timm]

writes `OUT/teacher_backbone_dinov2.pth` (DINOv2 hub layout: loads into our ViT and into
`torch.hub.load("facebookresearch/dinov2", ...)` models of the same size) and
`OUT/teacher_backbone_timm.pth` with `OUT/timm_model_kwargs.json` (the keyword arguments
of `timm.models.vision_transformer.VisionTransformer` that take these weights; a class,
such as SwiGLU's `mlp_layer`, is written as its import path, e.g. "timm.layers.SwiGLUPacked").
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dinov2_patho import checkpoint_files as ckpt
from dinov2_patho.io import atomic_path, atomic_write_text
from dinov2_patho.logging import get_logger
from dinov2_patho.models import load_pretrained, to_dinov2_state_dict, to_timm_state_dict
from dinov2_patho.models.student import build_student_backbone
from dinov2_patho.models.weights import timm_model_kwargs

log = get_logger(__name__)

FORMATS = ("dinov2", "timm")
TEACHER_PREFIX = "teacher.backbone."


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or the latest one of a run directory / its checkpoints/."""
    path = Path(path)
    if (path / ckpt.SHARED_FILE).is_file():
        return path
    for root in (path / ckpt.CHECKPOINTS, path):
        latest = ckpt.find_latest(root)
        if latest is not None:
            return latest
    raise ckpt.CheckpointError(f"{path}: neither a checkpoint (iter_N/{ckpt.SHARED_FILE}) nor a run "
                               f"directory holding one")


def teacher_backbone(checkpoint: str | Path) -> torch.nn.Module:
    """The teacher backbone of a checkpoint, rebuilt from the config saved with it."""
    path = resolve_checkpoint(checkpoint)
    # mmap: the optimizer's tensors stay unread
    state = ckpt.load_file(path / ckpt.SHARED_FILE, (*ckpt.SHARED_KEYS, "config"))
    try:  # a file of ours holds a full train config and a state dict; anything else is not ours
        cfg = OmegaConf.create(state["config"])
        cfg.student.drop_path_rate = 0.0
        cfg.student.pretrained_weights = None
        weights = {k[len(TEACHER_PREFIX):]: v for k, v in state["model"].items()
                   if k.startswith(TEACHER_PREFIX)}
        vit = build_student_backbone(cfg) if weights else None
    except (AttributeError, KeyError, TypeError, ValueError, OmegaConfBaseException) as e:
        why = (str(e).splitlines() or [""])[0]  # omegaconf's messages run over several lines
        raise ckpt.CheckpointError(f"{path / ckpt.SHARED_FILE}: not a training checkpoint of ours (its "
                                   f"config or model does not build: {type(e).__name__}: {why})") from None
    if vit is None:
        raise ckpt.CheckpointError(f"{path / ckpt.SHARED_FILE} holds no {TEACHER_PREFIX}* weights")
    load_pretrained(vit, weights, format="ours")
    log.info("teacher backbone of %s (iteration %d)", path, int(state["iteration"]))
    return vit.eval()


def export_teacher(checkpoint: str | Path, output_dir: str | Path,
                   formats: tuple[str, ...] = FORMATS) -> dict[str, Path]:
    vit = teacher_backbone(checkpoint)
    output_dir = Path(output_dir)
    written: dict[str, Path] = {}
    if "dinov2" in formats:
        written["dinov2"] = output_dir / "teacher_backbone_dinov2.pth"
        with atomic_path(written["dinov2"]) as tmp:
            torch.save(to_dinov2_state_dict(vit), tmp)
    if "timm" in formats:
        written["timm"] = output_dir / "teacher_backbone_timm.pth"
        with atomic_path(written["timm"]) as tmp:
            torch.save(to_timm_state_dict(vit), tmp)
        written["timm_kwargs"] = output_dir / "timm_model_kwargs.json"
        kwargs = {k: f"{v.__module__}.{v.__qualname__}" if isinstance(v, type) else v
                  for k, v in timm_model_kwargs(vit).items()}
        atomic_write_text(written["timm_kwargs"], json.dumps(kwargs, indent=1))
    return written
