"""Checks over a whole clustering table in bounded memory: repeated tiles, and level nesting."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dinov2_patho.data.index.source import row_error
from dinov2_patho.logging import get_logger

if TYPE_CHECKING:
    from dinov2_patho.data.index.scratch import Scratch

log = get_logger(__name__)

def find_duplicates(
    src: Path, scratch: Scratch, num_rows: int, slide_names: list[str], *, dedupe: bool, csv_lines: bool
) -> tuple[np.ndarray | None, int]:
    """Bitmap (1 bit per row) of repeated (slide, x, y) rows after their first occurrence (or None), and
    their number.

    Equal hashes are only candidates: they are confirmed on the exact (slide, x, y) values."""
    with scratch.reader("x") as xs, scratch.reader("y") as ys, scratch.reader("slide") as ss:
        bitmap, first_dup, count = _scan_partitions(scratch, xs, ys, ss, num_rows, dedupe)
    if first_dup is not None:
        row, orig, s, x, y = first_dup
        raise row_error(
            src,
            row + 1,
            f"duplicate tile (slide_id={slide_names[s]!r}, tile_x={x}, tile_y={y}), "
            f"first at data row {orig + 1}; pass --dedupe to drop repeats",
            csv_lines=csv_lines,
        )
    return bitmap, count


def _scan_partitions(scratch: Scratch, xs, ys, ss, num_rows: int, dedupe: bool):
    """The dropped-rows bitmap (with `dedupe`) or the first duplicate (without), and the count."""
    bitmap, first_dup, count = None, None, 0
    for p in range(scratch.num_parts):
        rec = scratch.partition(p)
        hs = np.sort(rec["h"])
        dup_h = np.unique(hs[1:][hs[1:] == hs[:-1]])
        if not dup_h.size:
            continue
        rows = np.sort(rec["row"][np.isin(rec["h"], dup_h)]).astype(np.int64)
        s, x, y = ss.gather(rows), xs.gather(rows), ys.gather(rows)
        order = np.lexsort((rows, y, x, s))  # equal tiles together, first occurrence first
        rows, s, x, y = rows[order], s[order], x[order], y[order]
        same = (s[1:] == s[:-1]) & (x[1:] == x[:-1]) & (y[1:] == y[:-1])
        if not same.any():
            continue
        group_first = np.maximum.accumulate(np.where(np.r_[True, ~same], np.arange(rows.size), 0))
        dup = np.flatnonzero(np.r_[False, same])
        if not dedupe:
            i = dup[np.argmin(rows[dup])]
            cand = (int(rows[i]), int(rows[group_first[i]]), int(s[i]), int(x[i]), int(y[i]))
            first_dup = cand if first_dup is None or cand < first_dup else first_dup
            continue
        if bitmap is None:
            bitmap = np.zeros((num_rows + 7) // 8, np.uint8)
        np.bitwise_or.at(bitmap, rows[dup] >> 3, (1 << (rows[dup] & 7)).astype(np.uint8))
        count += dup.size
    return bitmap, first_dup, count


class TreeCheck:
    """Does every level-k cluster sit in exactly one level-(k+1) cluster?"""

    def __init__(self, num_clusters: list[int]):
        self.parent = [np.full(n, -1, np.int32) for n in num_clusters[:-1]]
        self.split = [np.zeros(n, bool) for n in num_clusters[:-1]]

    def update(self, dense: list[np.ndarray]) -> None:
        for parent, split, child, up in zip(self.parent, self.split, dense[:-1], dense[1:]):
            seen = parent[child]
            unset = seen < 0
            if unset.any():
                parent[child[unset]] = up[unset]
                seen = parent[child]
            split[child[seen != up]] = True

    def report(self, names) -> list[str | None]:
        out: list[str | None] = []
        for k, split in enumerate(self.split):
            bad = int(split.sum())
            if bad:
                msg = (
                    f"{names[k]} -> {names[k + 1]} is not a tree: {bad} of {split.size} {names[k]} clusters "
                    f"have more than one {names[k + 1]} parent"
                )
                log.warning(msg)
            out.append(msg if bad else None)
        return [*out, None]
