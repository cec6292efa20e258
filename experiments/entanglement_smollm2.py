"""Gradient entanglement on real data, a study: DPO and the three remedies, trained from the same start on the same batches.

(The first look at one batch — the report of a few pairs and its plot — is ``examples/entanglement.py``.)

Yuan et al. 2024 (arXiv 2410.13828): a margin loss moves ``θ`` along ``d_w ∇_w − d_l ∇_l``; when the chosen and
rejected gradients are aligned (``⟨∇_w,∇_l⟩ > min(‖∇_w‖², ‖∇_l‖²)``) the chosen log-prob falls or the rejected
one rises. This script trains a LoRA adapter on SmolLM2-135M-Instruct with HH-RLHF pairs (``--data``) and, for
each loss in ``--losses`` (default ``dpo``, ``pairwise_normalized``, ``decoupled``, ``token_masked``):

* starts from the same adapter (policy == reference) and takes the same ``--steps`` optimizer steps on the
  same pre-collated batches of ``--batch`` pairs;
* before every step computes the per-row gradients ``G`` ``(2B, P)`` of the sequence log-probs ``S`` over the
  LoRA parameters in ONE forward+backward (``prefopt.diagnostics.per_row_gradients``), and from them the
  ``EntanglementReport`` of the step (same numbers as ``prefopt.diagnostics.entanglement``;
  ``pairwise_normalized`` takes its gradient norms from it);
* for the losses that are functions of ``(S_w, S_l)`` the step's gradient is ``(∂L/∂S)ᵀ G`` — no second
  backward; ``token_masked`` (a function of per-token log-probs) runs its own forward+backward;
* after the step measures ``δS = S(θ⁺) − S(θ)`` on the batch and compares its sign with two predictions:
  ``pair`` — the diagnostic's own first-order prediction (one SGD step on the pair alone, ``pred_dchosen`` /
  ``pred_drejected``; what a user reading the report would conclude), and ``step`` — the first-order change
  ``G_i · Δθ`` of the step actually taken (Adam, whole batch);
* tracks the held-out chosen / rejected log-probs (vs the reference), the margin and the preference accuracy.

Writes ``logps.png`` (held-out Δ log-probs), ``margin.png`` (margin and accuracy), ``results.json`` and
prints a table.

    python experiments/entanglement_smollm2.py --out runs/entanglement --steps 8 --eval-every 4   # SmolLM2 + HH-RLHF: 18 min (2 busy cores)
    python experiments/entanglement_smollm2.py --smoke --out /tmp/ent           # tiny model, built-in pairs, 2 steps
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from prefopt.data import (
    PreferenceCollator,
    load_builtin_pairs,
    load_pointwise,
    load_preferences,
    pairs_from_pointwise,
)
from prefopt.diagnostics import EntanglementReport, loss_weights, per_row_gradients
from prefopt.diagnostics.pergrad import resolve_params
from prefopt.logprobs import token_logps
from prefopt.losses.decoupled import shared_token_mask
from prefopt.masked import seq_sum
from prefopt.policy import LoraPolicy
from prefopt.registry import get_loss
from prefopt.types import PairBatch, PairLogps

DEFAULT_DATA = (
    Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "hh-rlhf" / "helpful-base.test.jsonl.gz"
)
LOSSES = ("dpo", "pairwise_normalized", "decoupled", "token_masked")
SEQ_LOSSES = ("dpo", "pairwise_normalized", "decoupled")  # functions of (S_w, S_l): step = (∂L/∂S)ᵀ G


# ----------------------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------------------


def make_batches(
    rows: Sequence[dict[str, str]], collate: PreferenceCollator, sizes: Sequence[int], seed: int
) -> list[PairBatch]:
    """One batch per entry of ``sizes`` with exactly that many valid pairs; rows are drawn without replacement
    in a seeded random order, so batches are disjoint (a row the collator would drop — identical after
    truncation, ... — is skipped)."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    it = iter(order)
    batches = []
    for pairs in sizes:
        picked: list[dict[str, str]] = []
        while len(picked) < pairs:
            try:
                i = next(it)
            except StopIteration:
                raise ValueError(
                    f"not enough valid pairs for batches of sizes {list(sizes)} ({len(rows)} rows)"
                ) from None
            row = {k: rows[i][k] for k in ("prompt", "chosen", "rejected")}
            try:
                ok = collate([row]).num_pairs == 1
            except ValueError:  # the collator refuses a batch whose every row is bad
                ok = False
            if ok:
                picked.append(row)
        batches.append(collate(picked))
    return batches


