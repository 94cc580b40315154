import warnings

import numpy as np
import pytest
import torch
from test_damaged_files import DAMAGES, damage
from torch import nn
from torch.utils.data import Dataset

from dinov2_patho.backbones.features import embed, extract_features, load_features
from dinov2_patho.errors import UserError
from dinov2_patho.eval.heads import LinearProbeConfig, knn_classify, linear_probe, logistic_regression
from dinov2_patho.eval.heads.knn import knn_probs
from dinov2_patho.eval.heads.linear import _balanced_accuracy, predict_proba, train_linear_probe
from dinov2_patho.eval.runner import heldout_split


def blobs(n_per_class, num_classes=3, dim=16, spread=1.0, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, (num_classes, dim))
    y = np.repeat(np.arange(num_classes), n_per_class)
    x = (centres[y] + rng.normal(0, spread, (len(y), dim))).astype(np.float32)
    return x, y


CLASSES = ["a", "b", "c"]
FAST = LinearProbeConfig(lr=1e-2, max_steps=200, n_runs=2)  # a quick, converging variant


def test_linear_probe_learns_separable_classes_and_is_deterministic():
    train, val, test = (blobs(n, seed=1, spread=0.5) for n in (40, 10, 10))
    first = linear_probe(train, val, test, CLASSES, FAST)
    second = linear_probe(train, val, test, CLASSES, FAST)
    assert first["balanced_accuracy"] > 0.95
    assert [r["balanced_accuracy"] for r in first["runs"]] == [r["balanced_accuracy"] for r in second["runs"]]
    assert len(first["runs"]) == 2 and "balanced_accuracy_std" in first


def test_linear_probe_stops_early_and_keeps_the_best_epoch():
    x, y = blobs(30, seed=2)
    t = [torch.as_tensor(a) for a in (x, y, x, y)]
    cfg = LinearProbeConfig(max_steps=12_500, patience=5)
    _, info = train_linear_probe(*t, num_classes=3, cfg=cfg, seed=0)
    assert info["steps"] < 12_500
    assert info["epochs"] == info["best_epoch"] + 1 + 5
    # eva's rule: patience = ceil(0.2 * epochs in max_steps); 90 rows -> 1 step per epoch
    _, info = train_linear_probe(*t, num_classes=3, cfg=LinearProbeConfig(max_steps=50), seed=0)
    assert info["patience"] == 10 and info["steps"] <= 50


def test_selection_metric_is_torchmetrics_macro_accuracy():
    # what eva monitors: a predicted class missing from the targets counts as recall 0
    y = torch.tensor([0, 0, 1, 1])
    assert _balanced_accuracy(torch.tensor([0, 0, 2, 1]), y, 3) == pytest.approx((1 + 0.5 + 0) / 3)
    assert _balanced_accuracy(torch.tensor([0, 1, 1, 1]), y, 3) == pytest.approx((0.5 + 1) / 2)


def test_partial_epoch_cut_by_max_steps_is_not_validated():
    x, y = blobs(100, seed=5)  # 300 rows: 2 steps per epoch (256 + 44)
    t = [torch.as_tensor(a) for a in (x, y, x, y)]
    cfg = LinearProbeConfig(lr=0.1, max_steps=3, patience=10)
    _, info = train_linear_probe(*t, num_classes=3, cfg=cfg, seed=0)
    assert (info["steps"], info["epochs"], info["best_epoch"]) == (3, 2, 0)
    with pytest.raises(UserError, match="max_steps=1"):
        train_linear_probe(*t, num_classes=3, cfg=LinearProbeConfig(max_steps=1), seed=0)


def test_binary_probe_has_one_logit_and_complementary_probabilities():
    train, val, test = (blobs(n, num_classes=2, seed=6, spread=0.5) for n in (40, 10, 10))
    t = [torch.as_tensor(a) for a in (*train, *val)]
    head, _ = train_linear_probe(*t, num_classes=2, cfg=FAST, seed=0)
    assert head.out_features == 1
    probs = predict_proba(head, torch.as_tensor(test[0]))
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-6)
    with torch.no_grad():
        logit = head(torch.as_tensor(test[0]))[:, 0].numpy()
    np.testing.assert_array_equal(probs.argmax(1), (logit > 0).astype(int))
    assert linear_probe(train, val, test, ["a", "b"], FAST)["balanced_accuracy"] > 0.95


def test_knn_votes_are_probabilities_and_follow_neighbours():
    x, y = blobs(20, seed=3)
    probs = knn_probs(x, y, x, 3, k=10)
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
    assert (probs.argmax(1) == y).mean() > 0.95
    # a point that duplicates a training point of class 2, with k=1, votes class 2 only
    one = knn_probs(x, y, x[y == 2][:1], 3, k=1)
    np.testing.assert_allclose(one, [[0, 0, 1]])
    results = knn_classify((x, y), (x, y), CLASSES, ks=(10, 200))
    assert set(results) == {10, 200}  # k larger than the training set is clipped


