"""Backbones by the names people type, resolved offline (nothing is downloaded here):

    local-dir:PATH     a folder in timm's `save_for_hf` layout: config.json (`architecture`, `model_args`,
                       `pretrained_cfg` with the model's `mean` / `std`) and model.safetensors (or
                       pytorch_model.bin, read with weights_only)
    hf-hub:ORG/NAME    that folder from the local Hugging Face cache (HF_HOME / HF_HUB_CACHE)

A preset, by hub repo, adds what an encoder's model card says its config.json does not: extra timm
kwargs, its normalisation and the token recipe of its embedding. The model built carries its
normalisation (`pixel_normalisation`) for the feature engines; the recipe is the `token` to set.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from dinov2_patho.backbones.preprocess import IMAGENET_MEAN, IMAGENET_STD
from dinov2_patho.errors import UserError
from dinov2_patho.logging import get_logger

log = get_logger(__name__)

LOCAL_DIR, HF_HUB = "local-dir:", "hf-hub:"
WEIGHTS = ("model.safetensors", "pytorch_model.bin")


@dataclass(frozen=True)
class Preset:
    timm_kwargs: dict[str, Any] = field(default_factory=dict)  # layer classes by name: see _LAYERS
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    token: str = "cls"


_UNI2_H = {"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5,
           "embed_dim": 1536, "mlp_ratio": 2.66667 * 2, "num_classes": 0, "no_embed_class": True,
           "mlp_layer": "SwiGLUPacked", "act_layer": "SiLU", "reg_tokens": 8, "dynamic_img_size": True}
_H_OPTIMUS = Preset({"init_values": 1e-5, "dynamic_img_size": False},
                    (0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))
PRESETS: dict[str, Preset] = {  # hub repo id, lower case
    # huggingface.co/MahmoodLab/UNI model card: init_values=1e-5, dynamic_img_size=True; ImageNet; CLS
    "mahmoodlab/uni": Preset({"init_values": 1e-5, "dynamic_img_size": True}),
    # huggingface.co/MahmoodLab/UNI2-h model card: the timm_kwargs it lists; ImageNet; CLS
    "mahmoodlab/uni2-h": Preset(_UNI2_H),
    # huggingface.co/paige-ai/Virchow2 model card: SwiGLUPacked, SiLU; ImageNet; CLS concatenated with the
    # mean of the patch tokens (register tokens left out: our patch_mean skips num_prefix_tokens)
    "paige-ai/virchow2": Preset({"mlp_layer": "SwiGLUPacked", "act_layer": "SiLU"}, token="cls+patch_mean"),
    # huggingface.co/paige-ai/Virchow model card: as Virchow2, without registers
    "paige-ai/virchow": Preset({"mlp_layer": "SwiGLUPacked", "act_layer": "SiLU"}, token="cls+patch_mean"),
    # huggingface.co/bioptimus/H-optimus-0 and H-optimus-1 model cards: init_values=1e-5,
    # dynamic_img_size=False; their own mean / std; CLS
    "bioptimus/h-optimus-0": _H_OPTIMUS,
    "bioptimus/h-optimus-1": _H_OPTIMUS,
}


def _layer(name: str) -> type:
    import torch

    from dinov2_patho.models.weights import import_timm

    layers = {"SwiGLUPacked": import_timm().layers.SwiGLUPacked, "SiLU": torch.nn.SiLU}
    return layers[name]


def is_hub_name(arch: str) -> bool:
    return arch.startswith((LOCAL_DIR, HF_HUB))


def resolve_folder(arch: str) -> tuple[Path, str | None]:
    """The local folder of `arch`, and its hub repo id (None for local-dir)."""
    if arch.startswith(LOCAL_DIR):
        return Path(arch[len(LOCAL_DIR):]).expanduser(), None
    repo = arch[len(HF_HUB):]
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo, local_files_only=True)), repo
    except (LocalEntryNotFoundError, OSError, ValueError) as e:
        raise UserError(f"backbone {arch}: {repo} is not in the local Hugging Face cache "
                        f"({type(e).__name__}); fetch it once where there is network with "
                        f"`huggingface-cli download {repo}` (gated models: accept the licence on its page "
                        "and `huggingface-cli login` first), or point HF_HOME at a cache that has it") from e


def saved_weights(arch: str, folder: Path | None = None) -> Path:
    """The weights file of `arch`'s folder (model.safetensors first): `student.pretrained_weights` may be
    local-dir:PATH or hf-hub:ORG/NAME too."""
    folder = resolve_folder(arch)[0] if folder is None else folder
    saved = [folder / w for w in WEIGHTS if (folder / w).is_file()]
    if not saved:
        raise UserError(f"backbone {arch}: {folder} has none of {', '.join(WEIGHTS)}")
    return saved[0]


def build_hub_backbone(arch: str, path: str | Path | None, **model_kwargs: Any) -> nn.Module:
    """The timm model of `arch` (local-dir:PATH or hf-hub:ORG/NAME) with its saved weights; `path`, where
    given, is another weights file for it. `model_kwargs` go to timm over the preset's kwargs."""
    from dinov2_patho.models import weights
    from dinov2_patho.models.weights import import_timm

    folder, repo = resolve_folder(arch)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise UserError(f"backbone {arch}: {folder} has no config.json (want timm's save_for_hf layout: "
                        "config.json and model.safetensors)")
    try:
        config = json.loads(config_file.read_text())
        architecture = config["architecture"]
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{config_file}: not a timm model config (no 'architecture': {e})") from e
    known = PRESETS.get((repo or "").lower())
    preset = known or Preset()
    kwargs = {**config.get("model_args", {}), **preset.timm_kwargs, **model_kwargs, "num_classes": 0}
    kwargs = {k: _layer(v) if k in ("mlp_layer", "act_layer") and isinstance(v, str) else v
              for k, v in kwargs.items()}
    timm = import_timm()
    try:
        model = timm.create_model(architecture, pretrained=False, **kwargs)
    except (RuntimeError, TypeError) as e:
        raise UserError(f"backbone {arch}: timm cannot build {architecture!r}: {e}") from e
    weights_file = Path(path) if path is not None else saved_weights(arch, folder)
    state = weights.extract_state_dict(weights.read_checkpoint(weights_file), str(weights_file))[0]
    state = {k: v for k, v in state.items() if not k.startswith("head.")}  # a classifier: unused here
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = weights.first_mismatch(model.state_dict(), state) or str(e).strip().splitlines()[0]
        raise UserError(f"{weights_file}: does not fit {architecture} ({arch}): {first}") from e
    saved_cfg = config.get("pretrained_cfg", {})  # a preset's model card outranks what the config says
    mean, std = (preset.mean, preset.std) if known else (saved_cfg.get("mean", IMAGENET_MEAN),
                                                         saved_cfg.get("std", IMAGENET_STD))
    model.pixel_normalisation = (tuple(map(float, mean)), tuple(map(float, std)))
    model.token_recipe = preset.token if known else None
    return model


def normalisation(backbone: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) the backbone's inputs are normalised with: its own where it says, else ImageNet's."""
    return getattr(backbone, "pixel_normalisation", (IMAGENET_MEAN, IMAGENET_STD))


def check_token(backbone: nn.Module, token: str, key: str) -> None:
    """A warning where the configured token is not the encoder's own recipe (its model card's)."""
    recipe = getattr(backbone, "token_recipe", None)
    if recipe is not None and recipe != token:
        log.warning("%s=%s, but this encoder's embedding is %s (its model card): set %s=%s to match",
                    key, token, recipe, key, recipe)
