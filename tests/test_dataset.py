import logging
import pickle

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from dinov2_patho.data import dataset as dataset_module
from dinov2_patho.data.dataset import TileDataset, build_tile_source
from dinov2_patho.data.index import TileIndex
from dinov2_patho.data.readers import SlideTileSource, TileReadError
from dinov2_patho.data.slides import SlideRegistry
from dinov2_patho.data.tilestore import HDF5TileSource
from dinov2_patho.errors import UserError


class Flaky:
    """Wraps a source; tiles at `bad` (slide_id, x, y) fail like corrupt JPEG data."""

    def __init__(self, inner, bad=()):
        self.inner, self.bad = inner, set(bad)

    def read(self, slide_id, x, y):
        if (slide_id, x, y) in self.bad:
            raise TileReadError(slide_id, x, y, "corrupt JPEG data")
        return self.inner.read(slide_id, x, y)


def _scale(t):
    return t.float() / 255


@pytest.fixture(scope="module")
def wsi(cohort):
    return SlideTileSource(SlideRegistry.from_dir(cohort.slides_dir))


def _cluster_rows(index, k, row):
    return set(index.row_ids(TileIndex.ALL)[index.level(k) == index.level(k)[row]].tolist())


def test_items_are_chw_uint8_tiles_with_their_global_row_id(cohort_index, wsi):
    ds = TileDataset(cohort_index, wsi)
    assert len(ds) == len(cohort_index)
    for row in (0, 17, len(ds) - 1):
        img, rid = ds[row]
        assert rid == row and img.dtype == torch.uint8 and img.shape == (3, 224, 224)
        np.testing.assert_array_equal(img.permute(1, 2, 0).numpy(), wsi.read(*cohort_index.tile(row)))
    view = cohort_index.select(cohort_index.row_ids(TileIndex.ALL)[5::9])
    scaled = TileDataset(view, wsi, transform=_scale)
    img, rid = scaled[int(view.row_ids(TileIndex.ALL)[3])]
    assert rid == int(view.row_ids(TileIndex.ALL)[3]) and img.dtype == torch.float32
    torch.testing.assert_close(img, ds[rid][0].float() / 255)


def test_unreadable_tile_raises_with_slide_and_coordinates(cohort_index, wsi):
    sid, x, y = cohort_index.tile(10)
    ds = TileDataset(cohort_index, Flaky(wsi, {(sid, x, y)}))
    with pytest.raises(TileReadError, match=rf"slide '{sid}', tile at level-0 \(x={x}, y={y}\): corrupt"):
        ds[10]
    assert ds.substitutions == 0
    with pytest.raises(UserError, match="on_error 'skipp' is unknown; did you mean 'skip'"):
        TileDataset(cohort_index, wsi, on_error="skipp")


def test_skip_substitutes_a_tile_of_the_same_cluster_and_counts_it(cohort_index, wsi, caplog):
    row = 10
    sid, x, y = cohort_index.tile(row)
    ds = TileDataset(cohort_index, Flaky(wsi, {(sid, x, y)}), on_error="skip")
    with caplog.at_level(logging.WARNING, logger="dinov2_patho"):
        img, rid = ds[row]
    assert rid == row and ds.substitutions == 1
    same = [r for r in _cluster_rows(cohort_index, 1, row) if r != row]
    reads = [wsi.read(*cohort_index.tile(r)) for r in same]
    assert any(np.array_equal(img.permute(1, 2, 0).numpy(), t) for t in reads)
    assert f"slide '{sid}', tile at level-0 (x={x}, y={y})" in caplog.text
    assert "1 substitutions so far" in caplog.text


def test_skip_in_a_view_stays_in_the_view(cohort_index, wsi, monkeypatch):
    monkeypatch.setattr(dataset_module, "_SCAN_CHUNK", 16)  # exercise the chunked, wrapping scan
    view = cohort_index.select(cohort_index.row_ids(TileIndex.ALL)[1::2])
    row = int(view.row_ids(TileIndex.ALL)[20])
    ds = TileDataset(view, Flaky(wsi, {cohort_index.tile(row)}), on_error="skip")
    img, rid = ds[row]
    assert rid == row and ds.substitutions == 1
    members = set(view.row_ids(TileIndex.ALL)[view.level(1) == view.level(1)[20]].tolist()) - {row}
    assert members and any(np.array_equal(img.permute(1, 2, 0).numpy(), wsi.read(*cohort_index.tile(r)))
                           for r in members)