def test_knn_takes_read_only_features_without_a_warning(tmp_path):
    # the feature cache is read back as read-only memmaps; torch warns (once a process) when it wraps one
    x, y = blobs(20, seed=3)
    expected = knn_probs(x, y, x, 3, k=10)
    for dtype in (np.float32, np.float16):
        np.save(tmp_path / "x.npy", x.astype(dtype))
        np.save(tmp_path / "y.npy", y)
        x_ro, y_ro = (np.load(tmp_path / f"{n}.npy", mmap_mode="r") for n in ("x", "y"))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = knn_probs(x_ro, y_ro, x_ro, 3, k=10)
        np.testing.assert_allclose(got, expected, atol=1e-2 if dtype == np.float16 else 1e-6)


def test_logistic_regression_sweeps_c_on_heldout():
    train, held, test = (blobs(n, seed=4, spread=2.0) for n in (30, 10, 10))
    out = logistic_regression(train, held, test, CLASSES, cs=(1e-4, 1.0))
    assert set(out["sweep"]) == {1e-4, 1.0}
    assert out["C"] == max(out["sweep"], key=lambda c: (out["sweep"][c], -c))
    assert out["balanced_accuracy"] > 0.8


def test_heldout_split_is_stratified_and_disjoint():
    y = np.repeat([0, 1, 2], [10, 5, 1])
    fit, held = heldout_split(y, 0.2, seed=0)
    assert np.intersect1d(fit, held).size == 0 and len(fit) + len(held) == len(y)
    assert sorted(y[held].tolist()) == [0, 0, 1]


class Toy(Dataset):
    """Images whose mean encodes the label; `fail_at` simulates a crash mid-extraction."""

    def __init__(self, n=10, fail_at=None):
        self.n, self.fail_at = n, fail_at

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if i == self.fail_at:
            raise RuntimeError("interrupted")
        return torch.full((3, 8, 8), float(i)), i % 2


class Pool(nn.Module):
    def forward(self, x):
        return x.mean(dim=(2, 3))


def test_extraction_resumes_after_interruption(tmp_path):
    model = Pool()
    with pytest.raises(RuntimeError, match="interrupted"):
        extract_features(model, Toy(fail_at=7), tmp_path / "split", batch_size=2, progress=False)
    assert not (tmp_path / "split" / "meta.json").exists()
    feats = extract_features(model, Toy(), tmp_path / "split", batch_size=2, progress=False)
    expected = extract_features(model, Toy(), tmp_path / "fresh", batch_size=2, progress=False)
    np.testing.assert_array_equal(feats.cls, expected.cls)
    np.testing.assert_array_equal(feats.labels, np.arange(10) % 2)
    np.testing.assert_allclose(feats.cls[:, 0], np.arange(10))
    assert isinstance(load_features(tmp_path / "split").cls, np.memmap)


def test_embed_reads_our_vit_cls_and_mean_patch_tokens():
    from dinov2_patho.models import build_backbone

    vit = build_backbone("vit_small", patch_size=14, img_size=28).eval()
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        out, ref = embed(vit, x), vit.forward_features(x)
    torch.testing.assert_close(out["cls"], ref["x_norm_clstoken"])
    torch.testing.assert_close(out["patch_mean"], ref["x_norm_patchtokens"].mean(1))


def test_summarized_runs_keep_each_class_recall_as_its_mean_over_runs():
    from dinov2_patho.eval.heads.linear import summarize_runs

    runs = [{"balanced_accuracy": 0.5, "per_class_recall": {"a": 1.0, "b": 0.0}},
            {"balanced_accuracy": 0.7, "per_class_recall": {"a": 0.5, "b": float("nan")}}]
    out = summarize_runs(runs)
    assert out["balanced_accuracy"] == pytest.approx(0.6)
    assert out["per_class_recall"] == {"a": 0.75, "b": 0.0}


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("name", ["cls.npy", "labels.npy", "progress.json"])
def test_a_damaged_feature_cache_is_rebuilt_saying_so(tmp_path, caplog, how, name):
    model, split = Pool(), tmp_path / "split"
    if name == "progress.json":  # a partial extraction: its progress record is damaged
        with pytest.raises(RuntimeError, match="interrupted"):
            extract_features(model, Toy(fail_at=7), split, batch_size=2, progress=False)
    else:
        extract_features(model, Toy(), split, batch_size=2, progress=False)
    damage(split / name, how)
    feats = extract_features(model, Toy(), split, batch_size=2, progress=False)
    expected = extract_features(model, Toy(), tmp_path / "fresh", batch_size=2, progress=False)
    np.testing.assert_array_equal(feats.cls, expected.cls)
    np.testing.assert_array_equal(feats.labels, expected.labels)
    assert [r.getMessage() for r in caplog.records if "rebuilding" in r.getMessage()][0].startswith(
        str(split / name))


@pytest.mark.parametrize("rows", [64, 2 * 4096])
def test_logreg_fits_small_features_on_one_blas_thread_and_leaves_large_ones_alone(rows, monkeypatch):
    from threadpoolctl import threadpool_info

    from dinov2_patho.eval.heads import logreg

    seen = []

    def record(self, x, y, *args, **kwargs):  # the threads BLAS has while the estimator fits
        seen.append(max(p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"))
        return self

    monkeypatch.setattr(logreg.LogisticRegression, "fit", record)
    monkeypatch.setattr(logreg, "ONE_THREAD_VALUES", 64 * 1024)  # rows x 1024 dims: 64 rows at the limit
    outside = max(p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas")
    logreg._fit(np.zeros((rows, 1024), np.float32), np.arange(rows) % 2, 1.0, 10)
    assert seen == [1 if rows == 64 else outside]
