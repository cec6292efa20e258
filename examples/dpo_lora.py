"""DPO (or any registered pairwise loss) with a LoRA policy on HH-RLHF pairs, in one readable file.

Rafailov et al. 2023 (arXiv 2305.18290, Eq. 7): ``−log σ(β[(S_w − S^ref_w) − (S_l − S^ref_l)])`` with sequence
log-probs ``S`` of the chosen (``w``) and rejected (``l``) completions. The policy is a LoRA adapter on
SmolLM2-135M-Instruct; the reference is the same backbone with adapters off (``policy.reference()``), so one
copy of the weights serves both. Any pairwise loss of the registry works: ``--loss ipo --hp beta=0.5``,
``--loss simpo --hp beta=2.0 --hp gamma_beta_ratio=0.5`` (reference-free losses skip the reference forward).

``--shared-prompt`` runs each prompt once and both completions on its key/value cache
(:mod:`prefopt.shared_prefix`, exact), instead of the prompt twice.

Held-out preference accuracy (first ``--eval-pairs`` pairs of the shuffled file, never trained on):
``reward_accuracy`` = fraction with ``(S_w − S^ref_w) > (S_l − S^ref_l)`` (strict, as TRL's
``rewards/accuracies``: 0 before training, where policy = reference), ``logp_accuracy`` = fraction with
``S_w > S_l`` and ``mean_logp_accuracy`` = fraction with ``S_w/|y_w| > S_l/|y_l|`` (meaningful from step 0).

    python examples/dpo_lora.py --steps 150 --batch-size 4 --max-length 256 --shared-prompt --out runs/dpo
    python examples/dpo_lora.py --smoke --out /tmp/dpo            # tiny random model + char tokenizer, 2 steps

Checkpoints and resume: ``--save-every N`` writes ``OUT/checkpoints/step-…`` atomically
(:mod:`prefopt.checkpoint`: adapter, optimizer, RNG states, data order, metrics so far); ``--resume OUT``
continues from the latest one and reproduces the uninterrupted run's losses exactly. An existing, non-empty
``--out`` is refused unless ``--overwrite`` (or ``--resume`` a checkpoint inside it).

    python examples/dpo_lora.py --steps 150 --save-every 25 --out runs/dpo
    python examples/dpo_lora.py --steps 150 --save-every 25 --out runs/dpo --resume runs/dpo   # after a crash
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import time
from pathlib import Path
from typing import Any

import peft
import torch
from tqdm import tqdm

from prefopt.checkpoint import load_training_state, prepare_run_dir, save_training_state
from prefopt.data import PreferenceCollator, SharedPromptCollator, load_builtin_pairs, load_preferences
from prefopt.logprobs import pair_logps
from prefopt.policy import LoraPolicy
from prefopt.registry import available_losses, get_loss, get_spec
from prefopt.types import PairBatch, SharedPromptBatch

DEFAULT_DATA = Path(__file__).resolve().parents[1] / "../shared/data/hh-rlhf/helpful-base.test.jsonl.gz"


def pairwise_losses() -> list[str]:
    """Registered losses that take a ``PairLogps`` and nothing else (the registry's input kind ``"pairs"``)."""
    return [n for n in available_losses() if get_spec(n).inputs == "pairs" and not get_spec(n).required_data]


def parse_hp(items: list[str]) -> dict[str, Any]:
    """``["beta=0.1", "f_divergence=forward_kl"]`` → ``{"beta": 0.1, "f_divergence": "forward_kl"}``."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--hp expects key=value, got {item!r}")
        try:
            out[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            out[key] = raw  # a bare string such as forward_kl
    return out


def load_model_and_rows(args: argparse.Namespace) -> tuple[Any, Any, list[dict], list[dict]]:
    if args.smoke:
        from prefopt.testing import char_tokenizer, tiny_causal_lm

        tok = char_tokenizer()
        model = tiny_causal_lm("llama", vocab_size=len(tok), seed=args.seed, hidden_size=32)
        ds = load_builtin_pairs()
    else:
        from prefopt.models import load_smollm2

        model, tok = load_smollm2()
        ds, report = load_preferences(args.data, return_report=True)
        if not report.n_skipped:  # with skipped rows the loader has logged this very line already
            print(report.summary())
    rows = [dict(r) for r in ds]
    random.Random(args.seed).shuffle(rows)
    return model, tok, rows[args.eval_pairs :], rows[: args.eval_pairs]


@torch.no_grad()
def evaluate(
    policy: LoraPolicy, loss_fn: Any, batches: list[PairBatch] | list[SharedPromptBatch]
) -> dict[str, float]:
    was_training = policy.model.training
    policy.model.eval()
    keys = ("loss", "reward_accuracy", "logp_accuracy", "mean_logp_accuracy", "margin")
    sums = dict.fromkeys(keys, 0.0)
    n = 0
    for batch in batches:
        lp = pair_logps(policy, batch)  # the reference (adapters off, no grad) runs first
        rho_w, rho_l = lp.chosen - lp.ref_chosen, lp.rejected - lp.ref_rejected  # type: ignore[operator]
        assert lp.chosen_len is not None and lp.rejected_len is not None
        sums["loss"] += float(loss_fn(lp).loss.sum())
        sums["reward_accuracy"] += float((rho_w > rho_l).float().sum())
        sums["logp_accuracy"] += float((lp.chosen > lp.rejected).float().sum())
        mean_w, mean_l = lp.chosen / lp.chosen_len, lp.rejected / lp.rejected_len
        sums["mean_logp_accuracy"] += float((mean_w > mean_l).float().sum())
        sums["margin"] += float((rho_w - rho_l).sum())
        n += lp.chosen.shape[0]
    policy.model.train(was_training)
    return {f"eval/{k}": v / max(n, 1) for k, v in sums.items()} | {"eval/pairs": float(n)}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """``--help``: the module docstring as written, every flag with its default."""


def metrics_writer(report_to: str, out: str) -> Any:
    """A TensorBoard ``SummaryWriter`` logging to ``OUT/tensorboard`` (``--report-to tensorboard``), or None."""
    if report_to == "none":
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise SystemExit(
            "--report-to tensorboard needs the tensorboard package: pip install 'prefopt-rlhf[tensorboard]'"
        ) from None
    return SummaryWriter(os.path.join(out, "tensorboard"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="JSONL(.gz) file or folder of HH-RLHF pairs")
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="tiny random model, char tokenizer, built-in pairs; 2 steps unless --steps is given",
    )
    ap.add_argument("--loss", default="dpo", help="any pairwise loss: " + ", ".join(pairwise_losses()))
    ap.add_argument(
        "--hp", action="append", default=[], metavar="KEY=VALUE", help="loss hyperparameter (repeatable)"
    )
    ap.add_argument(
        "--shared-prompt", action="store_true", help="run each prompt once, completions on its cache (exact)"
    )
    ap.add_argument("--steps", type=int, default=150, help="optimizer steps in all (a resumed run included)")
    ap.add_argument("--batch-size", type=int, default=4, help="pairs per step")
    ap.add_argument("--max-length", type=int, default=256, help="max tokens of prompt + completion")
    ap.add_argument("--max-prompt-length", type=int, default=192, help="max prompt tokens")
    ap.add_argument("--lr", type=float, default=5e-4, help="AdamW learning rate (constant)")
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank r (lora_alpha = 2r)")
    ap.add_argument("--eval-pairs", type=int, default=64, help="held-out pairs (never trained on)")
    ap.add_argument("--eval-every", type=int, default=0, help="also evaluate every N steps (0: start/end)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the shuffle, the data order and torch")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--out", default="runs/dpo_lora", help="adapter + metrics.jsonl + summary.json")
    ap.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty --out")
    ap.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: never)")
    ap.add_argument(
        "--resume",
        default=None,
        metavar="DIR",
        help="continue from a checkpoint folder, or from the latest checkpoint of a run folder",
    )
    ap.add_argument(
        "--report-to", default="none", choices=("none", "tensorboard"), help="also log metrics to TensorBoard"
    )
    args = ap.parse_args(argv)
    if args.smoke:
        if args.steps == ap.get_default("steps"):
            args.steps = 2
        args.batch_size, args.eval_pairs, args.threads = 2, 4, 1
        args.max_length, args.max_prompt_length = 96, 64
    for name in ("steps", "save_every", "eval_every"):
        if getattr(args, name) < 0:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 0")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.loss not in pairwise_losses():
        raise SystemExit(f"--loss must be a pairwise loss: {', '.join(pairwise_losses())}")
    loss_fn = get_loss(args.loss, **parse_hp(args.hp))  # validates the hyperparameters now
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    try:
        prepare_run_dir(args.out, overwrite=args.overwrite, resume=args.resume)
    except (FileExistsError, FileNotFoundError) as err:
        raise SystemExit(str(err)) from None
    writer = metrics_writer(args.report_to, args.out)

    model, tok, train_rows, eval_rows = load_model_and_rows(args)
    if args.resume:
        state = load_training_state(args.resume, model)
        policy = state.policy
        print(f"resuming from {state.path} (step {state.step})", flush=True)
    else:
        policy = LoraPolicy(
            model, peft.LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear")
        )
    opt = torch.optim.AdamW(policy.trainable_parameters(), lr=args.lr, weight_decay=0.0)
    collator_cls = SharedPromptCollator if args.shared_prompt else PreferenceCollator
    collate = collator_cls(tok, max_length=args.max_length, max_prompt_length=args.max_prompt_length)
    eval_batches = [collate(eval_rows[i : i + 8]) for i in range(0, len(eval_rows), 8)]

    rng = random.Random(args.seed + 1)  # the data order
    order: list[int] = []
    records: list[dict[str, Any]] = []  # every line of metrics.jsonl
    start = 0
    if args.resume:
        opt.load_state_dict(state.optimizer)
        start, order, records = state.step, state.extra["order"], state.extra["records"]
        rng.setstate(state.extra["data_rng"])
        state.restore_rng()
        before = {k: v for k, v in records[0].items() if k != "step"}
    else:
        before = evaluate(policy, loss_fn, eval_batches)
        records.append({"step": 0, **before})
        print("before:", json.dumps(before), flush=True)
    log = open(os.path.join(args.out, "metrics.jsonl"), "w")  # noqa: SIM115 (closed after the loop)
    for rec in records:
        log.write(json.dumps(rec) + "\n")

    policy.model.train()
    bar = tqdm(range(start + 1, args.steps + 1), desc=f"{args.loss}", disable=args.smoke, initial=start)
    for step in bar:
        t0 = time.perf_counter()
        if len(order) < args.batch_size:  # reshuffle at each epoch
            order += rng.sample(range(len(train_rows)), len(train_rows))
        batch = collate([train_rows[order.pop()] for _ in range(args.batch_size)])
        logps = pair_logps(policy, batch, reference=loss_fn.needs_reference)
        out = loss_fn(logps)
        loss = out.loss.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(policy.trainable_parameters(), 1.0)
        opt.step()
        rec = {
            "step": step,
            "loss": float(loss.detach()),
            **{k: float(v.float().mean()) for k, v in out.metrics.items()},
            "grad_norm": float(grad_norm),
            "tokens": int(batch.completion_mask.sum()),
            "seconds": time.perf_counter() - t0,
        }
        if args.eval_every and step % args.eval_every == 0 and step < args.steps:
            rec |= evaluate(policy, loss_fn, eval_batches)
        records.append(rec)
        log.write(json.dumps(rec) + "\n")
        log.flush()
        if writer is not None:
            for k, v in rec.items():
                if k != "step":
                    writer.add_scalar(k, v, step)
        if args.save_every and step % args.save_every == 0:
            extra = {"order": order, "data_rng": rng.getstate(), "records": records}
            save_training_state(args.out, policy=policy, optimizer=opt, step=step, extra=extra)
        bar.set_postfix(loss=f"{rec['loss']:.3f}", acc=f"{rec.get('rewards/accuracies', float('nan')):.2f}")
        if args.smoke:
            print(json.dumps(rec), flush=True)

    after = evaluate(policy, loss_fn, eval_batches)
    print("after:", json.dumps(after), flush=True)
    log.write(json.dumps({"step": args.steps, **after}) + "\n")
    log.close()
    if writer is not None:
        for k, v in after.items():
            writer.add_scalar(k, v, args.steps)
        writer.close()
    policy.save(args.out)
    summary = {
        "args": vars(args),
        "before": before,
        "after": after,
        "collator": collate.stats.snapshot().summary(),
    }
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2, default=str)
    if args.smoke:
        print("smoke ok")


if __name__ == "__main__":
    main()
