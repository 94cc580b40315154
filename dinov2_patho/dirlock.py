"""One run per output directory: `train`, `curate embed` and `curate kmeans` hold DIR/.lock.

Rank 0 takes an exclusive, non-blocking POSIX record lock (lockf) on DIR/.lock and writes its pid and
host there; a second run on the same directory stops at once, on every rank, with one line naming the
holder, before it writes anything. A record lock belongs to its process: forked DataLoader workers do
not inherit it (a flock they would, and hold it after their parent is SIGKILLed), and the kernel drops
it when the process dies (SIGKILL, preemption), so the file of a dead run is taken over, never stale;
the new holder removes the temporary files of the dead run's unfinished atomic writes.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dinov2_patho.distributed import DistContext, broadcast_object
from dinov2_patho.errors import UserError
from dinov2_patho.io import remove_stale_temps
from dinov2_patho.logging import get_logger

log = get_logger(__name__)
LOCK = ".lock"


class DirectoryInUse(UserError):
    pass


def _acquire(directory: Path, command: str) -> int | None:
    """The open, locked descriptor of DIR/.lock; None where the filesystem has no locks."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EAGAIN):
            os.close(fd)
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            log.warning("%s: no file locks on this filesystem (%s): a second run on it is not refused",
                        path, e)
            return None
        holder = os.read(fd, 256).decode(errors="replace").strip() or "a process that has not written its pid"
        os.close(fd)
        raise DirectoryInUse(f"{directory}: in use by another run ({holder}, holding {path}); wait for it "
                             f"to end or use another directory") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{command}: pid {os.getpid()} on {socket.gethostname()}\n".encode())
    stale = remove_stale_temps(directory)
    if stale:
        log.info("%s: removed %d temporary file(s) of a killed run's unfinished writes", directory,
                 len(stale))
    return fd


@contextmanager
def exclusive_directory(directory: str | Path, command: str, ctx: DistContext) -> Iterator[None]:
    """Hold `directory` for the block (rank 0 of `ctx` locks; every rank raises if it is taken)."""
    fd, error = None, None
    if ctx.is_main:
        try:
            fd = _acquire(Path(directory), command)
        except DirectoryInUse as e:
            error = str(e)
    error = broadcast_object(error, ctx)  # the other ranks stop with rank 0, not at a later collective
    if error is not None:
        raise DirectoryInUse(error)
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)
