"""Training checkpoint folders as every reader sees them: their names, the latest one, one file read.

The trainer writes them (train/checkpoint.py: the layout, atomic saves, resume); the backbone loader
reads a run's teacher from them (backbones/teacher.py), and the report and `launch status` find them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dinov2_patho.errors import UserError
from dinov2_patho.readback import DamagedFileError, load_state

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
