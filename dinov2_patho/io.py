"""Atomic writes: a reader never sees a half-written file, a crash never leaves one."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path


def fresh_path(parent: Path, prefix: str, suffix: str, *, directory: bool = False) -> Path:
    """Create an empty file (or directory) with a new name in `parent`, with the umask's mode.

    mkstemp / mkdtemp create 0600 / 0700, and the rename onto the final name keeps that mode,
    so colleagues on a shared cluster could not read results or weights; created here with
    0666 / 0777 the kernel applies the umask (0644 / 0755 under umask 022).
    """
    for _ in range(100):
        candidate = Path(parent) / f"{prefix}{secrets.token_hex(6)}{suffix}"
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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = fresh_path(path.parent, f".{path.name}.", ".tmp")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