# ----------------------------------------------------------------------------------------------------------
# one diagnosed step
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepDiagnosis:
    """Per-row gradients ``flat`` ``(2B, P)`` float64 (parameters in ``named`` order), the sequence log-probs
    ``values`` ``(2B,)`` they belong to, and the report built from them."""

    report: EntanglementReport
    flat: Tensor
    values: Tensor


def pair_loss_fn(
    name: str, beta: float, norms: tuple[Tensor, Tensor] | None = None
) -> Callable[[PairLogps], Any]:
    """The loss of ``name`` as a function of ``PairLogps`` (``pairwise_normalized`` gets its gradient norms)."""
    fn = get_loss(name, beta=beta)
    if name == "pairwise_normalized":
        if norms is None:
            raise ValueError("pairwise_normalized needs the per-pair gradient norms")
        n_w, n_l = norms
        return lambda lp: fn(lp, n_w.to(lp.chosen.dtype), n_l.to(lp.chosen.dtype))
    return fn


def diagnose(
    model: nn.Module,
    named: list[tuple[str, nn.Parameter]],
    batch: PairBatch,
    ref_seq: Tensor,
    *,
    loss: str,
    beta: float,
    eta: float,
) -> StepDiagnosis:
    """The ``EntanglementReport`` of ``loss`` on ``batch`` plus the per-row gradients, in one
    forward+backward. The report's weights ``d_w, d_l`` are those of ``loss`` (for ``pairwise_normalized``
    ``d/‖∇_w‖`` and ``d/‖∇_l‖``; for ``token_masked``, not a function of ``S``, DPO's)."""
    ids, am, cm = batch.input_ids, batch.attention_mask, batch.completion_mask
    b = ids.shape[0] // 2

    def forward() -> Tensor:
        lp = token_logps(model, ids, am, cm)
        return seq_sum(lp, cm)

    rg = per_row_gradients(model, forward, 2 * b, named, flat=True)
    assert rg.flat is not None
    gram = rg.flat @ rg.flat.T
    nw, nl = gram.diagonal()[:b], gram.diagonal()[b:]  # ‖∇_w‖², ‖∇_l‖²
    seq = rg.values.double()
    lens = cm.sum(dim=1)
    logps = PairLogps(
        chosen=seq[:b],
        rejected=seq[b:],
        ref_chosen=ref_seq[:b].double(),
        ref_rejected=ref_seq[b:].double(),
        chosen_len=lens[:b],
        rejected_len=lens[b:],
    )
    weight_loss = loss if loss in SEQ_LOSSES else "dpo"
    fn = pair_loss_fn(weight_loss, beta, (nw.sqrt(), nl.sqrt()))
    d_w, d_l, loss_val = loss_weights(fn, logps)
    report = EntanglementReport.from_gram(
        gram,
        logps,
        d_w,
        d_l,
        loss_val,
        eta=eta,
        loss_name=weight_loss,
        reference="given",
        num_params=sum(p.numel() for _, p in named),
        fallback=rg.fallback,
    )
    return StepDiagnosis(report=report, flat=rg.flat, values=rg.values)


def seq_loss_gradient(diag: StepDiagnosis, loss: str, beta: float) -> tuple[Tensor, float]:
    """``(∇_θ mean_i L_i, mean loss)`` for a loss of ``(S_w, S_l)``: ``(∂ mean L/∂S)ᵀ G`` ``(P,)`` float64."""
    rep = diag.report
    b = rep.inner.shape[0]
    s = diag.values.detach().double().requires_grad_(True)
    fn = pair_loss_fn(loss, beta, (rep.chosen_grad_norm, rep.rejected_grad_norm))
    out = fn(
        PairLogps(
            chosen=s[:b],
            rejected=s[b:],
            ref_chosen=rep.ref_chosen,
            ref_rejected=rep.ref_rejected,
        )
    )
    mean = out.loss.mean()
    (ds,) = torch.autograd.grad(mean, s)
    return ds @ diag.flat, float(mean.detach())


