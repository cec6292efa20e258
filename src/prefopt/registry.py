"""The single list of loss names: ``register_loss`` / ``get_loss`` / ``available_losses``.

Registering a loss is one decorator on a pure function. Its first parameter is the loss's main input, of the
declared input kind; further *data* arguments are positional (or keyword-only and listed in ``extras``); its
*hyperparameters* are the remaining keyword-only parameters, each with a default:

    @register_loss("dpo", inputs="pairs", needs_reference=True, checks={"beta": gt(0)})
    def dpo(logps: PairLogps, *, beta: float = 0.1) -> LossOutput: ...

The **family** of a loss is the name of the module of ``prefopt.losses`` that defines it (``margin``,
``reference_free``, ``policy_gradient``, ...); a loss registered elsewhere passes ``family=`` or gets
``"custom"``. Every module of ``prefopt.losses`` is imported on the first lookup, so a new family file needs
no list entry.

The **input kinds** ([`INPUT_KINDS`][prefopt.registry.INPUT_KINDS]) say what the first argument is:

| kind          | first argument                                                        | families             |
|---------------|-----------------------------------------------------------------------|----------------------|
| `pairs`       | [`PairLogps`][prefopt.types.PairLogps]                                 | margin, reference-free, combined, decoupled |
| `unpaired`    | [`UnpairedLogps`][prefopt.types.UnpairedLogps]                         | unpaired (KTO)       |
| `tokens`      | per-token tensor `(b, t)`: `logp, old_logp, advantages, mask`           | policy gradient      |
| `token_pairs` | per-token tensor `(2B, t)` of pairs, chosen rows first                  | decoupled            |
| `best_of_n`   | [`BestOfNSamples`][prefopt.types.BestOfNSamples]                       | bond                 |
| `rewards`     | reward-model outputs, a tensor `(b,)`                                   | reward               |

The wrapper checks the kind of the first argument, the presence of reference log-probs for losses that need
them, that every tensor input sits on one device (the error names the argument), and (with
``check_finite=True``) finiteness. The decorated function stays directly callable (hyperparameters are
validated on every direct call); ``get_loss(name, **hparams)`` validates once and returns a
[`BoundLoss`][prefopt.registry.BoundLoss]. Half-precision inputs are upcast to float32 before the loss is
computed; float64 stays float64.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
import numbers
import pkgutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from prefopt.types import (
    BestOfNSamples,
    LossOutput,
    PairLogps,
    UnpairedLogps,
    _TensorFields,
    _upcast,
    check_finite,
)

__all__ = [
    "INPUT_KINDS",
    "BoundLoss",
    "Check",
    "LossSpec",
    "available_losses",
    "between",
    "ge",
    "get_loss",
    "get_spec",
    "gt",
    "one_of",
    "register_loss",
]


# ----------------------------------------------------------------------------------------------------------
# hyperparameter checks
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    """A predicate on one hyperparameter with a human-readable description of the allowed values."""

    predicate: Callable[[Any], bool]
    allowed: str

    def __call__(self, loss: str, name: str, value: Any) -> None:
        ok = False
        try:
            ok = bool(self.predicate(value))
        except TypeError:
            ok = False
        if not ok:
            raise ValueError(
                f"{loss}: hyperparameter {name}={value!r} is out of range; allowed: {self.allowed}"
            )


def _is_real(x: Any) -> bool:
    """A finite real number (Python or NumPy scalar), not a bool."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(float(x))


def gt(lo: float) -> Check:
    """``value > lo`` (a finite real number)."""
    return Check(lambda v: _is_real(v) and v > lo, f"a finite number > {lo}")


def ge(lo: float) -> Check:
    """``value >= lo`` (a finite real number)."""
    return Check(lambda v: _is_real(v) and v >= lo, f"a finite number >= {lo}")


