"""Miniature copies of each benchmark's official layout exercise the adapters."""

import csv
import json

import h5py
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from dinov2_patho.backbones.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess
from dinov2_patho.errors import UserError
from dinov2_patho.eval.benchmarks import BenchmarkError, build_benchmark


def image(path, value=0, size=(20, 16)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path)
    return path


def test_bach_uses_evas_fixed_split(tmp_path):
    photos = tmp_path / "ICIAR2018_BACH_Challenge" / "Photos"
    for c, name in enumerate(("Benign", "InSitu", "Invasive", "Normal")):
        for i in range(100):
            image(photos / name / f"{name[0].lower()}{i:03d}.tif", c)
    b = build_benchmark("bach", tmp_path)
    assert (len(b.splits["train"]), len(b.splits["val"])) == (268, 132)  # eva's sizes
    assert b.splits["val"].paths[0].name == "b041.tif" and b.eval_split == "val"
    img, label = b.splits["train"][0]
    assert img.shape == (16, 20, 3) and label == 0
    (photos / "Normal" / "n099.tif").unlink()
    with pytest.raises(BenchmarkError, match="400 official BACH photos"):
        build_benchmark("bach", tmp_path)


def test_crc_train_and_val_folders(tmp_path):
    classes = ("ADI", "BACK", "DEB", "LYM", "MUC", "MUS", "NORM", "STR", "TUM")
    for folder in ("NCT-CRC-HE-100K", "CRC-VAL-HE-7K"):
        for c, name in enumerate(classes):
            image(tmp_path / folder / name / f"{name}-{folder[:3]}.tif", c)
    b = build_benchmark("crc", tmp_path)
    assert b.classes == classes and b.mpp == 0.5
    assert b.splits["val"].labels.tolist() == list(range(9))
    for p in (tmp_path / "CRC-VAL-HE-7K" / "TUM").iterdir():
        p.unlink()
    with pytest.raises(BenchmarkError, match="TUM: no .tif images"):
        build_benchmark("crc", tmp_path)


def test_mhist_annotations_partition(tmp_path):
    rows = [("a.png", "SSA", "train"), ("b.png", "HP", "train"), ("c.png", "HP", "test"),
            ("d.png", "SSA", "test")]
    for name, *_ in rows:
        image(tmp_path / "images" / name)
    with open(tmp_path / "annotations.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Image Name", "Majority Vote Label", "Number of Annotators who Selected SSA (Out of 7)",
                    "Partition"])
        w.writerows([(n, lab, 3, part) for n, lab, part in rows])
    b = build_benchmark("mhist", tmp_path)
    assert b.splits["train"].labels.tolist() == [0, 1] and b.splits["val"].labels.tolist() == [1, 0]
    (tmp_path / "images" / "d.png").unlink()
    with pytest.raises(BenchmarkError, match=r"annotations.csv: row 5: image .*d.png not found"):
        build_benchmark("mhist", tmp_path)


def test_pcam_h5_files(tmp_path):
    rng = np.random.default_rng(0)
    for name, n in (("train", 6), ("valid", 4), ("test", 4)):
        with h5py.File(tmp_path / f"camelyonpatch_level_2_split_{name}_x.h5", "w") as f:
            f["x"] = rng.integers(0, 255, (n, 96, 96, 3), dtype=np.uint8)
        with h5py.File(tmp_path / f"camelyonpatch_level_2_split_{name}_y.h5", "w") as f:
            f["y"] = (np.arange(n) % 2).reshape(n, 1, 1, 1).astype(np.uint8)
    b = build_benchmark("pcam", tmp_path)
    assert b.eval_split == "test" and len(b.splits["val"]) == 4
    img, label = b.splits["train"][3]
    assert img.shape == (96, 96, 3) and label == 1
    import pickle

    assert pickle.loads(pickle.dumps(b.splits["train"]))[3][1] == 1
    (tmp_path / "camelyonpatch_level_2_split_valid_y.h5").unlink()
    with pytest.raises(BenchmarkError, match="camelyonpatch_level_2_split_valid_y.h5"):
        build_benchmark("pcam", tmp_path)


def test_bracs_three_split_folders(tmp_path):
    classes = ("0_N", "1_PB", "2_UDH", "3_FEA", "4_ADH", "5_DCIS", "6_IC")
    base = tmp_path / "BRACS_RoI" / "latest_version"
    for split in ("train", "val", "test"):
        for c in classes:
            image(base / split / c / f"BRACS_1_{c}_1.png")
    b = build_benchmark("bracs", tmp_path)
    assert b.eval_split == "test" and len(b.splits["test"]) == 7 and b.mpp == 0.25


def test_breakhis_patient_split_keeps_four_subtypes(tmp_path):
    root = tmp_path / "BreaKHis_v1" / "histology_slides" / "breast"
    files = ["SOB_B_TA-14-4659-40-001.png", "SOB_M_DC-14-2773-40-001.png", "SOB_B_F-14-9133-40-001.png",
             "SOB_M_MC-14-18842D-40-001.png", "SOB_B_A-14-22549AB-40-001.png"]  # A (adenosis) is not used
    for name in files:
        image(root / "x" / name.split("-")[2] / "40X" / name)
    image(root / "x" / "4659" / "100X" / "SOB_B_TA-14-4659-100-001.png")
    b = build_benchmark("breakhis", tmp_path)
    assert sorted(b.splits["train"].labels.tolist()) == [0, 2]  # TA, F
    assert sorted(b.splits["val"].labels.tolist()) == [1, 3]  # patients 2773, 18842D: MC, DC


