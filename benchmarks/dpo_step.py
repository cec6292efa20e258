"""One LoRA DPO step, prefopt vs TRL 1.16 ``DPOTrainer``, side by side: time, peak memory and loss.

The step (identical work in every configuration): SmolLM2-135M-Instruct + LoRA (r=8, alpha=16, all-linear,
dropout 0, same initial adapter weights), the first ``--pairs`` (4) pairs of HH-RLHF helpful-base tokenized ONCE
by ``prefopt.data.PreferenceCollator`` (max length 512; TRL's own collator receives the very same
``prompt_ids`` / ``chosen_ids`` / ``rejected_ids``), sigmoid DPO loss (beta 0.1) with the reference = adapters
off, backward, one AdamW step (lr 1e-4, weight decay 0, no clipping, no scheduler).

* ``prefopt``: ``pair_logps(policy, batch)`` (chunked LM head; policy and ``policy.reference()``), ``get_loss("dpo")``,
  ``loss.mean().backward()``, ``opt.step()``.
* ``prefopt_shared``: the same with ``prefopt.shared_prefix.shared_prompt_pair_logps`` (each prompt once,
  ``method="packed"``); ``prefopt_shared_cache`` (not run by default): ``method="cache"``.
  prefopt runs the reference forward before the policy forward; TRL runs it after.
* ``trl``: ``DPOTrainer(model, args=DPOConfig(...), peft_config=LoraConfig(...))``, then per step
  ``trainer.training_step(trainer.model, batch)`` (TRL's loss + the Trainer's backward) and
  ``trainer.optimizer.step(); trainer.optimizer.zero_grad()`` — the body of ``Trainer.train``'s inner loop with
  logging, evaluation, saving, clipping and the scheduler left out.

Same initial adapter: after each side builds its peft model, every ``lora_A`` / ``lora_B`` weight of adapter
``default`` is overwritten with values drawn from a generator seeded by the module's name (``lora_B`` is not
zero, so the first loss is not trivially ``log 2``); a float64 checksum of all adapter weights is reported and
checked equal across configurations.

Measurements, each configuration in a FRESH subprocess, configurations alternated for ``--rounds`` rounds:
time = median wall-clock seconds of the steps after the first (the first, cold step is not timed), and the
median process CPU seconds of the same steps (less sensitive to other jobs on a shared machine);
memory = peak RSS during the steps minus the RSS just before the first step: the kernel's high-water mark is
reset with ``/proc/self/clear_refs`` (``5``) after model, data and trainer are set up, and ``VmHWM`` is read after
the last step (fallback where clear_refs is refused: ``ru_maxrss`` delta, which under-reports if set-up peaked
higher). Limits: RSS counts every page the process touches (allocator caches included), CPU only, one process;
the shared machine makes times noisy, hence alternation, medians and ratios. ``loss_abs_diff`` = max over the
steps of ``|loss_prefopt − loss_trl|`` on the same batch (step 1 compares forward+loss; later steps also the
optimizer updates).

    python benchmarks/dpo_step.py --json /tmp/dpo_step.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT / "../shared/data/hh-rlhf/helpful-base.test.jsonl.gz"
CONFIGS = ("prefopt", "prefopt_shared", "prefopt_shared_cache", "trl")
DEFAULT_CONFIGS = ("prefopt", "prefopt_shared", "trl")


def lora_config() -> Any:
    import peft

    return peft.LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, bias="none", target_modules="all-linear", task_type="CAUSAL_LM"
    )


def init_adapter_(model: torch.nn.Module, seed: int) -> tuple[float, int]:
    """Overwrite adapter ``default``'s LoRA weights deterministically by module name; return (checksum, count)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".default." not in name or not ("lora_A" in name or "lora_B" in name):
                continue
            key = name[name.index("layers.") :] if "layers." in name else name
            gen = torch.Generator().manual_seed(seed + zlib.crc32(key.encode()))
            std = (1.0 / p.shape[1] ** 0.5) if "lora_A" in name else 0.02
            p.copy_(torch.randn(p.shape, generator=gen) * std)
            total += float(p.double().sum()) + float(p.double().abs().sum())
            count += p.numel()
    return total, count


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rows(args: argparse.Namespace) -> list[dict[str, str]]:
    from prefopt.data import load_preferences

    ds = load_preferences(args.data)
    return [dict(ds[i]) for i in range(args.pairs)]


