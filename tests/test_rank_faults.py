"""A failure on one of two gloo ranks ends both within 60 s, each with one error line naming that rank
and the cause, and leaves nothing half-written: a full disk on rank 0 writing a checkpoint while rank 1
waits, an exception in a DataLoader worker of rank 1 (training, `curate embed`), a SIGKILL of one rank
inside a k-means resampling step, a full disk on rank 0 writing a tree level; and on three ranks, the
last one killed as a resampling step starts (the neighbour that watches it names it); and a rank whose
teardown hangs after a failure still ends in time."""

from __future__ import annotations

import re

import pytest
import rank_faults
from test_curation_embed import SMALL, tiles_dir  # noqa: F401 - the fixture
from test_curation_sigkill import small_tree_inputs
from test_train import SMOKE, TINY, _data

from dinov2_patho import distributed
from dinov2_patho.curation.tree import level_dir

TEMP = re.compile(r"\..+\.[0-9a-f]{24}\.tmp|\..+\.partial")
pytestmark = pytest.mark.slow  # two interpreters per test import torch: ~10 s each on 2 cores


def half_written(directory) -> list[str]:
    """Temporary files or staging directories of unfinished writes under `directory`."""
    return [str(p) for p in directory.rglob(".*") if TEMP.fullmatch(p.name)]


def train_argv(cohort, cohort_index, out, *extra: str) -> list[str]:
    return ["train", "--config-file", str(SMOKE), "--output-dir", str(out), "--no-progress",
            *_data(cohort, cohort_index), *TINY, "train.batch_size_per_gpu=4", "train.iterations=3",
            "checkpoint.every_n_iterations=1", *extra]


def test_a_full_disk_on_rank_0_saving_a_checkpoint_stops_rank_1_waiting(cohort, cohort_index, tmp_path):
    out = tmp_path / "run"
    # torch.save: rank 0 writes rank0.pt and state.pt per checkpoint; its 3rd call is checkpoint 2's
    outcome = rank_faults.launch(train_argv(cohort, cohort_index, out, "train.num_workers=0"), tmp_path,
                                 rank=0, target="torch:save", at=3, kind="enospc")
    rank_faults.check(outcome, 0, f"cannot write checkpoint {out / 'checkpoints' / 'iter_00000002'}: "
                                  f"No space left on device; {out / 'checkpoints' / 'latest'} still names "
                                  "iter_00000001")
    root = out / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["iter_00000001", "latest"]
    assert (root / "latest").read_text().strip() == "iter_00000001" and not half_written(out)


def test_an_exception_in_a_data_worker_of_rank_1_stops_both_ranks(cohort, cohort_index, tmp_path):
    outcome = rank_faults.launch(train_argv(cohort, cohort_index, tmp_path / "run", "train.num_workers=1"),
                                 tmp_path, rank=1, target="dinov2_patho.data.dataset:TileDataset._item",
                                 at=6, kind="raise", message="tile decoder crashed (injected)")
    rank_faults.check(outcome, 1, "tile decoder crashed (injected)")
    assert "DataLoader worker" in outcome.lines(1)[-1]  # where it happened, on the rank it happened
    assert not half_written(tmp_path / "run")


def test_curate_embed_a_worker_exception_on_rank_1_stops_both_ranks(tiles_dir, tmp_path):  # noqa: F811
    out = tmp_path / "emb"
    argv = ["curate", "embed", "--tiles", str(tiles_dir), "--out", str(out), "--no-progress",
            *[a for a in SMALL if a != "embed.num_workers=0"], "embed.num_workers=1"]
    outcome = rank_faults.launch(argv, tmp_path, rank=1, target="dinov2_patho.data.dataset:TileDataset._item",
                                 at=20, kind="raise", message="slide file truncated (injected)")
    rank_faults.check(outcome, 1, "slide file truncated (injected)")
    assert not (out / "manifest.json").exists() and not (out / "embeddings.npy").exists()
    assert not half_written(out)


def kmeans_argv(tmp_path) -> list[str]:
    config = small_tree_inputs(tmp_path, seed=3, level_2_steps=2)
    return ["curate", "kmeans", "--embeddings", str(tmp_path / "x.npy"), "--out", str(tmp_path / "tree"),
            "--config-file", str(config), "--no-progress"]


def test_curate_kmeans_a_rank_killed_in_a_resampling_step_stops_the_other(tmp_path):
    # assign: one call a Lloyd pass, the same on every rank; calls 1-10 are level 1's step 0, 11-18 its
    # step 1 (counted): the 14th is mid-Lloyd in the first resampled step
    outcome = rank_faults.launch(kmeans_argv(tmp_path), tmp_path, rank=1,
                                 target="dinov2_patho.curation.kmeans:assign", at=14, kind="sigkill")
    assert outcome.ranks[1].code == -9
    rank_faults.check(outcome, 1, "no sign of life for ")
    assert not (tmp_path / "tree" / "manifest.json").exists() and not half_written(tmp_path / "tree")


def test_curate_kmeans_a_full_disk_on_rank_0_writing_a_level_stops_both(tmp_path):
    # np.save: rank 0's calls 1-4 checkpoint level 1's resampling steps, the 5th writes its centroids
    outcome = rank_faults.launch(kmeans_argv(tmp_path), tmp_path, rank=0,
                                 target="dinov2_patho.curation.tree:np.save", at=5, kind="enospc")
    tree = tmp_path / "tree"
    rank_faults.check(outcome, 0, f"{level_dir(tree, 1) / 'centroids.npy'}: No space left on device")
    assert not (tree / "manifest.json").exists() and not half_written(tree)
    assert not (level_dir(tree, 1) / "done.json").exists()


def test_curate_kmeans_on_three_ranks_the_last_killed_is_named_by_the_others(tmp_path):
    # k-means calls: level 1's step 0 is the 1st, its first resampled step the 2nd
    outcome = rank_faults.launch(kmeans_argv(tmp_path), tmp_path, world=3, rank=2,
                                 target="dinov2_patho.curation.kmeans:kmeans", at=2, kind="sigkill")
    assert outcome.ranks[2].code == -9
    rank_faults.check(outcome, 2, "no sign of life for ")
    assert not (tmp_path / "tree" / "manifest.json").exists() and not half_written(tmp_path / "tree")


def test_a_rank_whose_teardown_hangs_after_a_failure_still_ends(tmp_path):
    # rank 0's full disk at the level write as above; rank 1 then never returns from leaving the group
    outcome = rank_faults.launch(kmeans_argv(tmp_path), tmp_path, rank=0,
                                 target="dinov2_patho.curation.tree:np.save", at=5, kind="enospc",
                                 hang=(1, "torch.distributed:destroy_process_group"))
    rank_faults.check(outcome, 0, "No space left on device", within=distributed.TEARDOWN_SECONDS + 30)
    assert outcome.ranks[1].code == 2
