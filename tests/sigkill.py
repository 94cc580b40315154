"""SIGKILL at an atomic write: a `dinov2-patho` command in a child process that kills itself at its
k-th os.replace (every atomic write's last step: the temp file is written, not yet in place), the
kill that no handler, `finally` or atexit of the command sees; or at its n-th call of any of several
functions (`calls` lists them for a run, `run_killed_at_call` kills there)."""

from __future__ import annotations

import hashlib
import importlib
import json
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


# --- SIGKILL at the n-th call of any of several functions -------------------------------------------

_CALLS_CHILD = """
import json, os, signal, sys
sys.path.insert(0, sys.argv[1])
from sigkill import patch_calls
targets, kill_at, argv = json.loads(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
calls = [0]
def count(target):
    calls[0] += 1
    if calls[0] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
patch_calls(targets, count)
from dinov2_patho.cli import main
sys.exit(main(argv))
"""


def _resolve(target: str) -> tuple[object, str]:
    """("module:Class.attr") -> (the object holding attr, attr)."""
    module, _, path = target.partition(":")
    owner = importlib.import_module(module)
    *parents, name = path.split(".")
    for parent in parents:
        owner = getattr(owner, parent)
    return owner, name


def patch_calls(targets: Iterable[str], before: Callable[[str], None]) -> Callable[[], None]:
    """Make every call of each target ("module:attr.path", a function or a method) call `before(target)`
    first; returns the function that undoes it."""
    undo = []
    for target in targets:
        owner, name = _resolve(target)
        real = getattr(owner, name)

        def counted(*args, _real=real, _target=target, **kwargs):
            before(_target)
            return _real(*args, **kwargs)

        setattr(owner, name, counted)
        undo.append((owner, name, real))

    def restore() -> None:
        for owner, name, real in reversed(undo):
            setattr(owner, name, real)

    return restore


def calls(run: Callable[[], object], targets: list[str], label: Callable[[str], str] = str) -> list[str]:
    """`label(target)` of every call of `targets` that `run` makes, in order (in this process): call n of
    a child run with the same arguments is entry n - 1."""
    seen: list[str] = []
    restore = patch_calls(targets, lambda target: seen.append(label(target)))
    try:
        run()
    finally:
        restore()
    return seen


def run_killed_at_call(kill_at: int, targets: list[str], argv: list[str]) -> None:
    """`dinov2-patho ARGV` in a child process that SIGKILLs itself on entering its `kill_at`-th call of
    any of `targets`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    here = str(Path(__file__).parent)
    child = [sys.executable, "-c", _CALLS_CHILD, here, json.dumps(targets), str(kill_at)]
    proc = subprocess.run([*child, *argv], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
