"""Gradient entanglement of a few preference pairs: does one DPO step on a pair lower its chosen log-prob?

Yuan et al. 2024 (arXiv 2410.13828): a margin loss moves ``θ`` along ``d_w ∇_w − d_l ∇_l`` (``∇_w``, ``∇_l`` the
gradients of the chosen / rejected sequence log-probs ``S_w``, ``S_l``). One SGD step of size ``η`` on a pair
changes them, to first order, by

    δS_w ≈ η (d_w ‖∇_w‖² − d_l ⟨∇_w,∇_l⟩)        δS_l ≈ η (d_w ⟨∇_w,∇_l⟩ − d_l ‖∇_l‖²)

so with DPO's equal weights the chosen log-prob FALLS when ``⟨∇_w,∇_l⟩ > ‖∇_w‖²`` and the rejected one RISES
when ``⟨∇_w,∇_l⟩ > ‖∇_l‖²`` (``ratio = ⟨∇_w,∇_l⟩ / min(‖∇_w‖², ‖∇_l‖²) > 1``: "entangled").

This script loads SmolLM2-135M-Instruct with a fresh LoRA adapter (policy == reference), collates ``--pairs``
HH-RLHF pairs and calls ``prefopt.diagnostics.entanglement`` once: per-pair gradients in one forward+backward,
the first-order predictions, and (``verify=True``) the change measured after actually taking each pair's step.
It prints one line per pair and writes ``entanglement.png`` (left: ``⟨∇_w,∇_l⟩`` against
``min(‖∇_w‖², ‖∇_l‖²)``, entangled pairs above the diagonal; right: predicted against measured ``δS``) and
``report.json``. The training study (four losses, many steps, statistics) is
``experiments/entanglement_smollm2.py``.

    python examples/entanglement.py --out runs/entanglement_pairs     # SmolLM2 + 8 HH-RLHF pairs: 5.5 min, 1 thread
    python examples/entanglement.py --smoke --out /tmp/ent_pairs      # tiny random model, built-in pairs
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from prefopt.data import PreferenceCollator, load_builtin_pairs, load_preferences
from prefopt.diagnostics import EntanglementReport, entanglement
from prefopt.policy import LoraPolicy

DEFAULT_DATA = (
    Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "hh-rlhf" / "helpful-base.test.jsonl.gz"
)
LOSSES = ("dpo", "ipo", "dpop", "decoupled")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """``--help``: the module docstring as written, every flag with its default."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="HH-RLHF-style jsonl(.gz) (implicit prompt)")
    ap.add_argument("--out", default="runs/entanglement_pairs", help="output folder (figure, report.json)")
    ap.add_argument("--pairs", type=int, default=8, help="preference pairs to diagnose")
    ap.add_argument("--loss", choices=LOSSES, default="dpo", help="the pairwise loss whose step is diagnosed")
    ap.add_argument("--beta", type=float, default=0.1, help="the loss's beta")
    ap.add_argument(
        "--eta", type=float, default=1e-3, help="SGD step size η of the predicted / measured step"
    )
    ap.add_argument("--max-length", type=int, default=96, help="prompt + completion tokens per row")
    ap.add_argument("--max-prompt-length", type=int, default=48, help="prompt tokens kept (its end)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the pair choice and of the adapter")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (0 = leave as is)")
    ap.add_argument("--smoke", action="store_true", help="tiny random model + built-in pairs")
    args = ap.parse_args(argv)
    if args.pairs < 1:
        ap.error("--pairs must be >= 1")
    if not args.eta > 0:
        ap.error("--eta must be > 0")
    if args.smoke:
        args.pairs, args.max_length, args.max_prompt_length = min(args.pairs, 4), 64, 40
    return args


def load(args: argparse.Namespace) -> tuple[Any, Any, list[dict[str, str]]]:
    """``(model, tokenizer, rows)``: SmolLM2 and HH-RLHF, or a tiny model and the built-in pairs (``--smoke``)."""
    if args.smoke:
        from prefopt.testing import char_tokenizer, tiny_causal_lm

        tok = char_tokenizer()
        model = tiny_causal_lm("llama", vocab_size=len(tok), hidden_size=32, num_layers=2, seed=args.seed)
        return model, tok, [dict(r) for r in load_builtin_pairs()]
    from prefopt.models import load_smollm2

    data = Path(args.data)
    if not data.is_file():
        raise SystemExit(f"--data: no such file {data} (HH-RLHF jsonl.gz; see ../shared/data/README.md)")
    model, tok = load_smollm2()
    return model, tok, [dict(r) for r in load_preferences(str(data), format="implicit")]


