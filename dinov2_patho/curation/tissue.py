"""`curate tiles`: tissue detection and the 112 um tile grid of every slide.

Tissue is found on a low-resolution thumbnail by Otsu's threshold on the saturation (HSV), as the
paper's pipeline, Midnight and Virchow do (on a log scale, closed, small holes filled: `tissue_mask`). The
grid has `round(112 / mpp)` level-0 px tiles from (0, 0); a tile is kept when at least
`min_tissue_fraction` of its footprint is tissue. Output in TILES_DIR:

    tiles.csv    slide_id,tile_x,tile_y: slides in registry order, each slide's rows contiguous
    index/       the same rows as a TileIndex with no cluster levels (what `curate embed` reads)
    slides.csv   per slide: status (ok | error), reason, tiles, tissue fraction, mpp, tile and slide size
    tiles.json   the settings and the slide source (`curate embed` reads tiles with the same mpp)

A slide that cannot be read is reported in slides.csv and the summary, and has no tiles.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from itertools import repeat
from pathlib import Path
from typing import Any

import numpy as np

from dinov2_patho.config_files import POSITIVE, UNIT_HALF_OPEN, check_section
from dinov2_patho.data.folders import INDEX, SETTINGS, SLIDES_CSV, TILES_CSV
from dinov2_patho.errors import UserError
from dinov2_patho.io import atomic_path, atomic_write_text
from dinov2_patho.logging import get_logger
from dinov2_patho.slide_files import check_distinct_case

log = get_logger(__name__)

REPORT_COLUMNS = ("slide_id", "status", "reason", "tiles", "tissue_fraction", "mpp", "tile_px", "width",
                  "height")


@dataclass
class TilesConfig:
    """The `tiles` section of the curation config (`curate tiles`). Tissue = Otsu's threshold on the log
    saturation of a low-resolution thumbnail (the paper's pipeline, Midnight and Virchow threshold
    saturation with Otsu), closed, holes up to max_hole_tiles filled."""

    thumbnail_px_per_tile: int = 16   # thumbnail resolution, in pixels per tile side
    min_saturation: int = 8           # floor on the threshold (0-255; CLAM's fixed threshold)
    closing_px: int = 5               # morphological closing, square side in thumbnail px (0: none)
    max_hole_tiles: int = 4           # holes inside tissue up to this area (in tiles) are tissue: fat, tears
    min_tissue_fraction: float = 0.5  # a tile is kept when at least this fraction of it is tissue
    mpp_override: float | None = None  # um/px for slides without it in their properties (round(112 / mpp) px)
    backend: str = "openslide"
    fallback: str | None = "tiffslide"
    workers: int = 2                  # processes over slides (1: in this process)

    def __post_init__(self) -> None:
        check_section("tiles", self,
                      numbers={"min_tissue_fraction": UNIT_HALF_OPEN, "mpp_override": POSITIVE},
                      integers={"thumbnail_px_per_tile": 1, "min_saturation": 0, "closing_px": 0,
                                "max_hole_tiles": 0, "workers": 1}, optional=("mpp_override",))


@dataclass
class SlideTiles:
    slide_id: str
    status: str = "ok"
    reason: str = ""
    x: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    y: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    tissue_fraction: float | None = None
    mpp: float | None = None
    tile_px: int | None = None
    width: int | None = None
    height: int | None = None
    num_tiles: int = 0

    def report_row(self) -> list[Any]:
        frac = None if self.tissue_fraction is None else round(self.tissue_fraction, 4)
        return [self.slide_id, self.status, self.reason, self.num_tiles, frac, self.mpp, self.tile_px,
                self.width, self.height]


def otsu_threshold(values: np.ndarray) -> int:
    """Otsu's threshold of uint8 values: t maximising the between-class variance of (<= t, > t)."""
    hist = np.bincount(values.ravel(), minlength=256).astype(np.float64)
    w0 = np.cumsum(hist)
    m0 = np.cumsum(hist * np.arange(256))
    w1 = w0[-1] - w0
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (m0[-1] * w0 - m0 * w0[-1]) ** 2 / (w0 * w1)
    return int(np.nanargmax(np.where(w1 > 0, between, np.nan))) if (w1 > 0).any() else 255


