"""Uniform sampling: infinite passes over the index (or a subset), reshuffled every pass.

Draw j of the stream (j = step * B + i) is element (j mod n) of pass (j div n)'s
pseudo-random permutation, so the state is just the step: a resume is exact and free,
and every tile is drawn once per pass, as in DINOv2's sharded infinite sampler.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from dinov2_patho.hashing import hash_key

from .base import GlobalBatchSampler, SamplerError
from .permute import permute
from .telemetry import Columns, batch_stats
from .views import RowMap

_PASS = 11  # hash domain


class UniformSampler(GlobalBatchSampler):
    name = "uniform"

    def __init__(self, index, batch_size: int, *, seed: int, pseudo_epoch_samples: int,
                 positions: np.ndarray | None = None):
        """`positions`: the view positions (sorted, unique) to draw from; default all rows."""
        super().__init__(batch_size, seed, pseudo_epoch_samples)
        self.index, self.rows, self.positions = index, RowMap(index), positions
        self.columns = Columns(index)
        self.num_rows = len(index) if positions is None else len(positions)
        if self.num_rows == 0:
            raise SamplerError("uniform sampler: nothing to draw from (empty index view or subset)")
        # telemetry counts clusters of the coarsest tree level; a tile list without a tree (`curate tiles`)
        # trains all the same, its telemetry without clusters
        levels = index.num_levels
        self.labels = index.level(levels) if levels else None
        self.num_labels = index.num_clusters(levels) if levels else 0
        self.eligible = self.num_rows

    def fingerprint(self) -> dict[str, Any]:
        return {**super().fingerprint(), "rows": self.num_rows}

    def _batch(self, step: int) -> tuple[np.ndarray, Any]:
        draw = step * self.batch_size + np.arange(self.batch_size, dtype=np.int64)
        passes = draw // self.num_rows
        picks = permute(draw - passes * self.num_rows, self.num_rows, hash_key(self.seed, _PASS, passes))
        if self.positions is not None:
            picks = np.asarray(self.positions[picks])
        return self.rows.to_global(picks), None

    def _extra_state(self, undo: Sequence[Any]) -> dict[str, Any]:
        return {}  # the step is the whole state

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        return None

    def telemetry(self, batch: np.ndarray, step: int | None = None) -> dict[str, Any]:
        stats = batch_stats(self.columns, self.rows.to_positions(batch), self.labels)
        step = self._telemetry_step(step)
        stats.update(step=step, pseudo_epoch=self.pseudo_epoch(step))
        return stats
