"""Defaults have one home: configs/train/default.yaml for crops, augmentation and data, the
options dataclasses of samplers/build.py for sampler options. Python reads them, never repeats them."""

from __future__ import annotations

import dataclasses

from dinov2_patho import config_files
from dinov2_patho.data.augment import AugmentConfig, MultiCropAugmentation
from dinov2_patho.data.dataset import build_tile_source
from dinov2_patho.samplers.build import OPTIONS
from dinov2_patho.train.config import load_train_config


def test_python_follows_the_packaged_yaml(monkeypatch, tmp_path):
    changed = config_files._packaged_yaml("train/default.yaml").copy()
    changed.augmentation.hue = 0.3
    changed.crops.local_crops_number = 3
    changed.data.cache_size = 5
    monkeypatch.setattr(config_files, "_packaged_yaml", lambda relpath: changed)
    aug = AugmentConfig.defaults()
    assert (aug.hue, aug.local_crops_number) == (0.3, 3)
    assert MultiCropAugmentation.from_config({}).config == aug
    assert build_tile_source({"backend": "hdf5", "tile_store": str(tmp_path)}).cache.size == 5
    assert all(f.default is dataclasses.MISSING for f in dataclasses.fields(AugmentConfig))


def test_the_train_yaml_leaves_sampler_defaults_to_the_sampler():
    assert set(load_train_config().sampler) == {"name"}
    assert all(f.default == 0 for f in dataclasses.fields(OPTIONS["uniform"]) if f.name == "seed")
