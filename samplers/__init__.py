"""Batch samplers over a TileIndex: uniform, cluster-stratified (the paper's), metadata-based.

    sampler = build_sampler({"name": "cluster_stratified", "level": 4, "seed": 0}, index, 2048)
    batch = sampler.next_batch()                      # int64 global row ids, len 2048
    mine = sampler.rank_slice(batch, rank, world_size)
    loader = DataLoader(dataset, batch_sampler=StepBatchSampler(sampler, rank, world_size))
    sampler.state_dict(step=s)   # the state after s batches, though a prefetching loader drew more
    view = subset_view(index, "subset.npy")           # `data.subset`: any sampler over these rows

Config keys (`sampler:`): the options dataclasses in build.py.
"""

from .base import GlobalBatchSampler, SamplerError, rank_slice
from .build import SAMPLERS, build_sampler
from .loader import StepBatchSampler
from .stratified import ClusterStratifiedSampler
from .uniform import UniformSampler
from .views import subset_view

__all__ = [
    "SAMPLERS",
    "ClusterStratifiedSampler",
    "GlobalBatchSampler",
    "SamplerError",
    "StepBatchSampler",
    "UniformSampler",
    "build_sampler",
    "rank_slice",
    "subset_view",
]
