"""The online-RL frontier on the policy-gradient interface (issue 12): behaviour-policy correction (TIS,
MIS/IcePop, sequence variants), mismatch metrics, dual clip with clip-higher, INTELLECT-2's δ, SAPO, OPSM,
the top-ρ high-entropy mask and the entropy bonus. Oracles: Python-float loops, exact enumeration over a
categorical distribution, float64 gradcheck, and TRL 1.16's own ``GRPOTrainer._compute_loss``."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

import prefopt as po
from prefopt import rl
from prefopt.losses.policy_gradient import (
    CORRECTIONS,
    LOG_RATIO_CLAMP,
    behaviour_weights,
    cispo,
    grpo,
    gspo,
    gspo_token,
    off_policy_sequence_mask,
    ppo,
    sapo,
)
from prefopt.masked import aggregate

F64 = torch.float64


def batch(seed: int, b: int = 5, t: int = 6, spread: float = 0.5, adv_per_token: bool = False):
    gen = torch.Generator().manual_seed(seed)
    logp = -torch.rand(b, t, generator=gen, dtype=F64) * 2
    old = logp + spread * torch.randn(b, t, generator=gen, dtype=F64)
    samp = old + spread * torch.randn(b, t, generator=gen, dtype=F64)
    ref = logp + 0.5 * torch.randn(b, t, generator=gen, dtype=F64)
    adv = (
        torch.randn(b, t, generator=gen, dtype=F64)
        if adv_per_token
        else torch.randn(b, generator=gen, dtype=F64)
    )
    mask = torch.rand(b, t, generator=gen) < 0.7
    mask[:, 0] = True
    return logp, old, samp, ref, adv, mask


def grad_of(fn, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().clone().requires_grad_(True)
    y = fn(x)
    y.backward()
    return y.detach(), x.grad


def weights_oracle(old, samp, mask, correction, low, high):
    """Python-float loop of the table in ``behaviour_weights``'s docstring."""
    b, t = old.shape
    lo = -math.inf if low is None else low
    hi = math.inf if high is None else high
    w = [[0.0] * t for _ in range(b)]
    kept = [[False] * t for _ in range(b)]
    for i in range(b):
        idx = [j for j in range(t) if mask[i, j]]
        d = {j: float(old[i, j]) - float(samp[i, j]) for j in idx}
        big = math.exp(sum(d.values())) if idx else 1.0
        geo = math.exp(sum(d.values()) / len(idx)) if idx else 1.0
        for j in idx:
            u = math.exp(d[j])
            if correction == "token_truncate":
                w[i][j], kept[i][j] = min(max(u, lo), hi), True
            elif correction == "token_mask":
                kept[i][j] = lo <= u <= hi
                w[i][j] = u if kept[i][j] else 0.0
            elif correction == "sequence_truncate":
                w[i][j], kept[i][j] = min(max(big, lo), hi), True
            elif correction == "sequence_mask":
                kept[i][j] = lo <= big <= hi
                w[i][j] = big if kept[i][j] else 0.0
            else:  # geometric_mask
                kept[i][j] = lo <= geo <= hi
                w[i][j] = u if kept[i][j] else 0.0
    return torch.tensor(w, dtype=F64), torch.tensor(kept)


# ----------------------------------------------------------------------------------------------------------
# behaviour_weights
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("correction", CORRECTIONS)
@pytest.mark.parametrize(("low", "high"), [(None, 2.0), (0.5, 5.0), (0.8, 1.25), (None, None)])
def test_behaviour_weights_match_loop_oracle(correction, low, high):
    _, old, samp, _, _, mask = batch(1, b=8, t=5, spread=0.3)
    w, kept = behaviour_weights(old, samp, mask, correction=correction, low=low, high=high)
    w_ref, kept_ref = weights_oracle(old, samp, mask, correction, low, high)
    assert torch.equal(kept, kept_ref)
    torch.testing.assert_close(w, w_ref, rtol=1e-12, atol=0)
    assert not w.requires_grad and w.shape == mask.shape
    if (low, high) == (0.8, 1.25):  # the bounds bite in every mode: some tokens truncated or dropped
        u = torch.exp(old - samp)[mask]
        if correction == "token_mask":
            assert 0 < int(kept[mask].sum()) < int(mask.sum())
        if correction == "token_truncate":
            assert ((u < 0.8) | (u > 1.25)).any()


@pytest.mark.parametrize("correction", CORRECTIONS)
@pytest.mark.parametrize(("low", "high"), [(None, 2.0), (1.0, 1.0), (0.0, None), (None, None)])
def test_sampler_equal_to_old_gives_weight_exactly_one(correction, low, high):
    _, old, _, _, _, mask = batch(2)
    w, kept = behaviour_weights(old, old.clone(), mask, correction=correction, low=low, high=high)
    assert torch.equal(kept, mask)
    assert (w[mask] == 1).all() and (w[~mask] == 0).all()


def test_inside_the_bounds_truncate_mask_and_raw_is_agree():
    """[R] Ratios all inside the bounds: truncation = masking = untruncated IS (token and sequence)."""
    _, old, samp, _, _, mask = batch(3, spread=0.01)
    raw_token, _ = behaviour_weights(old, samp, mask, correction="token_mask", low=None, high=None)
    raw_seq, _ = behaviour_weights(old, samp, mask, correction="sequence_mask", low=None, high=None)
    for level, raw in (("token", raw_token), ("sequence", raw_seq)):
        for mode in ("truncate", "mask"):
            w, _ = behaviour_weights(old, samp, mask, correction=f"{level}_{mode}", low=0.5, high=2.0)
            torch.testing.assert_close(w, raw, rtol=0, atol=0)
    # [R] a constant per-token ratio u0 over L tokens: U = u0^L but G = u0 (the same bound, very different strictness)
    mask = torch.ones(1, 50, dtype=torch.bool)
    old = torch.full((1, 50), math.log(1.02), dtype=F64)
    samp = torch.zeros(1, 50, dtype=F64)
    seq, _ = behaviour_weights(old, samp, mask, correction="sequence_mask", low=None, high=None)
    assert math.isclose(float(seq[0, 0]), 1.02**50, rel_tol=1e-12)
    _, kept_geo = behaviour_weights(old, samp, mask, correction="geometric_mask", low=0.95, high=1.05)
    _, kept_seq = behaviour_weights(old, samp, mask, correction="sequence_mask", low=0.95, high=1.05)
    assert kept_geo.all() and not kept_seq.any()


