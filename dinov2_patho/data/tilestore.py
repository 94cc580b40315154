"""HDF5 tile store: pre-extracted tiles, one file per slide, and the `dinov2-patho tiles` command.

`<store>/<slide_id>.h5` holds
- `tiles`: uint8 [N, 224, 224, 3], raw (uncompressed), one chunk per tile;
- `coords`: int32 [N, 2], the level-0 (x, y) of each tile, rows sorted by (y, x);
- attributes `slide_id`, `tile_um`, `tile_px`.
Each file is written beside its final name and renamed when complete, so extraction resumes
per slide: a slide whose file exists with the expected coordinates is skipped.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from dinov2_patho.data.readers import (
    BACKENDS,
    TILE_PX,
    TILE_UM,
    HandleCache,
    SlideTileSource,
    TileReadError,
    TileSource,
)
from dinov2_patho.data.slides import SLIDES_HELP, SlideNotFoundError, SlideRegistry
from dinov2_patho.errors import UserError
from dinov2_patho.io import atomic_path
from dinov2_patho.logging import get_logger
from dinov2_patho.progress import progress_bar
from dinov2_patho.slide_files import slide_path

log = get_logger(__name__)

SUFFIX = ".h5"
PREVIEW_BY = ("random", "slide", "cluster")


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


# --- `dinov2-patho tiles` ----------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    ext = sub.add_parser("extract", help="write the index's tiles into per-slide HDF5 files (resumable)")
    ext.add_argument("--index", required=True, help="tile index directory (`dinov2-patho index build`)")
    ext.add_argument("--slides", required=True, help=SLIDES_HELP)
    ext.add_argument("--out", required=True, help="tile store directory")
    ext.add_argument("--backend", default="openslide", choices=BACKENDS, help="whole-slide reader")
    ext.add_argument("--fallback", default="tiffslide", choices=(*BACKENDS, "none"),
                     help="reader tried when --backend cannot open a slide")
    ext.add_argument("--mpp-override", type=float, default=None, help="um/px for every slide")
    ext.add_argument("--slide-id", action="append", default=None, help="only this slide (repeatable)")
    ext.add_argument("--workers", type=int, default=1, help="processes, one slide each at a time")
    ext.add_argument("--overwrite", action="store_true", help="rewrite slides whose files exist")
    ext.add_argument("--no-progress", action="store_true", help="no progress bar")
    pre = sub.add_parser("preview", help="an image grid of tiles, one row per slide, cluster or random draw, "
                         "read as training reads them (112 um at level 0, resized)")
    pre.add_argument("--index", required=True, help="tile index directory (`dinov2-patho index build`)")
    pre.add_argument("--slides", help=SLIDES_HELP)
    pre.add_argument("--tile-store", help="read from this tile store (`tiles extract`) instead of the slides")
    pre.add_argument("--out", required=True, help="image file to write, in the format its suffix says "
                                                  "(.png, .jpg, .webp, ...)")
    pre.add_argument("--by", default="random", choices=PREVIEW_BY,
                     help="one row per slide, per cluster of --level, or of random rows (default)")
    pre.add_argument("--rows", type=int, default=8, help="rows of the grid (slides, clusters or draws)")
    pre.add_argument("--cols", type=int, default=8, help="tiles per row")
    pre.add_argument("--level", default=None,
                     help="--by cluster: tree level, 1..K or level_K (default: the coarsest)")
    pre.add_argument("--cluster", action="append", default=None,
                     help="--by cluster: this cluster id, as in the CSV (repeatable; default: the largest)")
    pre.add_argument("--slide-id", action="append", default=None,
                     help="--by slide: this slide (repeatable; default: --rows random slides)")
    pre.add_argument("--tile-px", type=int, default=112, help="side of each tile in the grid, px")
    pre.add_argument("--seed", type=int, default=0, help="seed of the random choices")
    pre.add_argument("--backend", default="openslide", choices=BACKENDS, help="whole-slide reader")
    pre.add_argument("--fallback", default="tiffslide", choices=(*BACKENDS, "none"),
                     help="reader tried when --backend cannot open a slide")
    pre.add_argument("--mpp-override", type=float, default=None, help="um/px for every slide")
    pre.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from dinov2_patho.data.index import TileIndex

    if args.action == "preview":
        return _preview(args)
    index = TileIndex.open(args.index)
    source = SlideTileSource(SlideRegistry.from_spec(args.slides), backend=args.backend,
                             fallback=None if args.fallback == "none" else args.fallback,
                             mpp_override=args.mpp_override, mpp_key="--mpp-override")
    written = extract_tiles(index, source, args.out, slide_ids=args.slide_id, overwrite=args.overwrite,
                            workers=args.workers, progress=not args.no_progress)
    done = sum(1 for n in written.values() if n)
    print(f"{done} slides extracted ({sum(written.values())} tiles), {len(written) - done} already complete, "
          f"in {args.out}")
    return 0


def _preview(args: argparse.Namespace) -> int:
    from dinov2_patho.data.dataset import build_tile_source
    from dinov2_patho.data.index import TileIndex
    from dinov2_patho.report import mosaic

    if args.rows < 1 or args.cols < 1 or args.tile_px < 8:
        raise UserError(f"--rows and --cols must be >= 1 and --tile-px >= 8, got {args.rows}, {args.cols}, "
                        f"{args.tile_px}")
    image_format = _image_format(args.out)
    index = TileIndex.open(args.index)
    source = build_tile_source({"backend": "hdf5" if args.tile_store else args.backend, "slides": args.slides,
                                "tile_store": args.tile_store, "mpp_override": args.mpp_override,
                                "fallback": None if args.fallback == "none" else args.fallback},
                                mpp_key="--mpp-override")
    rng = np.random.default_rng(args.seed)
    if args.by == "slide":
        slides = args.slide_id or [index.slide_names[i] for i in
                                   mosaic.sample_rows(len(index.slide_names), args.rows, rng)]
        index.select_slides(slides)  # an unknown slide is an error naming it
        groups = mosaic.slide_groups(index, slides, args.cols, args.seed)
    elif args.by == "cluster":
        level = mosaic.parse_level(index, args.level or index.num_levels)
        codes = _cluster_codes(index, level, args.cluster, args.rows)
        groups = mosaic.cluster_groups(index, level, codes, args.cols, args.seed)
    else:
        groups = mosaic.random_groups(index, args.rows, args.cols, args.seed)
    grid = mosaic.read_grid(index, source, groups, args.tile_px, progress=not args.no_progress)
    with atomic_path(args.out) as tmp:
        mosaic.draw_grid(grid, args.tile_px).save(tmp, format=image_format)
    tiles = sum(len(g.row_ids) for g in groups)
    print(f"{args.out}: {len(groups)} rows, {tiles} tiles by {args.by}"
          + (f"; {len(grid.errors)} unreadable (red), first: {grid.errors[0]}" if grid.errors else ""))
    return 0


def _image_format(path: str | Path) -> str:
    """The PIL format that writes `path`, by its suffix (.jpg wrote PNG bytes once), or a UserError."""
    from PIL import Image

    Image.init()
    suffix = Path(path).suffix.lower()
    image_format = Image.registered_extensions().get(suffix)
    if image_format not in Image.SAVE:
        raise UserError(f"--out {path}: cannot write an image with suffix {suffix or '(none)'!r}; give "
                        f".png, .jpg, .webp, ...")
    return image_format


def _cluster_codes(index: Any, level: int, clusters: list[str] | None, rows: int) -> np.ndarray:
    """Level codes of the cluster ids given (as in the CSV), or of the `rows` largest clusters."""
    from dinov2_patho.report.mosaic import largest_and_smallest

    if not clusters:
        return largest_and_smallest(index.cluster_sizes(level), rows)[0]
    code_of = {int(v): c for c, v in enumerate(index.cluster_values(level).tolist())}
    codes = []
    for cluster in clusters:
        if not cluster.lstrip("-").isdigit() or int(cluster) not in code_of:
            raise UserError(f"--cluster {cluster}: no such cluster at {index.level_names[level - 1]} of "
                            f"{index.path} ({len(code_of)} clusters)")
        codes.append(code_of[int(cluster)])
    return np.array(codes, np.int64)
