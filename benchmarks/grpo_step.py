"""One GRPO LoRA step, prefopt vs TRL 1.16 ``GRPOTrainer``: time, peak memory and loss.

Setting (identical in both): SmolLM2-135M-Instruct + LoRA (r=8, alpha=16, all-linear, dropout 0, the same
non-zero initial adapter, so the policy differs from the reference), the first ``--prompts`` prompts of
HH-RLHF helpful-base (plain text, ``"...\\n\\nAssistant:"``), ``G = --group`` (8) completions per prompt, HF
``generate`` (temperature 1, top-p 1, top-k off, ``--max-new-tokens``, default 64), a programmatic reward
(lexical diversity of the decoded completion), group advantages (mean/std over the group, eps 1e-4 = TRL's
``scale_rewards="group"``), the GRPO clipped surrogate + β·k3 KL to the reference (β = 0.04; the reference is
the backbone with adapters off), DAPO aggregation (TRL ``loss_type="dapo"``: sum over all completion tokens /
their count; prefopt ``grpo`` + ``aggregate(..., "token-mean")``), one update per rollout (old = sg(policy)),
backward, AdamW (lr 1e-5, weight decay 0) on the adapter. Gradient checkpointing off in both, float32, CPU.

Completions have a fixed length: the stop token of both samplers is the last vocabulary entry (never
produced in practice; TRL's EOS list is set to it too), so both generate exactly ``max_new_tokens`` tokens
per row and the timing does not depend on where the samples of two differently-seeded processes end.

Two parts, each configuration in a FRESH subprocess, alternating prefopt / trl (who goes first rotates):

* ``--part step`` (a): the whole step including generation. prefopt: ``HFSampler(policy, ...,
  behaviour_logps=False).generate(prompts, n=G)`` (samples + reference log-probs), reward, advantages,
  ``token_logps`` (chunked head), ``grpo``, backward, ``opt.step()``. TRL: ``trainer.training_step(model, rows)``
  (its ``_prepare_inputs`` generates, scores and computes advantages and reference log-probs; then
  ``compute_loss`` and the backward) and ``optimizer.step()`` — the body of ``Trainer.train``'s inner loop
  without logging, saving, clipping and scheduler.
* ``--part loss`` (b): the loss-and-backward part on IDENTICAL rollouts: one rollout (token ids, masks,
  advantages, reference log-probs) is made once in its own process and saved; both sides load the very same
  tensors (TRL's layout: left-padded prompt ids + right-padded completion ids). prefopt: ``token_logps`` on the
  concatenated ids, ``grpo``, ``aggregate``, ``backward``; TRL: ``trainer.compute_loss(model, inputs)`` +
  ``trainer.accelerator.backward`` (``training_step`` without its generating ``_prepare_inputs``). No
  optimizer step, so every step sees the same weights; ``loss_abs_diff`` = ``|loss_prefopt − loss_trl|`` on the first step.

Time = median wall-clock seconds of the steps after the first (the cold first step is not timed). Memory = peak
RSS during the steps minus the RSS just before the first step (``/proc/self/clear_refs`` + ``VmHWM``; fallback
``ru_maxrss`` delta). CPU only; RSS counts every page the process touches. Ratios are prefopt / TRL, medians
over rounds. Report the machine's load with the numbers (``uptime``): shared machines make times noisy.

    python benchmarks/grpo_step.py --json /tmp/grpo_step.json
    python benchmarks/grpo_step.py --prompts 1 --max-new-tokens 16 --rounds 2 --json /tmp/g.json   # small
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
IMPLS = ("prefopt", "trl")


def lora_config() -> Any:
    import peft

    return peft.LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, bias="none", target_modules="all-linear", task_type="CAUSAL_LM"
    )


def init_adapter_(model: torch.nn.Module, seed: int) -> float:
    """Overwrite adapter ``default``'s LoRA weights deterministically by module name; return a checksum."""
    total = 0.0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".default." not in name or not ("lora_A" in name or "lora_B" in name):
                continue
            key = name[name.index("layers.") :] if "layers." in name else name
            gen = torch.Generator().manual_seed(seed + zlib.crc32(key.encode()))
            std = (1.0 / p.shape[1] ** 0.5) if "lora_A" in name else 0.02
            p.copy_(torch.randn(p.shape, generator=gen) * std)
            total += float(p.double().sum()) + float(p.double().abs().sum())
    return total


def diversity_reward(completions: list[str]) -> list[float]:
    """A programmatic reward: distinct words / (1 + words) of each completion."""
    out = []
    for text in completions:
        words = text.split()
        out.append(len(set(words)) / (1.0 + len(words)))
    return out


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


def _prompts(args: argparse.Namespace) -> list[str]:
    from prefopt.data import load_preferences

    ds = load_preferences(args.data)
    return [str(ds[i]["prompt"]) for i in range(args.prompts)]


