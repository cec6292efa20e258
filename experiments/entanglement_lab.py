"""Gradient entanglement in the lab: when does DPO lower the chosen log-prob, which predictor sees it coming,
and which remedy keeps it up — with the gold reward known exactly.

Questions (Yuan et al. 2024, "Gradient Entanglement", arXiv 2410.13828; Razin et al. 2024, "Unintentional
Unalignment", arXiv 2410.08847):

1. On pairs whose completions share most tokens ("shared": the rejected completion is the chosen one with
   ``--edits`` tokens changed) versus pairs that do not ("distinct": two independent completions of the same
   prompt), how often and how much does DPO lower the chosen log-prob while the margin grows?
2. Did the entanglement report (its first-order prediction of ``δ log π(y_w)`` and the gradient cosine), CHES
   and LN-CHES predict which pairs displace? AUC and Spearman correlation, each with a bootstrap 95% interval,
   against (a) the measured change after one SGD step on the pair alone (the report's verify path) and (b)
   the change after the whole DPO run.
3. Do the remedies — ``pairwise_normalized``, ``token_masked`` (shared tokens masked), ``dpop`` and CHES
   filtering (DPO on the pairs with the lowest LN-CHES) — keep the chosen log-prob up at an equal or better
   held-out gold win-rate against the reference (the mean mid-rank quantile of policy samples among reference
   samples: ``P(r(y_π) > r(y_ref)) + ½ P(tie)``)?

Everything runs on the lab's reference LM (``prefopt.lab``); the policy is a ``LoraPolicy`` on it (reference =
adapter off), the losses come from the registry, the diagnostics from ``prefopt.diagnostics``. Gold labels:
in every pair the completion with the higher gold reward is the chosen one (ties are not used).

    python experiments/entanglement_lab.py --json runs/entanglement_lab.json          # full: 3 seeds
    python experiments/entanglement_lab.py --tiny --seeds 1 --steps 40                  # reduced (tests)

Writes the JSON (settings, every run's trajectory and per-pair end state, the predictor table, the summary,
wall and CPU times) and, with ``--plot``, a figure.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import peft
import torch

from prefopt.diagnostics import ches_filter, ches_scores, entanglement, per_row_gradients
from prefopt.lab import Lab, LabConfig, evaluate_policy, mean_ci95, reference_pool
from prefopt.lab.testbed import _FIRST
from prefopt.logprobs import token_logps
from prefopt.losses.decoupled import shared_token_mask
from prefopt.masked import seq_sum
from prefopt.policy import LoraPolicy
from prefopt.registry import get_loss
from prefopt.types import PairLogps

METHODS = ("dpo", "pairwise_normalized", "token_masked", "dpop", "ches_filter")
KINDS = ("shared", "distinct")
# A smaller lab for the reduced run of the test suite (pre-trains in seconds; same code path).
TINY_LAB = LabConfig.tiny()


# ----------------------------------------------------------------------------------------------------------
# pairs
# ----------------------------------------------------------------------------------------------------------


def _continue(lab: Lab, last: torch.Tensor, length: int, g: torch.Generator) -> torch.Tensor:
    """``length`` chain tokens (content indices) after the content tokens ``last`` ``(n,)``."""
    cur, out = last, []
    for _ in range(length):
        cur = torch.multinomial(lab.transition[cur], 1, generator=g).squeeze(1)
        out.append(cur)
    return torch.stack(out, dim=1)


def make_pairs(lab: Lab, n: int, kind: str, edits: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """``n`` gold-labelled pairs of one kind: ``chosen``/``rejected`` full rows ``(n, 1+P+L)`` (same prompt).

    ``shared``: ``y`` is drawn from the language; ``y'`` is ``y`` with ``edits`` distinct positions ``t``
    replaced by a token drawn from the chain's row ``T[y_{t−1}]`` conditioned on differing from ``y_t``.
    ``distinct``: two independent continuations of the prompt. The higher gold reward is chosen; pairs with
    equal rewards are dropped and redrawn.
    """
    cfg = lab.config
    length = cfg.completion_len
    rows_c: list[torch.Tensor] = []
    rows_r: list[torch.Tensor] = []
    have = 0
    while have < n:
        m = 2 * (n - have) + 8
        prompts = lab.sample_prompts(m, generator=g)
        last = prompts[:, -1] - _FIRST
        y = _continue(lab, last, length, g)
        if kind == "distinct":
            y2 = _continue(lab, last, length, g)
        else:
            y2 = y.clone()
            for i in range(m):
                pos = torch.randperm(length, generator=g)[:edits]
                for t in sorted(pos.tolist()):
                    prev = int(last[i]) if t == 0 else int(y2[i, t - 1])
                    p = lab.transition[prev].clone()
                    p[y[i, t]] = 0.0
                    y2[i, t] = torch.multinomial(p, 1, generator=g)
        a = torch.cat([prompts, y + _FIRST], dim=1)
        b = torch.cat([prompts, y2 + _FIRST], dim=1)
        ra, rb = lab.gold_reward(a[:, 1 + cfg.prompt_len :]), lab.gold_reward(b[:, 1 + cfg.prompt_len :])
        ok = ra != rb
        first = ra > rb
        chosen = torch.where(first.unsqueeze(1), a, b)[ok]
        rejected = torch.where(first.unsqueeze(1), b, a)[ok]
        take = min(n - have, chosen.shape[0])
        rows_c.append(chosen[:take])
        rows_r.append(rejected[:take])
        have += take
    return {"chosen": torch.cat(rows_c), "rejected": torch.cat(rows_r)}


def pair_batch(lab: Lab, chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    """The ``(2B, T)`` pair layout of ``prefopt.diagnostics`` (chosen rows, then rejected)."""
    ids = torch.cat([chosen, rejected])
    cm = torch.zeros_like(ids, dtype=torch.bool)
    cm[:, 1 + lab.config.prompt_len :] = True
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": cm}


def shared_fraction(lab: Lab, chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Fraction of completion offsets holding the same token in both completions ``(n,)``."""
    p = 1 + lab.config.prompt_len
    return (chosen[:, p:] == rejected[:, p:]).double().mean(dim=1)


