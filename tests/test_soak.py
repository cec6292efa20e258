"""Soak test (issue 11, "Under load"): many steps of a tiny-model DPO loop and a GRPO loop with bad rows mixed
into the data, NaN / ±inf injected at masked-out positions of every per-token input, and checkpoint saves
killed part-way (a forked child that dies at a random rename of its save). Bounded by steps, not by time.

At the end: no parameter is NaN, every loss and gradient was finite, every bad row is accounted for in the
load report and the collator's report, the last complete checkpoint loads, and a run resumed from a
mid-way checkpoint reproduces the uninterrupted run's losses exactly.
"""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path
from typing import Any

import peft
import pytest
import torch

from prefopt.checkpoint import (
    checkpoint_dir,
    latest_checkpoint,
    load_training_state,
    save_training_state,
)
from prefopt.data import PreferenceCollator, PromptCollator, load_builtin_pairs, load_preferences
from prefopt.logprobs import token_logps
from prefopt.losses.policy_gradient import grpo
from prefopt.masked import aggregate, seq_sum
from prefopt.policy import LoraPolicy
from prefopt.registry import get_loss
from prefopt.sampling import HFSampler
from prefopt.testing import char_tokenizer, tiny_causal_lm
from prefopt.types import PairLogps

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not hasattr(os, "fork"), reason="killed saves need os.fork"),
]

SAVE_EVERY = 5
KILL_AT = 3  # a killed save at steps ≡ 3 (mod 5)


def _tokenizer() -> Any:
    """The char tokenizer, with ``~`` deleted by its normalizer: a completion ``"~~"`` passes the loader
    (it is not whitespace) but tokenizes to zero tokens, a bad row only the collator can see."""
    from tokenizers import normalizers

    tok = char_tokenizer()
    tok.backend_tokenizer.normalizer = normalizers.Replace("~", "")
    return tok


def _model(tok: Any, **overrides: Any) -> Any:
    return tiny_causal_lm("llama", vocab_size=len(tok), hidden_size=32, num_layers=2, seed=0, **overrides)


GRPO_MODEL = {"initializer_range": 0.3}  # a peakier random model: samples differ in reward


def _poison(x: torch.Tensor, mask: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """``x`` with NaN, +inf or −inf at a random half of the masked-out positions (kept positions unchanged)."""
    bad = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=x.dtype)
    pick = bad[torch.randint(0, 3, mask.shape, generator=gen)]
    where = ~mask & (torch.rand(mask.shape, generator=gen) < 0.5)
    return torch.where(where, pick, x)


KILLED: list[int] = []  # steps whose save was really killed (the child exited at its chosen rename)


