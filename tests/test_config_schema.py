"""Configs carry a schema version; an older run's config (a resume, a SLURM requeue) is migrated."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from dinov2_patho.config_files import ConfigError
from dinov2_patho.train.config import load_train_config
from dinov2_patho.train.config_schema import KEY, RENAMED, SCHEMA_VERSION
from dinov2_patho.train.config_values import check_resume_config

SMOKE = Path(__file__).parents[1] / "configs" / "train" / "cpu_smoke.yaml"


def today(tmp_path: Path) -> dict:
    """A run's resolved config as this code saves it (config.yaml, the checkpoint's, a SLURM job's)."""
    return OmegaConf.to_container(load_train_config(SMOKE, [f"data.index={tmp_path}",
                                                            f"data.subset={tmp_path / 's.npy'}"]))


def written_before(cfg: dict, renamed: set[str]) -> dict:
    """`cfg` as schema 1 wrote it: no schema_version, these of RENAMED[2]'s keys under their old names."""
    old = OmegaConf.to_container(OmegaConf.create(cfg))
    del old[KEY]
    for old_key, new_key in RENAMED[2].items():
        if new_key in renamed:
            value = OmegaConf.select(OmegaConf.create(old), new_key)
            section, leaf = new_key.split(".")
            del old[section][leaf]
            old_section, old_leaf = old_key.split(".")
            old[old_section][old_leaf] = value
    return old


def test_a_run_saves_its_schema(tmp_path):
    assert today(tmp_path)[KEY] == SCHEMA_VERSION


@settings(max_examples=10, deadline=None)
@given(renamed=st.sets(st.sampled_from(sorted(RENAMED[2].values()))))
def test_an_older_runs_config_migrates_to_the_same_config(tmp_path_factory, renamed):
    tmp_path = tmp_path_factory.mktemp("cfg")
    cfg = today(tmp_path)
    old = written_before(cfg, renamed)
    path = tmp_path / "config.yaml"
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(old)))
    for given_as in (path, OmegaConf.create(old)):  # a resume's --config-file, a requeued job's dict
        assert OmegaConf.to_container(load_train_config(given_as, source="job 7")) == cfg


def test_the_migration_is_one_line_saying_what_it_did(tmp_path, caplog):
    path = tmp_path / "config.yaml"
    old = written_before(today(tmp_path), set(RENAMED[2].values()))
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(old)))
    with caplog.at_level(logging.WARNING):
        load_train_config(path)
    lines = [r.getMessage() for r in caplog.records if "config schema" in r.getMessage()]
    assert lines == [f"{path}: config schema 1 -> {SCHEMA_VERSION}: renamed "
                     + ", ".join(f"{old} -> {new}" for old, new in RENAMED[2].items())]


def test_keys_that_no_longer_exist_are_named_in_one_line(tmp_path):
    old = written_before(today(tmp_path), set())
    old[KEY] = 1
    old["train"]["gone"], old["data"]["also_gone"] = 1, 2
    gone = rf"^job 3: written under config schema 1 \(this is {SCHEMA_VERSION}\); these keys no longer exist:"
    with pytest.raises(ConfigError, match=gone + r" data.also_gone, train.gone$"):
        load_train_config(OmegaConf.create(old), source="job 3")


def test_a_newer_schema_is_refused(tmp_path):
    cfg = today(tmp_path)
    cfg[KEY] = SCHEMA_VERSION + 1
    with pytest.raises(ConfigError, match=f"config schema {SCHEMA_VERSION + 1}, newer than"):
        load_train_config(OmegaConf.create(cfg), source="job 4")


def test_a_checkpoints_older_config_is_compared_under_its_new_names(tmp_path):
    cfg = today(tmp_path)
    saved = written_before(cfg, {"sampler.pseudo_epoch_samples"})
    saved["train"]["pseudo_epoch_length"] += 1  # the run was made with another pseudo-epoch
    with pytest.raises(ConfigError, match=r"sampler.pseudo_epoch_samples would break exact resume"):
        check_resume_config(saved, OmegaConf.create(cfg), "ckpt", force=False)
