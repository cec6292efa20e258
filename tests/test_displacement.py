"""Tests for prefopt.diagnostics.displacement (CHES, ranking accuracy, squeezing, one-token gradient geometry).

Oracles: explicit Python loops over pairs / tokens / vocabulary entries, unpadded per-pair forwards with
``output_hidden_states=True``, exact one-token models (a categorical distribution with logits as parameters,
or a tiny LM whose only differentiated parameter is the untied unembedding), autograd in float64.
"""

from __future__ import annotations

import math

import pytest
import torch

from prefopt.diagnostics.displacement import (
    ChesScores,
    ches_filter,
    ches_from_hidden,
    ches_positions,
    ches_scores,
    ches_table,
    dpo_flip_loss,
    hidden_grad_inner,
    idealized_ranking_accuracy,
    ranking_accuracy,
    squeeze_first_order,
    squeeze_step,
    squeezing_probe,
    tabular_grad_inner,
    unembedding_grad_inner,
)
from prefopt.diagnostics.entanglement import entanglement
from prefopt.registry import get_loss
from prefopt.testing import tiny_causal_lm
from prefopt.types import PairLogps

V = 48
D = 16


@pytest.fixture(scope="module")
def model():
    return tiny_causal_lm(vocab_size=V, hidden_size=D, num_layers=2, seed=3).double()


