"""Tests of the masked reductions (prefopt.masked): loop oracles, hand values, split-invariance of token_mean."""

from __future__ import annotations

import statistics

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prefopt import masked

X = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]], dtype=torch.float64)
M = torch.tensor([[True, True, False, False], [False, True, True, True]])


def test_masked_sum_and_mean_hand_values():
    assert masked.masked_sum(X, M).item() == 1 + 2 + 20 + 30 + 40
    torch.testing.assert_close(
        masked.masked_sum(X, M, dim=-1), torch.tensor([3.0, 90.0], dtype=torch.float64)
    )
    torch.testing.assert_close(
        masked.masked_sum(X, M, dim=0), torch.tensor([1.0, 22.0, 30.0, 40.0], dtype=torch.float64)
    )
    assert masked.masked_mean(X, M).item() == pytest.approx(93.0 / 5.0)
    torch.testing.assert_close(
        masked.masked_mean(X, M, dim=-1), torch.tensor([1.5, 30.0], dtype=torch.float64)
    )


def test_masked_mean_empty_rows_are_zero():
    m = torch.tensor([[False] * 4, [True, False, False, False]])
    torch.testing.assert_close(
        masked.masked_mean(X, m, dim=-1), torch.tensor([0.0, 10.0], dtype=torch.float64)
    )
    assert masked.masked_mean(X, torch.zeros_like(M)).item() == 0.0


def test_masked_out_nan_never_propagates_in_sum_and_mean():
    x = X.clone()
    x[~M] = float("nan")
    x.requires_grad_()
    s = masked.masked_sum(x, M) + masked.masked_mean(x, M, dim=-1).sum()
    s.backward()
    assert torch.isfinite(s)
    expected = M.double() * (1 + 1 / M.sum(-1, keepdim=True).double())
    torch.testing.assert_close(x.grad, expected)


@given(
    vals=st.lists(st.floats(-1e3, 1e3), min_size=1, max_size=12),
    bits=st.lists(st.booleans(), min_size=12, max_size=12),
)
@settings(max_examples=60, deadline=None)
def test_masked_mean_and_var_match_python_oracle(vals, bits):
    x = torch.tensor(vals, dtype=torch.float64)
    m = torch.tensor(bits[: len(vals)])
    kept = [v for v, b in zip(vals, bits) if b]
    mean = sum(kept) / len(kept) if kept else 0.0
    assert masked.masked_mean(x, m).item() == pytest.approx(mean, rel=1e-9, abs=1e-9)
    if len(kept) >= 2:
        assert masked.masked_var(x, m).item() == pytest.approx(statistics.variance(kept), rel=1e-9, abs=1e-6)
        assert masked.masked_var(x, m, unbiased=False).item() == pytest.approx(
            statistics.pvariance(kept), rel=1e-9, abs=1e-6
        )
    elif len(kept) == 1:
        assert masked.masked_var(x, m).item() == 0.0


def test_masked_whiten():
    w = masked.masked_whiten(X, M, eps=0.0)
    kept = w[M]
    assert kept.mean().item() == pytest.approx(0.0, abs=1e-12)
    assert kept.var(unbiased=True).item() == pytest.approx(1.0, rel=1e-12)
    assert (w[~M] == 0).all()
    # shift_mean=False adds the mean back: hand value for one element
    mean = 93.0 / 5.0
    std = statistics.stdev([1.0, 2.0, 20.0, 30.0, 40.0])
    w2 = masked.masked_whiten(X, M, shift_mean=False, eps=0.0)
    assert w2[0, 0].item() == pytest.approx((1.0 - mean) / std + mean, rel=1e-12)


def test_seq_mean_hand_value():
    # per-sequence means 1.5 and 30, then their mean
    assert masked.mean_of_seq_means(X, M).item() == pytest.approx((1.5 + 30.0) / 2)


def test_token_mean_hand_values():
    assert masked.token_mean(X, M).item() == pytest.approx(93.0 / 5.0)
    assert masked.token_mean(X, M, num_tokens=10).item() == pytest.approx(9.3)
    assert masked.token_mean(X, M, num_tokens=torch.tensor(31.0)).item() == pytest.approx(3.0)


# ------------------------------------------------------------------------------------------------------
# token_mean with a global count: whole batch == micro-batches with accumulation == simulated ranks
# ------------------------------------------------------------------------------------------------------


