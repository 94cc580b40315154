import logging
import pickle
import shutil

import numpy as np
import pytest
import tifffile
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from dinov2_patho.data import readers
from dinov2_patho.data.readers import (
    TILE_PX,
    TILE_UM,
    HandleCache,
    MissingMppError,
    SlideTileSource,
    TileReadError,
    tile_geometry,
)
from dinov2_patho.data.slides import SlideRegistry
from dinov2_patho.errors import UserError


def _tiles(cohort, slide_id):
    rows = [line.split(",") for line in cohort.clusters_csv.read_text().splitlines()[1:]]
    return [(int(r[1]), int(r[2])) for r in rows if r[0] == slide_id]


@pytest.fixture(scope="module")
def registry(cohort):
    return SlideRegistry.from_dir(cohort.slides_dir)


@pytest.fixture(scope="module")
def level0(cohort):
    sid = cohort.slide_ids[0]
    return sid, tifffile.imread(cohort.slide_path(sid), level=0)


@given(mpp=st.floats(0.1, 2.0), downsamples=st.lists(st.sampled_from([2.0, 3.0, 4.0, 4.0003, 8.0, 16.0, 15.97,
                                                                        32.0]), max_size=4, unique=True))
def test_geometry_keeps_the_footprint(mpp, downsamples):
    ds = (1.0, *sorted(downsamples))
    g = tile_geometry(mpp, (10_000, 8_000), ds)
    assert g.size0 == round(TILE_UM / mpp)
    k = round(ds[g.level])
    assert g.read_px * k == g.size0  # same level-0 footprint at the chosen level
    assert g.level == 0 or g.read_px >= TILE_PX  # never upsample from a coarser level
    for lvl, d in enumerate(ds):  # no coarser exact level would have done
        if round(d) > k and abs(d - round(d)) <= 0.01 * round(d) and g.size0 % round(d) == 0:
            assert g.size0 // round(d) < TILE_PX, (lvl, d)


def test_geometry_examples():
    assert tile_geometry(0.25, (1, 1), (1.0, 2.0, 8.0))[1:4] == (448, 1, 224)
    assert tile_geometry(0.25, (1, 1), (1.0, 4.0, 16.0))[1:4] == (448, 0, 448)
    assert tile_geometry(0.5, (1, 1), (1.0, 4.0))[1:4] == (224, 0, 224)
    assert tile_geometry(1.0, (1, 1), (1.0, 4.0))[1:4] == (112, 0, 112)


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_tiles_match_level0_pixels(registry, level0, backend, cohort):
    sid, ref = level0
    src = SlideTileSource(registry, backend=backend, fallback=None)
    assert src.geometry(sid)[:4] == (0.5, 224, 0, 224)
    assert src.backend_of(sid) == backend
    for x, y in _tiles(cohort, sid)[:10]:
        tile = src.read(sid, x, y)
        assert tile.shape == (TILE_PX, TILE_PX, 3) and tile.dtype == np.uint8
        np.testing.assert_array_equal(tile, ref[y:y + 224, x:x + 224])


def test_fast_openslide_read_equals_read_region(registry, cohort):
    """Our OpenSlide read skips read_region's PIL image through openslide-python internals: same pixels."""
    import openslide

    sid = cohort.slide_ids[4]
    handle = openslide.OpenSlide(str(registry.path(sid)))
    for x, y, level, size in [(0, 0, 0, 224), (300, 700, 0, 224), (448, 448, 1, 100), (2300 - 64, 0, 0, 64)]:
        expected = np.asarray(handle.read_region((x, y), level, (size, size)))
        np.testing.assert_array_equal(readers._openslide_read(handle, x, y, level, size), expected)


