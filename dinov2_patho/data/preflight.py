"""Preflight: every slide the training data can reach opens, has an mpp, and holds its tiles.

A text file named .svs, a slide missing from the registry or a tile outside its slide would
otherwise surface as a DataLoader worker error after the model is built. `preflight_slides`
opens every slide of the index (view) in parallel threads, checks each slide's tiles against
its bounds at the slide's own mpp (`tile_geometry`), and returns the problems of all slides,
by name. A clean result is cached per index, registry (paths, sizes, mtimes) and reader
settings under `<index>/.preflight/`, so a restart does not reopen 37,000 slides.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dinov2_patho.data.readers import SlideTileSource
from dinov2_patho.errors import UserError
from dinov2_patho.io import atomic_write_text
from dinov2_patho.logging import get_logger
from dinov2_patho.progress import progress_bar

log = get_logger(__name__)

CACHE_DIR = ".preflight"
_CHUNK = 1 << 22
_REASON_CHARS = 160


class PreflightError(UserError):
    """Slides that training would fail on: all of them, by name, in one line."""


@dataclass(frozen=True)
class SlideProblem:
    slide_id: str
    kind: str  # "not in the registry" | "cannot open" | "tiles outside the slide"
    detail: str


def tile_extents(index) -> dict[str, tuple[int, int, int, int]]:
    """Per slide of the index (view): (min x, min y, max x, max y) of its tiles' level-0 corners,
    in chunks, so a 350M-row index never decodes all coordinates at once."""
    names = index.slide_names
    lo = np.full((len(names), 2), np.iinfo(np.int64).max, np.int64)
    hi = np.full((len(names), 2), np.iinfo(np.int64).min, np.int64)
    for chunk in index.chunks(_CHUNK):
        s, (xs, ys) = index.slides(chunk), index.coords(chunk)
        xy = np.stack([xs, ys], axis=1).astype(np.int64)
        np.minimum.at(lo, s, xy)
        np.maximum.at(hi, s, xy)
    present = np.flatnonzero(hi[:, 0] >= lo[:, 0])
    return {names[i]: (int(lo[i, 0]), int(lo[i, 1]), int(hi[i, 0]), int(hi[i, 1])) for i in present}


def _check_slide(source: SlideTileSource, slide_id: str,
                 extent: tuple[int, int, int, int]) -> SlideProblem | None:
    if slide_id not in source.registry:
        return SlideProblem(slide_id, "not in the registry", source.registry.source)
    try:
        g = source.probe(slide_id)
    except UserError as e:  # unreadable file, missing file, no mpp
        return SlideProblem(slide_id, "cannot open", _short(getattr(e, "reason", str(e))))
    x0, y0, x1, y1 = extent
    if x0 < 0 or y0 < 0 or x1 + g.size0 > g.width or y1 + g.size0 > g.height:
        return SlideProblem(slide_id, "tiles outside the slide",
                            f"tiles span x {x0}..{x1 + g.size0}, y {y0}..{y1 + g.size0} (a {g.size0}-px tile "
                            f"at mpp {g.mpp:g}) in {g.width}x{g.height} px")
    return None


def _short(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= _REASON_CHARS else line[:_REASON_CHARS - 3] + "..."


def _cache_key(index, source: SlideTileSource, slide_ids: list[str]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"index": str(Path(index.path).resolve()), "manifest": index.manifest,
                         "rows": len(index), "mpp_override": source.mpp_override,
                         "backends": list(source.backends)}, sort_keys=True, default=str).encode())
    if index.is_view:
        for chunk in index.chunks(_CHUNK):
            h.update(index.row_ids(chunk).tobytes())
    for slide_id in slide_ids:  # the files themselves: replaced or touched slides are checked again
        path = source.registry.known_path(slide_id)
        try:
            st = os.stat(path) if path else None
        except OSError:
            st = None
        h.update(f"{slide_id}\0{path}\0{st and st.st_size}\0{st and st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:32]


def preflight_slides(index, source: SlideTileSource, *, threads: int = 8, progress: bool = True,
                     cache: bool = True) -> tuple[list[SlideProblem], int]:
    """The problems of every slide with tiles in `index`, in slide order ([] when all is well),
    and the number of slides checked."""
    extents = tile_extents(index)
    slide_ids = sorted(extents)
    key = _cache_key(index, source, slide_ids)
    marker = Path(index.path) / CACHE_DIR / f"{key}.json"
    if cache and marker.is_file():
        log.info("preflight: %d slides checked before (%s)", len(slide_ids), marker)
        return [], len(slide_ids)
    with ThreadPoolExecutor(max(1, threads)) as pool:
        checks = pool.map(lambda s: _check_slide(source, s, extents[s]), slide_ids)
        results = list(progress_bar(checks, total=len(slide_ids), desc="preflight slides", unit="slide",
                            disable=not progress))
    problems = [p for p in results if p is not None]
    if cache and not problems:
        try:
            atomic_write_text(marker, json.dumps({"slides": len(slide_ids)}) + "\n")
        except OSError as e:  # a read-only index: check again next time
            log.warning("preflight: cannot cache the result in %s (%s)", marker.parent, e)
    log.info("preflight: %d slides, %d with problems", len(slide_ids), len(problems))
    return problems, len(slide_ids)


def describe(problems: list[SlideProblem], total: int) -> str:
    """One line naming every slide with a problem, grouped by kind."""
    groups: dict[str, list[SlideProblem]] = defaultdict(list)
    for p in problems:
        groups[p.kind].append(p)
    parts = []
    for kind, items in groups.items():
        if kind == "not in the registry":
            parts.append(f"{kind} {items[0].detail}: {', '.join(p.slide_id for p in items)}")
        else:
            parts.append(f"{kind}: " + "; ".join(f"{p.slide_id} ({p.detail})" for p in items))
    return f"preflight: {len(problems)} of {total} slides cannot be trained on; " + " | ".join(parts)
