r"""One backbone for a LoRA policy, its frozen reference and a moving (EMA) anchor.

[`LoraPolicy`][prefopt.policy.LoraPolicy] wraps a Hugging Face causal LM with peft LoRA and serves three distributions from a single
set of backbone weights `W0` (per adapted linear layer, in `nn.Linear` layout `(out, in)`):

| call | weights |
|---|---|
| `policy.model(...)` | the trainable policy, `W = W0 + s·B_p·A_p` (peft adapter `"default"`, `s = lora_alpha / r`, or `lora_alpha / √r` with rsLoRA) |
| `with policy.reference(): ...` | all adapters disabled, exactly `W = W0` (requires `bias="none"`) |
| `with policy.anchor(): ...` | a frozen second adapter `"anchor"`: `W = W0 + ΔW_a`, `ΔW_a = B_a·A_a` (absent with `anchor=False`) |

The anchor is an exponential moving average of the policy's *effective weight change*
`ΔW_p = s·B_p·A_p` (never of `A` and `B` separately: the product of averages is not the average of
products). [`LoraPolicy.update_anchor_`][prefopt.policy.LoraPolicy.update_anchor_] applies, per adapted layer,

$$
\Delta W_a \leftarrow d\,\Delta W_a + (1-d)\,\Delta W_p
  = \underbrace{[\,d\,B_a,\ (1-d)\,s\,B_p\,]}_{m\times k}\ \underbrace{\begin{bmatrix}A_a\\A_p\end{bmatrix}}_{k\times n},
  \qquad k = r_a + r_p,
$$

which is exact at rank `k` and is re-compressed to `r_a` (`anchor_rank`) with a thin QR of both stacked
factors and an SVD of the small `k×k` core ([`ema_low_rank`][prefopt.policy.ema_low_rank]). Truncating the SVD is the best rank-`r_a`
approximation (Eckart–Young); its relative Frobenius error is read off the discarded singular values and
returned. With J-BOND's notation (Sessa et al. 2024, arXiv 2407.14622, Algorithm 2:
`θ_anchor ← (1−η)·θ_anchor + η·θ`) the decay is `d = 1 − η`; for LoRA the EMA is taken on `ΔW`, which is
what the full-weight EMA of the paper means for a frozen backbone.

PE-RLHF (Sidahmed et al. 2024, arXiv 2403.10704) puts adapters on every attention projection; the
default here is `target_modules="all-linear"` instead (every linear / `Conv1D` layer except the output
head), because it needs no per-architecture module names (Llama `q_proj`… vs GPT-2 `c_attn`…) and is the
more common choice for preference tuning. Pass a `LoraConfig` to choose the attention-only layout.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
import uuid
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import peft
import torch
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import Tensor, nn

from prefopt.value_head import ValueHead, final_hidden_states
from prefopt.value_head import config_hidden_size as config_hidden_size  # re-export (old import path)

__all__ = [
    "ANCHOR_ADAPTER",
    "POLICY_ADAPTER",
    "VALUE_ADAPTER",
    "AnchorUpdate",
    "LoraPolicy",
    "ParameterCounts",
    "default_lora_config",
    "ema_low_rank",
    "ema_update_",
    "eval_mode",
    "is_lora_policy",
    "reference_sync_",
]

POLICY_ADAPTER = "default"
ANCHOR_ADAPTER = "anchor"
VALUE_ADAPTER = "critic"  # not "value": that is a module name in some architectures (BERT-style attention)
_META_FILE = "prefopt_policy.json"
_LEGACY_TENSOR_FILE = "prefopt_policy.safetensors"  # format 1
_FORMAT_VERSION = 2
# init_lora_weights values that leave the backbone untouched (PiSSA/OLoRA/CorDA/LoftQ/EVA/... rewrite W0 or
# change the adapter's structure, so "adapters disabled" would no longer be the original model).
_SAFE_INITS = (True, False, "gaussian")


def default_lora_config() -> peft.LoraConfig:
    """The default policy adapter: `r=8, lora_alpha=16` (scale 2), `target_modules="all-linear"`,
    `lora_dropout=0`, `bias="none"`, `task_type="CAUSAL_LM"`."""
    return peft.LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules="all-linear",
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )


@dataclass(frozen=True)
class AnchorUpdate:
    """What [`LoraPolicy.update_anchor_`][prefopt.policy.LoraPolicy.update_anchor_] discarded when re-compressing the anchor to `anchor_rank`.

    `max_relative_error`: `max_l ‖discarded_l‖_F / ‖ΔW_l‖_F` over adapted layers `l` (0 where
    `ΔW_l = 0`). `total_relative_error`: `sqrt(Σ_l ‖discarded_l‖²_F / Σ_l ‖ΔW_l‖²_F)`. Here `ΔW_l` is
    the exact (untruncated) EMA of this step, so both are errors of *this* update only; they add up over
    updates at most linearly (each old error is damped by `decay` at every later step).
    """

    max_relative_error: float
    total_relative_error: float
    num_layers: int


@dataclass(frozen=True)
class ParameterCounts:
    """`trainable`: elements of parameters with `requires_grad` (policy adapter, critic adapter, value
    head); `total`: all elements (backbone, all adapters, value head); `fraction = trainable / total`."""

    trainable: int
    total: int
    fraction: float


def ema_low_rank(
    b_anchor: Tensor,
    a_anchor: Tensor,
    b_policy: Tensor,
    a_policy: Tensor,
    *,
    decay: float,
    scale: float | Tensor = 1.0,
    rank: int,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    r"""Rank-`rank` factors of `decay·B_a·A_a + (1−decay)·scale·B_p·A_p` (one EMA step on `ΔW`).

    Shapes (leading batch dimensions `...` allowed, shared by all inputs): `b_anchor (..., m, r_a)`,
    `a_anchor (..., r_a, n)`, `b_policy (..., m, r_p)`, `a_policy (..., r_p, n)`; `scale` a float or a
    tensor broadcastable to `(..., 1, 1)`.

    Method: with `L = [decay·B_a, (1−decay)·scale·B_p]` `(m, k)` and `R = [A_a; A_p]` `(k, n)`,
    `k = r_a + r_p`, `L R` is the exact EMA. Thin QR `L = Q_1 R_1`, `Rᵀ = Q_2 R_2`, SVD of the small core
    `R_1 R_2ᵀ = U S Vᵀ` give `L R = (Q_1 U) S (Q_2 V)ᵀ`; keeping the leading `rank` singular triplets is
    the best rank-`rank` approximation in Frobenius norm (Eckart–Young). The kept part is split evenly,
    `B = Q_1 U_{:r} S_{:r}^{1/2}`, `A = S_{:r}^{1/2} V_{:r}ᵀ Q_2ᵀ`. Cost `O((m + n) k² + k³)`, no
    `m×n` matrix is formed.

    Returns `(b_new (..., m, rank), a_new (..., rank, n), discarded_sq (...), total_sq (...))` where
    `discarded_sq = Σ_{i>rank} S_i²` and `total_sq = Σ_i S_i² = ‖exact EMA‖²_F`. If fewer than `rank`
    singular values exist (`min(m, n, k) < rank`) the factors are zero-padded. Computed in the inputs' dtype
    (pass float32/float64).
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be in [0, 1], got {decay}")
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    for name, t in (
        ("b_anchor", b_anchor),
        ("a_anchor", a_anchor),
        ("b_policy", b_policy),
        ("a_policy", a_policy),
    ):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(
                f"{name} must be a floating-point tensor (float32/float64), got "
                f"{getattr(t, 'dtype', type(t).__name__)}"
            )
    left = torch.cat([decay * b_anchor, (1.0 - decay) * scale * b_policy], dim=-1)  # (..., m, k)
    right = torch.cat([a_anchor, a_policy], dim=-2)  # (..., k, n)
    q1, r1 = torch.linalg.qr(left)  # (..., m, p1), (..., p1, k)
    q2, r2 = torch.linalg.qr(right.mT)  # (..., n, p2), (..., p2, k)
    u, s, vh = torch.linalg.svd(r1 @ r2.mT, full_matrices=False)  # (..., p1, q), (..., q), (..., q, p2)
    keep = min(rank, s.shape[-1])
    root = s[..., :keep].sqrt()
    b_new = (q1 @ u[..., :keep]) * root.unsqueeze(-2)
    a_new = root.unsqueeze(-1) * (vh[..., :keep, :] @ q2.mT)
    if keep < rank:
        b_new = torch.cat([b_new, b_new.new_zeros(*b_new.shape[:-1], rank - keep)], dim=-1)
        a_new = torch.cat([a_new, a_new.new_zeros(*a_new.shape[:-2], rank - keep, a_new.shape[-1])], dim=-2)
    sq = s.square()
    return b_new, a_new, sq[..., keep:].sum(-1), sq.sum(-1)


