"""Tile readers over whole-slide images: OpenSlide or tiffslide, chosen by name, with a fallback.

A tile is `TILE_UM` (112 um) square at level 0, i.e. `round(112 / mpp)` level-0 px, returned
resized to `TILE_PX` (224) px. When a pyramid level has an integer downsample k that divides
the tile size and still leaves >= 224 px, the tile is read there (k^2 fewer pixels, same
footprint). Sources are picklable: open slides live in a per-process LRU cache that is never
pickled and is dropped after a fork, so every DataLoader worker opens its own handles.
"""

from __future__ import annotations

import ctypes
import os
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import numpy as np
from PIL import Image

from dinov2_patho.data.slides import SlideRegistry
from dinov2_patho.errors import UserError
from dinov2_patho.logging import get_logger
from dinov2_patho.registry import did_you_mean

log = get_logger(__name__)

TILE_UM = 112.0
TILE_PX = 224
BACKENDS = ("openslide", "tiffslide")


class TileReadError(UserError):
    """A tile that cannot be read: names the slide and the level-0 coordinates."""

    def __init__(self, slide_id: str, x: int, y: int, reason: str):
        super().__init__(f"slide {slide_id!r}, tile at level-0 (x={x}, y={y}): {reason}")
        self.slide_id, self.x, self.y, self.reason = slide_id, x, y, reason


class MissingMppError(UserError):
    pass


class TileSource(Protocol):
    def read(self, slide_id: str, x: int, y: int) -> np.ndarray:
        """[224, 224, 3] uint8 RGB, possibly a strided view (of RGBA memory, say)."""
        ...


class TileGeometry(NamedTuple):
    mpp: float
    size0: int  # tile side in level-0 px
    level: int  # pyramid level read from
    read_px: int  # tile side in px at that level
    width: int  # level-0 slide size
    height: int


def tile_geometry(mpp: float, dims: tuple[int, int], downsamples: tuple[float, ...]) -> TileGeometry:
    size0 = round(TILE_UM / mpp)
    level, read_px = 0, size0
    for lvl, ds in enumerate(downsamples):
        k = round(ds)
        # Only exact integer downsamples keep the footprint: the level's pixel grid must tile size0.
        if k > 1 and abs(ds - k) <= 0.01 * k and size0 % k == 0 and size0 // k >= TILE_PX:
            level, read_px = lvl, size0 // k
    return TileGeometry(mpp, size0, level, read_px, dims[0], dims[1])