def test_backends_agree_on_every_tissue_tile(registry, cohort):
    a = SlideTileSource(registry, backend="openslide", fallback=None)
    b = SlideTileSource(registry, backend="tiffslide", fallback=None)
    for sid in cohort.slide_ids[:3]:
        for x, y in _tiles(cohort, sid):
            np.testing.assert_array_equal(a.read(sid, x, y), b.read(sid, x, y))


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_mpp_override_resizes_and_uses_pyramid_levels(registry, level0, backend):
    sid, ref = level0
    # 0.25 um/px: a 448-px footprint, no exact level with >= 224 px -> level 0 then a 2x box reduce.
    src = SlideTileSource(registry, backend=backend, fallback=None, mpp_override=0.25)
    assert src.geometry(sid)[1:4] == (448, 0, 448)
    expected = np.asarray(Image.fromarray(ref[448:896, 448:896]).reduce(2))
    np.testing.assert_array_equal(src.read(sid, 448, 448), expected)
    # 0.125 um/px: an 896-px footprint, read as 224 px from level 1 (downsample 4), same area.
    src = SlideTileSource(registry, backend=backend, fallback=None, mpp_override=0.125)
    assert src.geometry(sid)[1:4] == (896, 1, 224)
    tile = src.read(sid, 448, 448).astype(int)

    def err(dy, dx):
        region = ref[448 + dy:1344 + dy, 448 + dx:1344 + dx]
        return np.abs(tile - np.asarray(Image.fromarray(region).reduce(4))).mean()

    # The level's own JPEG differs from a reduce of level 0, but the alignment is exact: one level-1
    # pixel of shift (4 level-0 px) in any direction fits worse.
    assert err(0, 0) < 8
    assert all(err(0, 0) < 0.5 * err(dy, dx) for dy, dx in [(4, 0), (-4, 0), (0, 4), (0, -4)])
    # 0.4 um/px: 280 px, a non-integer factor -> bilinear to 224.
    src = SlideTileSource(registry, backend=backend, fallback=None, mpp_override=0.4)
    assert src.read(sid, 0, 0).shape == (224, 224, 3)


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
@pytest.mark.parametrize(("x", "y"), [(-1, 0), (0, -224), (2300 - 223, 0), (0, 2300 - 223), (5000, 5000)])
def test_out_of_bounds_names_slide_and_coordinates(registry, cohort, backend, x, y):
    sid = cohort.slide_ids[1]
    src = SlideTileSource(registry, backend=backend, fallback=None)
    with pytest.raises(TileReadError, match=rf"slide '{sid}', tile at level-0 \(x={x}, y={y}\): outside"):
        src.read(sid, x, y)
    assert src.read(sid, 2300 - 224, 2300 - 224).shape == (224, 224, 3)  # the last tile that fits


def test_missing_mpp_is_a_clear_error_and_override_fixes_it(tmp_path):
    rgb = np.full((512, 512, 3), 200, np.uint8)
    tifffile.imwrite(tmp_path / "nompp.tif", rgb, tile=(256, 256), photometric="rgb", compression="jpeg",
                     metadata=None)
    reg = SlideRegistry.from_dir(tmp_path)
    for backend in ("openslide", "tiffslide"):
        with pytest.raises(MissingMppError, match=r"slide 'nompp' \(.*nompp.tif\) has no microns-per-pixel.*"
                                                  r"set data\.mpp_override$"):
            SlideTileSource(reg, backend=backend, fallback=None).read("nompp", 0, 0)
        with pytest.raises(MissingMppError, match=r"set --mpp-override$"):  # the caller's name for it
            SlideTileSource(reg, backend=backend, fallback=None, mpp_key="--mpp-override").read("nompp", 0, 0)
        tile = SlideTileSource(reg, backend=backend, fallback=None, mpp_override=0.5).read("nompp", 0, 0)
        assert np.abs(tile.astype(int) - 200).max() <= 2


def test_unopenable_file_and_fallback(tmp_path, cohort, monkeypatch, caplog):
    (tmp_path / "junk.svs").write_bytes(b"not a slide at all" * 100)
    shutil.copy(cohort.slide_path(cohort.slide_ids[0]), tmp_path / "good.tiff")
    reg = SlideRegistry.from_dir(tmp_path)
    with pytest.raises(TileReadError, match=r"slide 'junk', tile at level-0 \(x=0, y=0\): cannot open "
                                            r".*junk.svs: openslide: .*; tiffslide: "):
        SlideTileSource(reg).read("junk", 0, 0)

    def broken(path):
        raise ImportError("libopenslide missing")

    monkeypatch.setitem(readers._BACKENDS, "openslide", (broken, readers._BACKENDS["openslide"][1]))
    with caplog.at_level(logging.WARNING, logger="dinov2_patho"):
        src = SlideTileSource(reg, backend="openslide", fallback="tiffslide")
        assert src.read("good", 224, 224).shape == (224, 224, 3)
    assert src.backend_of("good") == "tiffslide"
    assert "fallback tiffslide" in caplog.text and "libopenslide missing" in caplog.text
    with pytest.raises(TileReadError, match="libopenslide missing"):
        SlideTileSource(reg, backend="openslide", fallback=None).read("good", 0, 0)