# ----------------------------------------------------------------------------------------------------------
# statistics
# ----------------------------------------------------------------------------------------------------------


def ranks(x: np.ndarray) -> np.ndarray:
    """Average ranks (1-based; ties share the mean of their ranks)."""
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x))
    r[order] = np.arange(1, len(x) + 1)
    _, inv = np.unique(x, return_inverse=True)
    sums = np.bincount(inv, weights=r)
    counts = np.bincount(inv)
    return (sums / counts)[inv]


def auc(score: np.ndarray, label: np.ndarray) -> float:
    """``P(score_pos > score_neg) + ½ P(tie)`` (Mann–Whitney); NaN without both classes."""
    pos = label.astype(bool)
    n1, n0 = int(pos.sum()), int((~pos).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    r = ranks(score)
    return float((r[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / den) if den > 0 else float("nan")


def bootstrap(fn: Any, arrays: list[np.ndarray], reps: int, seed: int) -> tuple[float, float, float]:
    """``(value, low, high)``: ``fn`` on the data and the 2.5/97.5 percentiles over ``reps`` resamples of rows."""
    rng = np.random.default_rng(seed)
    n = len(arrays[0])
    value = fn(*arrays)
    stats = []
    for _ in range(reps):
        idx = rng.integers(0, n, n)
        s = fn(*(a[idx] for a in arrays))
        if not math.isnan(s):
            stats.append(s)
    if not stats:
        return value, float("nan"), float("nan")
    lo, hi = np.percentile(stats, [2.5, 97.5])
    return value, float(lo), float(hi)


# ----------------------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------------------


def new_policy(lab: Lab, args: argparse.Namespace, seed: int) -> LoraPolicy:
    model, _ = lab.reference()
    cfg = peft.LoraConfig(
        r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear", lora_dropout=0.0
    )
    torch.manual_seed(seed)
    policy = LoraPolicy(model, cfg)
    policy.eval()
    return policy


def seq_logps(policy: LoraPolicy, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    lp = token_logps(policy.model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    assert isinstance(lp, torch.Tensor)
    return seq_sum(lp, batch["completion_mask"])


@torch.no_grad()
def all_logps(policy: LoraPolicy, batch: dict[str, torch.Tensor], chunk: int = 512) -> torch.Tensor:
    out = []
    rows = batch["input_ids"].shape[0]
    for s in range(0, rows, chunk):
        out.append(seq_logps(policy, {k: v[s : s + chunk] for k, v in batch.items()}).double())
    return torch.cat(out)


def step_loss(
    method: str,
    policy: LoraPolicy,
    batch: dict[str, torch.Tensor],
    ref: torch.Tensor,
    args: argparse.Namespace,
) -> torch.Tensor:
    """The mean loss of one minibatch (``ref``: ``(2B,)`` reference log-probs of its rows)."""
    b = batch["input_ids"].shape[0] // 2
    cm = batch["completion_mask"]
    if method == "token_masked":
        tok = token_logps(policy.model, batch["input_ids"], batch["attention_mask"], cm)
        with policy.reference():
            ref_tok = token_logps(policy.model, batch["input_ids"], batch["attention_mask"], cm)
        assert isinstance(tok, torch.Tensor) and isinstance(ref_tok, torch.Tensor)
        mu = shared_token_mask(batch)
        return get_loss("token_masked", beta=args.beta)(tok, ref_tok, cm, mu).loss.mean()
    if method == "pairwise_normalized":
        named = [(n, p) for n, p in policy.model.named_parameters() if p.requires_grad]
        rg = per_row_gradients(policy.model, lambda: seq_logps(policy, batch), 2 * b, named)
        norms = rg.gram.diagonal().clamp(min=1e-30).sqrt().detach()
        s = seq_logps(policy, batch)
        logps = PairLogps(s[:b], s[b:], ref[:b].to(s.dtype), ref[b:].to(s.dtype))
        loss_fn = get_loss("pairwise_normalized", beta=args.beta)
        return loss_fn(logps, norms[:b].to(s.dtype), norms[b:].to(s.dtype)).loss.mean()
    s = seq_logps(policy, batch)
    logps = PairLogps(s[:b], s[b:], ref[:b].to(s.dtype), ref[b:].to(s.dtype))
    if method == "dpop":
        return get_loss("dpop", beta=args.beta, lam=args.dpop_lambda)(logps).loss.mean()
    return get_loss("dpo", beta=args.beta)(logps).loss.mean()


def train(
    method: str,
    seed: int,
    lab: Lab,
    data: dict[str, Any],
    pool: Any,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """One run: ``args.steps`` Adam steps on minibatches of the run's training pairs; the log-probs of every
    training pair are tracked, the held-out win-rate is measured at the end."""
    policy = new_policy(lab, args, seed)
    opt = torch.optim.Adam(policy.trainable_parameters(), lr=args.lr)
    g = torch.Generator().manual_seed(2000 + seed)
    train_idx = data["keep"] if method == "ches_filter" else torch.arange(data["n"])
    full = data["batch"]
    n = data["n"]
    ref = data["ref"]
    traj = []
    t0, c0 = time.perf_counter(), time.process_time()

    def track(step: int) -> dict[str, Any]:
        s = all_logps(policy, full)
        d_w, d_l = s[:n] - ref[:n], s[n:] - ref[n:]
        row: dict[str, Any] = {"step": step}
        for kind in KINDS:
            m = torch.as_tensor(data["kind"] == kind)
            row[kind] = {
                "dchosen": float(d_w[m].mean()),
                "drejected": float(d_l[m].mean()),
                "margin": float((d_w - d_l)[m].mean()),
            }
        traj.append(row)
        return {"dchosen": d_w, "drejected": d_l}

    track(0)
    for step in range(1, args.steps + 1):
        pick = train_idx[torch.randint(len(train_idx), (min(args.batch, len(train_idx)),), generator=g)]
        rows = torch.cat([pick, pick + n])
        mb = {k: v[rows] for k, v in full.items()}
        loss = step_loss(method, policy, mb, ref[rows], args)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % args.track_every == 0 and step != args.steps:
            track(step)
    end = track(args.steps)
    ev = evaluate_policy(lab, policy, pool, samples_per_prompt=args.eval_samples, seed=seed)
    d_w, d_l = end["dchosen"], end["drejected"]
    trained = torch.zeros(n, dtype=torch.bool)
    trained[train_idx] = True
    stats: dict[str, Any] = {}
    for name, m in [(k, torch.as_tensor(data["kind"] == k)) for k in KINDS] + [
        ("all", torch.ones(n, dtype=torch.bool))
    ]:
        for scope, mm in (("all", m), ("trained", m & trained)):
            if not bool(mm.any()):
                continue
            margin = (d_w - d_l)[mm]
            stats[f"{name}/{scope}"] = {
                "pairs": int(mm.sum()),
                "dchosen": float(d_w[mm].mean()),
                "drejected": float(d_l[mm].mean()),
                "margin": float(margin.mean()),
                "displaced": float(((d_w[mm] < 0) & (margin > 0)).double().mean()),
                "chosen_fell": float((d_w[mm] < 0).double().mean()),
                "margin_grew": float((margin > 0).double().mean()),
            }
    return {
        "method": method,
        "seed": seed,
        "trained_pairs": int(trained.sum()),
        "trajectory": traj,
        "stats": stats,
        "eval": ev.__dict__,
        "end_dchosen": d_w.tolist(),
        "seconds": time.perf_counter() - t0,
        "cpu_seconds": time.process_time() - c0,
    }


# ----------------------------------------------------------------------------------------------------------
# predictors
# ----------------------------------------------------------------------------------------------------------


def predictors(lab: Lab, data: dict[str, Any], args: argparse.Namespace, seed: int) -> dict[str, list[float]]:
    """At the reference point: the entanglement report (with its verify path: the measured change after one
    SGD step of size ``--eta`` on each pair alone) and CHES / LN-CHES of every training pair."""
    policy = new_policy(lab, args, seed)
    n = data["n"]
    full = data["batch"]
    out: dict[str, list[float]] = {
        k: [] for k in ("pred_dchosen", "measured_dchosen", "cosine", "ratio", "ches", "ln_ches")
    }
    for s in range(0, n, args.probe_chunk):
        idx = torch.arange(s, min(n, s + args.probe_chunk))
        mb = {k: v[torch.cat([idx, idx + n])] for k, v in full.items()}
        rep = entanglement(policy, mb, loss="dpo", eta=args.eta, verify=True, beta=args.beta)
        cs = ches_scores(policy, mb)
        assert rep.measured_dchosen is not None
        out["pred_dchosen"] += rep.pred_dchosen.tolist()
        out["measured_dchosen"] += rep.measured_dchosen.tolist()
        out["cosine"] += rep.cosine.tolist()
        out["ratio"] += rep.ratio.tolist()
        out["ches"] += cs.ches.tolist()
        out["ln_ches"] += cs.ln_ches.tolist()
    return out


PREDICTORS = {  # name → (field, sign): score = sign · field, higher = "more likely to displace"
    "first-order δS_w (report)": ("pred_dchosen", -1.0),
    "gradient cosine (report)": ("cosine", 1.0),
    "CHES": ("ches", 1.0),
    "LN-CHES": ("ln_ches", 1.0),
    "shared-token fraction": ("shared", 1.0),
}


def predictor_table(pairs: dict[str, np.ndarray], args: argparse.Namespace) -> list[dict[str, Any]]:
    """AUC (label: the chosen log-prob fell) and Spearman (score vs −δS_w), bootstrap 95% intervals."""
    rows = []
    targets = {"one step": "measured_dchosen", "after DPO": "dpo_dchosen"}
    for subset in ("all", "shared", "distinct"):
        m = np.ones(len(pairs["kind"]), dtype=bool) if subset == "all" else pairs["kind"] == subset
        for tname, tfield in targets.items():
            y = pairs[tfield][m]
            label = (y < 0).astype(np.float64)
            for pname, (field, sign) in PREDICTORS.items():
                x = sign * pairs[field][m]
                ok = ~np.isnan(x)
                a = bootstrap(auc, [x[ok], label[ok]], args.bootstrap, 1)
                r = bootstrap(spearman, [x[ok], -y[ok]], args.bootstrap, 2)
                rows.append(
                    {
                        "subset": subset,
                        "target": tname,
                        "predictor": pname,
                        "pairs": int(ok.sum()),
                        "displaced_frac": float(label[ok].mean()),
                        "auc": a[0],
                        "auc_lo": a[1],
                        "auc_hi": a[2],
                        "spearman": r[0],
                        "spearman_lo": r[1],
                        "spearman_hi": r[2],
                    }
                )
    return rows


# ----------------------------------------------------------------------------------------------------------
# summary, plot, main
# ----------------------------------------------------------------------------------------------------------


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per method: mean ± 95% t-interval over seeds of the end statistics and the held-out evaluation, and the
    per-seed difference to DPO (same seed, same pairs)."""
    out: dict[str, Any] = {}
    dpo = {r["seed"]: r for r in runs if r["method"] == "dpo"}
    for method in dict.fromkeys(r["method"] for r in runs):
        rs = [r for r in runs if r["method"] == method]
        entry: dict[str, Any] = {"seeds": len(rs)}
        for key in rs[0]["stats"]:
            for f in ("dchosen", "drejected", "margin", "displaced", "chosen_fell"):
                entry[f"{key}/{f}"] = mean_ci95([r["stats"][key][f] for r in rs])
        for f in ("quantile", "reward", "kl"):
            entry[f"eval/{f}"] = mean_ci95([r["eval"][f] for r in rs])
        if method != "dpo" and all(r["seed"] in dpo for r in rs):
            entry["vs_dpo/quantile"] = mean_ci95(
                [r["eval"]["quantile"] - dpo[r["seed"]]["eval"]["quantile"] for r in rs]
            )
            for key in ("all/trained", "shared/trained"):
                if key in rs[0]["stats"]:
                    entry[f"vs_dpo/{key}/dchosen"] = mean_ci95(
                        [r["stats"][key]["dchosen"] - dpo[r["seed"]]["stats"][key]["dchosen"] for r in rs]
                    )
        out[method] = entry
    return out


def plot(runs: list[dict[str, Any]], summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    ax = axes[0]
    for kind, style in (("shared", "-"), ("distinct", "--")):
        rs = [r for r in runs if r["method"] == "dpo"]
        steps = [t["step"] for t in rs[0]["trajectory"]]
        for field, color in (("dchosen", "C0"), ("drejected", "C3"), ("margin", "C2")):
            ys = np.array([[t[kind][field] for t in r["trajectory"]] for r in rs])
            ax.plot(steps, ys.mean(0), style, color=color, label=f"{kind}: {field}")
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xlabel("DPO step")
    ax.set_ylabel("change from the reference [nats]")
    ax.set_title("DPO: chosen / rejected log-prob and margin")
    ax.legend(fontsize=7)
    ax = axes[1]
    for i, method in enumerate(summary):
        rs = [r for r in runs if r["method"] == method]
        steps = [t["step"] for t in rs[0]["trajectory"]]
        ys = np.array([[t["shared"]["dchosen"] for t in r["trajectory"]] for r in rs])
        ax.plot(steps, ys.mean(0), color=f"C{i}", label=method)
        ys = np.array([[t["distinct"]["dchosen"] for t in r["trajectory"]] for r in rs])
        ax.plot(steps, ys.mean(0), "--", color=f"C{i}")
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xlabel("step")
    ax.set_ylabel("mean δ log π(y_w) [nats]")
    ax.set_title("chosen log-prob: shared (solid), distinct (dashed)")
    ax.legend(fontsize=7)
    ax = axes[2]
    for i, (method, e) in enumerate(summary.items()):
        q, qc = e["eval/quantile"]
        c, cc = e["all/all/dchosen"]
        ax.errorbar([c], [q], xerr=[cc], yerr=[qc], marker="o", color=f"C{i}", capsize=3, label=method)
    ax.axhline(0.5, color="k", lw=0.5)
    ax.axvline(0, color="k", lw=0.5)
    ax.set_xlabel("mean δ log π(y_w) over all training pairs [nats]")
    ax.set_ylabel("held-out gold win-rate vs reference")
    ax.set_title("end of training (mean, 95% t-interval over seeds)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def merge(args: argparse.Namespace) -> int:
    """Pool the runs and per-pair tables of several result files (disjoint seeds, same settings otherwise)."""
    parts = [json.loads(Path(p).read_text()) for p in args.merge]
    seeds = [s for part in parts for s in dict.fromkeys(part["pairs"]["seed"])]
    if len(seeds) != len(set(seeds)):
        raise SystemExit(f"error: --merge: the files share seeds {sorted(seeds)}")
    runs = [r for part in parts for r in part["runs"]]
    probe = {k: [x for part in parts for x in part["pairs"][k]] for k in parts[0]["pairs"]}
    table = predictor_table({k: np.asarray(v) for k, v in probe.items()}, args)
    summary = summarise(runs)
    settings = dict(parts[0]["settings"])
    settings.update(seeds=len(seeds), first_seed=min(seeds), bootstrap=args.bootstrap)
    result = {
        "settings": settings,
        "lab": parts[0]["lab"],
        "reference": parts[0]["reference"],
        "summary": summary,
        "predictors": table,
        "pairs": probe,
        "runs": runs,
        "wall_seconds": max(p["wall_seconds"] for p in parts),
        "cpu_seconds": sum(p["cpu_seconds"] for p in parts),
        "merged_from": [
            {"file": str(f), "wall_seconds": p["wall_seconds"], "cpu_seconds": p["cpu_seconds"]}
            for f, p in zip(args.merge, parts, strict=True)
        ],
    }
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    if args.plot:
        plot(runs, summary, Path(args.plot))
    print(f"merged {len(parts)} files ({len(seeds)} seeds) into {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    ap.add_argument("--json", default="runs/entanglement_lab.json", help="output JSON path")
    ap.add_argument("--plot", default=None, help="also write the figure to this PNG path")
    ap.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    ap.add_argument("--seeds", type=int, default=3, help="seeds (each draws its own pairs)")
    ap.add_argument("--pairs", type=int, default=128, help="training pairs of each kind per seed")
    ap.add_argument("--edits", type=int, default=1, help="tokens changed in a shared pair")
    ap.add_argument("--steps", type=int, default=100, help="optimizer steps per run")
    ap.add_argument("--batch", type=int, default=32, help="pairs per step")
    ap.add_argument("--track-every", type=int, default=20, help="steps between log-prob snapshots")
    ap.add_argument("--lr", type=float, default=3e-4, help="Adam learning rate")
    ap.add_argument("--beta", type=float, default=0.1, help="β of every loss")
    ap.add_argument("--dpop-lambda", type=float, default=50.0, help="DPOP λ")
    ap.add_argument(
        "--keep", type=float, default=0.5, help="CHES filtering: fraction of pairs kept (lowest LN-CHES)"
    )
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank")
    ap.add_argument("--eta", type=float, default=0.05, help="SGD step of the one-step (verify) measurement")
    ap.add_argument("--probe-chunk", type=int, default=64, help="pairs per entanglement-report call")
    ap.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples")
    ap.add_argument("--eval-prompts", type=int, default=32, help="held-out evaluation prompts")
    ap.add_argument("--eval-samples", type=int, default=32, help="policy samples per evaluation prompt")
    ap.add_argument("--pool", type=int, default=512, help="reference samples per evaluation prompt")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--tiny", action="store_true", help="a smaller lab (the test suite's reduced run)")
    ap.add_argument("--first-seed", type=int, default=0, help="the first seed (seeds first … first+seeds−1)")
    ap.add_argument(
        "--merge",
        nargs="+",
        default=None,
        metavar="JSON",
        help="combine the JSON files of runs with different seeds (e.g. run in parallel) into --json; no training",
    )
    args = ap.parse_args(argv)
    if args.merge:
        return merge(args)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        ap.error(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    if "dpo" not in methods:
        methods.insert(0, "dpo")  # the baseline, and the "after DPO" target of the predictors
    if not 0 < args.keep <= 1:
        ap.error(f"--keep must be in (0, 1], got {args.keep}")
    torch.set_num_threads(args.threads)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    t_start, c_start = time.perf_counter(), time.process_time()
    lab = Lab(TINY_LAB if args.tiny else LabConfig())
    if not 1 <= args.edits < lab.config.completion_len:
        ap.error(f"--edits must be in 1..{lab.config.completion_len - 1}")
    model, rep = lab.reference(progress=True)
    print(
        f"reference LM: {rep.num_parameters:,} parameters, NLL {rep.nll_per_token:.4f} nats/token "
        f"(language entropy {rep.entropy_per_token:.4f}), {'cached' if rep.loaded else f'{rep.seconds:.0f} s'}",
        flush=True,
    )
    prompts = lab.sample_prompts(args.eval_prompts, seed=12345)
    pool = reference_pool(lab, model, prompts, samples_per_prompt=args.pool, seed=0)
    del model
    runs: list[dict[str, Any]] = []
    probe: dict[str, list[Any]] = {}
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        g = torch.Generator().manual_seed(7000 + seed)
        parts = [make_pairs(lab, args.pairs, kind, args.edits, g) for kind in KINDS]
        chosen = torch.cat([p["chosen"] for p in parts])
        rejected = torch.cat([p["rejected"] for p in parts])
        n = chosen.shape[0]
        kind = np.array([k for k in KINDS for _ in range(args.pairs)])
        batch = pair_batch(lab, chosen, rejected)
        ref_policy = new_policy(lab, args, seed)
        with ref_policy.reference():
            ref = all_logps(ref_policy, batch)
        del ref_policy
        t0 = time.perf_counter()
        pr = predictors(lab, {"n": n, "batch": batch}, args, seed)
        keep = ches_filter(torch.tensor(pr["ln_ches"]), keep_fraction=args.keep).keep
        frac = shared_fraction(lab, chosen, rejected)
        kept_shared = float((torch.as_tensor(kind[keep.numpy()] == "shared")).double().mean())
        print(
            f"seed {seed}: {n} pairs, shared-token fraction {frac[: args.pairs].mean():.2f} (shared) / "
            f"{frac[args.pairs :].mean():.2f} (distinct); predictors {time.perf_counter() - t0:.0f} s; "
            f"CHES filter keeps {len(keep)} pairs, {kept_shared:.0%} of them shared",
            flush=True,
        )
        data = {"n": n, "batch": batch, "ref": ref, "kind": kind, "keep": keep}
        seed_runs = {}
        for method in methods:
            r = train(method, seed, lab, data, pool, args)
            st = r["stats"]
            print(
                f"  {method:<20} seed {seed}: δ log π(y_w) shared {st['shared/all']['dchosen']:+.3f} "
                f"distinct {st['distinct/all']['dchosen']:+.3f}; displaced (fell, margin grew) shared "
                f"{st['shared/all']['displaced']:.0%} distinct {st['distinct/all']['displaced']:.0%}; "
                f"win-rate {r['eval']['quantile']:.3f} ± {r['eval']['quantile_se']:.3f}, "
                f"KL {r['eval']['kl']:.2f}  ({r['seconds']:.0f} s)",
                flush=True,
            )
            runs.append(r)
            seed_runs[method] = r
        probe.setdefault("seed", []).extend([seed] * n)
        probe.setdefault("kind", []).extend(kind.tolist())
        probe.setdefault("shared", []).extend(frac.tolist())
        probe.setdefault("dpo_dchosen", []).extend(seed_runs["dpo"]["end_dchosen"])
        for k, v in pr.items():
            probe.setdefault(k, []).extend(v)
    arrays = {k: np.asarray(v) for k, v in probe.items()}
    table = predictor_table(arrays, args)
    for row in table:
        if row["subset"] == "all":
            print(
                f"  {row['target']:<9} {row['predictor']:<26} AUC {row['auc']:.3f} [{row['auc_lo']:.3f}, "
                f"{row['auc_hi']:.3f}]  Spearman {row['spearman']:+.3f} [{row['spearman_lo']:+.3f}, "
                f"{row['spearman_hi']:+.3f}]  (displaced {row['displaced_frac']:.0%} of {row['pairs']})"
            )
    summary = summarise(runs)
    result = {
        "settings": vars(args),
        "lab": "tiny" if args.tiny else "default",
        "reference": rep.__dict__,
        "summary": summary,
        "predictors": table,
        "pairs": probe,
        "runs": runs,
        "wall_seconds": time.perf_counter() - t_start,
        "cpu_seconds": time.process_time() - c_start,
    }
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    if args.plot:
        plot(runs, summary, Path(args.plot))
    print(
        f"wrote {out}{' and ' + args.plot if args.plot else ''} (wall {result['wall_seconds']:.0f} s, "
        f"CPU {result['cpu_seconds']:.0f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
