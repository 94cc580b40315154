"""TileDataset: global row id -> (transform(tile), row_id), and the tile source built from config.

`build_tile_source` reads the `data:` config section: backend, slides, fallback,
mpp_override, tile_store, cache_size (their meaning and defaults: `DataConfig`, their one home;
keys left out take those defaults).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from multiprocessing.context import get_spawning_popen
from multiprocessing.sharedctypes import RawArray
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from dinov2_patho.config_files import POSITIVE, check_section
from dinov2_patho.data.readers import SlideTileSource, TileReadError, TileSource
from dinov2_patho.data.slides import SlideRegistry
from dinov2_patho.data.tilestore import HDF5TileSource
from dinov2_patho.errors import UserError
from dinov2_patho.logging import get_logger
from dinov2_patho.registry import did_you_mean

log = get_logger(__name__)

ON_ERROR = ("raise", "skip")
SOURCES = ("openslide", "tiffslide", "hdf5")
# Candidates tried, over all levels, before a skip gives up on a tile.
MAX_SUBSTITUTE_TRIES = 16
_SCAN_CHUNK = 1 << 20
# Substitution counters in shared memory: slot 0 for the main process, 1 + worker id for workers,
# so each slot has one writer and needs no lock.
_COUNTER_SLOTS = 1025
# Row ids (+1; 0: empty) of substituted tiles of distinct slides, a few per counter slot: enough
# to name the unreadable slides when their count stops a run.
_ROWS_PER_SLOT = 4
_SHARED = ("_substitutions", "_substituted_rows")


@dataclass
class DataConfig:
    """The `data` section of the training config: the tile index, its view, and where tiles come from."""

    index: str | None = None          # required: TileIndex directory (`dinov2-patho index build`)
    subset: str | None = None         # optional .npy of global row ids: train on this view of the index
    backend: str = "openslide"        # openslide | tiffslide (slide files) | hdf5 (a tile store)
    slides: str | None = None         # slide directory (<slide_id>.<ext>) or a slide_id,path CSV
    fallback: str | None = "tiffslide"  # backend tried when `backend` cannot open a slide; null: none
    mpp_override: float | None = None  # um/px for every slide instead of each slide's own
    tile_store: str | None = None     # hdf5: directory of <slide_id>.h5 (`dinov2-patho tiles`)
    cache_size: int = 16              # open slides / files kept per process
    on_error: str = "raise"           # raise | skip (substitute a tile of the same cluster, counted)
    # on_error=skip: stop once more tiles than this were substituted (over all ranks), naming their
    # slides; null: no limit
    max_skipped: int | None = None

    def __post_init__(self) -> None:
        check_section("data", self, numbers={"mpp_override": POSITIVE},
                      integers={"cache_size": 1, "max_skipped": 0}, optional=("mpp_override", "max_skipped"),
                      choices={"on_error": ON_ERROR})


def build_tile_source(cfg: Mapping[str, Any], mpp_key: str = "data.mpp_override") -> TileSource:
    """The tile source described by a `data:` config section (see the module docstring); `mpp_key`
    names the caller's setting of `mpp_override` in errors."""
    defaults = asdict(DataConfig())
    c = {**defaults, **{k: cfg[k] for k in cfg if k in defaults}}
    backend = c["backend"]
    if backend == "hdf5":
        if not c["tile_store"]:
            raise UserError("data.tile_store must name a tile store directory when data.backend is hdf5")
        return HDF5TileSource(c["tile_store"], cache_size=int(c["cache_size"]))
    if backend not in ("openslide", "tiffslide"):
        raise UserError(f"data.backend {backend!r} is unknown{did_you_mean(str(backend), SOURCES)}")
    if not c["slides"]:
        raise UserError(f"data.slides must name a slide directory or CSV when data.backend is {backend}")
    mpp = c["mpp_override"]
    return SlideTileSource(SlideRegistry.from_spec(c["slides"]), backend=backend, fallback=c["fallback"],
                           mpp_override=None if mpp is None else float(mpp), cache_size=int(c["cache_size"]),
                           mpp_key=mpp_key)


