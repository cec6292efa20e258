"""Benchmark the gradient-entanglement diagnostics against the naive loops and a training step.

Side by side in one run, A/B alternating, medians over ``--repeats``:

* ``report``  — ``prefopt.diagnostics.entanglement`` on ``B`` pairs (one forward + one backward with
  per-row hooks, plus the reference forward);
* ``ches``    — ``prefopt.diagnostics.displacement.ches_scores`` on the same ``B`` pairs (one no-grad forward of
  the backbone, adapter on: the same model the report differentiates);
* ``screen``  — ``prefopt.diagnostics.displacement.ches_and_logps`` (CHES + both sequence log-probs from one
  forward: what ``prefopt diagnose`` runs per batch);
* ``screen_shared`` — ``ches_and_logps(..., share_prompt=True)``: each pair's prompt once, both responses on its
  KV cache (one pair at a time); the same numbers;
* ``ches_base`` — ``ches_scores`` with the adapter switched off (``policy.reference()``): at a fresh adapter
  (``B = 0``, as in ``prefopt diagnose``) switching it off changes no number (here the adapter is random, so
  only the time compares);
* ``screen_cli`` — what ``prefopt diagnose`` runs per batch of long prompts: ``ches_and_logps(...,
  share_prompt=True)`` with the adapter off;
* ``step``    — one DPO training step on the same batch (reference forward, policy forward+backward of the
  DPO loss, AdamW step);
* ``loop``    — the naive per-pair report: reference forward, policy forward, ``2B`` backward passes on the
  retained graph, flattened gradients, inner products by hand;
* ``token``   — ``prefopt.diagnostics.token_gradient_correlation`` on one pair of length ``--token-len``
  (default ``method="auto"``: one forward + batched VJPs w.r.t. the recorded LoRA-layer outputs);
* ``token_copies`` — the same with ``method="copies"`` (truncated copies of the row, the previous engine);
* ``token_loop`` — the fair oracle a user would write: one forward of the pair, one
  ``autograd.grad(..., retain_graph=True)`` per completion token, flattened gradients, cosines by hand.

Ratios: ``report_vs_ches = report / ches``, ``report_vs_screen_cli`` (issue 14 asks ≥ 50; see docs/displacement.md for why a forward
cannot be 50× cheaper than a forward + backward), ``report_vs_screen``, ``report_vs_ches_base``,
``report_vs_step = report / step`` (goal ≤ 3), ``speedup_vs_loop = loop / report`` (goal ≥ 4),
``token_speedup_vs_loop = token_loop / token`` (goal ≥ 10), ``token_copies_vs_loop = token_loop / token_copies``.

    python benchmarks/diagnostics.py --json out.json          # small-but-not-tiny Llama + LoRA, CPU
    python benchmarks/diagnostics.py --quick                  # smaller model, 1 repeat (~1 min on 2 cores)
    python benchmarks/diagnostics.py --token-only             # only the per-token engines and their loop
    python benchmarks/diagnostics.py --ches-only              # only ches / screen / ches_base / report / step
    python benchmarks/diagnostics.py --real                   # SmolLM2-135M-Instruct (prefopt.models)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import peft
import torch

from prefopt.diagnostics import entanglement, token_gradient_correlation
from prefopt.diagnostics.displacement import ches_and_logps, ches_scores
from prefopt.logprobs import token_logps
from prefopt.masked import seq_sum
from prefopt.policy import LoraPolicy
from prefopt.registry import get_loss
from prefopt.types import PairLogps


def build(args: argparse.Namespace) -> tuple[LoraPolicy, int]:
    torch.manual_seed(0)  # the random LoRA init below (init_lora_weights=False) is then the same every run
    if args.real:
        from prefopt.models import load_smollm2

        model, _ = load_smollm2()
        vocab = int(model.config.vocab_size)
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(
            vocab_size=args.vocab,
            hidden_size=args.hidden,
            num_hidden_layers=args.layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=2 * args.hidden,
            max_position_embeddings=1024,
        )
        model = LlamaForCausalLM(cfg)
        vocab = args.vocab
    model.eval()
    lora = peft.LoraConfig(
        r=args.rank,
        lora_alpha=2 * args.rank,
        target_modules="all-linear",
        lora_dropout=0.0,
        bias="none",
        init_lora_weights=False,
    )
    return LoraPolicy(model, lora), vocab


def make_batch(b: int, t: int, vocab: int, seed: int, prompt: int | None = None) -> dict[str, torch.Tensor]:
    """``b`` pairs of rows of length ``t`` whose first ``prompt`` tokens (default ``t // 2``) are a shared
    prompt and the rest the completion."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (2 * b, t), generator=g)
    prompt = t // 2 if prompt is None else prompt
    ids[b:, :prompt] = ids[:b, :prompt]
    cm = torch.zeros(2 * b, t, dtype=torch.bool)
    cm[:, prompt:] = True
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": cm}


def seq(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return seq_sum(
        token_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"]),
        batch["completion_mask"],
    )


def train_step(policy: LoraPolicy, batch: dict[str, torch.Tensor], opt: torch.optim.Optimizer) -> None:
    b = batch["input_ids"].shape[0] // 2
    with policy.reference():
        ref = seq(policy.model, batch)
    s = seq(policy.model, batch)
    out = get_loss("dpo", beta=0.1)(
        PairLogps(chosen=s[:b], rejected=s[b:], ref_chosen=ref[:b], ref_rejected=ref[b:])
    )
    out.loss.mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def loop_report(policy: LoraPolicy, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    params = policy.trainable_parameters()
    b = batch["input_ids"].shape[0] // 2
    with policy.reference():
        seq(policy.model, batch)
    s = seq(policy.model, batch)
    rows = []
    for i in range(2 * b):
        gi = torch.autograd.grad(s[i], params, retain_graph=True)
        rows.append(torch.cat([g.reshape(-1) for g in gi]).double())
    gr = torch.stack(rows)
    return (gr[:b] * gr[b:]).sum(1)


def token_loop(policy: LoraPolicy, batch: dict[str, torch.Tensor], index: int) -> torch.Tensor:
    params = policy.trainable_parameters()
    b = batch["input_ids"].shape[0] // 2
    rows = [index, index + b]
    sub = {k: v[rows] for k, v in batch.items()}
    lp = token_logps(policy.model, sub["input_ids"], sub["attention_mask"], sub["completion_mask"])
    grads = []
    for r in (0, 1):
        for t in sub["completion_mask"][r].nonzero().flatten().tolist():
            gi = torch.autograd.grad(lp[r, t], params, retain_graph=True)
            grads.append(torch.cat([g.reshape(-1) for g in gi]).double())
    gr = torch.stack(grads)
    n = gr.norm(dim=1)
    return (gr @ gr.T) / (n[:, None] * n[None])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument(
        "--prompt-len", type=int, default=None, help="shared prompt tokens per pair (default: half)"
    )
    ap.add_argument("--token-len", type=int, default=64, help="completion tokens T_w = T_l of the token pair")
    ap.add_argument("--token-prompt", type=int, default=32, help="prompt tokens before them")
    ap.add_argument("--token-chunk", type=int, default=None, help="chunk_rows of the token engine")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = leave as is)")
    ap.add_argument("--real", action="store_true", help="SmolLM2-135M-Instruct instead of the random Llama")
    ap.add_argument("--json", type=str, default=None, help="write the figures to this path")
    ap.add_argument(
        "--quick", action="store_true", help="hidden 128, 2 layers, vocab 4096, 4 pairs of 64, 1 repeat"
    )
    ap.add_argument("--token-only", action="store_true", help="time only token / token_copies / token_loop")
    ap.add_argument(
        "--ches-only",
        action="store_true",
        help="time only ches / screen / screen_shared / ches_base / screen_cli / report / step",
    )
    args = ap.parse_args()
    if args.quick:
        args.hidden, args.layers, args.vocab, args.pairs, args.seq_len, args.repeats = 128, 2, 4096, 4, 64, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    policy, vocab = build(args)
    batch = make_batch(args.pairs, args.seq_len, vocab, seed=0, prompt=args.prompt_len)
    tbatch = make_batch(1, args.token_prompt + args.token_len, vocab, seed=1, prompt=args.token_prompt)
    tkw = {} if args.token_chunk is None else {"chunk_rows": args.token_chunk}
    # lr = 0: the step does all its work but leaves the adapter unchanged, so every timed call sees the same point
    opt = torch.optim.AdamW(policy.trainable_parameters(), lr=0.0, weight_decay=0.0)

    def ches_base() -> Any:
        with policy.reference():
            return ches_scores(policy, batch)

    def screen_cli() -> Any:
        with policy.reference():
            return ches_and_logps(policy, batch, share_prompt=True)

    fns: dict[str, Callable[[], Any]] = {
        "ches": lambda: ches_scores(policy, batch),
        "screen": lambda: ches_and_logps(policy, batch),
        "screen_shared": lambda: ches_and_logps(policy, batch, share_prompt=True),
        "ches_base": ches_base,
        "screen_cli": screen_cli,
        "report": lambda: entanglement(policy, batch),
        "step": lambda: train_step(policy, batch, opt),
        "loop": lambda: loop_report(policy, batch),
        "token": lambda: token_gradient_correlation(policy, tbatch, 0, **tkw),
        "token_copies": lambda: token_gradient_correlation(policy, tbatch, 0, method="copies"),
        "token_loop": lambda: token_loop(policy, tbatch, 0),
    }
    if args.token_only:
        fns = {k: v for k, v in fns.items() if k.startswith("token")}
    if args.ches_only:
        fns = {
            k: v
            for k, v in fns.items()
            if k in ("ches", "screen", "screen_shared", "ches_base", "screen_cli", "report", "step")
        }
    for k in ("ches", "report", "token", "token_copies"):  # warm-up (first-call overheads)
        if k in fns:
            fns[k]()
    times: dict[str, list[float]] = {k: [] for k in fns}
    first: dict[str, Any] = {}
    for rep_i in range(args.repeats):
        order = list(fns) if rep_i % 2 == 0 else list(reversed(fns))  # A/B alternating
        for k in order:
            t0 = time.perf_counter()
            out = fns[k]()
            times[k].append(time.perf_counter() - t0)
            first.setdefault(k, out)
    # sanity: the fast paths equal the loops on this model
    med = {k: statistics.median(v) for k, v in times.items()}
    result: dict[str, Any] = {
        "config": {
            "model": "SmolLM2-135M-Instruct"
            if args.real
            else f"Llama h{args.hidden} L{args.layers} V{vocab}",
            "pairs": args.pairs,
            "seq_len": args.seq_len,
            "prompt_len": args.prompt_len if args.prompt_len is not None else args.seq_len // 2,
            "token_len": args.token_len,
            "token_prompt": args.token_prompt,
            "rank": args.rank,
            "trainable_params": sum(p.numel() for p in policy.trainable_parameters()),
            "threads": torch.get_num_threads(),
            "repeats": args.repeats,
        },
        "median_s": med,
        "per_pair_s": {k: v / args.pairs for k, v in med.items() if not k.startswith("token")},
    }
    if "token" in med:
        tw = first["token"].matrix.shape[0]
        result["token_speedup_vs_loop"] = med["token_loop"] / med["token"]
        result["token_copies_vs_loop"] = med["token_loop"] / med["token_copies"]
        result["max_abs_err_token_cos"] = float(
            (first["token"].matrix - first["token_loop"][:tw, tw:]).abs().max()
        )
        result["max_abs_err_token_copies_cos"] = float(
            (first["token_copies"].matrix - first["token_loop"][:tw, tw:]).abs().max()
        )
    if "ches" in med:
        result["report_vs_ches"] = med["report"] / med["ches"]
        result["report_vs_screen"] = med["report"] / med["screen"]
        result["report_vs_ches_base"] = med["report"] / med["ches_base"]
        result["report_vs_screen_shared"] = med["report"] / med["screen_shared"]
        result["report_vs_screen_cli"] = med["report"] / med["screen_cli"]
        # the screen's CHES is ches_scores' and its log-probs are the report's (same adapter, no grad)
        s, sw, sl = first["screen"]
        result["max_abs_err_screen_ches"] = float((s.ches - first["ches"].ches).abs().max())
        rep_lp = torch.cat([first["report"].chosen_logp, first["report"].rejected_logp]).double()
        result["max_rel_err_screen_logp"] = float(
            ((torch.cat([sw, sl]).double() - rep_lp).abs() / rep_lp.abs().max()).max()
        )
        # share_prompt=True: the same scores up to float rounding
        sh, shw, shl = first["screen_shared"]
        result["max_rel_err_shared_ches"] = float(((sh.ches - s.ches).abs() / s.ches.abs().max()).max())
        result["max_abs_err_shared_logp"] = float(torch.cat([shw - sw, shl - sl]).abs().max())
    if "loop" in med:
        rep, inner = first["report"], first["loop"]
        result["speedup_vs_loop"] = med["loop"] / med["report"]
        result["max_rel_err_inner"] = float(((rep.inner - inner).abs() / inner.abs().clamp(min=1e-12)).max())
    if "step" in med:
        result["report_vs_step"] = med["report"] / med["step"]
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
