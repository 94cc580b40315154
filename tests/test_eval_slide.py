"""Slide-level evaluation: the synthetic cohort's long tail and planted lesions, slide tasks and their
bad input, bags and their cache, the gated attention-MIL head, the CLI, public-layout adapters."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_damaged_files import DAMAGES, damage

from dinov2_patho.cli import main
from dinov2_patho.data.index import build_index
from dinov2_patho.demo.cohort import ALL_TISSUE_TYPES, RARE_TISSUE, _mixed_types, make_cohort
from dinov2_patho.demo.mil_check import ColourTexture, synthetic_mil_check
from dinov2_patho.errors import UserError
from dinov2_patho.eval.heads.abmil import (
    AbmilConfig,
    GatedAttentionMIL,
    attention_weights,
    pad_bags,
    train_abmil,
)
from dinov2_patho.eval.metrics import quadratic_kappa
from dinov2_patho.eval.slide.adapters import SLIDE_TASKS
from dinov2_patho.eval.slide.bags import capped_rows, extract_bags
from dinov2_patho.eval.slide.runner import evaluate_bags, fold_mean, partitions, run_slide_tasks, slide_config
from dinov2_patho.eval.slide.tasks import csv_task, open_tiles


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _write(path: Path, header: str, lines: list[str]) -> Path:
    path.write_text("\n".join([header, *lines]) + "\n")
    return path


@pytest.fixture
def one_thread():
    """Tile preprocessing is many tiny torch ops: on this shared 2-core machine, 1 thread is ~10x faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def lesion_cohort(tmp_path_factory):
    """8 small slides, long-tailed tissue, half of them with a 3-tile lesion."""
    return make_cohort(tmp_path_factory.mktemp("lesions") / "cohort", num_slides=8, seed=3, grid=(6, 6),
                       tissue_mix=(60, 25, 10, 4), positive_fraction=0.5, lesion_tiles=3)


# --- the synthetic cohort ---------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(0.0, 1.0), min_size=4, max_size=5).filter(lambda s: sum(s) > 0.05),
       st.integers(0, 10_000), st.integers(2, 12))
def test_mixed_types_track_the_shares_within_one_region(shares, seed, regions):
    """Over many slides, each type's tile count stays within one region's size of its share."""
    shares = np.asarray(shares) / sum(shares)
    rng = np.random.default_rng(seed)
    assigned = np.zeros(len(shares), np.int64)
    biggest = 0
    for _ in range(20):
        region = rng.integers(0, regions, (8, 8))
        mask = rng.random((8, 8)) < 0.8
        types = _mixed_types(region, mask, shares, assigned, rng)
        assert types.shape == region.shape
        biggest = max(biggest, np.bincount(region[mask], minlength=regions).max())
    assert np.abs(assigned - shares * assigned.sum()).max() <= biggest


