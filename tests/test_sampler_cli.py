"""`dinov2-patho sampler dump` and the samplers on a real TileIndex."""

from __future__ import annotations

import json

import numpy as np
import pytest

from dinov2_patho.cli import main
from dinov2_patho.data.index import TileIndex
from dinov2_patho.samplers import SamplerError, build_sampler, subset_view

index_mod = pytest.importorskip("dinov2_patho.data.index")


@pytest.fixture(scope="module")
def tiny_index(tmp_path_factory):
    """240 tiles over 6 slides, levels of 12 and 3 clusters; metadata for 5 of the slides."""
    root = tmp_path_factory.mktemp("sampler_cli")
    rng = np.random.default_rng(0)
    lines = ["slide_id,tile_x,tile_y,level_1,level_2"]
    for i in range(240):
        fine = int(rng.integers(0, 12))
        lines.append(f"slide{i % 6},{224 * (i // 6)},0,{100 + fine},{fine % 3}")
    (root / "clusters.csv").write_text("\n".join(lines) + "\n")
    meta = ["slide_id,tissue_diagnosis"] + [f"slide{s},{'AB'[s % 2]}" for s in range(5)]
    (root / "metadata.csv").write_text("\n".join(meta) + "\n")
    index = index_mod.build_index(root / "clusters.csv", root / "index", progress=False)
    return root, index


def dump(root, out, *extra):
    return main(["sampler", "dump", "--index", str(root / "index"), "--batch-size", "12", "--out", str(out),
                 *extra])


def test_dump_writes_batches_and_telemetry(tiny_index, tmp_path, capsys):
    root, index = tiny_index
    opts = ["sampler.name=cluster_stratified", "sampler.level=1", "sampler.seed=3"]
    assert dump(root, tmp_path / "b.npy", "--steps", "5", "--world-size", "4", "--json", *opts) == 0
    batches = np.load(tmp_path / "b.npy")
    assert batches.shape == (5, 12) and batches.dtype == np.int64
    expected = build_sampler({"name": "cluster_stratified", "level": 1, "seed": 3}, index, 12)
    assert np.array_equal(batches, np.stack([expected.next_batch() for _ in range(5)]))
    report = json.loads(capsys.readouterr().out)
    assert report["batches"] == 5 and report["samples"] == 60
    assert report["clusters_level_1_min"] == 12 and report["cluster_coverage"] == 1.0
    # without --json: the same figures as a table for people, one statistic per line
    assert dump(root, tmp_path / "b.npy", "--steps", "5", "--world-size", "4", *opts) == 0
    lines = capsys.readouterr().out.splitlines()
    table = {line.split("  ")[0].strip(): line.split("  ", 1)[1].strip() for line in lines}
    assert table["sampler"] == "cluster_stratified" and table["samples"] == "60"
    assert table["cluster_coverage"] == "1"
    assert table["clusters_level_1 per batch"] == "min 12  mean 12  max 12"
    assert len({line.index(table[key]) for key, line in zip(table, lines)}) == 1  # one value column


def test_dump_resume_continues_the_stream(tiny_index, tmp_path):
    root, _ = tiny_index
    opts = ["sampler.name=cluster_stratified", "sampler.level=2", "sampler.max_slides_per_epoch=2",
            "sampler.pseudo_epoch_samples=24"]
    assert dump(root, tmp_path / "all.npy", "--steps", "7", *opts) == 0
    state = str(tmp_path / "s.pt")
    assert dump(root, tmp_path / "head.npy", "--steps", "3", "--save-state", state, *opts) == 0
    assert dump(root, tmp_path / "tail.npy", "--steps", "4", "--resume-from", str(tmp_path / "s.pt"),
                "--start-step", "3", *opts) == 0
    assert np.array_equal(np.load(tmp_path / "all.npy"),
                          np.concatenate([np.load(tmp_path / "head.npy"), np.load(tmp_path / "tail.npy")]))
    assert dump(root, tmp_path / "skip.npy", "--steps", "4", "--start-step", "3", *opts) == 0
    assert np.array_equal(np.load(tmp_path / "skip.npy"), np.load(tmp_path / "tail.npy"))
    assert dump(root, tmp_path / "x.npy", "--steps", "1", "--resume-from", str(tmp_path / "s.pt"),
                "--start-step", "2", *opts) == 2


@pytest.mark.parametrize("extra, message", [
    (["--world-size", "5", "sampler.name=uniform"], "not divisible by world size 5"),
    (["sampler.name=cluster_stratified", "sampler.levle=1"], "did you mean 'level'"),
    (["sampler.name=cluster_stratified", "sampler.level=9"], "levels 1..2"),
    (["trainer.lr=1"], "only sampler"),
    (["data.index=x"], "only data.subset"),
])
def test_dump_errors_are_one_line(tiny_index, tmp_path, capsys, extra, message):
    root, _ = tiny_index
    assert dump(root, tmp_path / "b.npy", "--steps", "1", *extra) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "b.npy").exists()