def tissue_mask(rgb: np.ndarray, cfg: Any) -> np.ndarray:
    """Tissue pixels of a thumbnail: Otsu's threshold on log(1 + saturation), then a closing and the
    filling of holes smaller than `max_hole_tiles` tiles (fat vacuoles, tears; larger ones are lumens).

    On the log scale the glass mode (saturation ~5-15) stands apart from all stains at once; on the
    linear scale a strongly stained region (nuclei-dense tumour, ~130) pulls the threshold above pale
    tissue (stroma, fat ~15-80), which then reads as glass. Never below `min_saturation` (CLAM's fixed 8).
    """
    from PIL import Image
    from scipy import ndimage

    sat = np.asarray(Image.fromarray(rgb).convert("HSV").getchannel("S"))
    log_sat = np.round(np.log1p(sat) * (255 / np.log(256))).astype(np.uint8)
    mask = (log_sat > otsu_threshold(log_sat)) & (sat > cfg.min_saturation)
    if cfg.closing_px > 1:
        mask = ndimage.binary_closing(mask, np.ones((cfg.closing_px, cfg.closing_px), bool), border_value=0)
    holes, n = ndimage.label(ndimage.binary_fill_holes(mask) & ~mask)
    if n:
        small = np.bincount(holes.ravel()) <= cfg.max_hole_tiles * cfg.thumbnail_px_per_tile ** 2
        small[0] = False
        mask |= small[holes]
    return mask


def tile_fractions(mask: np.ndarray, size0: int, width: int, height: int) -> np.ndarray:
    """Tissue fraction [rows, cols] of each full tile of the level-0 grid, from the thumbnail mask
    (a summed-area table: the footprint of tile (r, c) in thumbnail pixels, rounded)."""
    th, tw = mask.shape
    cols, rows = width // size0, height // size0
    ex = np.round(np.arange(cols + 1) * size0 * tw / width).astype(np.int64).clip(0, tw)
    ey = np.round(np.arange(rows + 1) * size0 * th / height).astype(np.int64).clip(0, th)
    sat = np.zeros((th + 1, tw + 1), np.int64)
    sat[1:, 1:] = mask.astype(np.int64).cumsum(0).cumsum(1)
    inside = sat[ey[1:, None], ex[None, 1:]] - sat[ey[:-1, None], ex[None, 1:]] \
        - sat[ey[1:, None], ex[None, :-1]] + sat[ey[:-1, None], ex[None, :-1]]
    area = np.maximum((ey[1:] - ey[:-1])[:, None] * (ex[1:] - ex[:-1])[None, :], 1)
    return inside / area


def detect(source: Any, slide_id: str, cfg: Any) -> SlideTiles:
    """Tissue tiles of one slide; any failure to read it becomes an error row, never an exception."""
    result = SlideTiles(slide_id)
    try:
        g = source.geometry(slide_id)
        result.mpp, result.tile_px, result.width, result.height = g.mpp, g.size0, g.width, g.height
        scale = cfg.thumbnail_px_per_tile / g.size0
        size = (max(1, int(np.ceil(g.width * scale))), max(1, int(np.ceil(g.height * scale))))
        mask = tissue_mask(source.thumbnail(slide_id, size), cfg)
        result.tissue_fraction = float(mask.mean())
        rows, cols = np.nonzero(tile_fractions(mask, g.size0, g.width, g.height) >= cfg.min_tissue_fraction)
        result.x, result.y = cols.astype(np.int64) * g.size0, rows.astype(np.int64) * g.size0
    except Exception as e:  # openslide/tiffslide raise their own types for unreadable or corrupt files
        result.status, result.reason = "error", " ".join(f"{type(e).__name__}: {e}".split())
    finally:
        source.cache.evict(slide_id)  # one pass per slide: keep no handle open
    return result


_worker: tuple[Any, Any] | None = None


def _init_worker(registry: Any, cfg: Any) -> None:
    global _worker
    _worker = (_source(registry, cfg), cfg)