def test_untruncated_importance_weights_are_unbiased_by_exact_enumeration():
    """[R] One-token LM, categorical sampler μ = (1/2, 1/4, 1/4): a batch holding each token in proportion
    to μ makes token means exact expectations. E_μ[u·f] = E_old[f], E_μ[u] = 1; truncation biases low."""
    mu = torch.tensor([0.5, 0.25, 0.25], dtype=F64)
    p_old = torch.tensor([0.2, 0.3, 0.5], dtype=F64)
    f = torch.tensor([1.0, -2.0, 3.0], dtype=F64)
    tokens = torch.tensor([0, 0, 1, 2])  # counts 2, 1, 1 ∝ μ
    old = p_old.log()[tokens].unsqueeze(1)
    samp = mu.log()[tokens].unsqueeze(1)
    mask = torch.ones(4, 1, dtype=torch.bool)
    u, _ = behaviour_weights(old, samp, mask, correction="token_mask", low=None, high=None)
    torch.testing.assert_close((u.squeeze(1) * f[tokens]).mean(), (p_old * f).sum(), rtol=1e-14, atol=0)
    torch.testing.assert_close(u.mean(), torch.tensor(1.0, dtype=F64), rtol=1e-14, atol=0)
    w, _ = behaviour_weights(old, samp, mask, correction="token_truncate", high=1.5)  # u = 2 for token 2
    assert float(w.mean()) < 1.0


def test_behaviour_weights_extremes_nan_and_masked_garbage():
    _, old, samp, _, _, mask = batch(4)
    base = {c: behaviour_weights(old, samp, mask, correction=c, low=0.5, high=2.0)[0] for c in CORRECTIONS}
    for fill in (float("nan"), float("inf"), -float("inf")):
        dirty_old, dirty_samp = old.clone(), samp.clone()
        dirty_old[~mask] = fill
        dirty_samp[~mask] = fill
        for c in CORRECTIONS:
            w, _ = behaviour_weights(dirty_old, dirty_samp, mask, correction=c, low=0.5, high=2.0)
            torch.testing.assert_close(w, base[c], rtol=0, atol=0)
    # a NaN sampler log-prob on a valid token counts as Δ = 0 (TRL)
    nan_samp = samp.clone()
    nan_samp[0, 0] = float("nan")
    w, kept = behaviour_weights(old, nan_samp, mask, correction="token_mask", low=None, high=None)
    assert w[0, 0] == 1.0 and kept[0, 0]
    # |Δ| up to 1e4 (and sequence sums far beyond): finite weights, the exponent clamped at ±20
    huge = old.clone()
    huge[mask] += torch.tensor([1e4, -1e4], dtype=F64).repeat(int(mask.sum()))[: int(mask.sum())]
    for c in CORRECTIONS:
        for low, high in ((None, None), (0.0, None), (0.5, 2.0)):
            w, _ = behaviour_weights(huge, samp, mask, correction=c, low=low, high=high)
            assert torch.isfinite(w).all() and (w <= math.exp(LOG_RATIO_CLAMP) * (1 + 1e-12)).all()


def test_behaviour_weights_bad_input():
    z = torch.zeros(2, 3)
    m = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="correction"):
        behaviour_weights(z, z, m, correction="token")
    with pytest.raises(ValueError, match="low"):
        behaviour_weights(z, z, m, low=1.5)
    with pytest.raises(ValueError, match="high"):
        behaviour_weights(z, z, m, high=0.5)
    with pytest.raises(ValueError, match="sampler_logp"):
        behaviour_weights(z, torch.zeros(2, 4), m)
    with pytest.raises(TypeError, match="mask"):
        behaviour_weights(z, z, m.long())
    with pytest.raises(ValueError, match="grpo: hyperparameter correction_max"):
        po.get_loss("grpo", correction_max=0.9)
    with pytest.raises(ValueError, match="ppo: correction"):
        po.get_loss("ppo", correction="tis")
    with pytest.raises(ValueError, match="sapo: hyperparameter opsm_threshold"):
        po.get_loss("sapo", opsm_threshold=float("nan"))


# ----------------------------------------------------------------------------------------------------------
# the correction inside the losses
# ----------------------------------------------------------------------------------------------------------

CORRECTED = ["grpo", "gspo", "gspo_token", "cispo", "sapo", "ppo"]


def call(name: str, logp, old, adv, mask, ref, beta: float = 0.1, **kw):
    if name == "ppo":
        return ppo(logp, old, adv, mask, dual_clip=3.0, **kw)
    fn = {"grpo": grpo, "gspo": gspo, "gspo_token": gspo_token, "cispo": cispo, "sapo": sapo}[name]
    if name == "gspo":
        adv = adv if adv.ndim == 1 else adv[:, 0]
    return fn(logp, old, adv, mask, ref_logp=ref, beta=beta, **kw)


@pytest.mark.parametrize("name", CORRECTED)
@pytest.mark.parametrize("correction", CORRECTIONS)
def test_sampler_equal_to_old_is_bitwise_the_plain_loss(name, correction):
    """The property of issue 12: sampler == old policy ⇒ every weight is 1 and the loss and gradient equal
    the uncorrected ones with 0 difference (also on-policy, sampler = logp.detach())."""
    logp, old, _, ref, adv, mask = batch(5)
    on_policy = logp.clone() if name == "ppo" else None  # ppo needs old_logp
    for old_in, samp in ((old, old.clone()), (on_policy, logp.clone())):
        plain = call(name, logp, old_in, adv, mask, ref)
        for low, high in ((None, 2.0), (0.5, 5.0)):
            kw = {"correction": correction, "correction_min": low, "correction_max": high}

            def fn(x, samp=samp, old_in=old_in, kw=kw):
                return aggregate(
                    call(name, x, old_in, adv, mask, ref, sampler_logp=samp, **kw).loss, mask, "token-mean"
                )

            v, g = grad_of(fn, logp)
            v0, g0 = grad_of(
                lambda x, old_in=old_in: aggregate(
                    call(name, x, old_in, adv, mask, ref).loss, mask, "token-mean"
                ),
                logp,
            )
            out = call(name, logp, old_in, adv, mask, ref, sampler_logp=samp, **kw)
            torch.testing.assert_close(out.loss, plain.loss, rtol=0, atol=0)
            torch.testing.assert_close(v, v0, rtol=0, atol=0)
            torch.testing.assert_close(g, g0, rtol=0, atol=0)
            assert (out.metrics["is_weight"][mask] == 1).all()


