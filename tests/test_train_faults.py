"""Faults while training: slides that become unreadable mid-run (counted, then a limit stops the
run naming them), a full disk while writing a checkpoint, a corrupted latest checkpoint."""

from __future__ import annotations

import errno
import os

import pytest
import torch
from test_train import _patch_step, tiny_cfg

from dinov2_patho.config_files import ConfigError
from dinov2_patho.data.readers import TileReadError
from dinov2_patho.train import trainer as trainer_mod
from dinov2_patho.train.checkpoint import CheckpointError, find_latest, iteration_of
from dinov2_patho.train.config import validate_config


def test_slides_unreadable_mid_run_are_substituted_until_max_skipped(cohort, cohort_index, tmp_path,
                                                                     monkeypatch):
    broken = sorted({cohort_index.tile(r)[0] for r in range(len(cohort_index))})[:3]
    state = {"broken": False}
    real_build = trainer_mod.build_tile_source

    class BreaksMidRun:
        def __init__(self, inner):
            self.inner = inner

        def read(self, slide_id, x, y):
            # half of each slide's tiles: its clusters keep readable tiles to substitute
            if state["broken"] and slide_id in broken and (x + y) // 224 % 2:
                raise TileReadError(slide_id, x, y, "I/O error")
            return self.inner.read(slide_id, x, y)

        def close(self):
            self.inner.close()

    monkeypatch.setattr(trainer_mod, "build_tile_source", lambda cfg: BreaksMidRun(real_build(cfg)))
    _patch_step(monkeypatch, lambda step, losses: state.update(broken=step >= 1))
    cfg = tiny_cfg(cohort, cohort_index, "train.iterations=8", "checkpoint.every_n_iterations=1",
                   "train.num_workers=0", "data.on_error=skip", "data.max_skipped=2")
    with pytest.raises(trainer_mod.UnreadableSlidesError) as raised:
        trainer_mod.run_training(cfg, tmp_path)
    message = str(raised.value)
    assert "\n" not in message and message.startswith("data.max_skipped=2: ")
    named = message.split("their slides: ")[1].split(" (")[0].split(", ")
    assert named and set(named) <= set(broken)
    skipped = int(message.split(": ")[1].split()[0])
    assert skipped > 2
    assert iteration_of(find_latest(tmp_path / "checkpoints")) >= 2  # it trained past the break


def test_a_full_disk_keeps_the_last_checkpoint_and_a_corrupted_latest_falls_back(
        cohort, cohort_index, tmp_path, monkeypatch, capsys):
    real_save = torch.save
    state = {"armed": True, "full": False}

    def save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        if state["full"]:  # half the bytes reached the disk
            f.truncate(f.tell() // 2)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", save)
    _patch_step(monkeypatch, lambda step, losses: state.update(full=state["armed"] and step >= 1))
    cfg = tiny_cfg(cohort, cohort_index, "train.iterations=3", "checkpoint.every_n_iterations=1",
                   "train.num_workers=0")
    root = tmp_path / "checkpoints"
    with pytest.raises(CheckpointError) as raised:
        trainer_mod.run_training(cfg, tmp_path)
    assert "\n" not in str(raised.value)
    assert str(raised.value).startswith(f"cannot write checkpoint {root / 'iter_00000002'}: No space left")
    assert str(raised.value).endswith("latest still names iter_00000001")
    assert (root / "latest").read_text().strip() == "iter_00000001"
    assert sorted(p.name for p in root.iterdir()) == ["iter_00000001", "latest"]

    state.update(armed=False, full=False)  # the disk has room again
    assert trainer_mod.run_training(cfg, tmp_path)["start_iteration"] == 1
    bad = root / "iter_00000003" / "state.pt"
    bad.write_bytes(bad.read_bytes()[:1000])
    capsys.readouterr()
    result = trainer_mod.run_training(cfg, tmp_path)
    assert result["start_iteration"] == 2 and result["iteration"] == 3
    warnings = [line for line in capsys.readouterr().err.splitlines() if " WARNING " in line]
    assert len(warnings) == 1 and f"{bad}: not a readable checkpoint file" in warnings[0]
    assert iteration_of(find_latest(root)) == 3


@pytest.mark.parametrize("value", ["-1", "1.5", "true"])
def test_max_skipped_is_a_count_or_null(cohort, cohort_index, value):
    with pytest.raises(ConfigError, match=r"^data\.max_skipped=\S+: must be an integer >= 0 \(or null\)$"):
        validate_config(tiny_cfg(cohort, cohort_index, f"data.max_skipped={value}"))
    validate_config(tiny_cfg(cohort, cohort_index, "data.max_skipped=0"))
