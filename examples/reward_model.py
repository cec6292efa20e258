"""Reward models, LoRA vs full fine-tuning, on the same data and budget (PE-RLHF §4, reward-model comparison).

Three tasks, each trained once with a LoRA reward model and once fully fine-tuned (SmolLM2-135M-Instruct,
``r(x, y) = w·h_last + c``, ``prefopt.reward_model.RewardModel``):

* ``coffee_bce``  — Taskmaster-4 coffee pointwise labels (good / bad agent turn), classification loss (BCE);
* ``coffee_bt``   — the same-context coffee pairs (label 1 vs label 0), Bradley–Terry;
* ``hh_bt``       — Anthropic HH-RLHF helpful-base pairs, Bradley–Terry.

Contexts are split by prompt (coffee: 30% of the contexts that have pairs; HH: 20%) (no prompt is both trained on and evaluated); every task is evaluated on
held-out PAIRS: accuracy = fraction with ``r(chosen) > r(rejected)``. Each (task, variant) runs in a fresh
subprocess so that its peak RSS (``resource.getrusage(RUSAGE_SELF).ru_maxrss``) is its own; step time is the
median over training steps. One epoch over a few hundred examples, max_length 256.

    python examples/reward_model.py --data /work/shared/data --out runs/rm          # ~10 min on 2 cores
    python examples/reward_model.py --smoke --out /tmp/rm                           # tiny model, seconds

``--save-lora DIR`` keeps the coffee LoRA reward model (for ``examples/reinforce_lora.py --reward rm``).

Checkpoints and resume (LoRA reward models): ``--save-every N`` writes a checkpoint of each LoRA worker every
N steps to ``OUT/checkpoints/<task>-lora/checkpoints/step-…`` atomically (:mod:`prefopt.checkpoint`: adapter,
anchor and value head, optimizer, RNG states, data position = step, the losses and step times so far).
``--resume OUT`` (the run folder itself) runs every worker again: a LoRA worker continues from its latest
checkpoint and reproduces the uninterrupted run's losses exactly; a LoRA worker without a checkpoint and the
fully fine-tuned workers (no checkpoints: they are not a ``LoraPolicy``) start from the beginning. The
memory and time columns of a resumed worker describe its own process only. ``--max-steps N`` stops each
worker after N steps (an interrupted run, for tests). An existing, non-empty ``--out`` is refused unless
``--overwrite`` (which deletes its checkpoints) or ``--resume``.

    python examples/reward_model.py --smoke --tasks coffee_bce --save-every 2 --max-steps 2 --out /tmp/rm
    python examples/reward_model.py --smoke --tasks coffee_bce --save-every 2 --out /tmp/rm --resume /tmp/rm
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from prefopt.checkpoint import latest_checkpoint, load_training_state, prepare_run_dir, save_training_state
from prefopt.data import (
    PreferenceCollator,
    UnpairedCollator,
    load_builtin_pairs,
    load_pointwise,
    load_preferences,
    pairs_from_pointwise,
)
from prefopt.losses.reward import bradley_terry, reward_classification
from prefopt.reward_model import RewardModel

TASKS = ("coffee_bce", "coffee_bt", "hh_bt")
VARIANTS = ("lora", "full")


def rss_mb() -> float:
    """Peak resident set size of this process so far, MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def split_by_prompt(prompts: list[str], seed: int, test_fraction: float = 0.2) -> set[str]:
    unique = sorted(set(prompts))
    random.Random(seed).shuffle(unique)
    return set(unique[: max(1, int(len(unique) * test_fraction))])


