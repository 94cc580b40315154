"""Per-batch and summary statistics of a sampler's batches, for logs and `sampler dump`."""

from __future__ import annotations

from typing import Any

import numpy as np


class Columns:
    """An index's per-row level columns, fetched once: a view's are computed arrays, too costly to
    recompute per batch. Slides are read by position (`index.slides`), never as a whole column."""

    def __init__(self, index):
        self.index = index
        self._levels: dict[int, np.ndarray] = {}

    def level(self, k: int) -> np.ndarray:
        if k not in self._levels:
            self._levels[k] = self.index.level(k)
        return self._levels[k]


NO_LEVELS = "none: the index has no tree levels"


def batch_stats(columns: Columns, positions: np.ndarray, labels: np.ndarray | None) -> dict[str, Any]:
    """Distinct clusters at each tree level and slides, and the min / max number of tiles
    per stratification cluster (`labels`; None for an index without levels), for one batch given as
    view positions."""
    positions = np.sort(positions)  # sorted reads of memory-mapped columns
    stats: dict[str, Any] = {}
    for k in range(1, columns.index.num_levels + 1):
        stats[f"clusters_level_{k}"] = int(len(np.unique(columns.level(k)[positions])))
    stats["slides"] = int(len(np.unique(columns.index.slides(positions))))
    if labels is None:
        return stats
    _, counts = np.unique(np.asarray(labels[positions]), return_counts=True)
    stats["clusters"] = int(len(counts))
    stats["per_cluster_min"] = int(counts.min())
    stats["per_cluster_max"] = int(counts.max())
    return stats


class TelemetrySummary:
    """Accumulates a sampler's batches and summarises coverage and balance over them
    (cluster coverage and balance at the sampler's stratification level; the coarsest
    tree level for `uniform`)."""

    def __init__(self, sampler):
        self.sampler, self.columns, self.labels = sampler, sampler.columns, sampler.labels
        self.eligible = sampler.eligible
        self.counts = np.zeros(sampler.num_labels, dtype=np.int64)
        self.nonempty = 0 if self.labels is None else int(np.count_nonzero(_label_sizes(self.labels,
                                                                                        sampler.num_labels)))
        self.samples = 0
        self.seen: list[np.ndarray] = []
        self.per_batch: list[dict[str, Any]] = []

    def update(self, batch: np.ndarray) -> dict[str, Any]:
        """Add one global batch (row ids); returns its per-batch statistics."""
        positions = self.sampler.rows.to_positions(batch)
        stats = batch_stats(self.columns, positions, self.labels)
        self.samples += len(positions)
        if self.labels is not None:
            lab = np.asarray(self.labels[np.sort(positions)]).astype(np.int64)
            uniq, cnt = np.unique(lab, return_counts=True)
            self.counts[uniq] += cnt
        self.seen.append(positions)
        self.per_batch.append(stats)
        return stats

    def summary(self) -> dict[str, Any]:
        if not self.per_batch:
            return {"batches": 0}
        tiles = np.unique(np.concatenate(self.seen))
        out: dict[str, Any] = {
            "batches": len(self.per_batch),
            "samples": self.samples,
            "tile_coverage": len(tiles) / max(self.eligible, 1),
            "distinct_tiles": int(len(tiles)),
            "distinct_slides": int(len(np.unique(self.columns.index.slides(tiles)))),
        }
        if self.labels is None:
            out["clusters"] = NO_LEVELS
        else:
            p = self.counts[self.counts > 0] / self.counts.sum()
            entropy = float(-(p * np.log(p)).sum())
            out["cluster_coverage"] = int(np.count_nonzero(self.counts)) / max(self.nonempty, 1)
            # 1.0 = every non-empty cluster drawn equally often
            out["balance_entropy"] = entropy / np.log(self.nonempty) if self.nonempty > 1 else 1.0
        for key in self.per_batch[0]:
            values = np.array([s[key] for s in self.per_batch])
            out[f"{key}_mean"] = float(values.mean())
            out[f"{key}_min"] = int(values.min())
            out[f"{key}_max"] = int(values.max())
        return out


def _label_sizes(labels: np.ndarray, num_labels: int, chunk: int = 1 << 22) -> np.ndarray:
    sizes = np.zeros(num_labels, dtype=np.int64)
    for a in range(0, len(labels), chunk):
        lab = np.asarray(labels[a:a + chunk]).astype(np.int64)
        sizes += np.bincount(lab[lab >= 0], minlength=num_labels)
    return sizes


def telemetry_table(stats: dict[str, Any]) -> str:
    """Telemetry as aligned `name  value` lines for people; per-batch min / mean / max of one
    statistic (`X_min`, `X_mean`, `X_max`) share a line."""
    rows: list[tuple[str, str]] = []
    done: set[str] = set()
    for key, value in stats.items():
        if key in done:
            continue
        base = key.rsplit("_", 1)[0]
        trio = [f"{base}_min", f"{base}_mean", f"{base}_max"]
        if key.endswith(("_min", "_mean", "_max")) and all(k in stats for k in trio):
            done.update(trio)
            low, mean, high = (_fmt(stats[k]) for k in trio)
            rows.append((f"{base} per batch", f"min {low}  mean {mean}  max {high}"))
        else:
            rows.append((key, _fmt(value)))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
