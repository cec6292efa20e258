"""WPO, LD-DPO, AlphaPO and TDPO (``prefopt.losses.weighted``): oracles, exact properties, gradchecks and
value-for-value / gradient-for-gradient matches with TRL 1.16's own code (``DPOTrainer._compute_loss`` on a
stub trainer whose stub model runs TRL's chunked LM-head kernel; ``CPOTrainer.cpo_loss`` on a stub)."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import torch.nn.functional as F

from prefopt.losses.margin import dpo, ipo
from prefopt.losses.reference_free import simpo
from prefopt.losses.weighted import (
    alpha_reward,
    alphapo,
    ld_dpo,
    ld_pair_logps,
    log_sum_sq_probs,
    tdpo,
    token_kl,
    wpo,
    wpo_weights,
)
from prefopt.registry import available_losses, get_loss
from prefopt.types import PairLogps

F64 = torch.float64


def _pairs(b: int, seed: int, *, dtype: torch.dtype = F64, grad: bool = False) -> PairLogps:
    g = torch.Generator().manual_seed(seed)
    t = [-(torch.rand(b, generator=g, dtype=dtype) * 20 + 1) for _ in range(4)]
    if grad:
        t[0].requires_grad_(True)
        t[1].requires_grad_(True)
    lens = torch.randint(1, 12, (2, b), generator=g)
    return PairLogps(t[0], t[1], t[2], t[3], lens[0], lens[1])


def _token_batch(b: int, t: int, seed: int, *, dtype: torch.dtype = F64) -> tuple[torch.Tensor, torch.Tensor]:
    """(2b, t) per-token log-probs and a ragged completion mask (every row non-empty; a masked prefix)."""
    g = torch.Generator().manual_seed(seed)
    x = -torch.rand(2 * b, t, generator=g, dtype=dtype) * 3
    start = torch.randint(0, 2, (2 * b, 1), generator=g)
    stop = torch.randint(2, t + 1, (2 * b, 1), generator=g)
    pos = torch.arange(t)[None]
    return x, (pos >= start) & (pos < stop)


def test_registered_family_and_defaults() -> None:
    assert set(available_losses("weighted")) == {"wpo", "ld_dpo", "alphapo", "tdpo"}
    assert get_loss("wpo").hparams == {"base": "dpo", "base_kwargs": None, "clamp": None}
    assert get_loss("ld_dpo").hparams == {"beta": 0.1, "ld_alpha": 0.5}
    assert get_loss("alphapo").hparams == {"beta": 2.5, "alpha": 0.25, "gamma": 0.1, "label_smoothing": 0.0}
    assert get_loss("tdpo").hparams == {"beta": 0.1, "alpha": 0.5, "variant": "tdpo2"}


# ----------------------------------------------------------------------------------------------------------
# WPO
# ----------------------------------------------------------------------------------------------------------


def test_log_sum_sq_probs_matches_loop() -> None:
    z = torch.randn(3, 4, 7, dtype=F64) * 3
    out = log_sum_sq_probs(z)
    for idx in [(0, 0), (1, 2), (2, 3)]:
        p = [math.exp(v) for v in z[idx].tolist()]
        s = sum(p)
        assert float(out[idx]) == pytest.approx(math.log(sum((v / s) ** 2 for v in p)), rel=1e-13)
    assert not out.requires_grad
    assert bool(torch.isfinite(log_sum_sq_probs(torch.tensor([[1e4, -1e4, 0.0]])).all()))


def test_wpo_token_factor_has_expectation_one_on_policy() -> None:
    """Σ_v π_v · π_v / Σ_u π_u² = 1 for every position: the factor is exactly 1 in expectation on-policy."""
    z = torch.randn(5, 9, dtype=F64) * 2
    logp = torch.log_softmax(z, -1)
    lss = log_sum_sq_probs(z)
    factor = torch.exp(logp - lss[:, None])  # factor if token v were sampled
    expected = (logp.exp() * factor).sum(-1)
    torch.testing.assert_close(expected, torch.ones(5, dtype=F64), rtol=0, atol=1e-14)


def test_wpo_weight_hand_values() -> None:
    # uniform policy ⇒ 1; one-hot on the observed token ⇒ 1; π = (0.6, 0.4), y = 0 ⇒ 0.6/0.52
    mask = torch.ones(1, 1, dtype=torch.bool)
    for logits, tok, expected in [
        (torch.zeros(4), 2, 1.0),
        (torch.tensor([50.0, 0.0, 0.0]), 0, 1.0),
        (torch.log(torch.tensor([0.6, 0.4], dtype=F64)), 0, 0.6 / 0.52),
    ]:
        z = logits.to(F64)
        lp = torch.log_softmax(z, -1)[tok].reshape(1, 1)
        w = wpo_weights(lp, log_sum_sq_probs(z).reshape(1, 1), mask)
        assert float(w) == pytest.approx(expected, rel=1e-12)
    # the weight is the geometric mean over the completion's tokens; masked positions are ignored, even NaN
    lp = torch.tensor([[math.log(0.5), math.log(0.2), float("nan")]], dtype=F64)
    lss = torch.tensor([[math.log(0.4), math.log(0.3), float("nan")]], dtype=F64)
    w = wpo_weights(lp, lss, torch.tensor([[True, True, False]]))
    assert float(w) == pytest.approx(math.sqrt((0.5 / 0.4) * (0.2 / 0.3)), rel=1e-13)


def _wpo_inputs(b: int, t: int, seed: int, v: int = 6) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(2 * b, t, v, generator=g, dtype=F64) * 2
    ids = torch.randint(0, v, (2 * b, t), generator=g)
    lp = torch.log_softmax(z, -1).gather(-1, ids[..., None]).squeeze(-1)
    _, mask = _token_batch(b, t, seed)
    return {"token_logps": lp, "log_sum_sq_probs": log_sum_sq_probs(z), "completion_mask": mask}


@pytest.mark.parametrize(
    ("base", "base_kwargs", "fn"),
    [("dpo", {"beta": 0.3}, dpo), ("ipo", {"beta": 0.2}, ipo), ("simpo", {"beta": 2.0, "gamma": 0.4}, simpo)],
)
def test_wpo_is_weight_times_base_loss_value_and_gradient(base: str, base_kwargs: dict, fn: Any) -> None:
    b = 4
    pl = _pairs(b, 1, grad=True)
    extra = _wpo_inputs(b, 6, 2)
    out = wpo(pl, **extra, base=base, base_kwargs=base_kwargs)
    # slow oracle: per row, exp(mean over kept tokens of (ℓ − log Σπ²)), by a Python loop
    ws = []
    for r in range(2 * b):
        keep = [i for i in range(6) if bool(extra["completion_mask"][r, i])]
        vals = [float(extra["token_logps"][r, i] - extra["log_sum_sq_probs"][r, i]) for i in keep]
        ws.append(math.exp(sum(vals) / len(vals)))
    pair_w = torch.tensor([ws[i] * ws[i + b] for i in range(b)], dtype=F64)
    base_out = fn(pl, **base_kwargs)
    torch.testing.assert_close(out.loss, pair_w * base_out.loss, rtol=1e-13, atol=0)
    g1 = torch.autograd.grad(out.loss.sum(), [pl.chosen, pl.rejected])
    g2 = torch.autograd.grad((pair_w * base_out.loss).sum(), [pl.chosen, pl.rejected])
    for a, c in zip(g1, g2):
        torch.testing.assert_close(a, c, rtol=1e-13, atol=0)
    torch.testing.assert_close(out.metrics["wpo/weight"], pair_w, rtol=1e-13, atol=0)
    assert out.metrics["rewards/chosen"].shape == (b,)


def test_wpo_clamp_and_no_gradient_through_weight() -> None:
    b = 3
    pl = _pairs(b, 3)
    extra = _wpo_inputs(b, 5, 4)
    lp = extra["token_logps"].clone()
    lp[[0, b]] = 0.0  # pair 0: probability-1 tokens, so its weight exp(−mean log Σπ²) exceeds 1
    extra["token_logps"] = lp.requires_grad_(True)
    raw = wpo(pl, **extra)
    clamped = wpo(pl, **extra, clamp=1.0)
    torch.testing.assert_close(clamped.metrics["wpo/weight"], raw.metrics["wpo/weight"].clamp(max=1.0))
    assert bool((raw.metrics["wpo/weight"] > 1).any()) and bool((raw.metrics["wpo/weight"] < 1).any())
    assert not raw.loss.requires_grad  # only the (detached) weight saw token_logps


def test_wpo_bad_arguments() -> None:
    pl = _pairs(2, 0)
    extra = _wpo_inputs(2, 4, 0)
    with pytest.raises(ValueError, match="base"):
        wpo(pl, **extra, base="kto")
    with pytest.raises(ValueError, match="base"):
        wpo(pl, **extra, base="wpo")
    with pytest.raises(ValueError, match="dpo: hyperparameter beta"):
        wpo(pl, **extra, base_kwargs={"beta": -1.0})
    with pytest.raises(ValueError, match="clamp"):
        wpo(pl, **extra, clamp=0.0)
    with pytest.raises(ValueError, match="token_logps has 6 rows"):
        wpo(pl, **_wpo_inputs(3, 4, 0))
    with pytest.raises(TypeError, match="completion_mask must be a bool"):
        wpo(pl, **{**extra, "completion_mask": extra["completion_mask"].long()})


# ----------------------------------------------------------------------------------------------------------
# LD-DPO
# ----------------------------------------------------------------------------------------------------------


def _ld_loop(x: torch.Tensor, mask: torch.Tensor, alpha: float) -> list[float]:
    b = x.shape[0] // 2
    out = []
    for r in range(2 * b):
        other = r + b if r < b else r - b
        lp = min(int(mask[r].sum()), int(mask[other].sum()))
        k, s = 0, 0.0
        for t in range(x.shape[1]):
            if bool(mask[r, t]):
                k += 1
                s += float(x[r, t]) * (1.0 if k <= lp else alpha)
        out.append(s)
    return out


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_ld_logps_match_loop_and_dpo_limits(alpha: float) -> None:
    b, t = 3, 7
    x, mask = _token_batch(b, t, 5)
    ref, _ = _token_batch(b, t, 6)
    pl = ld_pair_logps(x, ref, mask, ld_alpha=alpha)
    loop = _ld_loop(x, mask, alpha)
    torch.testing.assert_close(torch.cat([pl.chosen, pl.rejected]), torch.tensor(loop, dtype=F64))
    torch.testing.assert_close(
        torch.cat([pl.ref_chosen, pl.ref_rejected]), torch.tensor(_ld_loop(ref, mask, alpha), dtype=F64)
    )
    # the shorter response of each pair keeps its full sum
    lens = mask.sum(1)
    full = torch.where(mask, x, 0).sum(1)
    s = torch.cat([pl.chosen, pl.rejected])
    short = lens <= lens.roll(b)
    torch.testing.assert_close(s[short], full[short])
    out = ld_dpo(x, ref, mask, beta=0.2, ld_alpha=alpha)
    torch.testing.assert_close(out.loss, dpo(pl, beta=0.2).loss)
    if alpha == 1.0:
        plain = PairLogps(full[:b], full[b:], *torch.where(mask, ref, 0).sum(1).chunk(2))
        torch.testing.assert_close(out.loss, dpo(plain, beta=0.2).loss, rtol=1e-14, atol=0)


def test_ld_equal_lengths_is_dpo_for_any_alpha() -> None:
    x, _ = _token_batch(2, 5, 7)
    ref, _ = _token_batch(2, 5, 8)
    mask = torch.tensor(
        [[1, 1, 1, 0, 0], [0, 1, 1, 1, 0], [1, 1, 1, 0, 0], [0, 0, 1, 1, 1]], dtype=torch.bool
    )
    base = ld_dpo(x, ref, mask, ld_alpha=1.0).loss
    for a in (0.0, 0.5):
        torch.testing.assert_close(ld_dpo(x, ref, mask, ld_alpha=a).loss, base, rtol=0, atol=0)


def test_ld_masked_positions_never_reach_value_or_gradient() -> None:
    x, mask = _token_batch(2, 6, 9)
    x = x.masked_fill(~mask, float("nan")).requires_grad_(True)
    ref = torch.where(mask, x.detach(), torch.full_like(x, float("inf")))
    out = ld_dpo(x, ref, mask, ld_alpha=0.4)
    assert bool(torch.isfinite(out.loss).all())
    (g,) = torch.autograd.grad(out.loss.sum(), x)
    assert bool(torch.isfinite(g).all()) and bool((g[~mask] == 0).all())


# ----------------------------------------------------------------------------------------------------------
# AlphaPO
# ----------------------------------------------------------------------------------------------------------


def test_alpha_reward_hand_value_derivative_and_limit() -> None:
    a = torch.tensor([-1.7], dtype=F64, requires_grad=True)
    r = alpha_reward(a, 0.25)
    assert float(r.detach()) == pytest.approx((1 - math.exp(1.7) ** 0.25) / 0.25, rel=1e-14)
    assert float(r.detach()) == pytest.approx(-2.11836, abs=5e-6)
    (g,) = torch.autograd.grad(r.sum(), a)
    assert float(g) == pytest.approx(math.exp(-1.7) ** -0.25, rel=1e-14)  # dr/dĀ = p^{−α}
    assert float(alpha_reward(a, 0.0)) == -1.7
    # α → 0 recovers Ā with error O(α): |r_α − Ā| ≈ α Ā²/2
    for alpha in (1e-2, 1e-4, 1e-6):
        err = float(alpha_reward(a, alpha)) + 1.7
        assert err == pytest.approx(-alpha * 1.7**2 / 2, rel=2e-2)


def test_alphapo_alpha_zero_is_simpo_and_small_alpha_converges() -> None:
    pl = _pairs(5, 11)
    for ls in (0.0, 0.2):
        torch.testing.assert_close(
            alphapo(pl, alpha=0.0, beta=2.0, gamma=0.5, label_smoothing=ls).loss,
            simpo(pl, beta=2.0, gamma=0.5, label_smoothing=ls).loss,
            rtol=0,
            atol=0,
        )
    ref = simpo(pl, beta=2.0, gamma=0.5).loss
    gaps = [
        float((alphapo(pl, alpha=a, beta=2.0, gamma=0.5).loss - ref).abs().max()) for a in (1e-2, 1e-4, 1e-6)
    ]
    # the gap is O(α): it shrinks 100× per 100× smaller α, down to 1e-4 at α = 1e-6 (|Ā| up to 21 here)
    assert 95 < gaps[1] / gaps[2] < 105 and gaps[2] < 1e-4


def test_alphapo_extreme_inputs_stay_finite() -> None:
    s = torch.tensor([-5000.0, -1.0], requires_grad=True)
    pl = PairLogps(
        s, torch.tensor([-1.0, -5000.0]), chosen_len=torch.tensor([1, 1]), rejected_len=torch.tensor([1, 1])
    )
    out = alphapo(pl, alpha=1.0)
    (g,) = torch.autograd.grad(out.loss.sum(), s)
    assert bool(torch.isfinite(out.loss).all()) and bool(torch.isfinite(g).all())


# ----------------------------------------------------------------------------------------------------------
# TDPO
# ----------------------------------------------------------------------------------------------------------


def test_token_kl_matches_loop_nonnegative_and_zero_at_reference() -> None:
    z = torch.randn(2, 3, 5, dtype=F64)
    zr = torch.randn(2, 3, 5, dtype=F64)
    kl = token_kl(z, zr)
    for idx in [(0, 0), (1, 2)]:
        p = torch.softmax(zr[idx], -1).tolist()
        q = torch.softmax(z[idx], -1).tolist()
        assert float(kl[idx]) == pytest.approx(sum(a * math.log(a / c) for a, c in zip(p, q)), rel=1e-12)
    assert bool((kl >= 0).all())
    torch.testing.assert_close(token_kl(z, z + 3.0), torch.zeros(2, 3, dtype=F64), rtol=0, atol=1e-14)


def _tdpo_problem(b: int, t: int, v: int, seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(2 * b, t, v, generator=g, dtype=F64)).requires_grad_(True)
    zr = torch.randn(2 * b, t, v, generator=g, dtype=F64)
    ids = torch.randint(0, v, (2 * b, t), generator=g)
    _, mask = _token_batch(b, t, seed)
    return {"z": z, "zr": zr, "ids": ids, "mask": mask}


def _tdpo_from_logits(p: dict[str, Any], **hp: Any) -> torch.Tensor:
    lp = torch.log_softmax(p["z"], -1).gather(-1, p["ids"][..., None]).squeeze(-1)
    lr = torch.log_softmax(p["zr"], -1).gather(-1, p["ids"][..., None]).squeeze(-1)
    s, sr = torch.where(p["mask"], lp, 0).sum(1), torch.where(p["mask"], lr, 0).sum(1)
    b = s.shape[0] // 2
    pl = PairLogps(s[:b], s[b:], sr[:b], sr[b:])
    return tdpo(pl, token_kl=token_kl(p["z"], p["zr"]), completion_mask=p["mask"], **hp).loss


def _tdpo_naive(p: dict[str, Any], beta: float, alpha: float, variant: str) -> torch.Tensor:
    """The authors' formula written out per pair with explicit loops over tokens and vocabulary."""
    z, zr, ids, mask = p["z"], p["zr"], p["ids"], p["mask"]
    b = z.shape[0] // 2
    rho, kl = [], []
    for r in range(2 * b):
        rr, kk = z.new_zeros(()), z.new_zeros(())
        for t in range(z.shape[1]):
            if not bool(mask[r, t]):
                continue
            logq = z[r, t] - torch.logsumexp(z[r, t], 0)
            logp = zr[r, t] - torch.logsumexp(zr[r, t], 0)
            rr = rr + logq[ids[r, t]] - logp[ids[r, t]]
            kk = kk + sum(logp[v].exp() * (logp[v] - logq[v]) for v in range(z.shape[2]))
        rho.append(rr)
        kl.append(kk)
    out = []
    for i in range(b):
        if variant == "tdpo1":
            zz = rho[i] - rho[i + b] - (kl[i + b] - kl[i])
        else:
            zz = rho[i] - rho[i + b] - alpha * (kl[i + b] - kl[i].detach())
        out.append(-F.logsigmoid(beta * zz))
    return torch.stack(out)