@pytest.mark.parametrize("name", CORRECTED)
@pytest.mark.parametrize("correction", CORRECTIONS)
def test_corrected_loss_is_weight_times_policy_term_plus_kl(name, correction):
    """Oracle: l = W·pg (0 where dropped) + β·k3 with W from the loop oracle; the gradient likewise (W is a
    constant), so a dropped token keeps only the KL term's gradient."""
    logp, old, samp, ref, adv, mask = batch(6, spread=0.4)
    lo, hi = (0.9, 1.1) if correction == "geometric_mask" else (0.7, 1.5)  # some kept, some dropped
    w_ref, kept_ref = weights_oracle(old, samp, mask, correction, lo, hi)
    kw = {"correction": correction, "correction_min": lo, "correction_max": hi}
    lp = logp.clone().requires_grad_(True)
    out = call(name, lp, old, adv, mask, ref, sampler_logp=samp, **kw)
    out.loss.sum().backward()
    lp0 = logp.clone().requires_grad_(True)
    with_kl = call(name, lp0, old, adv, mask, ref)
    pg = call(name, lp0, old, adv, mask, ref, beta=0.0)
    kl_term = with_kl.loss - pg.loss
    expected = torch.where(mask, w_ref * pg.loss, 0.0) + kl_term
    torch.testing.assert_close(out.loss, expected.detach(), rtol=1e-12, atol=1e-14)
    expected.sum().backward()
    torch.testing.assert_close(lp.grad, lp0.grad, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(out.metrics["is_weight"], w_ref, rtol=1e-12, atol=0)
    assert torch.equal(out.metrics["policy_kept"].bool(), kept_ref)
    if correction.endswith("mask"):
        dropped = mask & ~kept_ref
        assert dropped.any()
        (kl_grad,) = torch.autograd.grad(
            call(name, lp0, old, adv, mask, ref).loss.sum()
            - call(name, lp0, old, adv, mask, ref, beta=0.0).loss.sum(),
            lp0,
            allow_unused=name == "ppo",
        )
        kl_grad = torch.zeros_like(logp) if kl_grad is None else kl_grad
        torch.testing.assert_close(lp.grad[dropped], kl_grad[dropped], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", CORRECTED)
def test_correction_extreme_sampler_and_masked_garbage(name):
    logp, old, samp, ref, adv, mask = batch(7)
    clean = call(
        name, logp, old, adv, mask, ref, sampler_logp=samp, correction="sequence_mask", correction_max=None
    )
    dirty = samp.clone()
    dirty[~mask] = float("nan")
    out = call(
        name, logp, old, adv, mask, ref, sampler_logp=dirty, correction="sequence_mask", correction_max=None
    )
    torch.testing.assert_close(out.loss, clean.loss, rtol=0, atol=0)
    for shift in (1e4, -1e4):
        lp = logp.clone().requires_grad_(True)
        for c in CORRECTIONS:
            o = call(
                name, lp, old, adv, mask, ref, sampler_logp=old + shift, correction=c, correction_max=None
            )
            aggregate(o.loss, mask, "token-mean").backward()
            assert torch.isfinite(o.loss).all() and torch.isfinite(lp.grad).all()
            assert (lp.grad[~mask] == 0).all()


@pytest.mark.parametrize("name", ["grpo", "gspo", "sapo", "ppo"])
@pytest.mark.parametrize("correction", CORRECTIONS)
def test_corrected_loss_gradcheck(name, correction):
    """With a fixed ``old_logp`` the weight W is a constant of ``logp``, so the value's derivative is the
    gradient (float64 finite differences)."""
    logp, old, samp, ref, adv, mask = batch(8, b=3, t=4, spread=0.2)
    lp = logp.clone().requires_grad_(True)
    kw = {"correction": correction, "correction_min": 0.8, "correction_max": 1.2}
    assert torch.autograd.gradcheck(
        lambda x: call(name, x, old, adv, mask, ref, sampler_logp=samp, **kw).loss, (lp,)
    )


# ----------------------------------------------------------------------------------------------------------
# mismatch metrics
# ----------------------------------------------------------------------------------------------------------


def test_mismatch_metrics_match_loop_oracle():
    _, old, samp, _, _, mask = batch(9, spread=0.3)
    mask[4] = False  # a row with no token: left out of the sequence means
    m = rl.mismatch_metrics(old, samp, mask)
    toks, seqs = [], []
    for i in range(old.shape[0]):
        idx = [j for j in range(old.shape[1]) if mask[i, j]]
        ds = [float(old[i, j] - samp[i, j]) for j in idx]
        toks += ds
        if idx:
            mo = sum(float(old[i, j]) for j in idx) / len(idx)
            ms = sum(float(samp[i, j]) for j in idx) / len(idx)
            seqs.append((sum(ds), mo, ms))
    n, s = len(toks), len(seqs)
    expected = {
        "k1": sum(-d for d in toks) / n,
        "k3": sum(math.exp(d) - 1 - d for d in toks) / n,
        "chi2_token": sum(math.exp(2 * d) for d in toks) / n - 1,
        "chi2_seq": sum(math.exp(2 * d) for d, _, _ in seqs) / s - 1,
        "training_ppl": sum(math.exp(-mo) for _, mo, _ in seqs) / s,
        "rollout_ppl": sum(math.exp(-ms) for _, _, ms in seqs) / s,
        "log_ppl_diff": sum(ms - mo for _, mo, ms in seqs) / s,
        "ppl_ratio": sum(math.exp(ms - mo) for _, mo, ms in seqs) / s,
        "abs_diff_mean": sum(abs(d) for d in toks) / n,
        "abs_diff_max": max(abs(d) for d in toks),
    }
    assert set(m) == set(expected)
    for k, v in expected.items():
        assert m[k].ndim == 0 and not m[k].requires_grad
        assert math.isclose(float(m[k]), v, rel_tol=1e-12, abs_tol=1e-15), k


def test_mismatch_metrics_identical_zero_and_exact_expectations():
    _, old, _, _, _, mask = batch(10)
    same = rl.mismatch_metrics(old, old.clone(), mask)
    for k, v in same.items():
        if k in ("training_ppl", "rollout_ppl"):
            assert v == same["training_ppl"] and v > 1
        elif k == "ppl_ratio":
            assert v == 1.0
        else:
            assert v == 0.0, k
    # [R] sampler μ = (1/2, 1/4, 1/4): E_μ[k1] = E_μ[k3] = KL(μ‖π_old), χ² = Σ π_old²/μ − 1 (exact enumeration)
    mu = torch.tensor([0.5, 0.25, 0.25], dtype=F64)
    p_old = torch.tensor([0.2, 0.3, 0.5], dtype=F64)
    tokens = torch.tensor([0, 0, 1, 2])
    m = rl.mismatch_metrics(
        p_old.log()[tokens].unsqueeze(1), mu.log()[tokens].unsqueeze(1), torch.ones(4, 1, dtype=torch.bool)
    )
    kl = float((mu * (mu / p_old).log()).sum())
    assert math.isclose(float(m["k1"]), kl, rel_tol=1e-13)
    assert math.isclose(float(m["k3"]), kl, rel_tol=1e-13)
    assert math.isclose(float(m["chi2_token"]), float((p_old**2 / mu).sum() - 1), rel_tol=1e-13)


def test_mismatch_metrics_extremes_and_bad_input():
    _, old, samp, _, _, mask = batch(11)
    dirty = samp.clone()
    dirty[~mask] = float("nan")
    clean = rl.mismatch_metrics(old, samp, mask)
    for k, v in rl.mismatch_metrics(old, dirty, mask).items():
        assert v == clean[k], k
    for shift in (1e4, -1e4):
        for k, v in rl.mismatch_metrics(old, old + shift, mask).items():
            assert torch.isfinite(v), k
    none = rl.mismatch_metrics(old, samp, torch.zeros_like(mask))
    assert all(v == 0 for v in none.values())
    assert rl.mismatch_metrics(old.float(), samp.half(), mask)["k1"].dtype == torch.float32
    with pytest.raises(ValueError, match="sampler_logp"):
        rl.mismatch_metrics(old, samp[:, :2], mask)
    with pytest.raises(TypeError, match="mask"):
        rl.mismatch_metrics(old, samp, mask.long())


# ----------------------------------------------------------------------------------------------------------
# dual clip with clip-higher, INTELLECT-2's δ
# ----------------------------------------------------------------------------------------------------------


def ratio_grid(eps_high: float):
    """Ratios from 0.01 to 10 (every regime of the band and the caps) for both signs of A, one per token."""
    r = torch.cat(
        [torch.logspace(-2, 1, 61, dtype=F64), torch.tensor([0.79, 0.81, 1.0, 1 + eps_high + 1e-3])]
    )
    n = r.numel()
    logp = torch.zeros(2, n, dtype=F64)
    old = -r.log().repeat(2, 1)
    adv = torch.tensor([1.5, -0.7], dtype=F64)
    return logp, old, adv, torch.ones(2, n, dtype=torch.bool), r


def clip_oracle(
    r: float, a: float, lo: float, hi: float, *, dual: float | None = None, delta: float | None = None
):
    """(value, d value / d log r) by hand: TRL's two-sided form −min(min(r,δ)A, clip(r)A), or PPO's
    max(−rA, −clip(r)A) followed by min(·, −cA) for A < 0 (dual clip)."""
    clip = min(max(r, lo), hi)
    d_clip = r if lo <= r <= hi else 0.0
    c1, d_c1 = (r, r) if delta is None or r <= delta else (delta, 0.0)
    v1, v2 = -c1 * a, -clip * a
    value, grad = (v1, -d_c1 * a) if v1 >= v2 else (v2, -d_clip * a)
    if dual is not None and a < 0 and value > -dual * a:
        value, grad = -dual * a, 0.0
    return value, grad


@pytest.mark.parametrize("eps_high", [0.2, 0.28])
@pytest.mark.parametrize(
    ("kind", "cap"), [("dual", 3.0), ("dual", 1.1), ("delta", 4.0), ("delta", 1.1), (None, None)]
)
def test_grpo_caps_match_hand_oracle_on_a_ratio_grid(eps_high, kind, cap):
    logp, old, adv, mask, r = ratio_grid(eps_high)
    kw = {} if kind is None else {"dual_clip" if kind == "dual" else "delta": cap}
    x = logp.clone().requires_grad_(True)
    out = grpo(x, old, adv, mask, epsilon_low=0.2, epsilon_high=eps_high, **kw)
    out.loss.sum().backward()
    for i in range(2):
        for j in range(r.numel()):
            v, g = clip_oracle(
                float(r[j]),
                float(adv[i]),
                0.8,
                1 + eps_high,
                dual=cap if kind == "dual" else None,
                delta=cap if kind == "delta" else None,
            )
            assert math.isclose(float(out.loss.detach()[i, j]), v, rel_tol=1e-12, abs_tol=1e-15), (i, j)
            assert math.isclose(float(x.grad[i, j]), g, rel_tol=1e-12, abs_tol=1e-15), (i, j)


@pytest.mark.parametrize("eps_high", [0.2, 0.28])
@pytest.mark.parametrize("cap", [1.28, 1.5, 3.0, 4.0])
def test_delta_equals_dual_clip_when_delta_is_above_the_band(eps_high, cap):
    """[R] δ ≥ 1 + ε_high ⇒ INTELLECT-2's δ and the dual clip c = δ agree in value and gradient, for every r
    and both signs of A; a negative-advantage loss stays ≤ c|A| with zero gradient as r → ∞."""
    logp, old, adv, mask, _ = ratio_grid(eps_high)
    v1, g1 = grad_of(lambda x: grpo(x, old, adv, mask, epsilon_high=eps_high, delta=cap).loss.sum(), logp)
    v2, g2 = grad_of(lambda x: grpo(x, old, adv, mask, epsilon_high=eps_high, dual_clip=cap).loss.sum(), logp)
    torch.testing.assert_close(v1, v2, rtol=0, atol=0)
    torch.testing.assert_close(g1, g2, rtol=0, atol=0)
    huge = logp - 1e4  # old far below: r = e^20 after the clamp
    out = grpo(logp.clone().requires_grad_(True), huge, adv, mask, epsilon_high=eps_high, delta=cap)
    assert (out.loss[1] <= cap * 0.7 + 1e-12).all() and (out.metrics["dual_clip"][1] == 1).all()


def test_delta_below_the_band_freezes_positive_advantages_early():
    """[R] δ < 1 + ε_high: for A > 0 and δ < r < 1 + ε_high the δ form has gradient 0, the dual clip does not."""
    r = torch.tensor([1.15, 1.18], dtype=F64)
    logp = torch.zeros(1, 2, dtype=F64)
    old = -r.log().unsqueeze(0)
    adv = torch.ones(1, dtype=F64)
    mask = torch.ones(1, 2, dtype=torch.bool)
    _, g_delta = grad_of(lambda x: grpo(x, old, adv, mask, epsilon_high=0.28, delta=1.1).loss.sum(), logp)
    _, g_dual = grad_of(lambda x: grpo(x, old, adv, mask, epsilon_high=0.28, dual_clip=1.1).loss.sum(), logp)
    assert (g_delta == 0).all()
    torch.testing.assert_close(g_dual, -r.unsqueeze(0), rtol=1e-12, atol=0)


def test_ppo_clip_high_with_dual_clip_equals_grpo_policy_term():
    """ppo(clip, clip_high, dual_clip) without value/entropy terms is grpo(ε_low, ε_high, dual_clip): verl's
    vanilla loss (clip_ratio_low / high / c) from either function."""
    logp, old, _, _, adv, mask = batch(12, spread=0.6, adv_per_token=True)
    v1, g1 = grad_of(
        lambda x: aggregate(
            ppo(x, old, adv, mask, clip=0.2, clip_high=0.28, dual_clip=2.0).loss, mask, "token-mean"
        ),
        logp,
    )
    v2, g2 = grad_of(
        lambda x: aggregate(
            grpo(x, old, adv, mask, epsilon_low=0.2, epsilon_high=0.28, dual_clip=2.0).loss,
            mask,
            "token-mean",
        ),
        logp,
    )
    torch.testing.assert_close(v1, v2, rtol=0, atol=0)
    torch.testing.assert_close(g1, g2, rtol=0, atol=0)
    out = ppo(logp, old, adv, mask, clip=0.2, clip_high=0.28, dual_clip=2.0)
    assert out.metrics["dual_clip_frac"].sum() > 0 and out.metrics["clip_frac"].sum() > 0
    # clip_high=None is the symmetric clip, bitwise
    a = ppo(logp, old, adv, mask, clip=0.2).loss
    b = ppo(logp, old, adv, mask, clip=0.2, clip_high=0.2).loss
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_caps_bad_hyperparameters():
    with pytest.raises(ValueError, match="grpo: hyperparameter dual_clip"):
        po.get_loss("grpo", dual_clip=1.0)
    with pytest.raises(ValueError, match="grpo: hyperparameter delta"):
        po.get_loss("grpo", delta=0.5)
    with pytest.raises(ValueError, match="not both"):
        po.get_loss("grpo", delta=4.0, dual_clip=3.0)
    with pytest.raises(ValueError, match="ppo: hyperparameter clip_high"):
        po.get_loss("ppo", clip_high=-0.1)


# ----------------------------------------------------------------------------------------------------------
# SAPO
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tau", "r", "w"), [(1.0, 0.5, 0.470), (1.0, 2.0, 1.573), (3.0, 0.5, 0.298), (3.0, 2.0, 0.361)]
)
def test_sapo_gate_weights_hand_values(tau, r, w):
    """[R] gradient weight 4σ(1−σ)·r, σ = σ(τ(r−1)), against the 3-digit values and the exact formula."""
    logp = torch.zeros(1, 1, dtype=F64)
    old = torch.full((1, 1), -math.log(r), dtype=F64)
    adv = torch.ones(1, dtype=F64)
    mask = torch.ones(1, 1, dtype=torch.bool)
    _, g = grad_of(lambda x: sapo(x, old, adv, mask, tau_pos=tau).loss.sum(), logp)
    sig = 1 / (1 + math.exp(-tau * (r - 1)))
    assert math.isclose(-float(g), 4 * sig * (1 - sig) * r, rel_tol=1e-12)
    assert round(-float(g), 3) == w
    out = sapo(logp, old, adv, mask, tau_pos=tau)
    assert math.isclose(float(out.metrics["gate_weight"]), 4 * sig * (1 - sig) * r, rel_tol=1e-12)
    assert math.isclose(float(out.loss), -4 / tau * sig, rel_tol=1e-12)


def test_sapo_loop_oracle_on_policy_and_small_tau():
    logp, old, _, _, adv, mask = batch(13, spread=0.5, adv_per_token=True)
    adv[0, 1] = 0.0  # A = 0 takes τ_neg (no gradient either way)
    x = logp.clone().requires_grad_(True)
    out = sapo(x, old, adv, mask, tau_pos=0.7, tau_neg=1.3)
    out.loss.sum().backward()
    for i in range(logp.shape[0]):
        for j in range(logp.shape[1]):
            if not mask[i, j]:
                assert out.loss.detach()[i, j] == 0 and x.grad[i, j] == 0
                continue
            a = float(adv[i, j])
            tau = 0.7 if a > 0 else 1.3
            r = math.exp(float(logp[i, j] - old[i, j]))
            sig = 1 / (1 + math.exp(-tau * (r - 1)))
            assert math.isclose(
                float(out.loss.detach()[i, j]), -4 / tau * sig * a, rel_tol=1e-12, abs_tol=1e-15
            )
            assert math.isclose(
                float(x.grad[i, j]), -4 * sig * (1 - sig) * r * a, rel_tol=1e-12, abs_tol=1e-15
            )
    # on-policy: weight exactly 1 ⇒ GRPO's gradient; value −2A/τ
    _, g_sapo = grad_of(lambda x: aggregate(sapo(x, None, adv, mask).loss, mask, "seq-mean-token-mean"), logp)
    _, g_grpo = grad_of(lambda x: aggregate(grpo(x, None, adv, mask).loss, mask, "seq-mean-token-mean"), logp)
    torch.testing.assert_close(g_sapo, g_grpo, rtol=1e-15, atol=0)  # (4/τ)·τ/4: rounding only
    tau = torch.where(adv > 0, torch.tensor(1.0, dtype=F64), torch.tensor(1.05, dtype=F64))
    torch.testing.assert_close(
        sapo(logp, None, adv, mask).loss, torch.where(mask, -2 * adv / tau, 0.0), rtol=1e-15, atol=0
    )
    # τ → 0: the unclipped surrogate's gradient −r·A (relative error O(τ²))
    _, g_small = grad_of(lambda x: sapo(x, old, adv, mask, tau_pos=1e-6, tau_neg=1e-6).loss.sum(), logp)
    expected = torch.where(mask, -torch.exp(logp - old) * adv, 0.0)
    torch.testing.assert_close(g_small, expected, rtol=1e-10, atol=0)


def test_sapo_gradcheck_kl_and_bad_input():
    logp, old, _, ref, adv, mask = batch(14, b=3, t=4)
    lp = logp.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: sapo(x, old, adv, mask, ref_logp=ref, beta=0.1).loss, (lp,))
    with_kl = sapo(logp, old, adv, mask, ref_logp=ref, beta=0.1)
    torch.testing.assert_close(
        with_kl.loss - sapo(logp, old, adv, mask).loss,
        0.1 * grpo(logp, old, adv, mask, ref_logp=ref).metrics["kl"],
        rtol=1e-12,
        atol=1e-15,
    )
    z = torch.zeros(2, 3)
    m = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="ref_logp is required"):
        sapo(z, None, torch.zeros(2), m, beta=0.1)
    with pytest.raises(ValueError, match="sapo: hyperparameter tau_pos"):
        po.get_loss("sapo", tau_pos=0.0)
    with pytest.raises(ValueError, match="advantages"):
        sapo(z, None, torch.zeros(3), m)
    assert po.get_spec("sapo").family == "policy_gradient"


