"""TileIndex: round trip CSV -> index (row order, values, dtypes), dedupe, nesting, parquet, views."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dinov2_patho.data.index import TileIndex, build_index
from dinov2_patho.errors import UserError

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def write_csv(path: Path, rows: list[tuple], num_levels: int) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slide_id", "tile_x", "tile_y", *[f"level_{k}" for k in range(1, num_levels + 1)]])
        w.writerows(rows)
    return path


def check_round_trip(index: TileIndex, rows: list[tuple], num_levels: int) -> None:
    """Every row, in file order: slide, coordinates, original level values through the dense ids."""
    assert len(index) == len(rows)
    assert index.num_levels == num_levels
    assert index.level_names == tuple(f"level_{k}" for k in range(1, num_levels + 1))
    x, y = index.coords(TileIndex.ALL)
    assert x.dtype == np.int32 and y.dtype == np.int32
    slides = index.slides(TileIndex.ALL)
    assert slides.dtype == np.int32
    assert [index.slide_names[s] for s in slides] == [r[0] for r in rows]
    assert x.tolist() == [r[1] for r in rows] and y.tolist() == [r[2] for r in rows]
    for k in range(1, num_levels + 1):
        dense = index.level(k)
        assert dense.dtype.kind == "u"
        values = index.cluster_values(k)
        assert values.tolist() == sorted(set(values.tolist()))  # dense ids follow value order
        assert values[dense].tolist() == [r[2 + k] for r in rows]
        assert index.cluster_sizes(k).tolist() == np.bincount(dense, minlength=index.num_clusters(k)).tolist()
        assert index.cluster_sizes(k).min() > 0
    for i in (0, len(rows) - 1):
        assert index.tile(i) == rows[i][:3]


tile_rows = st.lists(
    st.tuples(
        st.sampled_from(["A", "b-1", "TCGA,x", 'q"uote', "NaN", "é"]),
        st.integers(0, 2**31 - 1),
        st.integers(0, 300),
        st.integers(-(2**62), 2**62),
        st.integers(0, 3),
    ),
    min_size=1,
    max_size=40,
    unique_by=lambda r: r[:3],
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=tile_rows)
def test_round_trip_preserves_every_row_in_order(tmp_path_factory, rows):
    tmp = tmp_path_factory.mktemp("rt")
    index = build_index(write_csv(tmp / "c.csv", rows, 2), tmp / "idx", progress=False)
    check_round_trip(index, rows, 2)
    check_round_trip(TileIndex.open(tmp / "idx"), rows, 2)
    grouped = all(
        rows[i][0] == rows[i + 1][0] or rows[i + 1][0] not in {r[0] for r in rows[: i + 1]}
        for i in range(len(rows) - 1)
    )
    assert index.grouped_by_slide == grouped


def test_zero_level_tile_list_round_trips(tmp_path):
    """A tile list before clustering (`curate tiles`' output): no level columns, no clusters."""
    rows = [("s1", 0, 0), ("s1", 224, 0), ("s2", 448, 224)]
    index = build_index(write_csv(tmp_path / "tiles.csv", rows, 0), tmp_path / "idx", progress=False)
    check_round_trip(index, rows, 0)
    assert index.grouped_by_slide and index.summary()["levels"] == []


def test_narrow_storage_and_grouped_layout(tmp_path):
    rng = np.random.default_rng(0)
    rows = [
        (f"s{i // 500}", 224 * (i % 500), 224 * (i // 500), int(v), int(v) // 300, 7)
        for i, v in enumerate(rng.permutation(3000))
    ]
    index = build_index(write_csv(tmp_path / "c.csv", rows, 3), tmp_path / "idx", progress=False)
    check_round_trip(index, rows, 3)
    assert [index.level(k).dtype for k in (1, 2, 3)] == [np.uint16, np.uint8, np.uint8]
    assert isinstance(index.level(1), np.memmap)
    assert index.grouped_by_slide and not (tmp_path / "idx" / "slide.npy").exists()
    assert index.manifest["coords"] == "uint24"
    assert not (tmp_path / "idx" / "level_1.values.npy").exists()  # values 0..K-1 are implied
    assert index.cluster_values(1).tolist() == list(range(3000))
    assert index.cluster_values(3).tolist() == [7]
    assert not list(tmp_path.glob(".idx*"))  # no temp dir left beside the index


def test_ungrouped_csv_stores_slide_per_row_and_says_so(tmp_path):
    rows = [("a", 0, 0, 1), ("b", 0, 0, 1), ("a", 1, 0, 2)]
    index = build_index(write_csv(tmp_path / "c.csv", rows, 1), tmp_path / "idx", progress=False)
    assert not index.grouped_by_slide
    assert (tmp_path / "idx" / "slide.npy").exists()
    check_round_trip(index, rows, 1)
    assert index.select_slides(["a"]).row_ids(TileIndex.ALL).tolist() == [0, 2]
    assert index.summary()["grouped_by_slide"] is False


def test_large_coordinates_fall_back_to_int32(tmp_path):
    rows = [("a", 2**31 - 1, 5, 0), ("a", 2**24, 2**24 - 1, 1)]
    index = build_index(write_csv(tmp_path / "c.csv", rows, 1), tmp_path / "idx", progress=False)
    assert index.manifest["coords"] == "int32"
    check_round_trip(index, rows, 1)


def test_duplicates_fail_by_default_and_dedupe_keeps_first_in_order(tmp_path):
    rows = [("a", 0, 0, 1), ("a", 224, 0, 2), ("b", 0, 0, 3), ("a", 0, 0, 9), ("b", 0, 0, 3), ("b", 1, 1, 4)]
    src = write_csv(tmp_path / "c.csv", rows, 1)
    with pytest.raises(
        UserError, match=r"c\.csv: data row 4 \(line 5\): duplicate tile .*'a'.*first at data row 1"
    ):
        build_index(src, tmp_path / "idx", progress=False)
    assert not (tmp_path / "idx").exists()
    index = build_index(src, tmp_path / "idx", dedupe=True, progress=False)
    check_round_trip(index, [rows[i] for i in (0, 1, 2, 5)], 1)
    assert index.manifest["duplicates_dropped"] == 2
    assert index.cluster_values(1).tolist() == [1, 2, 3, 4]  # value 9 only on a dropped row: gone


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.lists(
        st.tuples(st.sampled_from("ab"), st.integers(0, 3), st.integers(0, 2), st.integers(0, 2)),
        min_size=1,
        max_size=30,
    )
)
def test_dedupe_equals_keeping_first_occurrences(tmp_path_factory, rows):
    tmp = tmp_path_factory.mktemp("dd")
    index = build_index(write_csv(tmp / "c.csv", rows, 1), tmp / "idx", dedupe=True, progress=False)
    seen, kept = set(), []
    for r in rows:
        if r[:3] not in seen:
            seen.add(r[:3])
            kept.append(r)
    check_round_trip(index, kept, 1)


def test_non_tree_nesting_is_a_warning_with_counts(tmp_path, caplog):
    rows = [("a", i, 0, i % 4, (i % 4) // 2 if i < 6 else 1 - (i % 4) // 2) for i in range(8)]
    logging.getLogger("dinov2_patho").propagate = True
    with caplog.at_level(logging.WARNING, logger="dinov2_patho"):
        index = build_index(write_csv(tmp_path / "c.csv", rows, 2), tmp_path / "idx", progress=False)
    msg = "level_1 -> level_2 is not a tree: 2 of 4 level_1 clusters have more than one level_2 parent"
    assert msg in caplog.text
    assert index.manifest["levels"][0]["nesting"] == msg
    tree = [("a", i, 0, i % 4, (i % 4) // 2) for i in range(8)]
    index = build_index(write_csv(tmp_path / "t.csv", tree, 2), tmp_path / "t", progress=False)
    assert index.manifest["levels"][0]["nesting"] is None


def test_sparse_and_negative_cluster_values_remap_dense(tmp_path):
    vals = [10**15, -7, 3, 10**15, 2**40, -7]
    rows = [("a", i, 0, v) for i, v in enumerate(vals)]
    index = build_index(write_csv(tmp_path / "c.csv", rows, 1), tmp_path / "idx", progress=False)
    assert index.cluster_values(1).tolist() == [-7, 3, 2**40, 10**15]
    assert index.level(1).tolist() == [3, 0, 1, 3, 2, 0]
    assert index.cluster_sizes(1).tolist() == [2, 1, 1, 2]


def test_parquet_input_matches_csv(tmp_path):
    rows = [("a", 0, 0, 5, 1), ("a", 224, 0, 6, 1), ("b", 0, 448, 5, 1)]
    table = pa.table(
        {
            "slide_id": [r[0] for r in rows],
            "tile_x": pa.array([r[1] for r in rows], pa.int32()),
            "tile_y": [r[2] for r in rows],
            "level_1": [r[3] for r in rows],
            "level_2": pa.array([r[4] for r in rows], pa.uint8()),
        }
    )
    pq.write_table(table, tmp_path / "c.parquet")
    index = build_index(tmp_path / "c.parquet", tmp_path / "idx", progress=False)
    check_round_trip(index, rows, 2)
    bad = table.set_column(3, "level_1", pa.array([5, None, 6], pa.int64()))
    pq.write_table(bad, tmp_path / "bad.parquet")
    with pytest.raises(UserError, match=r"bad\.parquet: row 2: level_1 is empty or NaN"):
        build_index(tmp_path / "bad.parquet", tmp_path / "idx2", progress=False)
    floats = table.set_column(3, "level_1", pa.array([5.0, 1.0, 6.0]))
    pq.write_table(floats, tmp_path / "f.parquet")
    with pytest.raises(UserError, match=r"f\.parquet: column 'level_1' has type double; expected integers"):
        build_index(tmp_path / "f.parquet", tmp_path / "idx3", progress=False)


def test_rebuild_replaces_an_index_but_never_other_directories(tmp_path):
    src = write_csv(tmp_path / "c.csv", [("a", 0, 0, 1)], 1)
    build_index(src, tmp_path / "idx", progress=False)
    index = build_index(
        write_csv(tmp_path / "d.csv", [("z", 1, 1, 2), ("z", 2, 1, 2)], 1), tmp_path / "idx", progress=False
    )
    assert len(index) == 2 and index.slide_names == ["z"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="not a tile index; refusing"):
        build_index(src, tmp_path / "other", progress=False)
    assert (tmp_path / "other" / "keep.txt").exists()


def test_rebuild_keeps_another_commands_directory_with_a_manifest(tmp_path):
    from dinov2_patho.curation.tree import write_manifest

    src = write_csv(tmp_path / "c.csv", [("a", 0, 0, 1)], 1)
    tree = tmp_path / "tree"  # a k-means tree (or a `curate embed` output): it has a manifest.json too
    write_manifest(tree, 1, [1])
    (tree / "level_1").mkdir()
    with pytest.raises(UserError, match=r"tree: exists and is not a tile index; refusing .*another command"):
        build_index(src, tree, progress=False)
    assert sorted(p.name for p in tree.iterdir()) == ["level_1", "manifest.json"]
    build_index(src, tmp_path / "idx", progress=False)
    (tmp_path / "idx" / "manifest.json").write_text('{"num_ro')  # a damaged index is rebuilt
    assert len(build_index(src, tmp_path / "idx", progress=False)) == 1


def test_open_rejects_missing_and_unknown_formats(tmp_path):
    with pytest.raises(UserError, match="not a tile index"):
        TileIndex.open(tmp_path)
    build_index(write_csv(tmp_path / "c.csv", [("a", 0, 0, 1)], 1), tmp_path / "idx", progress=False)
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    manifest["format_version"] = 999
    (tmp_path / "idx" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="index manifest of format 999, this code reads 1; rebuild"):
        TileIndex.open(tmp_path / "idx")


# --- views -----------------------------------------------------------------------------------------


@pytest.fixture
def small(tmp_path) -> tuple[TileIndex, list[tuple]]:
    rows = [
        (s, 224 * i, 0, (i * 7 + j) % 5, ((i * 7 + j) % 5) // 2)
        for j, s in enumerate("abcd")
        for i in range(6)
    ]
    meta = tmp_path / "meta.csv"
    meta.write_text("slide_id,tissue,num_tiles\na,Lung,6\nb,Lung,6\nc,Breast,6\nzz,Colon,1\n")
    return build_index(write_csv(tmp_path / "c.csv", rows, 2), tmp_path / "idx", progress=False), rows


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_select_is_a_view_of_those_rows(small, data):
    index, rows = small
    picked = sorted(data.draw(st.sets(st.integers(0, len(rows) - 1))))
    view = index.select(np.array(picked, dtype=np.int64))
    assert view.is_view and len(view) == len(picked)
    assert view.row_ids(TileIndex.ALL).tolist() == picked
    for k in (1, 2):
        assert view.level(k).tolist() == index.level(k)[picked].tolist()
        assert (
            view.cluster_sizes(k).tolist()
            == np.bincount(index.level(k)[picked], minlength=index.num_clusters(k)).tolist()
        )
        assert view.num_clusters(k) == index.num_clusters(k)
    assert view.slides(TileIndex.ALL).tolist() == index.slides(TileIndex.ALL)[picked].tolist()
    assert [c.tolist() for c in view.coords(TileIndex.ALL)] == \
        [c[picked].tolist() for c in index.coords(TileIndex.ALL)]
    sub = sorted(data.draw(st.sets(st.sampled_from(picked))) if picked else [])
    assert view.select(np.array(sub, dtype=np.int64)).row_ids(TileIndex.ALL).tolist() == sub


def test_select_refuses_unsorted_out_of_range_and_foreign_rows(small):
    index, _ = small
    for bad in ([2, 1], [1, 1], [-1], [len(index)]):
        with pytest.raises(ValueError):
            index.select(np.array(bad))
    with pytest.raises(ValueError, match="belong to this view"):
        index.select(np.array([0, 1])).select(np.array([2]))


def test_select_slides_and_metadata(small, tmp_path):
    index, rows = small
    view = index.select_slides(["c", "a"])
    assert view.row_ids(TileIndex.ALL).tolist() == [i for i, r in enumerate(rows) if r[0] in "ac"]
    two = index.select(np.arange(3, 20)).select_slides(["a", "b"])
    assert two.row_ids(TileIndex.ALL).tolist() == list(range(3, 12))
    with pytest.raises(UserError, match="unknown slide_id 'nope'"):
        index.select_slides(["nope"])
    meta = tmp_path / "meta.csv"
    codes, names = index.metadata_codes(meta, "tissue")
    assert names == ["Breast", "Lung"]
    assert codes.dtype == np.int8  # the narrowest signed dtype for 2 values and -1
    assert codes.tolist() == [{"a": 1, "b": 1, "c": 0, "d": -1}[r[0]] for r in rows]
    lung = index.select_metadata(meta, "tissue", ["Lung"])
    assert lung.row_ids(TileIndex.ALL).tolist() == [i for i, r in enumerate(rows) if r[0] in "ab"]
    assert lung.select_metadata(meta, "tissue", ["Breast"]).row_ids(TileIndex.ALL).size == 0
    with pytest.raises(UserError, match=r"no column 'organ'.*tissue"):
        index.metadata_codes(meta, "organ")
    with pytest.raises(UserError, match=r"tissue='Colon'"):  # only on a slide absent from the index
        index.select_metadata(meta, "tissue", ["Colon"])


def test_metadata_conflicting_rows_name_the_row(small, tmp_path):
    index, _ = small
    meta = tmp_path / "m2.csv"
    meta.write_text("slide_id,tissue\na,Lung\na,Breast\n")
    with pytest.raises(UserError, match=r"m2\.csv: data row 2: slide_id 'a' listed again"):
        index.metadata_codes(meta, "tissue")


def test_real_tcga_metadata_format(tmp_path):
    meta = SHARED_DATA / "TCGA_tissue_metadata.csv"
    if not meta.is_file():
        pytest.skip(f"{meta} is absent")
    with open(meta) as f:
        head = [next(f) for _ in range(4)][1:]
    ids = [line.split(",")[0] for line in head]
    rows = [(s, 224 * i, 0, i % 2) for s in ids for i in range(3)]
    index = build_index(write_csv(tmp_path / "c.csv", rows, 1), tmp_path / "idx", progress=False)
    codes, names = index.metadata_codes(meta, "tissue_diagnosis")
    assert (codes >= 0).all() and names
    view = index.select_metadata(meta, "tissue_diagnosis", [names[codes[0]]])
    assert view.row_ids(TileIndex.ALL)[0] == 0


def test_cohort_index(cohort, cohort_index):
    assert len(cohort_index) == len(cohort.clusters_csv.read_text().splitlines()) - 1
    assert cohort_index.grouped_by_slide
    codes, names = cohort_index.metadata_codes(cohort.metadata_csv, "tissue")
    assert (codes >= 0).all()
    for k in range(1, cohort_index.num_levels + 1):
        assert cohort_index.cluster_sizes(k).sum() == len(cohort_index)


def test_hash_collisions_are_checked_on_exact_tiles(tmp_path, monkeypatch):
    """Duplicates are confirmed on (slide, x, y): with every hash equal, only true repeats are dropped."""
    from dinov2_patho.data.index import scratch

    monkeypatch.setattr(scratch, "tile_hash", lambda s, x, y: np.zeros(x.size, np.uint64))
    rows = [("a", 0, 0, 1), ("a", 0, 224, 1), ("b", 0, 0, 2), ("a", 0, 224, 3), ("c", 5, 5, 1)]
    index = build_index(write_csv(tmp_path / "c.csv", rows, 1), tmp_path / "idx", dedupe=True, progress=False)
    check_round_trip(index, [rows[i] for i in (0, 1, 2, 4)], 1)


def test_cluster_values_leaving_the_lookup_table_midway(tmp_path, monkeypatch):
    """Small values first (lookup table), then huge ones in later blocks (sorted table): same ids."""
    from dinov2_patho.data.index import source as index_source

    monkeypatch.setattr(index_source, "CSV_BLOCK_SIZE", 1 << 12)
    rows = [("s", i, 0, i % 50 if i < 1000 else (i % 70) * 2**40 + i % 3) for i in range(2000)]
    index = build_index(write_csv(tmp_path / "c.csv", rows, 1), tmp_path / "idx", progress=False)
    check_round_trip(index, rows, 1)


@pytest.mark.parametrize("rows, coords, grouped, stored", [
    ([("s0", 0, 0, 0), ("s0", 224, 0, 1), ("s1", 0, 224, 1)], "uint24", True, False),
    ([("s0", 0, 0, 5), ("s1", 1 << 24, 0, -3), ("s0", 224, 0, 5)], "int32", False, True),
])
def test_the_format_module_defines_every_file_and_manifest_key(tmp_path, rows, coords, grouped, stored):
    from dinov2_patho.data.index.format import Manifest, index_files

    index = build_index(write_csv(tmp_path / "c.csv", rows, 1), tmp_path / "idx", progress=False)
    manifest = Manifest.read(tmp_path / "idx")
    layout = (manifest.coords, manifest.grouped_by_slide, manifest.levels[0].values_stored)
    assert layout == (coords, grouped, stored)
    assert sorted(p.name for p in (tmp_path / "idx").iterdir()) == sorted(index_files(manifest))
    assert index.manifest == json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert index.summary()["bytes_on_disk"] == sum(p.stat().st_size for p in (tmp_path / "idx").iterdir())


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, (1 << 24) - 1), st.integers(0, (1 << 24) - 1)), max_size=50))
def test_uint24_codec_round_trips(pairs):
    from dinov2_patho.data.index.format import UINT24, decode_xy, encode_xy

    x, y = (np.array([p[i] for p in pairs], np.int32) for i in (0, 1))
    encoded = encode_xy(UINT24, x, y)
    assert encoded.dtype == np.uint8 and encoded.shape == (len(pairs), 6)
    dx, dy = decode_xy(encoded)
    assert dx.tolist() == x.tolist() and dy.tolist() == y.tolist()


def test_format_names_are_imported_from_the_format_module():
    """Nothing reaches into the ingest for a name that the format module defines."""
    import ast

    from dinov2_patho.data.index import format as index_format

    root = Path(__file__).resolve().parents[1]
    format_names = {n for n in vars(index_format) if not n.startswith("_")}
    found = []
    for package in ("dinov2_patho", "samplers", "eval"):
        for path in sorted((root / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.ImportFrom) and (node.module or "").endswith("index.ingest"):
                    found += [f"{path.relative_to(root)}: {a.name}" for a in node.names
                              if a.name in format_names]
    assert not found
