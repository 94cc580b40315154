"""Array and tensor files the project wrote and reads back (index columns, caches, bags, checkpoints),
through one guarded path: a file that is missing, truncated, not ours, an object array or random bytes
is one DamagedFileError naming the file, what is wrong and what to do — never a traceback, and never
unpickled (`allow_pickle=False`, `weights_only=True`). A cache catches it and rebuilds, saying so
(`rebuilding`); anything else stops with the line. JSON files have their own reader (jsonfile).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from dinov2_patho.errors import UserError
from dinov2_patho.logging import get_logger
from dinov2_patho.textfile import one_line

log = get_logger(__name__)

_KIND_NAMES = {"b": "booleans", "i": "signed integers", "u": "unsigned integers", "f": "floats"}


class DamagedFileError(UserError):
    """A file the project wrote cannot be read back as what it should be."""


def _damaged(path: Path, text: str, fix: str) -> DamagedFileError:
    return DamagedFileError(f"{path}: {text}" + (f"; {fix}" if fix else ""))


def _short(error: Exception) -> str:
    """The library's reason, its first sentence (torch adds a paragraph of advice)."""
    return f"{type(error).__name__}: {one_line(error).split('. ')[0][:200]}"


def _check_npy_size(path: Path) -> None:
    """ValueError unless the .npy file `path` holds all the bytes its header says."""
    with open(path, "rb") as f:
        major, _ = np.lib.format.read_magic(f)
        fmt = np.lib.format
        shape, _, dtype = (fmt.read_array_header_1_0 if major == 1 else fmt.read_array_header_2_0)(f)
        if dtype.hasobject:
            raise ValueError("an object array (pickled Python objects)")
        expected = f.tell() + dtype.itemsize * int(np.prod(shape, dtype=np.int64))
        size = os.fstat(f.fileno()).st_size
    if size < expected:
        raise ValueError(f"cut short: {size} of its {expected} bytes")


def load_npy(path: str | Path, what: str, fix: str, *, kinds: str = "biuf", ndim: int | None = None,
             rows: int | None = None, mmap_mode: str | None = None) -> np.ndarray:
    """The array in `path`, a `what` ("index column"), whose dtype kind is one of `kinds`, with `ndim`
    dimensions and `rows` rows where given; a DamagedFileError `<path>: <what> ...; <fix>` otherwise
    (a cache gives no `fix`: it rebuilds)."""
    path = Path(path)
    try:
        _check_npy_size(path)  # np.load(mmap_mode="r+") extends a file cut short with zeros, silently
        array = np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except FileNotFoundError:
        raise _damaged(path, f"the {what} is missing", fix) from None
    except (OSError, ValueError, EOFError) as e:  # truncated, random bytes, an object array (pickled)
        raise _damaged(path, f"not a readable {what} ({_short(e)})", fix) from None
    if not isinstance(array, np.ndarray):  # an .npz archive under the name
        raise _damaged(path, f"not a {what} (a {type(array).__name__}, not one array)", fix)
    problem = None
    if array.dtype.kind not in kinds:
        wanted = " or ".join(_KIND_NAMES[k] for k in kinds)
        problem = f"holds {array.dtype} values, not {wanted}"
    elif ndim is not None and array.ndim != ndim:
        problem = f"has shape {array.shape}, not {ndim}-D"
    elif rows is not None and array.shape[0] != rows:
        problem = f"has {array.shape[0]} rows, not {rows}"
    if problem:
        raise _damaged(path, f"the {what} {problem}", fix)
    return array


def load_state(path: str | Path, what: str, fix: str, *, keys: tuple[str, ...] = (),
               mmap: bool = False) -> Any:
    """The object `torch.load(weights_only=True)` reads from `path`, a `what` ("training checkpoint"),
    a dict holding `keys` where given; a DamagedFileError `<path>: <what> ...; <fix>` otherwise."""
    import torch

    path = Path(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise _damaged(path, f"the {what} is missing", fix) from None
    except Exception as e:  # unpickling arbitrary bytes fails in arbitrary ways
        raise _damaged(path, f"not a readable {what} ({_short(e)})", fix) from None
    if keys:
        held = sorted(map(str, obj)) if isinstance(obj, dict) else None
        missing = [k for k in keys if held is None or k not in obj]
        if missing:
            found = f"keys {', '.join(held[:8])}" if held is not None else f"a {type(obj).__name__}"
            raise _damaged(path, f"not a {what}: it holds {found}, without {', '.join(missing)}", fix)
    return obj


def rebuilding(error: DamagedFileError, what: str) -> None:
    """The one line a cache says when it drops a damaged file and builds it again."""
    log.warning("%s (%s: rebuilding it)", error, what)