def _tuner(peft_model: peft.PeftModel) -> Any:
    """The peft `LoraModel` inside a `PeftModel` (typed `Any`: mypy sees `Tensor | Module`)."""
    return peft_model.base_model


def _check_config(cfg: Any) -> None:
    """Refuse LoRA settings under which "adapters disabled" is not the base model or the anchor is ill-defined."""
    if not isinstance(cfg, peft.LoraConfig):
        raise TypeError(f"lora_config must be a peft.LoraConfig or None, got {type(cfg).__name__}")
    if cfg.bias != "none":
        raise ValueError(
            f'lora_config.bias must be "none" (got {cfg.bias!r}): a trained bias stays active when adapters are '
            "disabled, so reference() would not be the base model"
        )
    if cfg.modules_to_save:
        raise ValueError(
            f"lora_config.modules_to_save must be empty (got {cfg.modules_to_save!r}): fully trained module "
            "copies are not low-rank and cannot be averaged into the anchor adapter"
        )
    if getattr(cfg, "trainable_token_indices", None):
        raise ValueError("lora_config.trainable_token_indices is not supported (the anchor would ignore it)")
    if cfg.init_lora_weights not in _SAFE_INITS:
        raise ValueError(
            f"lora_config.init_lora_weights must be one of {_SAFE_INITS} (got {cfg.init_lora_weights!r}): "
            "other initializations rewrite the backbone or change the adapter's form"
        )
    for flag in ("use_dora", "lora_bias", "use_qalora"):
        if getattr(cfg, flag, False):
            raise ValueError(f"lora_config.{flag}=True is not supported: the anchor is an EMA of ΔW = s·B·A")
    for field in ("layer_replication", "target_parameters", "alora_invocation_tokens"):
        if getattr(cfg, field, None):
            raise ValueError(f"lora_config.{field} is not supported by LoraPolicy")
    if cfg.task_type not in (None, "CAUSAL_LM", peft.TaskType.CAUSAL_LM):
        raise ValueError(f'lora_config.task_type must be None or "CAUSAL_LM", got {cfg.task_type!r}')
    if not isinstance(cfg.r, int) or cfg.r < 1:
        raise ValueError(f"lora_config.r must be a positive int, got {cfg.r!r}")


def _check_target_names(model: nn.Module, cfg: peft.LoraConfig) -> None:
    """Every name in a list/set `target_modules` must match at least one module (peft only needs one)."""
    targets = cfg.target_modules
    if targets is None or isinstance(targets, str):
        return  # None: peft's per-architecture default; a str is "all-linear" or a regex (peft checks it)
    names = [name for name, _ in model.named_modules() if name]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(
            f"lora_config.target_modules: {sorted(missing)} match no module of the model; "
            f"linear module names here include {linear[:12]}"
        )


def _full(t: Tensor) -> Tensor:
    """The whole tensor behind a (possibly FSDP2-sharded) parameter: `DTensor.full_tensor()` (a collective
    all-gather that every rank must reach in the same order) or `t` itself."""
    full_tensor = getattr(t, "full_tensor", None)
    return full_tensor() if callable(full_tensor) else t


def _write_(dst: Tensor, src: Tensor) -> None:
    """Copy the whole tensor `src` into `dst`; a sharded `DTensor` keeps only its own shard."""
    if hasattr(dst, "device_mesh") and hasattr(dst, "placements"):
        from torch.distributed.tensor import distribute_tensor

        src = distribute_tensor(src.to(dst.dtype), dst.device_mesh, dst.placements, src_data_rank=None)
    dst.copy_(src)


