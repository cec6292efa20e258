"""``prefopt.integrations.trl.PrefoptDPOTrainer`` against TRL's own ``DPOTrainer`` on the same batch.

Two identical tiny LoRA models (same seed, same non-zero adapter weights) and one tokenized batch from TRL's own
data pipeline: TRL with ``loss_type=X`` and the bridge with the corresponding prefopt loss must give the same
loss and the same adapter gradients. Losses TRL lacks (SimPO) are checked against a slow oracle: per-token
log-probs from the full ``log_softmax`` of the model's logits and the paper's formula written out by hand.
"""

from __future__ import annotations

import importlib
import math
import sys
from typing import Any

import pytest
import torch
import torch.nn.functional as F

# importing trl and building the trainers takes ~10 s on a loaded 2-core machine
pytestmark = pytest.mark.slow

BETA = 0.5


def _lora_config() -> Any:
    import peft

    return peft.LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, bias="none", task_type="CAUSAL_LM"
    )


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    pytest.importorskip("trl")
    from trl import DPOConfig, DPOTrainer

    from prefopt.data import load_builtin_pairs
    from prefopt.integrations.trl import PrefoptDPOTrainer
    from prefopt.testing import char_tokenizer, tiny_causal_lm

    tok = char_tokenizer()
    rows = load_builtin_pairs().select(range(4))
    out = str(tmp_path_factory.mktemp("trl"))

    def make(cls: type, **kwargs: Any) -> Any:
        model = tiny_causal_lm("llama", vocab_size=len(tok), seed=0)
        args = DPOConfig(
            output_dir=out,
            per_device_train_batch_size=4,
            report_to=[],
            use_cpu=True,
            beta=BETA,
            max_length=128,
            seed=0,
            **kwargs.pop("config", {}),
        )
        trainer = cls(
            model=model,
            args=args,
            train_dataset=rows,
            processing_class=tok,
            peft_config=_lora_config(),
            **kwargs,
        )
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():  # non-zero adapters: policy ≠ reference
            for name, p in trainer.model.named_parameters():
                if "lora_" in name:
                    p.copy_(0.2 * torch.randn(p.shape, generator=gen))
        trainer.model.train()
        return trainer

    trl_trainer = make(DPOTrainer)
    ours = make(PrefoptDPOTrainer, loss="dpo", loss_kwargs={"beta": BETA})
    batch = trl_trainer._prepare_inputs(next(iter(trl_trainer.get_train_dataloader())))
    return {"trl": trl_trainer, "ours": ours, "batch": batch, "make": make, "tok": tok}


def _loss_and_grads(
    trainer: Any, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    trainer.model.zero_grad(set_to_none=True)
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    trainer.model.zero_grad(set_to_none=True)
    return loss.detach(), grads


# (TRL loss_type, TRL attributes, prefopt loss, prefopt hyperparameters besides beta)
CASES = [
    ("sigmoid", {}, "dpo", {}),
    ("hinge", {}, "hinge", {}),
    ("ipo", {}, "ipo", {}),
    ("robust", {"label_smoothing": 0.1}, "robust_dpo", {"label_smoothing": 0.1}),
    ("exo_pair", {"label_smoothing": 1e-3}, "exo_pair", {"label_smoothing": 1e-3}),
    ("nca_pair", {}, "nca_pair", {}),
    ("bco_pair", {}, "bco_pair", {}),
    ("sppo_hard", {}, "sppo_hard", {}),
    ("aot", {"label_smoothing": 0.1}, "aot", {"label_smoothing": 0.1}),
    ("aot_unpaired", {}, "aot_unpaired", {}),
    ("apo_zero", {}, "apo_zero", {}),
    ("apo_down", {}, "apo_down", {}),
    ("discopop", {}, "discopop", {"tau": 0.05}),
    ("sigmoid_norm", {}, "sigmoid_norm", {}),
    ("sigmoid", {"f_divergence_type": "js_divergence"}, "dpo", {"f_divergence": "js_divergence"}),
    (
        "sigmoid",
        {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.3},
        "dpo",
        {"f_divergence": "alpha_divergence", "f_alpha": 0.3},
    ),
]


@pytest.mark.parametrize(
    ("trl_type", "trl_attrs", "name", "hparams"), CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES]
)
def test_same_loss_and_gradients_as_trl(
    setup: dict[str, Any], trl_type: str, trl_attrs: dict[str, Any], name: str, hparams: dict[str, Any]
) -> None:
    from prefopt.registry import get_loss

    trl_trainer, ours, batch = setup["trl"], setup["ours"], setup["batch"]
    saved = {k: getattr(trl_trainer, k) for k in ("loss_types", "label_smoothing", "f_divergence_type")}
    saved["f_alpha_divergence_coef"] = trl_trainer.f_alpha_divergence_coef
    try:
        trl_trainer.loss_types = [trl_type]
        for k, v in trl_attrs.items():
            setattr(trl_trainer, k, v)
        ours.prefopt_loss = get_loss(name, beta=BETA, **hparams)
        l_trl, g_trl = _loss_and_grads(trl_trainer, batch)
        l_ours, g_ours = _loss_and_grads(ours, batch)
    finally:
        for k, v in saved.items():
            setattr(trl_trainer, k, v)
    torch.testing.assert_close(l_ours, l_trl, rtol=1e-6, atol=1e-7)
    assert g_ours.keys() == g_trl.keys() and len(g_trl) > 0
    scale = max(float(g.abs().max()) for g in g_trl.values())
    assert scale > 1e-4, "degenerate case: no gradient to compare"
    for k in g_trl:
        torch.testing.assert_close(g_ours[k], g_trl[k], rtol=1e-5, atol=1e-6 * scale, msg=k)