def test_lesions_mark_exactly_the_positive_slides(lesion_cohort):
    labels = {r["slide_id"]: r for r in _rows(lesion_cohort.slide_labels_csv)}
    assert list(labels) == list(lesion_cohort.slide_ids)
    assert sum(r["label"] == "positive" for r in labels.values()) == 4
    for label in ("negative", "positive"):
        assert {r["split"] for r in labels.values() if r["label"] == label} == {"train", "val", "test"}
    tiles = _rows(lesion_cohort.labels_csv)
    assert {t["tissue_type"] for t in tiles} <= set(ALL_TISSUE_TYPES)
    for sid, row in labels.items():
        cells = {(int(t["tile_x"]) // 224, int(t["tile_y"]) // 224) for t in tiles
                 if t["slide_id"] == sid and t["tissue_type"] == RARE_TISSUE}
        assert len(cells) == (3 if row["label"] == "positive" else 0)
        if cells:  # one connected region (4-neighbourhood)
            seen, todo = set(), [next(iter(cells))]
            while todo:
                x, y = todo.pop()
                if (x, y) in cells and (x, y) not in seen:
                    seen.add((x, y))
                    todo += [(x + 1, y), (x - 1, y), (x, y + 1), (x, y - 1)]
            assert seen == cells


def test_default_cohort_has_no_slide_labels_and_bad_options_are_one_line(cohort, tmp_path):
    assert not cohort.slide_labels_csv.exists()
    assert RARE_TISSUE not in {r["tissue_type"] for r in _rows(cohort.labels_csv)}
    for kwargs, needle in (({"tissue_mix": (1, 2)}, "tissue_mix"),
                           ({"positive_fraction": 1.5}, "positive_fraction"),
                           ({"tissue_mix": (6, 2, 1, 1, 1), "positive_fraction": 0.5}, RARE_TISSUE)):
        with pytest.raises(UserError, match=needle):
            make_cohort(tmp_path / "bad", **kwargs)


# --- tasks and their bad input ------------------------------------------------------------------------

def _labels(tmp_path: Path, lines: list[str], header: str = "slide_id,label,split,patient_id") -> Path:
    return _write(tmp_path / "labels.csv", header, lines)


def _good_lines(cohort) -> list[str]:
    splits = ["train", "train", "train", "train", "val", "val", "test", "test"]
    return [f"{sid},{'ab'[i % 2]},{splits[i]},P{i // 2}" for i, sid in enumerate(cohort.slide_ids)]


def test_csv_task_reads_labels_splits_and_patients(cohort, cohort_index, tmp_path):
    task = csv_task(_labels(tmp_path, _good_lines(cohort)), cohort.slides_dir, cohort_index.path)
    assert task.classes == ("a", "b") and task.slide_ids == cohort.slide_ids
    assert task.labels.tolist() == [0, 1] * 4 and list(task.patients[:2]) == ["P0", "P0"]
    assert len(task.tile_rows(cohort.slide_ids[0])) == sum(r["slide_id"] == cohort.slide_ids[0]
                                                           for r in _rows(cohort.clusters_csv))


@pytest.mark.parametrize("edit, needle", [
    (lambda lines: lines + ["NOT-A-SLIDE,a,train,P9"], "line 10: unknown slide 'NOT-A-SLIDE'"),
    (lambda lines: [line.replace(",b,", ",a,") for line in lines], "a single class"),
    (lambda lines: lines[:3] + [lines[3].replace(",train,", ",,")] + lines[4:], "line 5: split ''"),
    (lambda lines: lines + lines[:1], "line 10: slide 'SYN-000-0000' listed twice"),
    (lambda lines: [line.replace(",val,", ",test,") for line in lines], "no slide in the val split"),
])
def test_bad_labels_are_one_line_naming_file_and_row(cohort, cohort_index, tmp_path, edit, needle):
    path = _labels(tmp_path, edit(_good_lines(cohort)))
    with pytest.raises(UserError, match=needle) as err:
        csv_task(path, cohort.slides_dir, cohort_index.path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_slide_without_tissue_tiles_is_refused_before_any_bag(cohort, tmp_path):
    kept = [r for r in _rows(cohort.clusters_csv) if r["slide_id"] != cohort.slide_ids[5]]
    tiles_csv = _write(tmp_path / "tiles.csv", "slide_id,tile_x,tile_y",
                       [f"{r['slide_id']},{r['tile_x']},{r['tile_y']}" for r in kept])
    build_index(tiles_csv, tmp_path / "tiles" / "index", progress=False)  # a `curate tiles` TILES_DIR
    path = _labels(tmp_path, _good_lines(cohort))
    with pytest.raises(UserError, match=f"line 7: slide '{cohort.slide_ids[5]}' has no tissue tiles"):
        csv_task(path, cohort.slides_dir, tmp_path / "tiles")


def test_patient_folds_keep_patients_together_and_test_every_slide_once(cohort, cohort_index, tmp_path):
    lines = [line.rsplit(",", 2)[0] + f",,P{i // 2}" for i, line in enumerate(_good_lines(cohort))]
    task = csv_task(_labels(tmp_path, [line.replace(",,", ",") for line in lines],
                            "slide_id,label,patient_id"), cohort.slides_dir, cohort_index.path)
    assert task.splits is None
    with pytest.raises(UserError, match="cross_validation.folds"):
        partitions(task, slide_config())
    parts = partitions(task, slide_config({"cross_validation": {"folds": 4}}))
    tested = np.concatenate([p["test"] for p in parts])
    assert sorted(tested.tolist()) == list(range(8))
    for p in parts:
        assert sorted(np.concatenate(list(p.values())).tolist()) == list(range(8))
        owners = [set(task.patients[p[s]]) for s in ("train", "val", "test")]
        assert not (owners[0] & owners[1] or owners[0] & owners[2] or owners[1] & owners[2])


@settings(max_examples=40, deadline=None)
@given(folds=st.integers(3, 5), extra=st.lists(st.integers(0, 4), min_size=2, max_size=3),
       seed=st.integers(0, 10_000), paired=st.booleans())
def test_patient_folds_are_stratified_so_every_test_split_holds_every_class(folds, extra, seed, paired):
    """With at least K patients per class (8 slides, 4 folds, 4 + 4 labels: the demo's case) every
    test split holds every class, so no fold's AUROC is undefined; fold sizes stay within one patient."""
    per_class = [folds + e for e in extra]
    per_class = [2 * n for n in per_class] if paired else per_class  # paired: 2 slides a patient
    labels = np.repeat(np.arange(len(per_class)), per_class)
    patients = np.array([f"{c}-{i // 2 if paired else i}" for c, n in enumerate(per_class) for i in range(n)])
    task = type("Task", (), {"name": "t", "splits": None, "labels": labels, "patients": patients})()
    parts = partitions(task, slide_config({"cross_validation": {"folds": folds, "seed": seed}}))
    test_patients = [len(np.unique(patients[p["test"]])) for p in parts]
    assert max(test_patients) - min(test_patients) <= len(per_class)
    assert sorted(np.concatenate([p["test"] for p in parts]).tolist()) == list(range(len(labels)))
    for p in parts:
        assert set(labels[p["test"]].tolist()) == set(range(len(per_class)))


def test_a_fold_without_an_auroc_is_left_out_of_the_mean_and_counted():
    def fold(auroc):
        head = {"auroc": auroc, "balanced_accuracy": 0.5, "macro_f1": 0.5}
        return {"abmil": dict(head), "mean_pool": dict(head), "sizes": {"test": 2}}

    result = fold_mean([fold(float("nan")), fold(0.8), fold(0.6)])
    assert result["abmil"]["auroc"] == pytest.approx(0.7)
    assert result["abmil"]["auroc_undefined_folds"] == result["mean_pool"]["auroc_undefined_folds"] == 1
    assert len(result["folds"]) == 3
    none = fold_mean([fold(float("nan"))] * 4)
    assert np.isnan(none["abmil"]["auroc"]) and none["abmil"]["auroc_undefined_folds"] == 4


# --- bags -------------------------------------------------------------------------------------------

@settings(max_examples=50, deadline=None)
@given(st.integers(0, 300), st.integers(1, 100), st.integers(0, 5))
def test_capped_rows_are_a_sorted_deterministic_subset(n, cap, seed):
    rows = np.arange(1000, 1000 + 2 * n, 2)
    got = capped_rows(rows, "slide-x", cap, seed)
    assert len(got) == min(n, cap) and np.isin(got, rows).all() and (np.diff(got) > 0).all()
    assert np.array_equal(got, capped_rows(rows, "slide-x", cap, seed))


def test_bag_cache_is_reused_and_a_stale_one_refused(cohort, cohort_index, tmp_path, one_thread):
    task = csv_task(_labels(tmp_path, _good_lines(cohort)[:4] + _good_lines(cohort)[4:6]), cohort.slides_dir,
                    cohort_index.path)
    backbone = ColourTexture()
    bags = extract_bags(task, backbone, tmp_path / "bags", backbone_name="hand", cap=20, progress=False)
    assert [len(b) for b in bags] == [min(20, len(task.tile_rows(s))) for s in task.slide_ids]
    assert all(b.shape[1] == 12 for b in bags)

    class Refuses(ColourTexture):
        def forward(self, x):
            raise AssertionError("the cache was not reused")

    again = extract_bags(task, Refuses(), tmp_path / "bags", backbone_name="hand", cap=20, progress=False)
    assert all(np.array_equal(a, b) for a, b in zip(bags, again))
    for kwargs, differ in (({"cap": 10}, "max_tiles"), ({"token": "patch_mean"}, "token"),
                           ({"size": 112}, "size")):
        with pytest.raises(UserError, match=f"other settings \\({differ} "):
            extract_bags(task, backbone, tmp_path / "bags", backbone_name="hand",
                         **{"cap": 20, "progress": False, **kwargs})
    backbone.laplacian.mul_(2)
    with pytest.raises(UserError, match="other settings \\(weights_sha256 "):
        extract_bags(task, backbone, tmp_path / "bags", backbone_name="hand", cap=20, progress=False)


def test_bags_at_a_size_are_the_features_of_the_resized_tiles(cohort, cohort_index, tmp_path, one_thread):
    from dinov2_patho.backbones.hub import normalisation
    from dinov2_patho.backbones.preprocess import normalise_on_device
    from dinov2_patho.data.augment import resize
    from dinov2_patho.data.dataset import TileDataset
    from dinov2_patho.data.readers import SlideTileSource

    task = csv_task(_labels(tmp_path, _good_lines(cohort)[:4] + _good_lines(cohort)[4:6]), cohort.slides_dir,
                    cohort_index.path)
    seen = []

    class Records(ColourTexture):
        def forward(self, x):
            seen.append(tuple(x.shape[-2:]))
            return super().forward(x)

    backbone = Records()
    bags = extract_bags(task, backbone, tmp_path / "bags", backbone_name="hand", cap=6, size=112,
                        progress=False)
    assert set(seen) == {(112, 112)}
    rows = capped_rows(task.tile_rows(task.slide_ids[0]), task.slide_ids[0], 6, 0)
    tiles = TileDataset(task.tiles, SlideTileSource(task.registry, mpp_override=task.mpp))
    x = torch.stack([resize(tiles[int(r)][0], 112) for r in rows])
    with torch.no_grad():
        expected = backbone(normalise_on_device(*normalisation(backbone))(x))
    np.testing.assert_allclose(bags[0], expected.numpy(), rtol=1e-5, atol=1e-5)


# --- the head -----------------------------------------------------------------------------------------

@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, 12), min_size=1, max_size=5), st.integers(0, 1000))
def test_padding_changes_nothing_and_attention_sums_to_one(sizes, seed):
    torch.manual_seed(seed)
    net = GatedAttentionMIL(6, 3).eval()
    rng = np.random.default_rng(seed)
    bags = [rng.normal(size=(n, 6)).astype(np.float32) for n in sizes]
    x, mask = pad_bags(bags)
    with torch.no_grad():
        together = net(x, mask)
        weights = net.attention(x, mask)[0]
        for i, bag in enumerate(bags):
            alone = net(*pad_bags([bag]))
            torch.testing.assert_close(together[i:i + 1], alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(weights.sum(1), torch.ones(len(bags)))
    assert (weights[~mask] == 0).all()


def test_an_empty_bag_never_reaches_the_head():
    with pytest.raises(ValueError, match="empty bag"):
        pad_bags([np.zeros((3, 4), np.float32), np.zeros((0, 4), np.float32)])


@pytest.mark.parametrize("name", ["features.npy", "rows.npy", "progress.json"])
def test_a_damaged_bag_is_rebuilt_saying_so(cohort, cohort_index, tmp_path, one_thread, caplog, name):
    task = csv_task(_labels(tmp_path, _good_lines(cohort)[:6]), cohort.slides_dir, cohort_index.path)
    bags = extract_bags(task, ColourTexture(), tmp_path / "bags", backbone_name="hand", cap=8, progress=False)
    slide_dir = tmp_path / "bags" / "slides" / task.slide_ids[1]
    for how in DAMAGES:
        damage(slide_dir / name, how)
        caplog.clear()
        again = extract_bags(task, ColourTexture(), tmp_path / "bags", backbone_name="hand", cap=8,
                             progress=False)
        assert all(np.array_equal(a, b) for a, b in zip(bags, again)), how
        lines = [r.getMessage() for r in caplog.records if "rebuilding" in r.getMessage()]
        assert len(lines) == 1 and lines[0].startswith(f"{slide_dir / name}: "), how
        assert "bag cache: rebuilding it" in lines[0], how


def test_attention_finds_the_key_instance_in_gaussian_bags(one_thread):
    """Bags of 20 noise vectors; positives hold one shifted instance: the trained net attends to it."""
    rng = np.random.default_rng(0)

    def make(n):
        bags, labels, keys = [], rng.integers(0, 2, n), rng.integers(0, 20, n)
        for label, key in zip(labels, keys):
            bag = rng.normal(size=(20, 8)).astype(np.float32)
            bag[key, 0] += 4.0 * label
            bags.append(bag)
        return bags, labels, keys

    train, val, test = make(64), make(32), make(32)
    net, info = train_abmil(train[:2], val[:2], 2, AbmilConfig(max_epochs=40, patience=40), 0)
    assert info["val_balanced_accuracy"] > 0.9
    top = [int(np.argmax(attention_weights(net, bag))) == key
           for bag, label, key in zip(*test) if label == 1]
    assert np.mean(top) > 0.9


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4)), min_size=2, max_size=40))
def test_quadratic_kappa_is_the_weighted_agreement_formula(pairs):
    y_true, y_pred = np.array(pairs).T
    observed = np.zeros((5, 5))
    np.add.at(observed, (y_true, y_pred), 1)
    expected = np.outer(observed.sum(1), observed.sum(0)) / observed.sum()
    weights = (np.arange(5)[:, None] - np.arange(5)[None]) ** 2 / 16
    denominator = (weights * expected).sum()
    got = quadratic_kappa(y_true, y_pred, 5)
    if denominator == 0:
        assert np.isnan(got) or got == pytest.approx(1.0)
    else:
        assert got == pytest.approx(1 - (weights * observed).sum() / denominator)


