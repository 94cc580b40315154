"""Backbones by the names people type, offline: `local-dir:PATH` (timm's save_for_hf layout) and
`hf-hub:ORG/NAME` from the local Hugging Face cache, with the pathology presets; tiny random-weight models."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from dinov2_patho.backbones.hub import PRESETS, normalisation
from dinov2_patho.backbones.load import load_backbone
from dinov2_patho.backbones.preprocess import IMAGENET_MEAN
from dinov2_patho.cli import main
from dinov2_patho.curation import embed as embed_mod
from dinov2_patho.data.folders import tile_index_dir
from dinov2_patho.errors import UserError
from dinov2_patho.models.weights import import_timm

TINY = {"depth": 2, "embed_dim": 32, "num_heads": 2}


def save_tiny(folder: Path, seed: int = 0, **extra) -> torch.nn.Module:
    """A random tiny timm ViT saved by timm itself (save_for_hf, safetensors)."""
    timm = import_timm()  # first: it filters torchvision's warning on a CPU torch
    from timm.models._hub import save_for_hf

    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, **TINY, **extra)
    save_for_hf(model, str(folder), model_args=TINY, safe_serialization=True)
    return model.eval()


def test_local_dir_builds_the_saved_model_with_its_weights(tmp_path):
    saved = save_tiny(tmp_path / "tiny")
    loaded = load_backbone(None, f"local-dir:{tmp_path / 'tiny'}")
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(loaded.forward_features(x), saved.forward_features(x))
    assert normalisation(loaded) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # timm's saved pretrained_cfg


def fake_hub_cache(cache: Path, repo: str, folder: Path) -> None:
    """The layout huggingface_hub keeps: models--ORG--NAME/{refs/main, snapshots/<commit>/...}."""
    commit = "0" * 40
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in folder.iterdir():
        os.symlink(f, snapshot / f.name)


def test_hf_hub_reads_the_local_cache_and_applies_the_preset(tmp_path, monkeypatch):
    import huggingface_hub.constants

    saved = save_tiny(tmp_path / "tiny", init_values=1e-5)
    config = json.loads((tmp_path / "tiny" / "config.json").read_text())
    del config["model_args"]["init_values"]  # as a published config.json without the card's kwargs
    (tmp_path / "tiny" / "config.json").write_text(json.dumps(config))
    fake_hub_cache(tmp_path / "hub", "bioptimus/H-optimus-0", tmp_path / "tiny")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    loaded = load_backbone(None, "hf-hub:bioptimus/H-optimus-0")  # init_values from the preset, or no fit
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(loaded.forward_features(x), saved.forward_features(x))
    preset = PRESETS["bioptimus/h-optimus-0"]
    assert normalisation(loaded) == (preset.mean, preset.std) != normalisation(torch.nn.Identity())


def test_a_model_missing_from_the_cache_names_it_and_how_to_fetch_it(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    with pytest.raises(UserError) as e:
        load_backbone(None, "hf-hub:MahmoodLab/UNI2-h")
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and "MahmoodLab/UNI2-h" in msg
    assert "huggingface-cli download MahmoodLab/UNI2-h" in msg


def test_local_dir_without_weights_is_one_line(tmp_path):
    save_tiny(tmp_path / "tiny")
    (tmp_path / "tiny" / "model.safetensors").unlink()
    with pytest.raises(UserError, match="has none of model.safetensors, pytorch_model.bin"):
        load_backbone(None, f"local-dir:{tmp_path / 'tiny'}")


def test_curate_embed_with_a_model_saved_by_timm(cohort, tmp_path):
    slides = tmp_path / "slides"
    slides.mkdir()
    sid = cohort.slide_ids[0]
    os.symlink(cohort.slide_path(sid), slides / cohort.slide_path(sid).name)
    tiles = tmp_path / "tiles"
    assert main(["curate", "tiles", "--slides", str(slides), "--out", str(tiles), "--no-progress"]) == 0
    saved = save_tiny(tmp_path / "tiny")
    emb = tmp_path / "emb"
    assert main(["curate", "embed", "--tiles", str(tiles), "--out", str(emb), "--arch",
                 f"local-dir:{tmp_path / 'tiny'}", "--no-progress", "embed.batch_size=32"]) == 0
    matrix = np.load(emb / "embeddings.npy")
    manifest = json.loads((emb / "manifest.json").read_text())
    assert matrix.shape[1] == 32 and manifest["settings"]["tiles"]["normalisation"]["mean"] == [0.5] * 3
    assert manifest["settings"]["tiles"]["normalisation"]["mean"] != list(IMAGENET_MEAN)
    tile, _ = embed_mod.tile_dataset(tile_index_dir(tiles), str(slides), None, {})[0]
    x = (tile.float()[None] / 255 - 0.5) / 0.5  # the saved config's normalisation
    with torch.no_grad():
        cls = saved.forward_features(x)[0, 0].numpy()
    np.testing.assert_allclose(matrix[0].astype(np.float32), cls, rtol=1e-2, atol=1e-2)


def test_train_init_takes_hub_names(tmp_path, monkeypatch):
    from dinov2_patho.backbones.hub import saved_weights
    from dinov2_patho.train.config import load_train_config

    monkeypatch.chdir(tmp_path)
    save_tiny(tmp_path / "tiny")
    local = load_train_config(overrides=["student.pretrained_weights=local-dir:tiny"])
    local = local.student.pretrained_weights
    assert local == f"local-dir:{tmp_path / 'tiny'}"  # made absolute inside the name, not before it
    hub = load_train_config(overrides=["student.pretrained_weights=hf-hub:MahmoodLab/UNI"])
    assert hub.student.pretrained_weights == "hf-hub:MahmoodLab/UNI"
    assert saved_weights(local) == tmp_path / "tiny" / "model.safetensors"