def test_skip_escalates_to_coarser_levels_then_gives_up(cohort_index, wsi):
    row = 30
    finest = _cluster_rows(cohort_index, 1, row)
    bad = {cohort_index.tile(r) for r in finest}
    ds = TileDataset(cohort_index, Flaky(wsi, bad), on_error="skip")
    img, _ = ds[row]
    assert ds.substitutions == 1
    coarse = _cluster_rows(cohort_index, cohort_index.num_levels, row) - finest
    assert any(np.array_equal(img.permute(1, 2, 0).numpy(), wsi.read(*cohort_index.tile(r))) for r in coarse)
    all_bad = {cohort_index.tile(r) for r in range(len(cohort_index))}
    ds = TileDataset(cohort_index, Flaky(wsi, all_bad), on_error="skip")
    with pytest.raises(TileReadError, match="corrupt JPEG data; and no readable substitute"):
        ds[row]
    assert ds.substitutions == 0


@pytest.mark.parametrize("context", ["fork", pytest.param("spawn", marks=pytest.mark.slow)])
def test_dataloader_workers_open_their_own_handles_and_share_the_count(cohort_index, wsi, context):
    rows = cohort_index.row_ids(TileIndex.ALL)[::25]
    bad = {cohort_index.tile(int(r)) for r in rows[:3]}
    wsi.read(*cohort_index.tile(0))  # a handle open in the parent must not leak into the workers
    ds = TileDataset(cohort_index, Flaky(wsi, bad), transform=_scale, on_error="skip")
    batches = [rows[i:i + 4].tolist() for i in range(0, len(rows), 4)]
    loader = DataLoader(ds, batch_sampler=batches, num_workers=2 if context == "fork" else 1,
                        multiprocessing_context=context)
    seen = []
    for imgs, rids in loader:
        assert imgs.shape == (len(rids), 3, 224, 224)
        seen += rids.tolist()
        for img, rid in zip(imgs, rids.tolist()):
            if cohort_index.tile(rid) not in bad:
                torch.testing.assert_close(img, ds[rid][0])
    assert seen == rows.tolist()
    assert ds.substitutions == 3
    assert ds.unreadable_slides == sorted({slide for slide, _, _ in bad})  # recorded in the workers


def test_pickles_with_its_count(cohort_index, wsi):
    sid, x, y = cohort_index.tile(0)
    ds = TileDataset(cohort_index, Flaky(wsi, {(sid, x, y)}), on_error="skip")
    ds[0]
    clone = pickle.loads(pickle.dumps(ds))
    assert clone.substitutions == 1 and clone.unreadable_slides == [sid]
    torch.testing.assert_close(clone[5][0], ds[5][0])


def test_build_tile_source_from_config(cohort, tmp_path):
    src = build_tile_source({"backend": "tiffslide", "slides": str(cohort.slides_dir), "fallback": None,
                             "mpp_override": 0.25, "cache_size": 3, "num_workers": 4})
    assert isinstance(src, SlideTileSource)
    assert src.backends == ("tiffslide",) and src.mpp_override == 0.25 and src.cache.size == 3
    cfg = OmegaConf.create({"index": "i", "slides": str(cohort.slides_dir), "fallback": None})
    src = build_tile_source(cfg)
    assert src.backends == ("openslide",) and src.mpp_override is None and src.cache.size == 16
    assert isinstance(build_tile_source({"backend": "hdf5", "tile_store": str(tmp_path)}), HDF5TileSource)
    for cfg, match in [({"backend": "hdf5"}, "data.tile_store"), ({"backend": "openslide"}, "data.slides"),
                       ({"backend": "hdf", "slides": "x"}, "did you mean 'hdf5'"),
                       ({"slides": str(tmp_path / "nope")}, "neither a directory nor a CSV")]:
        with pytest.raises(UserError, match=match):
            build_tile_source(cfg)


def test_unreadable_slides_names_each_slide_once(cohort_index, wsi):
    slides = [cohort_index.tile(r)[0] for r in range(len(cohort_index))]
    names = sorted(set(slides))[:2]
    rows = [r for name in names for r in [i for i, s in enumerate(slides) if s == name][:3]]
    ds = TileDataset(cohort_index, Flaky(wsi, {cohort_index.tile(r) for r in rows}), on_error="skip")
    assert ds.unreadable_slides == []
    for r in rows:
        ds[r]
    assert ds.substitutions == len(rows) == 6 and ds.unreadable_slides == names
