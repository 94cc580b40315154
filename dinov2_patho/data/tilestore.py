"""HDF5 tile store: pre-extracted tiles, one file per slide (`dinov2-patho tiles extract`).

`<store>/<slide_id>.h5` holds
- `tiles`: uint8 [N, 224, 224, 3], raw (uncompressed), one chunk per tile;
- `coords`: int32 [N, 2], the level-0 (x, y) of each tile, rows sorted by (y, x);
- attributes `slide_id`, `tile_um`, `tile_px`.
Each file is written beside its final name and renamed when complete, so extraction resumes
per slide: a slide whose file exists with the expected coordinates is skipped.
"""

from __future__ import annotations

from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from dinov2_patho.data.readers import (
    TILE_PX,
    TILE_UM,
    HandleCache,
    SlideTileSource,
    TileReadError,
    TileSource,
)
from dinov2_patho.data.slides import SlideNotFoundError, SlideRegistry
from dinov2_patho.errors import UserError
from dinov2_patho.io import atomic_path
from dinov2_patho.logging import get_logger
from dinov2_patho.progress import progress_bar
from dinov2_patho.slide_files import slide_path

log = get_logger(__name__)

SUFFIX = ".h5"


def _key(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """One int64 per coordinate pair, ordered by (y, x): row-major reads stay local in the slide."""
    return (np.asarray(y, np.int64) << 32) | np.asarray(x, np.int64)


class _StoreFile:
    def __init__(self, path: Path):
        self.path = path
        self.file = h5py.File(path, "r")
        self.tiles = self.file["tiles"]
        coords = self.file["coords"][:]
        self.rows = dict(zip(_key(coords[:, 0], coords[:, 1]).tolist(), range(len(coords))))

    def close(self) -> None:
        self.file.close()


class HDF5TileSource:
    """Reads tiles written by `extract_tiles`; picklable, each process opens its own files."""

    def __init__(self, root: str | Path, cache_size: int = 16):
        self.root = Path(root)
        if not self.root.is_dir():
            raise UserError(f"tile store {self.root} is not a directory")
        self.cache = HandleCache(cache_size)

    def path(self, slide_id: str) -> Path:
        return slide_path(self.root, slide_id, SUFFIX)

    def read(self, slide_id: str, x: int, y: int) -> np.ndarray:
        store = self.cache.get(slide_id, lambda: self._open(slide_id, x, y))
        row = store.rows.get(int(_key(x, y)))
        if row is None:
            raise TileReadError(slide_id, x, y, f"not in the tile store file {store.path}")
        try:
            return store.tiles[row]
        except Exception as e:  # h5py raises OSError/KeyError variants for damaged chunks
            raise TileReadError(slide_id, x, y, f"{store.path}: {type(e).__name__}: {e}") from e

    def close(self) -> None:
        self.cache.close()

    def _open(self, slide_id: str, x: int, y: int) -> _StoreFile:
        path = self.path(slide_id)
        if not path.is_file():
            raise SlideNotFoundError(f"slide {slide_id!r} has no file {path} in the tile store "
                                     f"(run `dinov2-patho tiles extract`)")
        try:
            return _StoreFile(path)
        except Exception as e:
            raise TileReadError(slide_id, x, y, f"cannot open {path}: {type(e).__name__}: {e}") from e


def _slide_coords(index: Any, slide_ids: Iterable[str] | None) -> dict[str, np.ndarray]:
    """slide_id -> unique level-0 (x, y) int32 [n, 2] of its tiles, sorted by (y, x); read a chunk of the
    index at a time, so memory is the wanted slides' coordinates, not the whole index's columns."""
    names = index.slide_names
    wanted = set(names) if slide_ids is None else set(slide_ids)
    unknown = wanted - set(names)
    if unknown:
        raise UserError(f"slide(s) not in the index {index.path}: {sorted(unknown)[:5]}")
    is_wanted = np.array([name in wanted for name in names], dtype=bool)
    keys_of: dict[int, list[np.ndarray]] = {}
    for chunk in index.chunks():
        slides, (xs, ys) = index.slides(chunk), index.coords(chunk)
        keep = is_wanted[slides]
        slides, keys = slides[keep], _key(xs[keep], ys[keep])
        order = np.argsort(slides, kind="stable")
        present, starts = np.unique(slides[order], return_index=True)
        for s, part in zip(present.tolist(), np.split(keys[order], starts[1:])):
            keys_of.setdefault(s, []).append(part)
    out = {}
    for s, name in enumerate(names):
        if s in keys_of:
            keys = np.unique(np.concatenate(keys_of.pop(s)))
            out[name] = np.stack([keys & 0xFFFFFFFF, keys >> 32], axis=1).astype(np.int32)
    return out


def _existing_coords(path: Path) -> np.ndarray | None:
    try:
        with h5py.File(path, "r") as f:
            return f["coords"][:]
    except (OSError, KeyError):
        return None


def extract_slide(source: TileSource, slide_id: str, coords: np.ndarray, path: Path) -> int:
    """Write one slide's tiles to `path` atomically; return the number of tiles."""
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        tiles = f.create_dataset("tiles", (len(coords), TILE_PX, TILE_PX, 3), np.uint8,
                                 chunks=(1, TILE_PX, TILE_PX, 3))
        f.create_dataset("coords", data=coords)
        f.attrs.update({"slide_id": slide_id, "tile_um": TILE_UM, "tile_px": TILE_PX})
        for i, (x, y) in enumerate(coords.tolist()):
            tiles[i] = source.read(slide_id, x, y)
    return len(coords)


def extract_tiles(index: Any, source: TileSource, out_dir: str | Path, *,
                  slide_ids: Iterable[str] | None = None, overwrite: bool = False,
                  workers: int = 1, progress: bool = False) -> dict[str, int]:
    """Extract every tile of `index` (or of `slide_ids`) into `out_dir`, one HDF5 file per slide.

    Returns slide_id -> tiles written (0 for a slide already complete, which is skipped).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    todo, written = [], {}
    for slide_id, coords in _slide_coords(index, slide_ids).items():
        path = slide_path(out, slide_id, SUFFIX)
        if path.exists() and not overwrite:
            existing = _existing_coords(path)
            if existing is not None and np.array_equal(existing, coords):
                written[slide_id] = 0
                continue
            raise UserError(f"{path} exists but does not hold this index's tiles for slide {slide_id!r}; "
                            f"pass --overwrite to replace it")
        todo.append((slide_id, coords, path))
    log.info("extracting %d slides (%d already done) into %s", len(todo), len(written), out)
    bar = progress_bar(total=sum(len(coords) for _, coords, _ in todo), desc="tiles extract", unit="tile",
               disable=not progress)
    if workers <= 1:
        for slide_id, coords, path in todo:
            written[slide_id] = extract_slide(source, slide_id, coords, path)
            bar.update(len(coords))
    else:
        with ProcessPoolExecutor(workers) as pool:
            futures = {pool.submit(extract_slide, source, sid, coords, path): sid
                       for sid, coords, path in todo}
            for future in as_completed(futures):
                written[futures[future]] = future.result()
                bar.update(written[futures[future]])
    bar.close()
    return written


def extract_tile_store(index: str | Path, slides: str | Path, out: str | Path, *, backend: str = "openslide",
                       fallback: str | None = "tiffslide", mpp_override: float | None = None,
                       slide_ids: Iterable[str] | None = None, workers: int = 1, overwrite: bool = False,
                       progress: bool = True) -> dict[str, int]:
    """`tiles extract`: every tile of the tile index `index` (or of `slide_ids`), read from `slides` (a
    folder or a `slide_id,path` CSV) by `backend` (`fallback` where it cannot open a slide), into the
    tile store OUT, one HDF5 file per slide, over `workers` processes; resumed per slide. Returns
    slide_id -> tiles written (0 for a slide already complete)."""
    from dinov2_patho.data.index import TileIndex

    tile_index = TileIndex.open(index)
    source = SlideTileSource(SlideRegistry.from_spec(slides), backend=backend, fallback=fallback,
                             mpp_override=mpp_override, mpp_key="--mpp-override")
    written = extract_tiles(tile_index, source, out, slide_ids=slide_ids, overwrite=overwrite,
                            workers=workers, progress=progress)
    done = sum(1 for n in written.values() if n)
    print(f"{done} slides extracted ({sum(written.values())} tiles), {len(written) - done} already complete, "
          f"in {out}")
    return written