@pytest.mark.parametrize("variant", ["tdpo1", "tdpo2"])
def test_tdpo_matches_naive_full_logits_value_and_gradient(variant: str) -> None:
    p = _tdpo_problem(2, 4, 5, 12)
    ours = _tdpo_from_logits(p, beta=0.7, alpha=0.6, variant=variant)
    naive = _tdpo_naive(p, 0.7, 0.6, variant)
    torch.testing.assert_close(ours, naive, rtol=1e-12, atol=0)
    (g1,) = torch.autograd.grad(ours.sum(), p["z"])
    (g2,) = torch.autograd.grad(naive.sum(), p["z"])
    torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-14)


def test_tdpo_limits() -> None:
    b = 3
    pl = _pairs(b, 13)
    kl, mask = _token_batch(b, 5, 14)
    kl = (-kl).requires_grad_(True)  # ≥ 0
    # α = 0 is DPO; KL = 0 is DPO for both variants; policy = reference gives log 2
    torch.testing.assert_close(tdpo(pl, token_kl=kl, completion_mask=mask, alpha=0.0).loss, dpo(pl).loss)
    zero = torch.zeros_like(kl)
    for v in ("tdpo1", "tdpo2"):
        torch.testing.assert_close(
            tdpo(pl, token_kl=zero, completion_mask=mask, variant=v).loss, dpo(pl).loss
        )
    same = PairLogps(pl.chosen, pl.rejected, pl.chosen, pl.rejected)
    torch.testing.assert_close(
        tdpo(same, token_kl=zero, completion_mask=mask).loss, torch.full((b,), math.log(2), dtype=F64)
    )
    # equal sequence KLs: TDPO1 ≡ DPO
    eq = torch.cat([kl[:b], kl[:b]]).detach()
    eq_mask = torch.cat([mask[:b], mask[:b]])
    torch.testing.assert_close(
        tdpo(pl, token_kl=eq, completion_mask=eq_mask, variant="tdpo1").loss, dpo(pl).loss
    )
    # TDPO2: no gradient through the chosen rows' KL; TDPO1: there is
    out2 = tdpo(pl, token_kl=kl, completion_mask=mask)
    (g2,) = torch.autograd.grad(out2.loss.sum(), kl)
    assert bool((g2[:b] == 0).all()) and bool((g2[b:][mask[b:]] != 0).all())
    (g1,) = torch.autograd.grad(tdpo(pl, token_kl=kl, completion_mask=mask, variant="tdpo1").loss.sum(), kl)
    assert bool((g1[:b][mask[:b]] != 0).all()) and bool((g1[~mask] == 0).all())