def _naive_sums(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Slow oracle: full log_softmax of the logits, gather the next token, sum over completion tokens."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    mask = batch["completion_mask"][:, 1:].bool()
    return (logp * mask).sum(1), mask.sum(1)


def test_simpo_matches_hand_formula(setup: dict[str, Any]) -> None:
    """SimPO (Meng et al. 2024, Eq. 6), which TRL's DPOTrainer does not have, against a hand-written oracle."""
    from prefopt.registry import get_loss

    ours, batch = setup["ours"], setup["batch"]
    beta, gamma = 2.0, 0.5
    ours.prefopt_loss = get_loss("simpo", beta=beta, gamma=gamma)
    try:
        loss, grads = _loss_and_grads(ours, batch)
    finally:
        ours.prefopt_loss = get_loss("dpo", beta=BETA)
    model = ours.model
    model.zero_grad(set_to_none=True)
    s, n = _naive_sums(model, batch)
    b = s.shape[0] // 2
    margin = s[:b] / n[:b] - s[b:] / n[b:]
    # −log σ(z) = log(1 + e^{−z}), pair by pair in Python floats
    expected = sum(math.log1p(math.exp(-(beta * float(m) - gamma))) for m in margin.detach()) / b
    assert abs(float(loss) - expected) <= 1e-5 * max(1.0, expected), (float(loss), expected)
    (-F.logsigmoid(beta * margin - gamma)).mean().backward()
    for k, g in grads.items():
        p = dict(model.named_parameters())[k]
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-6, msg=k)
    model.zero_grad(set_to_none=True)


def test_dpo_matches_hand_formula_with_reference_from_disabled_adapter(setup: dict[str, Any]) -> None:
    ours, batch = setup["ours"], setup["batch"]
    loss, _ = _loss_and_grads(ours, batch)
    with torch.no_grad():
        s, _ = _naive_sums(ours.model, batch)
        with ours.model.disable_adapter():
            s_ref, _ = _naive_sums(ours.model, batch)
    b = s.shape[0] // 2
    h = (s[:b] - s_ref[:b]) - (s[b:] - s_ref[b:])
    expected = sum(math.log1p(math.exp(-BETA * float(x))) for x in h) / b
    assert abs(float(loss) - expected) <= 1e-5 * max(1.0, expected)
    assert abs(expected - math.log(2)) > 1e-3  # policy ≠ reference: not the trivial zero point


def test_precomputed_reference_columns_are_used(setup: dict[str, Any]) -> None:
    """With ``precompute_ref_log_probs=True`` the loss uses TRL's ``ref_*_logps`` columns: compare with the DPO
    formula on naive policy sums and those columns (they differ from the live reference by float noise, so the
    check also tells which one was used)."""
    from prefopt.integrations.trl import PrefoptDPOTrainer

    pre = setup["make"](
        PrefoptDPOTrainer, loss="dpo", loss_kwargs={"beta": BETA}, config={"precompute_ref_log_probs": True}
    )
    batch = pre._prepare_inputs(next(iter(pre.get_train_dataloader())))
    assert "ref_chosen_logps" in batch
    torch.testing.assert_close(batch["input_ids"], setup["batch"]["input_ids"])
    loss, _ = _loss_and_grads(pre, batch)
    with torch.no_grad():
        s, _ = _naive_sums(pre.model, batch)
        with pre.model.disable_adapter():
            s_ref, _ = _naive_sums(pre.model, batch)
    b = s.shape[0] // 2
    ref = torch.cat([batch["ref_chosen_logps"], batch["ref_rejected_logps"]]).float()
    torch.testing.assert_close(ref, s_ref, rtol=1e-4, atol=1e-3)  # the columns are the reference sums
    h = (s[:b] - ref[:b]) - (s[b:] - ref[b:])
    expected = sum(math.log1p(math.exp(-BETA * float(x))) for x in h) / b
    assert abs(float(loss) - expected) <= 2e-6 * max(1.0, expected), (float(loss), expected)


