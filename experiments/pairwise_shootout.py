"""A shoot-out of the registry's pairwise losses in the lab: held-out gold win-rate against KL(π‖π_ref).

Every loss trains the same policy (a rank-8 ``LoraPolicy`` on the lab's reference LM) on the same
gold-labelled pairs (``prefopt.lab.gold_pairs``: two reference completions per prompt, labels sampled from the
Bradley–Terry model of the gold reward) in the same order, with the same optimiser and number of steps, at the
registry's default hyperparameters. Each policy is then measured with ``prefopt.lab.evaluate_policy`` on
held-out prompts: its win-rate against the reference under the gold reward (the mean mid-rank quantile of its
samples in a pool of reference samples: P(r(y) > r(y_ref)) + ½ P(tie)) and its KL(π‖π_ref), both with standard
errors, at several points of training.

    python experiments/pairwise_shootout.py --json runs/shootout.json     # the run in docs/lab_shootout.md
    python experiments/pairwise_shootout.py --seeds 1 --losses dpo,sft --steps 32 --json /tmp/s.json

``--lab tiny`` (the default) is the small lab of the test suite (8 tokens, completions of 6, a 47k-parameter
reference LM): on a shared 2-core machine it is what fits; ``--lab default`` runs the same on ``LabConfig()``.

Writes the results (every evaluation of every run, the settings, wall and CPU time) to ``--json`` and the
figure (win-rate against KL, mean over seeds with 95% intervals) next to it.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import peft
import torch

from prefopt.lab import Lab, LabConfig, LabPairs, evaluate_policy, gold_pairs, mean_ci95, reference_pool
from prefopt.logprobs import pair_logps
from prefopt.policy import LoraPolicy
from prefopt.registry import available_losses, get_loss, get_spec

LOSSES = ("dpo", "ipo", "hinge", "cdpo", "nca_pair", "apo_zero", "simpo", "orpo", "cpo", "sft")
# The smaller lab of the test suite's reduced run (pre-trains in seconds; same code path).
TINY_LAB = LabConfig.tiny()
# The lab of the full runs: the default language and gold reward (16 tokens, prompt 3, completion 12), with a
# smaller reference LM (hidden 128, 2 layers, about 0.4M parameters) so that 3 seeds fit in minutes of CPU.
SMALL_LAB = LabConfig(
    hidden_size=128, num_layers=2, num_heads=4, pretrain_steps=400, pretrain_batch=64, pretrain_lr=5e-3
)
LABS = {"tiny": TINY_LAB, "default": LabConfig()}


def run(
    name: str,
    seed: int,
    reference: torch.nn.Module,
    train: LabPairs,
    lab: Lab,
    pool: Any,
    args: argparse.Namespace,
) -> dict[str, Any]:
    spec = get_spec(name)
    loss_fn = get_loss(name)
    cfg = peft.LoraConfig(
        r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear", lora_dropout=0.0
    )
    torch.manual_seed(seed)
    policy = LoraPolicy(copy.deepcopy(reference), cfg)  # a fresh copy: LoraPolicy wraps in place
    opt = torch.optim.Adam(policy.trainable_parameters(), lr=args.lr)
    g = torch.Generator().manual_seed(20_000 + seed)  # the same pair order for every loss of a seed
    order = torch.cat(
        [
            torch.randperm(len(train), generator=g)
            for _ in range(math.ceil(args.steps * args.batch / len(train)))
        ]
    )
    evals: list[dict[str, Any]] = []
    losses: list[float] = []
    t0 = time.perf_counter()

    def evaluate(step: int) -> None:
        policy.eval()
        ev = evaluate_policy(lab, policy, pool, samples_per_prompt=args.eval_samples, seed=seed)
        evals.append({"step": step, **ev.__dict__})

    evaluate(0)
    for step in range(1, args.steps + 1):
        policy.train()
        b = train.batch(order[(step - 1) * args.batch : step * args.batch])
        logps = pair_logps(policy, b, reference=spec.needs_reference)
        loss = loss_fn(logps).loss.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.trainable_parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
        if step % args.eval_every == 0 or step == args.steps:
            evaluate(step)
    return {
        "loss": name,
        "seed": seed,
        "evals": evals,
        "first_loss": losses[0],
        "last_loss": sum(losses[-5:]) / len(losses[-5:]),
        "seconds": time.perf_counter() - t0,
    }


def summarise(runs: list[dict[str, Any]]) -> dict[str, list[dict[str, float]]]:
    """Per loss and evaluation step: mean win-rate and KL over seeds, with 95% t-intervals."""
    out: dict[str, list[dict[str, float]]] = {}
    for name in dict.fromkeys(r["loss"] for r in runs):
        rs = [r for r in runs if r["loss"] == name]
        rows = []
        for i, ev in enumerate(rs[0]["evals"]):
            w, w_ci = mean_ci95([r["evals"][i]["quantile"] for r in rs])
            k, k_ci = mean_ci95([r["evals"][i]["kl"] for r in rs])
            rows.append({"step": ev["step"], "win_rate": w, "win_rate_ci": w_ci, "kl": k, "kl_ci": k_ci})
        out[name] = rows
    return out


def plot(summary: dict[str, list[dict[str, float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    cmap = plt.get_cmap("tab20")
    for i, (name, rows) in enumerate(summary.items()):
        color = cmap(i % 20)
        ax.plot([r["kl"] for r in rows], [r["win_rate"] for r in rows], "-", color=color, alpha=0.4, lw=1)
        last = rows[-1]
        ax.errorbar(
            [last["kl"]],
            [last["win_rate"]],
            xerr=[last["kl_ci"]],
            yerr=[last["win_rate_ci"]],
            fmt="o",
            color=color,
            capsize=3,
            label=name,
        )
        ax.annotate(
            name, (last["kl"], last["win_rate"]), textcoords="offset points", xytext=(4, 4), fontsize=8
        )
    ax.axhline(0.5, color="k", lw=0.8, ls=":")
    ax.set_xscale("symlog", linthresh=0.1)
    ax.set_xlabel("KL(π ‖ π_ref)  [nats, Monte Carlo]")
    ax.set_ylabel("held-out gold win-rate vs the reference")
    ax.set_title("Pairwise losses, same pairs and budget (end point: mean over seeds, 95% intervals)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    ap.add_argument("--json", default="runs/pairwise_shootout.json", help="results file")
    ap.add_argument("--plot", default=None, help="figure path (default: next to --json, .png)")
    ap.add_argument(
        "--losses", default=",".join(LOSSES), help="comma list of registry losses with inputs=pairs"
    )
    ap.add_argument(
        "--seeds", type=int, default=3, help="seeds (training pairs, adapter initialisation, order)"
    )
    ap.add_argument("--train-pairs", type=int, default=2048, help="training pairs per seed")
    ap.add_argument("--steps", type=int, default=48, help="optimizer steps per run")
    ap.add_argument("--batch", type=int, default=32, help="pairs per step")
    ap.add_argument("--eval-every", type=int, default=16, help="steps between evaluations")
    ap.add_argument("--eval-prompts", type=int, default=16, help="held-out evaluation prompts (fixed)")
    ap.add_argument("--eval-samples", type=int, default=64, help="policy samples per evaluation prompt")
    ap.add_argument("--pool", type=int, default=1024, help="reference samples per evaluation prompt")
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank")
    ap.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    ap.add_argument("--label-temperature", type=float, default=0.1, help="Bradley–Terry τ of the labels")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument(
        "--lab",
        default="tiny",
        choices=sorted(LABS),
        help="tiny: TINY_LAB (the runs in docs); default: LabConfig()",
    )
    ap.add_argument("--tiny", action="store_true", help="the same as --lab tiny")
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.losses.split(",") if n.strip()]
    pairwise = {
        n for n in available_losses() if get_spec(n).inputs == "pairs" and not get_spec(n).required_data
    }
    bad = [n for n in names if n not in pairwise]
    if bad:
        ap.error(
            f"--losses: {bad} are not pairwise losses without extra data; choose from {sorted(pairwise)}"
        )
    torch.set_num_threads(args.threads)
    t_start, c_start = time.perf_counter(), time.process_time()
    if args.tiny:
        args.lab = "tiny"
    lab = Lab(LABS[args.lab])
    reference, rep = lab.reference(progress=True)
    print(
        f"reference LM: {rep.num_parameters:,} parameters, NLL {rep.nll_per_token:.4f} nats/token "
        f"(language entropy {rep.entropy_per_token:.4f}), {'cached' if rep.loaded else f'{rep.seconds:.0f} s'}",
        flush=True,
    )
    prompts = lab.sample_prompts(args.eval_prompts, seed=12345)
    pool = reference_pool(lab, reference, prompts, samples_per_prompt=args.pool, seed=0)
    runs = []
    for seed in range(args.seeds):
        train = gold_pairs(
            lab,
            reference,
            args.train_pairs,
            seed=seed,
            labels="bradley_terry",
            temperature=args.label_temperature,
        )
        agree = float(train.agrees_with_gold.double().mean())
        print(
            f"seed {seed}: {len(train)} training pairs, {100 * agree:.1f}% labels agree with gold", flush=True
        )
        for name in names:
            r = run(name, seed, reference, train, lab, pool, args)
            last = r["evals"][-1]
            print(
                f"  {name:<10} win-rate {last['quantile']:.3f} ± {last['quantile_se']:.3f}  "
                f"KL {last['kl']:.3f} ± {last['kl_se']:.3f}  loss {r['first_loss']:.3f}->{r['last_loss']:.3f}  "
                f"({r['seconds']:.0f} s)",
                flush=True,
            )
            runs.append(r)
    summary = summarise(runs)
    print("\nloss        win-rate (95%)      KL (95%)")
    for name, rows in sorted(summary.items(), key=lambda kv: -kv[1][-1]["win_rate"]):
        s = rows[-1]
        print(f"{name:<10} {s['win_rate']:.3f} ± {s['win_rate_ci']:.3f}   {s['kl']:.3f} ± {s['kl_ci']:.3f}")
    result = {
        "settings": vars(args),
        "reference": rep.__dict__,
        "runs": runs,
        "summary": summary,
        "wall_seconds": time.perf_counter() - t_start,
        "cpu_seconds": time.process_time() - c_start,
    }
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    fig = Path(args.plot) if args.plot else out.with_suffix(".png")
    try:
        plot(summary, fig)
    except ImportError:
        print("matplotlib missing: no figure")
    print(
        f"wrote {out} and {fig} (wall {result['wall_seconds']:.0f} s, CPU {result['cpu_seconds']:.0f} s)",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
