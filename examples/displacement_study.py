"""Which displacement predictor works? CHES, LN-CHES and the first-order gradient prediction vs a measured step.

For ``--pairs`` preference pairs (SmolLM2-135M-Instruct + a fresh LoRA adapter, i.e. policy == reference), in
batches of ``--batch``:

* ``ches_scores`` — CHES and LN-CHES from one forward (Razin et al. 2024, arXiv 2410.08847);
* ``entanglement(..., verify=True)`` — the first-order prediction ``pred_dchosen`` of the change of
  ``log π(y_w)`` after one SGD step (size ``--eta``) on that pair's DPO loss alone, and the change actually
  measured after taking that step (``measured_dchosen``);

then, with "displaced" meaning ``measured_dchosen < 0``, reports for each predictor (higher = more displacing:
``−pred_dchosen``, ``ches``, ``ln_ches``) the AUC for the displaced pairs and the Spearman correlation with
``−measured_dchosen``, each with a percentile-bootstrap 95 % interval over pairs. Writes ``results.json``
(per-pair values included) to ``--out``.

    python examples/displacement_study.py --data ../shared/data/taskmaster/coffee --out runs/disp_coffee
    python examples/displacement_study.py --out runs/disp_hh          # HH-RLHF helpful-base (default)
    python examples/displacement_study.py --smoke --out /tmp/disp      # tiny model, built-in pairs
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from prefopt.data import (
    PreferenceCollator,
    load_builtin_pairs,
    load_pointwise,
    load_preferences,
    pairs_from_pointwise,
)
from prefopt.diagnostics.displacement import ches_scores
from prefopt.diagnostics.entanglement import entanglement
from prefopt.policy import LoraPolicy

DEFAULT_DATA = (
    Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "hh-rlhf" / "helpful-base.test.jsonl.gz"
)


def auc(score: Tensor, label: Tensor) -> float:
    """P(score of a random positive > score of a random negative) + ½ P(tie), by explicit comparison of every
    (positive, negative) pair; NaN when one class is empty."""
    pos, neg = score[label], score[~label]
    if pos.numel() == 0 or neg.numel() == 0:
        return float("nan")
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())


def ranks(x: Tensor) -> Tensor:
    """1-based ranks, ties given their average rank."""
    order = torch.argsort(x, stable=True)
    r = torch.empty_like(x, dtype=torch.float64)
    xs = x[order]
    i = 0
    n = x.numel()
    while i < n:
        j = i
        while j + 1 < n and xs[j + 1] == xs[i]:
            j += 1
        r[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return r


def spearman(a: Tensor, b: Tensor) -> float:
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float((ra.square().sum() * rb.square().sum()).sqrt())
    return float((ra * rb).sum()) / den if den > 0 else float("nan")


def bootstrap(stat: Any, *xs: Tensor, reps: int, seed: int) -> tuple[float, float]:
    g = torch.Generator().manual_seed(seed)
    n = xs[0].shape[0]
    vals = []
    for _ in range(reps):
        idx = torch.randint(0, n, (n,), generator=g)
        v = stat(*(x[idx] for x in xs))
        if math.isfinite(v):
            vals.append(v)
    if len(vals) < reps // 2:
        return float("nan"), float("nan")
    t = torch.tensor(vals, dtype=torch.float64)
    return float(t.quantile(0.025)), float(t.quantile(0.975))


def load(args: argparse.Namespace) -> tuple[Any, Any, list[dict[str, str]]]:
    if args.smoke:
        from prefopt.testing import char_tokenizer, tiny_causal_lm

        tok = char_tokenizer()
        model = tiny_causal_lm("llama", vocab_size=len(tok), hidden_size=32, num_layers=2, seed=args.seed)
        return model, tok, [dict(r) for r in load_builtin_pairs()]
    from prefopt.models import load_smollm2

    data = Path(args.data)
    if data.is_dir():
        files = sorted(str(f) for f in data.glob("reward_*.json"))
        if not files:
            raise SystemExit(f"--data: folder {data} has no reward_*.json (Taskmaster pointwise rewards)")
        model, tok = load_smollm2()
        return model, tok, [dict(r) for r in pairs_from_pointwise(load_pointwise(files))]
    if not data.is_file():
        raise SystemExit(f"--data: no such file {data}")
    model, tok = load_smollm2()
    return model, tok, [dict(r) for r in load_preferences(str(data), format="implicit")]


def batches_of(rows: Sequence[dict[str, str]], collate: Any, n: int, size: int, seed: int) -> list[Any]:
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    picked: list[dict[str, str]] = []
    for i in order:
        if len(picked) == n:
            break
        row = {k: rows[i][k] for k in ("prompt", "chosen", "rejected")}
        try:
            ok = collate([row]).input_ids.shape[0] == 2
        except ValueError:
            ok = False
        if ok:
            picked.append(row)
    if len(picked) < n:
        raise SystemExit(f"only {len(picked)} valid pairs, --pairs asks for {n}")
    return [collate(picked[i : i + size]) for i in range(0, n, size)]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """``--help``: the module docstring as written, every flag with its default."""


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="HH-RLHF jsonl(.gz) or a Taskmaster folder")
    ap.add_argument("--out", default="runs/displacement", help="output folder")
    ap.add_argument("--pairs", type=int, default=128, help="preference pairs measured")
    ap.add_argument("--batch", type=int, default=4, help="pairs per forward of the predictors")
    ap.add_argument("--beta", type=float, default=0.1, help="DPO beta of the per-pair loss")
    ap.add_argument(
        "--eta",
        type=float,
        default=1e-3,
        help="SGD step size of the measured step and of the first-order prediction",
    )
    ap.add_argument("--max-length", type=int, default=96, help="prompt + completion tokens per row")
    ap.add_argument("--max-prompt-length", type=int, default=48, help="prompt tokens kept (its end)")
    ap.add_argument(
        "--positions",
        choices=("predicting", "inclusive"),
        default="predicting",
        help="hidden states summed by CHES: those predicting the completion tokens, or also the last one",
    )
    ap.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the 95%% intervals")
    ap.add_argument(
        "--seed", type=int, default=0, help="seed of the data shuffle, the adapter and the bootstrap"
    )
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--smoke", action="store_true", help="tiny random model, built-in pairs, 8 pairs")
    args = ap.parse_args(argv)
    if args.smoke:
        args.pairs, args.batch, args.max_length, args.max_prompt_length, args.bootstrap = 8, 4, 64, 40, 50
    for name in ("pairs", "batch", "bootstrap"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model, tok, rows = load(args)
    model.eval()
    policy = LoraPolicy(model)
    collate = PreferenceCollator(tok, max_length=args.max_length, max_prompt_length=args.max_prompt_length)
    batches = batches_of(rows, collate, args.pairs, args.batch, args.seed)
    keys = (
        "ches",
        "ln_ches",
        "pred_dchosen",
        "measured_dchosen",
        "pred_batch_dchosen",
        "measured_batch_dchosen",
    )
    cols: dict[str, list[float]] = {k: [] for k in keys}
    t_ches = t_rep = 0.0
    for k, batch in enumerate(batches):
        s = time.perf_counter()
        cs = ches_scores(policy, batch, positions=args.positions)
        t_ches += time.perf_counter() - s
        s = time.perf_counter()
        rep = entanglement(policy, batch, loss="dpo", beta=args.beta, eta=args.eta, verify=True)
        t_rep += time.perf_counter() - s
        assert rep.measured_dchosen is not None and rep.measured_batch_dchosen is not None
        cols["ches"] += cs.ches.tolist()
        cols["ln_ches"] += cs.ln_ches.tolist()
        cols["pred_dchosen"] += rep.pred_dchosen.tolist()
        cols["measured_dchosen"] += rep.measured_dchosen.tolist()
        cols["pred_batch_dchosen"] += rep.pred_batch_dchosen.tolist()
        cols["measured_batch_dchosen"] += rep.measured_batch_dchosen.tolist()
        print(f"batch {k + 1}/{len(batches)}  ches {t_ches:.1f}s  report+verify {t_rep:.1f}s", flush=True)
    t = {k: torch.tensor(v, dtype=torch.float64) for k, v in cols.items()}
    table: dict[str, dict[str, Any]] = {}
    summary: dict[str, dict[str, float]] = {}
    for step, prefix in (("alone", ""), ("batch", "batch_")):
        measured, pred = t[f"measured_{prefix}dchosen"], t[f"pred_{prefix}dchosen"]
        displaced, target = measured < 0, -measured
        summary[step] = {
            "displaced_fraction": float(displaced.double().mean()),
            "first_order_sign_agreement": float(((pred < 0) == displaced).double().mean()),
        }
        for name, score in {"first_order": -pred, "ches": t["ches"], "ln_ches": t["ln_ches"]}.items():
            table[f"{step}/{name}"] = {
                "auc": auc(score, displaced),
                "auc_ci95": bootstrap(auc, score, displaced, reps=args.bootstrap, seed=args.seed),
                "spearman": spearman(score, target),
                "spearman_ci95": bootstrap(spearman, score, target, reps=args.bootstrap, seed=args.seed),
            }
    result = {
        "args": {k: v for k, v in vars(args).items()},
        "n_pairs": len(cols["ches"]),
        "steps": summary,
        "predictors": table,
        "seconds": {"ches": t_ches, "report_verify": t_rep, "total": time.perf_counter() - t0},
        "per_pair": cols,
    }
    (out / "results.json").write_text(json.dumps(result, indent=1))
    for step, v in summary.items():
        print(
            f"{step}: {result['n_pairs']} pairs; displaced (measured δS_w < 0) {v['displaced_fraction']:.3f}; "
            f"first-order sign agreement {v['first_order_sign_agreement']:.3f}"
        )
    for name, r in table.items():
        lo, hi = r["auc_ci95"]
        slo, shi = r["spearman_ci95"]
        print(
            f"{name:18s} AUC {r['auc']:.3f} [{lo:.3f}, {hi:.3f}]   "
            f"Spearman {r['spearman']:+.3f} [{slo:+.3f}, {shi:+.3f}]"
        )
    print(f"time: CHES {t_ches:.1f}s, report+verify {t_rep:.1f}s; results: {out / 'results.json'}")
    return result


if __name__ == "__main__":
    main()