# ----------------------------------------------------------------------------------------------------------
# OPSM
# ----------------------------------------------------------------------------------------------------------


def test_off_policy_sequence_mask_loop_oracle_and_properties():
    logp, _, samp, _, adv, mask = batch(15, b=10, spread=0.8)
    for threshold in (-0.2, 0.0, 0.3):
        keep = off_policy_sequence_mask(logp, samp, adv, mask, threshold=threshold)
        for i in range(logp.shape[0]):
            idx = [j for j in range(logp.shape[1]) if mask[i, j]]
            kl = sum(float(samp[i, j] - logp[i, j]) for j in idx) / len(idx)
            drop = float(adv[i]) < 0 and kl > threshold
            assert keep[i].tolist() == [bool(mask[i, j]) and not drop for j in range(logp.shape[1])]
    assert torch.equal(off_policy_sequence_mask(logp, samp, adv, mask, threshold=math.inf), mask)
    pos = adv.abs()
    assert torch.equal(off_policy_sequence_mask(logp, samp - 100, pos, mask, threshold=0.0), mask)
    dropped = off_policy_sequence_mask(logp, samp, adv, mask, threshold=0.0)
    assert (~dropped & mask).any() and dropped.any()


def test_opsm_in_the_loss_drops_only_the_policy_term():
    logp, old, samp, ref, adv, mask = batch(16, b=10, spread=0.8)
    keep = off_policy_sequence_mask(logp, samp, adv, mask, threshold=0.0)
    for name in CORRECTED:
        lp = logp.clone().requires_grad_(True)
        with_opsm = call(
            name,
            lp,
            old,
            adv,
            mask,
            ref,
            policy_mask=None,
            opsm_threshold=0.0,
            sampler_logp=samp,
            correction_max=None,
        )
        v1, g1 = grad_of(
            lambda x, name=name: call(
                name, x, old, adv, mask, ref, opsm_threshold=0.0, sampler_logp=samp, correction_max=None
            ).loss.sum(),
            logp,
        )
        v2, g2 = grad_of(
            lambda x, name=name: call(
                name, x, old, adv, mask, ref, policy_mask=keep, sampler_logp=samp, correction_max=None
            ).loss.sum(),
            logp,
        )
        torch.testing.assert_close(v1, v2, rtol=0, atol=0)
        torch.testing.assert_close(g1, g2, rtol=0, atol=0)
        assert torch.equal(with_opsm.metrics["policy_kept"].bool(), keep)
    # without a sampler OPSM uses old_logp; on-policy (no old, no sampler) it keeps everything
    a = grpo(logp, old, adv, mask, opsm_threshold=0.0).metrics["policy_kept"].bool()
    assert torch.equal(a, off_policy_sequence_mask(logp, old, adv, mask, threshold=0.0))
    # on-policy the divergence is 0 (as TRL): δ ≥ 0 keeps everything, δ < 0 drops every A < 0 sequence
    assert torch.equal(grpo(logp, None, adv, mask, opsm_threshold=0.0).metrics["policy_kept"].bool(), mask)
    neg = grpo(logp, None, adv, mask, opsm_threshold=-1e-3).metrics["policy_kept"].bool()
    assert torch.equal(neg, mask & (adv >= 0).unsqueeze(1)) and (adv < 0).any()


