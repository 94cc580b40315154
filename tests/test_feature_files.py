"""Bring your own features: `curate import` (trident/CLAM `.h5` folders -> EMB_DIR) and `curate export`."""

from __future__ import annotations

import csv
import json
import tempfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dinov2_patho.cli import main
from dinov2_patho.data import feature_files
from dinov2_patho.data.feature_files import feature_file_name
from dinov2_patho.data.index import TileIndex
from dinov2_patho.errors import UserError
from dinov2_patho.eval.slide.planted_features import make_planted_features


def write_h5(path: Path, features, coords, **attrs) -> None:
    """A trident-style file written with h5py directly (not the code under test)."""
    with h5py.File(path, "w") as f:
        f["features"] = features
        c = f.create_dataset("coords", data=coords)
        for k, v in attrs.items():
            c.attrs[k] = v


def make_folder(folder: Path, sizes: dict[str, int], dim: int = 8, seed: int = 0) -> dict[str, tuple]:
    """One file per slide, rows on a 256 px grid; returns slide -> (features, coords)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = {}
    for slide, n in sizes.items():
        x = rng.normal(size=(n, dim)).astype(np.float32)
        xy = np.stack([np.arange(n) % 7 * 256, np.arange(n) // 7 * 256], 1).astype(np.int64)
        write_h5(folder / f"{slide}.h5", x, xy, patch_size_level0=256)
        out[slide] = (x, xy)
    return out


def run_cli(*argv: str) -> int:
    return main([*argv, "--no-progress"])


def import_folder(features: Path, out: Path) -> int:
    return run_cli("curate", "import", "--features", str(features), "--out", str(out))


def test_import_is_an_emb_dir_that_kmeans_write_and_index_build_take(tmp_path, capsys):
    data = make_folder(tmp_path / "feats", {"b_slide": 30, "a_slide": 45, "c_slide": 12})
    emb = tmp_path / "emb"
    assert import_folder(tmp_path / "feats", emb) == 0
    order = sorted(data)  # slides in slide id order, each file's rows in its order
    matrix = np.load(emb / "embeddings.npy")
    assert matrix.dtype == np.float16
    np.testing.assert_array_equal(matrix, np.concatenate([data[s][0] for s in order]).astype(np.float16))
    with open(emb / "slides.csv") as f:
        rows = [(r["slide_id"], int(r["start_row"]), int(r["end_row"])) for r in csv.DictReader(f)]
    ends = np.cumsum([len(data[s][0]) for s in order])
    assert rows == [(s, int(e - len(data[s][0])), int(e)) for s, e in zip(order, ends)]
    index = TileIndex.open(emb / "index")
    slide, x, y = index.tiles(np.arange(len(index)))
    np.testing.assert_array_equal(np.stack([x, y], 1), np.concatenate([data[s][1] for s in order]))
    assert [index.slide_names[i] for i in slide] == [s for s in order for _ in data[s][0]]

    tree, clusters = tmp_path / "tree", tmp_path / "clusters"
    assert run_cli("curate", "kmeans", "--embeddings", str(emb), "--out", str(tree),
                   "kmeans.levels=[{clusters: 8}, {clusters: 2}]") == 0
    assert run_cli("curate", "write", "--tiles", str(emb), "--tree", str(tree), "--out", str(clusters)) == 0
    assert run_cli("index", "build", "--csv", str(clusters / "clusters.csv"), "--out",
                   str(tmp_path / "idx")) == 0
    rebuilt = TileIndex.open(tmp_path / "idx")
    assert rebuilt.num_levels == 2 and len(rebuilt) == len(matrix)
    np.testing.assert_array_equal(np.stack(rebuilt.coords(TileIndex.ALL), 1), np.stack([x, y], 1))
    capsys.readouterr()
    assert import_folder(tmp_path / "feats", emb) == 0
    assert "nothing to do" in capsys.readouterr().out


def test_a_killed_import_resumes_at_the_first_file_not_done(tmp_path, monkeypatch):
    data = make_folder(tmp_path / "feats", {f"s{i}": 20 + i for i in range(5)})
    emb = tmp_path / "emb"
    read: list[str] = []
    blocks = feature_files.FeatureFile.feature_blocks

    def killed_at_s3(self, *a, **k):
        read.append(self.slide_id)
        if self.slide_id == "s3":
            raise KeyboardInterrupt
        return blocks(self, *a, **k)

    monkeypatch.setattr(feature_files.FeatureFile, "feature_blocks", killed_at_s3)
    with pytest.raises(KeyboardInterrupt):
        import_folder(tmp_path / "feats", emb)
    assert not (emb / "manifest.json").exists() and not (emb / "embeddings.npy").exists()

    def spy(self, *a, **k):
        read.append(self.slide_id)
        return blocks(self, *a, **k)

    read.clear()
    monkeypatch.setattr(feature_files.FeatureFile, "feature_blocks", spy)
    assert import_folder(tmp_path / "feats", emb) == 0
    assert read == ["s3", "s4"]  # s0..s2 were on disk already
    np.testing.assert_array_equal(np.load(emb / "embeddings.npy"),
                                  np.concatenate([data[f"s{i}"][0] for i in range(5)]).astype(np.float16))


def test_import_refuses_to_mix_another_folder_into_an_emb_dir(tmp_path, capsys):
    make_folder(tmp_path / "one", {"a": 10, "b": 10})
    make_folder(tmp_path / "two", {"a": 10, "b": 11})
    assert import_folder(tmp_path / "one", tmp_path / "emb") == 0
    capsys.readouterr()
    assert import_folder(tmp_path / "two", tmp_path / "emb") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "different settings" in err


def _bad_folders():
    rng = np.random.default_rng(0)
    good = rng.normal(size=(6, 4)).astype(np.float32)
    xy = np.zeros((6, 2), np.int64) + np.arange(6)[:, None]
    nan = good.copy()
    nan[4, 2] = np.nan
    return {
        "lengths differ": ({"s.h5": (good, xy[:5])}, "s.h5", "has 6 rows but coords has 5"),
        "features rank 3": ({"s.h5": (good[None], xy)}, "s.h5", "expected rank 2"),
        "coords of 3 columns": ({"s.h5": (good, np.zeros((6, 3), np.int64))}, "s.h5", "expected [tiles, 2]"),
        "non-finite row": ({"a.h5": (good, xy), "s.h5": (nan, xy)}, "s.h5", "features row 4 is not finite"),
        "mixed dimensions": ({"a.h5": (good, xy), "s.h5": (good[:, :3], xy)}, "s.h5", "dimension 3"),
        "duplicate slide id": ({"s.h5": (good, xy), "s.hdf5": (good, xy)}, "s.hdf5", "duplicate slide id"),
        "no rows": ({"s.h5": (good[:0], xy[:0])}, "s.h5", "empty"),
        "an empty file": ({"s.h5": None}, "s.h5", "cannot be read as HDF5"),
        "no coords": ({"s.h5": (good, None)}, "s.h5", "no 'coords' dataset"),
        "fractional coords": ({"s.h5": (good, xy + 0.5)}, "s.h5", "coords row 0 is not a pair of integer"),
        "beyond float16": ({"s.h5": (good * 1e6, xy)}, "s.h5", "beyond float16's range"),
        "duplicate tile": ({"s.h5": (good, np.zeros((6, 2), np.int64))}, "slide_id='s'", "duplicate tile"),
        "no feature file": ({}, "feats", "no .h5/.hdf5 file"),
    }


@pytest.mark.parametrize("case", list(_bad_folders()))
def test_bad_feature_files_are_one_line_naming_the_file(case, tmp_path, capsys):
    files, name, says = _bad_folders()[case]
    folder = tmp_path / "feats"
    folder.mkdir()
    for file, content in files.items():
        if content is None:
            (folder / file).write_bytes(b"")
        elif content[1] is None:
            with h5py.File(folder / file, "w") as f:
                f["features"] = content[0]
        else:
            write_h5(folder / file, *content)
    assert import_folder(folder, tmp_path / "emb") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert name in err and says in err, err
    assert not (tmp_path / "emb" / "manifest.json").exists()


def test_export_refuses_a_tile_list_the_embeddings_were_not_made_from(tmp_path, capsys):
    make_folder(tmp_path / "one", {"a": 10, "b": 10})
    make_folder(tmp_path / "two", {"a": 10, "b": 11})
    for name in ("one", "two"):
        assert import_folder(tmp_path / name, tmp_path / f"emb_{name}") == 0
    capsys.readouterr()
    assert run_cli("curate", "export", "--embeddings", str(tmp_path / "emb_one"), "--tiles",
                   str(tmp_path / "emb_two"), "--out", str(tmp_path / "out")) == 2
    assert "not the tile list" in capsys.readouterr().err
    assert not list(tmp_path.glob("out/*.h5"))


slide_ids = st.text(st.characters(codec="utf-8", exclude_characters="/\\\0"), min_size=1, max_size=12).filter(
    lambda s: s not in (".", "..") and not s.startswith(".") and s.strip() == s and s.isprintable())


@settings(max_examples=12, deadline=None)
@given(sizes=st.dictionaries(slide_ids, st.integers(1, 40), min_size=1, max_size=4),
       dim=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_export_of_an_import_gives_back_the_features_and_coords(sizes, dim, seed):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = make_folder(tmp / "feats", sizes, dim, seed)
        assert import_folder(tmp / "feats", tmp / "emb") == 0
        assert run_cli("curate", "export", "--embeddings", str(tmp / "emb"), "--out", str(tmp / "out")) == 0
        assert sorted(p.stem for p in (tmp / "out").glob("*.h5")) == sorted(sizes)
        for slide, (x, xy) in data.items():
            with h5py.File(tmp / "out" / f"{slide}.h5", "r") as f:
                np.testing.assert_array_equal(f["features"][:], x.astype(np.float16).astype(np.float32))
                np.testing.assert_array_equal(f["coords"][:], xy)
                assert f["coords"].attrs["patch_size"] == 224


@given(st.text(max_size=8))
def test_a_slide_id_becomes_a_file_name_inside_its_folder_or_is_refused(slide_id):
    folder = Path("/data/out")
    try:
        name = feature_file_name(slide_id, "labels.csv")
    except UserError as e:
        assert "labels.csv" in str(e) and len(str(e).splitlines()) == 1
        return
    assert (folder / name).parent == folder and name == f"{slide_id}.h5"


def _abmil_auroc(tmp: Path, shuffle_labels: bool) -> float:
    labels = make_planted_features(tmp, seed=0, shuffle_labels=shuffle_labels)
    assert main(["eval", "slide", "--features", str(tmp / "features"), "--tasks", str(labels), "--output-dir",
                 str(tmp / "out"), "--no-progress", "heads.abmil.n_runs=1", "plot=false"]) == 0
    return json.loads((tmp / "out" / "results.json").read_text())["labels"]["abmil"]["auroc"]


def test_eval_slide_on_feature_files_finds_a_label_carried_by_a_few_tiles(tmp_path):
    assert _abmil_auroc(tmp_path / "planted", shuffle_labels=False) >= 0.9
    assert _abmil_auroc(tmp_path / "shuffled", shuffle_labels=True) <= 0.7


def test_eval_slide_features_names_a_labelled_slide_without_a_file(tmp_path, capsys):
    labels = make_planted_features(tmp_path, num_slides=12)
    (tmp_path / "features" / "slide_005.h5").unlink()
    assert main(["eval", "slide", "--features", str(tmp_path / "features"), "--tasks", str(labels),
                 "--output-dir", str(tmp_path / "out"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "line 7: slide 'slide_005' has no feature file in" in err, err


def test_eval_slide_features_takes_no_backbone(tmp_path, capsys):
    labels = make_planted_features(tmp_path, num_slides=12)
    assert main(["eval", "slide", "--features", str(tmp_path / "features"), "--tasks", str(labels),
                 "--arch", "vit_small", "--output-dir", str(tmp_path / "out")]) == 2
    assert "--backbone/--arch" in capsys.readouterr().err


def test_eval_slide_writes_its_bags_as_feature_files_that_eval_slide_features_reads_back(cohort, cohort_index,
                                                                                          tmp_path):
    from dinov2_patho.demo.mil_check import ColourTexture
    from dinov2_patho.eval.slide.runner import run_slide_tasks

    labels = tmp_path / "labels.csv"
    labels.write_text("slide_id,label,patient_id\n" + "".join(
        f"{sid},{'ab'[i % 2]},P{i // 2}\n" for i, sid in enumerate(cohort.slide_ids)))
    heads = {"abmil": {"enabled": False}}
    cfg = {"slides": str(cohort.slides_dir), "tiles": str(cohort_index.path), "heads": heads,
           "bags": {"max_tiles": 8, "write_features": str(tmp_path / "h5")}, "cross_validation": {"folds": 4},
           "plot": False, "progress": False}
    first = run_slide_tasks(ColourTexture(), [str(labels)], cfg, tmp_path / "out", "colour_texture")
    folder = tmp_path / "h5" / "labels"
    assert sorted(p.stem for p in folder.glob("*.h5")) == sorted(cohort.slide_ids)
    for sid in cohort.slide_ids:
        cached = tmp_path / "out" / "bags" / "labels" / "slides" / sid
        _, x, y = cohort_index.tiles(np.load(cached / "rows.npy"))
        with h5py.File(folder / f"{sid}.h5", "r") as f:
            np.testing.assert_array_equal(f["features"][:], np.load(cached / "features.npy"))
            np.testing.assert_array_equal(f["coords"][:], np.stack([x, y], 1))
    again = run_slide_tasks(None, [str(labels)], {"features": str(folder), "cross_validation": {"folds": 4},
                                                  "heads": heads, "plot": False, "progress": False},
                            tmp_path / "again")
    assert again["labels"]["mean_pool"] == first["labels"]["mean_pool"]
