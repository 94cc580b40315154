"""Samplers: the invariants of DESIGN.md "Samplers: semantics and invariants", as properties."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dinov2_patho.data.index import TileIndex
from dinov2_patho.errors import UserError
from dinov2_patho.hashing import hash_key
from dinov2_patho.samplers import SamplerError, StepBatchSampler, build_sampler, rank_slice
from dinov2_patho.samplers.metadata import inverse_frequency_subset
from dinov2_patho.samplers.permute import permute
from dinov2_patho.samplers.strata import build_strata, load_or_build
from dinov2_patho.samplers.stratified import _distinct
from dinov2_patho.samplers.telemetry import TelemetrySummary

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class FakeIndex:
    """The TileIndex interface the samplers use, over in-memory arrays (levels finest first)."""

    def __init__(self, levels: list[np.ndarray], slides: np.ndarray, num_clusters: list[int] | None = None,
                 row_ids: np.ndarray | None = None, num_slides: int | None = None, path: Path | None = None,
                 metadata: dict[str, np.ndarray] | None = None):
        self._levels = [np.asarray(lv, dtype=np.uint32) for lv in levels]
        self._slides = np.asarray(slides, dtype=np.int32)
        self._num_clusters = num_clusters or [int(lv.max(initial=0)) + 1 for lv in self._levels]
        self._row_ids = np.arange(len(slides), dtype=np.int64) if row_ids is None else row_ids
        self.num_levels = len(levels)
        self.level_names = tuple(f"level_{k}" for k in range(1, self.num_levels + 1))
        self.slide_names = [f"s{i}" for i in range(num_slides or int(self._slides.max(initial=-1)) + 1)]
        self.path = path
        self._metadata = metadata or {}

    def __len__(self) -> int:
        return len(self._slides)

    def level(self, k: int) -> np.ndarray:
        return self._levels[k - 1]

    def num_clusters(self, k: int) -> int:
        return self._num_clusters[k - 1]

    def cluster_sizes(self, k: int) -> np.ndarray:
        return np.bincount(self.level(k), minlength=self.num_clusters(k)).astype(np.int64)

    def slides(self, positions) -> np.ndarray:
        return self._slides[positions]

    def row_ids(self, positions) -> np.ndarray:
        return self._row_ids[positions]

    def metadata_codes(self, csv, column: str) -> tuple[np.ndarray, list[str]]:
        per_slide = self._metadata[column]
        codes = per_slide[self._slides].astype(np.int32)
        return codes, [f"{column}{i}" for i in range(int(per_slide.max()) + 1)]


def make_index(seed: int, rows: int, clusters: int, empty: int = 0, slides: int = 7, **kw) -> FakeIndex:
    """Skewed cluster sizes (some of one tile; with rows < clusters, gaps), a coarser level
    of 3 clusters, and `empty` unused cluster ids at the end."""
    rng = np.random.default_rng(seed)
    fine = np.minimum(rng.zipf(1.6, rows) - 1, clusters - 1)
    if rows >= clusters:
        fine[:clusters] = np.arange(clusters)
    coarse = fine % 3
    slide = rng.integers(0, slides, rows)
    return FakeIndex([fine, coarse], slide, [clusters + empty, 3], num_slides=slides, **kw)


index_params = st.tuples(st.integers(0, 10**6), st.integers(1, 400), st.integers(1, 40), st.integers(0, 3))


def stratified(index, batch_size, **kw):
    return build_sampler({"name": "cluster_stratified", "level": 1, "cache": False, **kw}, index, batch_size)


def draw(sampler, n: int) -> np.ndarray:
    return np.array([sampler.next_batch() for _ in range(n)], dtype=np.int64).reshape(n, sampler.batch_size)


# --- permutations ---------------------------------------------------------------------------------

def test_splitmix64_is_the_reference_generator():
    """The first outputs of Vigna's splitmix64.c seeded with 0: state k * gamma for output k + 1."""
    from dinov2_patho.hashing import GOLDEN, splitmix64

    states = np.arange(4, dtype=np.uint64) * GOLDEN
    assert [int(v) for v in splitmix64(states)] == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4,
                                                     0x06C45D188009454F, 0xF88BB8A8724C81EC]


