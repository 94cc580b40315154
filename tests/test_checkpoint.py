import random

import numpy as np
import pytest
import torch

from dinov2_patho.distributed import DistContext
from dinov2_patho.train.checkpoint import (
    CheckpointError,
    capture_rng_state,
    find_latest,
    iteration_of,
    list_checkpoints,
    load_checkpoint,
    load_latest,
    restore_rng_state,
    save_checkpoint,
)

CTX = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def _shared(i):
    return {"iteration": i, "model": {"w": torch.full((3,), float(i))},
            "sampler": {"perm": np.arange(5, dtype=np.uint32) + i, "step": np.int64(i)}}


def test_save_load_roundtrip_keeps_numpy_and_prunes(tmp_path):
    root = tmp_path / "checkpoints"
    for i in (2, 4, 6, 8):
        save_checkpoint(root, i, _shared(i), {"rng": capture_rng_state()}, CTX, keep_last=2)
        random.random(), np.random.rand(), torch.rand(1)
    restore_rng_state(load_checkpoint(find_latest(root), 0)[1]["rng"])
    assert [iteration_of(p) for p in list_checkpoints(root)] == [6, 8]
    latest = find_latest(root)
    assert iteration_of(latest) == 8
    shared, rank_state = load_checkpoint(latest, rank=0)
    assert shared["iteration"] == 8 and torch.equal(shared["model"]["w"], torch.full((3,), 8.0))
    perm = shared["sampler"]["perm"]
    assert isinstance(perm, np.ndarray) and perm.dtype == np.uint32 and perm.tolist() == [8, 9, 10, 11, 12]
    assert shared["sampler"]["step"] == 8
    before = (random.random(), np.random.rand(), torch.rand(3))
    restore_rng_state(rank_state["rng"])  # the state saved with iteration 8, through torch.save
    after = (random.random(), np.random.rand(), torch.rand(3))
    assert before[:2] == after[:2] and torch.equal(before[2], after[2])
    assert load_checkpoint(latest, rank=1)[1] is None  # no such rank in the saving world
    assert not [p for p in root.iterdir() if p.name.startswith(".")]


def test_partial_write_is_ignored_and_pointer_wins(tmp_path):
    root = tmp_path / "checkpoints"
    save_checkpoint(root, 3, _shared(3), {}, CTX, keep_last=3)
    (root / ".iter_00000005.partial").mkdir()  # a kill mid-write
    (root / ".iter_00000005.partial" / "rank0.pt").write_bytes(b"junk")
    assert iteration_of(find_latest(root)) == 3
    save_checkpoint(root, 5, _shared(5), {}, CTX, keep_last=3)
    (root / "latest").unlink()  # a kill between the rename and the pointer move
    assert iteration_of(find_latest(root)) == 5
    (root / "latest").write_text("iter_00000009\n")
    with pytest.raises(CheckpointError, match="iter_00000009"):
        find_latest(root)
    assert find_latest(tmp_path / "nothing") is None


def test_saving_the_same_iteration_again_replaces_it(tmp_path):
    root = tmp_path / "checkpoints"
    save_checkpoint(root, 4, _shared(4), {}, CTX, keep_last=3)
    save_checkpoint(root, 4, _shared(40), {}, CTX, keep_last=3)
    shared, _ = load_checkpoint(find_latest(root), 0)
    assert shared["iteration"] == 40


def test_rng_state_restores_all_three_generators():
    state = capture_rng_state()
    expected = (random.random(), np.random.rand(), torch.rand(2))
    random.random(), np.random.rand(), torch.rand(5)
    restore_rng_state(state)
    got = (random.random(), np.random.rand(), torch.rand(2))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_a_full_disk_mid_write_keeps_latest_on_the_previous_checkpoint(tmp_path, monkeypatch):
    import errno
    import os

    root = tmp_path / "checkpoints"
    save_checkpoint(root, 2, _shared(2), {}, CTX, keep_last=3)
    real_save = torch.save

    def fill_disk(obj, f):  # some bytes reach the file, then the disk is full
        real_save(obj, f)
        f.truncate(f.tell() // 2)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", fill_disk)
    with pytest.raises(CheckpointError) as raised:
        save_checkpoint(root, 4, _shared(4), {}, CTX, keep_last=3)
    message = str(raised.value)
    assert "\n" not in message and "iter_00000004" in message and "No space left on device" in message
    assert message.endswith("latest still names iter_00000002")
    assert (root / "latest").read_text().strip() == "iter_00000002"
    assert sorted(p.name for p in root.iterdir()) == ["iter_00000002", "latest"]  # no partial left
    monkeypatch.undo()
    assert load_checkpoint(find_latest(root), 0)[0]["iteration"] == 2


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_a_corrupted_latest_falls_back_to_the_one_before_with_a_warning(tmp_path, caplog, damage):
    root = tmp_path / "checkpoints"
    for i in (2, 4, 6):
        save_checkpoint(root, i, _shared(i), {}, CTX, keep_last=3)
    assert load_latest(root, CTX)[0].name == "iter_00000006"
    bad = root / "iter_00000006" / "state.pt"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 3] if damage == "truncate" else b"\x00garbage" * 64)
    path, shared, _ = load_latest(root, CTX)
    assert path.name == "iter_00000004" and shared["iteration"] == 4
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and str(bad) in warnings[0]
    for i in (2, 4):  # nothing readable left: one line naming the newest failure
        (root / f"iter_0000000{i}" / "state.pt").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match=r"^no readable checkpoint in .*iter_00000006/state\.pt"):
        load_latest(root, CTX)
    assert load_latest(tmp_path / "none", CTX) is None
