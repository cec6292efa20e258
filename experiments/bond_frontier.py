"""BOND in the lab: reward quantile against KL(π‖π_ref) for J-BOND, BOND (N = 4, 8), RLOO and the rest of
the Best-of-N family (BoNBoN, vBoN, QRPO), with the Best-of-N frontier.

The question (Sessa et al. 2024, "BOND"): does J-BOND reach Best-of-N's quantile at Best-of-N's KL
(log N − (N−1)/N), and does its curve lie on or above a KL-regularised policy gradient's? Everything runs on
the lab's ~1.5M-parameter reference LM (``prefopt.lab``): the policy is a ``LoraPolicy`` on it (reference =
adapters off, anchor = the EMA adapter), samples come from ``HFSampler``, the losses from the registry.

The frontier is drawn twice: the exact Best-of-N points of the evaluation pool (N = 1, 2, 4, 8, 16) and the
continuous Best-of-N curve (quantile N/(N+1) at KL log N − (N−1)/N for every real N ≥ 1).

    python experiments/bond_frontier.py --out runs/bond_frontier            # full: 3 seeds
    python experiments/bond_frontier.py --seeds 1 --steps 40 --methods jbond,bond4   # reduced
    python experiments/bond_frontier.py --merge a/results.json,b/results.json --out runs/all   # no training

Writes ``results.json`` (every evaluation of every run, the Best-of-N points, the settings, wall times) and
``frontier.png`` (quantile against KL, mean over seeds with 95% intervals) to ``--out``. ``--merge`` joins the
runs of several invocations (same lab, evaluation and training settings; distinct method/seed pairs) into one
summary and plot.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import peft
import torch

from prefopt.lab import (
    Lab,
    LabConfig,
    best_of_n_frontier,
    best_of_n_point,
    continuous_best_of_n,
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
from prefopt.types import BestOfNSamples, PairLogps

METHODS = ("jbond", "bond4", "bond8", "rloo", "bonbon", "vbon", "qrpo")
RLOO = get_loss("rloo")
# Settings that must agree for runs of different invocations to be merged into one summary: the lab, the
# evaluation (prompts, pool, samples) and the shared training budget. Method-specific settings (eta, rloo_k,
# bon_n, …) are kept per run instead.
MERGE_KEYS = ("tiny", "steps", "batch", "eval_every", "eval_prompts", "eval_samples", "pool", "rank", "lr")
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


def ref_seq_logp(policy: LoraPolicy, ids: torch.Tensor, lab: Lab) -> torch.Tensor:
    """``S_ref`` of full lab rows: :func:`seq_logp` with the adapters off, no gradient."""
    with torch.no_grad(), policy.reference():
        return seq_logp(policy, ids, lab)


def bonbon_step(
    policy: LoraPolicy, lab: Lab, prompts: torch.Tensor, args: argparse.Namespace
) -> torch.Tensor:
    """BoNBoN (Gui et al. 2024): the best and the worst of ``N`` fresh reference samples per prompt as a pair.

    The registry's ``bonbon`` with ``n = N`` and its defaults otherwise: the closed-form ``β* = 1/(2(N−1)H_{N−1})``
    (``beta="auto"``), ``α = 0.005``, the IPO pair term. The reference samples do not depend on the policy, so
    drawing them fresh every step is the paper's offline data set without reuse.
    """
    b, n = prompts.shape[0], args.bon_n
    pool = sample(policy, lab, prompts, n, "reference")
    r = reward_of(lab, pool).view(b, n)
    start = n * torch.arange(b)
    rows = torch.cat([pool[start + r.argmax(1)], pool[start + r.argmin(1)]])
    ref = ref_seq_logp(policy, rows, lab)
    lp = seq_logp(policy, rows, lab)
    logps = PairLogps(chosen=lp[:b], rejected=lp[b:], ref_chosen=ref[:b], ref_rejected=ref[b:])
    return get_loss("bonbon", n=n)(logps).loss.mean()


def vbon_step(policy: LoraPolicy, lab: Lab, prompts: torch.Tensor, args: argparse.Namespace) -> torch.Tensor:
    """vBoN (Amini et al. 2024): one policy sample per prompt, its quantile among ``k`` fresh reference samples.

    The registry's ``vbon`` with ``n = N`` and its defaults otherwise (``variant="exact"``, the authors'
    quantile ``(c_< + 1)/(k + 1)``, the leave-one-out baseline over the batch).
    """
    b, k = prompts.shape[0], args.ref_k
    own = sample(policy, lab, prompts, 1, "policy")
    refs = sample(policy, lab, prompts, k, "reference")
    samples = BestOfNSamples(
        logp=seq_logp(policy, own, lab),
        ref_logp=ref_seq_logp(policy, own, lab),
        reward=reward_of(lab, own),
        ref_rewards=reward_of(lab, refs).view(b, k),
    )
    return get_loss("vbon", n=args.bon_n)(samples).loss.mean()


def qrpo_step(policy: LoraPolicy, lab: Lab, prompts: torch.Tensor, args: argparse.Namespace) -> torch.Tensor:
    """QRPO (Matrenok et al. 2025): offline regression of ``β·ρ`` onto the quantile reward.

    Per prompt, ``k + 2`` fresh reference samples: two are the responses (the paper's chosen and rejected, two
    independent rows), the other ``k`` the reference pool their quantile ``q = (1/k)Σ_j 1[r'_j ≤ r]`` is
    taken in. The registry's ``qrpo`` with ``β = --qrpo-beta`` (its default 0.1) and its defaults otherwise
    (``T = log``, exact ``log Z``, MSE): the target ``π_ref·e^{log q/β}/Z`` is the continuous Best-of-N with
    ``N = 1 + 1/β``.
    """
    b, k = prompts.shape[0], args.ref_k
    rows = sample(policy, lab, prompts, k + 2, "reference").view(b, k + 2, -1)
    resp = rows[:, :2].reshape(2 * b, -1)
    pool_r = reward_of(lab, rows[:, 2:].reshape(b * k, -1)).view(b, k).repeat_interleave(2, dim=0)
    samples = BestOfNSamples(
        logp=seq_logp(policy, resp, lab),
        ref_logp=ref_seq_logp(policy, resp, lab),
        reward=reward_of(lab, resp),
        ref_rewards=pool_r,
    )
    return get_loss("qrpo", beta=args.qrpo_beta)(samples).loss.mean()


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
        elif method == "bonbon":
            loss = bonbon_step(policy, lab, prompts, args)
        elif method == "vbon":
            loss = vbon_step(policy, lab, prompts, args)
        elif method == "qrpo":
            loss = qrpo_step(policy, lab, prompts, args)
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
        "settings": {k: getattr(args, k) for k in METHOD_SETTINGS[method]},
        "evals": evals,
        "seconds": time.perf_counter() - t0,
    }


METHOD_SETTINGS = {
    "jbond": ("eta", "jeffreys_beta"),
    "bond4": ("jeffreys_beta",),
    "bond8": ("jeffreys_beta",),
    "rloo": ("rloo_k",),
    "bonbon": ("bon_n",),
    "vbon": ("bon_n", "ref_k"),
    "qrpo": ("ref_k", "qrpo_beta"),
}


def summarise(runs: list[dict[str, Any]]) -> dict[str, list[dict[str, float]]]:
    """Per label and evaluation step: mean quantile and KL over seeds, with 95% t-intervals, and the continuous
    Best-of-N curve at the mean KL (its ``N`` and quantile)."""
    out: dict[str, list[dict[str, float]]] = {}
    for label in dict.fromkeys(r["label"] for r in runs):
        rs = [r for r in runs if r["label"] == label]
        steps = [ev["step"] for ev in rs[0]["evals"]]
        if any([ev["step"] for ev in r["evals"]] != steps for r in rs):
            raise ValueError(f"{label}: runs evaluated at different steps; cannot average over seeds")
        rows = []
        for i, step in enumerate(steps):
            q = torch.tensor([r["evals"][i]["quantile"] for r in rs], dtype=torch.float64)
            kl = torch.tensor([r["evals"][i]["kl"] for r in rs], dtype=torch.float64)
            n_front, q_front = best_of_n_frontier(max(float(kl.mean()), 0.0))
            rows.append(
                {
                    "step": step,
                    "seeds": len(rs),
                    "quantile": float(q.mean()),
                    "quantile_ci": mean_ci95(q)[1],
                    "kl": float(kl.mean()),
                    "kl_ci": mean_ci95(kl)[1],
                    "frontier_n": n_front,
                    "frontier_quantile": q_front,
                }
            )
        out[label] = rows
    return out


def continuous_curve(max_kl: float, points: int = 200) -> tuple[list[float], list[float]]:
    """``(KL, quantile)`` of the continuous Best-of-N curve from ``N = 1`` to the ``N`` whose KL is ``max_kl``."""
    n_max = best_of_n_frontier(max(max_kl, 0.0))[0]
    ns = torch.logspace(0.0, math.log10(max(n_max, 1.0 + 1e-9)), points, dtype=torch.float64)
    pts = [continuous_best_of_n(float(n)) for n in ns]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot(summary: dict[str, list[dict[str, float]]], bon: list[dict[str, float]], path: Path) -> None:
    """Quantile against KL: the whole range (left) and KL ≤ 2.2 nats, where the Best-of-N points are (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5))
    max_kl = max([p["kl"] for p in bon] + [r["kl"] for rows in summary.values() for r in rows])
    curve_kl, curve_q = continuous_curve(1.03 * max_kl)
    markers = "osD^v<>ph"
    for ax in axes:
        ax.plot(curve_kl, curve_q, "k-", lw=1, alpha=0.6, label="Best-of-N, continuous (real N ≥ 1)")
        ax.plot(
            [p["kl"] for p in bon],
            [p["quantile"] for p in bon],
            "k*",
            ms=10,
            label="Best-of-N, exact in the pool",
        )
        for p in bon:
            ax.annotate(
                f"N={p['n']}",
                (p["kl"], p["quantile"]),
                textcoords="offset points",
                xytext=(4, -10),
                fontsize=8,
            )
        for i, (label, rows) in enumerate(summary.items()):
            ax.errorbar(
                [r["kl"] for r in rows],
                [r["quantile"] for r in rows],
                xerr=[r["kl_ci"] for r in rows],
                yerr=[r["quantile_ci"] for r in rows],
                marker=markers[i % len(markers)],
                ms=4,
                capsize=2,
                label=label,
            )
        ax.set_xlabel("KL(π ‖ π_ref)  [nats, Monte Carlo]")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("reward quantile under π_ref (mid-rank)")
    axes[0].legend(fontsize=8, loc="lower right")
    axes[0].set_title("all runs")
    zoom = 2.2
    axes[1].set_xlim(-0.05, zoom)
    axes[1].set_ylim(0.48, continuous_best_of_n(best_of_n_frontier(zoom)[0])[1] + 0.03)
    axes[1].set_title(f"KL ≤ {zoom} nats")
    fig.suptitle("Lab: reward quantile against KL (mean over seeds, 95% intervals)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def merge(paths: list[Path], tol: float = 0.0) -> dict[str, Any]:
    """Join the runs of several ``results.json`` into one result (summary recomputed over all of them).

    Refuses, naming the file and the setting, to join results whose lab or evaluation differ: the same
    ``MERGE_KEYS`` settings (a missing ``tiny`` counts as ``False``), the same reference LM (parameter count;
    held-out NLL per token within ``tol``) and the same exact Best-of-N points of the evaluation pool (quantile
    and KL within ``tol``), and no method/label/seed run twice.

    ``tol = 0`` (the default) asks for the same reference LM and pool, bit for bit. Pre-training is seeded but
    its floating-point sums depend on the thread count and the BLAS, so a reference pre-trained again in
    another environment differs in the last bits of its weights, and its pool in a few samples: a positive
    ``tol`` accepts that, and the merged result records the largest difference found (``merge_check``).
    """
    if not (math.isfinite(tol) and tol >= 0):
        raise ValueError(f"--merge-tol must be a finite number >= 0, got {tol!r}")
    if len(paths) < 2:
        raise ValueError(f"--merge needs at least two results.json files, got {len(paths)}")
    results = []
    for p in paths:
        if not p.is_file():
            raise ValueError(f"--merge: {p} is not a file")
        results.append(json.loads(p.read_text()))
    first, base = results[0], paths[0]
    check = {"tolerance": tol, "nll_per_token": 0.0, "best_of_n": 0.0}

    def key(res: dict[str, Any], k: str) -> Any:
        return res["settings"].get(k, False if k == "tiny" else None)

    for res, p in zip(results[1:], paths[1:]):
        for k in MERGE_KEYS:
            if key(res, k) != key(first, k):
                raise ValueError(f"--merge: {p} has {k}={key(res, k)!r}, {base} has {key(first, k)!r}")
        ra, rb = res["reference"], first["reference"]
        nll_diff = abs(ra["nll_per_token"] - rb["nll_per_token"])
        if ra["num_parameters"] != rb["num_parameters"] or nll_diff > tol:
            raise ValueError(
                f"--merge: {p} has a different reference LM (parameters {ra['num_parameters']} against "
                f"{rb['num_parameters']}, held-out NLL differs by {nll_diff:.3g} > --merge-tol {tol:g})"
            )
        pa, pb = res["best_of_n"], first["best_of_n"]
        if [x["n"] for x in pa] != [y["n"] for y in pb]:
            raise ValueError(f"--merge: {p} has Best-of-N points for other N than {base}")
        pool_diff = max(abs(x[f] - y[f]) for x, y in zip(pa, pb) for f in ("quantile", "kl"))
        if pool_diff > tol:
            raise ValueError(
                f"--merge: {p} was evaluated on a different pool (its Best-of-N points differ by "
                f"{pool_diff:.3g} > --merge-tol {tol:g})"
            )
        check["nll_per_token"] = max(check["nll_per_token"], nll_diff)
        check["best_of_n"] = max(check["best_of_n"], pool_diff)
    runs: list[dict[str, Any]] = []
    seen: dict[tuple[str, int], Path] = {}
    for res, p in zip(results, paths):
        for r in res["runs"]:
            ident = (r["label"], r["seed"])
            if ident in seen:
                raise ValueError(f"--merge: {r['label']} seed {r['seed']} is in both {seen[ident]} and {p}")
            seen[ident] = p
            r = dict(r)
            r.setdefault(
                "settings", {k: res["settings"].get(k) for k in METHOD_SETTINGS.get(r["method"], ())}
            )
            runs.append(r)
    settings = {k: key(first, k) for k in MERGE_KEYS}
    return {
        "settings": settings,
        "sources": [
            {
                "file": str(p),
                "settings": res["settings"],
                "reference": res["reference"],
                "best_of_n": res["best_of_n"],
                "wall_seconds": res["wall_seconds"],
            }
            for res, p in zip(results, paths)
        ],
        "reference": first["reference"],
        "best_of_n": first["best_of_n"],
        "merge_check": check,
        "runs": runs,
        "summary": summarise(runs),
        "wall_seconds": sum(res["wall_seconds"] for res in results),
    }


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
    ap.add_argument("--bon-n", type=int, default=4, help="N of BoNBoN and vBoN")
    ap.add_argument(
        "--ref-k", type=int, default=16, help="reference samples per training prompt (vBoN, QRPO quantiles)"
    )
    ap.add_argument(
        "--qrpo-beta", type=float, default=0.1, help="QRPO β (registry default; T = log targets N = 1 + 1/β)"
    )
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--tiny", action="store_true", help="a smaller lab (the test suite's reduced run)")
    ap.add_argument("--first-seed", type=int, default=0, help="seeds are first-seed … first-seed + seeds − 1")
    ap.add_argument(
        "--merge",
        default="",
        help="comma list of results.json files to join into one summary and plot in --out (no training)",
    )
    ap.add_argument(
        "--merge-tol",
        type=float,
        default=0.0,
        help="--merge: largest accepted difference in the reference's held-out NLL and the Best-of-N points",
    )
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.merge:
        try:
            merged = merge([Path(p.strip()) for p in args.merge.split(",") if p.strip()], args.merge_tol)
        except ValueError as e:
            ap.error(str(e))
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(merged, indent=1))
        plot(merged["summary"], merged["best_of_n"], out / "frontier.png")
        print(f"merged {len(merged['runs'])} runs into {out / 'results.json'} and {out / 'frontier.png'}")
        mc = merged["merge_check"]
        print(
            f"largest difference between the sources: reference NLL {mc['nll_per_token']:.3g} nats/token, "
            f"Best-of-N points {mc['best_of_n']:.3g}"
        )
        return 0
    for name in ("seeds", "steps", "batch", "eval_every", "bon_n", "ref_k"):
        if getattr(args, name) < (2 if name in ("bon_n",) else 1):
            ap.error(f"--{name.replace('_', '-')} must be >= {2 if name == 'bon_n' else 1}")
    if args.first_seed < 0:
        ap.error("--first-seed must be >= 0")
    torch.set_num_threads(args.threads)
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
    runs: list[dict[str, Any]] = []

    def result() -> dict[str, Any]:
        return {
            "settings": vars(args),
            "reference": rep.__dict__,
            "best_of_n": bon,
            "runs": runs,
            "summary": summarise(runs) if runs else {},
            "wall_seconds": time.perf_counter() - t_start,
        }

    # seed-major: a stopped invocation leaves the same seeds of every method on disk
    jobs = [
        (seed, method, coef)
        for seed in range(args.first_seed, args.first_seed + args.seeds)
        for method in methods
        for coef in ([float(c) for c in args.kl_coefs.split(",")] if method == "rloo" else [None])
    ]
    for seed, method, coef in jobs:
        r = run(method, coef, seed, lab, pool, args)
        last = r["evals"][-1]
        print(
            f"{r['label']:<14} seed {seed}: quantile {last['quantile']:.3f} ± {last['quantile_se']:.3f}, "
            f"KL {last['kl']:.3f} ± {last['kl_se']:.3f}  ({r['seconds']:.0f} s)",
            flush=True,
        )
        runs.append(r)
        # every finished run is on disk: a stopped invocation loses at most the run in progress
        (out / "results.json").write_text(json.dumps(result(), indent=1))
    final = result()
    (out / "results.json").write_text(json.dumps(final, indent=1))
    plot(final["summary"], bon, out / "frontier.png")
    print(f"wrote {out / 'results.json'} and {out / 'frontier.png'} ({final['wall_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