# --- end to end ---------------------------------------------------------------------------------------

def test_eval_slide_cli_writes_the_eval_run_outputs(lesion_cohort, tmp_path, one_thread):
    out = tmp_path / "out"
    code = main(["eval", "slide", "--arch", "timm/test_vit", "--tasks", "synthetic",
                 "--data-root", str(tmp_path), "--output-dir", str(out), "--no-progress",
                 f"datasets.synthetic.root={lesion_cohort.root}", "backbone.model.img_size=224",
                 "heads.abmil.n_runs=2", "heads.abmil.max_epochs=5", "plot=true"])
    assert code == 0
    rows = _rows(out / "results.csv")
    assert [(r["benchmark"], r["head"]) for r in rows] == [("synthetic", "abmil"), ("synthetic", "mean_pool")]
    assert all(0.0 <= float(r["auroc"]) <= 1.0 for r in rows) and rows[0]["n_eval"] == "2"
    assert (out / "results.md").is_file() and (out / "results.png").is_file()
    assert sorted(p.name for p in (out / "bags" / "synthetic" / "slides").iterdir()) == \
        sorted(lesion_cohort.slide_ids)
    assert main(["eval", "slide", "--tasks", "nope", "--output-dir", str(out)]) == 2


def _fake_slides(folder: Path, names: list[str], ext: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / f"{name}{ext}").write_bytes(b"")


