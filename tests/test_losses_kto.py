"""Tests of KTO and APO-zero-unpaired (prefopt.losses.unpaired).

Oracles: hand-derived numbers (plain ``math``); a per-example Python loop transcribing TRL 1.16's
``KTOTrainer`` loss (``kl = mean(KL_logps − ref_KL_logps).detach().clamp(min=0)``, chosen/rejected branches,
weights) — TRL is not imported; float64 gradcheck; hypothesis properties.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import prefopt.registry as reg
from prefopt.losses import unpaired
from prefopt.types import PairLogps, UnpairedLogps


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def make(logp, ref, des, kl=None, kl_ref=None, dtype=torch.float64, grad=False) -> UnpairedLogps:
    t = lambda v: None if v is None else torch.tensor(v, dtype=dtype).requires_grad_(grad)  # noqa: E731
    return UnpairedLogps(t(logp), t(ref), torch.tensor(des), t(kl), t(kl_ref))


def test_kto_hand_value():
    # rho = [1, -2, 0.5]; KL pairs: mean([-1, 3] - [-2, 1]) = mean([1, 2]) = 1.5 -> z0 = 1.5
    u = make([-9.0, -12.0, -4.5], [-10.0, -10.0, -5.0], [True, False, True], [-1.0, 3.0], [-2.0, 1.0])
    out = reg.get_loss("kto", beta=0.2, desirable_weight=1.5, undesirable_weight=0.7)(u)
    expected = [
        1.5 * (1 - sig(0.2 * (1.0 - 1.5))),
        0.7 * (1 - sig(0.2 * (1.5 - (-2.0)))),
        1.5 * (1 - sig(0.2 * (0.5 - 1.5))),
    ]
    torch.testing.assert_close(out.loss, torch.tensor(expected, dtype=torch.float64), rtol=1e-13, atol=1e-13)
    assert out.metrics["kl"].item() == pytest.approx(1.5)
    torch.testing.assert_close(out.metrics["rewards"], torch.tensor([0.2, -0.4, 0.1], dtype=torch.float64))
    torch.testing.assert_close(out.metrics["desirable"], torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64))


def test_kto_reference_point_clamped_at_zero_and_default():
    u = make([-1.0], [-1.0], [True], [-5.0, -6.0], [-1.0, -1.0])  # mean KL = -4.5 -> clamped to 0
    assert unpaired.kto_reference_point(u).item() == 0.0
    assert unpaired.kto_reference_point(make([-1.0], [-1.0], [True])).item() == 0.0


def test_kto_zero_point():
    # rho = z0 for every example -> loss = weight / 2
    u = make([-3.0, -4.0], [-4.0, -5.0], [True, False], [0.0, 0.0], [-1.0, -1.0])
    out = reg.get_loss("kto", desirable_weight=2.0, undesirable_weight=0.6)(u)
    torch.testing.assert_close(out.loss, torch.tensor([1.0, 0.3], dtype=torch.float64))


def test_kto_no_gradient_through_reference_point():
    u = make([-3.0, -4.0], [-4.0, -5.0], [True, False], [0.5, 2.0], [-1.0, -1.0], grad=True)
    out = reg.get_loss("kto")(u)
    out.loss.sum().backward()
    assert u.logp.grad is not None and u.kl_logp.grad is None and u.kl_ref_logp.grad is None


def trl_kto_loop(u: UnpairedLogps, beta, wd, wu) -> float:
    """TRL 1.16 KTOTrainer: concatenate desirable then undesirable losses, nanmean."""
    if u.kl_logp is not None:
        kl = max(0.0, sum(a - b for a, b in zip(u.kl_logp.tolist(), u.kl_ref_logp.tolist())) / len(u.kl_logp))
    else:
        kl = 0.0
    chosen, rejected = [], []
    for lp, ref, d in zip(u.logp.tolist(), u.ref_logp.tolist(), u.desirable.tolist()):
        r = lp - ref
        if d:
            chosen.append(wd * (1 - sig(beta * (r - kl))))
        else:
            rejected.append(wu * (1 - sig(beta * (kl - r))))
    losses = chosen + rejected
    return sum(losses) / len(losses)


@given(
    rows=st.lists(st.tuples(st.floats(-60, 0), st.floats(-60, 0), st.booleans()), min_size=2, max_size=8),
    kl=st.lists(st.tuples(st.floats(-60, 0), st.floats(-60, 0)), min_size=1, max_size=8),
    beta=st.floats(0.01, 2.0),
    wd=st.floats(0.0, 3.0),
    wu=st.floats(0.0, 3.0),
)
@settings(max_examples=40, deadline=None)
def test_kto_matches_trl_loop(rows, kl, beta, wd, wu):
    u = make(
        [r[0] for r in rows],
        [r[1] for r in rows],
        [r[2] for r in rows],
        [k[0] for k in kl],
        [k[1] for k in kl],
    )
    ours = reg.get_loss("kto", beta=beta, desirable_weight=wd, undesirable_weight=wu)(u).loss.mean().item()
    assert ours == pytest.approx(trl_kto_loop(u, beta, wd, wu), rel=1e-12, abs=1e-12)


def test_apo_zero_unpaired_hand_value():
    u = make([-9.0, -12.0], [-10.0, -10.0], [True, False], [5.0], [0.0])  # KL pairs ignored
    out = reg.get_loss("apo_zero_unpaired", beta=0.5)(u)
    torch.testing.assert_close(out.loss, torch.tensor([1 - sig(0.5), sig(-1.0)], dtype=torch.float64))
    assert out.metrics["kl"].item() == 0.0
    # zero point: rho = 0 -> weight / 2
    z = reg.get_loss("apo_zero_unpaired")(make([-1.0, -2.0], [-1.0, -2.0], [True, False]))
    torch.testing.assert_close(z.loss, torch.tensor([0.5, 0.5], dtype=torch.float64))


@pytest.mark.parametrize("name", ["kto", "apo_zero_unpaired"])
def test_gradcheck(name):
    des = torch.tensor([True, False, True, False])
    kl = torch.tensor([-3.0, -1.0, 2.0], dtype=torch.float64)
    kl_ref = torch.tensor([-4.0, -2.5, 0.0], dtype=torch.float64)
    fn = reg.get_loss(name, beta=0.3, desirable_weight=1.3, undesirable_weight=0.8)

    def f(lp, ref):
        return fn(UnpairedLogps(lp, ref, des, kl, kl_ref)).loss

    lp = torch.tensor([-3.0, -7.0, -1.0, -20.0], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([-4.0, -6.5, -1.5, -18.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(f, (lp, ref))


@given(
    rows=st.lists(st.tuples(st.floats(-1e4, 0), st.floats(-1e4, 0), st.booleans()), min_size=1, max_size=6)
)
@settings(max_examples=30, deadline=None)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["kto", "apo_zero_unpaired"])
def test_finite_and_signs_at_extremes(name, dtype, rows):
    u = make(
        [r[0] for r in rows],
        [r[1] for r in rows],
        [r[2] for r in rows],
        [r[1] for r in rows],
        [r[0] for r in rows],
        dtype=dtype,
        grad=True,
    )
    out = reg.get_loss(name)(u)
    assert out.loss.dtype == torch.float32 and out.loss.shape == (len(rows),)
    assert torch.isfinite(out.loss).all()
    (g,) = torch.autograd.grad(out.loss.sum(), (u.logp,))
    assert torch.isfinite(g).all()
    # desirable: loss decreases as logp grows; undesirable: increases
    assert (g[u.desirable] <= 0).all() and (g[~u.desirable] >= 0).all()


@pytest.mark.parametrize(
    ("hp", "param"),
    [
        ({"beta": 0.0}, "beta"),
        ({"desirable_weight": -1.0}, "desirable_weight"),
        ({"undesirable_weight": -0.1}, "undesirable_weight"),
    ],
)
def test_bad_hyperparameters(hp, param):
    with pytest.raises(ValueError, match=param):
        reg.get_loss("kto", **hp)
    with pytest.raises(ValueError, match=param):
        unpaired.kto(make([-1.0], [-1.0], [True]), **hp)


def test_wrong_input_type_and_empty_kl():
    z = torch.zeros(2)
    with pytest.raises(TypeError, match="logps"):
        reg.get_loss("kto")(PairLogps(z, z, z, z))
    with pytest.raises(ValueError, match="kl_logp"):
        reg.get_loss("kto")(UnpairedLogps(z, z, torch.tensor([True, False]), torch.zeros(0), torch.zeros(0)))


def test_check_finite_names_field():
    u = make([-1.0, float("inf")], [-1.0, -1.0], [True, False])
    with pytest.raises(ValueError, match="logp"):
        reg.get_loss("kto")(u, check_finite=True)
    bad_kl = make([-1.0], [-1.0], [True], [float("nan")], [0.0])
    with pytest.raises(ValueError, match="kl_logp"):
        reg.get_loss("kto")(bad_kl, check_finite=True)


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_against_real_trl(loss_type):
    """TRL's own ``KTOTrainer._compute_loss`` on a stand-in ``self`` and fused-LM-head model (fixed log-probs)."""
    trl = pytest.importorskip("trl")
    if trl.__version__ != "1.16.0":
        pytest.skip(f"compared against TRL 1.16.0, found {trl.__version__}")
    from collections import defaultdict
    from types import SimpleNamespace

    from trl.trainer.kto_trainer import KTOTrainer

    g = torch.Generator().manual_seed(0)
    n, t = 8, 9
    lens = torch.tensor([3, 8, 5, 1, 6, 2, 7, 4])
    cm = torch.arange(t)[None, :] >= (t - lens)[:, None]
    tok = -(torch.rand(n, t - 1, generator=g, dtype=torch.float64) * 3) * cm[:, 1:]
    kl_tok = -(torch.rand(n, t - 1, generator=g, dtype=torch.float64) * 3) * cm[:, 1:]
    ref = tok.sum(1) * 0.9 - 1.0
    ref_kl = kl_tok.sum(1) * 1.1 + 0.5
    lab = torch.tensor([True, False, True, True, False, False, True, False])

    class Acc:
        device = torch.device("cpu")

        def gather_for_metrics(self, x):
            return x

    def out_of(lp):
        return SimpleNamespace(
            log_probs=lp,
            entropy=torch.zeros(n, t - 1),
            mean_logits=torch.zeros(n, t - 1),
            is_top1=torch.zeros(n, t - 1, dtype=torch.bool),
            aux_loss=None,
        )

    class Model:
        training = True

        def __call__(self, **kw):  # the KL forward is recognised by its marked input_ids
            return out_of(kl_tok if int(kw["input_ids"].sum()) == 1 else tok)

    kl_ids = torch.zeros(n, t, dtype=torch.long)
    kl_ids[0, 0] = 1
    for beta, wd, wu in ((0.1, 1.0, 1.0), (0.4, 1.3, 0.7)):
        s = SimpleNamespace(
            model=Model(),
            accelerator=Acc(),
            precompute_ref_logps=True,
            calculate_KL=loss_type == "kto",
            loss_type=loss_type,
            beta=beta,
            desirable_weight=wd,
            undesirable_weight=wu,
            aux_loss_enabled=False,
            _metrics=defaultdict(lambda: defaultdict(list)),
            _total_train_tokens=0,
            _tp_size=1,
            args=SimpleNamespace(gradient_checkpointing_kwargs=None),
            ref_model=None,
        )
        s._compute_kl_logps = lambda m, b, _s=s: KTOTrainer._compute_kl_logps(_s, m, b)
        batch = {
            "input_ids": torch.zeros(n, t, dtype=torch.long),
            "attention_mask": torch.ones(n, t, dtype=torch.long),
            "completion_mask": cm.long(),
            "label": lab,
            "ref_logps": ref,
            "ref_KL_logps": ref_kl,
            "KL_input_ids": kl_ids,
            "KL_attention_mask": torch.ones(n, t, dtype=torch.long),
            "KL_completion_mask": cm.long(),
        }
        theirs = KTOTrainer._compute_loss(s, s.model, batch, False)
        u = UnpairedLogps(tok.sum(1), ref, lab, kl_tok.sum(1), ref_kl)
        out = reg.get_loss(loss_type, beta=beta, desirable_weight=wd, undesirable_weight=wu)(u)
        torch.testing.assert_close(out.loss.mean(), theirs, rtol=1e-12, atol=1e-12)
        assert out.metrics["kl"].item() == pytest.approx(s._metrics["train"]["kl"][-1], rel=1e-12)