def _make_rollout(args: argparse.Namespace) -> dict[str, Any]:
    """Sample one rollout from the initial policy (prefopt's sampler) and save it in TRL's layout."""
    from prefopt import rl
    from prefopt.data import PromptCollator
    from prefopt.models import load_smollm2
    from prefopt.policy import LoraPolicy
    from prefopt.sampling import HFSampler

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model, tok = load_smollm2()
    policy = LoraPolicy(model, lora_config())
    init_adapter_(policy.model, args.seed)
    stop = len(tok) - 1
    sampler = HFSampler(
        policy, tok, max_new_tokens=args.max_new_tokens, eos_token_id=[stop], pad_token_id=tok.pad_token_id
    )
    qs = _prompts(args)
    batch = PromptCollator(tok, strict=True)(qs)
    roll = sampler.generate(batch, n=args.group)
    assert roll.ref_logp is not None
    b = roll.batch_size
    plen = [int(x) for x in roll.prompt_len]
    clen = [int(x) for x in roll.completion_len]
    p_max, c_max = max(plen), max(clen)
    pad = int(sampler.pad_token_id)
    prompt_ids = torch.full((b, p_max), pad, dtype=torch.long)
    prompt_mask = torch.zeros((b, p_max), dtype=torch.long)
    completion_ids = torch.full((b, c_max), pad, dtype=torch.long)
    completion_mask = torch.zeros((b, c_max), dtype=torch.long)
    ref = torch.zeros((b, c_max), dtype=torch.float32)
    for i in range(b):
        p, c = plen[i], clen[i]
        prompt_ids[i, p_max - p :] = roll.input_ids[i, :p]
        prompt_mask[i, p_max - p :] = 1
        completion_ids[i, :c] = roll.input_ids[i, p : p + c]
        completion_mask[i, :c] = 1
        ref[i, :c] = roll.ref_logp[i, p : p + c]
    rewards = torch.tensor(diversity_reward(roll.completions(tok)))
    adv = rl.group_advantages(rewards.view(-1, args.group)).reshape(-1)
    data = {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": adv,
        "ref_per_token_logps": ref,
        "num_items_in_batch": completion_mask.sum(),
    }
    torch.save(data, args.rollout)
    return {
        "rows": b,
        "prompt_tokens": p_max,
        "completion_tokens": c_max,
        "reward_mean": float(rewards.mean()),
    }


def _trl_trainer(args: argparse.Namespace, model: Any, tok: Any, qs: list[str]) -> Any:
    import datasets
    from trl import GRPOConfig, GRPOTrainer

    stop = len(tok) - 1
    cfg = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="grpo_step_trl_"),
        per_device_train_batch_size=args.prompts * args.group,
        num_generations=args.group,
        max_completion_length=args.max_new_tokens,
        loss_type="dapo",
        beta=args.beta,
        learning_rate=args.lr,
        weight_decay=0.0,
        lr_scheduler_type="constant",
        optim="adamw_torch",
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        generation_kwargs={"eos_token_id": [stop]},
        gradient_checkpointing=False,
        report_to=[],
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        log_completions=False,
        use_cpu=True,
        bf16=False,
        fp16=False,
        dataloader_num_workers=0,
        seed=args.seed,
        max_steps=args.steps,
    )

    def reward(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
        return diversity_reward([str(c) for c in completions])

    train = datasets.Dataset.from_list([{"prompt": q} for q in qs])
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward,
        args=cfg,
        train_dataset=train,
        processing_class=tok,
        peft_config=lora_config(),
    )
    trainer.eos_token_ids = [stop]  # fixed-length completions: TRL cuts its masks at these ids
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train's loop, read by training_step
    return trainer


def _as_rollout(data: dict[str, Any], group: int) -> Any:
    """The saved TRL-layout rollout (left-padded prompts | right-padded completions) as a prefopt ``Rollout``
    (rows ``[prompt, completion, pad]``, right-padded), for the shared-prompt forward."""
    from prefopt.sampling import pack_rollout

    prompts = [r[m.bool()].tolist() for r, m in zip(data["prompt_ids"], data["prompt_mask"])]
    completions = [r[m.bool()].tolist() for r, m in zip(data["completion_ids"], data["completion_mask"])]
    return pack_rollout(prompts, completions, eos_token_id=None, pad_token_id=0, num_samples=group)


def _to_trl_layout(logp: torch.Tensor, data: dict[str, Any]) -> torch.Tensor:
    """Rollout-layout per-token values ``(b, T)`` → the benchmark's ``[left-padded prompt | completion]`` layout."""
    p_max = data["prompt_ids"].shape[1]
    c_mask = data["completion_mask"].bool()
    plen = data["prompt_mask"].sum(1)
    out = logp.new_zeros((c_mask.shape[0], p_max + c_mask.shape[1]))
    cols = plen[:, None] + torch.arange(c_mask.shape[1])[None, :]
    cols = torch.where(c_mask, cols, torch.zeros_like(cols))
    vals = torch.where(c_mask, torch.gather(logp, 1, cols), torch.zeros((), dtype=logp.dtype))
    return torch.cat([out[:, :p_max], vals], dim=1)


