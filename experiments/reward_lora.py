"""PE-RLHF in the lab: LoRA reward models (ranks 1, 4, 16, 64) against full fine-tuning, accuracy against gold.

The question (Sidahmed et al. 2024, "PE-RLHF", arXiv 2403.10704): does a LoRA reward model reach the held-out
accuracy of a fully fine-tuned one, at a fraction of the trainable parameters and memory? In the lab
(``prefopt.lab``) the answer can be measured against the gold preference exactly: reward models are
``prefopt.reward_model.RewardModel`` (``.lora`` or ``.full``) on the lab's reference LM, trained with the
registry's Bradley–Terry loss on pairs from ``prefopt.lab.gold_pairs`` (two reference completions per prompt,
labels sampled from the Bradley–Terry model of the gold reward, so some training labels are wrong, as with
real annotators), and scored on held-out pairs labelled by the gold order.

    python experiments/reward_lora.py --json runs/reward_lora.json        # the run in docs/lab_reward_lora.md
    python experiments/reward_lora.py --seeds 1 --variants full,lora4 --train-pairs 1024 --json /tmp/rl.json

``--lab tiny`` (the default) is the small lab of the test suite (8 tokens, completions of 6, a 47k-parameter
reference LM): on a shared 2-core machine it is what fits; ``--lab default`` runs the same on ``LabConfig()``.

Per seed, every variant sees the same training pairs (drawn with that seed) in the same order and is scored
on the same held-out pairs (one fixed set for all seeds). Reported: held-out accuracy per variant, the
difference LoRA − full per seed (a paired difference) with its 95% t-interval over seeds, trainable
parameters, and the training memory (weights + gradients + Adam state + the activations saved for backward in
one step, counted in bytes; see ``train_memory``).
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

from prefopt.lab import Lab, LabConfig, LabPairs, gold_pairs, mean_ci95
from prefopt.registry import get_loss
from prefopt.reward_model import RewardModel

BT = get_loss("bradley_terry")
# The smaller lab of the test suite's reduced run (pre-trains in seconds; same code path).
TINY_LAB = LabConfig.tiny()
# The lab of the full runs: the default language and gold reward (16 tokens, prompt 3, completion 12), with a
# smaller reference LM (hidden 128, 2 layers, about 0.4M parameters) so that 3 seeds fit in minutes of CPU.
SMALL_LAB = LabConfig(
    hidden_size=128, num_layers=2, num_heads=4, pretrain_steps=400, pretrain_batch=64, pretrain_lr=5e-3
)
LABS = {"tiny": TINY_LAB, "default": LabConfig()}


def build(variant: str, reference: torch.nn.Module, seed: int) -> RewardModel:
    """A reward model on a fresh copy of the reference LM: ``full`` or ``lora<r>`` (alpha = 2r, all linear)."""
    torch.manual_seed(seed)
    model = copy.deepcopy(reference)
    if variant == "full":
        return RewardModel.full(model)
    r = int(variant[4:])
    cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", lora_dropout=0.0)
    return RewardModel.lora(model, cfg)


def scores(rm: RewardModel, pairs: LabPairs, batch: int = 1024) -> torch.Tensor:
    """``r(chosen) − r(rejected)`` for every pair, no gradient."""
    out = []
    with torch.no_grad():
        for s in range(0, len(pairs), batch):
            b = pairs.batch(slice(s, s + batch))
            r = rm(b.input_ids, b.attention_mask)
            out.append(r[: b.num_pairs] - r[b.num_pairs :])
    return torch.cat(out)


def train_memory(rm: RewardModel, batch: Any) -> dict[str, int]:
    """Bytes held during one training step: all weights, gradients and Adam's two moments of the trainable
    weights, and the tensors autograd saves for backward in that step (counted once per storage)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    params = [p for p in rm.parameters()]
    weights = sum(p.numel() * p.element_size() for p in params)
    trainable = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        r = rm(batch.input_ids, batch.attention_mask)
    b = batch.num_pairs
    BT(r[:b], r[b:]).loss.mean().backward()
    rm.zero_grad(set_to_none=True)
    # saved parameters are weights, already counted
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    activations = sum(v for k, v in seen.items() if k not in param_ptrs)
    return {
        "weights": weights,
        "gradients": trainable,
        "adam_state": 2 * trainable,
        "activations": activations,
        "total": weights + 3 * trainable + activations,
    }


