import csv

import numpy as np
import pytest
import tifffile
from PIL import Image

from dinov2_patho.cli import main
from dinov2_patho.demo.cohort import MPP, TILE, TISSUE_TYPES, make_cohort
from dinov2_patho.errors import UserError


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_layout_and_csv_headers(cohort):
    assert len(cohort.slide_ids) == 8
    for sid in cohort.slide_ids:
        assert cohort.slide_path(sid).is_file()
        assert (cohort.masks_dir / f"{sid}.png").is_file()
    clusters = _rows(cohort.clusters_csv)
    assert list(clusters[0]) == ["slide_id", "tile_x", "tile_y", "level_1", "level_2", "level_3", "level_4"]
    assert list(_rows(cohort.labels_csv)[0]) == ["slide_id", "tile_x", "tile_y", "tissue_type"]
    meta = _rows(cohort.metadata_csv)
    assert list(meta[0]) == ["slide_id", "tissue", "primary_diagnosis", "tissue_diagnosis"]
    assert [m["slide_id"] for m in meta] == list(cohort.slide_ids)
    assert {r["slide_id"] for r in clusters} == set(cohort.slide_ids)


def test_tree_nests_and_coarse_level_is_tissue_type(cohort):
    clusters = _rows(cohort.clusters_csv)
    labels = _rows(cohort.labels_csv)
    assert [(r["slide_id"], r["tile_x"], r["tile_y"]) for r in clusters] == \
        [(r["slide_id"], r["tile_x"], r["tile_y"]) for r in labels]
    for fine, coarse in (("level_1", "level_2"), ("level_2", "level_3"), ("level_3", "level_4")):
        parent: dict[str, str] = {}
        for r in clusters:
            assert parent.setdefault(r[fine], r[coarse]) == r[coarse], f"{fine} {r[fine]} has two parents"
        assert len(set(parent)) > len(set(parent.values()))
    assert {TISSUE_TYPES[int(r["level_4"])] for r in clusters} == set(TISSUE_TYPES)
    assert all(TISSUE_TYPES[int(c["level_4"])] == lab["tissue_type"] for c, lab in zip(clusters, labels))


def test_tiles_lie_on_tissue_inside_the_slide(cohort):
    for sid in cohort.slide_ids:
        mask = np.asarray(Image.open(cohort.masks_dir / f"{sid}.png")) > 0
        with tifffile.TiffFile(cohort.slide_path(sid)) as tif:
            height, width = tif.pages[0].shape[:2]
            assert f"MPP = {MPP}" in tif.pages[0].description
        rows = [r for r in _rows(cohort.clusters_csv) if r["slide_id"] == sid]
        assert len(rows) == mask.sum() > 0
        for r in rows:
            x, y = int(r["tile_x"]), int(r["tile_y"])
            assert x % TILE == 0 and y % TILE == 0 and x + TILE <= width and y + TILE <= height
            assert mask[y // TILE, x // TILE]


def _colour_features(cohort):
    """Per tissue tile: RGB mean and std, its type and its slide."""
    feats, labels, slides = [], [], []
    handles = {sid: tifffile.imread(cohort.slide_path(sid), level=0) for sid in cohort.slide_ids}
    for r in _rows(cohort.labels_csv):
        x, y = int(r["tile_x"]), int(r["tile_y"])
        tile = handles[r["slide_id"]][y:y + TILE, x:x + TILE].reshape(-1, 3).astype(np.float32)
        feats.append(np.concatenate([tile.mean(0), tile.std(0)]))
        labels.append(TISSUE_TYPES.index(r["tissue_type"]))
        slides.append(cohort.slide_ids.index(r["slide_id"]))
    return np.array(feats), np.array(labels), np.array(slides)


def _nearest_centroid_accuracy(feats, labels, fit, test):
    types = np.unique(labels[fit])
    centroids = np.stack([feats[fit & (labels == t)].mean(0) for t in types])
    pred = types[np.linalg.norm(feats[test][:, None] - centroids[None], axis=-1).argmin(1)]
    return (pred == labels[test]).mean()


def test_tissue_types_distinct_within_a_slide_but_colour_does_not_transfer_across_slides(cohort):
    """Per-slide stain variation, as between real sites and staining batches: within one slide a
    nearest-centroid rule on colour mean/std separates the types; fit on half the slides, it does
    not carry over to the other half (without the variation it scores > 0.95 there too)."""
    feats, labels, slides = _colour_features(cohort)
    for s in range(len(cohort.slide_ids)):
        rows = np.flatnonzero(slides == s)
        fit, test = np.zeros(len(labels), bool), np.zeros(len(labels), bool)
        fit[rows[::2]], test[rows[1::2]] = True, True
        assert _nearest_centroid_accuracy(feats, labels, fit, test) > 0.95, cohort.slide_ids[s]
    half = len(cohort.slide_ids) // 2
    assert _nearest_centroid_accuracy(feats, labels, slides < half, slides >= half) < 0.8


def test_stain_varies_between_slides(cohort):
    """The same tissue type's mean colour differs between slides far more than within one."""
    feats, labels, slides = _colour_features(cohort)
    for t in range(len(TISSUE_TYPES)):
        per_slide = [feats[(labels == t) & (slides == s), :3] for s in np.unique(slides[labels == t])]
        between = np.std([m.mean(0) for m in per_slide], axis=0).max()
        within = np.mean([m.std(0).max() for m in per_slide if len(m) > 1])
        assert between > 5 * within, (TISSUE_TYPES[t], between, within)


def test_deterministic_for_a_seed(tmp_path):
    a = make_cohort(tmp_path / "a", num_slides=2, seed=3, grid=(4, 4))
    b = make_cohort(tmp_path / "b", num_slides=2, seed=3, grid=(4, 4))
    c = make_cohort(tmp_path / "c", num_slides=2, seed=4, grid=(4, 4))
    assert a.clusters_csv.read_text() == b.clusters_csv.read_text()
    for sa, sb in zip(a.slide_ids, b.slide_ids):
        assert np.array_equal(tifffile.imread(a.slide_path(sa)), tifffile.imread(b.slide_path(sb)))
    assert not np.array_equal(tifffile.imread(a.slide_path(a.slide_ids[0])),
                              tifffile.imread(c.slide_path(c.slide_ids[0])))


def test_refuses_non_empty_output_and_bad_count(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        make_cohort(tmp_path / "x", num_slides=1, grid=(3, 3))
    assert (tmp_path / "x" / "keep.txt").read_text() == "mine"
    with pytest.raises(UserError, match="num_slides"):
        make_cohort(tmp_path / "y", num_slides=0)


def test_cli(tmp_path, capsys):
    out = str(tmp_path / "c")
    assert main(["cohort", "--out", out, "--num-slides", "2", "--seed", "1", "--grid", "3", "4"]) == 0
    assert len(list((tmp_path / "c" / "slides").glob("*.tiff"))) == 2
    assert main(["cohort", "--out", str(tmp_path / "c"), "--num-slides", "1"]) == 2
    assert "not empty" in capsys.readouterr().err
