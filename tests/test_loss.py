import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dinov2_patho.loss import DINOLoss, KoLeoLoss, iBOTPatchLoss
from dinov2_patho.loss.centering import sinkhorn_knopp


def test_dino_loss_hand_computed():
    loss = DINOLoss(2, student_temp=1.0)
    s1 = torch.tensor([[math.log(3.0), 0.0]])  # softmax (3/4, 1/4)
    s2 = torch.zeros(1, 2)  # softmax (1/2, 1/2)
    t = torch.tensor([[0.5, 0.5]])
    expected = -(0.5 * math.log(0.75) + 0.5 * math.log(0.25)) + math.log(2.0)
    assert loss([s1, s2], [t]).item() == pytest.approx(expected, rel=1e-6)
    # two teachers: one term per (student, teacher) pair, each a batch mean
    t2 = torch.tensor([[1.0, 0.0]])
    assert loss([s1], [t, t2]).item() == pytest.approx(
        -(0.5 * math.log(0.75) + 0.5 * math.log(0.25)) - math.log(0.75), rel=1e-6)


def test_dino_loss_student_temperature_scales_logits():
    s, t = torch.tensor([[0.2, 0.0]]), torch.tensor([[1.0, 0.0]])
    expected = -math.log(math.exp(2.0) / (math.exp(2.0) + 1.0))
    assert DINOLoss(2, student_temp=0.1)([s], [t]).item() == pytest.approx(expected, rel=1e-5)


def test_ibot_loss_hand_computed():
    loss = iBOTPatchLoss(2, student_temp=1.0)
    # image 0 has two masked patches, image 1 none: mean over images of the per-image mean
    student = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])
    teacher = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    weights = torch.tensor([0.5, 0.5])
    c1, c2 = -math.log(0.75), math.log(2.0)
    expected = (c1 / 2 + c2 / 2) / 2
    assert loss(student, teacher, weights, n_images=2).item() == pytest.approx(expected, rel=1e-6)
    empty = torch.zeros(0, 2)
    assert loss(empty, empty, torch.zeros(0), n_images=4).item() == 0.0


def test_ema_center_hand_computed():
    loss = DINOLoss(2, center_momentum=0.9)
    loss.update_center(torch.tensor([[1.0, 3.0], [3.0, 1.0]]))
    assert torch.allclose(loss.center, torch.tensor([[0.2, 0.2]]))
    probs = loss.softmax_center_teacher(torch.tensor([[0.2, 0.2 + math.log(3.0) * 0.5]]), teacher_temp=0.5)
    assert torch.allclose(probs, torch.tensor([[0.25, 0.75]]))
    ibot = iBOTPatchLoss(2, center_momentum=0.5)
    ibot.update_center(torch.zeros(0, 2))  # no masked patch anywhere: center unchanged
    assert torch.equal(ibot.center, torch.zeros(1, 2))


def test_sinkhorn_uniform_logits_give_uniform_targets():
    q = sinkhorn_knopp(torch.zeros(4, 8), temp=0.1)
    assert torch.allclose(q, torch.full((4, 8), 1 / 8))


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 12), seed=st.integers(0, 10_000), temp=st.floats(0.5, 2.0))
def test_sinkhorn_is_doubly_stochastic(n, seed, temp):
    # logits in [-1, 1], as the heads' cosine similarities to the prototypes
    logits = torch.rand(n, n, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    q = sinkhorn_knopp(logits, temp, n_iterations=500)
    assert torch.all(q >= 0)
    assert torch.allclose(q.sum(dim=1), torch.ones(n), atol=1e-5)  # exact after the last step
    assert torch.allclose(q.sum(dim=0), torch.ones(n), atol=1e-3)  # converged equipartition


@settings(max_examples=20, deadline=None)
@given(b=st.integers(1, 16), k=st.integers(2, 16), seed=st.integers(0, 10_000), shift=st.floats(-50, 50))
def test_sinkhorn_rows_are_distributions_and_shift_invariant(b, k, seed, shift):
    logits = torch.randn(b, k, generator=torch.Generator().manual_seed(seed))
    q = sinkhorn_knopp(logits, 0.07)
    assert torch.allclose(q.sum(dim=1), torch.ones(b), atol=1e-5)
    # exact in arithmetic; in float32, logits + shift is rounded by up to eps * |logits + shift| / 2, which
    # the temperature scales up in the exponent (shift 32 moved q by 2e-5)
    rounding = torch.finfo(torch.float32).eps * (abs(shift) + float(logits.abs().max())) / 0.07
    assert torch.allclose(sinkhorn_knopp(logits + shift, 0.07), q, atol=1e-5 + 2 * rounding)


def test_sinkhorn_large_logits_do_not_overflow():
    logits = torch.tensor([[10.0, -10.0], [-10.0, 10.0]])
    q = sinkhorn_knopp(logits, temp=0.04)  # exp(250) overflows fp32 without the shift
    assert torch.isfinite(q).all()
    assert torch.allclose(q, torch.eye(2), atol=1e-6)


def test_koleo_hand_computed():
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]])  # normalised: every NN at distance sqrt(2)
    assert KoLeoLoss()(x).item() == pytest.approx(-math.log(math.sqrt(2.0)), rel=1e-5)
    y = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])  # duplicate rows: distance 0
    assert KoLeoLoss(eps=1e-8)(y).item() == pytest.approx(
        (2 * -math.log(1e-8 * math.sqrt(2) + 1e-8) - math.log(math.sqrt(2.0))) / 3, rel=1e-3)


@pytest.mark.parametrize("rows", [1, 2, 3])
def test_koleo_small_batches_and_duplicates_stay_finite(rows):
    x = torch.ones(rows, 8, requires_grad=True)  # identical rows: the degenerate case
    loss = KoLeoLoss()(x)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(x.grad).all()
    if rows == 1:
        assert loss.item() == 0.0 and torch.equal(x.grad, torch.zeros_like(x))


def test_koleo_pushes_neighbours_apart():
    x = torch.tensor([[1.0, 0.0], [1.0, 0.1], [-1.0, 0.0]], requires_grad=True)
    before = KoLeoLoss()(x)
    before.backward()
    with torch.no_grad():
        after = KoLeoLoss()(x - 0.05 * x.grad)
    assert after < before
