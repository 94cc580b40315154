import random

import numpy as np
import pytest
import torch

from dinov2_patho.train.checkpoint import (
    CheckpointError,
    capture_rng_state,
    find_latest,
    iteration_of,
    list_checkpoints,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from dinov2_patho.train.dist import DistContext

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
