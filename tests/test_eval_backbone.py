"""`eval run --backbone`: a training run's own teacher at its own size, and one-line errors for
a file that is not a checkpoint, an unknown --arch, and backbone.model keys the arch does not take."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_eval_run import folder_benchmark
from test_train import tiny_cfg

from dinov2_patho.backbones.load import frozen, load_backbone
from dinov2_patho.cli import main
from dinov2_patho.errors import UserError
from dinov2_patho.models import BACKBONES

TINY_EVAL = ["preprocess.size=32", "heads.linear.n_runs=1", "heads.linear.max_steps=20", "heads.knn.k=[1]",
             "heads.logreg.C=[1.0]", "progress=false"]


@pytest.fixture(scope="module")
def run_dir(cohort, cohort_index, tmp_path_factory) -> Path:
    from dinov2_patho.train.trainer import run_training

    out = tmp_path_factory.mktemp("run")
    run_training(tiny_cfg(cohort, cohort_index, "train.iterations=1", "train.num_workers=0"), out)
    return out


def _one_line_error(capsys, args: list[str]) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_a_run_directory_is_its_teacher_at_its_own_size(run_dir, tmp_path, capsys):
    teacher = load_backbone(run_dir)  # the eval default arch (vit_small) is not what it was trained at
    assert teacher.embed_dim == 48 and len(teacher.blocks) == 2 and not teacher.training
    checkpoint = next((run_dir / "checkpoints").glob("iter_*"))
    for path in (checkpoint, checkpoint / "state.pt"):
        same = load_backbone(path)
        assert all((a == b).all() for a, b in zip(teacher.state_dict().values(), same.state_dict().values()))
    folder_benchmark(tmp_path / "data" / "folder")
    out = tmp_path / "eval"
    assert main(["eval", "run", "--backbone", str(run_dir), "--benchmarks", "folder", "--data-root",
                 str(tmp_path / "data"), "--output-dir", str(out), *TINY_EVAL]) == 0
    assert np.load(out / "features" / "folder" / "test" / "cls.npy").shape == (8, 48)
    with pytest.raises(UserError, match="backbone.model: .* is a training run"):
        load_backbone(run_dir, patch_size=14)


def test_a_file_that_is_not_a_checkpoint_is_one_line(tmp_path, capsys):
    for name, data in (("notes.pth", b"hello\n"), ("garbage.pth", b"abc\x80\x02garbage"), ("empty.pt", b"")):
        (tmp_path / name).write_bytes(data)
        line = _one_line_error(capsys, ["eval", "run", "--backbone", str(tmp_path / name), "--benchmarks",
                                        "folder", "--output-dir", str(tmp_path / "o")])
        assert f"{tmp_path / name}: not a loadable weights-only torch checkpoint" in line


def test_unknown_arch_lists_the_valid_names(tmp_path, capsys):
    line = _one_line_error(capsys, ["eval", "run", "--arch", "vit_lage", "--benchmarks", "folder",
                                    "--output-dir", str(tmp_path / "o")])
    assert "'vit_lage' is unknown" in line and "vit_large" in line
    assert all(name in line for name in BACKBONES.names())


@pytest.mark.parametrize(("override", "expected"), [
    ("backbone.model.embed_dim=48", "backbone.model.embed_dim: fixed by backbone.arch=vit_small"),
    ("backbone.model.patch_sise=16", "backbone.model.patch_sise: not an option of vit_small; did you mean "
                                     "'patch_size'?"),
])
def test_backbone_model_keys_the_arch_does_not_take_are_one_line(tmp_path, capsys, override, expected):
    line = _one_line_error(capsys, ["eval", "run", "--benchmarks", "folder", "--output-dir",
                                    str(tmp_path / "o"), override])
    assert expected in line


def test_weights_of_another_architecture_are_one_line_naming_file_arch_and_first_mismatch(tmp_path, capsys):
    from dinov2_patho.models import build_backbone

    weights = tmp_path / "patch16.pth"
    torch.save(build_backbone("vit_small", patch_size=16).state_dict(), weights)
    line = _one_line_error(capsys, ["eval", "run", "--backbone", str(weights), "--arch", "vit_small",
                                    "--benchmarks", "folder", "--output-dir", str(tmp_path / "o")])
    assert line.endswith(f"{weights}: does not fit arch vit_small: patch_embed.proj.weight [384, 3, 16, 16] "
                         "vs model [384, 3, 14, 14]")
    # a timm model: torch's many-line state-dict error becomes the first key the checkpoint lacks
    state = load_backbone(None, "timm/vit_tiny_patch16_224", depth=1).state_dict()
    dropped = next(iter(state))
    torch.save({k: v for k, v in state.items() if k != dropped}, weights)
    with pytest.raises(UserError) as raised:
        load_backbone(weights, "timm/vit_tiny_patch16_224", depth=1)
    assert str(raised.value) == (f"{weights}: does not fit arch timm/vit_tiny_patch16_224 (depth=1): "
                                 f"{dropped} missing from the checkpoint")


def test_the_backbone_and_feature_engine_load_without_the_heads_and_sklearn():
    """`curate embed` imports these; the package's `run_benchmarks` loads the rest on first use."""
    import subprocess
    import sys

    code = ("import sys, dinov2_patho.backbones.load, dinov2_patho.backbones.features, "
            "dinov2_patho.backbones.preprocess; "
            "heavy = sorted(m for m in ('sklearn', 'dinov2_patho.eval.runner') if m in sys.modules); "
            "from dinov2_patho.eval import run_benchmarks; print(heavy, run_benchmarks.__module__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["[]", "dinov2_patho.eval.runner"]


def test_a_random_init_baseline_is_drawn_from_its_seed_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a, b, c = (load_backbone(None, "timm/vit_tiny_patch16_224", seed=s, depth=1).state_dict()
               for s in (5, 5, 6))
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert torch.equal(torch.rand(3), expected_next)


def test_eval_run_baselines_repeat_and_record_their_seed(tmp_path):
    import json

    folder_benchmark(tmp_path / "data" / "folder")
    tiny = ["preprocess.size=28", "backbone.model.img_size=28", "heads.linear.n_runs=1",
            "heads.linear.max_steps=10", "heads.knn.k=[1]", "heads.logreg.enabled=false", "progress=false",
            "plot=false"]
    runs = []
    for name in ("a", "b"):  # two runs of one command: the same baseline (unseeded, they differed)
        out = tmp_path / name
        assert main(["eval", "run", "--benchmarks", "folder", "--data-root", str(tmp_path / "data"),
                     "--output-dir", str(out), "backbone.seed=3", *tiny]) == 0
        results = json.loads((out / "results.json").read_text())["folder"]
        assert results["backbone"] == {"path": None, "arch": "vit_small", "seed": 3}
        runs.append((np.load(out / "features" / "folder" / "test" / "cls.npy"), results["knn"]))
    assert np.array_equal(runs[0][0], runs[1][0]) and runs[0][1] == runs[1][1]


@pytest.mark.parametrize("training", [True, False])
def test_frozen_evaluates_and_restores_the_mode_even_on_error(training):
    module = torch.nn.Dropout(0.5).train(training)
    with pytest.raises(RuntimeError), frozen(module):
        assert not module.training
        raise RuntimeError("a benchmark failed")
    assert module.training is training