def _detect_in_worker(slide_id: str) -> SlideTiles:
    assert _worker is not None
    return detect(_worker[0], slide_id, _worker[1])


def _source(registry: Any, cfg: Any) -> Any:
    from dinov2_patho.data.readers import SlideTileSource

    return SlideTileSource(registry, cfg.backend, cfg.fallback, cfg.mpp_override, cache_size=1,
                           mpp_key="tiles.mpp_override")


def detect_all(registry: Any, cfg: Any, progress: bool) -> Iterator[SlideTiles]:
    """SlideTiles of every slide, in registry order, over `cfg.workers` processes."""
    from concurrent.futures import ProcessPoolExecutor

    from dinov2_patho.progress import progress_bar

    ids = registry.slide_ids()
    pool = None
    if cfg.workers <= 1:
        source = _source(registry, cfg)
        results: Iterator[SlideTiles] = (detect(source, s, cfg) for s in ids)
    else:
        pool = ProcessPoolExecutor(cfg.workers, initializer=_init_worker, initargs=(registry, cfg))
        results = pool.map(_detect_in_worker, ids, chunksize=1)
    errors = 0
    try:
        with progress_bar(total=len(ids), unit="slide", desc="curate tiles", disable=not progress) as bar:
            for r in results:
                errors += r.status == "error"
                bar.set_postfix(errors=errors, refresh=False)
                bar.update(1)
                yield r
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)


def write_tiles(path: Path, slides: Iterator[SlideTiles]) -> list[SlideTiles]:
    """Stream the tile list to `path` (atomically); return the per-slide results, coordinates dropped."""
    reports = []
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(("slide_id", "tile_x", "tile_y"))
        for s in slides:
            if s.status == "error":
                log.warning("slide %s: skipped, cannot be read: %s", s.slide_id, s.reason)
            w.writerows(zip(repeat(s.slide_id), s.x.tolist(), s.y.tolist()))
            s.num_tiles, s.x, s.y = int(s.x.size), s.x[:0], s.y[:0]
            reports.append(s)
    return reports


def write_report(path: Path, reports: list[SlideTiles]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(REPORT_COLUMNS)
        w.writerows(r.report_row() for r in reports)


def tissue_tiles(slides: str | Path, out: str | Path, *, config: TilesConfig | None = None,
                 progress: bool = True) -> list[SlideTiles]:
    """`curate tiles`: the tissue tiles of every slide of `slides` (a folder or a `slide_id,path` CSV) into
    OUT (tiles.csv, index/, slides.csv, tiles.json) by `config` (None: the defaults). Returns one report
    per slide (status, tiles, tissue fraction, ...)."""
    from dinov2_patho.data.index import build_index
    from dinov2_patho.data.slides import SlideRegistry

    tiles_cfg = TilesConfig() if config is None else config
    registry = SlideRegistry.from_spec(slides)
    if len(registry) == 0:
        raise UserError(f"{slides}: no slides found")
    check_distinct_case(registry.slide_ids(), str(slides))  # before any slide is read, not at the end
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    reports = write_tiles(out / TILES_CSV, detect_all(registry, tiles_cfg, progress))
    write_report(out / SLIDES_CSV, reports)
    errors = [r for r in reports if r.status == "error"]
    total = sum(r.num_tiles for r in reports)
    summary = (f"curate tiles: {len(reports)} slides ({len(reports) - len(errors)} ok, "
               f"{len(errors)} unreadable and skipped), {total} tiles -> {out}")
    if total == 0:
        raise UserError(f"{slides}: no tissue tile in any of {len(reports)} slides "
                        f"({len(errors)} unreadable; see {out / SLIDES_CSV})")
    build_index(out / TILES_CSV, out / INDEX, progress=progress)
    settings = {"slides": str(Path(slides).resolve()), "tiles": total, "slides_total": len(reports),
                "slides_unreadable": len(errors), **asdict(tiles_cfg)}
    atomic_write_text(out / SETTINGS, json.dumps(settings, indent=1))
    for r in errors:
        print(f"unreadable slide {r.slide_id}: {r.reason}")
    print(summary)
    return reports
