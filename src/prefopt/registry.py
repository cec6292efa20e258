"""The single list of loss names: ``register_loss`` / ``get_loss`` / ``available_losses``.

Registering a loss is one decorator on a pure function whose *data* arguments are positional and whose
*hyperparameters* are keyword-only with defaults::

    @register_loss("dpo", needs_reference=True, checks={"beta": gt(0)})
    def dpo(logps: PairLogps, *, beta: float = 0.1) -> LossOutput: ...

The decorated function stays directly callable (hyperparameters are validated on every direct call);
``get_loss(name, **hparams)`` validates once and returns a :class:`BoundLoss`. Both accept
``check_finite=True`` at call time to reject NaN/inf inputs with an error naming the argument.
Half-precision inputs are upcast to float32 before the loss is computed; float64 stays float64.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from prefopt.types import LossOutput, PairLogps, _TensorFields, _upcast, check_finite

__all__ = [
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
# registry
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LossSpec:
    """Metadata of a registered loss."""

    name: str
    fn: Callable[..., LossOutput]
    needs_reference: bool
    family: str
    defaults: Mapping[str, Any]
    checks: Mapping[str, Check] = field(default_factory=dict)
    validator: Callable[[Mapping[str, Any]], None] | None = None
    doc: str = ""

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
        """Reject a missing reference and (with ``finite``) NaN/inf inputs, positional or keyword."""
        names = _positional_names(self.fn)
        labelled = [(names[i] if i < len(names) else f"argument {i}", a) for i, a in enumerate(args)]
        labelled += list(kwargs.items())
        if self.needs_reference:
            for _, arg in labelled:
                if isinstance(arg, PairLogps) and not arg.has_reference:
                    raise ValueError(
                        f"{self.name} needs reference log-probs: PairLogps.ref_chosen and "
                        "PairLogps.ref_rejected are None"
                    )
        if finite:
            for label, arg in labelled:
                if isinstance(arg, _TensorFields):
                    arg.check_finite()
                elif isinstance(arg, Tensor):
                    check_finite(label, arg)


_REGISTRY: dict[str, LossSpec] = {}


def _positional_names(fn: Callable[..., Any]) -> list[str]:
    sig = inspect.signature(fn)
    return [
        p.name
        for p in sig.parameters.values()
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    ]


def _upcast_arg(x: Any) -> Any:
    if isinstance(x, _TensorFields):
        return x.upcast()
    if isinstance(x, Tensor):
        return _upcast(x)
    return x


def register_loss(
    name: str,
    *,
    needs_reference: bool = False,
    family: str = "margin",
    checks: Mapping[str, Check] | None = None,
    validator: Callable[[Mapping[str, Any]], None] | None = None,
    upcast: bool = True,
) -> Callable[[Callable[..., LossOutput]], Callable[..., LossOutput]]:
    """Register ``fn`` under ``name``; its keyword-only parameters are its hyperparameters.

    Args:
        name: registry name (must be new).
        needs_reference: the loss reads ``ref_*`` log-probs; calling it without them raises ``ValueError``.
        family: documentation grouping (``margin``, ``reference_free``, ``unpaired``, ``decoupled``,
            ``policy_gradient``, ``reward``, ``bond``, ...).
        checks: per-hyperparameter :class:`Check` (see :func:`gt`, :func:`ge`, :func:`between`, :func:`one_of`).
        validator: an optional function of all merged hyperparameters for cross-parameter rules.
        upcast: convert half-precision tensor inputs to float32 before calling ``fn``.
    """
    checks = dict(checks or {})

    def decorate(fn: Callable[..., LossOutput]) -> Callable[..., LossOutput]:
        if name in _REGISTRY:
            raise ValueError(f"a loss named {name!r} is already registered")
        sig = inspect.signature(fn)
        defaults: dict[str, Any] = {}
        for p in sig.parameters.values():
            if p.kind is inspect.Parameter.KEYWORD_ONLY:
                if p.default is inspect.Parameter.empty:
                    raise TypeError(f"{name}: hyperparameter {p.name} needs a default")
                defaults[p.name] = p.default
        missing = sorted(set(checks) - set(defaults))
        if missing:
            raise TypeError(f"{name}: checks given for unknown hyperparameter(s) {missing}")
        spec = LossSpec(
            name=name,
            fn=fn,
            needs_reference=needs_reference,
            family=family,
            defaults=defaults,
            checks=checks,
            validator=validator,
            doc=inspect.getdoc(fn) or "",
        )

        @functools.wraps(fn)
        def wrapper(*args: Any, check_finite: bool = False, **kwargs: Any) -> LossOutput:
            hp = {k: kwargs.pop(k) for k in list(kwargs) if k in defaults}
            spec.validate(hp)
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
    """The :class:`LossSpec` of ``name``; an unknown name raises ``KeyError`` listing the available names."""
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
        return self.spec.needs_reference

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


_LOSS_MODULES = (
    "prefopt.losses.margin",
    "prefopt.losses.reference_free",
    "prefopt.losses.unpaired",
    "prefopt.losses.combined",
    "prefopt.losses.decoupled",
    "prefopt.losses.policy_gradient",
    "prefopt.losses.reward",
    "prefopt.losses.bond",
)


def _ensure_loaded() -> None:
    """Import every loss module so that its decorators have run (modules that do not exist yet are skipped)."""
    import importlib
    import importlib.util

    for mod in _LOSS_MODULES:
        if importlib.util.find_spec(mod) is not None:
            importlib.import_module(mod)