def test_policy_mask_bad_input_and_opsm_bad_threshold():
    logp, old, _, _, adv, mask = batch(17)
    with pytest.raises(TypeError, match="policy_mask"):
        grpo(logp, old, adv, mask, policy_mask=mask.long())
    with pytest.raises(ValueError, match="policy_mask"):
        grpo(logp, old, adv, mask, policy_mask=mask[:, :2])
    with pytest.raises(ValueError, match="threshold"):
        off_policy_sequence_mask(logp, old, adv, mask, threshold=float("nan"))


# ----------------------------------------------------------------------------------------------------------
# high-entropy mask and entropy bonus
# ----------------------------------------------------------------------------------------------------------


def test_high_entropy_mask_quantile_oracle_and_edges():
    gen = torch.Generator().manual_seed(18)
    h = torch.rand(6, 7, generator=gen, dtype=F64) * 3
    mask = torch.rand(6, 7, generator=gen) < 0.7
    vals = sorted(float(v) for v in h[mask])
    n = len(vals)
    for rho in (0.0, 0.2, 0.5, 0.8, 1.0):
        pos = (1 - rho) * (n - 1)  # linear interpolation between order statistics
        k = math.floor(pos)
        thr = vals[k] + (pos - k) * (vals[min(k + 1, n - 1)] - vals[k])
        keep = rl.high_entropy_mask(h, mask, rho)
        assert torch.equal(keep, mask & (h >= thr)), rho
    assert torch.equal(rl.high_entropy_mask(h, mask, 1.0), mask)
    top = rl.high_entropy_mask(h, mask, 0.0)
    assert int(top.sum()) == 1 and float(h[top]) == vals[-1]
    tied = torch.ones(2, 3, dtype=F64)
    assert rl.high_entropy_mask(tied, torch.ones(2, 3, dtype=torch.bool), 0.0).all()  # ties all kept
    garbage = h.clone()
    garbage[~mask] = float("nan")
    assert torch.equal(rl.high_entropy_mask(garbage, mask, 0.3), rl.high_entropy_mask(h, mask, 0.3))
    assert not rl.high_entropy_mask(h, torch.zeros_like(mask), 0.3).any()
    with pytest.raises(ValueError, match="rho"):
        rl.high_entropy_mask(h, mask, 1.5)