def per_pair_rows(rep: EntanglementReport) -> list[dict[str, float]]:
    """One dict per pair: the report's numbers as plain floats (printed, plotted and saved)."""
    fields = {
        "inner": rep.inner,
        "chosen_sqnorm": rep.chosen_sqnorm,
        "rejected_sqnorm": rep.rejected_sqnorm,
        "cosine": rep.cosine,
        "ratio": rep.ratio,
        "pred_dchosen": rep.pred_dchosen,
        "pred_drejected": rep.pred_drejected,
        "measured_dchosen": rep.measured_dchosen,
        "measured_drejected": rep.measured_drejected,
    }
    b = rep.inner.shape[0]
    return [{k: float(v[i]) for k, v in fields.items() if v is not None} for i in range(b)]


def print_table(rows: list[dict[str, float]]) -> None:
    head = f"{'pair':>4}{'cos':>8}{'ratio':>8}{'pred δS_w':>11}{'meas δS_w':>11}{'pred δS_l':>11}{'meas δS_l':>11}"
    print(head + "  verdict")
    print("-" * (len(head) + 30))
    for i, r in enumerate(rows):
        verdict = []
        if r["pred_dchosen"] < 0:
            verdict.append("chosen falls")
        if r["pred_drejected"] > 0:
            verdict.append("rejected rises")
        print(
            f"{i:>4}{r['cosine']:>+8.3f}{r['ratio']:>8.2f}{r['pred_dchosen']:>+11.4f}"
            f"{r.get('measured_dchosen', float('nan')):>+11.4f}{r['pred_drejected']:>+11.4f}"
            f"{r.get('measured_drejected', float('nan')):>+11.4f}  {', '.join(verdict) or 'ideal'}"
        )


def plot(rows: list[dict[str, float]], out: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    small = [min(r["chosen_sqnorm"], r["rejected_sqnorm"]) for r in rows]
    inner = [r["inner"] for r in rows]
    left.scatter(small, inner, c=["C3" if r["ratio"] > 1 else "C0" for r in rows])
    for i, (x, y) in enumerate(zip(small, inner)):
        left.annotate(str(i), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    lim = max([*small, *inner, 1e-12])
    left.plot([0, lim], [0, lim], color="grey", lw=0.8, label="ratio = 1")
    left.set(xlabel="min(‖∇_w‖², ‖∇_l‖²)", ylabel="⟨∇_w, ∇_l⟩", title="entangled above the line (red)")
    left.legend(fontsize=7)
    if "measured_dchosen" in rows[0]:
        for key, mark, name in (("chosen", "o", "chosen δS_w"), ("rejected", "x", "rejected δS_l")):
            pred = [r[f"pred_d{key}"] for r in rows]
            right.scatter(pred, [r[f"measured_d{key}"] for r in rows], marker=mark, label=name)
        span = max(abs(r[k]) for r in rows for k in ("pred_dchosen", "pred_drejected")) or 1.0
        right.plot([-span, span], [-span, span], color="grey", lw=0.8)
        right.axhline(0.0, color="grey", lw=0.5)
        right.axvline(0.0, color="grey", lw=0.5)
        right.set(xlabel="predicted δS (first order)", ylabel="measured δS", title="one SGD step per pair")
        right.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = out / "entanglement.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model, tok, rows = load(args)
    policy = LoraPolicy(model, anchor=False)  # policy == reference: the LoRA B factors start at 0

    # a seeded choice of pairs; the collator drops pairs it cannot use (identical after truncation, ...)
    random.Random(args.seed).shuffle(rows)
    collate = PreferenceCollator(tok, max_length=args.max_length, max_prompt_length=args.max_prompt_length)
    keep = ("prompt", "chosen", "rejected")
    batch = collate([{k: r[k] for k in keep} for r in rows[: 2 * args.pairs]])
    batch = batch.select(slice(0, args.pairs))

    rep = entanglement(policy, batch, loss=args.loss, eta=args.eta, verify=True, beta=args.beta)
    seconds = time.perf_counter() - t0
    pair_rows = per_pair_rows(rep)
    name = "tiny random model (smoke)" if args.smoke else "SmolLM2-135M-Instruct + LoRA"
    print(
        f"{name}: {batch.num_pairs} pairs, loss {args.loss} (beta {args.beta}), one SGD step of η = {args.eta} "
        f"per pair on {rep.num_params:,} LoRA parameters; {seconds:.0f}s\n"
    )
    print_table(pair_rows)
    summary = rep.summary()
    print(
        f"\nmean cosine {summary['cosine/mean']:+.3f}; chosen predicted to fall on "
        f"{summary['chosen_falls/frac']:.0%} of the pairs (measured {summary['measured_chosen_falls/frac']:.0%}), "
        f"rejected predicted to rise on {summary['rejected_rises/frac']:.0%} "
        f"(measured {summary['measured_rejected_rises/frac']:.0%})"
    )
    figure = plot(pair_rows, out, f"{name}, {args.loss}, η = {args.eta}")
    result = {
        "config": vars(args),
        "seconds": seconds,
        "summary": summary,
        "pairs": pair_rows,
        "figure": str(figure),
    }
    (out / "report.json").write_text(json.dumps(result, indent=1, allow_nan=True))
    print(f"figure: {figure}; report: {out / 'report.json'}")
    return result


if __name__ == "__main__":
    main()