@pytest.mark.parametrize("backend", ["openslide", "tiffslide"])
def test_corrupt_tile_is_an_error_and_the_slide_stays_usable(tmp_path, cohort, backend):
    sid = cohort.slide_ids[2]
    path = tmp_path / f"{sid}.tiff"
    shutil.copy(cohort.slide_path(sid), path)
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        per_row = -(-page.imagewidth // page.tilewidth)
        offset, count = page.dataoffsets[per_row + 1], page.databytecounts[per_row + 1]  # TIFF tile (1, 1)
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\0" * count)
    src = SlideTileSource(SlideRegistry.from_dir(tmp_path), backend=backend, fallback=None)
    with pytest.raises(TileReadError, match=rf"slide '{sid}', tile at level-0 \(x=300, y=300\): {backend}"):
        src.read(sid, 300, 300)
    assert src.read(sid, 1344, 1344).shape == (224, 224, 3)


def test_bad_settings_are_user_errors(registry):
    with pytest.raises(UserError, match="unknown slide backend 'openslid'; did you mean 'openslide'"):
        SlideTileSource(registry, backend="openslid")
    with pytest.raises(UserError, match="mpp_override"):
        SlideTileSource(registry, mpp_override=0)
    with pytest.raises(UserError, match="cache_size"):
        SlideTileSource(registry, cache_size=0)


class _Handle:
    def __init__(self, key, log):
        self.key, self.log = key, log

    def close(self):
        self.log.append(self.key)


@given(keys=st.lists(st.sampled_from("abcdef"), max_size=40), size=st.integers(1, 4))
def test_handle_cache_is_an_lru(keys, size):
    cache, closed, opened, recent = HandleCache(size), [], [], []
    for k in keys:
        handle = cache.get(k, lambda k=k: opened.append(k) or _Handle(k, closed))
        assert handle.key == k
        recent = [r for r in recent if r != k] + [k]
    assert len(cache) == min(size, len(set(keys)))
    # Exactly the evicted handles were closed; the `size` most recently used are still open.
    assert sorted(opened) == sorted(closed + recent[-size:])
    assert all(cache.get(k, lambda: pytest.fail("reopened")).key == k for k in recent[-size:])


def test_lru_cache_and_pickling(registry, cohort):
    src = SlideTileSource(registry, cache_size=2)
    tiles = {sid: src.read(sid, *_tiles(cohort, sid)[0]) for sid in cohort.slide_ids[:3]}
    assert len(src.cache) == 2
    clone = pickle.loads(pickle.dumps(src))
    assert len(clone.cache) == 0 and len(src.cache) == 2
    for sid, tile in tiles.items():
        np.testing.assert_array_equal(clone.read(sid, *_tiles(cohort, sid)[0]), tile)
    src.close()
    assert len(src.cache) == 0


def test_real_aperio_slide(cmu_small_region):
    reg = SlideRegistry.from_dir(cmu_small_region.parent)
    sid = cmu_small_region.name[: -len(".svs")]
    a = SlideTileSource(reg, backend="openslide", fallback=None)
    b = SlideTileSource(reg, backend="tiffslide", fallback=None)
    g = a.geometry(sid)
    assert abs(g.mpp - 0.499) < 1e-3 and g.size0 == round(112 / g.mpp) == 224
    assert (g.width, g.height) == (2220, 2967)
    for x, y in [(0, 0), (1000, 1500), (2220 - 224, 2967 - 224)]:
        ta, tb = a.read(sid, x, y), b.read(sid, x, y)
        assert ta.shape == (224, 224, 3)
        assert np.abs(ta.astype(int) - tb).max() <= 2  # two JPEG decoders
    with pytest.raises(TileReadError, match=rf"'{sid}'.*\(x=1997, y=0\): outside"):
        a.read(sid, 2220 - 223, 0)