def _tiles_for(tmp_path: Path, names: list[str]) -> Path:
    tiles_csv = _write(tmp_path / "tiles.csv", "slide_id,tile_x,tile_y", [f"{n},0,0" for n in names])
    return build_index(tiles_csv, tmp_path / "tiles", progress=False).path


def test_camelyon16_layout(tmp_path):
    root = tmp_path / "CAMELYON16"
    normal, tumor = [f"normal_{i:03d}" for i in range(1, 11)], [f"tumor_{i:03d}" for i in range(1, 6)]
    _fake_slides(root / "training" / "normal", normal, ".tif")
    _fake_slides(root / "training" / "tumor", tumor, ".tif")
    _fake_slides(root / "testing" / "images", ["test_001", "test_002"], ".tif")
    (root / "testing" / "reference.csv").write_text("test_001,Tumor,Macro,Yes\ntest_002,Normal\n")
    tiles = _tiles_for(tmp_path, normal + tumor + ["test_001", "test_002"])
    with pytest.raises(UserError, match="datasets.camelyon16.tiles"):
        SLIDE_TASKS.get("camelyon16")(root, tmp_path)
    task = SLIDE_TASKS.get("camelyon16")(root, tmp_path, tiles=tiles)
    assert task.classes == ("normal", "tumor") and len(task.slide_ids) == 17
    assert dict(zip(task.slide_ids, task.labels))["test_001"] == 1
    assert (task.splits == "val").sum() == 3 and list(task.splits[-2:]) == ["test", "test"]
    (root / "testing" / "reference.csv").write_text("test_001,Tumour\n")
    with pytest.raises(UserError, match="reference.csv: line 1"):
        SLIDE_TASKS.get("camelyon16")(root, tmp_path, tiles=tiles)


