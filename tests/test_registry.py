"""Tests of the loss registry (prefopt.registry): names, hyperparameter validation, input checks, upcasting.

Toy losses are registered into a private copy of the registry (``isolated`` fixture) so that nothing leaks
into ``available_losses()`` for other test files.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch

import prefopt.registry as reg
from prefopt.registry import between, ge, gt, one_of, register_loss
from prefopt.types import LossOutput, PairLogps

Z = torch.zeros(3)


@pytest.fixture
def isolated(monkeypatch):
    reg.available_losses()  # load the real modules first, then work on a copy
    monkeypatch.setattr(reg, "_REGISTRY", dict(reg._REGISTRY))
    return reg


def _toy(isolated_reg, name="_toy", **kw):
    @register_loss(
        name, inputs="pairs", needs_reference=True, checks={"beta": gt(0), "mode": one_of("a", "b")}, **kw
    )
    def toy(
        logps: PairLogps, extra: torch.Tensor | None = None, *, beta: float = 0.5, mode: str = "a"
    ) -> LossOutput:
        """Toy: beta * (chosen - rejected)."""
        loss = beta * (logps.chosen - logps.rejected)
        if extra is not None:
            loss = loss + extra
        return LossOutput(loss=loss, metrics={"dtype_probe": logps.chosen.detach()})

    return toy


# ------------------------------------------------------------------------------------------------------
# names
# ------------------------------------------------------------------------------------------------------


def test_available_losses_sorted_and_contains_the_zoo():
    names = reg.available_losses()
    assert names == sorted(names)
    for n in ("dpo", "ipo", "simpo", "kto", "mpo", "orpo", "cpo", "robust_dpo"):
        assert n in names
    assert set(reg.available_losses("reference_free")) >= {"simpo", "cpo", "orpo", "rrhf", "slic"}
    assert "dpo" not in reg.available_losses("reference_free")
    assert reg.available_losses("no_such_family") == []


def test_unknown_name_lists_available():
    with pytest.raises(KeyError) as info:
        reg.get_loss("dpoo")
    msg = str(info.value)
    assert "unknown loss 'dpoo'" in msg
    for n in reg.available_losses():
        assert n in msg
    with pytest.raises(KeyError, match="unknown loss"):
        reg.get_spec(["dpo"])  # type: ignore[arg-type]


@pytest.mark.parametrize("name", reg.available_losses())
def test_every_registered_loss_is_well_formed(name):
    spec = reg.get_spec(name)
    assert spec.doc, f"{name} has no docstring"
    bound = reg.get_loss(name)  # defaults pass their own checks
    assert dict(bound.hparams) == dict(spec.defaults)
    params = inspect.signature(spec.fn).parameters.values()
    kw = [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]
    assert set(kw) - set(spec.data_args) == set(spec.defaults)
    assert spec.inputs in reg.INPUT_KINDS
    assert spec.family == spec.fn.__module__.rsplit(".", 1)[-1]
    assert set(spec.checks) <= set(spec.defaults)


# ------------------------------------------------------------------------------------------------------
# hyperparameters
# ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "hp", "needle"),
    [
        ("dpo", {"beta": 0.0}, "dpo: hyperparameter beta=0.0 is out of range; allowed: a finite number > 0"),
        ("dpo", {"beta": -1}, "beta=-1"),
        ("dpo", {"beta": True}, "beta=True"),  # bools are not numbers here
        ("dpo", {"beta": "0.1"}, "beta='0.1'"),
        ("dpo", {"beta": math.inf}, "beta=inf"),
        ("robust_dpo", {"label_smoothing": 0.5}, "allowed: a number in [0.0, 0.5)"),
        ("cdpo", {"label_smoothing": 0.51}, "label_smoothing"),
        ("dpo", {"f_divergence": "kl"}, "allowed: one of 'reverse_kl', 'forward_kl'"),
    ],
)
def test_out_of_range_hyperparameter_is_named(name, hp, needle):
    with pytest.raises(ValueError) as info:
        reg.get_loss(name, **hp)
    assert needle in str(info.value)


def test_unknown_hyperparameter():
    with pytest.raises(
        ValueError, match=r"dpo: unknown hyperparameter\(s\) bta; accepted: beta, f_alpha, f_divergence"
    ):
        reg.get_loss("dpo", bta=0.1)


def test_direct_call_validates_and_passes_hyperparameters(isolated):
    toy = _toy(isolated)
    lp = PairLogps(torch.tensor([1.0]), torch.tensor([0.0]), torch.zeros(1), torch.zeros(1))
    assert toy(lp).loss.item() == 0.5
    assert toy(lp, beta=2.0).loss.item() == 2.0
    with pytest.raises(ValueError, match="beta"):
        toy(lp, beta=-2.0)
    with pytest.raises(ValueError, match="mode"):
        toy(lp, mode="c")
    b = isolated.get_loss("_toy", beta=3.0)
    assert b(lp).loss.item() == 3.0 and b.needs_reference and b.name == "_toy"
    assert b.hparams == {"beta": 3.0, "mode": "a"}


def test_checks_edges():
    assert gt(0).predicate(1e-300) and not gt(0).predicate(0) and not gt(0).predicate(float("nan"))
    assert ge(0).predicate(0) and not ge(0).predicate(-1e-300)
    assert between(0, 1).predicate(0) and between(0, 1).predicate(1)
    assert not between(0, 1, lo_open=True).predicate(0) and not between(0, 1, hi_open=True).predicate(1)
    assert between(0, 1, lo_open=True, hi_open=True).allowed == "a number in (0, 1)"
    assert one_of("a", "b").predicate("a") and not one_of("a", "b").predicate("c")
    assert not gt(0).predicate(None) and not between(0, 1).predicate([0.5])


def test_validator_cross_parameter(isolated):
    def rule(hp):
        if hp["lo"] >= hp["hi"]:
            raise ValueError(f"lo must be < hi, got lo={hp['lo']}, hi={hp['hi']}")

    @register_loss("_toy_rule", inputs="pairs", validator=rule)
    def toy(logps: PairLogps, *, lo: float = 0.0, hi: float = 1.0) -> LossOutput:
        """Toy."""
        return LossOutput(loss=logps.chosen)

    isolated.get_loss("_toy_rule", lo=0.5)
    with pytest.raises(ValueError, match="lo must be < hi"):
        isolated.get_loss("_toy_rule", lo=2.0)


def test_registration_errors(isolated):
    _toy(isolated)
    with pytest.raises(ValueError, match="already registered"):
        _toy(isolated)
    with pytest.raises(TypeError, match="needs a default"):

        @register_loss("_toy_nodefault", inputs="pairs")
        def a(logps: PairLogps, *, beta: float) -> LossOutput:
            return LossOutput(loss=logps.chosen)

    with pytest.raises(TypeError, match="unknown hyperparameter"):

        @register_loss("_toy_badcheck", inputs="pairs", checks={"gamma": gt(0)})
        def b(logps: PairLogps, *, beta: float = 1.0) -> LossOutput:
            return LossOutput(loss=logps.chosen)


# ------------------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------------------


def test_missing_reference():
    lp = PairLogps(Z, Z)
    with pytest.raises(ValueError, match="dpo needs reference log-probs"):
        reg.get_loss("dpo")(lp)
    from prefopt.losses.margin import dpo

    with pytest.raises(ValueError, match="dpo needs reference log-probs"):
        dpo(lp)
    reg.get_loss("simpo")(
        PairLogps(-torch.ones(3), -torch.ones(3), chosen_len=torch.ones(3), rejected_len=torch.ones(3))
    )


def test_mismatched_shapes_named():
    with pytest.raises(ValueError, match="ref_chosen has shape"):
        PairLogps(Z, Z, torch.zeros(2), torch.zeros(2))


def test_check_finite(isolated):
    toy = _toy(isolated)
    nan = torch.tensor([0.0, float("nan"), 0.0])
    with pytest.raises(ValueError, match="ref_chosen"):
        reg.get_loss("dpo")(PairLogps(Z, Z, nan, Z), check_finite=True)
    lp = PairLogps(Z, Z, Z, Z)
    with pytest.raises(ValueError, match="extra"):  # a positional tensor is named by its parameter
        toy(lp, nan, check_finite=True)
    with pytest.raises(ValueError, match="extra"):
        toy(lp, extra=nan, check_finite=True)
    with pytest.raises(ValueError, match="extra"):
        isolated.get_loss("_toy")(lp, nan, check_finite=True)
    assert torch.isnan(toy(lp, nan).loss).any()  # off by default (it synchronizes the device)


def test_upcast_half_to_float32_and_keeps_float64(isolated):
    toy = _toy(isolated)
    bf = torch.tensor([1.0, 2.0], dtype=torch.bfloat16, requires_grad=True)
    out = toy(PairLogps(bf, bf.detach() * 0, bf.detach() * 0, bf.detach() * 0))
    assert out.loss.dtype == torch.float32 and out.metrics["dtype_probe"].dtype == torch.float32
    out.loss.sum().backward()
    assert bf.grad is not None and bf.grad.dtype == torch.bfloat16
    f64 = torch.zeros(2, dtype=torch.float64)
    assert toy(PairLogps(f64, f64, f64, f64)).loss.dtype == torch.float64
    extra16 = torch.ones(2, dtype=torch.float16)
    assert (
        isolated.get_loss("_toy")(PairLogps(Z[:2], Z[:2], Z[:2], Z[:2]), extra16).loss.dtype == torch.float32
    )


def test_upcast_can_be_disabled(isolated):
    @register_loss("_toy_noup", inputs="pairs", upcast=False)
    def toy(logps: PairLogps) -> LossOutput:
        """Toy."""
        return LossOutput(loss=logps.chosen * 1)

    bf = torch.zeros(2, dtype=torch.bfloat16)
    assert toy(PairLogps(bf, bf)).loss.dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------------------
# contract defects found in review (fixed); these tests keep them fixed
# ------------------------------------------------------------------------------------------------------


def test_check_finite_for_keyword_dataclass():
    nan = torch.tensor([0.0, float("nan"), 0.0])
    with pytest.raises(ValueError, match="ref_chosen"):
        reg.get_loss("dpo")(logps=PairLogps(Z, Z, nan, Z), check_finite=True)


def test_bound_loss_rejects_call_time_hyperparameter_clearly():
    with pytest.raises((TypeError, ValueError), match="hyperparameter"):
        reg.get_loss("dpo")(PairLogps(Z, Z, Z, Z), beta=0.5)


def test_numpy_float32_hyperparameter_accepted():
    np = pytest.importorskip("numpy")
    reg.get_loss("dpo", beta=np.float32(0.1))


def test_one_of_distinguishes_bool_from_int():
    assert not one_of(True, False).predicate(1)


# ------------------------------------------------------------------------------------------------------
# input kinds, extras, devices, families
# ------------------------------------------------------------------------------------------------------


def test_wrong_input_kind_names_the_argument_and_kind():
    with pytest.raises(TypeError, match=r"dpo: logps must be a PairLogps \(input kind 'pairs'\), got Tensor"):
        reg.get_loss("dpo")(Z)
    from prefopt.losses.unpaired import kto

    with pytest.raises(TypeError, match=r"kto: logps must be a UnpairedLogps"):
        kto(PairLogps(Z, Z, Z, Z))


def test_unknown_input_kind_and_bad_extras_rejected(isolated):
    with pytest.raises(ValueError, match="not an input kind"):
        register_loss("_toy_kind", inputs="sequences")
    with pytest.raises(TypeError, match="extras"):

        @register_loss("_toy_extras", inputs="tokens", extras=("values",))
        def a(logp: torch.Tensor, *, beta: float = 1.0) -> LossOutput:
            return LossOutput(loss=logp)


def test_extras_are_data_not_hyperparameters(isolated):
    @register_loss("_toy_x", inputs="tokens", extras=("values",), checks={"coef": ge(0)})
    def toy(logp: torch.Tensor, mask: torch.Tensor, *, values: torch.Tensor | None = None, coef: float = 1.0):
        """Toy."""
        return LossOutput(loss=logp if values is None else logp + coef * values)

    spec = isolated.get_spec("_toy_x")
    assert spec.defaults == {"coef": 1.0}
    assert spec.data_args == ("mask", "values") and spec.required_data == ("mask",)
    assert spec.family == "custom"
    bound = isolated.get_loss("_toy_x", coef=2.0)
    torch.testing.assert_close(bound(Z, Z, values=torch.ones(3)).loss, torch.full((3,), 2.0))
    nan = torch.tensor([0.0, float("nan"), 0.0])
    with pytest.raises(ValueError, match="values"):
        bound(Z, Z, values=nan, check_finite=True)


def test_family_is_the_defining_module(isolated):
    assert reg.get_spec("dpo").family == "margin"
    assert reg.get_spec("simpo").family == "reference_free"
    assert set(reg.available_losses("policy_gradient")) >= {"grpo", "ppo", "reinforce", "rloo"}
    with pytest.raises(ValueError, match=r"family of a loss in prefopt\.losses is its module"):
        reg._family_of(reg.get_spec("dpo").fn, "reward")


def test_tensors_on_two_devices_are_named():
    meta = torch.zeros(3, device="meta")
    with pytest.raises(ValueError, match=r"ref_chosen is on meta but chosen is on cpu"):
        reg.get_loss("dpo")(PairLogps(Z, Z, meta, meta))