def test_train_two_steps_logs_prefopt_metrics(setup: dict[str, Any]) -> None:
    from prefopt.integrations.trl import PrefoptDPOTrainer

    trainer = setup["make"](
        PrefoptDPOTrainer,
        loss="simpo",
        loss_kwargs={"beta": 2.0, "gamma": 0.5},
        config={"max_steps": 2, "logging_steps": 1, "save_strategy": "no", "learning_rate": 1e-3},
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(math.isfinite(h["loss"]) for h in logs)
    assert any(k.startswith("prefopt/") for k in logs[0]) and "logps/chosen" in logs[0]
    moved = max(
        float((p.detach() - before[n]).abs().max())
        for n, p in trainer.model.named_parameters()
        if n in before
    )
    assert moved > 0


@pytest.mark.parametrize(
    ("kwargs", "exc", "needle"),
    [
        ({"loss": "grpo"}, ValueError, "grpo"),
        ({"loss": "kto"}, ValueError, "kto"),
        ({"loss": "no_such_loss"}, KeyError, "no_such_loss"),
        ({"loss": "dpo", "loss_kwargs": {"beta": -1.0}}, ValueError, "beta"),
        ({"loss": "dpo", "loss_kwargs": {"nope": 1}}, ValueError, "nope"),
        ({"loss": 3}, TypeError, "loss"),
        ({"loss": "dpo", "loss_kwargs": [1]}, TypeError, "loss_kwargs"),
    ],
)
def test_bad_loss_arguments_fail_before_trl_builds_anything(kwargs: dict, exc: type, needle: str) -> None:
    pytest.importorskip("trl")
    from prefopt.integrations.trl import PrefoptDPOTrainer

    with pytest.raises(exc, match=needle):
        PrefoptDPOTrainer(model=None, train_dataset=None, **kwargs)  # TRL would fail on these; we fail first


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        ({"loss_type": ["hinge"]}, "loss_type"),
        ({"f_divergence_type": "js_divergence"}, "f_divergence_type"),
    ],
)
def test_trl_loss_options_are_refused(setup: dict[str, Any], config: dict[str, Any], needle: str) -> None:
    from prefopt.integrations.trl import PrefoptDPOTrainer

    with pytest.raises(ValueError, match=needle):
        setup["make"](PrefoptDPOTrainer, loss="dpo", config=config)


@pytest.mark.parametrize(
    ("config", "name", "hparams"),
    [
        ({"ld_alpha": 0.5}, "dpo", {}),
        ({"use_weighting": True}, "dpo", {}),
        ({"use_weighting": True, "ld_alpha": 0.3}, "ipo", {}),
    ],
    ids=["ld_alpha", "use_weighting", "both-ipo"],
)
def test_ld_alpha_and_use_weighting_match_trl(
    setup: dict[str, Any], config: dict[str, Any], name: str, hparams: dict[str, Any]
) -> None:
    """TRL's LD-DPO (ld_alpha) and WPO (use_weighting) on top of a prefopt loss: the same loss and gradients as
    TRL's DPOTrainer with the same DPOConfig, on the same batch and the same non-zero adapter."""
    from trl import DPOTrainer

    from prefopt.integrations.trl import PrefoptDPOTrainer

    trl_type = {"dpo": "sigmoid", "ipo": "ipo"}[name]
    trl_trainer = setup["make"](DPOTrainer, config={**config, "loss_type": [trl_type]})
    ours = setup["make"](PrefoptDPOTrainer, loss=name, loss_kwargs={"beta": BETA, **hparams}, config=config)
    batch = setup["batch"]
    l_trl, g_trl = _loss_and_grads(trl_trainer, batch)
    l_ours, g_ours = _loss_and_grads(ours, batch)
    # LD sums are formed in another order than TRL's (Σ w_t·ℓ_t vs shared + α·tail): float32 rounding, ~1e-6
    torch.testing.assert_close(l_ours, l_trl, rtol=1e-5, atol=1e-6)
    assert g_ours.keys() == g_trl.keys() and len(g_trl) > 0
    scale = max(float(g.abs().max()) for g in g_trl.values())
    assert scale > 1e-4, "degenerate case: no gradient to compare"
    # The gradients inherit the loss's float32 summation-order difference: with transformers 5.24 the worst
    # element seen was 1.04e-6 at scale 0.60 (1.7e-6 x scale). 5e-6 x scale is 1e-4 of the largest gradient,
    # far below what a wrong weight or a wrong alpha produces (order 1e-2 here).
    for k in g_trl:
        torch.testing.assert_close(g_ours[k], g_trl[k], rtol=1e-5, atol=5e-6 * scale, msg=k)
    # and the options change the loss (the comparison is not vacuous)
    plain, _ = _loss_and_grads(setup["make"](PrefoptDPOTrainer, loss=name, loss_kwargs={"beta": BETA}), batch)
    assert abs(float(plain) - float(l_ours)) > 1e-6


def test_import_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "prefopt.integrations.trl", raising=False)
    monkeypatch.setitem(sys.modules, "trl", None)  # makes `import trl` raise ImportError
    with pytest.raises(ImportError, match=r"prefopt\[trl\]"):
        importlib.import_module("prefopt.integrations.trl")