def test_entropy_bonus_is_minus_coef_times_aggregate():
    gen = torch.Generator().manual_seed(19)
    h = (torch.rand(4, 5, generator=gen, dtype=F64) * 2).requires_grad_(True)
    mask = torch.rand(4, 5, generator=gen) < 0.7
    mask[:, 0] = True
    for mode in ("token-mean", "seq-mean-token-mean"):
        b = rl.entropy_bonus(h, mask, coef=0.01, mode=mode)
        torch.testing.assert_close(b, -0.01 * aggregate(h, mask, mode), rtol=0, atol=0)
    (g,) = torch.autograd.grad(rl.entropy_bonus(h, mask, coef=0.5), h)
    torch.testing.assert_close(
        g,
        torch.where(mask, torch.tensor(-0.5 / float(mask.sum()), dtype=F64), torch.tensor(0.0, dtype=F64)),
        rtol=1e-15,
        atol=0,
    )
    with pytest.raises(ValueError, match="coef"):
        rl.entropy_bonus(h, mask, coef=-1.0)


# ----------------------------------------------------------------------------------------------------------
# TRL 1.16 GRPOTrainer._compute_loss on a stub self: IS correction, δ, SAPO, OPSM, entropy mask and bonus
# ----------------------------------------------------------------------------------------------------------