def _worker(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    from prefopt.models import load_smollm2

    model, tok = load_smollm2()
    qs = _prompts(args)
    info: dict[str, Any] = {}
    if args.part == "loss":
        data = torch.load(args.rollout)
    if args.impl == "prefopt":
        from prefopt import rl
        from prefopt.data import PromptCollator
        from prefopt.logprobs import token_logps
        from prefopt.losses.policy_gradient import grpo
        from prefopt.masked import aggregate
        from prefopt.policy import LoraPolicy
        from prefopt.sampling import HFSampler
        from prefopt.shared_prefix import shared_prompt_rollout_logps

        policy = LoraPolicy(model, lora_config())
        checksum = init_adapter_(policy.model, args.seed)
        lm = policy.model
        opt = torch.optim.AdamW(policy.trainable_parameters(), lr=args.lr, weight_decay=0.0)
        if args.part == "step":
            sampler = HFSampler(
                policy,
                tok,
                max_new_tokens=args.max_new_tokens,
                eos_token_id=[len(tok) - 1],
                pad_token_id=tok.pad_token_id,
                behaviour_logps=False,
                merged=args.merged,
                shared_prompt=args.shared_prompt,
            )
            prompts = PromptCollator(tok, strict=True)(qs)

            def step() -> float:
                roll = sampler.generate(prompts, n=args.group)
                rewards = torch.tensor(diversity_reward(roll.completions(tok)))
                adv = rl.group_advantages(rewards.view(-1, args.group)).reshape(-1)
                lm.train()
                if args.shared_prompt:
                    logp = shared_prompt_rollout_logps(lm, roll)
                else:
                    logp = token_logps(lm, roll.input_ids, roll.attention_mask, roll.completion_mask)
                out = grpo(logp, None, adv, roll.completion_mask, ref_logp=roll.ref_logp, beta=args.beta)
                loss = aggregate(out.loss, roll.completion_mask, "token-mean")
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                info["completion_tokens"] = int(roll.completion_mask.sum())
                return float(loss.detach())

        else:
            ids = torch.cat([data["prompt_ids"], data["completion_ids"]], dim=1)
            am = torch.cat([data["prompt_mask"], data["completion_mask"]], dim=1)
            cmask = torch.cat([torch.zeros_like(data["prompt_mask"]), data["completion_mask"]], dim=1).bool()
            ref = torch.cat([torch.zeros(data["prompt_mask"].shape), data["ref_per_token_logps"]], dim=1)
            adv = data["advantages"]
            as_rollout = _as_rollout(data, args.group)

            def step() -> float:
                lm.train()
                if args.shared_prompt:  # the same values in prefopt's right-padded rollout layout
                    logp = _to_trl_layout(shared_prompt_rollout_logps(lm, as_rollout), data)
                else:
                    logp = token_logps(lm, ids, am, cmask)
                out = grpo(logp, None, adv, cmask, ref_logp=ref, beta=args.beta)
                loss = aggregate(out.loss, cmask, "token-mean")
                loss.backward()
                opt.zero_grad(set_to_none=True)
                return float(loss.detach())

    else:
        trainer = _trl_trainer(args, model, tok, qs)
        checksum = init_adapter_(trainer.model, args.seed)
        opt_trl = trainer.optimizer
        rows = [{"prompt": q} for q in qs for _ in range(args.group)]  # RepeatSampler's order

        if args.part == "step":

            def step() -> float:
                # Trainer.training_step calls GRPOTrainer._prepare_inputs (generation, rewards, advantages,
                # reference log-probs) on the raw rows, then compute_loss and the backward
                loss = trainer.training_step(trainer.model, rows, None)
                opt_trl.step()
                opt_trl.zero_grad(set_to_none=True)
                info["completion_tokens"] = int(trainer._buffered_inputs[0]["completion_mask"].sum())
                return float(loss)

        else:

            def step() -> float:
                # training_step minus its _prepare_inputs (which would generate): compute_loss + backward
                trainer.model.train()
                loss = trainer.compute_loss(trainer.model, dict(data))
                trainer.accelerator.backward(loss)
                opt_trl.zero_grad(set_to_none=True)
                return float(loss.detach())

    reset = _reset_peak()
    base = _rss_kib("VmRSS")
    maxrss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times, cpu_times, losses = [], [], []
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
        "part": args.part,
        "time_s": statistics.median(times[1:]) if len(times) > 1 else times[0],
        "cold_time_s": times[0],
        "times": times,
        "cpu_time_s": statistics.median(cpu_times[1:]) if len(cpu_times) > 1 else cpu_times[0],
        "cpu_times": cpu_times,
        "peak_delta_mib": peak_delta / 1024.0,
        "peak_method": "clear_refs+VmHWM" if reset else "ru_maxrss delta",
        "losses": losses,
        "adapter_checksum": checksum,
        **info,
    }