def _worker(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from prefopt.data import PreferenceCollator
    from prefopt.models import load_smollm2

    model, tok = load_smollm2()
    rows = _rows(args)
    batch = PreferenceCollator(tok, max_length=args.max_length)(rows)
    b = len(rows)
    losses: list[float] = []

    if args.impl.startswith("prefopt"):
        from prefopt.data import split_shared_prompt
        from prefopt.logprobs import pair_logps
        from prefopt.policy import LoraPolicy
        from prefopt.registry import get_loss
        from prefopt.types import PairBatch, SharedPromptBatch

        policy = LoraPolicy(model, lora_config())
        checksum = init_adapter_(policy.model, args.seed)
        opt = torch.optim.AdamW(policy.trainable_parameters(), lr=args.lr, weight_decay=0.0)
        dpo = get_loss("dpo", beta=args.beta)
        data: PairBatch | SharedPromptBatch = (
            split_shared_prompt(batch) if args.impl.startswith("prefopt_shared") else batch
        )
        method = "cache" if args.impl.endswith("_cache") else "packed"
        policy.model.train()

        def step() -> float:
            # the reference runs first: its buffers are gone before the policy's are held
            logps = pair_logps(policy, data, method=method)
            loss = dpo(logps).loss.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return float(loss.detach())

    else:
        import datasets
        from trl import DPOConfig, DPOTrainer

        tmp = tempfile.mkdtemp(prefix="dpo_step_trl_")
        cfg = DPOConfig(
            output_dir=tmp,
            per_device_train_batch_size=b,
            max_length=args.max_length,
            beta=args.beta,
            loss_type=["sigmoid"],
            learning_rate=args.lr,
            weight_decay=0.0,
            lr_scheduler_type="constant",
            optim="adamw_torch",
            max_grad_norm=None,  # type: ignore[arg-type]  # unused: training_step does not clip
            report_to=[],
            logging_strategy="no",
            save_strategy="no",
            eval_strategy="no",
            use_cpu=True,
            bf16=False,
            fp16=False,
            gradient_checkpointing=False,
            dataloader_num_workers=0,
            seed=args.seed,
            max_steps=args.steps,
        )
        train = datasets.Dataset.from_list(rows)
        trainer = DPOTrainer(
            model, args=cfg, train_dataset=train, processing_class=tok, peft_config=lora_config()
        )
        assert trainer.model is not None
        checksum = init_adapter_(trainer.model, args.seed)
        trainer.create_optimizer()
        trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train's loop, read by training_step
        examples = []
        plen = batch.prompt_len
        for i in range(b):
            p = int(plen[i])
            ids_c = batch.input_ids[i][batch.attention_mask[i].bool()].tolist()
            ids_r = batch.input_ids[b + i][batch.attention_mask[b + i].bool()].tolist()
            examples.append({"prompt_ids": ids_c[:p], "chosen_ids": ids_c[p:], "rejected_ids": ids_r[p:]})
        trl_batch = trainer.data_collator(examples)
        same = torch.equal(trl_batch["input_ids"], batch.input_ids) and torch.equal(
            trl_batch["completion_mask"].bool(), batch.completion_mask
        )
        if not same:
            raise RuntimeError("TRL's collated batch differs from prefopt's tokens")
        opt_trl = trainer.optimizer
        assert opt_trl is not None

        def step() -> float:
            loss = trainer.training_step(trainer.model, trl_batch)
            opt_trl.step()
            opt_trl.zero_grad(set_to_none=True)
            return float(loss)

    tokens = int(batch.attention_mask.sum())
    reset = _reset_peak()
    base = _rss_kib("VmRSS")
    maxrss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times, cpu_times = [], []
    for _ in range(args.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        losses.append(step())
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    if reset:
        peak_delta = _rss_kib("VmHWM") - base
    else:
        peak_delta = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - maxrss0
    return {
        "impl": args.impl,
        "time_s": statistics.median(times[1:]) if len(times) > 1 else times[0],
        "cold_time_s": times[0],
        "cpu_time_s": statistics.median(cpu_times[1:]) if len(cpu_times) > 1 else cpu_times[0],
        "peak_delta_mib": peak_delta / 1024.0,
        "peak_method": "clear_refs+VmHWM" if reset else "ru_maxrss delta",
        "losses": losses,
        "adapter_checksum": checksum,
        "tokens": tokens,
        "seq_len": int(batch.input_ids.shape[1]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write time_ratio, memory_ratio, loss_abs_diff and all runs here")
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--steps", type=int, default=4, help="steps per subprocess (the first is not timed)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), help=f"comma-separated, from {CONFIGS}")
    ap.add_argument("--impl", choices=CONFIGS, help=argparse.SUPPRESS)  # worker mode
    args = ap.parse_args()
    if args.impl:
        print("RESULT " + json.dumps(_worker(args)), flush=True)
        return

    configs = args.configs.split(",")
    runs: list[dict[str, Any]] = []
    for r in range(args.rounds):
        order = configs[r % len(configs) :] + configs[: r % len(configs)]  # rotate who goes first
        for impl in order:
            cmd = [sys.executable, __file__, "--impl", impl] + [
                f"--{k.replace('_', '-')}={v}"
                for k, v in vars(args).items()
                if k not in ("json", "impl", "configs", "rounds")
            ]
            proc = subprocess.run(
                cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"}
            )
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:  # rc -9: killed, usually by the OOM killer
                raise SystemExit(
                    f"worker {impl} failed (return code {proc.returncode}):\n{proc.stderr[-4000:]}"
                )
            res = json.loads(line[7:]) | {"round": r}
            runs.append(res)
            print(
                f"round {r} {impl:15s} step {res['time_s']:.2f}s (cpu {res['cpu_time_s']:.2f}s, "
                f"cold {res['cold_time_s']:.2f}s, load {os.getloadavg()[0]:.1f}) "
                f"peak +{res['peak_delta_mib']:.0f} MiB  losses {[f'{x:.6f}' for x in res['losses']]}",
                flush=True,
            )

    def med(impl: str, key: str) -> float:
        return statistics.median(x[key] for x in runs if x["impl"] == impl)

    checks = {x["impl"]: x["adapter_checksum"] for x in runs}
    first = {impl: next(x for x in runs if x["impl"] == impl) for impl in configs}
    summary: dict[str, Any] = {"configs": configs, "adapter_checksums": checks}
    for impl in configs:
        summary[impl] = {k: med(impl, k) for k in ("time_s", "cpu_time_s", "peak_delta_mib")}
    if "trl" in configs:
        for impl in (c for c in configs if c != "trl"):
            diffs = [abs(a - b) for a, b in zip(first[impl]["losses"], first["trl"]["losses"])]
            summary[f"{impl}_vs_trl"] = {
                "time_ratio": med(impl, "time_s") / med("trl", "time_s"),
                "cpu_time_ratio": med(impl, "cpu_time_s") / med("trl", "cpu_time_s"),
                "memory_ratio": med(impl, "peak_delta_mib") / med("trl", "peak_delta_mib"),
                "loss_abs_diff": max(diffs),
                "loss_abs_diff_step1": diffs[0],
            }
        head = summary.get("prefopt_vs_trl") or next(v for k, v in summary.items() if k.endswith("_vs_trl"))
        summary |= {k: head[k] for k in ("time_ratio", "memory_ratio", "loss_abs_diff")}
    summary["load_after"] = list(os.getloadavg())
    summary["runs"] = runs
    summary["settings"] = {k: v for k, v in vars(args).items() if k not in ("impl", "json")}
    print(json.dumps({k: v for k, v in summary.items() if k not in ("runs",)}, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