def set_grads(named: list[tuple[str, nn.Parameter]], flat: Tensor) -> None:
    """Write a flat ``(P,)`` gradient into ``p.grad`` (parameters in ``named`` order)."""
    total = sum(p.numel() for _, p in named)
    if flat.ndim != 1 or flat.numel() != total:
        raise ValueError(f"flat gradient has {flat.numel()} elements, the parameters {total}")
    off = 0
    for _, p in named:
        n = p.numel()
        p.grad = flat[off : off + n].view_as(p).to(p.dtype).clone()
        off += n


# ----------------------------------------------------------------------------------------------------------
# the experiment
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """Trajectories of one loss. Held-out lists are indexed by evaluation (``eval_steps``)."""

    loss: str
    eval_steps: list[int] = field(default_factory=list)
    chosen: list[float] = field(default_factory=list)  # held-out mean S_w − S_ref,w
    rejected: list[float] = field(default_factory=list)
    margin: list[float] = field(default_factory=list)  # held-out mean h
    accuracy: list[float] = field(default_factory=list)  # held-out fraction h > 0 (ties ½)
    train_loss: list[float] = field(default_factory=list)
    cosine: list[float] = field(default_factory=list)  # batch mean cos(∇_w, ∇_l) before each step
    ratio_gt1: list[float] = field(default_factory=list)  # fraction of pairs with ratio > 1
    # per step and pair: (pred_pair_w, pred_pair_l, pred_step_w, pred_step_l, meas_w, meas_l)
    changes: list[list[list[float]]] = field(default_factory=list)
    seconds: float = 0.0

    def agreement(self) -> dict[str, float]:
        """Sign-agreement rates of the two predictions with the measured change, and measured frequencies."""
        rows = [c for step in self.changes for c in step]
        if not rows:
            return {}
        t = torch.tensor(rows, dtype=torch.float64)
        pw, pl, sw, sl, mw, ml = t.unbind(1)

        def agree(a: Tensor, m: Tensor) -> float:
            return float((torch.sign(a) == torch.sign(m)).double().mean())

        out = {
            "n": float(t.shape[0]),
            "step_chosen": agree(sw, mw),
            "step_rejected": agree(sl, ml),
            "measured_chosen_falls": float((mw < 0).double().mean()),
            "measured_rejected_rises": float((ml > 0).double().mean()),
        }
        if self.loss in SEQ_LOSSES:
            out |= {
                "pair_chosen": agree(pw, mw),
                "pair_rejected": agree(pl, ml),
                "pred_chosen_falls": float((pw < 0).double().mean()),
                "pred_rejected_rises": float((pl > 0).double().mean()),
            }
        return out


def heldout_eval(model: nn.Module, held: PairBatch, ref_held: Tensor) -> tuple[float, float, float, float]:
    with torch.no_grad():
        s = seq_sum(
            token_logps(model, held.input_ids, held.attention_mask, held.completion_mask),
            held.completion_mask,
        )  # type: ignore[arg-type]
    b = s.shape[0] // 2
    rho = (s - ref_held).double()
    h = rho[:b] - rho[b:]
    acc = ((h > 0).double() + 0.5 * (h == 0).double()).mean()
    return float(rho[:b].mean()), float(rho[b:].mean()), float(h.mean()), float(acc)


def seq_logps_nograd(model: nn.Module, batch: PairBatch) -> tuple[Tensor, Tensor]:
    """``(token log-probs (2B, T), sequence sums (2B,))`` without grad."""
    with torch.no_grad():
        lp = token_logps(model, batch.input_ids, batch.attention_mask, batch.completion_mask)
        return lp, seq_sum(lp, batch.completion_mask)