def run_variant(
    variant: str,
    seed: int,
    reference: torch.nn.Module,
    train: LabPairs,
    held_out: LabPairs,
    args: argparse.Namespace,
) -> dict[str, Any]:
    rm = build(variant, reference, seed)
    rm.train()
    lr = args.lr_full if variant == "full" else args.lr_lora
    params = rm.trainable_parameters()
    memory = train_memory(rm, train.batch(slice(0, args.batch)))
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    steps_per_epoch = len(train) // args.batch
    total = steps_per_epoch * args.epochs
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / max(1, total))
    g = torch.Generator().manual_seed(10_000 + seed)  # the same pair order for every variant of a seed
    t0 = time.perf_counter()
    losses = []
    for _ in range(args.epochs):
        order = torch.randperm(len(train), generator=g)
        for k in range(steps_per_epoch):
            b = train.batch(order[k * args.batch : (k + 1) * args.batch])
            r = rm(b.input_ids, b.attention_mask)
            loss = BT(r[: b.num_pairs], r[b.num_pairs :]).loss.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
    seconds = time.perf_counter() - t0
    rm.eval()
    diff = scores(rm, held_out)
    correct = (diff > 0).double() + 0.5 * (diff == 0).double()  # a predicted tie counts half
    return {
        "variant": variant,
        "seed": seed,
        "accuracy": float(correct.mean()),
        "correct": correct.tolist(),
        "train_accuracy_vs_labels": float((scores(rm, train) > 0).double().mean()),
        "trainable_params": sum(p.numel() for p in params),
        "memory_bytes": memory,
        "first_loss": losses[0],
        "last_loss": sum(losses[-10:]) / len(losses[-10:]),
        "steps": len(losses),
        "seconds": seconds,
    }


def summarise(runs: list[dict[str, Any]], variants: list[str]) -> list[dict[str, Any]]:
    """Per variant: mean accuracy and the paired difference LoRA − full (points), both with 95% t-intervals
    over seeds; and a per-pair interval of the difference pooled over seeds (held-out sampling only)."""
    rows = []
    full = {r["seed"]: r for r in runs if r["variant"] == "full"}
    for v in variants:
        rs = sorted((r for r in runs if r["variant"] == v), key=lambda r: r["seed"])
        acc, acc_ci = mean_ci95([100 * r["accuracy"] for r in rs])
        row: dict[str, Any] = {
            "variant": v,
            "seeds": len(rs),
            "accuracy": acc,
            "accuracy_ci": acc_ci,
            "trainable_params": rs[0]["trainable_params"],
            "memory_total": rs[0]["memory_bytes"]["total"],
            "seconds": sum(r["seconds"] for r in rs) / len(rs),
        }
        if v != "full" and full:
            d = [100 * (r["accuracy"] - full[r["seed"]]["accuracy"]) for r in rs]
            row["delta"], row["delta_ci"] = mean_ci95(d)
            per_pair = torch.cat(
                [
                    torch.tensor(r["correct"], dtype=torch.float64)
                    - torch.tensor(full[r["seed"]]["correct"], dtype=torch.float64)
                    for r in rs
                ]
            )
            row["delta_pairs_ci"] = float(196 * per_pair.std() / math.sqrt(per_pair.numel()))
            row["param_ratio"] = rs[0]["trainable_params"] / full[rs[0]["seed"]]["trainable_params"]
            row["memory_ratio"] = (
                rs[0]["memory_bytes"]["total"] / full[rs[0]["seed"]]["memory_bytes"]["total"]
            )
        rows.append(row)
    return rows


