"""Training checkpoints: complete or absent, never half-written.

Layout under `<output_dir>/checkpoints/`:
    iter_00001000/state.pt      everything shared by the ranks (model, optimizer, scaler,
                                sampler, iteration), written by rank 0
    iter_00001000/rank{r}.pt    what differs per rank (RNG states)
    latest                      text: the name of the newest complete checkpoint

A checkpoint is built in `.iter_XXXXXXXX.partial/` and renamed into place once every
rank has written its part; `latest` moves only after that rename, and pruning to the
last K runs after that, so a kill at any instant leaves `latest` naming a complete
checkpoint. `iter_N` holds the state after N completed iterations: a resumed run starts
at iteration N.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dinov2_patho.distributed import DistContext, barrier, broadcast_object
from dinov2_patho.errors import UserError
from dinov2_patho.io import atomic_dir, atomic_write_text
from dinov2_patho.logging import get_logger
from dinov2_patho.readback import DamagedFileError, load_state

log = get_logger(__name__)

CHECKPOINTS = "checkpoints"  # the folder of a run directory that holds them
LATEST = "latest"
SHARED_FILE = "state.pt"
_NAME = re.compile(r"^iter_(\d{8,})$")
_NDARRAY = "__ndarray__"


class CheckpointError(UserError):
    pass


def checkpoint_name(iteration: int) -> str:
    return f"iter_{iteration:08d}"


def to_storable(obj: Any) -> Any:
    """numpy arrays and scalars as tensors and Python numbers, so that the checkpoint
    loads with `torch.load(weights_only=True)`."""
    if isinstance(obj, np.ndarray):
        return {_NDARRAY: torch.from_numpy(np.ascontiguousarray(obj))}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: to_storable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_storable(v) for v in obj)
    return obj


def from_storable(obj: Any) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {_NDARRAY}:
            return obj[_NDARRAY].numpy()
        return {k: from_storable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(from_storable(v) for v in obj)
    return obj


def capture_rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(legacy=False),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name)]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def find_latest(root: str | Path) -> Path | None:
    """The checkpoint `latest` names; without a pointer (a kill between the rename and
    the pointer update), the newest complete one."""
    root = Path(root)
    pointer = root / LATEST
    if pointer.is_file():
        name = pointer.read_text().strip()
        path = root / name
        if not _NAME.match(name) or not (path / SHARED_FILE).is_file():
            raise CheckpointError(f"{pointer} names {name!r}, which is not a complete checkpoint in {root}")
        return path
    found = list_checkpoints(root)
    return found[-1] if found else None


def iteration_of(path: Path) -> int:
    match = _NAME.match(path.name)
    if match is None:
        raise CheckpointError(f"{path} is not a checkpoint directory (iter_NNNNNNNN)")
    return int(match.group(1))


def _save_file(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(to_storable(obj), f)
        f.flush()
        os.fsync(f.fileno())


def save_checkpoint(root: str | Path, iteration: int, shared: dict[str, Any] | None,
                    rank_state: dict[str, Any], ctx: DistContext, keep_last: int) -> Path:
    """Collective: every rank calls it; `shared` is used on rank 0 only."""
    root = Path(root)
    final = root / checkpoint_name(iteration)
    partial = root / f".{final.name}.partial"  # one name that every rank knows
    if ctx.is_main and shared is None:
        raise ValueError("rank 0 must pass the shared state")
    # rank 0 owns the directory; the same iteration saved again (a resumed run stopped where
    # it started) replaces the old one
    try:
        with atomic_dir(final, staging=partial) if ctx.is_main else contextlib.nullcontext(partial):
            barrier(ctx)
            _save_file(rank_state, partial / f"rank{ctx.rank}.pt")
            if ctx.is_main:
                _save_file(shared, partial / SHARED_FILE)
            barrier(ctx)
        if ctx.is_main:
            atomic_write_text(root / LATEST, final.name + "\n")
    except OSError as e:  # a full disk, a quota: the staging directory is gone, `latest` has not moved
        previous = find_latest(root)
        raise CheckpointError(f"cannot write checkpoint {final}: {e.strerror or e}; {root / LATEST} still "
                              f"names {previous.name if previous else 'no checkpoint'}") from e
    if ctx.is_main:
        for old in list_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier(ctx)
    return final


SHARED_KEYS = ("iteration", "model")  # what every shared state holds; a training run's also its "config"


def load_file(path: Path, keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """One checkpoint file (a dict holding `keys`), or a CheckpointError naming it and what is wrong."""
    try:
        # mmap: every rank reads the shared file; pages are shared, not copied per rank (ViT-g: ~18 GB)
        obj = load_state(path, "checkpoint file", "", keys=keys, mmap=True)
        if not isinstance(obj, dict):
            raise DamagedFileError(f"{path}: not a checkpoint file: it holds a {type(obj).__name__}")
    except DamagedFileError as e:
        raise CheckpointError(str(e)) from None
    return from_storable(obj)


Loaded = tuple[Path, dict[str, Any], dict[str, Any] | None]


def load_latest(root: str | Path, ctx: DistContext) -> Loaded | None:
    """The newest checkpoint that reads, from the one `latest` names back (None: no checkpoint):
    a corrupted one is passed over with a warning naming it. Rank 0 chooses, the others follow."""
    latest = find_latest(root)
    if latest is None:
        return None
    chosen, failures = None, []
    if ctx.is_main:
        candidates = [p for p in list_checkpoints(Path(root)) if iteration_of(p) < iteration_of(latest)]
        for path in [latest, *reversed(candidates)]:
            try:
                loaded = load_checkpoint(path, ctx.rank)
            except CheckpointError as e:
                log.warning("%s: passed over, trying the checkpoint before it", e)
                failures.append(str(e))
                continue
            chosen = path.name
            break
    chosen = broadcast_object(chosen, ctx)
    if chosen is None:
        raise CheckpointError(f"no readable checkpoint in {root}" + (f": {failures[0]}" if failures else ""))
    path = Path(root) / chosen
    return path, *(loaded if ctx.is_main else load_checkpoint(path, ctx.rank))


def load_checkpoint(path: str | Path, rank: int) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The shared state and this rank's state (None when the checkpoint was written by a
    smaller world that had no such rank)."""
    path = Path(path)
    if not (path / SHARED_FILE).is_file():
        raise CheckpointError(f"{path} is not a complete checkpoint (no {SHARED_FILE})")
    shared = load_file(path / SHARED_FILE, SHARED_KEYS)
    rank_file = path / f"rank{rank}.pt"
    return shared, load_file(rank_file) if rank_file.is_file() else None
