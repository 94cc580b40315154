"""SIGKILL at an atomic write: a `dinov2-patho` command in a child process that kills itself at its
k-th os.replace (every atomic write's last step: the temp file is written, not yet in place), the
kill that no handler, `finally` or atexit of the command sees."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

_CHILD = """
import os, signal, sys
from dinov2_patho.cli import main
kill_at, calls, replace = int(sys.argv[1]), [0], os.replace
def replace_or_die(*args, **kwargs):
    calls[0] += 1
    if calls[0] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return replace(*args, **kwargs)
os.replace = replace_or_die
sys.exit(main(sys.argv[2:]))
"""


def replaces(run: Callable[[], object]) -> int:
    """How many os.replace calls `run` makes (in this process)."""
    calls, replace = [0], os.replace

    def counted(*args, **kwargs):
        calls[0] += 1
        return replace(*args, **kwargs)

    os.replace = counted
    try:
        run()
    finally:
        os.replace = replace
    return calls[0]


def run_killed_at(kill_at: int, argv: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(kill_at), *argv], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]


def sha256s(directory: Path, skip: Iterable[str] = ()) -> dict[str, str]:
    """sha256 of every file under `directory` but those named in `skip`."""
    skip = set(skip)
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file() and p.name not in skip}
