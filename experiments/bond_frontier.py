"""BOND in the lab: reward quantile against KL(π‖π_ref) for J-BOND, BOND (N = 4, 8) and RLOO, with the
exact Best-of-N frontier (N = 1 … 16).

The question (Sessa et al. 2024, "BOND"): does J-BOND reach Best-of-N's quantile at Best-of-N's KL
(log N − (N−1)/N), and does its curve lie on or above a KL-regularised policy gradient's? Everything runs on
the lab's ~1.5M-parameter reference LM (``prefopt.lab``): the policy is a ``LoraPolicy`` on it (reference =
adapters off, anchor = the EMA adapter), samples come from ``HFSampler``, the losses from the registry.

    python experiments/bond_frontier.py --out runs/bond_frontier            # full: 3 seeds
    python experiments/bond_frontier.py --seeds 1 --steps 40 --methods jbond,bond4   # reduced

Writes ``results.json`` (every evaluation of every run, the Best-of-N points, the settings, wall times) and
``frontier.png`` (quantile against KL, mean over seeds with 95% intervals) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import peft
import torch

from prefopt.lab import (
    Lab,
    LabConfig,
    best_of_n_point,
    evaluate_policy,
    lab_sampler,
    mean_ci95,
    reference_pool,
)
from prefopt.logprobs import token_logps
from prefopt.losses.bond import bond, jbond
from prefopt.masked import aggregate, seq_sum
from prefopt.policy import LoraPolicy
from prefopt.registry import get_loss
from prefopt.rl import rloo_advantages
from prefopt.types import BestOfNSamples

METHODS = ("jbond", "bond4", "bond8", "rloo")
RLOO = get_loss("rloo")
# A smaller lab for the reduced run of the test suite (pre-trains in seconds; same code path).
TINY_LAB = LabConfig.tiny()


def completion_mask(ids: torch.Tensor, lab: Lab) -> torch.Tensor:
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[:, 1 + lab.config.prompt_len :] = True
    return mask


def seq_logp(policy: LoraPolicy, ids: torch.Tensor, lab: Lab) -> torch.Tensor:
    """``Σ_t log π(y_t | ·)`` of full lab rows (fixed length, no padding) under the current adapter mode."""
    mask = completion_mask(ids, lab)
    lp = token_logps(policy.model, ids, torch.ones_like(ids), mask)
    return seq_sum(lp, mask)


def sample(policy: LoraPolicy, lab: Lab, prompts: torch.Tensor, n: int, mode: str) -> torch.Tensor:
    """``n`` completions per prompt from the policy, its reference or its anchor → full rows ``(P·n, T)``."""
    sampler = lab_sampler(lab, policy, reference=None)
    batch = {"input_ids": prompts, "attention_mask": torch.ones_like(prompts)}
    with torch.no_grad():
        if mode == "policy":
            roll = sampler.generate(batch, n=n)
        elif mode == "reference":
            with policy.reference():
                roll = sampler.generate(batch, n=n)
        else:
            with policy.anchor():
                roll = sampler.generate(batch, n=n)
    return roll.input_ids


def reward_of(lab: Lab, rows: torch.Tensor) -> torch.Tensor:
    return lab.gold_reward(rows[:, 1 + lab.config.prompt_len :])


def bond_step(
    policy: LoraPolicy, lab: Lab, prompts: torch.Tensor, args: argparse.Namespace, n: int
) -> torch.Tensor:
    """BOND with the Jeffreys divergence: the quantile pool and the Best-of-N sample come from ``n`` reference samples."""
    b = prompts.shape[0]
    own = sample(policy, lab, prompts, 1, "policy")
    pool = sample(policy, lab, prompts, n, "reference")
    r_pool = reward_of(lab, pool).view(b, n)
    best = pool[n * torch.arange(b) + r_pool.argmax(1)]
    with torch.no_grad(), policy.reference():
        ref_logp = seq_logp(policy, own, lab)
    both = seq_logp(policy, torch.cat([own, best]), lab)
    samples = BestOfNSamples(both[:b], ref_logp, reward_of(lab, own), r_pool, both[b:])
    return bond(samples, n=n, backward_weight=args.jeffreys_beta).loss.mean()


def jbond_step(policy: LoraPolicy, lab: Lab, prompts: torch.Tensor, args: argparse.Namespace) -> torch.Tensor:
    """J-BOND: Best-of-2 of the EMA anchor, the J-BOND reward, and the Jeffreys divergence."""
    b = prompts.shape[0]
    own = sample(policy, lab, prompts, 1, "policy")
    anc = sample(policy, lab, prompts, 2, "anchor")
    r_anc = reward_of(lab, anc).view(b, 2)
    best = anc[2 * torch.arange(b) + r_anc.argmax(1)]
    with torch.no_grad(), policy.anchor():
        anchor_logp = seq_logp(policy, own, lab)
    both = seq_logp(policy, torch.cat([own, best]), lab)
    samples = BestOfNSamples(both[:b], anchor_logp, reward_of(lab, own), r_anc, both[b:])
    return jbond(samples, backward_weight=args.jeffreys_beta).loss.mean()


def rloo_step(
    policy: LoraPolicy, lab: Lab, prompts: torch.Tensor, args: argparse.Namespace, kl_coef: float
) -> torch.Tensor:
    """RLOO on the KL-regularised reward ``r − kl_coef·Σ_t(log π − log π_ref)``, ``k`` samples per prompt.

    On-policy (one gradient step per batch): the registry's ``rloo`` with ``old_logp=None`` and the
    leave-one-out advantages of ``rl.rloo_advantages`` (Ahmadian et al. 2024, Eq. 9), reduced with
    ``aggregate(..., "seq-mean-token-sum")`` (the mean over sequences of ``−A_i·S_θ(y_i)``).
    """
    k = args.rloo_k
    rows = sample(policy, lab, prompts, k, "policy")
    mask = completion_mask(rows, lab)
    logp = token_logps(policy.model, rows, torch.ones_like(rows), mask)
    with torch.no_grad(), policy.reference():
        ref_logp = token_logps(policy.model, rows, torch.ones_like(rows), mask)
    kl = seq_sum(logp.detach() - ref_logp, mask)
    shaped = reward_of(lab, rows).to(logp.dtype) - kl_coef * kl
    adv = rloo_advantages(shaped.view(-1, k)).reshape(-1)
    return aggregate(RLOO(logp, None, adv, mask).loss, mask, "seq-mean-token-sum")


def run(
    method: str, kl_coef: float | None, seed: int, lab: Lab, pool: Any, args: argparse.Namespace
) -> dict[str, Any]:
    model, _ = lab.reference()
    cfg = peft.LoraConfig(
        r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear", lora_dropout=0.0
    )
    torch.manual_seed(seed)
    policy = LoraPolicy(model, cfg)
    opt = torch.optim.Adam(policy.trainable_parameters(), lr=args.lr)
    g = torch.Generator().manual_seed(1000 + seed)
    evals = []
    t0 = time.perf_counter()

    def evaluate(step: int) -> None:
        ev = evaluate_policy(lab, policy, pool, samples_per_prompt=args.eval_samples, seed=seed)
        evals.append({"step": step, **ev.__dict__})

    evaluate(0)
    for step in range(1, args.steps + 1):
        prompts = lab.sample_prompts(args.batch, generator=g)
        policy.train()
        if method == "jbond":
            loss = jbond_step(policy, lab, prompts, args)
        elif method.startswith("bond"):
            loss = bond_step(policy, lab, prompts, args, int(method[4:]))
        else:
            assert kl_coef is not None
            loss = rloo_step(policy, lab, prompts, args, kl_coef)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.trainable_parameters(), 1.0)
        opt.step()
        if method == "jbond":
            policy.update_anchor_(1.0 - args.eta)
        policy.eval()
        if step % args.eval_every == 0 or step == args.steps:
            evaluate(step)
    label = method if kl_coef is None else f"{method} β={kl_coef:g}"
    return {
        "method": method,
        "label": label,
        "kl_coef": kl_coef,
        "seed": seed,
        "evals": evals,
        "seconds": time.perf_counter() - t0,
    }


def summarise(runs: list[dict[str, Any]]) -> dict[str, list[dict[str, float]]]:
    """Per label and evaluation step: mean quantile and KL over seeds, with 95% t-intervals."""
    out: dict[str, list[dict[str, float]]] = {}
    for label in dict.fromkeys(r["label"] for r in runs):
        rs = [r for r in runs if r["label"] == label]
        rows = []
        for i, ev in enumerate(rs[0]["evals"]):
            q = torch.tensor([r["evals"][i]["quantile"] for r in rs], dtype=torch.float64)
            kl = torch.tensor([r["evals"][i]["kl"] for r in rs], dtype=torch.float64)
            rows.append(
                {
                    "step": ev["step"],
                    "quantile": float(q.mean()),
                    "quantile_ci": mean_ci95(q)[1],
                    "kl": float(kl.mean()),
                    "kl_ci": mean_ci95(kl)[1],
                }
            )
        out[label] = rows
    return out


def plot(summary: dict[str, list[dict[str, float]]], bon: list[dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    ax.plot(
        [p["kl"] for p in bon],
        [p["quantile"] for p in bon],
        "k--",
        marker="*",
        ms=9,
        label="Best-of-N (exact)",
    )
    for p in bon:
        ax.annotate(
            f"N={p['n']}", (p["kl"], p["quantile"]), textcoords="offset points", xytext=(4, -10), fontsize=8
        )
    for label, rows in summary.items():
        ax.errorbar(
            [r["kl"] for r in rows],
            [r["quantile"] for r in rows],
            xerr=[r["kl_ci"] for r in rows],
            yerr=[r["quantile_ci"] for r in rows],
            marker="o",
            ms=3,
            capsize=2,
            label=label,
        )
    ax.set_xlabel("KL(π ‖ π_ref)  [nats, Monte Carlo]")
    ax.set_ylabel("reward quantile under π_ref (mid-rank)")
    ax.set_title("Lab: reward quantile against KL (mean over seeds, 95% intervals)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    ap.add_argument("--out", default="runs/bond_frontier", help="output folder")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    ap.add_argument("--kl-coefs", default="0.03,0.1,0.3", help="RLOO KL coefficients")
    ap.add_argument("--seeds", type=int, default=3, help="seeds per method")
    ap.add_argument("--steps", type=int, default=150, help="optimizer steps per run")
    ap.add_argument("--batch", type=int, default=64, help="prompts per step")
    ap.add_argument("--eval-every", type=int, default=25, help="steps between evaluations")
    ap.add_argument("--eval-prompts", type=int, default=16, help="evaluation prompts (fixed)")
    ap.add_argument("--eval-samples", type=int, default=32, help="policy samples per evaluation prompt")
    ap.add_argument("--pool", type=int, default=1024, help="reference samples per evaluation prompt")
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank")
    ap.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
    ap.add_argument("--eta", type=float, default=0.1, help="J-BOND anchor EMA rate (decay 1 − eta)")
    ap.add_argument("--jeffreys-beta", type=float, default=0.5, help="Jeffreys weight of BOND / J-BOND")
    ap.add_argument("--rloo-k", type=int, default=4, help="RLOO samples per prompt")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--tiny", action="store_true", help="a smaller lab (the test suite's reduced run)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        ap.error(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    t_start = time.perf_counter()
    lab = Lab(TINY_LAB if args.tiny else LabConfig())
    model, rep = lab.reference(progress=True)
    print(
        f"reference LM: {rep.num_parameters:,} parameters, NLL {rep.nll_per_token:.4f} nats/token "
        f"(language entropy {rep.entropy_per_token:.4f}), {'cached' if rep.loaded else f'{rep.seconds:.0f} s'}"
    )
    prompts = lab.sample_prompts(args.eval_prompts, seed=12345)
    pool = reference_pool(lab, model, prompts, samples_per_prompt=args.pool, seed=0)
    bon = [best_of_n_point(pool, n).__dict__ for n in (1, 2, 4, 8, 16)]
    runs = []
    for method in methods:
        coefs: list[float | None] = (
            [float(c) for c in args.kl_coefs.split(",")] if method == "rloo" else [None]
        )
        for coef in coefs:
            for seed in range(args.seeds):
                r = run(method, coef, seed, lab, pool, args)
                last = r["evals"][-1]
                print(
                    f"{r['label']:<14} seed {seed}: quantile {last['quantile']:.3f} ± {last['quantile_se']:.3f}, "
                    f"KL {last['kl']:.3f} ± {last['kl_se']:.3f}  ({r['seconds']:.0f} s)",
                    flush=True,
                )
                runs.append(r)
    summary = summarise(runs)
    result = {
        "settings": vars(args),
        "reference": rep.__dict__,
        "best_of_n": bon,
        "runs": runs,
        "summary": summary,
        "wall_seconds": time.perf_counter() - t_start,
    }
    (out / "results.json").write_text(json.dumps(result, indent=1))
    plot(summary, bon, out / "frontier.png")
    print(f"wrote {out / 'results.json'} and {out / 'frontier.png'} ({result['wall_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