def between(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> Check:
    """``lo <= value <= hi`` with optionally open ends."""

    def pred(v: Any) -> bool:
        if not _is_real(v):
            return False
        left = v > lo if lo_open else v >= lo
        right = v < hi if hi_open else v <= hi
        return left and right

    interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    return Check(pred, f"a number in {interval}")


def one_of(*choices: Any) -> Check:
    """``value`` equals one of ``choices`` (bools and numbers are not interchangeable: ``True != 1`` here)."""

    def pred(v: Any) -> bool:
        return any(v == c and isinstance(v, bool) == isinstance(c, bool) for c in choices)

    return Check(pred, "one of " + ", ".join(repr(c) for c in choices))


# ----------------------------------------------------------------------------------------------------------
# input kinds
# ----------------------------------------------------------------------------------------------------------

INPUT_KINDS: Mapping[str, type] = {
    "pairs": PairLogps,
    "unpaired": UnpairedLogps,
    "tokens": Tensor,
    "token_pairs": Tensor,
    "best_of_n": BestOfNSamples,
    "rewards": Tensor,
}
"""Input kind → the type of a loss's first argument (the table in the module docstring says what each holds)."""


def _tensors(label: str, arg: Any) -> list[tuple[str, Tensor]]:
    if isinstance(arg, Tensor):
        return [(label, arg)]
    if isinstance(arg, _TensorFields):
        return arg._tensor_items()
    return []


# ----------------------------------------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LossSpec:
    """Metadata of a registered loss.

    Attributes:
        name: registry name.
        fn: the undecorated loss function.
        inputs: the input kind of its first argument (a key of [`INPUT_KINDS`][prefopt.registry.INPUT_KINDS]).
        needs_reference: whether it reads reference log-probs.
        family: the module of `prefopt.losses` that defines it (or the `family=` given at registration).
        defaults: hyperparameter name → default.
        checks: hyperparameter name → [`Check`][prefopt.registry.Check].
        validator: optional cross-parameter rule on the merged hyperparameters.
        data_args: names of the data arguments after the first (positional, then keyword-only extras).
        required_data: the data arguments after the first that have no default (must be passed).
        doc: the docstring.
    """

    name: str
    fn: Callable[..., LossOutput]
    inputs: str
    needs_reference: bool
    family: str
    defaults: Mapping[str, Any]
    checks: Mapping[str, Check] = field(default_factory=dict)
    validator: Callable[[Mapping[str, Any]], None] | None = None
    data_args: tuple[str, ...] = ()
    required_data: tuple[str, ...] = ()
    doc: str = ""
    _positional: tuple[str, ...] = field(default=(), repr=False)

    def validate(self, hparams: Mapping[str, Any]) -> dict[str, Any]:
        """Merge ``hparams`` into the defaults, reject unknown names and out-of-range values."""
        unknown = sorted(set(hparams) - set(self.defaults))
        if unknown:
            allowed = ", ".join(sorted(self.defaults)) or "(none)"
            raise ValueError(
                f"{self.name}: unknown hyperparameter(s) {', '.join(unknown)}; accepted: {allowed}"
            )
        merged = {**self.defaults, **hparams}
        for name, check in self.checks.items():
            check(self.name, name, merged[name])
        if self.validator is not None:
            self.validator(merged)
        return merged

    def check_inputs(self, args: tuple[Any, ...], kwargs: Mapping[str, Any], *, finite: bool) -> None:
        """Check the input kind, a missing reference, one device for every tensor and (with ``finite``)
        NaN/inf inputs; errors name the argument (positional or keyword)."""
        names = self._positional
        labelled = [(names[i] if i < len(names) else f"argument {i}", a) for i, a in enumerate(args)]
        labelled += list(kwargs.items())
        first_name = names[0] if names else "input"
        first = args[0] if args else kwargs.get(first_name)
        expected = INPUT_KINDS[self.inputs]
        if not isinstance(first, expected):
            raise TypeError(
                f"{self.name}: {first_name} must be a {expected.__name__} (input kind {self.inputs!r}), "
                f"got {type(first).__name__}"
            )
        if self.needs_reference and isinstance(first, PairLogps) and not first.has_reference:
            raise ValueError(
                f"{self.name} needs reference log-probs: PairLogps.ref_chosen and "
                "PairLogps.ref_rejected are None"
            )
        device: torch.device | None = None
        device_of = ""
        for label, arg in labelled:
            for name, t in _tensors(label, arg):
                if device is None:
                    device, device_of = t.device, name
                elif t.device != device:
                    raise ValueError(
                        f"{self.name}: {name} is on {t.device} but {device_of} is on {device}; "
                        "every tensor input must be on one device"
                    )
        if finite:
            for label, arg in labelled:
                if isinstance(arg, _TensorFields):
                    arg.check_finite()
                elif isinstance(arg, Tensor):
                    check_finite(label, arg)


_REGISTRY: dict[str, LossSpec] = {}


def _upcast_arg(x: Any) -> Any:
    if isinstance(x, _TensorFields):
        return x.upcast()
    if isinstance(x, Tensor):
        return _upcast(x)
    return x


def _family_of(fn: Callable[..., Any], family: str | None) -> str:
    module = getattr(fn, "__module__", "") or ""
    prefix = "prefopt.losses."
    if module.startswith(prefix):
        own = module[len(prefix) :].split(".")[0].lstrip("_")
        if family is not None and family != own:
            raise ValueError(
                f"family={family!r} given for a loss defined in {module}; the family of a loss in "
                f"prefopt.losses is its module ({own!r})"
            )
        return own
    return "custom" if family is None else family


def register_loss(
    name: str,
    *,
    inputs: str,
    needs_reference: bool = False,
    family: str | None = None,
    checks: Mapping[str, Check] | None = None,
    validator: Callable[[Mapping[str, Any]], None] | None = None,
    extras: tuple[str, ...] = (),
    upcast: bool = True,
) -> Callable[[Callable[..., LossOutput]], Callable[..., LossOutput]]:
    """Register ``fn`` under ``name``; its keyword-only parameters not in ``extras`` are its hyperparameters.

    Args:
        name: registry name (must be new).
        inputs: the input kind of the first argument, a key of
            [`INPUT_KINDS`][prefopt.registry.INPUT_KINDS].
        needs_reference: the loss reads ``ref_*`` log-probs; calling it without them raises ``ValueError``.
        family: only for losses defined outside ``prefopt.losses`` (default ``"custom"``); inside, the
            family is the defining module's name.
        checks: per-hyperparameter [`Check`][prefopt.registry.Check] (see `gt`, `ge`, `between`, `one_of`).
        validator: an optional function of all merged hyperparameters for cross-parameter rules.
        extras: keyword-only parameters that are *data* (tensors, default ``None``), not hyperparameters.
        upcast: convert half-precision tensor inputs to float32 before calling ``fn``.
    """
    checks = dict(checks or {})
    if inputs not in INPUT_KINDS:
        raise ValueError(f"{name}: inputs={inputs!r} is not an input kind; one of {sorted(INPUT_KINDS)}")

    def decorate(fn: Callable[..., LossOutput]) -> Callable[..., LossOutput]:
        if name in _REGISTRY:
            raise ValueError(f"a loss named {name!r} is already registered")
        params = list(inspect.signature(fn).parameters.values())
        positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if not positional:
            raise TypeError(f"{name}: the loss needs a positional first argument (its {inputs!r} input)")
        keyword = [p for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]
        unknown_extras = sorted(set(extras) - {p.name for p in keyword})
        if unknown_extras:
            raise TypeError(f"{name}: extras {unknown_extras} are not keyword-only parameters of the loss")
        defaults: dict[str, Any] = {}
        for p in keyword:
            if p.name in extras:
                continue
            if p.default is inspect.Parameter.empty:
                raise TypeError(f"{name}: hyperparameter {p.name} needs a default")
            defaults[p.name] = p.default
        missing = sorted(set(checks) - set(defaults))
        if missing:
            raise TypeError(f"{name}: checks given for unknown hyperparameter(s) {missing}")
        data = [p for p in positional[1:]] + [p for p in keyword if p.name in extras]
        spec = LossSpec(
            name=name,
            fn=fn,
            inputs=inputs,
            needs_reference=needs_reference,
            family=_family_of(fn, family),
            defaults=defaults,
            checks=checks,
            validator=validator,
            data_args=tuple(p.name for p in data),
            required_data=tuple(p.name for p in data if p.default is inspect.Parameter.empty),
            doc=inspect.getdoc(fn) or "",
            _positional=tuple(p.name for p in positional),
        )

        @functools.wraps(fn)
        def wrapper(*args: Any, check_finite: bool = False, **kwargs: Any) -> LossOutput:
            hp = {k: kwargs.pop(k) for k in list(kwargs) if k in defaults}
            hp = spec.validate(hp)
            spec.check_inputs(args, kwargs, finite=check_finite)
            if upcast:
                args = tuple(_upcast_arg(a) for a in args)
                kwargs = {k: _upcast_arg(v) for k, v in kwargs.items()}
            return fn(*args, **kwargs, **hp)

        _REGISTRY[name] = spec
        wrapper.spec = spec  # type: ignore[attr-defined]
        return wrapper

    return decorate


def available_losses(family: str | None = None) -> list[str]:
    """Every registered loss name (sorted), optionally only those of one ``family``."""
    _ensure_loaded()
    return sorted(n for n, s in _REGISTRY.items() if family is None or s.family == family)


def get_spec(name: str) -> LossSpec:
    """The [`LossSpec`][prefopt.registry.LossSpec] of ``name``; an unknown name raises ``KeyError`` listing
    the available names."""
    _ensure_loaded()
    if not isinstance(name, str) or name not in _REGISTRY:
        raise KeyError(f"unknown loss {name!r}; available: {', '.join(available_losses())}")
    return _REGISTRY[name]


@dataclass(frozen=True)
class BoundLoss:
    """A registered loss with validated hyperparameters; call it like the loss function itself."""

    name: str
    hparams: Mapping[str, Any]
    spec: LossSpec = field(repr=False)

    @property
    def needs_reference(self) -> bool:
        """Whether the loss reads reference log-probs."""
        return self.spec.needs_reference

    @property
    def inputs(self) -> str:
        """The input kind of the loss (see [`INPUT_KINDS`][prefopt.registry.INPUT_KINDS])."""
        return self.spec.inputs

    def __call__(self, *args: Any, check_finite: bool = False, **kwargs: Any) -> LossOutput:
        late = sorted(set(kwargs) & set(self.spec.defaults))
        if late:
            raise TypeError(
                f"{self.name}: hyperparameter(s) {', '.join(late)} are bound by get_loss(); pass them there "
                f"(get_loss({self.name!r}, {late[0]}=...)), not when calling the loss"
            )
        self.spec.check_inputs(args, kwargs, finite=check_finite)
        args = tuple(_upcast_arg(a) for a in args)
        kwargs = {k: _upcast_arg(v) for k, v in kwargs.items()}
        return self.spec.fn(*args, **kwargs, **self.hparams)


def get_loss(name: str, **hparams: Any) -> BoundLoss:
    """Look up ``name`` and bind validated keyword-only hyperparameters.

    At policy == reference every margin is 0 and DPO's loss is ``log 2``:

    >>> import torch
    >>> from prefopt.types import PairLogps
    >>> dpo = get_loss("dpo", beta=0.1)
    >>> z = torch.zeros(2)
    >>> dpo(PairLogps(chosen=z, rejected=z, ref_chosen=z, ref_rejected=z)).loss
    tensor([0.6931, 0.6931])
    >>> get_loss("dpo", beta=-1.0)
    Traceback (most recent call last):
    ...
    ValueError: dpo: hyperparameter beta=-1.0 is out of range; allowed: a finite number > 0

    Raises:
        KeyError: unknown ``name`` (the message lists every available name).
        ValueError: an unknown or out-of-range hyperparameter (the message names it and its allowed range).
    """
    spec = get_spec(name)
    return BoundLoss(name=name, hparams=spec.validate(hparams), spec=spec)


_LOADED = False


def _ensure_loaded() -> None:
    """Import every module of ``prefopt.losses`` once, so that its decorators have run."""
    global _LOADED
    if _LOADED:
        return
    package = importlib.import_module("prefopt.losses")
    for info in pkgutil.iter_modules(package.__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"prefopt.losses.{info.name}")
    _LOADED = True