def trl_loss(
    loss_type,
    logp,
    old,
    ref,
    adv,
    mask,
    *,
    beta=0.0,
    eps_low=0.2,
    eps_high=0.28,
    is_ratio=None,
    sampling=None,
    delta=None,
    opsm=None,
    top_q=1.0,
    entropies=None,
    ent_coef=0.0,
):
    grpo_trainer = pytest.importorskip("trl.trainer.grpo_trainer")
    cls = grpo_trainer.GRPOTrainer
    b, t = logp.shape
    ent = torch.zeros_like(logp) if entropies is None else entropies
    stub = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, ent, None),
        aux_loss_enabled=False,
        top_entropy_quantile=top_q,
        off_policy_mask_threshold=opsm,
        get_off_policy_mask=cls.get_off_policy_mask,
        importance_sampling_level="token",
        beta=beta,
        loss_type=loss_type,
        epsilon_low=eps_low,
        epsilon_high=eps_high,
        use_vllm=is_ratio is not None,
        vllm_importance_sampling_correction=is_ratio is not None,
        model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        accelerator=SimpleNamespace(
            num_processes=1,
            gather=lambda x: x,
            gather_for_metrics=lambda x: x,
            reduce=lambda x, reduction="sum": x,
            pad_across_processes=lambda x, dim=0, pad_index=0: x,
            sync_gradients=True,
        ),
        _entropy_bonus_enabled=ent_coef > 0,
        use_adaptive_entropy=False,
        entropy_coef=ent_coef,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        max_completion_length=t,
        args=SimpleNamespace(
            use_bias_correction_kl=False,
            delta=delta,
            steps_per_generation=1,
            sapo_temperature_pos=1.0,
            sapo_temperature_neg=1.05,
        ),
    )
    stub.get_high_entropy_mask = lambda e, m, q: cls.get_high_entropy_mask(stub, e, m, q)
    inputs = {
        "prompt_ids": torch.zeros(b, 1, dtype=torch.long),
        "prompt_mask": torch.ones(b, 1, dtype=torch.long),
        "completion_ids": torch.zeros(b, t, dtype=torch.long),
        "completion_mask": mask.long(),
        "advantages": adv,
        "old_per_token_logps": old,
        "ref_per_token_logps": ref,
        "num_items_in_batch": torch.tensor(float(mask.sum()), dtype=logp.dtype),
    }
    if is_ratio is not None:
        inputs["importance_sampling_ratio"] = is_ratio
    if sampling is not None:
        inputs["sampling_per_token_logps"] = sampling
    return cls._compute_loss(stub, None, inputs)


def trl_is_ratio(old, samp, mask, mode, cmin, cmax):
    """TRL's ``vllm_importance_sampling_*`` weight as its docs state it: exp of the masked (token or
    sequence-summed) difference, then clamped or zeroed outside [cmin, cmax]."""
    diff = (old - samp) * mask
    if mode.startswith("sequence"):
        diff = diff.sum(-1, keepdim=True)
    w = torch.exp(diff)
    lo = 0.0 if cmin is None else cmin
    if mode.endswith("truncate"):
        return w.clamp(min=cmin, max=cmax)
    return w.masked_fill((w < lo) | (w > cmax), 0.0)


TRL_AGG = {
    "grpo": "seq-mean-token-mean",
    "dapo": "token-mean",
    "sapo": "seq-mean-token-mean",
    "cispo": "token-mean",
}


# TRL builds its SAPO temperatures with torch.where(cond, 1.0, 1.05): a float32 tensor, so its τ_neg is
# float32(1.05) even for float64 inputs (a 4e-9 relative difference); the comparison uses that value
TRL_TAU_NEG = float(torch.tensor(1.05, dtype=torch.float32))


