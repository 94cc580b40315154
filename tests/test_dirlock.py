"""A second `train` or `curate kmeans` on an output directory in use stops at once, naming the holder."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_curation_kmeans import planted_blobs, run_cli
from test_train import tiny_cfg

from dinov2_patho.dirlock import LOCK, DirectoryInUse
from dinov2_patho.train.trainer import run_training

# another process holding DIR/.lock as a run does: lockf, then its line (no torch import: fast)
HOLDER = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
os.write(fd, f"holder: pid {os.getpid()}".encode())
print("held", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def holder(tmp_path):
    """Start a process holding `directory`'s lock; stopped (and so released) at teardown."""
    procs = []

    def hold(directory: Path) -> subprocess.Popen:
        directory.mkdir(parents=True, exist_ok=True)
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(directory / LOCK)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return proc

    yield hold
    for proc in procs:
        proc.stdin.close()
        proc.wait(timeout=30)


def listing(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir()}


def test_a_second_kmeans_on_a_tree_in_use_stops_naming_the_holder(tmp_path, capsys, holder):
    x, _, _ = planted_blobs(seed=5)
    np.save(tmp_path / "x.npy", x)
    proc = holder(tmp_path / "tree")
    before = listing(tmp_path / "tree")
    assert run_cli(tmp_path, tmp_path / "x.npy") == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "in use by another run" in err and f"pid {proc.pid}" in err, err
    assert listing(tmp_path / "tree") == before  # nothing of the first run touched
    proc.stdin.close()
    proc.wait(timeout=30)  # the holder ends: its lock goes with it
    assert run_cli(tmp_path, tmp_path / "x.npy") == 0
    assert "curate kmeans: pid" in (tmp_path / "tree" / LOCK).read_text()


def test_a_second_train_on_a_run_in_use_stops_before_writing(cohort, cohort_index, tmp_path, holder):
    out = tmp_path / "run"
    proc = holder(out)
    before = listing(out)
    with pytest.raises(DirectoryInUse, match=rf"^{out}: in use by another run \(holder: pid {proc.pid},"):
        run_training(tiny_cfg(cohort, cohort_index, "train.iterations=1"), out)
    assert listing(out) == before


def test_the_lock_file_of_a_dead_run_is_taken_over(tmp_path, capsys):
    x, _, _ = planted_blobs(seed=5)
    np.save(tmp_path / "x.npy", x)
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / LOCK).write_text("curate kmeans: pid 999999999 on a node that crashed\n")
    assert run_cli(tmp_path, tmp_path / "x.npy") == 0
    assert "999999999" not in (tmp_path / "tree" / LOCK).read_text()
