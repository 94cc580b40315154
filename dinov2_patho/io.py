"""Atomic writes: a reader never sees a half-written file or directory, a crash never leaves one; and
a file's sha256 (`sha256_file`)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

_TOKEN_HEX = 6  # bytes of a fresh name's random part
# fresh_path's names in atomic_path / atomic_dir: .NAME.<12 hex digits>.tmp
_TEMP = re.compile(rf"\..+\.[0-9a-f]{{{2 * _TOKEN_HEX}}}\.tmp")


def fresh_path(parent: Path, prefix: str, suffix: str, *, directory: bool = False) -> Path:
    """Create an empty file (or directory) with a new name in `parent`, with the umask's mode.

    mkstemp / mkdtemp create 0600 / 0700, and the rename onto the final name keeps that mode,
    so colleagues on a shared cluster could not read results or weights; created here with
    0666 / 0777 the kernel applies the umask (0644 / 0755 under umask 022).
    """
    for _ in range(100):
        candidate = Path(parent) / f"{prefix}{secrets.token_hex(_TOKEN_HEX)}{suffix}"
        try:
            if directory:
                candidate.mkdir(0o777)
            else:
                os.close(os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(f"{parent}: no free temporary name for {prefix}*{suffix}")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` if the block succeeds."""
    path = Path(path)
    if path.is_dir():  # the rename would fail naming the temporary file, after the work
        raise IsADirectoryError(errno.EISDIR, "Is a directory, not a file name", str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = fresh_path(path.parent, f".{path.name}.", ".tmp")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if e.filename is None and e.errno is not None:  # a write to an open file (a full disk): name it
            raise type(e)(e.errno, e.strerror, str(path)) from e
        raise
    finally:
        tmp.unlink(missing_ok=True)


def remove_stale_temps(directory: str | Path) -> list[Path]:
    """Remove the temporary files and directories under `directory` of atomic writes killed before
    their rename (SIGKILL, preemption: no `finally` ran). Only for the directory's one writer
    (`dirlock.exclusive_directory`): another's temps are in use."""
    stale = [p for p in Path(directory).rglob(".*.tmp") if _TEMP.fullmatch(p.name)]
    for path in stale:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return stale


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def fsync_dir(path: Path) -> None:
    """Make the entries of directory `path` (names created, renamed) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_dir(path: str | Path, *, staging: Path | None = None,
               keep_existing: bool = False) -> Iterator[Path]:
    """Yield a new empty directory beside `path` to fill; if the block succeeds, rename it onto
    `path`, so a reader sees the old directory or the complete new one, never a partial one.

    An existing `path` is moved aside and deleted once the new one is in place, or, with
    `keep_existing` (a cache another process may have filled first), kept and the new one
    dropped. `staging` names the temporary directory instead of a fresh random name, for
    writers in several processes (a checkpoint's ranks); a stale one is cleared first. Files
    written inside are the caller's to fsync; the directory entries are fsynced here.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if staging is None:
        tmp = fresh_path(path.parent, f".{path.name}.", ".tmp", directory=True)
    else:
        tmp = Path(staging)
        shutil.rmtree(tmp, ignore_errors=True)  # left by a writer killed mid-way
        tmp.mkdir(0o777)
    try:
        yield tmp
        fsync_dir(tmp)
        _rename_dir(tmp, path, keep_existing)
        fsync_dir(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _rename_dir(tmp: Path, path: Path, keep_existing: bool) -> None:
    try:
        os.replace(tmp, path)  # onto a missing path or an empty directory
        return
    except OSError:
        if not path.is_dir():
            raise
        if keep_existing:
            return  # another writer got there first
    aside = fresh_path(path.parent, f".{path.name}.", ".old", directory=True)
    os.replace(path, aside / path.name)
    try:
        os.replace(tmp, path)
    finally:
        shutil.rmtree(aside, ignore_errors=True)


def sha256_file(path: str | Path, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