def ours(loss_type, lp, old, ref, adv, mask, beta, **kw):
    if loss_type == "sapo":
        out = sapo(lp, old, adv, mask, ref_logp=ref, beta=beta, tau_neg=TRL_TAU_NEG, **kw)
    elif loss_type == "cispo":
        out = cispo(lp, old, adv, mask, ref_logp=ref, beta=beta, max_weight=5.0, **kw)
    else:
        out = grpo(lp, old, adv, mask, ref_logp=ref, beta=beta, epsilon_low=0.2, epsilon_high=0.28, **kw)
    return aggregate(out.loss, mask, TRL_AGG[loss_type]), out


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "sapo", "cispo"])
@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_behaviour_correction_matches_trl(loss_type, mode, beta):
    """TRL multiplies the policy term by its (precomputed) vLLM importance weight before adding β·KL; ours
    from ``sampler_logp`` with the same mode and bounds: equal value and gradient."""
    logp0, old, samp, ref, adv, mask = batch(21, b=8, t=7, spread=0.25)
    cmin, cmax = (0.6, 1.6) if mode.startswith("token") else (0.5, 2.0)
    w = trl_is_ratio(old, samp, mask, mode, cmin, cmax)
    if mode.endswith("mask"):
        kept = (w > 0).expand(mask.shape) & mask
        assert kept.any() and (mask & ~kept).any()  # both regimes
    lp_trl = logp0.clone().requires_grad_(True)
    ref_loss = trl_loss(
        loss_type,
        lp_trl,
        old,
        ref,
        adv,
        mask,
        beta=beta,
        eps_high=5.0 if loss_type == "cispo" else 0.28,
        is_ratio=w,
    )
    ref_loss.backward()
    lp = logp0.clone().requires_grad_(True)
    val, _ = ours(
        loss_type,
        lp,
        old,
        ref,
        adv,
        mask,
        beta,
        sampler_logp=samp,
        correction=mode,
        correction_min=cmin,
        correction_max=cmax,
    )
    val.backward()
    torch.testing.assert_close(val, ref_loss.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(lp.grad, lp_trl.grad, rtol=1e-12, atol=1e-14)


@pytest.mark.slow
@pytest.mark.parametrize("delta", [1.1, 1.5, 4.0])
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_delta_matches_trl(delta, beta):
    logp0, old, _, ref, adv, mask = batch(22, b=8, t=7, spread=0.6)
    lp_trl = logp0.clone().requires_grad_(True)
    ref_loss = trl_loss("grpo", lp_trl, old, ref, adv, mask, beta=beta, delta=delta)
    ref_loss.backward()
    lp = logp0.clone().requires_grad_(True)
    val, out = ours("grpo", lp, old, ref, adv, mask, beta, delta=delta)
    val.backward()
    assert out.metrics["dual_clip"].sum() > 0  # some ratios beyond δ with A < 0
    torch.testing.assert_close(val, ref_loss.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(lp.grad, lp_trl.grad, rtol=1e-12, atol=1e-14)


@pytest.mark.slow
@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_sapo_matches_trl(beta):
    logp0, old, _, ref, adv, mask = batch(23, b=8, t=7, spread=0.6)
    lp_trl = logp0.clone().requires_grad_(True)
    ref_loss = trl_loss("sapo", lp_trl, old, ref, adv, mask, beta=beta)
    ref_loss.backward()
    lp = logp0.clone().requires_grad_(True)
    val, _ = ours("sapo", lp, old, ref, adv, mask, beta)
    val.backward()
    torch.testing.assert_close(val, ref_loss.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(lp.grad, lp_trl.grad, rtol=1e-12, atol=1e-14)


@pytest.mark.slow
@pytest.mark.parametrize("source", ["old", "sampler", "on_policy"])
@pytest.mark.parametrize("loss_type", ["grpo", "sapo"])
def test_opsm_matches_trl(source, loss_type):
    """TRL's ``off_policy_mask_threshold``: against the sampler's log-probs when given (here together with
    its token-truncated IS weight), else the old policy's, else sg(logp) (divergence 0)."""
    logp0, old, samp, ref, adv, mask = batch(24, b=10, t=7, spread=0.8)
    threshold = -0.05 if source == "on_policy" else 0.1
    behaviour = {"old": old, "sampler": samp, "on_policy": logp0}[source]
    keep = off_policy_sequence_mask(logp0, behaviour, adv, mask, threshold=threshold)
    assert (mask & ~keep).any() and keep.any()  # OPSM drops something and keeps something
    old_in = None if source == "on_policy" else old
    trl_kw: dict = {}
    kw: dict = {"opsm_threshold": threshold}
    if source == "sampler":
        trl_kw = {"sampling": samp, "is_ratio": trl_is_ratio(old, samp, mask, "token_truncate", None, 2.0)}
        kw["sampler_logp"] = samp  # default correction: token_truncate, C_max = 2
    lp_trl = logp0.clone().requires_grad_(True)
    ref_loss = trl_loss(loss_type, lp_trl, old_in, ref, adv, mask, beta=0.04, opsm=threshold, **trl_kw)
    ref_loss.backward()
    lp = logp0.clone().requires_grad_(True)
    val, out = ours(loss_type, lp, old_in, ref, adv, mask, 0.04, **kw)
    val.backward()
    assert torch.equal(out.metrics["policy_kept"].bool(), keep)
    torch.testing.assert_close(val, ref_loss.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(lp.grad, lp_trl.grad, rtol=1e-12, atol=1e-14)


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
@pytest.mark.parametrize(("top_q", "ent_coef"), [(0.2, 0.0), (1.0, 0.01), (0.3, 0.05)])
def test_entropy_mask_and_bonus_match_trl(loss_type, top_q, ent_coef):
    """TRL's ``top_entropy_quantile`` and ``entropy_coef``: ``policy_mask=high_entropy_mask(H, mask, ρ)``,
    then ``+ entropy_bonus(H, mask & keep, coef=c)`` (a token mean whatever the loss type). float32, as TRL
    takes its quantile in float32."""
    logp0, old, _, ref, adv, mask = batch(25, b=8, t=7, spread=0.6)
    logp0, old, ref, adv = logp0.float(), old.float(), ref.float(), adv.float()
    gen = torch.Generator().manual_seed(26)
    h0 = torch.rand(8, 7, generator=gen) * 3
    lp_trl, h_trl = logp0.clone().requires_grad_(True), h0.clone().requires_grad_(True)
    ref_loss = trl_loss(
        loss_type, lp_trl, old, ref, adv, mask, beta=0.04, top_q=top_q, entropies=h_trl, ent_coef=ent_coef
    )
    ref_loss.backward()
    lp, h = logp0.clone().requires_grad_(True), h0.clone().requires_grad_(True)
    keep = rl.high_entropy_mask(h, mask, top_q)
    if top_q < 1:
        assert keep.any() and (mask & ~keep).any()
    val, _ = ours(loss_type, lp, old, ref, adv, mask, 0.04, policy_mask=keep)
    if ent_coef > 0:
        val = val + rl.entropy_bonus(h, mask & keep, coef=ent_coef)
    val.backward()
    torch.testing.assert_close(val, ref_loss.detach(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(lp.grad, lp_trl.grad, rtol=1e-6, atol=1e-7)
    if ent_coef > 0:
        torch.testing.assert_close(h.grad, h_trl.grad, rtol=1e-6, atol=1e-8)