def train_one(
    policy: LoraPolicy,
    loss: str,
    batches: list[PairBatch],
    refs: list[tuple[Tensor, Tensor]],
    held: PairBatch,
    ref_held: Tensor,
    args: argparse.Namespace,
) -> Run:
    model = policy.model
    named = resolve_params(model, None)
    params = [p for _, p in named]
    opt: torch.optim.Optimizer
    if args.optimizer == "adam":
        opt = torch.optim.Adam(params, lr=args.lr)
    else:
        opt = torch.optim.SGD(params, lr=args.lr)
    run = Run(loss=loss)

    def evaluate(step: int) -> None:
        c, r, m, a = heldout_eval(model, held, ref_held)
        run.eval_steps.append(step)
        run.chosen.append(c)
        run.rejected.append(r)
        run.margin.append(m)
        run.accuracy.append(a)

    evaluate(0)
    t0 = time.perf_counter()
    for step, (batch, (ref_tok, ref_seq)) in enumerate(zip(batches, refs, strict=True), start=1):
        diag = diagnose(model, named, batch, ref_seq, loss=loss, beta=args.beta, eta=args.eta)
        rep = diag.report
        before = [p.detach().clone() for p in params]
        opt.zero_grad(set_to_none=True)
        if loss in SEQ_LOSSES:
            grad, value = seq_loss_gradient(diag, loss, args.beta)
            set_grads(named, grad)
        else:
            cm = batch.completion_mask
            lp = token_logps(model, batch.input_ids, batch.attention_mask, cm)
            out = get_loss(loss, beta=args.beta)(lp, ref_tok, cm, shared_token_mask(batch))
            mean = out.loss.mean()
            mean.backward()
            value = float(mean)
        opt.step()
        delta = torch.cat(
            [(p.detach() - q).reshape(-1).double() for p, q in zip(params, before, strict=True)]
        )
        _, s_after = seq_logps_nograd(model, batch)
        measured = s_after.double() - diag.values.double()
        lin = diag.flat @ delta  # first-order change of every S_i under the step actually taken
        b = rep.inner.shape[0]
        run.changes.append(
            [
                [
                    float(rep.pred_dchosen[i]),
                    float(rep.pred_drejected[i]),
                    float(lin[i]),
                    float(lin[i + b]),
                    float(measured[i]),
                    float(measured[i + b]),
                ]
                for i in range(b)
            ]
        )
        run.train_loss.append(value)
        run.cosine.append(float(rep.cosine.nanmean()))
        run.ratio_gt1.append(float((rep.ratio > 1).double().mean()))
        if step % args.eval_every == 0 or step == len(batches):
            evaluate(step)
        print(
            f"  {loss:<20} step {step:>3}/{len(batches)}  loss {value:.4f}  cos {run.cosine[-1]:+.3f}  "
            f"ratio>1 {run.ratio_gt1[-1]:.2f}  δS_w {float(measured[:b].mean()):+.3f}  "
            f"δS_l {float(measured[b:].mean()):+.3f}  held-out margin {run.margin[-1]:+.3f}  "
            f"({time.perf_counter() - t0:.0f}s)",
            flush=True,
        )
    run.seconds = time.perf_counter() - t0
    return run