# ----------------------------------------------------------------------------------------------------------
# gradcheck (float64)
# ----------------------------------------------------------------------------------------------------------


def test_gradcheck_float64() -> None:
    b, t = 2, 4
    pl = _pairs(b, 21)
    extra = _wpo_inputs(b, t, 22)
    x, mask = _token_batch(b, t, 23)
    ref, _ = _token_batch(b, t, 24)
    kl = (-_token_batch(b, t, 25)[0]).requires_grad_(True)

    def wpo_fn(c: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        q = PairLogps(c, r, pl.ref_chosen, pl.ref_rejected, pl.chosen_len, pl.rejected_len)
        return wpo(q, **extra, base="ipo").loss

    def alpha_fn(c: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        q = PairLogps(c, r, chosen_len=pl.chosen_len, rejected_len=pl.rejected_len)
        return alphapo(q, alpha=0.3, label_smoothing=0.1).loss

    def tdpo_fn(c: torch.Tensor, r: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        q = PairLogps(c, r, pl.ref_chosen, pl.ref_rejected)
        return tdpo(q, token_kl=k, completion_mask=mask, variant="tdpo1").loss

    def tdpo2_fn(c: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        # TDPO2's stop-gradient on the chosen KL is by design not the derivative of its value: check c, r only
        q = PairLogps(c, r, pl.ref_chosen, pl.ref_rejected)
        return tdpo(q, token_kl=kl.detach(), completion_mask=mask).loss

    c0 = pl.chosen.clone().requires_grad_(True)
    r0 = pl.rejected.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(wpo_fn, (c0, r0))
    assert torch.autograd.gradcheck(alpha_fn, (c0, r0))
    assert torch.autograd.gradcheck(tdpo_fn, (c0, r0, kl))
    assert torch.autograd.gradcheck(tdpo2_fn, (c0, r0))
    assert torch.autograd.gradcheck(
        lambda y: ld_dpo(y, ref, mask, ld_alpha=0.3).loss, (x.requires_grad_(True),)
    )
    z = torch.randn(2, 3, 4, dtype=F64, requires_grad=True)
    zr = torch.randn(2, 3, 4, dtype=F64)
    assert torch.autograd.gradcheck(lambda a: token_kl(a, zr), (z,))


# ----------------------------------------------------------------------------------------------------------
# TRL 1.16
# ----------------------------------------------------------------------------------------------------------


class _Acc:
    device = torch.device("cpu")

    @staticmethod
    def gather_for_metrics(x: Any) -> Any:
        return x

    gather = gather_for_metrics

    @staticmethod
    def unwrap_model(m: Any) -> Any:
        return m


class _StubLM(torch.nn.Module):
    """A causal-LM stand-in for TRL's fused LM head: hidden states (2B, T, H) and a head (V, H); calling it
    runs TRL's own ``ChunkedLogProbFunction`` on the shifted positions, as ``fused_lm_head=True`` does."""

    is_gradient_checkpointing = False

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor) -> None:
        super().__init__()
        self.hidden, self.weight = hidden, weight

    def forward(self, *, input_ids: torch.Tensor, labels: torch.Tensor, **_: Any) -> Any:
        from trl.kernels.chunked_logprob import OPTIONAL_OUTPUTS, ChunkedLogProbFunction

        h = self.hidden[:, :-1]
        lab = labels[:, 1:]
        mask = lab != -100
        outs = ChunkedLogProbFunction.apply(
            h.reshape(-1, h.shape[-1]),
            self.weight,
            None,
            lab.clamp(min=0).reshape(-1),
            1.0,
            4,
            None,
            1.0,
            OPTIONAL_OUTPUTS,
        )
        lp, ent, lss, ml, top1 = (x.view(mask.shape).masked_fill(~mask, 0) for x in outs)
        return SimpleNamespace(log_probs=lp, entropy=ent, log_sum_sq_probs=lss, mean_logits=ml, is_top1=top1)


def _trl_dpo_case(seed: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    b, t, hdim, v = 3, 9, 5, 11
    ids = torch.randint(0, v, (2 * b, t), generator=g)
    cm = torch.zeros(2 * b, t, dtype=torch.long)
    for r, (s, e) in enumerate([(2, 9), (3, 6), (2, 8), (2, 5), (3, 9), (2, 9)]):
        cm[r, s:e] = 1
    attn = torch.ones_like(ids)
    hidden = torch.randn(2 * b, t, hdim, generator=g).requires_grad_(True)
    hidden_ref = torch.randn(2 * b, t, hdim, generator=g)
    weight = torch.randn(v, hdim, generator=g)
    return {"ids": ids, "cm": cm, "attn": attn, "hidden": hidden, "hidden_ref": hidden_ref, "weight": weight}


def _trl_loss(
    case: dict[str, Any], *, loss_type: str, use_weighting: bool, ld_alpha: float | None, beta: float
) -> torch.Tensor:
    from trl import DPOTrainer

    stub = SimpleNamespace(
        accelerator=_Acc(),
        model=_StubLM(case["hidden"], case["weight"]),
        ref_model=_StubLM(case["hidden_ref"], case["weight"]),
        args=SimpleNamespace(gradient_checkpointing_kwargs=None),
        aux_loss_enabled=False,
        precompute_ref_logps=False,
        ld_alpha=ld_alpha,
        use_weighting=use_weighting,
        f_divergence_type="reverse_kl",
        f_alpha_divergence_coef=0.5,
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=0.0,
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {"input_ids": case["ids"], "attention_mask": case["attn"], "completion_mask": case["cm"]}
    return DPOTrainer._compute_loss(stub, stub.model, inputs, False)


def _ours(
    case: dict[str, Any], *, base: str, use_weighting: bool, ld_alpha: float | None, beta: float
) -> torch.Tensor:
    """The same quantities from full logits (no TRL code): per-token log-probs, log Σπ², prefopt losses."""
    mask = case["cm"][:, 1:].bool()
    tgt = case["ids"][:, 1:, None]
    z = case["hidden"][:, :-1] @ case["weight"].T
    zr = case["hidden_ref"][:, :-1] @ case["weight"].T
    lp = torch.log_softmax(z, -1).gather(-1, tgt).squeeze(-1)
    lr = torch.log_softmax(zr, -1).gather(-1, tgt).squeeze(-1)
    if ld_alpha is None and not use_weighting:
        raise AssertionError("not a case")
    if ld_alpha is not None and base == "dpo" and not use_weighting:
        return ld_dpo(lp, lr, mask, beta=beta, ld_alpha=ld_alpha).loss.mean()
    pl = ld_pair_logps(lp, lr, mask, ld_alpha=1.0 if ld_alpha is None else ld_alpha)
    return wpo(
        pl,
        token_logps=lp,
        log_sum_sq_probs=log_sum_sq_probs(z),
        completion_mask=mask,
        base=base,
        base_kwargs={"beta": beta},
    ).loss.mean()


TRL_CASES = [
    ("sigmoid", "dpo", True, None),
    ("ipo", "ipo", True, None),
    ("sigmoid", "dpo", False, 0.5),
    ("sigmoid", "dpo", False, 0.0),
    ("sigmoid", "dpo", True, 0.3),
]


@pytest.mark.parametrize(("trl_type", "base", "use_weighting", "ld_alpha"), TRL_CASES)
def test_wpo_and_ld_match_trl_dpo_trainer(
    trl_type: str, base: str, use_weighting: bool, ld_alpha: float | None
) -> None:
    pytest.importorskip("trl")
    case = _trl_dpo_case()
    beta = 0.7
    l_trl = _trl_loss(case, loss_type=trl_type, use_weighting=use_weighting, ld_alpha=ld_alpha, beta=beta)
    (g_trl,) = torch.autograd.grad(l_trl, case["hidden"])
    l_ours = _ours(case, base=base, use_weighting=use_weighting, ld_alpha=ld_alpha, beta=beta)
    (g_ours,) = torch.autograd.grad(l_ours, case["hidden"])
    assert abs(float(l_ours) - math.log(2)) > 1e-3
    torch.testing.assert_close(l_ours, l_trl, rtol=2e-6, atol=1e-7)
    scale = float(g_trl.abs().max())
    assert scale > 1e-4
    torch.testing.assert_close(g_ours, g_trl, rtol=1e-5, atol=1e-6 * scale)


def test_log_sum_sq_probs_matches_trl_kernel() -> None:
    pytest.importorskip("trl")
    from trl.kernels.chunked_logprob import OPTIONAL_OUTPUTS, ChunkedLogProbFunction

    g = torch.Generator().manual_seed(3)
    h, w = torch.randn(7, 5, generator=g) * 3, torch.randn(13, 5, generator=g)
    lss = ChunkedLogProbFunction.apply(
        h, w, None, torch.zeros(7, dtype=torch.long), 1.0, 4, None, 1.0, OPTIONAL_OUTPUTS
    )[2]
    torch.testing.assert_close(log_sum_sq_probs(h @ w.T), lss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("alpha", "label_smoothing"), [(0.25, 0.0), (-0.4, 0.0), (0.6, 0.1), (0.0, 0.0)])
def test_alphapo_matches_trl_cpo_loss(alpha: float, label_smoothing: float) -> None:
    pytest.importorskip("trl")
    from trl.experimental.cpo import CPOTrainer

    beta, gamma = 2.5, 0.3
    pl = _pairs(6, 31, dtype=torch.float32, grad=True)
    n_w, n_l = pl.chosen_len.float(), pl.rejected_len.float()
    stub = SimpleNamespace(
        alpha=alpha,
        beta=beta,
        simpo_gamma=gamma,
        loss_type="simpo",
        label_smoothing=label_smoothing,
        accelerator=_Acc(),
    )
    l_trl, cr, rr = CPOTrainer.cpo_loss(stub, pl.chosen / n_w, pl.rejected / n_l)
    out = alphapo(pl, alpha=alpha, beta=beta, gamma=gamma, label_smoothing=label_smoothing)
    torch.testing.assert_close(out.loss, l_trl, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.metrics["rewards/chosen"], cr)
    torch.testing.assert_close(out.metrics["rewards/rejected"], rr)
    g_trl = torch.autograd.grad(l_trl.sum(), [pl.chosen, pl.rejected])
    g_ours = torch.autograd.grad(out.loss.sum(), [pl.chosen, pl.rejected])
    for a, c in zip(g_ours, g_trl):
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-7)


def test_bad_input_names_the_argument() -> None:
    x, mask = _token_batch(2, 5, 40)
    with pytest.raises(ValueError, match="ld_alpha"):
        ld_dpo(x, x, mask, ld_alpha=1.5)
    with pytest.raises(ValueError, match="even, non-zero number of rows"):
        ld_dpo(x[:3], x[:3], mask[:3])
    with pytest.raises(ValueError, match="ref_logps has shape"):
        ld_dpo(x, x[:, :4], mask)
    with pytest.raises(ValueError, match="completion_mask has shape"):
        ld_dpo(x, x, mask[:, :4])
    with pytest.raises(ValueError, match="alphapo needs completion lengths"):
        alphapo(PairLogps(torch.zeros(2), torch.zeros(2)))
    with pytest.raises(ValueError, match="alpha"):
        alphapo(_pairs(2, 0), alpha=math.inf)
    pl = _pairs(2, 0)
    with pytest.raises(ValueError, match="token_kl has 6 rows"):
        tdpo(pl, token_kl=torch.zeros(6, 5, dtype=F64), completion_mask=torch.ones(6, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="variant"):
        tdpo(pl, token_kl=x, completion_mask=mask, variant="tdpo3")
    with pytest.raises(ValueError, match="needs reference"):
        tdpo(PairLogps(pl.chosen, pl.rejected), token_kl=x, completion_mask=mask)
    with pytest.raises(ValueError, match="ref_logits has shape"):
        token_kl(torch.zeros(2, 3), torch.zeros(2, 4))


def test_extreme_valid_inputs_stay_finite() -> None:
    big = torch.tensor([-1e4, 1e4, 0.0, -3e3], dtype=torch.float32)
    pl = PairLogps(
        big, big.flip(0), big.roll(1), big.roll(2), torch.tensor([1, 2, 3, 4]), torch.tensor([4, 3, 2, 1])
    )
    t = torch.full((8, 5), 1e4, dtype=torch.float32)
    m = torch.ones(8, 5, dtype=torch.bool)
    assert bool(torch.isfinite(tdpo(pl, token_kl=t, completion_mask=m).loss).all())
    assert bool(torch.isfinite(alphapo(pl, alpha=2.0).loss).all())
    lp = torch.full((8, 5), -50.0)
    w = wpo(pl, token_logps=lp, log_sum_sq_probs=torch.zeros(8, 5), completion_mask=m, clamp=1.0)
    assert bool(torch.isfinite(w.loss).all())
    z = torch.tensor([[1e4, -1e4, 0.0]], requires_grad=True)
    kl = token_kl(z, torch.tensor([[-1e4, 1e4, 0.0]]))
    (g,) = torch.autograd.grad(kl.sum(), z)
    assert bool(torch.isfinite(kl).all()) and bool(torch.isfinite(g).all())