@SETTINGS
@given(st.integers(1, 5000), st.integers(0, 2**63))
def test_permute_is_a_bijection(n, key):
    assert np.array_equal(np.sort(permute(np.arange(n), n, key)), np.arange(n))


def test_permute_depends_on_key():
    i = np.arange(100)
    assert not np.array_equal(permute(i, 100, hash_key(1)), permute(i, 100, hash_key(2)))


# --- cluster-stratified ---------------------------------------------------------------------------

@SETTINGS
@given(index_params, st.integers(1, 64), st.integers(0, 100))
def test_quotas(params, batch_size, seed):
    index = make_index(*params)
    sampler = stratified(index, batch_size, seed=seed)
    sizes = index.cluster_sizes(1)
    k = int(np.count_nonzero(sizes))
    for batch in draw(sampler, 6):
        assert batch.dtype == np.int64 and len(batch) == batch_size
        counts = np.bincount(index.level(1)[batch], minlength=len(sizes))
        assert not counts[sizes == 0].any()  # empty clusters are never drawn
        drawn = counts[counts > 0]
        if k > batch_size:
            assert len(drawn) == batch_size and (drawn == 1).all()
        else:
            assert len(drawn) == k
            assert set(drawn) <= {batch_size // k, batch_size // k + 1}
            assert np.count_nonzero(drawn == batch_size // k + 1) == batch_size % k


@SETTINGS
@given(index_params, st.integers(1, 64), st.integers(1, 30))
def test_least_seen_first(params, batch_size, steps):
    index = make_index(*params)
    sampler = stratified(index, batch_size, seed=params[0])
    batches = draw(sampler, steps)
    uses = np.bincount(batches.ravel(), minlength=len(index))
    assert np.array_equal(uses, sampler.use_counts())
    fine = index.level(1)
    for c in np.unique(fine):
        in_cluster = uses[fine == c]
        assert in_cluster.max() - in_cluster.min() <= 1, f"cluster {c}: use counts {np.unique(in_cluster)}"


@SETTINGS
@given(index_params, st.integers(1, 40), st.integers(1, 5), st.integers(1, 4))
def test_slide_cap_is_a_hard_bound(params, batch_size, cap, epoch_batches):
    index = make_index(*params)
    sampler = stratified(index, batch_size, seed=params[0], max_slides_per_epoch=cap,
                         pseudo_epoch_samples=epoch_batches * batch_size)
    batches = draw(sampler, 4 * epoch_batches)
    slides = index.slides(TileIndex.ALL)
    for e in range(4):
        assert len(np.unique(slides[batches[e * epoch_batches:(e + 1) * epoch_batches]])) <= cap
    # least-seen first within each (cluster, slide group) stratum
    uses = np.bincount(batches.ravel(), minlength=len(index))
    assert np.array_equal(uses, sampler.use_counts())
    st_ = sampler.strata
    for s in range(len(st_.cluster)):
        members = np.asarray(st_.order[st_.offsets[s]:st_.offsets[s + 1]])
        assert np.ptp(uses[members]) <= 1


def test_slide_cap_visits_every_slide_once_per_cycle():
    index = make_index(3, 500, 10, slides=10)
    # 4 slide groups, pseudo-epochs of 2 batches
    sampler = stratified(index, 8, max_slides_per_epoch=3, pseudo_epoch_samples=16)
    batches = draw(sampler, 8)
    assert len(np.unique(index.slides(TileIndex.ALL)[batches])) == 10


def test_batches_mix_clusters_across_ranks():
    index = make_index(0, 2000, 4)
    batch = stratified(index, 64, seed=0).next_batch()
    # each rank's contiguous quarter holds several clusters, not one
    assert all(len(np.unique(index.level(1)[rank_slice(batch, r, 4)])) > 1 for r in range(4))


@SETTINGS
@given(index_params, st.sampled_from([1, 2, 4, 8]), st.integers(0, 50))
def test_rank_slices_partition_the_batch(params, world_size, seed):
    index = make_index(*params)
    sampler = stratified(index, 8 * 3, seed=seed)
    batch = sampler.next_batch()
    parts = [sampler.rank_slice(batch, r, world_size) for r in range(world_size)]
    assert np.array_equal(np.concatenate(parts), batch)
    assert len({len(p) for p in parts}) == 1


def test_rank_slice_rejects_indivisible():
    with pytest.raises(SamplerError, match="not divisible"):
        rank_slice(np.arange(10), 0, 3)


@SETTINGS
@given(index_params, st.integers(1, 50), st.integers(0, 30), st.integers(1, 10),
       st.sampled_from([0.0, 0.5, 1.0]), st.sampled_from([None, 2]))
def test_resume_is_exact(params, batch_size, stop, more, alpha, cap):
    index = make_index(*params)
    kw = dict(seed=params[0], alpha=alpha, max_slides_per_epoch=cap, pseudo_epoch_samples=3 * batch_size)
    a = stratified(index, batch_size, **kw)
    draw(a, stop)
    state = a.state_dict()
    expected = draw(a, more)
    b = stratified(index, batch_size, **kw)
    b.load_state_dict(state)
    assert b.step == stop
    assert np.array_equal(draw(b, more), expected)


@SETTINGS
@given(index_params, st.integers(1, 30), st.integers(0, 20), st.integers(0, 8))
def test_state_at_an_earlier_step(params, batch_size, consumed, prefetched):
    """A prefetching loader's sampler is ahead of the trainer: state_dict(step) rolls back."""
    index = make_index(*params)
    a = stratified(index, batch_size, seed=1)
    batches = draw(a, consumed + prefetched + 3)
    b = stratified(index, batch_size, seed=1)
    draw(b, consumed + prefetched)
    c = stratified(index, batch_size, seed=1)
    c.load_state_dict(b.state_dict(step=consumed))
    assert np.array_equal(draw(c, prefetched + 3), batches[consumed:])


def test_state_survives_torch_save_weights_only(tmp_path):
    index = make_index(0, 300, 12)
    a = stratified(index, 16)
    draw(a, 5)
    torch.save(a.state_dict(), tmp_path / "s.pt")
    b = stratified(index, 16)
    b.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    assert np.array_equal(draw(a, 3), draw(b, 3))


def test_state_from_another_sampler_is_refused():
    index = make_index(0, 300, 12)
    state = stratified(index, 16, seed=0).state_dict()
    with pytest.raises(SamplerError, match="seed"):
        stratified(index, 16, seed=1).load_state_dict(state)


@SETTINGS
@given(index_params, st.integers(1, 40), st.integers(0, 100))
def test_deterministic_for_a_seed(params, batch_size, seed):
    index = make_index(*params)
    first = draw(stratified(index, batch_size, seed=seed), 4)
    assert np.array_equal(first, draw(stratified(index, batch_size, seed=seed), 4))


@SETTINGS
@given(st.integers(1, 5000), st.integers(1, 300), st.integers(0, 100))
def test_distinct_draws(k, b, seed):
    b = min(b, k)
    picks = _distinct(np.random.default_rng(seed), k, b)
    assert len(picks) == b and len(np.unique(picks)) == b and picks.min() >= 0 and picks.max() < k


def test_seeds_differ():
    index = make_index(0, 1000, 20)
    assert not np.array_equal(draw(stratified(index, 32, seed=0), 3), draw(stratified(index, 32, seed=1), 3))


def test_single_cluster_level_and_one_tile_clusters():
    index = make_index(1, 50, 5)
    one = build_sampler({"name": "cluster_stratified", "level": 2, "cache": False}, FakeIndex(
        [index.level(1), np.zeros(50)], index.slides(TileIndex.ALL)), 16)
    assert len(one.next_batch()) == 16
    tiny = FakeIndex([np.arange(5)], np.zeros(5))  # five clusters of one tile each
    batches = draw(stratified(tiny, 10), 3)
    assert all(np.array_equal(np.bincount(b, minlength=5), [2] * 5) for b in batches)


@SETTINGS
@given(index_params, st.integers(1, 64), st.floats(-1.0, 2.0))
def test_alpha_quotas_are_floor_or_ceil_of_the_share(params, batch_size, alpha):
    index = make_index(*params)
    sampler = stratified(index, batch_size, alpha=alpha)
    sizes = index.cluster_sizes(1).astype(float)
    weights = np.zeros_like(sizes)
    weights[sizes > 0] = sizes[sizes > 0] ** alpha
    share = batch_size * weights / weights.sum()
    for batch in draw(sampler, 4):
        counts = np.bincount(index.level(1)[batch], minlength=len(sizes))
        assert counts.sum() == batch_size
        assert (counts >= np.floor(share - 1e-6)).all() and (counts <= np.ceil(share + 1e-6)).all()


def test_alpha_one_is_uniform_over_tiles_and_zero_is_equal_share():
    index = make_index(5, 3000, 6)
    sizes = index.cluster_sizes(1)
    for alpha, target in [(1.0, sizes / sizes.sum()), (0.0, np.full(6, 1 / 6))]:
        drawn = draw(stratified(index, 60, alpha=alpha), 50).ravel()
        counts = np.bincount(index.level(1)[drawn], minlength=6)
        np.testing.assert_allclose(counts / counts.sum(), target, atol=0.02)


def test_metadata_column_as_the_level(caplog):
    index = make_index(0, 600, 10, slides=6, metadata={"tissue_diagnosis": np.array([0, 0, 0, 1, 2, -1])})
    cfg = {"name": "cluster_stratified", "metadata_csv": "m.csv", "column": "tissue_diagnosis",
           "cache": False}
    with pytest.raises(UserError, match=r"^sampler.metadata_csv=m.csv: 1 slide\(s\) of the index have no "
                                        r"tissue_diagnosis value there \(s5\); add them, or set "
                                        r"sampler.skip_slides_without_metadata=true"):
        build_sampler(cfg, index, 30)  # were left out silently
    sampler = build_sampler({**cfg, "skip_slides_without_metadata": True}, index, 30)
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        "sampler.metadata_csv=m.csv: 1 slide(s) of the index have no tissue_diagnosis value there (s5): "
        "left out (sampler.skip_slides_without_metadata)"]
    codes = index.metadata_codes("m.csv", "tissue_diagnosis")[0]
    for batch in draw(sampler, 5):
        assert np.array_equal(np.bincount(codes[batch], minlength=3), [10, 10, 10])  # slide 5: no metadata


def test_strata_cache_is_reused(tmp_path):
    index = make_index(2, 500, 17, path=tmp_path)
    cfg = {"name": "cluster_stratified", "level": 1, "max_slides_per_epoch": 3}
    a = build_sampler(cfg, index, 32)
    cached = list((tmp_path / ".sampler_cache").iterdir())
    assert len(cached) == 1 and not cached[0].name.startswith(".")
    b = build_sampler(cfg, index, 32)
    assert isinstance(b.strata.order, np.memmap)
    assert np.array_equal(draw(a, 5), draw(b, 5))


def test_strata_starting_together_are_built_once_and_shared(tmp_path):
    """The ranks of a node open the same index at once: one builds, the others map its cache."""
    labels = np.random.default_rng(0).integers(0, 7, 1000)
    builds = []

    def build():
        builds.append(1)
        time.sleep(0.3)  # long enough for every other caller to arrive meanwhile
        return build_strata(len(labels), 7, lambda a, b: labels[a:b])

    start = threading.Barrier(4)

    def open_strata(_):
        start.wait()
        return load_or_build(tmp_path / ".sampler_cache", {"labels": labels, "num_labels": 7}, build)

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(open_strata, range(4)))
    assert len(builds) == 1
    assert all(isinstance(r.order, np.memmap) for r in results)  # the builder maps the cache too
    assert all(np.array_equal(r.order, results[0].order) for r in results)
    assert np.array_equal(np.sort(results[0].order), np.arange(len(labels)))


