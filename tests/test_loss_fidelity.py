"""benchmarks/loss_fidelity.py without a dinov2 checkout: its comparison helpers, the xformers
stand-in its reference step goes through, and its exit without a checkout."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    sys.path.insert(0, str(BENCHMARKS))  # as when run: the script imports its neighbour dinov2_reference
    try:
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


@pytest.fixture(scope="module")
def bench():
    return _load("loss_fidelity")


@settings(max_examples=30, deadline=None)
@given(sizes=st.lists(st.integers(0, 7), min_size=1, max_size=4), scale=st.floats(-0.5, 0.5))
def test_relative_difference_and_block_mask_stand_in(bench, sizes, scale):
    ref = _load("dinov2_reference")
    tensors = [torch.randn(1, n, 3) for n in sizes]
    mask, cat = ref._BlockDiagonalMask.from_tensor_list(tensors)
    assert cat.shape == (1, sum(sizes), 3)
    assert all(torch.equal(a, b) for a, b in zip(mask.split(cat), tensors))
    x = [torch.randn(5), torch.randn(2, 3)]
    assert bench.rel_diff(x, x) == 0.0
    assert bench.rel_diff([t * (1 + scale) for t in x], x) == pytest.approx(abs(scale), abs=1e-6)


def test_mask_statistics_count_masked_crops_fractions_and_blobs(bench):
    a = torch.zeros(3, 16, dtype=torch.bool)  # three 4 x 4 crops
    a[0, [0, 1, 4, 5]] = True  # one 2 x 2 blob
    a[1, [0, 15]] = True  # two blobs in opposite corners
    stats = bench.mask_statistics([a], grid=4)
    assert stats["crops masked"].tolist() == [1.0, 1.0, 0.0]
    assert stats["masked fraction of a masked crop"].tolist() == [0.25, 0.125]
    assert stats["blobs per masked crop"].tolist() == [1.0, 2.0]


def test_reference_inputs_and_total_follow_dinov2s_conventions(bench):
    gen = torch.Generator().manual_seed(0)
    batch = bench.step_batch(2, gen)
    inputs = bench.reference_inputs(batch)
    assert inputs["collated_global_crops"].shape == (8, 3, 56, 56)
    assert inputs["collated_local_crops"].shape == (8, 3, 28, 28)
    assert int(inputs["n_masked_patches"]) == batch["masks"].sum() == len(inputs["mask_indices_list"])
    assert inputs["upperbound"] >= int(inputs["n_masked_patches"])
    # dinov2 displays KoLeo (weighted) and iBOT halved: its backpropagated loss doubles them back
    cfg = bench.OmegaConf.create({"ibot": {"loss_weight": 0.5}})
    shown = {"dino_local_crops_loss": 1.0, "dino_global_crops_loss": 2.0, "koleo_loss": 0.25,
             "ibot_loss": 3.0}
    assert bench.reference_total(shown, cfg) == pytest.approx(1.0 + 2.0 + 0.5 + 0.5 * 6.0)


def test_cuda_stand_in_is_undone(bench):
    cuda = torch.Tensor.cuda
    with bench.tensors_stay_on_cpu():
        x = torch.ones(2)
        if not torch.cuda.is_available():
            assert x.cuda() is x
    assert torch.Tensor.cuda is cuda


def test_without_a_checkout_it_says_so(bench, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["loss_fidelity.py", "--dinov2-repo", str(tmp_path)])
    with pytest.raises(SystemExit) as exit_info:
        bench.main()
    assert exit_info.value.code == 2 and f"no dinov2 checkout at {tmp_path}" in capsys.readouterr().err