def resize_tile(arr: np.ndarray) -> np.ndarray:
    """Square HxWxC tile -> TILE_PX: an exact box reduce when the factor is an integer, else
    bilinear (which PIL antialiases when shrinking)."""
    if arr.shape[0] == TILE_PX:
        return arr
    img = Image.fromarray(np.ascontiguousarray(arr))
    if img.width % TILE_PX == 0:
        return np.asarray(img.reduce(img.width // TILE_PX))
    return np.asarray(img.resize((TILE_PX, TILE_PX), Image.BILINEAR))


# --- backends: open(path) -> (handle, properties, dims, downsamples); read(...) -> HxWx(3|4) uint8


def _openslide_open(path: str) -> tuple[Any, dict[str, str], tuple[int, int], tuple[float, ...]]:
    import openslide

    h = openslide.OpenSlide(path)
    return h, dict(h.properties), h.dimensions, tuple(h.level_downsamples)


def _openslide_read(h: Any, x: int, y: int, level: int, size: int) -> np.ndarray:
    """RGBA [size, size, 4]; in-bounds pixels are opaque, so callers just drop alpha.

    `OpenSlide.read_region` minus its PIL image: OpenSlide fills our own array, converted in place
    by openslide-python's own routine. It saves a copy per tile (~8% of a 224-px read; the
    benchmark's >= 0.9x target needs it). tests/test_readers.py checks it against read_region.
    """
    from openslide import _convert, lowlevel

    buf = np.empty((size, size, 4), np.uint8)
    words = buf.view(np.uint32)
    pointer = words.ctypes.data_as(ctypes.POINTER(ctypes.c_uint32))
    lowlevel._read_region(h._osr, pointer, x, y, level, size, size)
    _convert.argb2rgba(words)  # premultiplied native-endian ARGB -> RGBA
    return buf


def _tiffslide_open(path: str) -> tuple[Any, dict[str, str], tuple[int, int], tuple[float, ...]]:
    import tiffslide

    h = tiffslide.TiffSlide(path)
    props = {k.replace("tiffslide.", "openslide."): v for k, v in h.properties.items()}
    return h, props, h.dimensions, tuple(h.level_downsamples)


def _tiffslide_read(h: Any, x: int, y: int, level: int, size: int) -> np.ndarray:
    return h.read_region((x, y), level, (size, size), as_array=True)


_BACKENDS: dict[str, tuple[Callable, Callable]] = {
    "openslide": (_openslide_open, _openslide_read),
    "tiffslide": (_tiffslide_open, _tiffslide_read),
}


class HandleCache:
    """A per-process LRU of open file handles (anything with `.close()`).

    Pickles empty and forgets the parent's handles after a fork: libraries' handles carry file
    offsets and internal caches that must not be shared between processes.
    """

    def __init__(self, size: int):
        if size < 1:
            raise UserError(f"cache_size must be >= 1, got {size}")
        self.size = size
        self._items: OrderedDict[str, Any] = OrderedDict()
        self._pid = os.getpid()

    def __getstate__(self) -> dict[str, Any]:
        return {"size": self.size, "_items": OrderedDict(), "_pid": None}

    def get(self, key: str, opener: Callable[[], Any]) -> Any:
        if self._pid != os.getpid():
            self._items, self._pid = OrderedDict(), os.getpid()
        item = self._items.get(key)
        if item is not None:
            self._items.move_to_end(key)
            return item
        item = self._items[key] = opener()
        if len(self._items) > self.size:
            self._items.popitem(last=False)[1].close()
        return item

    def evict(self, key: str) -> None:
        item = self._items.pop(key, None)
        if item is not None:
            item.close()

    def __len__(self) -> int:
        return len(self._items)

    def close(self) -> None:
        for item in self._items.values():
            item.close()
        self._items.clear()


@dataclass
class _Slide:
    handle: Any
    backend: str
    geometry: TileGeometry

    def close(self) -> None:
        self.handle.close()


class SlideTileSource:
    """Tiles from whole-slide image files located through a `SlideRegistry`."""

    def __init__(self, registry: SlideRegistry, backend: str = "openslide",
                 fallback: str | None = "tiffslide", mpp_override: float | None = None, cache_size: int = 16,
                 mpp_key: str = "data.mpp_override"):
        """`mpp_key`: the caller's name for `mpp_override`, which a slide without mpp asks to set."""
        for key, name in (("backend", backend), ("fallback", fallback)):
            if name is not None and name not in _BACKENDS:
                raise UserError(f"unknown slide {key} {name!r}{did_you_mean(name, BACKENDS)}")
        if mpp_override is not None and not mpp_override > 0:
            raise UserError(f"{mpp_key} must be a positive number of um/px, got {mpp_override!r}")
        self.registry = registry
        self.backends = tuple(dict.fromkeys(b for b in (backend, fallback) if b is not None))
        self.mpp_override = mpp_override
        self.mpp_key = mpp_key
        self.cache = HandleCache(cache_size)

    def read(self, slide_id: str, x: int, y: int) -> np.ndarray:
        slide = self._slide(slide_id, x, y)
        g = slide.geometry
        if x < 0 or y < 0 or x + g.size0 > g.width or y + g.size0 > g.height:
            raise TileReadError(slide_id, x, y, f"outside the slide's bounds: a {g.size0}-px tile does not "
                                                f"fit in {g.width}x{g.height} px (mpp {g.mpp:g})")
        try:
            arr = _BACKENDS[slide.backend][1](slide.handle, x, y, g.level, g.read_px)
        except Exception as e:  # the backends raise their own types for corrupt data
            # An OpenSlide handle stays in error once a read fails: reopen for the next tile.
            self.cache.evict(slide_id)
            reason = f"{slide.backend} read failed: {type(e).__name__}: {e}"
            raise TileReadError(slide_id, x, y, reason) from e
        return resize_tile(arr)[..., :3]

    def geometry(self, slide_id: str) -> TileGeometry:
        return self._slide(slide_id, 0, 0).geometry

    def probe(self, slide_id: str) -> TileGeometry:
        """Open `slide_id` outside the handle cache (safe from several threads), close it, and
        return its geometry; raises as a tile read would (missing, unreadable, no mpp)."""
        slide = self._open(slide_id, 0, 0)
        slide.close()
        return slide.geometry

    def backend_of(self, slide_id: str) -> str:
        return self._slide(slide_id, 0, 0).backend

    def thumbnail(self, slide_id: str, size: tuple[int, int]) -> np.ndarray:
        """The whole slide as RGB uint8 fitting in `size` (w, h), aspect kept (both backends read
        it from the best pyramid level)."""
        slide = self._slide(slide_id, 0, 0)
        return np.asarray(slide.handle.get_thumbnail(size).convert("RGB"))

    def close(self) -> None:
        self.cache.close()

    def _slide(self, slide_id: str, x: int, y: int) -> _Slide:
        return self.cache.get(slide_id, lambda: self._open(slide_id, x, y))

    def _open(self, slide_id: str, x: int, y: int) -> _Slide:
        path = str(self.registry.path(slide_id))
        failures = []
        for backend in self.backends:
            try:
                handle, props, dims, downsamples = _BACKENDS[backend][0](path)
            except Exception as e:  # ImportError, unsupported format, corrupt file
                failures.append(f"{backend}: {type(e).__name__}: {e}")
                continue
            if failures:
                log.warning("slide %s (%s) opened with fallback %s after %s", slide_id, path, backend,
                            failures)
            return _Slide(handle, backend, tile_geometry(self._mpp(slide_id, path, props), dims, downsamples))
        raise TileReadError(slide_id, x, y, f"cannot open {path}: {'; '.join(failures)}")

    def _mpp(self, slide_id: str, path: str, props: dict[str, str]) -> float:
        if self.mpp_override is not None:
            return float(self.mpp_override)
        try:
            mpp_x, mpp_y = float(props["openslide.mpp-x"]), float(props["openslide.mpp-y"])
        except (KeyError, ValueError, TypeError):  # absent, unparsable, or None (tiffslide)
            raise MissingMppError(f"slide {slide_id!r} ({path}) has no microns-per-pixel in its properties "
                                  f"(openslide.mpp-x/mpp-y); set {self.mpp_key}") from None
        if not mpp_x > 0 or abs(mpp_x - mpp_y) > 0.01 * mpp_x:
            raise MissingMppError(f"slide {slide_id!r} ({path}): mpp-x {mpp_x} and mpp-y {mpp_y} are not a "
                                  f"positive square pixel; set {self.mpp_key}")
        return mpp_x
