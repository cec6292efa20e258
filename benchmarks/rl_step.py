"""One REINFORCE step, LoRA on one backbone vs full fine-tuning with a separate reference copy (PE-RLHF §5).

The step (same model, prompts, batch and seed in both configurations):
sampling (``prefopt.sampling.HFSampler``: ``generate`` + behaviour log-probs + reference log-probs) →
programmatic score → KL-penalized return (``rl.kl_penalized_rewards``) → policy log-probs with grad
(``token_logps``) → ``reinforce`` loss → backward → AdamW step.

* ``lora``: ``LoraPolicy`` (r=8, all-linear); the reference is the same backbone with adapters off; AdamW
  on the adapter only. Sampling uses ``HFSampler(merged=True)`` (one merged weight per layer swapped in
  during ``generate``: the decode steps do not pay the adapter matmuls; behaviour log-probs stay unmerged)
  unless ``--unmerged-sampling``.
* ``full``: every parameter trains; the reference is a frozen ``copy.deepcopy`` of the initial model;
  AdamW on all 134.5M parameters.

``--value`` makes it PE-RLHF's REINFORCE *with a learned value baseline* (per-token ``V(x, y_<t)``,
``reinforce(..., values)``, value coefficient 0.1): ``lora`` reads the values from a critic adapter and scalar
head on the same backbone (``LoraPolicy(..., value_head=True, value_adapter=True)``); ``full`` from a
separate value model, a ``deepcopy`` of the backbone plus a scalar head, trained in full.

Completions have a fixed length (``max_new_tokens``) unless ``--natural-eos``: the two configurations'
policies drift apart after the first update, and with natural EOS their sample lengths (hence sampling time)
would differ for reasons unrelated to LoRA.

Method. Every measurement runs in a fresh subprocess (``--_worker``), so its peak resident set size
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``, which includes everything torch allocates on CPU) belongs to
that configuration alone. A worker loads the model, builds its configuration, runs ``--warmup`` untimed steps
and ``--steps`` timed steps (wall clock and process CPU time), then reports its peak RSS and the RSS right
after loading the model. The parent alternates lora / full / lora / full … for ``--rounds`` rounds and
reports medians over all timed steps (time) and over rounds (memory), and the ratios LoRA / full:
``memory_ratio`` (peak RSS, whole process: interpreter, libraries and weights included) and
``memory_ratio_over_load`` (peak minus RSS after load: what the RL step itself adds), ``time_ratio`` (median
wall time) and ``cpu_time_ratio`` (median process CPU time, less sensitive to other jobs on a shared machine).

    python benchmarks/rl_step.py --json /tmp/rl_step.json
    python benchmarks/rl_step.py --tiny --rounds 1 --steps 1      # seconds, tiny random model
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

import torch


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _load(args: argparse.Namespace) -> tuple[Any, Any]:
    if args.tiny:
        from prefopt.testing import char_tokenizer, tiny_causal_lm

        tok = char_tokenizer()
        return tiny_causal_lm("llama", vocab_size=len(tok), seed=0), tok
    from prefopt.models import load_smollm2

    return load_smollm2()


def _worker(args: argparse.Namespace) -> dict[str, Any]:
    import peft

    from prefopt import rl
    from prefopt.data import PromptCollator, load_builtin_pairs
    from prefopt.logprobs import token_logps
    from prefopt.losses.policy_gradient import reinforce
    from prefopt.masked import aggregate
    from prefopt.policy import LoraPolicy
    from prefopt.sampling import HFSampler

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, tok = _load(args)
    rss_loaded = _rss_mb()
    values_fn: Any = None
    if args.config == "lora":
        cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0, bias="none")
        policy: Any = LoraPolicy(model, cfg, value_head=args.value, value_adapter=args.value)
        lm, params, reference = policy.model, policy.trainable_parameters(), "auto"
        if args.value:
            values_fn = policy.values
    else:
        reference = copy.deepcopy(model).eval()
        for p in reference.parameters():
            p.requires_grad_(False)
        policy = lm = model
        params = [p for p in model.parameters()]
        if args.value:
            backbone = copy.deepcopy(model.get_decoder()).train()
            head = torch.nn.Linear(model.config.hidden_size, 1)
            params += [*backbone.parameters(), *head.parameters()]

            def values_fn(ids: torch.Tensor, am: torch.Tensor) -> torch.Tensor:
                return head(backbone(input_ids=ids, attention_mask=am).last_hidden_state).squeeze(-1)

        for p in params:
            p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-6, weight_decay=0.0)
    # Fixed-length completions by default: the stop token is the last vocabulary entry (a token these models
    # do not produce in practice), so both configurations generate exactly max_new_tokens tokens per row and
    # the timing does not depend on how the two policies' samples happen to end (lengths are reported).
    eos = None if args.natural_eos else [len(tok) - 1]
    sampler = HFSampler(
        policy,
        tok,
        reference=reference,
        max_new_tokens=args.max_new_tokens,
        temperature=1.0,
        eos_token_id=eos,
        merged=args.config == "lora" and not args.unmerged_sampling,
    )
    qs = [r["prompt"] for r in load_builtin_pairs()][: args.prompts]
    prompts = PromptCollator(tok)(qs)

    def step() -> float:
        roll = sampler.generate(prompts, n=args.n)
        scores = roll.completion_len.float() / args.max_new_tokens  # any programmatic score will do
        pen = rl.kl_penalized_rewards(scores, roll.logp, roll.ref_logp, roll.completion_mask, beta=0.05)
        lm.train()
        logp = token_logps(lm, roll.input_ids, roll.attention_mask, roll.completion_mask)
        v_before = None
        if values_fn is not None:
            values = values_fn(roll.input_ids, roll.attention_mask)
            # values[:, i] has read tokens 0..i; the baseline of token t is the value of the state y_<t
            v_before = torch.cat([values.new_zeros(values.shape[0], 1), values[:, :-1]], dim=1)
        mask, ret = roll.completion_mask, pen.sequence_rewards
        if v_before is None:
            out = reinforce(logp, None, ret, mask)
        else:
            adv = ret.unsqueeze(1) - v_before.detach()
            out = reinforce(logp, None, adv, mask, values=v_before, returns=ret, value_coef=0.1)
        opt.zero_grad(set_to_none=True)
        aggregate(out.loss, mask, "seq-mean-token-sum").backward()
        opt.step()
        lm.eval()
        return float(roll.completion_len.float().mean())

    for _ in range(args.warmup):
        step()
    walls, cpus, lengths = [], [], []
    for _ in range(args.steps):
        w0, c0 = time.perf_counter(), time.process_time()
        lengths.append(step())
        walls.append(time.perf_counter() - w0)
        cpus.append(time.process_time() - c0)
    return {
        "config": args.config,
        "wall_s": walls,
        "cpu_s": cpus,
        "completion_len": lengths,
        "peak_rss_mb": _rss_mb(),
        "rss_after_load_mb": rss_loaded,
        "trainable_params": sum(p.numel() for p in params),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None, help="write results (memory_ratio, time_ratio, ...) here")
    ap.add_argument("--rounds", type=int, default=2, help="A/B rounds (one subprocess per config per round)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per subprocess")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--n", type=int, default=2, help="samples per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tiny", action="store_true", help="tiny random model instead of SmolLM2-135M")
    ap.add_argument(
        "--natural-eos", action="store_true", help="stop at the tokenizer's EOS (variable lengths)"
    )
    ap.add_argument("--value", action="store_true", help="REINFORCE with a learned value baseline (PE-RLHF)")
    ap.add_argument(
        "--unmerged-sampling", action="store_true", help="LoRA arm samples through the adapters (no merge)"
    )
    ap.add_argument("--_worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--config", choices=("lora", "full"), default="lora", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._worker:
        print("RESULT " + json.dumps(_worker(args)), flush=True)
        return
    runs: dict[str, list[dict[str, Any]]] = {"lora": [], "full": []}
    base = [a for a in sys.argv[1:] if a != "--json" and not a.endswith(".json")]
    for r in range(args.rounds):
        for config in ("lora", "full"):
            cmd = [sys.executable, __file__, *base, "--_worker", "--config", config]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                sys.exit(f"worker {config} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
            res = json.loads(line[len("RESULT ") :])
            runs[config].append(res)
            print(
                f"round {r} {config:4s} wall {statistics.median(res['wall_s']):.2f}s "
                f"cpu {statistics.median(res['cpu_s']):.2f}s peak_rss {res['peak_rss_mb']:.0f}MiB "
                f"(after load {res['rss_after_load_mb']:.0f}MiB) len {statistics.mean(res['completion_len']):.1f}",
                flush=True,
            )

    def med(config: str, key: str) -> float:
        return statistics.median(x for res in runs[config] for x in res[key])

    def med_mem(config: str, key: str) -> float:
        return statistics.median(res[key] for res in runs[config])

    summary = {
        "model": "tiny" if args.tiny else "SmolLM2-135M-Instruct",
        "batch": {"prompts": args.prompts, "n": args.n, "max_new_tokens": args.max_new_tokens},
        "natural_eos": args.natural_eos,
        "value_baseline": args.value,
        "lora_merged_sampling": not args.unmerged_sampling,
        "completion_len": {
            c: statistics.mean(x for res in runs[c] for x in res["completion_len"]) for c in runs
        },
        "threads": args.threads,
        "lora": {
            "wall_s": med("lora", "wall_s"),
            "cpu_s": med("lora", "cpu_s"),
            "peak_rss_mb": med_mem("lora", "peak_rss_mb"),
            "rss_after_load_mb": med_mem("lora", "rss_after_load_mb"),
            "trainable_params": runs["lora"][0]["trainable_params"],
        },
        "full": {
            "wall_s": med("full", "wall_s"),
            "cpu_s": med("full", "cpu_s"),
            "peak_rss_mb": med_mem("full", "peak_rss_mb"),
            "rss_after_load_mb": med_mem("full", "rss_after_load_mb"),
            "trainable_params": runs["full"][0]["trainable_params"],
        },
    }
    lo, fu = summary["lora"], summary["full"]
    summary["memory_ratio"] = lo["peak_rss_mb"] / fu["peak_rss_mb"]
    summary["memory_ratio_over_load"] = (lo["peak_rss_mb"] - lo["rss_after_load_mb"]) / max(
        fu["peak_rss_mb"] - fu["rss_after_load_mb"], 1e-9
    )
    summary["time_ratio"] = lo["wall_s"] / fu["wall_s"]
    summary["cpu_time_ratio"] = lo["cpu_s"] / fu["cpu_s"]
    summary["runs"] = runs
    print(
        f"LoRA/full: memory_ratio {summary['memory_ratio']:.3f} (over load {summary['memory_ratio_over_load']:.3f}), "
        f"time_ratio {summary['time_ratio']:.3f}, cpu_time_ratio {summary['cpu_time_ratio']:.3f}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