def load_task(task: str, args: argparse.Namespace) -> tuple[list[dict], list[dict], str]:
    """Returns (train rows, held-out pairs, kind) with kind 'pointwise' (BCE) or 'pairs' (BT)."""
    rng = random.Random(args.seed)
    if args.smoke:
        pairs = [dict(r) for r in load_builtin_pairs()]
        train, test = pairs[:24], pairs[24:]
        if task == "coffee_bce":
            rows = [
                {"prompt": p["prompt"], "completion": p[k], "label": float(k == "chosen")}
                for p in train
                for k in ("chosen", "rejected")
            ]
            return rows[: args.train_examples], test[: args.test_pairs], "pointwise"
        return train[: args.train_examples // 2], test[: args.test_pairs], "pairs"
    data = Path(args.data)
    if task.startswith("coffee"):
        point = load_pointwise(
            sorted(str(p) for p in (data / "taskmaster" / "coffee").glob("reward_0*.json"))
        )
        pairs = [dict(r) for r in pairs_from_pointwise(point)]
        # hold out 30% of the contexts that HAVE pairs (most contexts have a single labelled generation)
        test_prompts = split_by_prompt([p["prompt"] for p in pairs], args.seed, test_fraction=0.3)
        test = [p for p in pairs if p["prompt"] in test_prompts]
        rng.shuffle(test)
        if task == "coffee_bce":
            rows = [dict(r) for r in point if r["prompt"] not in test_prompts]
            rng.shuffle(rows)
            return rows[: args.train_examples], test[: args.test_pairs], "pointwise"
        train = [p for p in pairs if p["prompt"] not in test_prompts]
        rng.shuffle(train)
        return train[: args.train_examples // 2], test[: args.test_pairs], "pairs"
    hh = [dict(r) for r in load_preferences(str(data / "hh-rlhf" / "helpful-base.test.jsonl.gz"))]
    test_prompts = split_by_prompt([r["prompt"] for r in hh], args.seed)
    train = [r for r in hh if r["prompt"] not in test_prompts]
    test = [r for r in hh if r["prompt"] in test_prompts]
    rng.shuffle(train)
    rng.shuffle(test)
    return train[: args.train_examples // 2], test[: args.test_pairs], "pairs"


def load_model(args: argparse.Namespace) -> tuple[Any, Any]:
    if args.smoke:
        from prefopt.testing import char_tokenizer, tiny_causal_lm

        tok = char_tokenizer()
        return tiny_causal_lm("llama", vocab_size=len(tok), seed=args.seed), tok
    from prefopt.models import load_smollm2

    return load_smollm2()


def worker(task: str, variant: str, args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    train, test, kind = load_task(task, args)
    model, tok = load_model(args)
    rss_loaded = rss_mb()
    ckpt_dir = Path(args.out) / "checkpoints" / f"{task}-{variant}"  # LoRA workers only
    ckpt = latest_checkpoint(ckpt_dir) if args.resume and variant == "lora" else None
    if ckpt is not None:
        state = load_training_state(ckpt, model)
        rm = RewardModel(kind="lora", policy=state.policy)
    else:
        rm = RewardModel.lora(model) if variant == "lora" else RewardModel.full(model)
    rm.train()
    lr = args.lr_lora if variant == "lora" else args.lr_full
    opt = torch.optim.AdamW(rm.trainable_parameters(), lr=lr, weight_decay=0.0)
    # long contexts keep their END (the latest turns) and leave a quarter of max_length to the completion;
    # without a prompt cap a context longer than max_length would leave no room and the row would be skipped
    prompt_cap = 3 * args.max_length // 4
    pair_coll = PreferenceCollator(tok, max_length=args.max_length, max_prompt_length=prompt_cap)
    point_coll = UnpairedCollator(tok, max_length=args.max_length, max_prompt_length=prompt_cap)
    bs = args.batch_size  # sequences per step (pairs: bs // 2 pairs)
    step_times: list[float] = []
    losses: list[float] = []
    per_step = bs if kind == "pointwise" else bs // 2
    starts = list(range(0, len(train) - per_step + 1, per_step))  # one epoch, in order
    if args.max_steps:
        starts = starts[: args.max_steps]
    first = 0
    data_shape = [len(train), per_step]
    if ckpt is not None:
        if state.extra["data_shape"] != data_shape:
            raise SystemExit(
                f"--resume: {ckpt} was taken with (rows, rows per step) = {state.extra['data_shape']}, "
                f"this run has {data_shape}: the same --train-examples and --batch-size are needed"
            )
        opt.load_state_dict(state.optimizer)
        first, losses, step_times = state.step, state.extra["losses"], state.extra["step_times"]
        print(f"resuming {task}/{variant} from {ckpt} (step {first})", file=sys.stderr, flush=True)
        state.restore_rng()  # last: nothing random may follow
    for step, start in enumerate(starts[first:], first + 1):
        rows = train[start : start + per_step]
        t0 = time.perf_counter()
        if kind == "pointwise":
            batch = point_coll(rows)
            r = rm(batch.input_ids, batch.attention_mask)
            out = reward_classification(r, batch.label)
        else:
            batch = pair_coll(rows)
            r = rm(batch.input_ids, batch.attention_mask)
            half = r.shape[0] // 2
            out = bradley_terry(r[:half], r[half:])
        loss = out.loss.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step_times.append(time.perf_counter() - t0)
        losses.append(float(loss))
        if args.save_every and variant == "lora" and step % args.save_every == 0:
            assert rm.policy is not None
            extra = {"losses": losses, "step_times": step_times, "data_shape": data_shape}
            save_training_state(ckpt_dir, policy=rm.policy, optimizer=opt, step=step, extra=extra)
    rm.eval()
    correct, total = 0, 0
    with torch.no_grad():
        for start in range(0, len(test), 8):
            batch = pair_coll(test[start : start + 8])
            r = rm(batch.input_ids, batch.attention_mask)
            half = r.shape[0] // 2
            correct += int((r[:half] > r[half:]).sum())
            total += half
    if args.save_lora and variant == "lora" and task == "coffee_bce":
        rm.save(args.save_lora)
    return {
        "task": task,
        "variant": variant,
        "train_examples": len(train) if kind == "pointwise" else 2 * len(train),
        "steps": len(step_times),
        "test_pairs": total,
        "accuracy": correct / max(total, 1),
        "step_time_median_s": statistics.median(step_times) if step_times else float("nan"),
        "peak_rss_mb": rss_mb(),
        "rss_after_load_mb": rss_loaded,
        "first_loss": losses[0] if losses else float("nan"),
        "last_loss": statistics.mean(losses[-3:]) if losses else float("nan"),
        "losses": losses,
        "resumed_from_step": first,
        "trainable_params": sum(p.numel() for p in rm.trainable_parameters()),
        # rows the collators dropped (see prefopt.data bad-row rules), training and evaluation together
        "collator_skipped": {
            "pairs": pair_coll.report().summary(),
            "pointwise": point_coll.report().summary(),
        },
    }


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """``--help``: the module docstring as written, every flag with its default."""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument(
        "--data",
        default=str(Path(__file__).resolve().parents[1] / ".." / "shared" / "data"),
        help="the shared data folder (taskmaster/coffee, hh-rlhf)",
    )
    ap.add_argument("--out", default="runs/reward_model", help="reward_model.json")
    ap.add_argument("--smoke", action="store_true", help="tiny model, built-in pairs, a few steps")
    ap.add_argument("--tasks", default=",".join(TASKS), help="comma list of coffee_bce, coffee_bt, hh_bt")
    ap.add_argument("--train-examples", type=int, default=256, help="sequences seen in training (1 epoch)")
    ap.add_argument("--test-pairs", type=int, default=96, help="held-out pairs per task")
    ap.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    ap.add_argument("--max-length", type=int, default=256, help="prompt + completion tokens per row")
    ap.add_argument(
        "--lr-lora", type=float, default=1e-3, help="AdamW learning rate of the LoRA reward model"
    )
    ap.add_argument("--lr-full", type=float, default=2e-5, help="AdamW learning rate of full fine-tuning")
    ap.add_argument("--seed", type=int, default=0, help="seed of the splits, the data order and the head")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--save-lora", default=None, help="directory for the coffee LoRA reward model")
    ap.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty --out")
    ap.add_argument(
        "--save-every", type=int, default=0, help="checkpoint each LoRA worker every N steps (0: never)"
    )
    ap.add_argument(
        "--resume",
        default=None,
        metavar="OUT",
        help="continue the run folder OUT (= --out) from its checkpoints",
    )
    ap.add_argument("--max-steps", type=int, default=0, help="stop each worker after N steps (0: one epoch)")
    ap.add_argument("--worker", nargs=2, metavar=("TASK", "VARIANT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    for name in ("save_every", "max_steps"):
        if getattr(args, name) < 0:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 0")
    if args.smoke:
        if args.train_examples == ap.get_default("train_examples"):
            args.train_examples = 16
        args.test_pairs, args.max_length, args.threads = 8, 128, 1
        if args.tasks == ",".join(TASKS):
            args.tasks = "coffee_bce,coffee_bt"  # the BCE and the BT path; hh_bt is the BT path again
    torch.set_num_threads(args.threads)
    if args.worker:
        print("RESULT " + json.dumps(worker(*args.worker, args)), flush=True)
        return
    if not args.smoke and not Path(args.data).is_dir():
        sys.exit(f"--data {args.data} not found (use --smoke for a run without data)")
    if args.resume is not None:
        if Path(args.resume).resolve() != Path(args.out).resolve():
            raise SystemExit(
                "--resume must be the run folder --out (each worker resumes from OUT/checkpoints)"
            )
        if not (Path(args.out) / "checkpoints").is_dir():
            raise SystemExit(f"nothing to resume: no checkpoints folder in {args.out}")
    else:
        try:
            prepare_run_dir(args.out, overwrite=args.overwrite)
        except FileExistsError as err:
            raise SystemExit(str(err)) from None
    results = []
    passthrough = [a for a in sys.argv[1:]]
    for task in args.tasks.split(","):
        for variant in VARIANTS:  # one fresh process per configuration: its peak RSS is its own
            cmd = [sys.executable, __file__, *passthrough, "--worker", task, variant]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                sys.exit(f"worker {task}/{variant} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
            res = json.loads(line[len("RESULT ") :])
            results.append(res)
            print(
                f"{task:11s} {variant:4s} acc={res['accuracy']:.3f} ({res['test_pairs']} pairs) "
                f"step={res['step_time_median_s']:.3f}s peak_rss={res['peak_rss_mb']:.0f}MiB "
                f"loss {res['first_loss']:.3f}->{res['last_loss']:.3f}",
                flush=True,
            )
    print("\ntask         acc_lora acc_full  Δacc(pts)  time_ratio  mem_ratio(peak)  mem_ratio(over load)")
    summary = []
    for task in args.tasks.split(","):
        lo = next(r for r in results if r["task"] == task and r["variant"] == "lora")
        fu = next(r for r in results if r["task"] == task and r["variant"] == "full")
        row = {
            "task": task,
            "acc_lora": lo["accuracy"],
            "acc_full": fu["accuracy"],
            "delta_points": 100 * (lo["accuracy"] - fu["accuracy"]),
            "time_ratio": lo["step_time_median_s"] / fu["step_time_median_s"],
            "memory_ratio": lo["peak_rss_mb"] / fu["peak_rss_mb"],
            "memory_ratio_over_load": (lo["peak_rss_mb"] - lo["rss_after_load_mb"])
            / max(fu["peak_rss_mb"] - fu["rss_after_load_mb"], 1e-9),
        }
        summary.append(row)
        print(
            f"{task:11s}  {row['acc_lora']:.3f}    {row['acc_full']:.3f}    {row['delta_points']:+6.1f}"
            f"     {row['time_ratio']:.2f}        {row['memory_ratio']:.2f}             {row['memory_ratio_over_load']:.2f}"
        )
    with open(os.path.join(args.out, "reward_model.json"), "w") as f:
        json.dump({"runs": results, "summary": summary, "args": vars(args)}, f, indent=2)
    if args.smoke:
        print("smoke ok")


if __name__ == "__main__":
    main()