def test_real_index_views_and_metadata(tiny_index):
    root, index = tiny_index
    view = index.select(np.arange(0, 240, 2))
    batch = build_sampler({"name": "cluster_stratified", "level": 1}, view, 12).next_batch()
    assert np.isin(batch, view.row_ids(TileIndex.ALL)).all()
    csv = root / "metadata.csv"
    sampler = build_sampler({"name": "cluster_stratified", "metadata_csv": str(csv),
                             "column": "tissue_diagnosis", "skip_slides_without_metadata": True}, index, 12)
    codes = index.metadata_codes(csv, "tissue_diagnosis")[0]
    batch = sampler.next_batch()
    assert np.array_equal(np.bincount(codes[batch], minlength=2), [6, 6])
    assert not np.isin(index.slides(TileIndex.ALL)[batch], [5]).any()  # slide5 has no metadata
    with pytest.raises(SamplerError, match=r"1 slide\(s\) of the index have no tissue_diagnosis value there "
                                           r"\(slide5\); add them"):  # were left out silently
        build_sampler({"name": "metadata", "metadata_csv": str(csv), "target_size": 50}, index, 10)
    meta = build_sampler({"name": "metadata", "metadata_csv": str(csv), "target_size": 50,
                          "skip_slides_without_metadata": True}, index, 10)
    assert len(np.unique(np.concatenate([meta.next_batch() for _ in range(5)]))) == 50


def test_data_subset_is_a_view_that_every_sampler_draws_from(tiny_index, tmp_path):
    root, index = tiny_index
    rng = np.random.default_rng(1)
    rows = rng.choice(240, 90, replace=False)
    np.save(tmp_path / "rows.npy", np.r_[rows, rows[:5]])  # `curate sample` order; repeats are harmless
    view = subset_view(index, tmp_path / "rows.npy")
    assert np.array_equal(view.row_ids(TileIndex.ALL), np.sort(rows))
    sections = [{"name": "uniform"}, {"name": "cluster_stratified", "level": 1, "cache": False},
                {"name": "metadata", "metadata_csv": str(root / "metadata.csv"), "target_size": 30,
                 "skip_slides_without_metadata": True}]
    for section in sections:
        drawn = np.stack([b for b, _ in zip(build_sampler(section, view, 12), range(15))])
        assert np.isin(drawn, rows).all(), section["name"]
    uniform = build_sampler({"name": "uniform"}, view, 10)
    assert np.array_equal(np.sort(np.concatenate([uniform.next_batch() for _ in range(9)])), np.sort(rows))
    opts = ["sampler.name=cluster_stratified", "sampler.level=2", f"data.subset={tmp_path / 'rows.npy'}"]
    assert dump(root, tmp_path / "b.npy", "--steps", "4", *opts) == 0
    expected = build_sampler({"name": "cluster_stratified", "level": 2}, view, 12)
    assert np.array_equal(np.load(tmp_path / "b.npy"), np.stack([expected.next_batch() for _ in range(4)]))


@pytest.mark.parametrize("rows, message", [
    (np.array([3, 240]), r"rows.npy: row id 240 is not in this index view \(of 240 rows\)"),
    (np.array([[1, 2]]), r"rows.npy: want a 1-D integer array, got int64 \(1, 2\)"),
    (np.array([1.0, 2.0]), "want a 1-D integer array, got float64"),
    (np.array([], dtype=np.int64), "holds no row ids"),
])
def test_data_subset_errors_name_the_file(tiny_index, tmp_path, capsys, rows, message):
    root, index = tiny_index
    np.save(tmp_path / "rows.npy", rows)
    with pytest.raises(SamplerError, match=rf"data.subset .*{message}"):
        subset_view(index, tmp_path / "rows.npy")
    assert dump(root, tmp_path / "b.npy", "--steps", "1", f"data.subset={tmp_path / 'rows.npy'}") == 2
    assert "data.subset" in capsys.readouterr().err


@pytest.mark.parametrize("content", ["text", "tensor", "checkpoint"])
def test_resume_from_a_file_that_is_no_sampler_state_is_one_line(tiny_index, tmp_path, capsys, content):
    import torch

    root, _ = tiny_index
    state = tmp_path / "s.pt"
    if content == "text":
        state.write_text("step: 3\n")
    else:  # a tensor, or a training checkpoint's dict (no sampler fingerprint): were tracebacks
        torch.save(torch.zeros(3) if content == "tensor" else {"model": {}, "iteration": 3}, state)
    assert dump(root, tmp_path / "x.npy", "--steps", "1", "--resume-from", str(state),
                "sampler.name=uniform") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--resume-from {state}: not a sampler state" in err[0], err
    assert not (tmp_path / "x.npy").exists()


def test_dump_onto_a_directory_names_it(tiny_index, tmp_path, capsys):
    root, _ = tiny_index
    (tmp_path / "batches").mkdir()
    assert dump(root, tmp_path / "batches", "--steps", "1", "sampler.name=uniform") == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(f"error: {tmp_path / 'batches'}: is a directory, not a file name"), err
    assert list(tmp_path.iterdir()) == [tmp_path / "batches"] and not list((tmp_path / "batches").iterdir())


def test_uniform_draws_from_a_tile_list_without_levels(tmp_path, capsys):
    rows = "".join(f"s{i % 3},{i},0\n" for i in range(30))
    (tmp_path / "tiles.csv").write_text("slide_id,tile_x,tile_y\n" + rows)
    index = index_mod.build_index(tmp_path / "tiles.csv", tmp_path / "index", progress=False)
    assert main(["sampler", "dump", "--index", str(index.path), "--batch-size", "10", "--steps", "3", "--out",
                 str(tmp_path / "b.npy"), "--json", "sampler.name=uniform"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["clusters"] == "none: the index has no tree levels" and report["distinct_tiles"] == 30
    assert sorted(np.load(tmp_path / "b.npy").ravel().tolist()) == list(range(30))
