import os

import h5py
import numpy as np
import pytest

from dinov2_patho.cli import main
from dinov2_patho.data.index import TileIndex
from dinov2_patho.data.readers import SlideTileSource, TileReadError
from dinov2_patho.data.slides import SlideNotFoundError, SlideRegistry
from dinov2_patho.data.tilestore import HDF5TileSource, extract_tiles
from dinov2_patho.errors import UserError


@pytest.fixture(scope="module")
def wsi(cohort):
    return SlideTileSource(SlideRegistry.from_dir(cohort.slides_dir))


@pytest.fixture(scope="module")
def store(cohort_index, wsi, tmp_path_factory):
    out = tmp_path_factory.mktemp("store")
    slides = cohort_index.slide_names[:3]
    written = extract_tiles(cohort_index, wsi, out, slide_ids=slides, workers=2)
    assert sum(written.values()) == int(np.isin(cohort_index.slides(TileIndex.ALL), [0, 1, 2]).sum())
    return out


class _FailAfter:
    """A source that breaks after `n` reads, as a crash in the middle of a slide would."""

    def __init__(self, inner, n):
        self.inner, self.n = inner, n

    def read(self, slide_id, x, y):
        self.n -= 1
        if self.n < 0:
            raise TileReadError(slide_id, x, y, "simulated failure")
        return self.inner.read(slide_id, x, y)


def test_store_layout_and_pixels_match_the_slides(store, cohort_index, wsi):
    names = sorted(p.name for p in store.iterdir())
    assert names == sorted(f"{s}.h5" for s in cohort_index.slide_names[:3])
    with h5py.File(store / names[0], "r") as f:
        assert f["tiles"].dtype == np.uint8 and f["tiles"].shape[1:] == (224, 224, 3)
        assert f["tiles"].chunks == (1, 224, 224, 3) and f["tiles"].compression is None
        coords = f["coords"][:]
        assert list(map(tuple, coords)) == sorted(map(tuple, coords), key=lambda c: (c[1], c[0]))
    h5 = HDF5TileSource(store)
    for row in np.flatnonzero(cohort_index.slides(TileIndex.ALL) < 3)[::5]:
        sid, x, y = cohort_index.tile(int(row))
        np.testing.assert_array_equal(h5.read(sid, x, y), wsi.read(sid, x, y))


def test_extraction_resumes_per_slide(store, cohort_index, wsi):
    first, second = (store / f"{s}.h5" for s in cohort_index.slide_names[:2])
    mtime = second.stat().st_mtime_ns
    first.unlink()
    written = extract_tiles(cohort_index, wsi, store, slide_ids=cohort_index.slide_names[:3])
    assert written[cohort_index.slide_names[0]] > 0
    assert all(n == 0 for sid, n in written.items() if sid != cohort_index.slide_names[0])
    assert second.stat().st_mtime_ns == mtime


def test_interrupted_slide_leaves_nothing_behind(cohort_index, wsi, tmp_path):
    sid = cohort_index.slide_names[3]
    with pytest.raises(TileReadError, match="simulated failure"):
        extract_tiles(cohort_index, _FailAfter(wsi, 5), tmp_path, slide_ids=[sid])
    assert os.listdir(tmp_path) == []
    assert extract_tiles(cohort_index, wsi, tmp_path, slide_ids=[sid])[sid] > 5


def test_foreign_file_needs_overwrite(cohort_index, wsi, tmp_path):
    sid = cohort_index.slide_names[0]
    (tmp_path / f"{sid}.h5").write_bytes(b"junk")
    with pytest.raises(UserError, match=f"{sid}.h5 exists but does not hold this index's tiles.*--overwrite"):
        extract_tiles(cohort_index, wsi, tmp_path, slide_ids=[sid])
    assert extract_tiles(cohort_index, wsi, tmp_path, slide_ids=[sid], overwrite=True)[sid] > 0
    with pytest.raises(UserError, match="not in the index"):
        extract_tiles(cohort_index, wsi, tmp_path, slide_ids=["nope"])


def test_reader_errors_name_slide_and_coordinates(store, cohort_index, tmp_path):
    sid, x, y = cohort_index.tile(0)
    h5 = HDF5TileSource(store)
    with pytest.raises(TileReadError, match=rf"slide '{sid}', tile at level-0 \(x={x + 1}, y={y}\): "
                                            rf"not in the tile store file .*{sid}.h5"):
        h5.read(sid, x + 1, y)
    with pytest.raises(SlideNotFoundError, match="'ghost' has no file .*ghost.h5"):
        h5.read("ghost", 0, 0)
    (tmp_path / "bad.h5").write_bytes(b"\0" * 4096)
    with pytest.raises(TileReadError, match=r"slide 'bad', tile at level-0 \(x=0, y=0\): cannot open"):
        HDF5TileSource(tmp_path).read("bad", 0, 0)
    with pytest.raises(UserError, match="not a directory"):
        HDF5TileSource(tmp_path / "absent")


def test_cli_extract(cohort, cohort_index, tmp_path, capsys):
    sid = cohort_index.slide_names[1]
    args = ["tiles", "extract", "--index", str(cohort_index.path), "--slides", str(cohort.slides_dir),
            "--out", str(tmp_path), "--slide-id", sid]
    assert main(args) == 0
    assert "1 slides extracted" in capsys.readouterr().out
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "0 slides extracted" in out and "1 already complete" in out
    assert [p.name for p in tmp_path.iterdir()] == [f"{sid}.h5"]