def test_unitopatho_manifests(tmp_path):
    base = tmp_path / "800"
    image(base / "HP" / "a.png")
    image(base / "NORM" / "b.png")
    image(base / "TVA.LG" / "c.png")
    (base / "train.csv").write_text("image_id,top_label\na.png,0\nb.png,1\n")
    (base / "test.csv").write_text("image_id,top_label\nc.png,5\n")
    b = build_benchmark("unitopatho", tmp_path)
    assert b.splits["val"].labels.tolist() == [5] and b.mpp == 0.4415
    (base / "test.csv").write_text("image_id,top_label\nc.png,9\n")
    with pytest.raises(BenchmarkError, match=r"test.csv: row 2: top_label '9'"):
        build_benchmark("unitopatho", tmp_path)


def test_chaoyang_json(tmp_path):
    for split in ("train", "test"):
        entries = []
        for label in range(4):
            image(tmp_path / split / f"{label}.JPG")
            entries.append({"label": label, "name": f"{split}/{label}.JPG"})
        (tmp_path / f"{split}.json").write_text(json.dumps(entries))
    b = build_benchmark("chaoyang", tmp_path)
    assert b.splits["val"].labels.tolist() == [0, 1, 2, 3]
    (tmp_path / "test.json").write_text("{not json")
    with pytest.raises(UserError, match=r"test.json: not a Chaoyang split .*not JSON.*line 1 column 2"):
        build_benchmark("chaoyang", tmp_path)


def test_generic_folder_and_csv(tmp_path):
    for split in ("train", "val"):
        for c in ("x", "y"):
            image(tmp_path / "f" / split / c / "1.png")
    b = build_benchmark("folder", tmp_path / "f", mpp=0.5)
    assert b.classes == ("x", "y") and b.eval_split == "val"
    image(tmp_path / "c" / "1.png")
    (tmp_path / "c" / "t.csv").write_text("path,label,split\n1.png,a,train\n1.png,b,val\n")
    b = build_benchmark("csv", tmp_path / "c" / "t.csv")
    assert b.splits["val"].labels.tolist() == [1]
    (tmp_path / "c" / "t.csv").write_text("path,label,split\n1.png,a,train\n1.png,b,dev\n")
    with pytest.raises(BenchmarkError, match="row 3: split 'dev'"):
        build_benchmark("csv", tmp_path / "c" / "t.csv")


@pytest.mark.parametrize("name, expected", [
    ("bach", "ICIAR2018_BACH_Challenge/Photos"), ("crc", "NCT-CRC-HE-100K"), ("mhist", "annotations.csv"),
    ("pcam", "camelyonpatch_level_2_split_train_x.h5"), ("bracs", "BRACS_RoI/latest_version"),
    ("breakhis", "BreakHis root"), ("unitopatho", "800"), ("chaoyang", "train.json"),
    ("folder", "train/"), ("csv", "path,label,split"), ("synthetic", "labels.csv"),
])
def test_missing_root_names_the_expected_file(tmp_path, name, expected):
    with pytest.raises(UserError, match=expected):
        build_benchmark(name, tmp_path / "absent")


def test_unknown_benchmark_suggests_the_closest():
    with pytest.raises(BenchmarkError, match="did you mean 'bach'"):
        build_benchmark("bachh", ".")


def test_synthetic_cohort_split_by_slide(cohort):
    pytest.importorskip("dinov2_patho.data.readers")
    b = build_benchmark("synthetic", cohort.root, max_tiles_per_split=12)
    assert b.classes == ("adipose", "mucus", "stroma", "tumor")
    slides = {split: {t[0] for t in s.tiles} for split, s in b.splits.items()}
    assert not slides["train"] & slides["val"] and not slides["val"] & slides["test"]
    img, _ = b.splits["test"][0]
    assert img.shape == (224, 224, 3) and img.dtype == np.uint8


def test_preprocess_eva_resize_crop_and_target_mpp():
    img = np.zeros((100, 200, 3), np.uint8)
    img[:, 100:] = 255  # right half white
    x = Preprocess(size=50)(img)  # eva: shorter side to 50 -> 50x100, centre crop
    assert x.shape == (3, 50, 50)
    # at 2x the native mpp the image halves to 50x100; the crop still sees both halves
    y = Preprocess(mpp=0.25, target_mpp=0.5, size=50)(img)
    assert y.shape == (3, 50, 50) and y[0, 0, 0] < 0 < y[0, 0, -1]
    # rescaling to 0.125 µm/px doubles the image: the centre crop is 50 px of a 400 px row
    z = Preprocess(mpp=0.25, target_mpp=0.125, size=50)(img)
    assert z[0, 0, :20].max() < 0 and z[0, 0, -20:].min() > 0


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_preprocess_normalises_as_imagenets_mean_and_std(seed):
    """The normalisation (numpy, one thread) is the torch one it replaced, bit for bit."""
    img = np.random.default_rng(seed).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    x = torch.from_numpy(img.astype(np.float32) / 255.0).permute(2, 0, 1)
    expected = (x - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    out = Preprocess()(img)
    assert out.dtype == torch.float32 and out.is_contiguous() and torch.equal(out, expected)