def test_panda_layout_is_ordinal(tmp_path):
    root = tmp_path / "PANDA"
    ids = [f"img{i:02d}" for i in range(40)]
    _fake_slides(root / "train_images", ids, ".tiff")
    _write(root / "train.csv", "image_id,data_provider,isup_grade,gleason_score",
           [f"{name},karolinska,{i % 6},3+3" for i, name in enumerate(ids)])
    task = SLIDE_TASKS.get("panda")(root, tmp_path, tiles=_tiles_for(tmp_path, ids))
    assert task.ordinal and task.classes == tuple("012345")
    counts = {s: int((task.splits == s).sum()) for s in ("train", "val", "test")}
    assert counts["val"] == counts["test"] == 6 and counts["train"] == 28
    part = partitions(task, slide_config())[0]
    rng = np.random.default_rng(0)
    bags = [rng.normal(size=(3, 4)).astype(np.float32) + label for label in task.labels]
    cfg = slide_config({"heads": {"abmil": {"n_runs": 1, "max_epochs": 3}}})
    result = evaluate_bags(bags, task.labels, part, task, cfg)
    assert "quadratic_kappa" in result["abmil"] and "quadratic_kappa" in result["mean_pool"]
    assert open_tiles(tmp_path / "tiles").path == tmp_path / "tiles"