def plot(runs: Sequence[Run], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for i, r in enumerate(runs):
        ax.plot(r.eval_steps, r.chosen, color=f"C{i}", marker="o", ms=3, label=f"{r.loss}: chosen")
        ax.plot(
            r.eval_steps, r.rejected, color=f"C{i}", ls="--", marker="x", ms=3, label=f"{r.loss}: rejected"
        )
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set(
        xlabel="step", ylabel="held-out mean S − S_ref", title="held-out chosen (—) / rejected (--) log-probs"
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    p1 = out / "logps.png"
    fig.savefig(p1, dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, r in enumerate(runs):
        axes[0].plot(r.eval_steps, r.margin, color=f"C{i}", marker="o", ms=3, label=r.loss)
        axes[1].plot(r.eval_steps, r.accuracy, color=f"C{i}", marker="o", ms=3, label=r.loss)
    axes[0].set(xlabel="step", ylabel="held-out mean margin h = ρ_w − ρ_l", title="margin")
    axes[1].set(
        xlabel="step", ylabel="held-out preference accuracy", title="accuracy (h > 0)", ylim=(-0.05, 1.05)
    )
    for a in axes:
        a.legend(fontsize=7)
    fig.tight_layout()
    p2 = out / "margin.png"
    fig.savefig(p2, dpi=120)
    plt.close(fig)
    return [p1, p2]


def load(args: argparse.Namespace) -> tuple[nn.Module, Any, list[dict[str, str]]]:
    if args.smoke:
        from prefopt.testing import char_tokenizer, tiny_causal_lm

        tok = char_tokenizer()
        model = tiny_causal_lm("llama", vocab_size=len(tok), hidden_size=32, num_layers=2, seed=args.seed)
        rows = [dict(r) for r in load_builtin_pairs()]
        return model, tok, rows
    from prefopt.models import load_smollm2

    data = Path(args.data)
    if data.is_dir():  # Taskmaster-style pointwise rewards: same-context (good, bad) agent turns
        files = sorted(str(f) for f in data.glob("reward_*.json"))
        if not files:
            raise SystemExit(f"--data: folder {data} has no reward_*.json (Taskmaster pointwise rewards)")
        model, tok = load_smollm2()
        return model, tok, [dict(r) for r in pairs_from_pointwise(load_pointwise(files))]
    if not data.is_file():
        raise SystemExit(f"--data: no such file {data} (HH-RLHF jsonl.gz; see ../shared/data/README.md)")
    model, tok = load_smollm2()
    rows = [dict(r) for r in load_preferences(str(data), format="implicit")]
    return model, tok, rows


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """``--help``: the module docstring as written, every flag with its default."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument(
        "--data",
        default=str(DEFAULT_DATA),
        help="HH-RLHF-style jsonl(.gz) (implicit prompt), or a Taskmaster folder of reward_*.json (pointwise "
        "labels → same-context good/bad pairs, e.g. ../shared/data/taskmaster/coffee)",
    )
    ap.add_argument(
        "--out", default="runs/entanglement_smollm2", help="output folder (figures, results.json)"
    )
    ap.add_argument("--losses", default=",".join(LOSSES), help=f"comma-separated, from {', '.join(LOSSES)}")
    ap.add_argument("--steps", type=int, default=10, help="optimizer steps per loss")
    ap.add_argument("--batch", type=int, default=4, help="pairs per step")
    ap.add_argument("--heldout", type=int, default=8, help="held-out pairs")
    ap.add_argument("--eval-every", type=int, default=2, help="held-out evaluation every N steps")
    ap.add_argument("--max-length", type=int, default=96, help="prompt + completion tokens per row")
    ap.add_argument("--max-prompt-length", type=int, default=48, help="prompt tokens kept (its end)")
    ap.add_argument(
        "--optimizer", choices=("adam", "sgd"), default="adam", help="optimizer of the training steps"
    )
    ap.add_argument("--lr", type=float, default=None, help="default: 1e-3 (adam), 1e-2 (sgd)")
    ap.add_argument("--beta", type=float, default=0.1, help="DPO-family beta of every loss")
    ap.add_argument("--eta", type=float, default=1e-3, help="step size η of the diagnostic's prediction")
    ap.add_argument("--seed", type=int, default=0, help="seed of the data shuffle and the adapter")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (0 = leave as is)")
    ap.add_argument("--smoke", action="store_true", help="tiny random model + built-in pairs, 2 steps")
    args = ap.parse_args(argv)
    if args.smoke:
        args.steps, args.batch, args.heldout, args.eval_every = 2, 2, 4, 1
        args.max_length, args.max_prompt_length = 64, 40
    if args.lr is None:
        args.lr = 1e-3 if args.optimizer == "adam" else 1e-2
    losses = [s.strip() for s in args.losses.split(",") if s.strip()]
    bad = [s for s in losses if s not in LOSSES]
    if bad or not losses:
        ap.error(f"--losses: unknown {bad}; choose from {', '.join(LOSSES)}")
    args.loss_list = losses
    for name in ("steps", "batch", "heldout", "eval_every"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model, tok, rows = load(args)
    model.eval()  # LoRA dropout is 0 anyway; eval() makes every forward deterministic
    policy = LoraPolicy(model, anchor=False)  # no anchor adapter: this study never uses one
    collate = PreferenceCollator(tok, max_length=args.max_length, max_prompt_length=args.max_prompt_length)
    held, *batches = make_batches(rows, collate, [args.heldout] + [args.batch] * args.steps, args.seed)
    with policy.reference():
        _, ref_held = seq_logps_nograd(policy.model, held)
        refs = [seq_logps_nograd(policy.model, b) for b in batches]
    shared = [float(shared_token_mask(b)[b.completion_mask].eq(0).double().mean()) for b in batches]
    lens = torch.cat([b.completion_mask.sum(1) for b in batches]).double()
    print(
        f"model {'tiny (smoke)' if args.smoke else 'SmolLM2-135M-Instruct'}; "
        f"{policy.parameter_counts().trainable:,} LoRA parameters; {len(batches)} batches of {args.batch} pairs, "
        f"{held.input_ids.shape[0] // 2} held-out pairs; completion length mean {float(lens.mean()):.1f}; "
        f"shared-token fraction {sum(shared) / len(shared):.3f}; setup {time.perf_counter() - t0:.0f}s",
        flush=True,
    )
    start = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
    info = {"shared_token_fraction": sum(shared) / len(shared), "completion_len_mean": float(lens.mean())}
    runs: list[Run] = []
    for loss in args.loss_list:
        with torch.no_grad():
            for n, p in policy.named_parameters():
                if n in start:
                    p.copy_(start[n])
        runs.append(train_one(policy, loss, batches, refs, held, ref_held, args))
        result = write_results(runs, args, out, info | {"seconds_total": time.perf_counter() - t0})
    print_table(runs)
    print(f"figures: {', '.join(result['figures'])}; results: {out / 'results.json'}")
    if not all(math.isfinite(r.margin[-1]) for r in runs):
        raise SystemExit("non-finite held-out margin")
    return result


def summarize(r: Run) -> dict[str, Any]:
    return {
        "heldout_final": {
            "chosen": r.chosen[-1],
            "rejected": r.rejected[-1],
            "margin": r.margin[-1],
            "accuracy": r.accuracy[-1],
        },
        "agreement": r.agreement(),
        "mean_cosine": sum(r.cosine) / len(r.cosine),
        "mean_ratio_gt1": sum(r.ratio_gt1) / len(r.ratio_gt1),
        "seconds_per_step": r.seconds / len(r.train_loss),
    }


def write_results(
    runs: Sequence[Run], args: argparse.Namespace, out: Path, info: dict[str, Any]
) -> dict[str, Any]:
    """Figures and ``results.json`` for the runs so far (called after every loss, so a cut run keeps its part)."""
    figures = plot(runs, out)
    result = {
        "config": {k: v for k, v in vars(args).items() if k != "loss_list"} | {"losses": args.loss_list},
        **info,
        "summary": {r.loss: summarize(r) for r in runs},
        "runs": [vars(r) for r in runs],
        "figures": [str(p) for p in figures],
    }
    (out / "results.json").write_text(json.dumps(result, indent=1, allow_nan=True))
    return result


def print_table(runs: Sequence[Run]) -> None:
    print(
        "\nheld-out after training (Δ vs reference) and sign agreement of predicted vs measured δS on the batch:"
    )
    head = (
        f"{'loss':<20}{'Δchosen':>9}{'Δrejected':>10}{'margin':>8}{'acc':>6}"
        f"{'pair✓w':>8}{'pair✓l':>8}{'step✓w':>8}{'step✓l':>8}{'w fell':>8}{'l rose':>8}{'s/step':>8}"
    )
    print(head)
    print("-" * len(head))
    for r in runs:
        ag = r.agreement()

        def f(key: str, ag: dict[str, float] = ag) -> str:
            return f"{ag[key]:>8.2f}" if key in ag else f"{'n/a':>8}"

        print(
            f"{r.loss:<20}{r.chosen[-1]:>+9.3f}{r.rejected[-1]:>+10.3f}{r.margin[-1]:>+8.3f}{r.accuracy[-1]:>6.2f}"
            f"{f('pair_chosen')}{f('pair_rejected')}{f('step_chosen')}{f('step_rejected')}"
            f"{f('measured_chosen_falls')}{f('measured_rejected_rises')}{r.seconds / len(r.train_loss):>8.1f}"
        )


if __name__ == "__main__":
    main()
