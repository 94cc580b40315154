"""Defaults have one home: the dataclass of each config section (CropsConfig, AugmentationConfig,
DataConfig, ... beside the code that reads them; the options dataclasses of samplers/build.py for
sampler options). Python reads them, never repeats them."""

from __future__ import annotations

import contextlib
import dataclasses
import io

from omegaconf import OmegaConf

from dinov2_patho.data import augment, dataset
from dinov2_patho.data.augment import AugmentConfig, MultiCropAugmentation
from dinov2_patho.data.dataset import build_tile_source
from dinov2_patho.samplers.build import OPTIONS
from dinov2_patho.train.config import TrainConfig, load_train_config


@dataclasses.dataclass
class Augmentation(augment.AugmentationConfig):
    hue: float = 0.3


@dataclasses.dataclass
class Crops(augment.CropsConfig):
    local_crops_number: int = 3


@dataclasses.dataclass
class Data(dataset.DataConfig):
    cache_size: int = 5


def test_python_follows_the_section_dataclasses(monkeypatch, tmp_path):
    monkeypatch.setattr(augment, "AugmentationConfig", Augmentation)
    monkeypatch.setattr(augment, "CropsConfig", Crops)
    monkeypatch.setattr(dataset, "DataConfig", Data)
    aug = AugmentConfig.defaults()
    assert (aug.hue, aug.local_crops_number) == (0.3, 3)
    assert MultiCropAugmentation.from_config({}).config == aug
    assert build_tile_source({"backend": "hdf5", "tile_store": str(tmp_path)}).cache.size == 5
    assert all(f.default is dataclasses.MISSING for f in dataclasses.fields(AugmentConfig))


def test_the_train_config_is_its_dataclasses_defaults():
    defaults = OmegaConf.to_container(OmegaConf.structured(TrainConfig))
    assert OmegaConf.to_container(load_train_config()) == defaults


def test_the_train_config_leaves_sampler_defaults_to_the_sampler():
    assert set(load_train_config().sampler) == {"name"}
    assert all(f.default == 0 for f in dataclasses.fields(OPTIONS["uniform"]) if f.name == "seed")


def test_train_print_config_shows_every_key_and_the_output_dir_is_still_required(capsys):
    from dinov2_patho.cli import main

    smoke = "configs/train/cpu_smoke.yaml"
    assert main(["train", "--print-config", "--config-file", smoke, "train.iterations=7"]) == 0
    printed = OmegaConf.create(capsys.readouterr().out)
    expected = load_train_config(smoke, ["train.iterations=7"])
    assert OmegaConf.to_container(printed) == OmegaConf.to_container(expected)
    assert set(printed) == {f.name for f in dataclasses.fields(TrainConfig)}
    assert main(["train", "--config-file", smoke]) == 2
    assert "error: the following arguments are required: --output-dir" in capsys.readouterr().err


def test_eval_print_config_shows_every_key():
    from dinov2_patho.cli import main
    from dinov2_patho.eval.runner import eval_config
    from dinov2_patho.eval.slide.runner import slide_config

    knn, task = eval_config({"heads": {"knn": {"k": [20]}}}), slide_config({"tasks": ["synthetic"]})
    for command, merged in ((["eval", "run", "heads.knn.k=[20]"], knn),
                            (["eval", "slide", "--tasks", "synthetic"], task)):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert main([*command, "--print-config"]) == 0
        assert OmegaConf.to_container(OmegaConf.create(out.getvalue())) == OmegaConf.to_container(merged)