# benchmarks/slide_mil.py on cohort seeds 0-3 (benchmarks/RESULTS.md, "Slide-level evaluation"):
# attention-MIL AUROC 89.6 / 99.3 / 78.9 / 91.9, mean pooling 72.2 / 61.8 / 79.9 / 85.4, top-2 attention
# tiles in the lesion 92 / 92 / 33 / 96 % (chance: 2 of ~12 tissue tiles, 16 %). Attention-MIL beat mean
# pooling on 3 seeds of 4 (seed 2: -0.9 points), so what is asserted is what held on all four: bounds
# below each minimum.
MIN_ABMIL_AUROC = 0.75
MIN_GAIN_OVER_MEAN_POOLING = -0.05
MIN_ATTENTION_IN_LESION = 0.30


@pytest.mark.slow
def test_attention_mil_scores_on_the_synthetic_slide_task_and_attends_to_the_lesions(tmp_path, one_thread):
    result = synthetic_mil_check(tmp_path, seed=0)
    assert result["abmil_auroc"] > MIN_ABMIL_AUROC, result
    assert result["abmil_auroc"] - result["mean_pool_auroc"] > MIN_GAIN_OVER_MEAN_POOLING, result
    assert result["attention_in_lesion"] > MIN_ATTENTION_IN_LESION, result


def test_run_slide_tasks_on_patient_folds_reports_the_fold_mean(cohort, cohort_index, tmp_path, one_thread):
    lines = [f"{sid},{'ab'[i % 2]},P{i // 2}" for i, sid in enumerate(cohort.slide_ids)]
    labels = _labels(tmp_path, lines, "slide_id,label,patient_id")
    cfg = {"slides": str(cohort.slides_dir), "tiles": str(cohort_index.path), "bags": {"max_tiles": 8},
           "cross_validation": {"folds": 4}, "heads": {"abmil": {"n_runs": 1, "max_epochs": 3}},
           "plot": False, "progress": False}
    results = run_slide_tasks(ColourTexture(), [str(labels)], cfg, tmp_path / "out", "colour_texture")
    result = results["labels"]
    assert result["cv_folds"] == 4 and len(result["folds"]) == 4
    fold_aurocs = [f["abmil"]["auroc"] for f in result["folds"]]
    assert result["abmil"]["auroc"] == pytest.approx(np.nanmean(fold_aurocs))
    rows = _rows(tmp_path / "out" / "results.csv")
    assert [(r["head"], r["eval_split"], r["n_eval"]) for r in rows] == [("abmil", "test", "2"),
                                                                        ("mean_pool", "test", "2")]
