import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

import pytest
from omegaconf import MISSING, OmegaConf

from dinov2_patho.cli import COMMANDS, main
from dinov2_patho.config_files import ConfigError, merge_structured
from dinov2_patho.io import atomic_path, atomic_write_text
from dinov2_patho.registry import Registry


@dataclass
class Train:
    batch_size_per_gpu: int = 4
    lr: float | None = 0.1


@dataclass
class Model:
    arch: str = "vit_small"


@dataclass
class Data:
    index: str = MISSING


@dataclass
class WithData:
    data: Data = field(default_factory=Data)


@dataclass
class Defaults:
    train: Train = field(default_factory=Train)
    sampler: dict[str, Any] = field(default_factory=lambda: {"name": "uniform"})
    model: Model = field(default_factory=Model)


def load(config_file=None, overrides=(), open_keys=(), schema=Defaults):
    return merge_structured(schema, "train", config_file, overrides, open_keys)


def test_overrides_merge_over_file_over_defaults(tmp_path):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("train:\n  batch_size_per_gpu: 8\n")
    cfg = load(cfg_file, ["train.lr=0.5"])
    assert cfg.train.batch_size_per_gpu == 8
    assert cfg.train.lr == 0.5
    assert cfg.model.arch == "vit_small"
    cfg = load(cfg_file, ["train.batch_size_per_gpu=16"])
    assert cfg.train.batch_size_per_gpu == 16


def test_unknown_key_names_key_and_closest(tmp_path):
    # the suggestion is the full key, as it is typed
    with pytest.raises(ConfigError, match=r"'train.batch_size_per_gp'.*mean 'train.batch_size_per_gpu'\?"):
        load(None, ["train.batch_size_per_gp=8"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("modle:\n  arch: vit_large\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key 'modle'.*'model'"):
        load(bad)


def test_open_keys_accept_new_options():
    cfg = load(None, ["sampler.level=4"], open_keys=["sampler"])
    assert cfg.sampler.level == 4
    with pytest.raises(ConfigError):
        load(None, ["sampler.level=4"])


def test_missing_values_can_be_set_and_must_be():
    assert load(None, ["data.index=/x"], schema=WithData).data.index == "/x"
    with pytest.raises(ConfigError, match="unknown key 'data.indx'"):
        load(None, ["data.indx=/x"], schema=WithData)


def test_a_config_files_missing_value_must_be_set_below_it(tmp_path):
    # a merge keeps the default under a ???: without the check the recipe would run on it silently
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("train:\n  lr: ???\n")
    with pytest.raises(ConfigError, match=r"^train.lr is required by .*recipe.yaml: set train.lr=\.\.\."):
        load(recipe)
    assert load(recipe, ["train.lr=0.5"]).train.lr == 0.5
    assert load(recipe, ["train.lr=null"]).train.lr is None  # an explicit choice


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not of the form"):
        load(None, ["train.lr"])
    with pytest.raises(ConfigError, match="does not exist"):
        load(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError, match="broken.yaml: cannot parse"):
        load(broken)


def test_registry_errors_suggest():
    reg = Registry("sampler")
    reg.register("cluster_stratified")(lambda **kw: kw)
    assert reg.build("cluster_stratified", a=1) == {"a": 1}
    with pytest.raises(KeyError, match="did you mean 'cluster_stratified'"):
        reg.get("cluster_stratifed")
    with pytest.raises(ValueError, match="twice"):
        reg.register("cluster_stratified")(lambda: None)


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "state.yaml"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.yaml"]


def test_cli_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


def test_every_command_module_exposes_the_protocol():
    import importlib

    for name, (module, _) in COMMANDS.items():
        mod = importlib.import_module(module)
        assert callable(mod.add_arguments), name
        assert callable(mod.run), name


def test_python_m_and_mapped_packages_import():
    # timm as the package imports it: nothing on stderr (on the CPU wheel, torchvision's image-extension
    # warning would be four lines there)
    imports = ("import dinov2_patho.samplers, dinov2_patho.eval, dinov2_patho.configs; "
               "from dinov2_patho.models.weights import import_timm; import_timm()")
    out = subprocess.run([sys.executable, "-c", imports], capture_output=True, text=True)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    out = subprocess.run([sys.executable, "-m", "dinov2_patho", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "COMMAND" in out.stdout


def test_packaged_configs_are_valid_yaml():
    from importlib import resources

    root = resources.files("dinov2_patho.configs")
    paths = [p for sub in root.iterdir() if sub.is_dir() for p in sub.iterdir() if p.name.endswith(".yaml")]
    for path in paths:
        assert isinstance(OmegaConf.load(str(path)), OmegaConf.create({}).__class__), path
