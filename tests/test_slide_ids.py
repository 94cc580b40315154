"""Slide ids name files (`slide_files`): every file named after one lies in its folder, under its own
name, or the id is refused in one line where it enters."""

import csv
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dinov2_patho.cli import main
from dinov2_patho.data.index import TileIndex, build_index
from dinov2_patho.data.readers import SlideTileSource
from dinov2_patho.data.slides import SlideRegistry
from dinov2_patho.data.tilestore import extract_tiles
from dinov2_patho.errors import UserError
from dinov2_patho.slide_files import check_distinct_case, slide_id_problem, slide_path

HOSTILE = ["../../escape", "/abs/x", "a/b", "a\\b", "x\0y", "x" * 10_000, "..", ".", ".hidden", "a\nb",
           "tab\there", "rtl\u202eexe.svs", " padded"]
# ids that are odd but safe: they must name their files unchanged
ODD = ["<!--<script>", "a..b", "ünï cødé", "x:y;z", "TCGA-02-0001-01Z-00-DX1.83fce43e"]


def _csv(path: Path, slide_ids: list[str]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["slide_id", "tile_x", "tile_y", "level_1"])
        w.writerows([s, 0, 0, 1] for s in slide_ids)
    return path


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_a_named_file_lies_in_its_folder_under_the_id_or_the_id_is_refused(slide_id):
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = slide_path(tmp, slide_id, ".h5")
        except UserError as e:
            assert len(str(e).splitlines()) == 1 and len(str(e)) < 1000
            assert slide_id_problem(slide_id) is not None
            return
        path.write_bytes(b"")  # the file system takes the name as it is
        assert os.listdir(tmp) == [slide_id + ".h5"]
        assert path.resolve().parent == Path(tmp).resolve()


@pytest.mark.parametrize("slide_id", HOSTILE)
def test_index_build_refuses_a_hostile_id_in_one_line(slide_id, tmp_path, capsys):
    src = _csv(tmp_path / "clusters.csv", ["good", slide_id])
    assert main(["index", "build", "--csv", str(src), "--out", str(tmp_path / "index"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "data row 2 (line 3)" in err and str(src) in err
    assert not (tmp_path / "index").exists()


def test_index_build_refuses_ids_that_differ_only_by_case(tmp_path, capsys):
    src = _csv(tmp_path / "clusters.csv", ["TCGA-AB", "x", "tcga-ab"])
    assert main(["index", "build", "--csv", str(src), "--out", str(tmp_path / "index"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "'TCGA-AB' and 'tcga-ab' differ only by case" in err
    with pytest.raises(UserError, match="differ only by case"):
        check_distinct_case(["Ä", "ä"], "here")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(slide_id=st.text(min_size=1, max_size=40))
def test_an_id_survives_index_build_unchanged_or_is_refused(slide_id, tmp_path):
    work = Path(tempfile.mkdtemp(dir=tmp_path))
    src = _csv(work / "clusters.csv", [slide_id])
    try:
        index = build_index(src, work / "index", progress=False)
    except UserError as e:
        assert "\n" not in str(e)
        return
    finally:
        assert sorted(os.listdir(work)) in (["clusters.csv"], ["clusters.csv", "index"])
    assert slide_id_problem(slide_id) is None
    assert index.slide_names == [slide_id]
    shutil.rmtree(work)


@pytest.fixture(scope="module")
def odd_cohort(cohort, tmp_path_factory):
    """The cohort's first slides under odd but safe ids: a registry CSV and an index of their tiles."""
    root = tmp_path_factory.mktemp("odd")
    ids = dict(zip(ODD, sorted(cohort.slides_dir.iterdir())))
    with open(root / "slides.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([("slide_id", "path"), *((s, str(p)) for s, p in ids.items())])
    with open(root / "clusters.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["slide_id", "tile_x", "tile_y", "level_1"])
        w.writerows([s, x, 0, 1] for s in ids for x in (0, 224))
    return root, build_index(root / "clusters.csv", root / "index", progress=False)


def test_odd_ids_name_their_tile_store_files_unchanged(odd_cohort, tmp_path):
    root, index = odd_cohort
    assert index.slide_names == ODD
    store = tmp_path / "a" / "b" / "store"
    assert main(["tiles", "extract", "--index", str(index.path), "--slides", str(root / "slides.csv"),
                 "--out", str(store), "--no-progress"]) == 0
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == sorted(f"{s}.h5" for s in ODD)
    assert sorted(os.listdir(store)) == sorted(f"{s}.h5" for s in ODD)


def test_an_index_from_before_the_rule_names_no_file_outside_the_store(odd_cohort, tmp_path, capsys):
    root, index = odd_cohort
    old = tmp_path / "old_index"
    shutil.copytree(index.path, old)
    (old / "slides.json").write_text(json.dumps(["../../escape", *ODD[1:]]))
    store = tmp_path / "a" / "b" / "store"
    registry = SlideRegistry.from_csv(root / "slides.csv")
    with pytest.raises(UserError, match=r"store: slide id '../../escape' holds a path separator"):
        extract_tiles(TileIndex.open(old), SlideTileSource(registry), store)
    assert not list(tmp_path.glob("*.h5")) and not list(store.iterdir())


def test_registry_csv_refuses_a_hostile_id_naming_its_line(tmp_path):
    (tmp_path / "s.csv").write_text("slide_id,path\nok,a.svs\n../x,b.svs\n")
    with pytest.raises(UserError, match=r"s.csv:3: slide id '../x' holds a path separator"):
        SlideRegistry.from_csv(tmp_path / "s.csv")


def test_registry_directory_skips_hidden_files_and_refuses_an_unsafe_name(tmp_path):
    (tmp_path / "a.svs").write_bytes(b"")
    (tmp_path / "._a.svs").write_bytes(b"")  # macOS metadata beside the slide
    (tmp_path / ".trash").mkdir()
    (tmp_path / ".trash" / "b.svs").write_bytes(b"")
    assert SlideRegistry.from_dir(tmp_path).slide_ids() == ["a"]
    (tmp_path / "c\x07.svs").write_bytes(b"")
    with pytest.raises(UserError, match=r"slide id 'c\\x07' holds the control"):
        SlideRegistry.from_dir(tmp_path)


def test_feature_files_name_slides_by_the_same_rule(tmp_path):
    from dinov2_patho.data.feature_files import feature_file_name, open_feature_folder

    assert feature_file_name("<!--<script>", "here") == "<!--<script>.h5"
    with pytest.raises(UserError, match=r"labels.csv:2: slide id '\.\./x' holds a path separator"):
        feature_file_name("../x", "labels.csv:2")
    (tmp_path / "TCGA-AB.h5").write_bytes(b"")
    (tmp_path / "tcga-ab.h5").write_bytes(b"")
    with pytest.raises(UserError, match="'TCGA-AB' and 'tcga-ab' differ only by case"):
        open_feature_folder(tmp_path)
