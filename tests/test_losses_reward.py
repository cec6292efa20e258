"""Tests for the reward-model losses: Bradley–Terry (margin, centering) and classification (BCE)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import prefopt as po
from prefopt.losses.reward import bradley_terry, reward_classification

F64 = torch.float64


def softplus(x: float) -> float:
    """log(1 + e^x), stable, in plain Python."""
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def test_registered_in_family():
    assert set(po.available_losses("reward")) == {"bradley_terry", "reward_classification"}


def test_bt_equal_rewards_is_log2():
    r = torch.tensor([-3.0, 0.0, 7.5], dtype=F64)
    out = bradley_terry(r, r.clone())
    torch.testing.assert_close(out.loss, torch.full((3,), math.log(2), dtype=F64), rtol=0, atol=1e-15)
    assert (out.metrics["accuracy"] == 0).all()


def test_bt_matches_python_oracle_with_margin_and_centering():
    gen = torch.Generator().manual_seed(0)
    rc = torch.randn(5, generator=gen, dtype=F64)
    rr = torch.randn(5, generator=gen, dtype=F64)
    m = torch.rand(5, generator=gen, dtype=F64)
    c = 0.01
    out = bradley_terry(rc, rr, m, center_coef=c)
    for i in range(5):
        a, b, mm = float(rc[i]), float(rr[i]), float(m[i])
        expected = softplus(-(a - b - mm)) + c * (a + b) ** 2
        assert math.isclose(float(out.loss[i]), expected, rel_tol=1e-13)
    # TRL's RewardTrainer form: batch mean of −logσ(...) plus c · batch mean of (r_c + r_r)²
    trl = -torch.nn.functional.logsigmoid(rc - rr - m).mean() + c * ((rc + rr) ** 2).mean()
    torch.testing.assert_close(out.loss.mean(), trl, rtol=1e-13, atol=0)
    torch.testing.assert_close(out.metrics["margins"], rc - rr)
    torch.testing.assert_close(out.metrics["accuracy"], (rc > rr).to(F64))


def test_bt_margin_shifts_the_decision_point_and_gradients():
    rc = torch.tensor([2.0], dtype=F64, requires_grad=True)
    rr = torch.tensor([0.5], dtype=F64, requires_grad=True)
    out = bradley_terry(rc, rr, torch.tensor([1.5], dtype=F64), center_coef=0.1)
    # r_c − r_r − m = 0 ⇒ −logσ(0) = log 2; centering 0.1·(2.5)² = 0.625
    assert math.isclose(float(out.loss.detach()), math.log(2) + 0.625, rel_tol=1e-14)
    out.loss.sum().backward()
    # ∂/∂r_c = −σ(−0) + 2c(r_c + r_r) = −0.5 + 0.5 ; ∂/∂r_r = +0.5 + 0.5
    torch.testing.assert_close(rc.grad, torch.tensor([0.0], dtype=F64), rtol=0, atol=1e-15)
    torch.testing.assert_close(rr.grad, torch.tensor([1.0], dtype=F64), rtol=0, atol=1e-15)


def test_bt_gradcheck():
    gen = torch.Generator().manual_seed(1)
    rc = torch.randn(4, generator=gen, dtype=F64, requires_grad=True)
    rr = torch.randn(4, generator=gen, dtype=F64, requires_grad=True)
    m = torch.rand(4, generator=gen, dtype=F64)
    assert torch.autograd.gradcheck(lambda a, b: bradley_terry(a, b, m, center_coef=0.05).loss, (rc, rr))


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.floats(-1e4, 1e4), min_size=1, max_size=6),
    st.floats(-1e4, 1e4),
    st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]),
)
def test_bt_extreme_values_and_dtypes(values, shift, dtype):
    rc = torch.tensor(values, dtype=dtype)
    rr = torch.tensor([shift] * len(values), dtype=dtype)
    out = po.get_loss("bradley_terry")(rc, rr)
    assert out.loss.shape == (len(values),)
    assert out.loss.dtype == (F64 if dtype == F64 else torch.float32)
    assert torch.isfinite(out.loss).all() and (out.loss >= 0).all()
    # −logσ(d) ≈ −d for very negative d: no overflow to inf
    diff = rc.to(out.loss.dtype) - rr.to(out.loss.dtype)
    torch.testing.assert_close(out.loss, torch.nn.functional.softplus(-diff), rtol=1e-6, atol=1e-6)


def test_bt_bad_input():
    r = torch.zeros(3)
    with pytest.raises(ValueError, match="rewards_rejected"):
        bradley_terry(r, torch.zeros(4))
    with pytest.raises(ValueError, match="margin"):
        bradley_terry(r, r, torch.zeros(2))
    with pytest.raises(ValueError, match="rewards_chosen"):
        bradley_terry(torch.zeros(3, 1), r)
    with pytest.raises(TypeError, match="rewards_chosen"):
        bradley_terry(torch.zeros(3, dtype=torch.long), r)
    with pytest.raises(ValueError, match="center_coef"):
        po.get_loss("bradley_terry", center_coef=-0.01)
    with pytest.raises(ValueError, match="rewards_rejected has 1 non-finite"):
        bradley_terry(r, torch.tensor([0.0, float("nan"), 0.0]), check_finite=True)


# ----------------------------------------------------------------------------------------------------------
# classification
# ----------------------------------------------------------------------------------------------------------


def test_classification_matches_python_oracle():
    r = torch.tensor([0.0, 2.0, -1.0, 3.0, -40.0], dtype=F64)
    p = torch.tensor([1.0, 1.0, 0.0, 0.25, 1.0], dtype=F64)
    out = reward_classification(r, p)
    for i in range(5):
        x, q = float(r[i]), float(p[i])
        expected = q * softplus(-x) + (1 - q) * softplus(x)
        assert math.isclose(float(out.loss[i]), expected, rel_tol=1e-13)
    assert math.isclose(float(out.loss[0]), math.log(2), rel_tol=1e-15)
    torch.testing.assert_close(out.metrics["prob"], torch.sigmoid(r))
    torch.testing.assert_close(out.metrics["accuracy"], torch.tensor([0.0, 1.0, 1.0, 0.0, 0.0], dtype=F64))


def test_classification_label_dtypes_agree():
    r = torch.tensor([0.3, -1.2, 2.0])
    as_float = reward_classification(r, torch.tensor([1.0, 0.0, 1.0])).loss
    as_bool = reward_classification(r, torch.tensor([True, False, True])).loss
    as_int = reward_classification(r, torch.tensor([1, 0, 1])).loss
    torch.testing.assert_close(as_bool, as_float, rtol=0, atol=0)
    torch.testing.assert_close(as_int, as_float, rtol=0, atol=0)


def test_classification_soft_label_minimum_is_at_logit_p():
    p = torch.tensor([0.1, 0.5, 0.8], dtype=F64)
    r = torch.log(p / (1 - p)).requires_grad_()
    out = reward_classification(r, p)
    out.loss.sum().backward()
    torch.testing.assert_close(r.grad, torch.zeros(3, dtype=F64), rtol=0, atol=1e-15)  # σ(r) − p = 0
    entropy = -(p * p.log() + (1 - p) * (1 - p).log())
    torch.testing.assert_close(out.loss.detach(), entropy, rtol=1e-13, atol=0)


def test_classification_gradcheck_and_bad_input():
    gen = torch.Generator().manual_seed(2)
    r = torch.randn(5, generator=gen, dtype=F64, requires_grad=True)
    p = torch.rand(5, generator=gen, dtype=F64)
    assert torch.autograd.gradcheck(lambda x: reward_classification(x, p).loss, (r,))
    with pytest.raises(ValueError, match="labels must lie in"):
        reward_classification(r, torch.tensor([0.0, 1.0, 2.0, 0.0, 0.0], dtype=F64))
    with pytest.raises(ValueError, match="labels must lie in"):
        reward_classification(r, torch.tensor([0.0, 1.0, float("nan"), 0.0, 0.0], dtype=F64))
    with pytest.raises(ValueError, match="labels has shape"):
        reward_classification(r, torch.zeros(4))
    with pytest.raises(TypeError, match="labels"):
        reward_classification(r, [0, 1, 0, 1, 1])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rewards"):
        reward_classification(torch.zeros(2, 2), torch.zeros(2, 2))


@pytest.mark.data
def test_classification_on_taskmaster_labels():
    """Real pointwise labels (Taskmaster coffee): a per-example constant logit fit by BCE reaches the base rate."""
    import json

    root = __import__("pathlib").Path(__file__).parents[1] / "../shared/data/taskmaster/coffee"
    if not root.exists():
        pytest.skip(f"real data not found at {root}")
    labels = []
    for f in sorted(root.glob("reward_0*.json")):
        labels += [float(row["reward"]) for row in json.loads(f.read_text())]
    y = torch.tensor(labels, dtype=F64)
    assert set(y.unique().tolist()) <= {0.0, 1.0} and len(y) > 1000
    r = torch.zeros(1, dtype=F64, requires_grad=True)
    opt = torch.optim.LBFGS([r], lr=1.0, max_iter=50)

    def closure():
        opt.zero_grad()
        loss = reward_classification(r.expand(len(y)), y).loss.mean()
        loss.backward()
        return loss

    opt.step(closure)
    base_rate = float(y.mean())
    assert math.isclose(float(torch.sigmoid(r.detach())), base_rate, rel_tol=1e-6)
