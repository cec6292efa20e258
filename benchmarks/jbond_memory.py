"""Peak memory and time of one J-BOND step: ONE backbone (LoRA policy + EMA anchor adapter + reference = adapters
off) against THREE model copies (full-weight policy + separate anchor and reference models, EMA on full weights).

What one step does in both configurations (sampling is left out: the "samples" are fixed random token
sequences of the same shapes, so both configurations do exactly the same arithmetic on the same tokens)::

    anchor log-probs of the policy samples              (no grad)
    reference log-probs of the policy samples           (no grad; what a KL(π‖π_ref) monitor needs)
    policy forward + backward on [policy samples; best anchor samples]   (prefopt.losses.bond.jbond)
    Adam update                                          (LoRA adapter only  |  all weights)
    anchor EMA  θ_a ← (1−η)·θ_a + η·θ                    (LoraPolicy.update_anchor_  |  prefopt.policy.ema_update_(decay=1−η))

Method: every measurement is a fresh subprocess (``--child CONFIG``) that imports torch, loads the model, runs
``--steps`` steps after one warm-up step and reports ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (the peak
resident set of the whole process, model loading included) plus its resident set right after the imports
(``rss_after_imports``, from ``/proc/self/statm``) and the per-step wall times. The parent runs the two
configurations alternately (A, B, A, B, …, ``--repeats`` each) and reports medians and the ratio
``memory_ratio = peak RSS(one backbone) / peak RSS(three copies)``; ``memory_ratio_net`` does the same after
subtracting each process's RSS after imports (the memory the experiment itself adds).

    python benchmarks/jbond_memory.py --json runs/jbond_memory.json          # SmolLM2-135M-Instruct
    python benchmarks/jbond_memory.py --tiny                                 # tiny random Llama (tests)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

CONFIGS = ("one_backbone", "three_copies")


def _rss_now_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _mem_available_mib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def child(config: str, args: argparse.Namespace) -> dict[str, Any]:
    """Run one configuration in this process and return its measurements (see the module docstring)."""
    import copy

    import peft
    import torch

    from prefopt.logprobs import token_logps
    from prefopt.losses.bond import jbond
    from prefopt.masked import seq_sum
    from prefopt.policy import LoraPolicy, ema_update_
    from prefopt.types import BestOfNSamples

    rss_imports = _rss_now_mib()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.tiny:
        from prefopt.testing import tiny_causal_lm

        model = tiny_causal_lm("llama", vocab_size=512, hidden_size=64, num_layers=2, seed=0)
    else:
        from prefopt.models import load_smollm2

        model, _ = load_smollm2()
    vocab = model.config.vocab_size
    b, p, c = args.batch, args.prompt_len, args.completion_len
    t = p + c
    gen = torch.Generator().manual_seed(1)
    pol_ids = torch.randint(3, vocab, (b, t), generator=gen)
    best_ids = torch.randint(3, vocab, (b, t), generator=gen)
    am = torch.ones(b, t, dtype=torch.long)
    cm = torch.zeros(b, t, dtype=torch.bool)
    cm[:, p:] = True
    both_ids, both_am, both_cm = torch.cat([pol_ids, best_ids]), torch.cat([am, am]), torch.cat([cm, cm])
    r_pol = torch.randn(b, generator=gen)
    r_anc = torch.randn(b, 2, generator=gen)

    def seq(m: Any, ids: torch.Tensor, a: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        lp = token_logps(m, ids, a, mask)
        return seq_sum(lp, mask)

    if config == "one_backbone":
        cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0, bias="none")
        policy = LoraPolicy(model, cfg)  # anchor rank 16
        params = policy.trainable_parameters()
        lm = policy.model

        def anchor_logp() -> torch.Tensor:
            with policy.anchor():
                return seq(lm, pol_ids, am, cm)

        def ref_logp() -> torch.Tensor:
            with policy.reference():
                return seq(lm, pol_ids, am, cm)

        def ema() -> None:
            policy.update_anchor_(1.0 - args.eta)

    elif config == "three_copies":
        lm = model
        reference = copy.deepcopy(model).requires_grad_(False).eval()
        anchor = copy.deepcopy(model).requires_grad_(False).eval()
        params = [q for q in lm.parameters() if q.requires_grad]

        def anchor_logp() -> torch.Tensor:
            with torch.no_grad():
                return seq(anchor, pol_ids, am, cm)

        def ref_logp() -> torch.Tensor:
            with torch.no_grad():
                return seq(reference, pol_ids, am, cm)

        def ema() -> None:
            ema_update_(list(anchor.parameters()), list(lm.parameters()), decay=1.0 - args.eta)

    else:
        raise ValueError(f"config must be one of {CONFIGS}, got {config!r}")
    # a shared machine: refuse rather than push it out of memory (Adam state + grads of the trainable weights)
    need_mib = 3 * sum(q.numel() * q.element_size() for q in params) / 2**20 + 256
    avail = _mem_available_mib()
    if avail is not None and avail < need_mib and not args.force:
        raise SystemExit(
            f"{config}: about {need_mib:.0f} MiB more are needed but only {avail:.0f} MiB are available; "
            "wait for a quieter machine or pass --force"
        )
    opt = torch.optim.Adam(params, lr=1e-5)
    rss_loaded = _rss_now_mib()
    times = []
    for i in range(args.steps + 1):
        t0 = time.perf_counter()
        a_lp = anchor_logp()
        r_lp = ref_logp()
        lm.train()
        s = seq(lm, both_ids, both_am, both_cm)
        out = jbond(BestOfNSamples(s[:b], a_lp, r_pol, r_anc, s[b:]))
        opt.zero_grad(set_to_none=True)
        out.loss.mean().backward()
        opt.step()
        ema()
        lm.eval()
        if i:  # step 0 is the warm-up
            times.append(time.perf_counter() - t0)
        assert bool(r_lp.isfinite().all())
    return {
        "config": config,
        "peak_rss_mib": _peak_rss_mib(),
        "rss_after_imports_mib": rss_imports,
        "rss_after_setup_mib": rss_loaded,
        "step_seconds": times,
        "trainable_params": sum(q.numel() for q in params),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", choices=CONFIGS, help=argparse.SUPPRESS)
    ap.add_argument(
        "--tiny", action="store_true", help="tiny random Llama instead of SmolLM2-135M (for tests)"
    )
    ap.add_argument(
        "--batch", type=int, default=2, help="prompts per step (policy + best anchor sample each)"
    )
    ap.add_argument("--prompt-len", type=int, default=24)
    ap.add_argument("--completion-len", type=int, default=16)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per process (after one warm-up step)")
    ap.add_argument("--repeats", type=int, default=2, help="processes per configuration, run alternately")
    ap.add_argument("--eta", type=float, default=0.05)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--force", action="store_true", help="skip the free-memory check before the first step")
    ap.add_argument(
        "--json", default=None, help="write the results here (memory_ratio, time_ratio, raw runs)"
    )
    args = ap.parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args)), flush=True)
        return {}

    forward = [
        f"--batch={args.batch}",
        f"--prompt-len={args.prompt_len}",
        f"--completion-len={args.completion_len}",
        f"--steps={args.steps}",
        f"--eta={args.eta}",
        f"--threads={args.threads}",
        *(["--tiny"] if args.tiny else []),
        *(["--force"] if args.force else []),
    ]
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in CONFIGS}
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    for rep in range(args.repeats):
        for config in CONFIGS if rep % 2 == 0 else CONFIGS[::-1]:
            proc = subprocess.run(
                [sys.executable, os.path.abspath(__file__), "--child", config, *forward],
                capture_output=True,
                text=True,
                env=env,
            )
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                raise SystemExit(f"child {config} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
            res = json.loads(lines[-1][len("RESULT ") :])
            runs[config].append(res)
            print(
                f"[{rep}] {config:13s} peak RSS {res['peak_rss_mib']:8.1f} MiB  (after imports "
                f"{res['rss_after_imports_mib']:.1f})  step {statistics.median(res['step_seconds']):.3f} s",
                flush=True,
            )

    def med(config: str, key: str) -> float:
        vals = [r[key] for r in runs[config]]
        return float(statistics.median(vals))

    def med_step(config: str) -> float:
        return float(statistics.median([statistics.median(r["step_seconds"]) for r in runs[config]]))

    one, three = "one_backbone", "three_copies"
    net = {
        c: statistics.median([r["peak_rss_mib"] - r["rss_after_imports_mib"] for r in runs[c]])
        for c in CONFIGS
    }
    summary = {
        "model": "tiny random Llama" if args.tiny else "SmolLM2-135M-Instruct (float32)",
        "settings": {k: v for k, v in vars(args).items() if k not in ("child", "json")},
        "peak_rss_mib": {c: med(c, "peak_rss_mib") for c in CONFIGS},
        "peak_rss_net_mib": net,
        "step_seconds": {c: med_step(c) for c in CONFIGS},
        "trainable_params": {c: runs[c][0]["trainable_params"] for c in CONFIGS},
        "memory_ratio": med(one, "peak_rss_mib") / med(three, "peak_rss_mib"),
        "memory_ratio_net": net[one] / net[three],
        "time_ratio": med_step(one) / med_step(three),
        "runs": runs,
    }
    print(
        f"memory_ratio (one backbone / three copies, median peak RSS) = {summary['memory_ratio']:.3f}; "
        f"net of the import baseline = {summary['memory_ratio_net']:.3f}; time_ratio = {summary['time_ratio']:.3f}"
    )
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return summary


if __name__ == "__main__":
    main()