class TileDataset(Dataset):
    """Map-style dataset indexed by GLOBAL row id of `index` (what the samplers yield).

    Returns `(transform(uint8 tensor [3, 224, 224]), row_id)`; the tensor may be a strided view.
    With `on_error="skip"` an unreadable tile is replaced by another tile of the same cluster
    (finest level first, then coarser ones); every substitution is logged as a warning and
    counted in `substitutions`, summed over the DataLoader workers (`unreadable_slides` names some
    of their slides). The returned row id is the one asked for, so batches keep the sampler's ids.
    """

    def __init__(self, index: Any, source: TileSource,
                 transform: Callable[[torch.Tensor], Any] | None = None, on_error: str = "raise"):
        if on_error not in ON_ERROR:
            raise UserError(f"on_error {on_error!r} is unknown{did_you_mean(on_error, ON_ERROR)}")
        self.index = index
        self.source = source
        self.transform = transform
        self.on_error = on_error
        self._substitutions = RawArray("q", _COUNTER_SLOTS)
        self._substituted_rows = RawArray("q", _COUNTER_SLOTS * _ROWS_PER_SLOT)
        self._members: dict[tuple[int, int], np.ndarray] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_members"] = {}
        if get_spawning_popen() is None:
            # Plain pickling, not a worker start: shared memory only travels to child processes.
            for name in _SHARED:
                state[name] = list(state[name])
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        for name in _SHARED:
            if isinstance(state[name], list):
                state[name] = RawArray("q", state[name])
        self.__dict__.update(state)

    @property
    def substitutions(self) -> int:
        """Tiles replaced under `on_error="skip"`, over this process and its DataLoader workers."""
        return int(sum(self._substitutions))

    @property
    def unreadable_slides(self) -> list[str]:
        """Slides of substituted tiles, over this process and its workers (up to a few per process)."""
        return sorted({self.index.tile(r - 1)[0] for r in self._substituted_rows if r})

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, row_id: int) -> tuple[Any, int]:
        return self.__getitems__([row_id])[0]

    def __getitems__(self, row_ids: Sequence[int]) -> list[tuple[Any, int]]:
        """The items of a batch of row ids (the DataLoader passes a whole batch here when it can),
        located by one vectorised index lookup instead of one `tile()` call per row."""
        rows = np.asarray([int(r) for r in row_ids], dtype=np.int64)
        slides, xs, ys = self.index.tiles(rows)
        names = self.index.slide_names
        return [self._item(row, names[s], x, y)
                for row, s, x, y in zip(rows.tolist(), slides.tolist(), xs.tolist(), ys.tolist())]

    def _item(self, row_id: int, slide_id: str, x: int, y: int) -> tuple[Any, int]:
        try:
            tile = self.source.read(slide_id, x, y)
        except TileReadError as error:
            if self.on_error == "raise":
                raise
            tile = self._substitute(row_id, error)
        # A view, no copy: the batch collate or the first augmentation copies anyway.
        tensor = torch.from_numpy(tile).permute(2, 0, 1)
        return (self.transform(tensor) if self.transform is not None else tensor), row_id

    def _read(self, row_id: int) -> np.ndarray:
        slide_id, x, y = self.index.tile(row_id)
        return self.source.read(slide_id, int(x), int(y))

    def _substitute(self, row_id: int, error: TileReadError) -> np.ndarray:
        rng = np.random.default_rng(row_id)
        tried = {row_id}
        this_row = self.index.select(np.array([row_id], np.int64))  # its clusters, without the whole view
        for k in range(1, self.index.num_levels + 1):
            for candidate in rng.permutation(self._cluster_rows(k, int(this_row.level(k)[0]), rng)).tolist():
                if len(tried) > MAX_SUBSTITUTE_TRIES:
                    break
                if candidate in tried:
                    continue
                tried.add(candidate)
                try:
                    tile = self._read(candidate)
                except TileReadError:
                    continue
                worker = get_worker_info()
                slot = 0 if worker is None else 1 + worker.id % (_COUNTER_SLOTS - 1)
                self._substitutions[slot] += 1
                self._record_slide(slot, row_id, error.slide_id)
                log.warning("%s; substituted row %d of the same level_%d cluster (%d substitutions so far)",
                            error, candidate, k, self.substitutions)
                return tile
        raise TileReadError(error.slide_id, error.x, error.y,
                            f"{error.reason}; and no readable substitute among {len(tried) - 1} tiles of its "
                            f"clusters") from error

    def _record_slide(self, slot: int, row_id: int, slide_id: str) -> None:
        first = slot * _ROWS_PER_SLOT
        rows = self._substituted_rows[first:first + _ROWS_PER_SLOT]
        if 0 in rows and slide_id not in {self.index.tile(r - 1)[0] for r in rows if r}:
            self._substituted_rows[first + rows.index(0)] = row_id + 1

    def _cluster_rows(self, k: int, cluster: int, rng: np.random.Generator) -> np.ndarray:
        """Some global row ids of the view's rows in a level-k cluster (cached; errors are rare).

        A chunked scan of the level column from a random chunk, stopping once it has enough: the
        column may hold 350M rows, and a full index must not materialise its row ids.
        """
        key = (k, cluster)
        if key not in self._members:
            column = self.index.level(k)
            chunks = range(0, len(column), _SCAN_CHUNK)
            first = int(rng.integers(len(chunks))) if len(chunks) else 0
            found: list[int] = []
            for start in [*chunks[first:], *chunks[:first]]:
                found += (start + np.flatnonzero(column[start:start + _SCAN_CHUNK] == cluster)).tolist()
                if len(found) > 2 * MAX_SUBSTITUTE_TRIES:
                    break
            positions = np.array(found, np.int64)
            self._members[key] = self.index.row_ids(positions)
        return self._members[key]