def test_strata_cache_works_where_flock_does_not(tmp_path, monkeypatch, caplog):
    def no_flock(fd, op):
        raise OSError(37, "No locks available")

    monkeypatch.setattr("dinov2_patho.samplers.strata.fcntl.flock", no_flock)
    labels = np.arange(300) % 5
    parts = {"labels": labels, "num_labels": 5}
    first = load_or_build(tmp_path, parts, lambda: build_strata(300, 5, lambda a, b: labels[a:b]))
    assert "cannot lock" in caplog.text
    again = load_or_build(tmp_path, parts, lambda: pytest.fail("cached strata were built again"))
    assert np.array_equal(first.order, again.order)


def test_subset_view_yields_global_row_ids():
    base = make_index(4, 400, 9)
    keep = np.flatnonzero(np.arange(400) % 3 == 0)
    slides = base.slides(TileIndex.ALL)
    view = FakeIndex([base.level(1)[keep], base.level(2)[keep]], slides[keep], row_ids=keep, num_slides=7)
    batches = draw(stratified(view, 24), 5)
    assert np.isin(batches, keep).all()


# --- uniform --------------------------------------------------------------------------------------

@SETTINGS
@given(st.integers(1, 300), st.integers(1, 50), st.integers(0, 100))
def test_uniform_passes_cover_every_row_once(rows, batch_size, seed):
    index = make_index(seed, rows, 5)
    sampler = build_sampler({"name": "uniform", "seed": seed}, index, batch_size)
    stream = draw(sampler, -(-2 * rows // batch_size)).ravel()
    for p in range(2):
        assert np.array_equal(np.sort(stream[p * rows:(p + 1) * rows]), np.arange(rows))


@SETTINGS
@given(st.integers(1, 300), st.integers(1, 50), st.integers(0, 40), st.integers(1, 5))
def test_uniform_resume(rows, batch_size, stop, more):
    index = make_index(0, rows, 5)
    a = build_sampler({"name": "uniform"}, index, batch_size)
    draw(a, stop)
    b = build_sampler({"name": "uniform"}, index, batch_size)
    b.load_state_dict(a.state_dict())
    assert np.array_equal(draw(a, more), draw(b, more))


def test_sampler_subset_moved_to_data_subset():
    with pytest.raises(SamplerError, match="sampler.subset is now data.subset"):
        build_sampler({"name": "uniform", "subset": "rows.npy"}, make_index(0, 100, 5), 4)


# --- metadata baseline ----------------------------------------------------------------------------

@SETTINGS
@given(st.lists(st.integers(-1, 4), min_size=1, max_size=300), st.integers(0, 100), st.data())
def test_inverse_frequency_subset(codes, seed, data):
    codes = np.array(codes)
    eligible = int((codes >= 0).sum())
    if eligible == 0:
        with pytest.raises(SamplerError):
            inverse_frequency_subset(codes, 1, seed)
        return
    target = data.draw(st.integers(1, eligible))
    subset = inverse_frequency_subset(codes, target, seed)
    assert len(subset) == target and len(np.unique(subset)) == target
    assert (codes[subset] >= 0).all()
    assert np.array_equal(subset, inverse_frequency_subset(codes, target, seed))


def test_inverse_frequency_balances_rare_values():
    codes = np.r_[np.zeros(9000, int), np.ones(1000, int)]  # 90% / 10%
    subset = inverse_frequency_subset(codes, 1000, 0)
    # equal total weight per value: about half of the draws are the rare value
    assert 400 < np.count_nonzero(codes[subset] == 1) < 600


def test_metadata_sampler_uniform_and_stratified():
    index = make_index(0, 2000, 10, slides=6, metadata={"tissue_diagnosis": np.array([0, 0, 0, 0, 1, -1])})
    codes = index.metadata_codes("m.csv", "tissue_diagnosis")[0]
    cfg = {"name": "metadata", "metadata_csv": "m.csv", "target_size": 100, "seed": 3}
    for stratify in (False, True):
        with pytest.raises(UserError, match=r"1 slide\(s\) of the index have no tissue_diagnosis value there "
                                            r"\(s5\)"):
            build_sampler({**cfg, "stratify": stratify}, index, 20)
    cfg["skip_slides_without_metadata"] = True
    flat = draw(build_sampler(cfg, index, 20), 5).ravel()
    assert len(np.unique(flat)) == 100 and (codes[flat] >= 0).all()  # one pass over the subset
    strat = draw(build_sampler({**cfg, "stratify": True, "cache": False}, index, 20), 5)
    assert np.isin(strat, flat).all()
    assert all(np.array_equal(np.bincount(codes[b], minlength=2), [10, 10]) for b in strat)


# --- config, loader, telemetry --------------------------------------------------------------------

def test_unknown_option_names_the_closest():
    index = make_index(0, 100, 5)
    with pytest.raises(UserError, match=r"sampler.levl.*did you mean 'level'"):
        build_sampler({"name": "cluster_stratified", "levl": 1}, index, 8)
    with pytest.raises(UserError, match="did you mean 'cluster_stratified'"):
        build_sampler({"name": "cluster_stratifed"}, index, 8)
    with pytest.raises(UserError, match="levels 1..2"):
        build_sampler({"name": "cluster_stratified", "level": 3}, index, 8)
    with pytest.raises(UserError, match="needs sampler.target_size"):
        build_sampler({"name": "metadata", "metadata_csv": "m.csv"}, index, 8)


def test_options_the_chosen_branch_ignores_are_errors_naming_them():
    index = make_index(0, 100, 5, metadata={"tissue_diagnosis": np.arange(7) % 2})
    meta = {"name": "metadata", "metadata_csv": "m.csv", "target_size": 50}
    with pytest.raises(UserError, match=r"sampler.alpha, sampler.max_slides_per_epoch: not used .*=false"):
        build_sampler({**meta, "max_slides_per_epoch": 800, "alpha": 1.0}, index, 8)
    build_sampler({**meta, "stratify": True, "max_slides_per_epoch": 800, "cache": False}, index, 8)
    with pytest.raises(UserError, match=r"sampler.column: not used .*with sampler.level"):
        build_sampler({"name": "cluster_stratified", "level": 1, "column": "tissue_diagnosis"}, index, 8)
    with pytest.raises(UserError, match=r"sampler.max_slides_per_epoch: not an option of sampler 'uniform'"):
        build_sampler({"name": "uniform", "max_slides_per_epoch": 800}, index, 8)
    # null is unset: a config file's level can be cleared by an override when switching to uniform
    build_sampler({"name": "uniform", "level": None}, index, 8)
    with pytest.raises(UserError, match=r"sampler.alpha: .*could not be converted"):
        build_sampler({"name": "cluster_stratified", "level": 1, "alpha": "high"}, index, 8)


def test_step_batch_sampler_in_a_dataloader_with_workers():
    index = make_index(0, 500, 7)

    class Keys(torch.utils.data.Dataset):
        def __getitem__(self, key):
            return torch.tensor(key)

        def __len__(self):
            return len(index)

    expected = draw(stratified(index, 12, seed=4), 3)
    for rank in range(2):
        batches = StepBatchSampler(stratified(index, 12, seed=4), rank, 2)
        loader = torch.utils.data.DataLoader(Keys(), batch_sampler=batches, num_workers=2)
        got = [b.numpy() for _, b in zip(range(3), loader)]  # (step, position, row) per item
        for step, keys in enumerate(got):
            assert (keys[:, 0] == step).all() and np.array_equal(keys[:, 1], np.arange(6))
            assert np.array_equal(keys[:, 2], expected[step, rank * 6:(rank + 1) * 6])
            assert np.array_equal(batches.pop_global_batch(step), expected[step])
    with pytest.raises(SamplerError, match="not divisible by world size 5"):
        StepBatchSampler(stratified(index, 12), 0, 5)
    with pytest.raises(SamplerError, match="at step 0, expected 3"):
        StepBatchSampler(stratified(index, 12), 0, 1, start=3)


def test_telemetry():
    index = make_index(0, 1000, 8)
    sampler = stratified(index, 32)
    summary = TelemetrySummary(sampler)
    batch = sampler.next_batch()
    stats = sampler.telemetry(batch)
    assert stats["clusters_level_1"] == stats["clusters"] == 8
    assert stats["clusters_level_2"] == 3
    assert (stats["per_cluster_min"], stats["per_cluster_max"]) == (4, 4)
    assert stats["slides"] == len(np.unique(index.slides(TileIndex.ALL)[batch]))
    assert summary.update(batch) == {k: v for k, v in stats.items() if k in summary.per_batch[0]}
    for _ in range(9):
        summary.update(sampler.next_batch())
    out = summary.summary()
    assert out["batches"] == 10 and out["samples"] == 320
    assert out["cluster_coverage"] == 1.0 and out["balance_entropy"] == pytest.approx(1.0)
    assert out["tile_coverage"] == out["distinct_tiles"] / 1000


@SETTINGS
@given(st.sampled_from(["uniform", "cluster_stratified", "metadata"]), st.integers(1, 40),
       st.integers(1, 100))
def test_every_sampler_counts_pseudo_epochs_of_whole_batches(name, batch_size, samples):
    """A pseudo-epoch is the first ceil(samples / B) batches, then the next: at least `samples`
    tiles, fewer than samples + B, for every sampler alike."""
    index = make_index(0, 300, 6, metadata={"tissue_diagnosis": np.arange(7) % 2})
    options = {"uniform": {}, "cluster_stratified": {"level": 1, "cache": False},
               "metadata": {"metadata_csv": "m.csv", "target_size": 50}}[name]
    sampler = build_sampler({"name": name, "pseudo_epoch_samples": samples, **options}, index, batch_size)
    steps = 3 * samples // batch_size + 3
    epochs = [sampler.telemetry(sampler.next_batch())["pseudo_epoch"] for _ in range(steps)]
    per_epoch = -(-samples // batch_size)
    assert epochs == [t // per_epoch for t in range(steps)]
    assert [sampler.pseudo_epoch(t) for t in range(steps)] == epochs


def test_telemetry_describes_the_step_named_not_the_live_state():
    """A prefetching DataLoader draws batches ahead of training: telemetry for step k is k's,
    however far the sampler has run (pseudo-epoch and slide group included)."""
    index = make_index(0, 1000, 8, slides=12)
    sampler = stratified(index, 8, max_slides_per_epoch=3, pseudo_epoch_samples=16)
    batches = draw(sampler, 9)
    for k in range(6):
        stats = sampler.telemetry(batches[k], k)
        assert (stats["step"], stats["pseudo_epoch"], stats["slide_group"]) == (k, k // 2,
                                                                                  sampler.slide_group(k))
    assert sampler.telemetry(batches[-1])["step"] == 8  # no step named: the last batch drawn
    uniform = build_sampler({"name": "uniform", "seed": 0}, index, 8)
    ahead = draw(uniform, 4)
    assert uniform.telemetry(ahead[1], 1)["step"] == 1


def test_level_may_be_given_as_the_csv_column_name():
    index = make_index(0, 500, 8)
    by_number = draw(build_sampler({"name": "cluster_stratified", "level": 2}, index, 16), 3)
    by_column = draw(build_sampler({"name": "cluster_stratified", "level": "level_2"}, index, 16), 3)
    assert np.array_equal(by_number, by_column)
    for bad in ("level_", "levels_2", "two"):
        with pytest.raises(SamplerError) as info:
            build_sampler({"name": "cluster_stratified", "level": bad}, index, 16)
        assert str(info.value).startswith("sampler.level: ") and "\n" not in str(info.value)
