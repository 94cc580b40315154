"""A frozen backbone from a checkpoint on disk: ours, DINOv2 hub format or a timm ViT
(all loaded into our ViT by `load_pretrained`), or any timm model by name (`timm/<name>`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from dinov2_patho.errors import UserError
from dinov2_patho.logging import get_logger

log = get_logger(__name__)

TIMM_PREFIX = "timm/"


def load_backbone(path: str | Path | None, arch: str = "vit_small", weights_format: str = "auto",
                  **model_kwargs: Any) -> nn.Module:
    """`arch` is one of our backbones (`vit_small`, ...; `model_kwargs` go to `build_backbone`)
    or `timm/<model name>`. `path=None` keeps the random initialisation (a baseline)."""
    if arch.startswith(TIMM_PREFIX):
        import timm

        try:
            model = timm.create_model(arch[len(TIMM_PREFIX):], pretrained=False, num_classes=0,
                                      **model_kwargs)
        except RuntimeError as e:  # timm's unknown-model error
            raise UserError(f"backbone arch {arch!r}: {e}") from e
        if path is not None:
            if not Path(path).is_file():
                raise UserError(f"{path}: checkpoint not found")
            timm.models.load_checkpoint(model, str(path), strict=True)
    else:
        from dinov2_patho.models import build_backbone, load_pretrained

        try:
            model = build_backbone(arch, **model_kwargs)
        except KeyError as e:
            raise UserError(f"backbone arch: {e.args[0]}") from e
        if path is not None:
            load_pretrained(model, path, format=weights_format)
    if path is None:
        log.warning("backbone %s: no weights given, evaluating a random initialisation", arch)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()