def _per_token_loss(theta: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
    """A toy per-token loss ``(b, t)``: ``(θ·f_bt)²`` (nonlinear, so gradients depend on every token)."""
    return (feats @ theta) ** 2


def _setup():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(6, 5, 3, generator=g, dtype=torch.float64)
    # very uneven completion lengths across rows, so local means would weight tokens differently
    lengths = torch.tensor([1, 5, 2, 4, 3, 1])
    mask = torch.arange(5)[None, :] < lengths[:, None]
    theta0 = torch.tensor([0.3, -1.2, 0.7], dtype=torch.float64)
    return feats, mask, theta0


def test_token_mean_split_invariance():
    feats, mask, theta0 = _setup()
    n_global = mask.sum()  # 16 tokens

    # whole batch
    th = theta0.clone().requires_grad_()
    masked.token_mean(_per_token_loss(th, feats), mask).backward()
    whole = th.grad.clone()

    # micro-batches of 2 rows with gradient accumulation, each divided by the global count
    th = theta0.clone().requires_grad_()
    for i in range(0, 6, 2):
        masked.token_mean(
            _per_token_loss(th, feats[i : i + 2]), mask[i : i + 2], num_tokens=n_global
        ).backward()
    micro = th.grad.clone()

    # 3 simulated data-parallel ranks of 2 rows each; DDP averages gradients, so pass num_tokens / W
    world = 3
    rank_grads = []
    for r in range(world):
        th = theta0.clone().requires_grad_()
        rows = slice(2 * r, 2 * r + 2)
        masked.token_mean(
            _per_token_loss(th, feats[rows]), mask[rows], num_tokens=n_global / world
        ).backward()
        rank_grads.append(th.grad.clone())
    ranks = torch.stack(rank_grads).mean(0)

    # a slow obvious oracle: loop over every counted token, sum its gradient, divide by the count
    oracle = torch.zeros(3, dtype=torch.float64)
    count = 0
    for b in range(6):
        for t in range(5):
            if mask[b, t]:
                f = feats[b, t]
                oracle += 2 * (f @ theta0) * f  # d/dθ (θ·f)² = 2 (θ·f) f
                count += 1
    oracle /= count
    assert count == 16

    torch.testing.assert_close(whole, oracle)
    torch.testing.assert_close(micro, oracle)
    torch.testing.assert_close(ranks, oracle)

    # the local-count version (num_tokens=None per micro-batch) is NOT invariant on this uneven batch
    th = theta0.clone().requires_grad_()
    for i in range(0, 6, 2):
        (masked.token_mean(_per_token_loss(th, feats[i : i + 2]), mask[i : i + 2]) / 3).backward()
    assert not torch.allclose(th.grad, oracle)


def test_token_mean_split_invariance_hand_checked():
    # loss per token = w * c; d/dw of sum(m*c*w)/N = sum(m*c)/N. Tokens counted: c = 1, 2 | 3 (3 tokens)
    c = torch.tensor([[1.0, 2.0], [3.0, 100.0]], dtype=torch.float64)
    m = torch.tensor([[True, True], [True, False]])
    w = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    for i in range(2):
        masked.token_mean(w * c[i : i + 1], m[i : i + 1], num_tokens=3).backward()
    assert w.grad.item() == pytest.approx((1 + 2 + 3) / 3)  # = 2.0
    w2 = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    for i in range(2):  # local means: (1.5 + 3) / 2 = 2.25, not 2
        (masked.token_mean(w2 * c[i : i + 1], m[i : i + 1]) / 2).backward()
    assert w2.grad.item() == pytest.approx(2.25)


# ------------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fn", [masked.masked_sum, masked.masked_mean, masked.masked_var, masked.masked_whiten, masked.token_mean]
)
def test_mask_must_be_bool_and_same_shape(fn):
    with pytest.raises(TypeError, match="mask"):
        fn(X, M.long())
    with pytest.raises(ValueError, match="mask"):
        fn(X, M[:, :3])
    with pytest.raises(TypeError, match="mask"):
        fn(X, [[True] * 4] * 2)


def test_token_mean_rejects_nonpositive_count():
    with pytest.raises(ValueError, match="num_tokens"):
        masked.token_mean(X, M, num_tokens=0)
    with pytest.raises(ValueError, match="num_tokens"):
        masked.token_mean(X, M, num_tokens=-3.0)


# ------------------------------------------------------------------------------------------------------
# contract defects found in review (fixed); these tests keep them fixed
# ------------------------------------------------------------------------------------------------------


def test_token_mean_rejects_zero_tensor_count():
    with pytest.raises(ValueError, match="num_tokens"):
        masked.token_mean(X, M, num_tokens=torch.tensor(0.0))


@pytest.mark.parametrize("fn", [masked.masked_var, masked.masked_whiten])
def test_masked_out_nan_does_not_poison_var_whiten_gradient(fn):
    x = torch.tensor([1.0, 2.0, float("nan")], dtype=torch.float64, requires_grad=True)
    m = torch.tensor([True, True, False])
    out = fn(x, m)
    (
        out * torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64)[: out.numel()].reshape(out.shape)
    ).sum().backward()
    assert torch.isfinite(x.grad).all()