def _run(cmd: list[str], what: str) -> dict[str, Any]:
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    )
    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:  # rc -9: killed, usually by the OOM killer
        raise SystemExit(f"worker {what} failed (return code {proc.returncode}):\n{proc.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(line[7:])
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", help="write the ratios, loss difference and all runs here")
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--prompts", type=int, default=1, help="prompts per step (G completions each)")
    ap.add_argument("--group", type=int, default=8, help="G, completions per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--beta", type=float, default=0.04)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--steps", type=int, default=3, help="steps per subprocess (the first is not timed)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--parts", default="loss,step", help="comma-separated: loss (b), step (a)")
    ap.add_argument("--merged", action="store_true", help="prefopt samples with HFSampler(merged=True)")
    ap.add_argument(
        "--shared-prompt",
        action="store_true",
        help="prefopt runs each prompt once for its G completions (sampler scoring and the loss forward)",
    )
    ap.add_argument("--impl", choices=(*IMPLS, "rollout"), help=argparse.SUPPRESS)  # worker mode
    ap.add_argument("--part", choices=("loss", "step"), default="loss", help=argparse.SUPPRESS)
    ap.add_argument("--rollout", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.impl == "rollout":
        print("RESULT " + json.dumps(_make_rollout(args)), flush=True)
        return
    if args.impl:
        print("RESULT " + json.dumps(_worker(args)), flush=True)
        return

    parts = args.parts.split(",")
    common = (
        [
            f"--{k.replace('_', '-')}={v}"
            for k, v in vars(args).items()
            if k not in ("json", "impl", "parts", "rounds", "part", "rollout", "merged", "shared_prompt")
        ]
        + (["--merged"] if args.merged else [])
        + (["--shared-prompt"] if args.shared_prompt else [])
    )
    me = [sys.executable, __file__]
    rollout_path = os.path.join(tempfile.mkdtemp(prefix="grpo_step_"), "rollout.pt")
    summary: dict[str, Any] = {}
    if "loss" in parts:
        summary["rollout"] = _run([*me, "--impl", "rollout", f"--rollout={rollout_path}", *common], "rollout")
        print(f"rollout {summary['rollout']}", flush=True)
    runs: list[dict[str, Any]] = []
    for part in parts:
        for r in range(args.rounds):
            order = IMPLS if r % 2 == 0 else IMPLS[::-1]
            for impl in order:
                res = _run(
                    [*me, "--impl", impl, "--part", part, f"--rollout={rollout_path}", *common],
                    f"{impl}/{part}",
                )
                res["round"] = r
                runs.append(res)
                print(
                    f"{part:4s} round {r} {impl:7s} step {res['time_s']:.2f}s (cpu {res['cpu_time_s']:.2f}s, "
                    f"cold {res['cold_time_s']:.2f}s) "
                    f"peak +{res['peak_delta_mib']:.0f} MiB  losses {[f'{x:.7f}' for x in res['losses']]}",
                    flush=True,
                )

    def med(impl: str, part: str, key: str) -> float:
        return statistics.median(x[key] for x in runs if x["impl"] == impl and x["part"] == part)

    for part in parts:
        s: dict[str, Any] = {
            impl: {
                "time_s": med(impl, part, "time_s"),
                "cpu_time_s": med(impl, part, "cpu_time_s"),
                "peak_delta_mib": med(impl, part, "peak_delta_mib"),
            }
            for impl in IMPLS
        }
        s["time_ratio"] = s["prefopt"]["time_s"] / s["trl"]["time_s"]
        s["cpu_time_ratio"] = s["prefopt"]["cpu_time_s"] / s["trl"]["cpu_time_s"]
        s["memory_ratio"] = s["prefopt"]["peak_delta_mib"] / s["trl"]["peak_delta_mib"]
        if part == "loss":
            first = {impl: next(x for x in runs if x["impl"] == impl and x["part"] == part) for impl in IMPLS}
            s["loss_abs_diff"] = abs(first["prefopt"]["losses"][0] - first["trl"]["losses"][0])
        summary[part] = s
    summary["adapter_checksums"] = {f"{x['impl']}/{x['part']}": x["adapter_checksum"] for x in runs}
    summary["load_after"] = os.getloadavg()
    summary["runs"] = runs
    summary["settings"] = {
        k: v for k, v in vars(args).items() if k not in ("impl", "json", "part", "rollout")
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
