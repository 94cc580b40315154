"""Atomic writes honour the umask: what a run writes is readable by the team, as plain writes are."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dinov2_patho.demo.cohort import make_cohort
from dinov2_patho.io import atomic_dir, atomic_path, atomic_write_bytes, atomic_write_text, fresh_path


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask_022() -> Iterator[None]:
    """The usual umask for the test, the process's own restored afterwards."""
    old = os.umask(0o022)
    yield
    os.umask(old)


@settings(max_examples=20, deadline=None)
@given(mask=st.sampled_from([0o022, 0o002, 0o077, 0o027, 0o000]))
def test_atomic_writes_get_the_umask_mode(tmp_path_factory, mask):
    old = os.umask(mask)
    try:
        out = tmp_path_factory.mktemp("w")
        atomic_write_text(out / "results.md", "x")
        atomic_write_bytes(out / "weights.pth", b"x")
        with atomic_path(out / "sub" / "metrics.jsonl") as tmp:
            tmp.write_text("{}")
        plain = out / "plain.txt"
        plain.write_text("x")  # what open() would have given
        for name in ("results.md", "weights.pth", "sub/metrics.jsonl"):
            assert _mode(out / name) == _mode(plain) == 0o666 & ~mask, name
        d = fresh_path(out, ".d.", ".tmp", directory=True)
        assert d.is_dir() and _mode(d) == 0o777 & ~mask
    finally:
        os.umask(old)


def test_under_umask_022_files_are_0644_and_the_cohort_dir_0755(tmp_path, umask_022):
    atomic_write_text(tmp_path / "config.yaml", "a: 1\n")
    assert _mode(tmp_path / "config.yaml") == 0o644
    cohort = make_cohort(tmp_path / "cohort", num_slides=1, grid=(2, 2))
    assert _mode(cohort.root) == 0o755
    assert _mode(cohort.clusters_csv) == 0o644


def test_fresh_path_names_do_not_collide(tmp_path):
    made = {fresh_path(tmp_path, ".a.", ".tmp") for _ in range(50)}
    assert len(made) == 50 and all(p.is_file() and p.stat().st_size == 0 for p in made)


def test_atomic_dir_shows_the_old_or_the_whole_new_directory(tmp_path, umask_022):
    out = tmp_path / "sub" / "out"
    with atomic_dir(out) as tmp:
        (tmp / "a").write_text("1")
        assert not out.exists()  # nothing visible before the block succeeds
    assert (out / "a").read_text() == "1" and _mode(out) == 0o755
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "a").write_text("half")
        raise RuntimeError
    assert (out / "a").read_text() == "1"
    with atomic_dir(out) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["b"]  # replaced whole, not merged
    with atomic_dir(out, keep_existing=True) as tmp:
        (tmp / "c").write_text("3")
    assert sorted(p.name for p in out.iterdir()) == ["b"]  # a cache filled first by another writer
    staging = out.parent / ".out.partial"
    staging.mkdir()
    (staging / "stale").write_text("killed mid-write")
    with atomic_dir(out, staging=staging) as tmp:
        assert tmp == staging and not any(tmp.iterdir())
        (tmp / "d").write_text("4")
    assert sorted(p.name for p in out.iterdir()) == ["d"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]  # no temporary left behind
