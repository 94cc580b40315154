"""Batch samplers over a TileIndex: uniform, cluster-stratified (the paper's), metadata-based.

    sampler = build_sampler({"name": "cluster_stratified", "level": 4, "seed": 0}, index, 2048)
    batch = sampler.next_batch()                      # int64 global row ids, len 2048
    mine = sampler.rank_slice(batch, rank, world_size)
    loader = DataLoader(dataset, batch_sampler=RankBatchSampler(sampler, rank, world_size))
    loader = DataLoader(dataset, sampler=RankSampler(sampler, rank, world_size), batch_size=B // world_size)
    sampler.state_dict(step=s)   # the state after s batches, though a prefetching loader drew more

Config keys (`sampler:`): see the constructors in build.py.
"""

from .base import GlobalBatchSampler, RankBatchSampler, RankSampler, SamplerError, rank_slice
from .build import SAMPLERS, build_sampler
from .stratified import ClusterStratifiedSampler
from .uniform import UniformSampler

__all__ = [
    "SAMPLERS",
    "ClusterStratifiedSampler",
    "GlobalBatchSampler",
    "RankBatchSampler",
    "RankSampler",
    "SamplerError",
    "UniformSampler",
    "build_sampler",
    "rank_slice",
]