def make_pairs(seed: int, b: int = 3, t: int = 13, prompt: int = 4):
    """Right-padded pair batch with a shared prompt per pair and varied completion lengths; also returns the
    unpadded (prompt, chosen, rejected) token lists."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(2 * b, t, dtype=torch.long)
    am = torch.zeros(2 * b, t, dtype=torch.long)
    cm = torch.zeros(2 * b, t, dtype=torch.bool)
    raw = []
    for i in range(b):
        p = torch.randint(2, V, (prompt,), generator=g)
        lw = int(torch.randint(1, t - prompt + 1, (1,), generator=g))
        ll = int(torch.randint(1, t - prompt + 1, (1,), generator=g))
        yw = torch.randint(2, V, (lw,), generator=g)
        yl = torch.randint(2, V, (ll,), generator=g)
        for r, y in ((i, yw), (i + b, yl)):
            n = prompt + len(y)
            ids[r, :prompt] = p
            ids[r, prompt:n] = y
            am[r, :n] = 1
            cm[r, prompt:n] = True
        raw.append((p, yw, yl))
    return {"input_ids": ids, "attention_mask": am, "completion_mask": cm}, raw


def naive_ches(model, raw, inclusive=False):
    """Per pair: unpadded forwards, hidden_states[-1], explicit loop over the response tokens."""
    out_c, out_ln = [], []
    for p, yw, yl in raw:
        sums, counts = [], []
        for y in (yw, yl):
            seq = torch.cat([p, y]).unsqueeze(0)
            with torch.no_grad():
                h = model(input_ids=seq, output_hidden_states=True).hidden_states[-1][0]
            s = torch.zeros(h.shape[-1], dtype=torch.float64)
            n = 0
            last = len(p) + len(y) - 1
            for k in range(len(y)):  # position len(p)-1+k predicts y_k
                s = s + h[len(p) - 1 + k].double()
                n += 1
            if inclusive:
                s = s + h[last].double()
                n += 1
            sums.append(s)
            counts.append(n)
        sp, sm = sums
        cross = sum(float(sp[j] * sm[j]) for j in range(len(sp)))
        own = sum(float(sp[j] * sp[j]) for j in range(len(sp)))
        out_c.append(cross - own)
        out_ln.append(cross / (counts[0] * counts[1]) - own / counts[0] ** 2)
    return torch.tensor(out_c, dtype=torch.float64), torch.tensor(out_ln, dtype=torch.float64)


# ----------------------------------------------------------------------------------------------------------
# CHES
# ----------------------------------------------------------------------------------------------------------


def test_ches_positions_by_hand():
    cm = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 0, 0, 0, 0]], dtype=torch.bool)
    pred = ches_positions(cm)
    assert pred.tolist() == [[0, 1, 1, 1, 0, 0], [1, 0, 0, 0, 0, 0]]
    incl = ches_positions(cm, positions="inclusive")
    assert incl.tolist() == [[0, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0]]
    with pytest.raises(ValueError, match="positions"):
        ches_positions(cm, positions="all")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="completion_mask"):
        ches_positions(cm.long())
    with pytest.raises(ValueError, match="position 0"):
        ches_positions(torch.ones(1, 3, dtype=torch.bool))


def _loop_ches_from_hidden(hp, mp, hm, mm):
    res_c, res_ln = [], []
    for i in range(hp.shape[0]):
        sp = torch.zeros(hp.shape[-1], dtype=torch.float64)
        sm = torch.zeros(hp.shape[-1], dtype=torch.float64)
        for t in range(hp.shape[1]):
            if mp[i, t]:
                sp = sp + hp[i, t].double()
        for t in range(hm.shape[1]):
            if mm[i, t]:
                sm = sm + hm[i, t].double()
        np_, nm = int(mp[i].sum()), int(mm[i].sum())
        cross, own = float(sp @ sm), float(sp @ sp)
        res_c.append(cross - own)
        res_ln.append(cross / (np_ * nm) - own / np_**2)
    return torch.tensor(res_c, dtype=torch.float64), torch.tensor(res_ln, dtype=torch.float64)


def test_ches_from_hidden_loop_and_garbage():
    g = torch.Generator().manual_seed(0)
    hp, hm = torch.randn(4, 7, 5, generator=g), torch.randn(4, 9, 5, generator=g)
    mp, mm = torch.rand(4, 7, generator=g) < 0.5, torch.rand(4, 9, generator=g) < 0.5
    mp[:, 0] = True
    mm[:, 3] = True
    c, ln = ches_from_hidden(hp, mp, hm, mm)
    oc, oln = _loop_ches_from_hidden(hp, mp, hm, mm)
    assert c.dtype == torch.float64
    torch.testing.assert_close(c, oc.double(), rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(ln, oln, rtol=1e-12, atol=1e-10)
    # garbage (NaN, inf, huge) at masked positions never matters, also not for the gradient
    gp = hp.clone().double().requires_grad_(True)
    bad = torch.where(mp.unsqueeze(-1), hp.double(), torch.full_like(hp.double(), float("nan")))
    bad = bad.clone().requires_grad_(True)
    c2, ln2 = ches_from_hidden(bad, mp, torch.where(mm.unsqueeze(-1), hm, torch.tensor(1e30)), mm)
    torch.testing.assert_close(c2, c)
    torch.testing.assert_close(ln2, ln)
    (c2.sum() + ln2.sum()).backward()
    assert bad.grad is not None and torch.isfinite(bad.grad).all()
    assert (bad.grad[~mp] == 0).all()
    del gp


def test_ches_identities():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(3, 6, 8, generator=g, dtype=torch.float64)
    m = torch.ones(3, 6, dtype=torch.bool)
    m[1, 4:] = False
    c, ln = ches_from_hidden(h, m, h, m)  # CHES(y, y) = 0
    assert torch.equal(c, torch.zeros(3, dtype=torch.float64)) and torch.equal(ln, torch.zeros_like(ln))
    h2 = torch.randn(3, 5, 8, generator=g, dtype=torch.float64)
    m2 = torch.ones(3, 5, dtype=torch.bool)
    c, ln = ches_from_hidden(h, m, h2, m2)
    sp = (h * m.unsqueeze(-1)).sum(1)
    sm = h2.sum(1)
    torch.testing.assert_close(c, (sp * (sm - sp)).sum(-1))  # CHES = <S+, S- - S+>
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g, dtype=torch.float64))
    cr, lnr = ches_from_hidden(h @ q, m, h2 @ q, m2)  # common rotation
    torch.testing.assert_close(cr, c, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lnr, ln, rtol=1e-12, atol=1e-12)


def test_ches_from_hidden_gradcheck():
    g = torch.Generator().manual_seed(2)
    hp = torch.randn(2, 4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    hm = torch.randn(2, 5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    mp = torch.tensor([[1, 1, 0, 1], [0, 1, 0, 0]], dtype=torch.bool)
    mm = torch.tensor([[1, 0, 0, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.autograd.gradcheck(lambda a, b: ches_from_hidden(a, mp, b, mm), (hp, hm))


def test_ches_from_hidden_errors():
    h = torch.zeros(2, 3, 4)
    m = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="chosen_hidden"):
        ches_from_hidden(h[0], m, h, m)
    with pytest.raises(ValueError, match="rejected_mask"):
        ches_from_hidden(h, m, h, m[:, :2])
    with pytest.raises(TypeError, match="chosen_mask"):
        ches_from_hidden(h, m.long(), h, m)
    empty = m.clone()
    empty[1] = False
    with pytest.raises(ValueError, match=r"rejected_mask selects no position in row\(s\) \[1\]"):
        ches_from_hidden(h, m, h, empty)
    with pytest.raises(ValueError, match="same batch size and width"):
        ches_from_hidden(h, m, torch.zeros(2, 3, 5), m)


@pytest.mark.parametrize("positions", ["predicting", "inclusive"])
def test_ches_scores_match_naive_loop(model, positions):
    batch, raw = make_pairs(0, b=4)
    s = ches_scores(model, batch, positions=positions)
    assert isinstance(s, ChesScores) and s.positions == positions
    oc, oln = naive_ches(model, raw, inclusive=positions == "inclusive")
    torch.testing.assert_close(s.ches, oc, rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(s.ln_ches, oln, rtol=1e-10, atol=1e-11)
    extra = 1 if positions == "inclusive" else 0
    assert s.chosen_count.tolist() == [len(yw) + extra for _, yw, _ in raw]
    assert s.rejected_count.tolist() == [len(yl) + extra for _, _, yl in raw]


def test_ches_scores_padding_garbage_batch_equals_loop(model):
    batch, _ = make_pairs(1, b=3)
    s = ches_scores(model, batch)
    # garbage token ids at padded positions
    noisy = dict(batch)
    ids = batch["input_ids"].clone()
    pad = batch["attention_mask"] == 0
    ids[pad] = torch.randint(2, V, (int(pad.sum()),), generator=torch.Generator().manual_seed(9))
    noisy["input_ids"] = ids
    torch.testing.assert_close(ches_scores(model, noisy).ches, s.ches, rtol=1e-12, atol=1e-10)
    # batch = loop over pairs
    b = 3
    for i in range(b):
        one = {k: v[[i, i + b]] for k, v in batch.items()}
        si = ches_scores(model, one)
        torch.testing.assert_close(si.ches[0], s.ches[i], rtol=1e-10, atol=1e-9)
        torch.testing.assert_close(si.ln_ches[0], s.ln_ches[i], rtol=1e-10, atol=1e-11)


def test_ches_scores_identical_responses_zero_and_mode_restored(model):
    batch, _ = make_pairs(2, b=2)
    b = 2
    for k in batch:
        batch[k][b:] = batch[k][:b]
    model.train()
    s = ches_scores(model, batch)
    assert model.training
    model.eval()
    assert torch.equal(s.ches, torch.zeros(2, dtype=torch.float64))
    assert torch.equal(s.ln_ches, torch.zeros(2, dtype=torch.float64))


def test_ches_single_token_same_prompt_is_zero(model):
    """One-token responses after the same prompt share h, so CHES = 0 whatever the tokens (D.1)."""
    batch, _ = make_pairs(3, b=2)
    ids, am, cm = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    am[:, 5:] = 0
    cm[:, 5:] = False
    cm[:, 4] = True
    ids[:, 5:] = 0
    ids[2:, :4] = ids[:2, :4]
    ids[2:, 4] = (ids[:2, 4] + 5) % (V - 2) + 2
    am[:, :5] = 1
    s = ches_scores(model, batch)
    torch.testing.assert_close(s.ches, torch.zeros(2, dtype=torch.float64), rtol=0, atol=1e-12)


def test_ches_scores_errors(model):
    batch, _ = make_pairs(0, b=2)
    with pytest.raises(KeyError, match="completion_mask"):
        ches_scores(model, {"input_ids": batch["input_ids"]})
    with pytest.raises(ValueError, match="even"):
        ches_scores(model, {k: v[:3] for k, v in batch.items()})
    with pytest.raises(ValueError, match="positions"):
        ches_scores(model, batch, positions="last")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="policy_or_model"):
        ches_scores(object(), batch)


def test_ches_table_and_filter(model):
    b1, _ = make_pairs(4, b=2)
    b2, _ = make_pairs(5, b=3)
    tab = ches_table(model, [b1, b2], progress=True, total=2)
    s1, s2 = ches_scores(model, b1), ches_scores(model, b2)
    assert tab["pair"] == [0, 1, 2, 3, 4]
    assert tab["ches"] == s1.ches.tolist() + s2.ches.tolist()
    assert tab["ln_ches"] == s1.ln_ches.tolist() + s2.ln_ches.tolist()
    assert tab["chosen_count"] == s1.chosen_count.tolist() + s2.chosen_count.tolist()
    with pytest.raises(TypeError, match="progress"):
        ches_table(model, [b1], progress=1)  # type: ignore[arg-type]

    x = torch.tensor([3.0, -1.0, 2.0, -1.0, 7.0, 0.5])
    f = ches_filter(x, keep_fraction=0.5)
    assert f.keep.tolist() == [1, 3, 5] and f.removed.tolist() == [0, 2, 4]
    assert f.threshold == 0.5 and f.summary["n_kept"] == 3.0
    assert f.summary["removed_mean"] == pytest.approx(4.0)
    f = ches_filter(x, keep_fraction=0.2)  # ceil(1.2) = 2; the tie at -1 broken by index
    assert f.keep.tolist() == [1, 3]
    f = ches_filter(x, threshold=2.0)
    assert f.keep.tolist() == [1, 2, 3, 5]
    s = ChesScores(ches=x.double(), ln_ches=-x.double(), chosen_count=x, rejected_count=x, positions="p")
    assert ches_filter(s, keep_fraction=1 / 6).keep.tolist() == [4]
    assert ches_filter(s, keep_fraction=1 / 6, score="ches").keep.tolist() == [1]
    with pytest.raises(ValueError, match="exactly one"):
        ches_filter(x)
    with pytest.raises(ValueError, match="exactly one"):
        ches_filter(x, keep_fraction=0.5, threshold=1.0)
    with pytest.raises(ValueError, match="keep_fraction"):
        ches_filter(x, keep_fraction=0.0)
    with pytest.raises(ValueError, match="threshold"):
        ches_filter(x, threshold=float("nan"))
    with pytest.raises(ValueError, match="score"):
        ches_filter(s, keep_fraction=0.5, score="foo")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-finite"):
        ches_filter(torch.tensor([1.0, float("nan")]), keep_fraction=0.5)


# ----------------------------------------------------------------------------------------------------------
# ranking accuracy
# ----------------------------------------------------------------------------------------------------------


def test_ranking_accuracy_loop():
    g = torch.Generator().manual_seed(0)
    sw, sl = -10 * torch.rand(50, generator=g), -10 * torch.rand(50, generator=g)
    sl[:5] = sw[:5]  # identical: not counted correct
    nw, nl = torch.randint(1, 20, (50,), generator=g), torch.randint(1, 20, (50,), generator=g)
    r = ranking_accuracy(sw, sl)
    rn = ranking_accuracy(sw, sl, chosen_len=nw, rejected_len=nl)
    for i in range(50):
        assert bool(r[i]) == (math.exp(sw[i]) > math.exp(sl[i]))
        assert bool(rn[i]) == (float(sw[i]) / int(nw[i]) > float(sl[i]) / int(nl[i]))
    assert not r[:5].any()
    with pytest.raises(ValueError, match="rejected"):
        ranking_accuracy(sw, sl[:3])
    with pytest.raises(ValueError, match="both"):
        ranking_accuracy(sw, sl, chosen_len=nw)
    with pytest.raises(ValueError, match="rejected_len"):
        ranking_accuracy(sw, sl, chosen_len=nw, rejected_len=nl * 0)
    with pytest.raises(TypeError, match="chosen"):
        ranking_accuracy(sw.tolist(), sl)  # type: ignore[arg-type]


def test_idealized_ranking_accuracy_loop_and_limits():
    g = torch.Generator().manual_seed(1)
    rw, rl = (
        -20 * torch.rand(200, generator=g, dtype=torch.float64),
        -20 * torch.rand(200, generator=g).double(),
    )
    alpha = 0.02 + 0.96 * torch.rand(200, generator=g, dtype=torch.float64)
    for beta in (0.01, 0.1, 1.0, 5.0):
        got = idealized_ranking_accuracy(rw, rl, beta=beta, alpha=alpha)
        for i in range(200):
            ratio = math.exp(float(rw[i]) - float(rl[i])) * (float(alpha[i]) / (1 - float(alpha[i]))) ** (
                1 / beta
            )
            assert bool(got[i]) == (ratio > 1)
        band = idealized_ranking_accuracy(rw, rl, beta=beta, alpha=alpha, tie_band=0.05)
        for i in range(200):
            ratio = math.exp(float(rw[i]) - float(rl[i])) * (float(alpha[i]) / (1 - float(alpha[i]))) ** (
                1 / beta
            )
            assert bool(band[i]) == (ratio > 1.05)
    # beta -> inf: reference accuracy; beta -> 0: fraction with alpha > 1/2
    assert torch.equal(idealized_ranking_accuracy(rw, rl, beta=1e12, alpha=alpha), ranking_accuracy(rw, rl))
    assert torch.equal(idealized_ranking_accuracy(rw, rl, beta=1e-6, alpha=alpha), alpha > 0.5)
    # alpha = 1/2: the optimum keeps the reference ranking for any beta
    assert torch.equal(idealized_ranking_accuracy(rw, rl, beta=0.1, alpha=0.5), rw > rl)
    with pytest.raises(ValueError, match="beta"):
        idealized_ranking_accuracy(rw, rl, beta=0.0)
    with pytest.raises(ValueError, match="alpha"):
        idealized_ranking_accuracy(rw, rl, beta=1.0, alpha=1.0)
    with pytest.raises(ValueError, match="alpha"):
        idealized_ranking_accuracy(rw, rl, beta=1.0, alpha=alpha[:3])
    with pytest.raises(ValueError, match="tie_band"):
        idealized_ranking_accuracy(rw, rl, beta=1.0, tie_band=-0.1)


def test_dpo_flip_loss_condition_2000_cases():
    g = torch.Generator().manual_seed(2)
    n = 2000
    sw, sl = -30 * torch.rand(n, generator=g).double(), -30 * torch.rand(n, generator=g).double()
    rw, rl = -30 * torch.rand(n, generator=g).double(), -30 * torch.rand(n, generator=g).double()
    for beta in (0.05, 0.5, 2.0):
        loss = get_loss("dpo", beta=beta)(
            PairLogps(chosen=sw, rejected=sl, ref_chosen=rw, ref_rejected=rl)
        ).loss
        flip = dpo_flip_loss(rw, rl, beta=beta)
        margin = (sw - sl).abs() > 1e-9
        assert margin.sum() > 1900
        assert torch.equal((loss < flip)[margin], (sw > sl)[margin])
        for i in range(0, n, 97):  # loop oracle: log(1 + (pi_ref(w)/pi_ref(l))^beta)
            assert float(flip[i]) == pytest.approx(
                math.log1p(math.exp(float(rw[i] - rl[i])) ** beta), rel=1e-12
            )
    # the reference prefers y_l strongly: the loss must go far below log 2
    assert float(dpo_flip_loss(torch.tensor([-50.0]), torch.tensor([-10.0]), beta=0.1)) < 0.02
    x = torch.randn(4, dtype=torch.float64, requires_grad=True)
    y = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: dpo_flip_loss(a, b, beta=0.7), (x, y))
    with pytest.raises(ValueError, match="beta"):
        dpo_flip_loss(x, y, beta=-1.0)
    with pytest.raises(ValueError, match="ref_rejected"):
        dpo_flip_loss(x, y[:2], beta=1.0)


# ----------------------------------------------------------------------------------------------------------
# squeezing
# ----------------------------------------------------------------------------------------------------------


def test_squeeze_step_loop_and_real_step():
    g = torch.Generator().manual_seed(3)
    z = 3 * torch.randn(5, 7, generator=g, dtype=torch.float64)
    tgt = torch.randint(0, 7, (5,), generator=g)
    eta = 0.7
    got = squeeze_step(z, tgt, eta=eta)
    for r in range(5):
        p = torch.softmax(z[r], -1)
        num = [
            float(p[i]) * math.exp(eta * (float(p[i]) - (1.0 if i == int(tgt[r]) else 0.0))) for i in range(7)
        ]
        for i in range(7):
            assert float(got[r, i]) == pytest.approx(num[i] / sum(num), rel=1e-12)
        zz = z[r].clone().requires_grad_(True)  # a real gradient step down on log pi(target)
        (gz,) = torch.autograd.grad(torch.log_softmax(zz, -1)[tgt[r]], zz)
        torch.testing.assert_close(torch.softmax(z[r] - eta * gz, -1), got[r], rtol=1e-13, atol=1e-15)
    assert torch.autograd.gradcheck(
        lambda x: squeeze_step(x, tgt, eta=0.3), (z.clone().requires_grad_(True),)
    )
    assert torch.autograd.gradcheck(
        lambda x: squeeze_first_order(x, tgt, eta=0.3), (z.clone().requires_grad_(True),)
    )


def test_squeeze_properties_3000_cases():
    g = torch.Generator().manual_seed(4)
    for _ in range(3000):
        v = int(torch.randint(2, 30, (1,), generator=g))
        z = float(torch.rand(1, generator=g)) * 8 * torch.randn(v, generator=g, dtype=torch.float64)
        t = torch.randint(0, v, (), generator=g)
        eta = float(torch.rand(1, generator=g)) * 5 + 1e-3
        p, q = torch.softmax(z, -1), squeeze_step(z, t, eta=eta)
        assert q[t] < p[t] or p[t] == 1.0  # (a) the target falls
        other = p.clone()
        other[t] = -1
        star = int(other.argmax())
        assert q[star] >= p[star]  # (b) the most likely other token gains


def test_squeeze_first_order_fd_and_eta_squared():
    g = torch.Generator().manual_seed(5)
    for _ in range(20):
        z = 2 * torch.randn(9, generator=g, dtype=torch.float64)
        t = torch.randint(0, 9, (), generator=g)
        lin = squeeze_first_order(z, t, eta=1.0)  # per unit eta
        p = torch.softmax(z, -1)
        for i in range(9):  # closed form by hand
            want = float(p[i]) - (1.0 if i == int(t) else 0.0) - float((p * p).sum()) + float(p[t])
            assert float(lin[i]) == pytest.approx(want, rel=1e-12, abs=1e-15)
        fd = (squeeze_step(z, t, eta=1e-6).log() - p.log()) / 1e-6
        torch.testing.assert_close(fd, lin, rtol=0, atol=1e-5)
        errs = []
        for eta in (1e-1, 5e-2, 2.5e-2, 1.25e-2):
            errs.append(float((squeeze_step(z, t, eta=eta).log() - p.log() - eta * lin).abs().max()))
        ratios = [errs[k] / errs[k + 1] for k in range(3)]
        assert all(3.5 < r < 4.5 for r in ratios), ratios  # O(eta^2)
    with pytest.raises(ValueError, match="eta"):
        squeeze_step(z, t, eta=-1.0)
    with pytest.raises(ValueError, match="target"):
        squeeze_step(z, torch.tensor(9), eta=1.0)
    with pytest.raises(TypeError, match="target"):
        squeeze_step(z, torch.tensor(1.0), eta=1.0)
    with pytest.raises(ValueError, match="target must have shape"):
        squeeze_first_order(z, torch.tensor([1, 2]), eta=1.0)


def _one_token_lm_batch(seed: int, b: int):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, V, (b, 5), generator=g)
    cm = torch.zeros(b, 5, dtype=torch.bool)
    cm[:, 4] = True
    return ids, cm


def test_squeezing_probe_equals_closed_form_on_unembedding(model):
    """Only the untied unembedding W moves: logits z = W h, one step down on log pi(y) gives exactly
    z+ = z - eta ||h||^2 (e_y - pi) — squeeze_step with step eta ||h||^2."""
    ids, cm = _one_token_lm_batch(0, 3)
    eta = 0.5
    w0 = model.lm_head.weight.detach().clone()
    rep = squeezing_probe(model, ids, cm, eta=eta, params=["lm_head.weight"])
    assert torch.equal(model.lm_head.weight, w0)
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    h = out.hidden_states[-1][:, 3].double()
    z = out.logits[:, 3].double()
    for r in range(3):
        q = squeeze_step(z[r], ids[r, 4], eta=eta * float(h[r] @ h[r]))
        p = torch.softmax(z[r], -1)
        a = int(p.argmax())
        assert int(rep.argmax[r, 4]) == a
        assert float(rep.argmax_prob_after[r, 4]) == pytest.approx(float(q[a]), rel=1e-10)
        assert float(rep.target_prob_after[r, 4]) == pytest.approx(float(q[ids[r, 4]]), rel=1e-10)
        assert float(rep.target_prob_before[r, 4]) == pytest.approx(float(p[ids[r, 4]]), rel=1e-12)
        assert float(rep.moved_to_argmax[r, 4]) == pytest.approx(float(q[a] - p[a]), rel=1e-9, abs=1e-15)
        assert rep.target_prob_after[r, 4] < rep.target_prob_before[r, 4]
    assert (rep.argmax[:, :4] == -1).all() and (rep.moved_to_argmax[:, :4] == 0).all()


def test_squeezing_probe_loop_oracle_garbage_and_errors(model):
    batch, _ = make_pairs(6, b=2)
    ids, am, cm = batch["input_ids"][:2], batch["attention_mask"][:2], batch["completion_mask"][:2]
    eta = 1e-2
    rep = squeezing_probe(model, ids, cm, am, eta=eta)
    noisy = ids.clone()
    noisy[am == 0] = 7  # garbage at padding
    rep2 = squeezing_probe(model, noisy, cm, am, eta=eta)
    torch.testing.assert_close(rep2.moved_to_argmax, rep.moved_to_argmax, rtol=1e-10, atol=1e-14)
    params = [p for p in model.parameters()]
    saved = [p.detach().clone() for p in params]
    for r in range(2):  # oracle: manual step, full softmax, token loop
        n = int(am[r].sum())
        seq = ids[r : r + 1, :n]
        logp = torch.log_softmax(model(input_ids=seq).logits[0].double(), -1)
        s = sum(logp[t - 1, seq[0, t]] for t in range(1, n) if cm[r, t])
        grads = torch.autograd.grad(s, params)
        with torch.no_grad():
            p_before = torch.softmax(model(input_ids=seq).logits[0].double(), -1)
            for p, gr in zip(params, grads):
                p -= eta * gr
            p_after = torch.softmax(model(input_ids=seq).logits[0].double(), -1)
            for p, keep in zip(params, saved):
                p.copy_(keep)
        for t in range(1, ids.shape[1]):
            if not cm[r, t]:
                assert rep.argmax[r, t] == -1 and rep.moved_to_argmax[r, t] == 0
                continue
            a = int(p_before[t - 1].argmax())
            assert int(rep.argmax[r, t]) == a
            assert float(rep.argmax_prob_after[r, t]) == pytest.approx(float(p_after[t - 1, a]), rel=1e-9)
            assert float(rep.target_prob_after[r, t]) == pytest.approx(
                float(p_after[t - 1, ids[r, t]]), rel=1e-9
            )
            assert bool(rep.argmax_is_target[r, t]) == (a == int(ids[r, t]))
    for p, keep in zip(params, saved):
        assert torch.equal(p, keep)
    with pytest.raises(ValueError, match="eta"):
        squeezing_probe(model, ids, cm, am, eta=0.0)
    with pytest.raises(TypeError, match="completion_mask"):
        squeezing_probe(model, ids, None, am)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no completion"):
        squeezing_probe(model, ids, torch.zeros_like(cm), am)
    with pytest.raises(ValueError, match="params"):
        squeezing_probe(model, ids, cm, am, params=["nope"])


# ----------------------------------------------------------------------------------------------------------
# one-token gradient inner products
# ----------------------------------------------------------------------------------------------------------


def test_tabular_grad_inner_autograd():
    g = torch.Generator().manual_seed(6)
    for _ in range(30):
        v = int(torch.randint(2, 12, (1,), generator=g))
        z = 3 * torch.randn(v, generator=g, dtype=torch.float64)
        w, l_ = torch.randint(0, v, (2,), generator=g)
        zz = z.clone().requires_grad_(True)
        gw = torch.autograd.grad(torch.log_softmax(zz, -1)[w], zz)[0]
        gl = torch.autograd.grad(torch.log_softmax(zz, -1)[l_], zz)[0]
        inner, nw, nl = tabular_grad_inner(torch.softmax(z, -1), w, l_)
        torch.testing.assert_close(inner, gw @ gl, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(nw, gw @ gw, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(nl, gl @ gl, rtol=1e-12, atol=1e-14)
    with pytest.raises(ValueError, match="rejected"):
        tabular_grad_inner(torch.softmax(z, -1), w, torch.tensor(v))
    with pytest.raises(TypeError, match="chosen"):
        tabular_grad_inner(torch.softmax(z, -1), 1, l_)  # type: ignore[arg-type]


def _dpo_step(dpo, z, w, l_, ref, eta: float):
    """A real SGD step of size eta on the DPO loss of the one-token pair (w, l_), logits z as parameters;
    returns the changes of log pi(w) and log pi(l_)."""
    zz = z.clone().requires_grad_(True)
    lp = torch.log_softmax(zz, -1)
    pair = PairLogps(chosen=lp[w : w + 1], rejected=lp[l_ : l_ + 1], ref_chosen=ref[:1], ref_rejected=ref[1:])
    (gz,) = torch.autograd.grad(dpo(pair).loss.sum(), zz)
    lp2 = torch.log_softmax(z - eta * gz, -1)
    lp = lp.detach()
    return float(lp2[w] - lp[w]), float(lp2[l_] - lp[l_])


def test_tabular_dpo_step_never_displaces_2000_cases():
    """Logits as parameters, one context, w != l: <g_w,g_l> - ||g_w||^2 = pi_w - pi_l - 1 < 0, and a real DPO
    step raises pi_w and lowers pi_l; the first-order prediction matches a real step with O(eta^2) error."""
    g = torch.Generator().manual_seed(7)
    dpo = get_loss("dpo", beta=0.5)
    for case in range(2000):
        v = int(torch.randint(2, 16, (1,), generator=g))
        z = float(torch.rand(1, generator=g)) * 6 * torch.randn(v, generator=g, dtype=torch.float64)
        w, l_ = torch.randperm(v, generator=g)[:2]
        ref = torch.randn(2, generator=g, dtype=torch.float64)
        p = torch.softmax(z, -1)
        inner, nw, _ = tabular_grad_inner(p, w, l_)
        assert float(inner - nw) == pytest.approx(float(p[w] - p[l_] - 1), abs=1e-12)

        def step(eta: float, z=z, w=w, l_=l_, ref=ref):
            return _dpo_step(dpo, z, w, l_, ref, eta)

        dw, dl = step(1e-2)
        assert dw > 0 and dl < 0
        if case < 20:
            h = (math.log(float(p[w])) - float(ref[0])) - (math.log(float(p[l_])) - float(ref[1]))
            d = 0.5 * torch.sigmoid(torch.tensor(-0.5 * h, dtype=torch.float64)).item()
            pred_w = d * float(nw - inner)  # per unit eta: d_w ||g_w||^2 - d_l <g_w,g_l>
            errs = [abs(step(eta)[0] - eta * pred_w) for eta in (4e-2, 2e-2, 1e-2, 5e-3)]
            assert all(3.5 < errs[k] / errs[k + 1] < 4.5 for k in range(3)), errs


def test_unembedding_and_hidden_grad_inner_autograd():
    g = torch.Generator().manual_seed(8)
    W = torch.randn(7, 4, generator=g, dtype=torch.float64)
    for _ in range(20):
        h, h2 = (
            torch.randn(4, generator=g, dtype=torch.float64),
            torch.randn(4, generator=g, dtype=torch.float64),
        )
        a, b = torch.randint(0, 7, (2,), generator=g)
        Wp = W.clone().requires_grad_(True)
        ga = torch.autograd.grad(torch.log_softmax(Wp @ h, -1)[a], Wp)[0]
        gb = torch.autograd.grad(torch.log_softmax(Wp @ h2, -1)[b], Wp)[0]
        got = unembedding_grad_inner(torch.softmax(W @ h, -1), a, h, torch.softmax(W @ h2, -1), b, h2)
        torch.testing.assert_close(got, (ga * gb).sum(), rtol=1e-12, atol=1e-13)
        same = unembedding_grad_inner(torch.softmax(W @ h, -1), a, h, torch.softmax(W @ h, -1), b, h)
        tab = tabular_grad_inner(torch.softmax(W @ h, -1), a, b)[0]
        torch.testing.assert_close(same, tab * (h @ h), rtol=1e-12, atol=1e-13)
        hp = h.clone().requires_grad_(True)
        gha = torch.autograd.grad(torch.log_softmax(W @ hp, -1)[a], hp)[0]
        ghb = torch.autograd.grad(torch.log_softmax(W @ hp, -1)[b], hp)[0]
        inner, na, nb = hidden_grad_inner(W, torch.softmax(W @ h, -1), a, b)
        torch.testing.assert_close(inner, gha @ ghb, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(na, gha @ gha, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(nb, ghb @ ghb, rtol=1e-12, atol=1e-13)
    with pytest.raises(ValueError, match="unembedding"):
        hidden_grad_inner(W[:3], torch.softmax(W @ h, -1), a, b)
    with pytest.raises(ValueError, match="hidden_b"):
        unembedding_grad_inner(torch.softmax(W @ h, -1), a, h, torch.softmax(W @ h, -1), b, h[:2])


@pytest.mark.filterwarnings("ignore:per-row gradients of lm_head.weight use a loop")
def test_entanglement_matches_unembedding_closed_form(model):
    """Ground truth for the report: one-token completions, only lm_head.weight differentiated ⇒
    <∇_w, ∇_l> = <e_w − π, e_l − π'><h, h'> and the norms likewise, to float64 precision."""
    b = 4
    ids, cm = _one_token_lm_batch(11, 2 * b)
    ids[b : b + 2, :4] = ids[:2, :4]  # pairs 0, 1: same prompt; pairs 2, 3: different prompts
    ids[b, 4] = ids[0, 4]  # pair 0: identical responses
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": cm}
    rep = entanglement(model, batch, params=["lm_head.weight"], eta=1e-3)
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    h = out.hidden_states[-1][:, 3].double()
    p = torch.softmax(out.logits[:, 3].double(), -1)
    y = ids[:, 4]
    inner = unembedding_grad_inner(p[:b], y[:b], h[:b], p[b:], y[b:], h[b:])
    nw = unembedding_grad_inner(p[:b], y[:b], h[:b], p[:b], y[:b], h[:b])
    nl = unembedding_grad_inner(p[b:], y[b:], h[b:], p[b:], y[b:], h[b:])
    torch.testing.assert_close(rep.inner, inner, rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(rep.chosen_sqnorm, nw, rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(rep.rejected_sqnorm, nl, rtol=1e-11, atol=1e-12)
    tab_inner, tab_nw, _ = tabular_grad_inner(p[1], y[1], y[b + 1])
    torch.testing.assert_close(rep.inner[1], tab_inner * (h[1] @ h[1]), rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(rep.chosen_sqnorm[1], tab_nw * (h[1] @ h[1]), rtol=1e-11, atol=1e-12)
    assert not rep.chosen_falls[1]  # same context, different tokens: never displaces
