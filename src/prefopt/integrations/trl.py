r"""Keep TRL's ``DPOTrainer`` (data pipeline, fused LM head, reference handling, logging, accelerate/DeepSpeed/FSDP)
and compute the loss with any pairwise prefopt loss.

[`PrefoptDPOTrainer`][prefopt.integrations.trl.PrefoptDPOTrainer] subclasses ``trl.DPOTrainer`` (tested with
TRL 1.16.0) and replaces only the loss computation, ``_compute_loss``. Per-token log-probs still come from
TRL's fused LM head (``model(..., labels=labels, fused_lm_head=True).log_probs``, no ``(B, T, V)`` logits),
the reference from ``ref_model``, from the PEFT model with its adapter disabled (or its ``"ref"`` adapter), or
from precomputed columns — exactly as TRL does. What changes: the sequence sums become a
[`prefopt.types.PairLogps`][prefopt.types.PairLogps]

$$
S(y) = \sum_t m_t \log \pi_\theta(y_t \mid x, y_{<t}), \qquad |y| = \sum_t m_t
$$

(chosen = first half of the batch, rejected = second half, with ``ref_*`` fields and lengths), which is fed to
``prefopt.get_loss(loss, **loss_kwargs)``; the training loss is the mean of its unreduced per-pair loss, as in
TRL (``per_sequence_loss.mean()``).

An example:

    from prefopt.integrations.trl import PrefoptDPOTrainer
    from trl import DPOConfig

    trainer = PrefoptDPOTrainer(
        model=model, args=DPOConfig(output_dir="out"), train_dataset=ds, processing_class=tok,
        peft_config=lora_config,                       # reference = adapters off, one backbone
        loss="simpo", loss_kwargs={"beta": 2.0, "gamma": 0.5},
    )
    trainer.train()

Correspondence with TRL's ``loss_type`` on the same batch (tested in ``tests/test_trl_interop.py``, TRL's
``beta`` and ``label_smoothing`` passed as prefopt hyperparameters): ``sigmoid`` = ``dpo``, ``hinge`` =
``hinge``, ``ipo`` = ``ipo``, ``robust`` = ``robust_dpo``, ``exo_pair``, ``nca_pair``, ``bco_pair``, ``sppo_hard``,
``aot``, ``aot_unpaired``, ``apo_zero``, ``apo_down``, ``discopop`` and ``sigmoid_norm`` = the prefopt loss of
the same name. Losses TRL does not have (``simpo``, ``cpo``, ``orpo``, ``rdpo``, ``dpop``, ``cdpo``, ...) just work.

TRL options that act on top of any loss work as in TRL (tested value-for-value and gradient-for-gradient):
``ld_alpha`` (LD-DPO: the sums become
[`prefopt.losses.weighted.ld_pair_logps`][prefopt.losses.weighted.ld_pair_logps], policy and reference) and
``use_weighting`` (WPO: each pair's loss is multiplied by
[`prefopt.losses.weighted.wpo_weights`][prefopt.losses.weighted.wpo_weights] of the chosen and of the rejected
response, from the ``log Σ_v π_v²`` of TRL's fused head).

Not supported (a ``ValueError`` at construction, rather than silently ignored): TRL options that change the
loss — ``loss_type`` other than the default ``["sigmoid"]``, ``loss_weights``, ``f_divergence_type`` other
than ``"reverse_kl"`` (use prefopt's ``f_divergence`` hyperparameter); and prefopt losses that need more than
a ``PairLogps`` (e.g. ``pairwise_normalized``, KTO, RL losses).
For ``loss_type="sft"`` mixing use prefopt's ``mpo`` or the ``nll_*`` hyperparameters of ``cpo``/``orpo``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Mapping
from typing import Any

try:
    import trl
    from accelerate.utils import is_peft_model
    from trl import DPOTrainer
    from trl.models.utils import disable_gradient_checkpointing
    from trl.trainer.utils import use_adapter
except ImportError as err:  # pragma: no cover - exercised only without trl
    raise ImportError(
        "prefopt.integrations.trl needs TRL (tested with trl==1.16.0), an optional extra of prefopt: "
        "pip install 'prefopt[trl]'  (or: pip install trl==1.16.0)"
    ) from err

import torch
from torch import Tensor

from prefopt.losses.weighted import ld_pair_logps, wpo_weights
from prefopt.registry import BoundLoss, get_loss, get_spec
from prefopt.types import LossOutput, PairLogps

__all__ = ["PrefoptDPOTrainer", "check_pairwise_loss"]

_TRL_DEFAULT_LOSS = ["sigmoid"]


def check_pairwise_loss(name: str) -> None:
    """Raise ``ValueError`` unless the registered loss ``name`` takes a single [`PairLogps`][prefopt.types.PairLogps].

    (``KeyError`` with the list of names for an unknown ``name``.)
    """
    spec = get_spec(name)
    needed = list(spec.required_data)
    if spec.inputs != "pairs" or needed:
        what = f"input kind {spec.inputs!r}" + (f" and the data {needed}" if needed else "")
        raise ValueError(
            f"loss={name!r} is not a pairwise loss on PairLogps alone (it needs {what}); PrefoptDPOTrainer "
            "supports the margin, reference-free, combined and pairwise decoupled losses"
        )


class PrefoptDPOTrainer(DPOTrainer):  # type: ignore[misc]
    """TRL's ``DPOTrainer`` whose loss is ``prefopt.get_loss(loss, **loss_kwargs)``; see the module docstring.

    Positional and other keyword arguments go to ``trl.DPOTrainer`` unchanged (``model``, ``ref_model``,
    ``args``, ``train_dataset``, ``processing_class``, ``peft_config``, ...).

    Args:
        loss: a registered pairwise loss name (default ``"dpo"``).
        loss_kwargs: its keyword-only hyperparameters (validated before TRL builds anything). TRL's
            ``DPOConfig.beta`` is **not** forwarded: pass ``beta`` here (prefopt's default applies otherwise).

    Attributes:
        prefopt_loss: the [`prefopt.registry.BoundLoss`][prefopt.registry.BoundLoss] used by
            ``_compute_loss``.

    Metrics logged (averaged over the logging interval, gathered over processes): ``logps/chosen``,
    ``logps/rejected`` and ``prefopt/<name>`` for every metric of the loss's ``LossOutput``.
    """

    def __init__(
        self, *args: Any, loss: str = "dpo", loss_kwargs: Mapping[str, Any] | None = None, **kwargs: Any
    ):
        if not isinstance(loss, str):
            raise TypeError(f"loss must be a registered loss name (str), got {type(loss).__name__}")
        if loss_kwargs is not None and not isinstance(loss_kwargs, Mapping):
            raise TypeError(
                f"loss_kwargs must be a mapping of hyperparameters, got {type(loss_kwargs).__name__}"
            )
        check_pairwise_loss(loss)
        self.prefopt_loss: BoundLoss = get_loss(loss, **dict(loss_kwargs or {}))
        super().__init__(*args, **kwargs)
        self._check_trl_args()

    def _check_trl_args(self) -> None:
        problems = []
        if list(self.loss_types) != _TRL_DEFAULT_LOSS:
            problems.append(f"loss_type={self.loss_types!r} (the prefopt loss replaces it)")
        args: Any = self.args  # a trl.DPOConfig (typed as TrainingArguments by transformers)
        if args.loss_weights:
            problems.append(f"loss_weights={args.loss_weights!r}")
        if self.f_divergence_type != "reverse_kl":
            problems.append(
                f"f_divergence_type={self.f_divergence_type!r} (use the f_divergence hyperparameter)"
            )
        if problems:
            raise ValueError("PrefoptDPOTrainer: unsupported DPOConfig setting(s): " + "; ".join(problems))

    # ----------------------------------------------------------------------------------------------------------
    def _reference_token_logps(self, model_kwargs: dict[str, Any], labels: Tensor, seq_len: int) -> Tensor:
        """Reference per-token log-probs ``(2B, seq_len)`` (0 where the label is -100), the way TRL computes
        them (ref_model, or the PEFT model without adapter)."""
        policy: Any = self.model
        ref_model: Any = self.ref_model
        gc_kwargs: Any = self.args.gradient_checkpointing_kwargs
        with torch.no_grad(), disable_gradient_checkpointing(policy, gc_kwargs):
            if is_peft_model(policy) and ref_model is None:
                unwrapped = self.accelerator.unwrap_model(policy)
                name = "ref" if "ref" in unwrapped.peft_config else None
                ctx: Any = use_adapter(unwrapped, adapter_name=name)
                ref_model = policy
            else:
                ctx = contextlib.nullcontext()
            with ctx:
                out = ref_model(**model_kwargs, labels=labels, fused_lm_head=True)
        return out.log_probs[:, -seq_len:]

    def _compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool) -> Any:
        policy: Any = self.model
        mode = "train" if policy.training else "eval"
        non_model = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}
        model_kwargs = {k: v for k, v in inputs.items() if k not in non_model}
        model_kwargs["use_cache"] = False
        if self.aux_loss_enabled:
            model_kwargs["output_router_logits"] = True
        completion_mask = inputs["completion_mask"]
        shift_mask = completion_mask[:, 1:].bool()
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)
        seq_len = shift_mask.shape[1]
        # 0 where the label is -100, so a plain sum is Σ_t m_t log π(y_t | ·)
        per_token = outputs.log_probs[:, -seq_len:]
        ref_token: Tensor | None = None
        ref_sums: tuple[Tensor, Tensor] | None = None
        if self.prefopt_loss.needs_reference:
            if self.precompute_ref_logps:
                ref_sums = (inputs["ref_chosen_logps"], inputs["ref_rejected_logps"])
            else:
                ref_kwargs = {k: v for k, v in model_kwargs.items() if k != "output_router_logits"}
                ref_token = self._reference_token_logps(ref_kwargs, labels, seq_len)
        if self.ld_alpha is None:
            lengths = shift_mask.sum(dim=1)
            chosen, rejected = per_token.sum(dim=1).chunk(2, dim=0)
            chosen_len, rejected_len = lengths.chunk(2, dim=0)
            if ref_token is not None:
                ref_sums = ref_token.sum(dim=1).chunk(2, dim=0)  # type: ignore[assignment]
            pairs = PairLogps(chosen, rejected, None, None, chosen_len, rejected_len)
        else:  # LD-DPO on policy and reference alike, as TRL (precomputed reference sums are used as given)
            pairs = ld_pair_logps(per_token, ref_token, shift_mask, ld_alpha=float(self.ld_alpha))
            if ref_token is not None:
                ref_sums = (pairs.ref_chosen, pairs.ref_rejected)  # type: ignore[assignment]
        chosen, rejected = pairs.chosen, pairs.rejected
        if ref_sums is not None:
            pairs = dataclasses.replace(
                pairs, ref_chosen=ref_sums[0].to(chosen.dtype), ref_rejected=ref_sums[1].to(chosen.dtype)
            )
        result: LossOutput = self.prefopt_loss(pairs)
        per_pair = result.loss
        if self.use_weighting:  # WPO (Zhou et al. 2024, Eq. 2): detached weights of both responses, as TRL
            w = wpo_weights(per_token, outputs.log_sum_sq_probs[:, -seq_len:], shift_mask)
            w_chosen, w_rejected = w.chunk(2, dim=0)
            per_pair = per_pair * (w_chosen * w_rejected).to(per_pair.dtype)
        loss = per_pair.mean()
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss

        gather = self.accelerator.gather_for_metrics
        self._metrics[mode]["logps/chosen"].append(gather(chosen.detach()).mean().item())
        self._metrics[mode]["logps/rejected"].append(gather(rejected.detach()).mean().item())
        for key, value in result.metrics.items():
            v = value.detach().float()
            self._metrics[mode][f"prefopt/{key}"].append(gather(v.reshape(-1)).mean().item())

        if return_outputs:
            with torch.no_grad():
                outputs = model(**model_kwargs)
            return loss, outputs
        return loss


#: The TRL version this bridge was written against (``_compute_loss`` is a private TRL method).
TESTED_TRL_VERSION = "1.16.0"
if getattr(trl, "__version__", TESTED_TRL_VERSION) != TESTED_TRL_VERSION:  # pragma: no cover
    import warnings

    warnings.warn(
        f"prefopt.integrations.trl was tested with trl=={TESTED_TRL_VERSION}, found {trl.__version__}; "
        "PrefoptDPOTrainer overrides DPOTrainer._compute_loss, a private method",
        stacklevel=2,
    )
