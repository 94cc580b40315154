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
at iteration N. The names and the reading of one file are `checkpoint_files.py`'s, shared with the
backbone loader. How often and how many: the training config's `checkpoint` section (`CheckpointConfig`).
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dinov2_patho.checkpoint_files import (
    CHECKPOINTS,  # noqa: F401  (the trainer's ckpt.CHECKPOINTS)
    LATEST,
    SHARED_FILE,
    SHARED_KEYS,
    CheckpointError,
    checkpoint_name,
    find_latest,
    iteration_of,
    list_checkpoints,
    load_file,
    to_storable,
)
from dinov2_patho.config_files import check_section
from dinov2_patho.distributed import DistContext, agree, barrier, broadcast_object, ranks_agree
from dinov2_patho.io import atomic_dir, atomic_write_text
from dinov2_patho.logging import get_logger

log = get_logger(__name__)


@dataclass
class CheckpointConfig:
    """The `checkpoint` section of the training config."""

    every_n_iterations: int = 2500
    keep_last: int = 3

    def __post_init__(self) -> None:
        check_section("checkpoint", self, integers={"every_n_iterations": 0, "keep_last": 1})


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
    # it started) replaces the old one. Each write is followed by `agree`, not a barrier: a rank whose
    # write fails (a full disk) ends every rank with its one line, none waits for it forever.
    error: CheckpointError | None = None
    try:
        with atomic_dir(final, staging=partial) if ctx.is_main else contextlib.nullcontext(partial):
            with ranks_agree(ctx):  # rank 0 made the staging directory
                pass
            with ranks_agree(ctx):
                _write_parts(partial, shared, rank_state, ctx, final)
        if ctx.is_main:
            atomic_write_text(root / LATEST, final.name + "\n")
    except OSError as e:  # a full disk, a quota: the staging directory is gone, `latest` has not moved
        error = _write_error(final, root, e)
    agree(error, ctx)  # rank 0's staging directory, rename and `latest`
    if ctx.is_main:
        for old in list_checkpoints(root)[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier(ctx)
    return final


def _write_error(final: Path, root: Path, error: OSError) -> CheckpointError:
    previous = find_latest(root)
    return CheckpointError(f"cannot write checkpoint {final}: {error.strerror or error}; {root / LATEST} "
                           f"still names {previous.name if previous else 'no checkpoint'}")


def _write_parts(partial: Path, shared: dict[str, Any] | None, rank_state: dict[str, Any], ctx: DistContext,
                 final: Path) -> None:
    """This rank's file, and rank 0's shared state, into the staging directory."""
    try:
        _save_file(rank_state, partial / f"rank{ctx.rank}.pt")
        if ctx.is_main:
            _save_file(shared, partial / SHARED_FILE)
    except OSError as e:
        raise _write_error(final, final.parent, e) from e


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