def _kill_a_save(run_dir: Path, policy: LoraPolicy, opt: torch.optim.Optimizer, step: int, at: int) -> None:
    """A forked child saves the checkpoint of ``step`` and dies (``os._exit``) at its ``at``-th rename."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        calls = 0
        real = os.replace

        def dying_replace(src: Any, dst: Any) -> None:
            nonlocal calls
            calls += 1
            if calls == at:
                os._exit(7)
            real(src, dst)

        os.replace = dying_replace  # type: ignore[assignment]
        try:
            save_training_state(run_dir, policy=policy, optimizer=opt, step=step)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) in (0, 7)
    if os.WEXITSTATUS(status) == 7:
        KILLED.append(step)


def _check_last_checkpoint(run_dir: Path, tok: Any, allowed: set[int], **model_kw: Any) -> None:
    """The newest complete checkpoint loads and is one of the ``allowed`` steps (0: none yet). Run under
    ``fork_rng``: building a model and a policy draws from the global torch RNG, which the loop needs."""
    with torch.random.fork_rng():
        _check_last_checkpoint_unseeded(run_dir, tok, allowed, **model_kw)


def _check_last_checkpoint_unseeded(run_dir: Path, tok: Any, allowed: set[int], **model_kw: Any) -> None:
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:  # killed before the first commit: nothing yet is a valid state
        assert 0 in allowed
        return
    state = load_training_state(ckpt, _model(tok, **model_kw))
    assert state.step in allowed, (state.step, allowed)
    assert all(torch.isfinite(v).all() for v in state.policy._saved_state().values())


# ----------------------------------------------------------------------------------------------------- DPO
def _write_dirty_data(path: Path) -> dict[str, list[int]]:
    """Built-in pairs with bad rows mixed in at random places; returns reason → 0-based line indices."""
    rng = random.Random(0)
    good = [dict(r) for r in load_builtin_pairs()]
    bad_kinds = [
        ("not_an_object", None),
        ("not_an_object", [1, 2]),
        ("not_an_object", "just text"),
        ("identical", {"prompt": "Q: x?\nA:", "chosen": " same", "rejected": " same"}),
        ("empty_completion", {"prompt": "Q: y?\nA:", "chosen": "   ", "rejected": " no"}),
        ("missing_field", {"prompt": "Q: z?\nA:", "chosen": " yes"}),
    ]
    rows: list[tuple[str | None, Any]] = [(None, r) for r in good]
    for kind in bad_kinds * 2:
        rows.insert(rng.randrange(1, len(rows) + 1), kind)
    expected: dict[str, list[int]] = {}
    with open(path, "w") as f:
        for i, (reason, row) in enumerate(rows):
            f.write(json.dumps(row) + "\n")
            if reason is not None:
                expected.setdefault(reason, []).append(i)
    return expected


def _dpo_run(
    rows: list[dict[str, Any]], run_dir: Path, steps: int, *, resume: Path | None = None, kill: bool = False
) -> tuple[list[float], LoraPolicy, PreferenceCollator, int]:
    torch.manual_seed(0)
    tok = _tokenizer()
    model = _model(tok)
    if resume is not None:
        state = load_training_state(resume, model)
        policy = state.policy
    else:
        policy = LoraPolicy(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    opt = torch.optim.AdamW(policy.trainable_parameters(), lr=2e-2)
    collate = PreferenceCollator(tok, max_length=96, add_eos=False)
    loss_fn = get_loss("dpo", beta=0.5)
    data_rng, gen = random.Random(1), torch.Generator().manual_seed(2)
    start = 0
    if resume is not None:
        opt.load_state_dict(state.optimizer)
        data_rng.setstate(state.extra["data_rng"])
        gen.set_state(state.extra["poison_rng"])
        start = state.step
        state.restore_rng()
    losses: list[float] = []
    collator_bad = 0
    for step in range(start + 1, steps + 1):
        picked = [rows[data_rng.randrange(len(rows))] for _ in range(4)]
        collator_bad += sum(r["chosen"] == "~~" or r["rejected"] == "~~" for r in picked)
        batch = collate(picked)
        cm = batch.completion_mask
        policy.train()
        lp = token_logps(policy.model, batch.input_ids, batch.attention_mask, cm)
        with policy.reference():
            ref = token_logps(policy.model, batch.input_ids, batch.attention_mask, cm)
        assert isinstance(lp, torch.Tensor) and isinstance(ref, torch.Tensor)
        s, s_ref = seq_sum(_poison(lp, cm, gen), cm), seq_sum(_poison(ref, cm, gen), cm)
        b = s.shape[0] // 2
        out = loss_fn(PairLogps(s[:b], s[b:], s_ref[:b], s_ref[b:]))
        loss = out.loss.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grads = [p.grad for p in policy.trainable_parameters() if p.grad is not None]
        assert grads and all(bool(torch.isfinite(g).all()) for g in grads), f"step {step}"
        opt.step()
        losses.append(float(loss.detach()))
        extra = {"data_rng": data_rng.getstate(), "poison_rng": gen.get_state()}
        if kill and step % SAVE_EVERY == KILL_AT:
            _kill_a_save(run_dir, policy, opt, step, at=1 + step % 7)
            _check_last_checkpoint(run_dir, tok, {step - KILL_AT, step})
        if step % SAVE_EVERY == 0:
            save_training_state(run_dir, policy=policy, optimizer=opt, step=step, extra=extra)
    return losses, policy, collate, collator_bad


def test_dpo_soak(tmp_path: Path) -> None:
    path = tmp_path / "dirty.jsonl"
    expected = _write_dirty_data(path)
    ds, report = load_preferences(path, format="explicit", return_report=True)
    n_bad = sum(len(v) for v in expected.values())
    assert report.n_rows == len(ds) + n_bad and report.n_kept == len(ds)
    assert dict(report.skipped) == {k: len(v) for k, v in expected.items()}
    for reason, indices in expected.items():
        assert list(report.first_indices[reason]) == indices[:5]
    rows = [dict(r) for r in ds]
    rows += [{**rows[i], "chosen": "~~"} for i in range(0, len(rows), 8)]  # bad only for the collator

    steps = 30
    run = tmp_path / "run"
    KILLED.clear()
    losses, policy, collate, collator_bad = _dpo_run(rows, run, steps, kill=True)
    assert len(KILLED) >= 4, KILLED  # renames 1..5 of a save: inside LoraPolicy.save and the final commit
    assert all(torch.isfinite(p).all() for p in policy.parameters())
    assert len(losses) == steps and all(map(lambda x: x == x and abs(x) < float("inf"), losses))
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)  # step 1: the adapter starts at ΔW = 0
    assert len(set(losses)) == steps  # and it moved: every later batch loss differs
    assert collator_bad > 0 and collate.report().skipped["empty_completion"] == collator_bad
    assert collate.report().n_rows == 4 * steps
    _check_last_checkpoint(run, _tokenizer(), {steps})
    resumed, *_ = _dpo_run(rows, tmp_path / "resumed", steps, resume=checkpoint_dir(run, 15))
    assert resumed == losses[15:]


# ---------------------------------------------------------------------------------------------------- GRPO
def _grpo_run(
    run_dir: Path, steps: int, *, resume: Path | None = None, kill: bool = False
) -> tuple[list[float], LoraPolicy]:
    torch.manual_seed(0)
    tok = _tokenizer()
    model = _model(tok, **GRPO_MODEL)
    if resume is not None:
        state = load_training_state(resume, model)
        policy = state.policy
    else:
        cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)
        policy = LoraPolicy(model, cfg)
    opt = torch.optim.AdamW(policy.trainable_parameters(), lr=2e-2)
    sampler = HFSampler(policy, tok, max_new_tokens=6, temperature=1.0)
    collate = PromptCollator(tok, add_special_tokens=False)
    prompts = [r["prompt"] for r in load_builtin_pairs()]
    data_rng, gen = random.Random(1), torch.Generator().manual_seed(2)
    start = 0
    if resume is not None:
        opt.load_state_dict(state.optimizer)
        data_rng.setstate(state.extra["data_rng"])
        gen.set_state(state.extra["poison_rng"])
        start = state.step
        state.restore_rng()
    losses: list[float] = []
    for step in range(start + 1, steps + 1):
        roll = sampler.generate(collate(data_rng.sample(prompts, 2)), n=3)
        assert roll.logp is not None and roll.ref_logp is not None
        texts = roll.completions(tok)
        rewards = torch.tensor([sum(c.isdigit() or c in "aeiou" for c in t) / 6 for t in texts])
        grouped = rewards.view(2, 3)
        adv = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).reshape(-1)
        m = roll.completion_mask
        policy.train()
        logp = token_logps(policy.model, roll.input_ids, roll.attention_mask, m)
        assert isinstance(logp, torch.Tensor)
        adv_t = adv[:, None].expand_as(logp)
        out = grpo(
            _poison(logp, m, gen),
            _poison(roll.logp, m, gen),
            _poison(adv_t, m, gen),
            m,
            ref_logp=_poison(roll.ref_logp, m, gen),
            beta=0.04,
        )
        loss = aggregate(out.loss, m, "seq-mean-token-mean")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grads = [p.grad for p in policy.trainable_parameters() if p.grad is not None]
        assert grads and all(bool(torch.isfinite(g).all()) for g in grads), f"step {step}"
        assert bool(torch.isfinite(loss))
        opt.step()
        policy.eval()
        losses.append(float(loss.detach()))
        extra = {"data_rng": data_rng.getstate(), "poison_rng": gen.get_state()}
        if kill and step % SAVE_EVERY == KILL_AT:
            _kill_a_save(run_dir, policy, opt, step, at=1 + step % 7)
            _check_last_checkpoint(run_dir, tok, {step - KILL_AT, step}, **GRPO_MODEL)
        if step % SAVE_EVERY == 0:
            save_training_state(run_dir, policy=policy, optimizer=opt, step=step, extra=extra)
    return losses, policy


def test_grpo_soak(tmp_path: Path) -> None:
    steps = 20
    run = tmp_path / "run"
    KILLED.clear()
    losses, policy = _grpo_run(run, steps, kill=True)
    assert len(KILLED) >= 3, KILLED
    assert all(torch.isfinite(p).all() for p in policy.parameters())
    assert len(losses) == steps and len(set(losses)) > 1
    delta = sum(float(v.abs().sum()) for k, v in policy._saved_state().items() if "lora_B" in k)
    assert delta > 0  # the adapter moved
    _check_last_checkpoint(run, _tokenizer(), {steps}, **GRPO_MODEL)
    resumed, _ = _grpo_run(tmp_path / "resumed", steps, resume=checkpoint_dir(run, 10))
    assert resumed == losses[10:]