class LoraPolicy(nn.Module):
    """A LoRA policy whose backbone also serves the reference model and an EMA anchor (see module docstring).

    Args:
        model: a Hugging Face causal LM (`PreTrainedModel`). It is wrapped **in place** (peft swaps its
            linear layers for LoRA layers); keep no other reference to it. An existing `PeftModel` (or a
            model with injected adapters) is refused: merge it (`merge_and_unload()`) or pass its base model.
            The wrapper takes `model`'s train/eval mode (new LoRA dropout modules follow it).
        lora_config: the policy adapter's `peft.LoraConfig` (copied, never mutated);
            `None` → [`default_lora_config`][prefopt.policy.default_lora_config]. Must have `bias="none"`, no `modules_to_save`, plain
            LoRA (no DoRA/variants) and an initialization that leaves the backbone untouched.
        anchor: add the EMA anchor adapter (default). `anchor=False` adds none (a reward model, DPO
            against the frozen reference, PPO): no anchor weights in memory or checkpoints, and `anchor()`,
            `update_anchor_`, `merged("anchor")` and `delta_weights("anchor")` raise `RuntimeError` naming
            `anchor=False`.
        anchor_rank: rank `r_a` of the anchor adapter; default `2 × r` (`r` = largest policy rank,
            `rank_pattern` included). With `r_a ≥ 2r` the anchor EMA stays accurate for a policy that
            drifts smoothly (see `docs/policy.md`). Must be `None` with `anchor=False`.
        value_head: add a [`ValueHead`][prefopt.value_head.ValueHead] (`nn.Linear(hidden_size, 1)`,
            float32; float64 for a float64 model) on the backbone's final hidden state for
            [`values`][prefopt.policy.LoraPolicy.values] (shares the backbone; by default also the policy
            adapter).
        value_adapter: give the value model its own LoRA adapter `"critic"` (same config as the policy,
            trainable, initialized like it), as in PE-RLHF where the value model is a LoRA model of the same
            size and rank. [`values`][prefopt.policy.LoraPolicy.values] then runs the backbone with `W0 + s·B_v·A_v` and the value loss
            trains only the critic adapter and the head. Needs `value_head=True`.

    Attributes: `model` (the `peft.PeftModel`; its forward is the policy), `value_head`
    (a [`ValueHead`][prefopt.value_head.ValueHead] or `None`), `has_anchor`, `anchor_rank` (`None` without
    an anchor), `lora_config` (the resolved policy config).

    The anchor adapter has `lora_dropout=0` and scale 1 (`lora_alpha = r_a`), and starts at `ΔW_a = 0`
    (anchor == reference). Only the policy adapter (and the critic adapter and value head, if any) has
    `requires_grad=True`.
    Not thread-safe: the contexts switch layer state of the shared backbone.
    """

    model: peft.PeftModel
    value_head: ValueHead | None

    def __init__(
        self,
        model: nn.Module,
        lora_config: peft.LoraConfig | None = None,
        *,
        anchor: bool = True,
        anchor_rank: int | None = None,
        value_head: bool = False,
        value_adapter: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(model, peft.PeftModel):
            raise TypeError(
                "model is already a peft.PeftModel; pass the base model instead (e.g. "
                "model.merge_and_unload() to keep a trained adapter as part of the reference, or "
                "model.get_base_model() after unloading) — LoraPolicy adds its own adapters"
            )
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if any(isinstance(m, BaseTunerLayer) for m in model.modules()):
            raise TypeError("model already contains peft adapter layers; pass a model without adapters")
        was_training = model.training
        cfg = default_lora_config() if lora_config is None else copy.deepcopy(lora_config)
        _check_config(cfg)
        if not isinstance(anchor, bool):
            raise TypeError(f"anchor must be a bool, got {type(anchor).__name__}")
        if not anchor and anchor_rank is not None:
            raise ValueError(
                f"anchor_rank={anchor_rank!r} needs anchor=True (anchor=False adds no anchor adapter)"
            )
        if anchor_rank is not None and (
            isinstance(anchor_rank, bool) or not isinstance(anchor_rank, int) or anchor_rank < 1
        ):
            raise ValueError(f"anchor_rank must be a positive int or None, got {anchor_rank!r}")
        if not isinstance(value_head, bool):
            raise TypeError(f"value_head must be a bool, got {type(value_head).__name__}")
        if not isinstance(value_adapter, bool):
            raise TypeError(f"value_adapter must be a bool, got {type(value_adapter).__name__}")
        if value_adapter and not value_head:
            raise ValueError("value_adapter=True needs value_head=True")
        _check_target_names(model, cfg)
        policy_rank = max([cfg.r, *(cfg.rank_pattern or {}).values()])
        self.has_anchor: bool = anchor
        self.anchor_rank: int | None = (
            None if not anchor else 2 * policy_rank if anchor_rank is None else anchor_rank
        )

        try:
            with warnings.catch_warnings():
                # peft (<= 0.21) reads transformers' deprecated `model.is_gradient_checkpointing` inside
                # PeftModel.__init__, which warns on every LoraPolicy; only that one warning is silenced here.
                warnings.filterwarnings(
                    "ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning
                )
                peft_model = peft.get_peft_model(model, cfg, adapter_name=POLICY_ADAPTER)
        except ValueError as err:
            if "target module" in str(err).lower():
                raise ValueError(f"lora_config.target_modules={cfg.target_modules!r}: {err}") from err
            raise
        try:
            self.lora_config: peft.LoraConfig = peft_model.peft_config[POLICY_ADAPTER]  # type: ignore[assignment]
            self._check_layers(peft_model, (POLICY_ADAPTER,))
            adapters: tuple[str, ...] = (POLICY_ADAPTER,)
            if self.anchor_rank is not None:
                self._add_anchor_adapter(peft_model, self.anchor_rank)
                adapters += (ANCHOR_ADAPTER,)
            if value_adapter:
                peft_model.add_adapter(VALUE_ADAPTER, copy.deepcopy(self.lora_config))
                adapters += (VALUE_ADAPTER,)
            _tuner(peft_model).set_adapter(POLICY_ADAPTER)
            self._check_layers(peft_model, adapters)
        except Exception:
            _tuner(peft_model).unload()  # give the caller back an un-wrapped model
            raise
        self.model = peft_model
        # typed Any: peft's layers expose ModuleDicts that mypy sees as `Tensor | Module`
        self._layers: list[tuple[str, Any]] = [
            (name, m) for name, m in peft_model.named_modules() if isinstance(m, LoraLinear)
        ]
        with torch.no_grad():
            for _, layer in self._layers if anchor else ():
                layer.lora_A[ANCHOR_ADAPTER].weight.zero_()
                layer.lora_B[ANCHOR_ADAPTER].weight.zero_()
                layer.scaling[ANCHOR_ADAPTER] = 1.0
        self.value_head = None
        if value_head:
            # float32, or float64 for a float64 model
            self.value_head = ValueHead.for_model(peft_model.get_base_model(), why="value_head=True")
        self.value_adapter = value_adapter
        # Flags: backbone and anchor frozen; policy adapter, critic adapter and value head trainable.
        trainable = (f".{POLICY_ADAPTER}.", f".{VALUE_ADAPTER}.")
        for name, p in self.named_parameters():
            p.requires_grad_(
                ("lora_" in name and any(t in name for t in trainable)) or name.startswith("value_head.")
            )
        self._mode = "policy"
        # new modules (peft wrappers, LoRA dropout, head) start in train mode: follow the given model's mode
        self.train(was_training)

    # ------------------------------------------------------------------------------------------------ checks
    @staticmethod
    def _add_anchor_adapter(peft_model: peft.PeftModel, rank: int) -> None:
        """Add the frozen anchor adapter: rank `rank`, scale 1, no dropout, on the policy's layers."""
        policy_cfg: Any = peft_model.peft_config[POLICY_ADAPTER]
        anchor_cfg = peft.LoraConfig(
            r=rank,
            lora_alpha=rank,
            use_rslora=False,
            lora_dropout=0.0,
            bias="none",
            target_modules=copy.deepcopy(policy_cfg.target_modules),
            exclude_modules=copy.deepcopy(policy_cfg.exclude_modules),
            layers_to_transform=copy.deepcopy(policy_cfg.layers_to_transform),
            layers_pattern=copy.deepcopy(policy_cfg.layers_pattern),
            fan_in_fan_out=policy_cfg.fan_in_fan_out,
            init_lora_weights=True,
            inference_mode=True,
        )
        peft_model.add_adapter(ANCHOR_ADAPTER, anchor_cfg)

    def _require_anchor(self, what: str) -> None:
        if not self.has_anchor:
            raise RuntimeError(
                f"{what} needs the anchor adapter, but this policy was built with LoraPolicy(..., anchor=False)"
            )

    @staticmethod
    def _check_layers(peft_model: peft.PeftModel, adapters: tuple[str, ...]) -> None:
        tuner_layers = [(n, m) for n, m in peft_model.named_modules() if isinstance(m, BaseTunerLayer)]
        if not tuner_layers:
            raise ValueError("lora_config.target_modules matched no module")
        for name, m in tuner_layers:
            if type(m) is not LoraLinear:
                raise ValueError(
                    f"lora_config.target_modules: module {name!r} became a {type(m).__name__}; LoraPolicy "
                    "supports LoRA on linear / Conv1D layers only (not embeddings, convolutions, quantized layers)"
                )
            for adapter in adapters:
                if adapter not in m.lora_A:
                    raise RuntimeError(f"adapter {adapter!r} missing on layer {name!r}")
                if adapter in m.lora_variant:
                    raise ValueError(
                        f"lora_config: layer {name!r} uses a LoRA variant; only plain LoRA works"
                    )

    # ------------------------------------------------------------------------------------------------ forward
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The policy forward (same as `self.model(*args, **kwargs)`)."""
        return self.model(*args, **kwargs)

    @contextlib.contextmanager
    def _switch(self, mode: str, no_grad: bool) -> Iterator[None]:
        if self._mode != "policy":
            raise RuntimeError(f"cannot enter {mode}() inside {self._mode}(): the contexts do not nest")
        if any(layer.merged for _, layer in self._layers):
            raise RuntimeError(
                "an adapter is merged into the backbone; unmerge it before using reference()/anchor()"
            )
        flags = [(p, p.requires_grad) for p in self.parameters()]

        def restore_flags() -> None:
            for p, flag in flags:
                if p.requires_grad != flag:
                    p.requires_grad_(flag)

        tuner = _tuner(self.model)
        try:
            # peft's switches also flip requires_grad; put every flag back at once, before any forward.
            if mode in ("reference", "merged"):
                tuner.disable_adapter_layers()
            else:
                tuner.set_adapter(ANCHOR_ADAPTER if mode == "anchor" else VALUE_ADAPTER)
            restore_flags()
            self._mode = mode
            with torch.no_grad() if no_grad else contextlib.nullcontext():
                yield
        finally:
            if mode in ("reference", "merged"):
                tuner.enable_adapter_layers()
            tuner.set_adapter(POLICY_ADAPTER)
            restore_flags()
            self._mode = "policy"

    def reference(self, *, no_grad: bool = True) -> contextlib.AbstractContextManager[None]:
        """Context in which `self.model` is exactly the base model (all adapters off, `W = W0`).

        `no_grad=True` (default) also enters `torch.no_grad()`: reference forwards are meant to be
        constants. With `no_grad=False` and gradient checkpointing, do the backward inside the context
        (a recomputation outside it would use the policy). `requires_grad` flags are unchanged inside and
        after; the state is restored on exceptions. The contexts do not nest (`RuntimeError`).
        """
        return self._switch("reference", no_grad)

    def anchor(self, *, no_grad: bool = True) -> contextlib.AbstractContextManager[None]:
        """Context in which `self.model` is the EMA anchor, `W = W0 + B_a·A_a` (adapter `"anchor"`).

        Same contract as [`reference`][prefopt.policy.LoraPolicy.reference] (`no_grad` default True, flags untouched, restored on
        exceptions, no nesting). The anchor adapter has no dropout, so anchor forwards are deterministic.
        """
        self._require_anchor("anchor()")
        return self._switch("anchor", no_grad)

    @contextlib.contextmanager
    def merged(self, adapter: str = POLICY_ADAPTER) -> Iterator[None]:
        """Context in which every adapted layer computes with ONE merged weight `W0 + s·B·A` of `adapter`
        (`"default"`, the policy, or `"anchor"`) and the adapters are off: the same function as the
        policy (or anchor) up to float rounding, at the speed of the plain model — for sampling, where the
        many small decode steps pay the adapters' extra matmuls every time.

        The merged weights are *new* tensors swapped in for the base weights; on exit (also on exceptions)
        the original weight tensors are put back, so the reference stays exactly `W0` — nothing is
        merged into and subtracted from `W0`, which would not round-trip in floating point. Costs one
        extra copy of the adapted weights while inside. Runs under `torch.no_grad()`; `self.mode` is
        `"merged"`; no nesting with the other contexts (`RuntimeError`). Not for sharded (FSDP)
        weights. Log-probs for the losses should still come from the unmerged policy (that is the function
        being trained); [`HFSampler`][prefopt.sampling.HFSampler] does exactly that with `merged=True`.
        """
        names = (POLICY_ADAPTER, ANCHOR_ADAPTER)
        if adapter not in names:
            raise ValueError(f"adapter must be one of {names}, got {adapter!r}")
        if adapter == ANCHOR_ADAPTER:
            self._require_anchor('merged("anchor")')
        with self._switch("merged", True):
            swapped: list[tuple[nn.Module, nn.Parameter]] = []
            try:
                for _, layer in self._layers:
                    base = layer.get_base_layer()
                    w0 = base.weight
                    delta = layer.get_delta_weight(adapter)
                    base._parameters["weight"] = nn.Parameter(
                        w0.detach() + delta.to(w0.dtype), requires_grad=False
                    )
                    swapped.append((base, w0))
                yield
            finally:
                for base, w0 in reversed(swapped):
                    base._parameters["weight"] = w0

    @property
    def mode(self) -> str:
        """`"policy"`, `"reference"`, `"anchor"` or `"merged"` (`"critic"` only inside
        [`values`][prefopt.policy.LoraPolicy.values]): which weights `self.model` computes with now."""
        return self._mode

    def values(
        self, input_ids: Tensor, attention_mask: Tensor | None = None, *, backbone_grad: bool = True
    ) -> Tensor:
        """Value estimates `(b, t)` in the head's dtype (float32; float64 for a float64 model): `values[:, i] = w·h_i + c` with `h_i` the backbone's final
        hidden state at position `i` (after the last norm, having read `input_ids[:, :i+1]`).

        Without a critic adapter the backbone runs with the current mode's weights (the policy outside the
        contexts), so a value loss also trains the policy adapter unless `backbone_grad=False` (hidden
        states computed under `no_grad`; only the head gets gradients). With `value_adapter=True` it runs
        with the critic adapter (and must be called outside the contexts); the value loss then trains the
        critic adapter and the head only. Positions are not masked; apply your completion mask.
        """
        if self.value_head is None:
            raise RuntimeError("values() needs LoraPolicy(..., value_head=True)")
        if not isinstance(input_ids, Tensor) or input_ids.ndim != 2:
            raise ValueError(
                f"input_ids must be a (b, t) tensor, got {getattr(input_ids, 'shape', input_ids)!r}"
            )
        if attention_mask is not None and (
            not isinstance(attention_mask, Tensor) or attention_mask.shape != input_ids.shape
        ):
            raise ValueError("attention_mask must be a tensor with the shape of input_ids")
        if self.value_adapter and self._mode != "policy":
            raise RuntimeError(f"values() with a critic adapter called inside {self._mode}()")
        critic = self._switch("critic", False) if self.value_adapter else contextlib.nullcontext()
        with critic, contextlib.nullcontext() if backbone_grad else torch.no_grad():
            hidden = final_hidden_states(self.model.get_base_model(), input_ids, attention_mask)
        return self.value_head(hidden)

    # ------------------------------------------------------------------------------------------------ anchor
    @torch.no_grad()
    def update_anchor_(self, decay: float) -> AnchorUpdate:
        r"""One EMA step of the anchor on every adapted layer: `ΔW_a ← decay·ΔW_a + (1−decay)·s·B_p·A_p`.

        `decay=1` leaves the anchor bit-for-bit unchanged; `decay=0` copies the policy (exactly, by
        writing `[s·B_p, 0]` and `[A_p; 0]`, when `anchor_rank ≥ r`). Otherwise see
        [`ema_low_rank`][prefopt.policy.ema_low_rank] (float32 or better; the result is cast back to the adapter dtype). Layers with
        equal shapes are processed as one batch. J-BOND's `η` is `1 − decay`.

        Returns an [`AnchorUpdate`][prefopt.policy.AnchorUpdate] with the relative Frobenius norm of what the rank truncation dropped.

        All or nothing: the new factors of every layer are computed and checked first; if a policy or anchor
        factor holds NaN/inf, or a new factor is not finite in the adapter's dtype, `ValueError` is raised
        and no anchor layer has been written.
        """
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not math.isfinite(decay):
            raise ValueError(f"decay must be a finite real number in [0, 1], got {decay!r}")
        decay = float(decay)
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        self._require_anchor("update_anchor_()")
        if self._mode != "policy":
            raise RuntimeError(f"update_anchor_() called inside {self._mode}()")
        n_layers = len(self._layers)
        if decay == 1.0:
            return AnchorUpdate(0.0, 0.0, n_layers)
        # Under FSDP2 the factors are sharded DTensors: gather each whole factor (every rank does the same
        # work in the same order), compute the EMA on plain tensors, write back each rank's shard.
        factors = [
            tuple(
                _full(getattr(layer, part)[name].weight)
                for part, name in (
                    ("lora_B", POLICY_ADAPTER),
                    ("lora_A", POLICY_ADAPTER),
                    ("lora_B", ANCHOR_ADAPTER),
                    ("lora_A", ANCHOR_ADAPTER),
                )
            )
            for _, layer in self._layers
        ]
        groups: dict[tuple[Any, ...], list[int]] = {}
        for j, (b_p, a_p, b_a, _) in enumerate(factors):
            key = (tuple(b_p.shape), tuple(a_p.shape), tuple(b_a.shape), b_p.dtype, b_a.dtype, b_p.device)
            groups.setdefault(key, []).append(j)
        ratios: list[Tensor] = []
        disc_total: list[Tensor] = []
        norm_total: list[Tensor] = []
        # All or nothing: every group's new factors are computed and checked before the first write.
        pending: list[tuple[list[Any], Tensor, Tensor]] = []
        for idx in groups.values():
            layers = [self._layers[j][1] for j in idx]
            dtype = torch.promote_types(factors[idx[0]][2].dtype, torch.float32)
            b_p = torch.stack([factors[j][0] for j in idx]).to(dtype)
            a_p = torch.stack([factors[j][1] for j in idx]).to(dtype)
            b_a = torch.stack([factors[j][2] for j in idx]).to(dtype)
            a_a = torch.stack([factors[j][3] for j in idx]).to(dtype)
            finite = torch.stack([torch.isfinite(t).flatten(1).all(1) for t in (b_p, a_p, b_a, a_a)]).all(0)
            if not bool(finite.all()):
                bad = [self._layers[idx[i]][0] for i in torch.nonzero(~finite).flatten().tolist()]
                raise ValueError(
                    f"update_anchor_: the policy or anchor adapter holds NaN or inf on {len(bad)} layer(s), "
                    f"e.g. {bad[:3]}; the anchor was left unchanged"
                )
            scale = torch.tensor([float(layer.scaling[POLICY_ADAPTER]) for layer in layers], dtype=dtype)
            scale = scale.to(b_p.device).view(-1, 1, 1)
            r_p, r_a = a_p.shape[-2], int(self.anchor_rank or 0)
            if decay == 0.0 and r_a >= r_p:
                b_new = torch.cat([scale * b_p, b_p.new_zeros(*b_p.shape[:-1], r_a - r_p)], dim=-1)
                a_new = torch.cat([a_p, a_p.new_zeros(a_p.shape[0], r_a - r_p, a_p.shape[-1])], dim=-2)
                disc = b_p.new_zeros(len(layers))
                total = b_p.new_ones(len(layers))
            else:
                b_new, a_new, disc, total = ema_low_rank(
                    b_a, a_a, b_p, a_p, decay=decay, scale=scale, rank=r_a
                )
            # the values as they will be stored (an fp16 adapter can overflow where float32 did not)
            b_new = b_new.to(factors[idx[0]][2].dtype)
            a_new = a_new.to(factors[idx[0]][3].dtype)
            if not bool(torch.isfinite(b_new).all() & torch.isfinite(a_new).all()):
                raise ValueError(
                    "update_anchor_: the new anchor factors are not finite in the adapter dtype "
                    f"{b_new.dtype} (layers like {self._layers[idx[0]][0]!r}); the anchor was left unchanged"
                )
            pending.append((layers, b_new, a_new))
            ratios.append(torch.where(total > 0, disc / total.clamp_min(1e-300), 0.0).sqrt().to("cpu"))
            disc_total.append(disc.sum().to("cpu", torch.float64))
            norm_total.append(total.sum().to("cpu", torch.float64))
        for layers, b_new, a_new in pending:
            for i, layer in enumerate(layers):
                _write_(layer.lora_B[ANCHOR_ADAPTER].weight, b_new[i])
                _write_(layer.lora_A[ANCHOR_ADAPTER].weight, a_new[i])
        all_norm = float(torch.stack(norm_total).sum())
        total_rel = math.sqrt(float(torch.stack(disc_total).sum()) / all_norm) if all_norm > 0 else 0.0
        return AnchorUpdate(float(torch.cat(ratios).max()), total_rel, n_layers)

    def delta_weights(self, adapter: str = POLICY_ADAPTER) -> dict[str, Tensor]:
        """Materialized `ΔW` per adapted layer (`(out, in)`, `nn.Linear` layout, float32, detached):
        `scale·B·A` of `adapter` (`"default"`, `"anchor"` or `"critic"`). For inspection and tests; `O(m·n)` each."""
        if adapter == ANCHOR_ADAPTER:
            self._require_anchor('delta_weights("anchor")')
        names = (POLICY_ADAPTER, ANCHOR_ADAPTER, *((VALUE_ADAPTER,) if self.value_adapter else ()))
        if adapter not in names:
            raise ValueError(f"adapter must be one of {names}, got {adapter!r}")
        out = {}
        for name, layer in self._layers:
            b = layer.lora_B[adapter].weight.detach().float()
            a = layer.lora_A[adapter].weight.detach().float()
            out[name] = float(layer.scaling[adapter]) * (b @ a)
        return out

    # ------------------------------------------------------------------------------------------------ params
    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters with `requires_grad` (policy adapter, critic adapter, value head), in
        `named_parameters` order: hand these to the optimizer (split them for separate learning rates)."""
        return [p for p in self.parameters() if p.requires_grad]

    def parameter_counts(self) -> ParameterCounts:
        """Element counts; see [`ParameterCounts`][prefopt.policy.ParameterCounts]."""
        total = sum(p.numel() for p in self.parameters())
        trainable = sum(p.numel() for p in self.trainable_parameters())
        return ParameterCounts(trainable, total, trainable / total if total else 0.0)

    # ------------------------------------------------------------------------------------------------ export
    def merged_model(self) -> nn.Module:
        """A plain (non-peft) copy of the model with the policy adapter merged, `W0 + s·B_p·A_p`.

        Costs one deep copy of the backbone; this policy is left untouched and usable."""
        if self._mode != "policy":
            raise RuntimeError(f"merged_model() called inside {self._mode}()")
        clone = copy.deepcopy(self.model)
        if self.has_anchor:
            _tuner(clone).delete_adapter(ANCHOR_ADAPTER)
        if self.value_adapter:
            _tuner(clone).delete_adapter(VALUE_ADAPTER)
        return clone.merge_and_unload(adapter_names=[POLICY_ADAPTER])

    def _saved_state(self) -> dict[str, Tensor]:
        keep = (f".{POLICY_ADAPTER}.", f".{ANCHOR_ADAPTER}.", f".{VALUE_ADAPTER}.")
        return {
            k: v.detach().contiguous()
            for k, v in self.state_dict().items()
            if (("lora_" in k) and any(s in k for s in keep)) or k.startswith("value_head.")
        }

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write the policy to `directory` **atomically**: after a crash at any point (process killed,
        power lost once the OS has flushed what was fsynced) [`load`][prefopt.policy.LoraPolicy.load] finds either the previous
        checkpoint in `directory` or the new one, complete — never a mix, never a broken file.

        Files: `prefopt_policy.json` (the commit record: format version, anchor rank, value-head flags,
        the LoRA config, the name of the tensor file and a fingerprint of the base model, see [`load`][prefopt.policy.LoraPolicy.load]),
        `prefopt_policy-<id>.safetensors` (policy, anchor and critic adapters and the value head, exact),
        and a plain peft export of the policy adapter (`adapter_config.json`,
        `adapter_model.safetensors`; loadable with `peft.PeftModel.from_pretrained`).

        Method: everything is written into a fresh hidden folder inside `directory` and fsynced; the tensor
        file moves in under a new unique name (nothing is overwritten); then `prefopt_policy.json` is
        replaced with one `os.replace` — the commit point — and the folder is fsynced. Only after the commit
        are the peft export files replaced (each atomically) and the previous tensor file and leftovers of
        interrupted saves deleted. Other files in `directory` are left alone. Two processes must not save
        into the same directory at the same time.
        """
        from safetensors.torch import save_file

        root = os.fspath(directory)
        if os.path.exists(root) and not os.path.isdir(root):
            raise ValueError(f"directory exists and is not a directory: {root}")
        os.makedirs(root, exist_ok=True)
        token = uuid.uuid4().hex[:16]
        staging = os.path.join(root, f"{_STAGING_PREFIX}{token}")
        os.mkdir(staging)
        try:
            self.model.save_pretrained(staging, selected_adapters=[POLICY_ADAPTER])
            tensor_name = f"{_TENSOR_PREFIX}{token}.safetensors"
            save_file(self._saved_state(), os.path.join(staging, tensor_name))
            with open(os.path.join(staging, _PEFT_CONFIG)) as f:
                lora_config = json.load(f)
            meta = {
                "format_version": _FORMAT_VERSION,
                "anchor": self.has_anchor,
                "anchor_rank": self.anchor_rank,
                "value_head": self.value_head is not None,
                "value_adapter": self.value_adapter,
                "tensor_file": tensor_name,
                "lora_config": lora_config,
                "base_model": _base_fingerprint(self.model.get_base_model()),
            }
            with open(os.path.join(staging, _META_FILE), "w") as f:
                json.dump(meta, f, indent=1)
            for name in os.listdir(staging):
                _fsync_file(os.path.join(staging, name))
            _fsync_dir(staging)
            os.replace(os.path.join(staging, tensor_name), os.path.join(root, tensor_name))
            _fsync_dir(root)
            os.replace(os.path.join(staging, _META_FILE), os.path.join(root, _META_FILE))  # commit
            _fsync_dir(root)
            for name in sorted(os.listdir(staging)):  # the peft export (and its README)
                os.replace(os.path.join(staging, name), os.path.join(root, name))
            _fsync_dir(root)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        for name in os.listdir(root):  # superseded tensor files, leftovers of interrupted saves
            path = os.path.join(root, name)
            if name == _LEGACY_TENSOR_FILE or (
                name.startswith(_TENSOR_PREFIX) and name.endswith(".safetensors") and name != tensor_name
            ):
                with contextlib.suppress(OSError):
                    os.remove(path)
            elif name.startswith(_STAGING_PREFIX):
                shutil.rmtree(path, ignore_errors=True)

    @classmethod
    def load(
        cls, base_model: nn.Module, directory: str | os.PathLike[str], *, check_base: bool = True
    ) -> LoraPolicy:
        """Rebuild a policy saved with [`save`][prefopt.policy.LoraPolicy.save] on `base_model` (wrapped in place). Every saved tensor
        is restored exactly.

        `base_model` must be the backbone the policy was trained on: [`save`][prefopt.policy.LoraPolicy.save] records every base
        parameter's name and shape and four sampled values of each, and `load` compares them (values to
        1% relative, so a float32 checkpoint loads onto the same model in bfloat16); a different
        architecture or different weights raise `ValueError` saying what differs. `check_base=False`
        skips this check (e.g. a quantized base).

        Every file is read and checked before `base_model` is touched, and if wrapping or restoring fails
        the peft layers are removed again, so `base_model` is given back as it was and a retry works.
        A missing `prefopt_policy.json` raises `FileNotFoundError`; a corrupt or truncated file, a
        missing field or a missing or unexpected tensor raises `ValueError` naming the file.
        """
        if not isinstance(check_base, bool):
            raise TypeError(f"check_base must be a bool, got {type(check_base).__name__}")
        root = os.fspath(directory)
        meta_path = os.path.join(root, _META_FILE)
        if not os.path.isfile(meta_path):
            raise FileNotFoundError(f"directory has no {_META_FILE}: {root}")
        meta = _read_json(meta_path)
        version = meta.get("format_version")
        if version not in (1, _FORMAT_VERSION):
            raise ValueError(f"{meta_path}: unsupported format_version {version!r}")
        try:
            anchor = bool(meta.get("anchor", True))  # checkpoints before anchor=False always had one
            anchor_rank = int(meta["anchor_rank"]) if anchor else None
            value_head = bool(meta["value_head"])
            value_adapter = bool(meta.get("value_adapter", False))
            if version == 1:
                tensor_path = os.path.join(root, _LEGACY_TENSOR_FILE)
                config_path = os.path.join(root, _PEFT_CONFIG)
                config_dict = _read_json(config_path)
            else:
                tensor_name = str(meta["tensor_file"])
                if os.path.basename(tensor_name) != tensor_name:
                    raise ValueError(f"tensor_file must be a file name, got {tensor_name!r}")
                tensor_path = os.path.join(root, tensor_name)
                config_path = meta_path
                config_dict = meta["lora_config"]
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{meta_path}: not a valid prefopt checkpoint record ({err!r})") from err
        try:
            cfg = peft.LoraConfig.from_peft_type(**peft.LoraConfig.check_kwargs(**config_dict))
        except Exception as err:
            raise ValueError(f"{config_path}: invalid LoRA config ({err!r})") from err
        saved = _read_tensors(tensor_path)
        if check_base and "base_model" in meta:
            _check_base(base_model, meta["base_model"], meta_path)
        policy = cls(
            base_model,
            cfg,
            anchor=anchor,
            anchor_rank=anchor_rank,
            value_head=value_head,
            value_adapter=value_adapter,
        )
        try:
            expected = policy._saved_state()
            if set(saved) != set(expected):
                missing = sorted(set(expected) - set(saved))[:5]
                extra = sorted(set(saved) - set(expected))[:5]
                raise ValueError(
                    f"{tensor_path}: saved tensors do not match the model: missing {missing}, unexpected {extra}"
                )
            for k, v in expected.items():
                if v.shape != saved[k].shape:
                    raise ValueError(
                        f"{tensor_path}: saved tensor {k} has shape {tuple(saved[k].shape)}, expected {tuple(v.shape)}"
                    )
            with torch.no_grad():
                for k, v in expected.items():
                    v.copy_(saved[k])
        except BaseException:
            _tuner(policy.model).unload()  # give the caller back an un-wrapped model
            raise
        return policy


# ---------------------------------------------------------------------------------------------- checkpoint io
_PEFT_CONFIG = "adapter_config.json"
_STAGING_PREFIX = ".prefopt-save-"
_TENSOR_PREFIX = "prefopt_policy-"
_FINGERPRINT_SAMPLES = 4
_FINGERPRINT_RTOL = 1e-2


@torch.no_grad()
def ema_update_(
    anchor: Tensor | Iterable[Tensor], policy: Tensor | Iterable[Tensor], *, decay: float
) -> None:
    """In place: `anchor ← decay·anchor + (1 − decay)·policy`, the tensor-level EMA anchor.

    The same parametrisation as [`LoraPolicy.update_anchor_`][prefopt.policy.LoraPolicy.update_anchor_], for anchors kept as full weights; J-BOND's
    `η` (Sessa et al., Alg. 2) is `1 − decay`. `decay = 0` copies the policy into the anchor, `decay = 1`
    leaves the anchor fixed (non-iterative BOND with `N = 2`). Accepts one tensor or matching iterables of
    tensors (e.g. parameter lists), floating
    point, pairwise on one device. All or nothing: if any policy tensor holds NaN/inf (`ValueError`) or
    any pair is malformed (`TypeError`/`ValueError` naming its index), no anchor tensor is written.
    """
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not (0 <= decay <= 1):
        raise ValueError(f"decay must be a number in [0, 1], got {decay!r}")
    anchors = [anchor] if isinstance(anchor, Tensor) else list(anchor)
    policies = [policy] if isinstance(policy, Tensor) else list(policy)
    if len(anchors) != len(policies):
        raise ValueError(f"anchor has {len(anchors)} tensors but policy has {len(policies)}")
    # All or nothing: every pair is checked before the first anchor is written.
    for i, (a, p) in enumerate(zip(anchors, policies)):
        for name, t in (("anchor", a), ("policy", p)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(t).__name__}")
            if not t.is_floating_point():
                raise TypeError(f"{name}[{i}] must be a floating-point tensor, got dtype {t.dtype}")
        if a.shape != p.shape:
            raise ValueError(
                f"anchor[{i}] has shape {tuple(a.shape)} but policy[{i}] has shape {tuple(p.shape)}"
            )
        if a.device != p.device:
            raise ValueError(f"anchor[{i}] is on {a.device} but policy[{i}] is on {p.device}")
    if policies:
        finite = torch.stack([torch.isfinite(p).all().to(policies[0].device) for p in policies])
        if not bool(finite.all()):
            bad = torch.nonzero(~finite).flatten().tolist()
            raise ValueError(f"policy{bad[:5]} hold NaN or inf; the anchor was left unchanged")
    for a, p in zip(anchors, policies):
        a.lerp_(p.to(a.dtype), 1.0 - float(decay))


def is_lora_policy(obj: Any) -> bool:
    """`True` if `obj` is a [`LoraPolicy`][prefopt.policy.LoraPolicy] (the one check every module uses to tell it from a model)."""
    return isinstance(obj, LoraPolicy)


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """`module` and all its submodules in eval mode (dropout off: deterministic forwards) inside; each
    submodule's own train/eval flag is restored afterwards, also on an exception."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def reference_sync_(
    policy: LoraPolicy, step: int, *, alpha: float = 0.6, every: int | None = 512
) -> AnchorUpdate | None:
    r"""TR-DPO's moving reference on one backbone: the anchor adapter is the reference, synced every `every` steps.

    Call after optimizer step `step` (counted from 1, TRL's `global_step`); when `step % every == 0`,

    $$
    \Delta W_{\text{ref}} \leftarrow (1 - \alpha)\,\Delta W_{\text{ref}} + \alpha\,\Delta W_\theta,
    $$

    i.e. `policy.update_anchor_(decay=1 − α)`.

    (Gorbatovski et al. 2024, "Learn Your Reference Model for Real Good Alignment", arXiv 2404.09656, §3: soft
    update α < 1, hard update α = 1; TRL's `sync_ref_model` with `ref_model_mixup_alpha` (0.6) and
    `ref_model_sync_steps` (512), which TRL refuses with PEFT). Use the anchor as the reference:
    `pair_logps(policy, batch, reference="anchor")` for DPO-style losses,
    `with policy.anchor(): token_logps(...)` for the KL term of GRPO/PPO.

    Properties (tested): `every=None` (never) leaves the anchor at its start `ΔW = 0`, so the loss equals the
    frozen-reference loss bitwise; a hard sync (`α = 1`) copies the policy adapter exactly (`anchor_rank ≥ r`)
    and the reference log-probs then equal the policy's (to float rounding); a soft sync is the closed-form EMA
    of the two low-rank updates — exact while `anchor_rank` holds its rank (`2r` for the first sync with
    the default `anchor_rank = 2r`), otherwise the best rank-`r_a` approximation (the returned
    [`AnchorUpdate`][prefopt.policy.AnchorUpdate] reports what was dropped).

    Returns:
        the [`AnchorUpdate`][prefopt.policy.AnchorUpdate] of a sync, or `None` when `step` is not a sync step.
    """
    if not isinstance(policy, LoraPolicy):
        raise TypeError(f"policy must be a LoraPolicy, got {type(policy).__name__}")
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"step must be an integer >= 1 (optimizer steps taken), got {step!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (0.0 < alpha <= 1.0):
        raise ValueError(f"alpha must be a number in (0, 1], got {alpha!r}")
    if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
        raise ValueError(f"every must be an integer >= 1 or None (never sync), got {every!r}")
    if every is None or step % every:
        return None
    return policy.update_anchor_(1.0 - float(alpha))


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    """Make renames inside `path` durable (POSIX); a no-op where directories cannot be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: corrupt or truncated JSON ({err})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _read_tensors(path: str) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint tensor file is missing: {path}")
    try:
        return load_file(path)
    except Exception as err:  # safetensors raises SafetensorError (and others) for corrupt or truncated files
        raise ValueError(f"{path}: corrupt or truncated safetensors file ({err})") from err


def _base_parameters(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """The base model's parameters under their original names (peft's `.base_layer` and adapters removed)."""
    for name, p in model.named_parameters():
        if "lora_" in name:
            continue
        yield name.replace(".base_layer.", "."), p


def _base_fingerprint(model: nn.Module) -> dict[str, Any]:
    """Names, shapes and `_FINGERPRINT_SAMPLES` evenly spaced values of every base parameter (float64).
    Sharded (DTensor) and meta-device parameters contribute their shape only."""
    shapes: dict[str, list[int]] = {}
    picks: list[tuple[str, Tensor]] = []
    for name, p in _base_parameters(model):
        shapes[name] = list(p.shape)
        if p.is_meta or hasattr(p, "device_mesh") or p.numel() == 0:
            continue
        n = p.numel()
        idx = torch.tensor(
            sorted({(i * (n - 1)) // max(_FINGERPRINT_SAMPLES - 1, 1) for i in range(_FINGERPRINT_SAMPLES)}),
            device=p.device,
        )
        picks.append((name, p.detach().reshape(-1)[idx]))
    samples: dict[str, list[float]] = {}
    if picks:
        flat = torch.cat([v.to("cpu", torch.float64) for _, v in picks]).tolist()
        pos = 0
        for name, v in picks:
            samples[name] = flat[pos : pos + v.numel()]
            pos += v.numel()
    return {"shapes": shapes, "samples": samples}


def _check_base(model: nn.Module, saved: Any, meta_path: str) -> None:
    hint = " (pass check_base=False to load anyway)"
    try:
        want_shapes = {str(k): [int(x) for x in v] for k, v in saved["shapes"].items()}
        want_samples = {str(k): [float(x) for x in v] for k, v in saved["samples"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise ValueError(f"{meta_path}: corrupt base_model record ({err!r})") from err
    now = _base_fingerprint(model)
    have_shapes: dict[str, list[int]] = now["shapes"]
    missing = sorted(set(want_shapes) - set(have_shapes))
    extra = sorted(set(have_shapes) - set(want_shapes))
    if missing or extra:
        raise ValueError(
            f"base_model is not the model this checkpoint was saved on ({meta_path}): its parameters differ; "
            f"missing {missing[:5]} ({len(missing)} in all), unexpected {extra[:5]} ({len(extra)} in all){hint}"
        )
    wrong = [k for k in want_shapes if want_shapes[k] != have_shapes[k]]
    if wrong:
        k = wrong[0]
        raise ValueError(
            f"base_model is not the model this checkpoint was saved on ({meta_path}): parameter {k} has shape "
            f"{tuple(have_shapes[k])}, saved {tuple(want_shapes[k])} ({len(wrong)} parameters differ in shape){hint}"
        )
    have_samples: dict[str, list[float]] = now["samples"]
    differ = []
    for k, want in want_samples.items():
        have = have_samples.get(k)
        if have is None or len(have) != len(want):
            continue  # sharded or meta now: shapes were checked
        if any(
            not (abs(a - b) <= _FINGERPRINT_RTOL * max(abs(a), abs(b)) + 1e-6)  # NaN fails too
            for a, b in zip(have, want)
        ):
            differ.append(k)
    if differ:
        raise ValueError(
            f"base_model is not the model this checkpoint was saved on ({meta_path}): it has the same "
            f"architecture but different weights in {len(differ)} of {len(want_samples)} parameters, "
            f"e.g. {differ[:3]}{hint}"
        )