def plot(summary: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    names = [r["variant"] for r in summary]
    a1.errorbar(
        range(len(names)),
        [r["accuracy"] for r in summary],
        yerr=[r["accuracy_ci"] for r in summary],
        fmt="o",
        capsize=4,
    )
    a1.set_xticks(range(len(names)), names)
    a1.set_ylabel("held-out accuracy vs gold [%]")
    a1.set_title("accuracy (mean over seeds, 95% interval)")
    a1.grid(alpha=0.3)
    lora = [r for r in summary if "delta" in r]
    a2.errorbar(
        [r["param_ratio"] for r in lora],
        [r["delta"] for r in lora],
        yerr=[r["delta_ci"] for r in lora],
        fmt="o-",
        capsize=4,
    )
    for r in lora:
        a2.annotate(r["variant"], (r["param_ratio"], r["delta"]), textcoords="offset points", xytext=(5, 5))
    a2.axhline(0, color="k", lw=0.8)
    a2.set_xscale("log")
    a2.set_xlabel("trainable parameters, LoRA / full")
    a2.set_ylabel("accuracy LoRA − full [points]")
    a2.set_title("paired difference vs full (95% interval)")
    a2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    ap.add_argument("--json", default="runs/reward_lora.json", help="results file")
    ap.add_argument("--plot", default=None, help="figure path (default: next to --json, .png)")
    ap.add_argument("--variants", default="full,lora1,lora4,lora16,lora64", help="full and lora<rank>")
    ap.add_argument("--seeds", type=int, default=3, help="seeds (training pairs, initialisation, order)")
    ap.add_argument("--train-pairs", type=int, default=3072, help="training pairs per seed")
    ap.add_argument("--held-out", type=int, default=2048, help="held-out pairs (one fixed set)")
    ap.add_argument("--epochs", type=int, default=3, help="passes over the training pairs")
    ap.add_argument("--batch", type=int, default=64, help="pairs per step")
    ap.add_argument("--lr-full", type=float, default=3e-3, help="AdamW learning rate, full fine-tuning")
    ap.add_argument("--lr-lora", type=float, default=5e-3, help="AdamW learning rate, LoRA")
    ap.add_argument("--label-temperature", type=float, default=0.1, help="Bradley–Terry τ of training labels")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument(
        "--lab",
        default="tiny",
        choices=sorted(LABS),
        help="tiny: TINY_LAB (the runs in docs); default: LabConfig()",
    )
    ap.add_argument("--tiny", action="store_true", help="the same as --lab tiny")
    args = ap.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in variants:
        if v != "full" and not (v.startswith("lora") and v[4:].isdigit() and int(v[4:]) > 0):
            ap.error(f"--variants: {v!r} is neither 'full' nor 'lora<rank>'")
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
    held_out = gold_pairs(lab, reference, args.held_out, seed=999_999, labels="gold")
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
        for v in variants:
            r = run_variant(v, seed, reference, train, held_out, args)
            r["train_label_agreement"] = agree
            print(
                f"  {v:<7} accuracy {100 * r['accuracy']:.2f}%  trainable {r['trainable_params']:,}  "
                f"loss {r['first_loss']:.3f}->{r['last_loss']:.3f}  ({r['seconds']:.0f} s)",
                flush=True,
            )
            runs.append(r)
    summary = summarise(runs, variants)
    for row in summary:
        extra = (
            f"  Δ {row['delta']:+.2f} ± {row['delta_ci']:.2f} (pairs ± {row['delta_pairs_ci']:.2f})  "
            f"params ×{row['param_ratio']:.4f}  memory ×{row['memory_ratio']:.3f}"
            if "delta" in row
            else ""
        )
        print(f"{row['variant']:<7} {row['accuracy']:.2f} ± {row['accuracy_ci']:.2f}%{extra}")
    result = {
        "settings": vars(args),
        "reference": rep.__dict__,
        "held_out_pairs": len(held_out),
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
