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


# ------------------------------------------------------------------------------------------------------
# aggregate: the four modes, global counts, validation
# ------------------------------------------------------------------------------------------------------


def _oracle(loss: torch.Tensor, mask: torch.Tensor, mode: str, n_tok=None, n_seq=None, length=None) -> float:
    """Loop over rows and tokens in Python floats."""
    b, t = loss.shape
    rows = [[float(loss[i, j]) for j in range(t) if mask[i, j]] for i in range(b)]
    n_tok = sum(len(r) for r in rows) if n_tok is None else n_tok
    n_seq = b if n_seq is None else n_seq
    length = t if length is None else length
    if mode == "token-mean":
        return sum(sum(r) for r in rows) / max(n_tok, 1)
    if mode == "seq-mean-token-mean":
        return sum(sum(r) / len(r) for r in rows if r) / n_seq
    if mode == "seq-mean-token-sum":
        return sum(sum(r) for r in rows) / n_seq
    return sum(sum(r) for r in rows) / (n_seq * length)


@pytest.mark.parametrize("mode", masked.AGGREGATIONS)
def test_aggregate_matches_loop_oracle_and_ignores_masked_garbage(mode):
    gen = torch.Generator().manual_seed(0)
    loss = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    mask = torch.rand(5, 7, generator=gen) < 0.6
    mask[2] = False  # a row with no token
    garbage = loss.clone()
    garbage[~mask] = float("nan")
    garbage[0, ~mask[0]] = float("inf")
    got = masked.aggregate(garbage, mask, mode)
    assert got.item() == pytest.approx(_oracle(loss, mask, mode), rel=1e-12)
    kw = {"max_length": 11} if mode == "seq-mean-token-sum-norm" else {}
    counts = {"num_tokens": 40} if mode == "token-mean" else {"num_sequences": 9}
    got = masked.aggregate(loss, mask, mode, **counts, **kw)
    oracle = _oracle(
        loss,
        mask,
        mode,
        n_tok=counts.get("num_tokens"),
        n_seq=counts.get("num_sequences"),
        length=kw.get("max_length"),
    )
    assert got.item() == pytest.approx(oracle, rel=1e-12)
    x = garbage.clone().requires_grad_(True)
    masked.aggregate(x, mask, mode).backward()
    assert torch.isfinite(x.grad).all() and (x.grad[~mask] == 0).all()


@pytest.mark.parametrize("mode", masked.AGGREGATIONS)
def test_aggregate_micro_batches_with_global_counts_give_the_whole_batch_gradient(mode):
    gen = torch.Generator().manual_seed(1)
    b, t = 6, 5
    w = torch.randn(b, t, generator=gen, dtype=torch.float64)
    theta = torch.randn(b, t, generator=gen, dtype=torch.float64)
    mask = torch.rand(b, t, generator=gen) < 0.7

    def per_token(p: torch.Tensor, rows: slice) -> torch.Tensor:
        return torch.sin(p) * w[rows] + p.square()  # any non-linear per-token loss

    p = theta.clone().requires_grad_(True)
    masked.aggregate(per_token(p, slice(None)), mask, mode).backward()
    whole = p.grad.clone()
    counts = {"num_tokens": mask.sum()} if mode == "token-mean" else {"num_sequences": b}
    p = theta.clone().requires_grad_(True)
    total = 0.0
    for rows in (slice(0, 1), slice(1, 4), slice(4, 6)):  # micro-batches of unequal size
        kw = {"max_length": t} if mode == "seq-mean-token-sum-norm" else {}
        part = masked.aggregate(per_token(p[rows], rows), mask[rows], mode, **counts, **kw)
        part.backward()
        total += part.item()
    torch.testing.assert_close(p.grad, whole, rtol=1e-12, atol=1e-15)
    assert total == pytest.approx(
        masked.aggregate(per_token(theta, slice(None)), mask, mode).item(), rel=1e-12
    )
    # without global counts the split changes the gradient (the test can fail)
    if mode != "seq-mean-token-sum":
        p = theta.clone().requires_grad_(True)
        for rows in (slice(0, 1), slice(1, 4), slice(4, 6)):
            masked.aggregate(per_token(p[rows], rows), mask[rows], mode).backward()
        assert not torch.allclose(p.grad, whole)


def test_aggregate_rejects_bad_mode_and_counts():
    with pytest.raises(ValueError, match="mode must be one of 'token-mean', 'seq-mean-token-mean'"):
        masked.aggregate(X, M, "dapo")
    for bad in (0, -1.0, float("inf"), float("nan"), torch.tensor(0.0), torch.tensor(float("inf"))):
        with pytest.raises(ValueError, match="num_tokens must be positive and finite"):
            masked.aggregate(X, M, "token-mean", num_tokens=bad)
        with pytest.raises(ValueError, match="num_sequences must be positive and finite"):
            masked.aggregate(X, M, "seq-mean-token-sum", num_sequences=bad)
    with pytest.raises(TypeError, match="num_tokens"):
        masked.aggregate(X, M, "token-mean", num_tokens=True)
    with pytest.raises(TypeError, match="num_tokens"):
        masked.token_mean(X, M, num_tokens=True)
    with pytest.raises(ValueError, match="num_tokens"):
        masked.token_mean(X, M, num_tokens=float("inf"))
    with pytest.raises(ValueError, match="num_tokens must be a scalar"):
        masked.aggregate(X, M, "token-mean", num_tokens=torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="num_tokens is only used by mode='token-mean'"):
        masked.aggregate(X, M, "seq-mean-token-mean", num_tokens=3)
    with pytest.raises(ValueError, match="num_sequences is not used"):
        masked.aggregate(X, M, "token-mean", num_sequences=3)
    with pytest.raises(ValueError, match="max_length is only used"):
        masked.aggregate(X, M, "token-mean", max_length=3)
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="max_length must be an int >= 1"):
            masked.aggregate(X, M, "seq-mean-token-sum-norm", max_length=bad)
    with pytest.raises(TypeError, match="mask"):
        masked.aggregate(X, M.long(), "token-mean")
    with pytest.raises(ValueError, match="per_token_loss"):
        masked.aggregate(X[0], M[0], "token-mean")


def test_whiten_survives_values_whose_squares_overflow():
    x = torch.tensor([1e20, -1e20, 0.0])
    w = masked.masked_whiten(x)
    torch.testing.assert_close(w, torch.tensor([1.0, -1.0, 0.0]), rtol=1e-6, atol=1e-6)  # stdev = 1e20
    const = masked.masked_whiten(torch.full((4,), 3.0), eps=0.0)
    assert (const == 0).all()
    tiny = torch.tensor([1e-30, -1e-30, 0.0], dtype=torch.float64)
    torch.testing.assert_close(
        masked.masked_whiten(tiny, eps=0.0), torch.tensor([1.0, -1.0, 0.0], dtype=torch.float64)
    )
    g = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    m = torch.rand(3, 4) < 0.8
    m[0, 0] = m[0, 1] = True
    assert torch.autograd.gradcheck(lambda a: masked.masked_whiten(a, m), (g,))
