"""PE-RLHF in the lab: REINFORCE (RLOO) with a rank-8 LoRA policy against full fine-tuning, to the same gold reward.

The question (Sidahmed et al. 2024, "PE-RLHF", arXiv 2403.10704): does a LoRA policy trained with
reinforcement learning reach the reward of a fully fine-tuned one, and at what fraction of the memory? In the
lab (``prefopt.lab``) the reward is the gold reward itself, so the answer is measured without a learned reward
model in between. Two variants run the same loop on the same prompts, samples and seeds:

- ``lora``: a ``prefopt.policy.LoraPolicy`` (rank 8, α = 16, all linear layers) on the reference LM; the
  reference is the same backbone with the adapters off.
- ``full``: every weight of a copy of the reference LM is trained; a second, frozen copy is the reference.

The loop is RLOO (Ahmadian et al. 2024, "Back to Basics", Eq. 9): ``k`` samples per prompt, the KL-penalised
reward ``r − β·Σ_t (log π − log π_ref)`` (the per-sample log-ratio estimate of KL(π‖π_ref)), leave-one-out
advantages from ``prefopt.rl.rloo_advantages`` and the registry's ``rloo`` loss, one Adam step per batch.
Every ``--eval-every`` steps ``prefopt.lab.evaluate_policy`` measures the gold reward, its quantile under the
reference and KL(π‖π_ref), each with a standard error.

    # the two runs in docs/lab_reward_lora.md
    python experiments/reinforce_lora_full.py --lab default --seeds 3 --eval-every 4 --rss-repeats 2 --json runs/reinforce_lora_default.json
    python experiments/reinforce_lora_full.py --lab tiny --json runs/reinforce_lora_tiny.json

The learning rates (LoRA 3e-3, full 1e-3) were picked once on the tiny lab: for each variant the largest of a
small grid (LoRA 3e-3, 1e-2; full 3e-4, 1e-3, 3e-3) whose gold reward rose at every evaluation of a 30-step,
one-seed run. ``--lab tiny`` (the default) is the small lab of the test suite (8 tokens, completions of 6, a
47k-parameter reference LM); ``--lab default`` runs the same on ``LabConfig()`` (1.5M parameters).

Memory is reported two ways. *Counted* (see ``train_memory``): bytes of all weights (for ``full`` including the
frozen reference copy), the gradients and Adam's two moments of the trainable weights, and the activations
autograd saves for backward in one training step. *Measured*: each variant is built and trained for
``--rss-steps`` steps in a separate Python process, which reports its peak resident set size (``VmHWM``) and
its resident size before the variant was built (the interpreter, torch and one loaded reference LM).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import peft
import torch

from prefopt.lab import Lab, LabConfig, evaluate_policy, lab_sampler, mean_ci95, reference_pool
from prefopt.logprobs import token_logps
from prefopt.masked import aggregate, seq_sum
from prefopt.policy import ANCHOR_ADAPTER, LoraPolicy
from prefopt.registry import get_loss
from prefopt.rl import rloo_advantages

RLOO = get_loss("rloo")
VARIANTS = ("lora", "full")
LABS = {"tiny": LabConfig.tiny(), "default": LabConfig()}


class Variant:
    """One trainable policy and its frozen reference: ``lora`` (a ``LoraPolicy``, reference = adapters off) or
    ``full`` (a trainable copy of the reference LM next to a frozen copy)."""

    def __init__(self, name: str, model: torch.nn.Module, rank: int, seed: int) -> None:
        """``model``: a freshly loaded reference LM (``lab.reference()``); it becomes the trainable policy."""
        if name not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {name!r}")
        self.name = name
        torch.manual_seed(seed)  # the LoRA initialisation (lora_A); full fine-tuning draws nothing here
        self.ref: torch.nn.Module | None
        if name == "lora":
            cfg = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", lora_dropout=0.0)
            self.policy: torch.nn.Module = LoraPolicy(model, cfg)
            self.lm: torch.nn.Module = self.policy.model  # type: ignore[assignment]
            self.ref = None
        else:
            self.lm = model
            self.policy = model
            self.ref = copy.deepcopy(model).eval()
            for p in self.ref.parameters():
                p.requires_grad_(False)
            for p in self.lm.parameters():
                p.requires_grad_(True)

    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.policy.parameters() if p.requires_grad]

    def ref_token_logps(self, rows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        ones = torch.ones_like(rows)
        with torch.no_grad():
            if self.ref is None:
                with self.policy.reference():  # type: ignore[operator]
                    return token_logps(self.lm, rows, ones, mask)
            return token_logps(self.ref, rows, ones, mask)

    def sample(self, lab: Lab, prompts: torch.Tensor, k: int) -> torch.Tensor:
        return sample_rows(self.policy, lab, prompts, k)

    def evaluate(self, lab: Lab, pool: Any, samples: int, seed: int) -> dict[str, float]:
        ref: Any = "auto" if self.ref is None else self.ref
        return evaluate_policy(
            lab, self.policy, pool, samples_per_prompt=samples, reference=ref, seed=seed
        ).__dict__


def sample_rows(model: torch.nn.Module, lab: Lab, prompts: torch.Tensor, k: int) -> torch.Tensor:
    """``k`` completions per prompt from ``model`` (a ``LoraPolicy`` or an LM) → full rows ``(P·k, T)``."""
    sampler = lab_sampler(lab, model, reference=None)
    with torch.no_grad():
        roll = sampler.generate({"input_ids": prompts, "attention_mask": torch.ones_like(prompts)}, n=k)
    return roll.input_ids


def completion_mask(rows: torch.Tensor, lab: Lab) -> torch.Tensor:
    mask = torch.zeros_like(rows, dtype=torch.bool)
    mask[:, 1 + lab.config.prompt_len :] = True
    return mask


def rloo_loss(
    v: Variant, lab: Lab, rows: torch.Tensor, k: int, beta: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """The on-policy RLOO loss of ``rows`` (``k`` per prompt, in prompt order) on ``r − β·Σ_t log(π/π_ref)``,
    reduced as the mean over sequences of ``−A_i·Σ_t log π(y_{i,t})``."""
    mask = completion_mask(rows, lab)
    logp = token_logps(v.lm, rows, torch.ones_like(rows), mask)
    ref_logp = v.ref_token_logps(rows, mask)
    kl = seq_sum(logp.detach() - ref_logp, mask)
    gold = lab.gold_reward(rows[:, 1 + lab.config.prompt_len :]).to(logp.dtype)
    adv = rloo_advantages((gold - beta * kl).view(-1, k)).reshape(-1)
    loss = aggregate(RLOO(logp, None, adv, mask).loss, mask, "seq-mean-token-sum")
    return loss, {"gold": float(gold.mean()), "kl": float(kl.mean())}


def train_memory(v: Variant, lab: Lab, rows: torch.Tensor, k: int, beta: float) -> dict[str, int]:
    """Bytes of one training step, counted: all weights (both copies for ``full``), the gradients and Adam's two
    moments of the trainable weights, and the tensors autograd saves for backward (once per storage, weights
    excluded). The sampling pass is not counted (it is the same for both variants)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        return t

    def nbytes(params: Any) -> int:
        return sum(p.numel() * p.element_size() for p in params)

    params = list(v.policy.parameters())
    ref_params = list(v.ref.parameters()) if v.ref is not None else []
    trainable = nbytes(v.trainable())
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = rloo_loss(v, lab, rows, k, beta)
    loss.backward()
    v.policy.zero_grad(set_to_none=True)
    weight_ptrs = {p.untyped_storage().data_ptr() for p in params + ref_params}
    activations = sum(n for ptr, n in seen.items() if ptr not in weight_ptrs)
    out = {
        "weights": nbytes(params),
        # LoraPolicy always holds an EMA-anchor adapter (J-BOND's); REINFORCE never uses it, but it is in memory
        "anchor_adapter": nbytes(p for n, p in v.policy.named_parameters() if f".{ANCHOR_ADAPTER}." in n),
        "reference_copy": nbytes(ref_params),
        "trainable_weights": trainable,
        "gradients": trainable,
        "adam_state": 2 * trainable,
        "activations": activations,
    }
    out["trainable_state"] = 4 * trainable  # trainable weights + gradients + both Adam moments
    out["total"] = out["weights"] + out["reference_copy"] + 3 * trainable + activations
    return out


def run(variant: str, seed: int, lab: Lab, pool: Any, args: argparse.Namespace) -> dict[str, Any]:
    v = Variant(variant, lab.reference()[0], args.rank, seed)
    lr = args.lr_lora if variant == "lora" else args.lr_full
    params = v.trainable()
    g = torch.Generator().manual_seed(1000 + seed)  # the same prompts for both variants of a seed
    memory = train_memory(
        v, lab, v.sample(lab, lab.sample_prompts(args.batch, seed=77), args.k), args.k, args.beta
    )
    opt = torch.optim.Adam(params, lr=lr)
    torch.manual_seed(20_000 + seed)  # the same sampling stream for both variants of a seed
    evals: list[dict[str, Any]] = []
    t0 = time.perf_counter()

    def evaluate(step: int, train_stats: dict[str, float] | None) -> None:
        v.policy.eval()
        ev = v.evaluate(lab, pool, args.eval_samples, seed)
        evals.append({"step": step, **ev, "seconds": time.perf_counter() - t0})
        extra = f"  batch gold {train_stats['gold']:.3f} KL {train_stats['kl']:.3f}" if train_stats else ""
        print(
            f"  {variant} seed {seed} step {step:>4}: gold {ev['reward']:.3f} ± {ev['reward_se']:.3f}  "
            f"quantile {ev['quantile']:.3f}  KL {ev['kl']:.3f} ± {ev['kl_se']:.3f}{extra}  "
            f"({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )

    evaluate(0, None)
    stats: dict[str, float] = {}
    train_seconds = 0.0
    for step in range(1, args.steps + 1):
        t_step = time.perf_counter()
        prompts = lab.sample_prompts(args.batch, generator=g)
        v.policy.eval()
        rows = v.sample(lab, prompts, args.k)
        v.policy.train()
        loss, stats = rloo_loss(v, lab, rows, args.k, args.beta)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        train_seconds += time.perf_counter() - t_step
        if step % args.eval_every == 0 or step == args.steps:
            evaluate(step, stats)
    return {
        "variant": variant,
        "seed": seed,
        "lr": lr,
        "trainable_params": sum(p.numel() for p in params),
        "memory_bytes": memory,
        "evals": evals,
        "seconds": time.perf_counter() - t0,
        "train_seconds": train_seconds,  # sampling + update, evaluations excluded
    }


# ---------------------------------------------------------------------------------------------- peak RSS
def _proc_status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def probe(args: argparse.Namespace) -> int:
    """Child process: load the reference LM, note the resident size, reset the peak where the kernel allows it,
    build ``args.probe`` and train it ``--rss-steps`` steps; print one JSON line with the sizes (KiB)."""
    torch.set_num_threads(args.threads)
    lab = Lab(LABS[args.lab])
    model, _ = lab.reference()
    g = torch.Generator().manual_seed(1000)
    prompts = lab.sample_prompts(args.batch, generator=g)
    # warm-up: one sampling pass and one forward of the reference, so lazy imports and allocator pools are
    # in the baseline, not in the variant's peak
    rows = sample_rows(model, lab, prompts, args.k)
    with torch.no_grad():
        token_logps(model, rows, torch.ones_like(rows), completion_mask(rows, lab))
    before = _proc_status_kib("VmRSS")
    reset = False
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux ≥ 4.0)
        reset = True
    except OSError:
        pass
    v = Variant(args.probe, model, args.rank, 0)
    del model
    opt = torch.optim.Adam(v.trainable(), lr=args.lr_lora if args.probe == "lora" else args.lr_full)
    for step in range(args.rss_steps):
        if step:
            prompts = lab.sample_prompts(args.batch, generator=g)
        rows = v.sample(lab, prompts, args.k)
        loss, _ = rloo_loss(v, lab, rows, args.k, args.beta)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(v.trainable(), 1.0)
        opt.step()
    print(
        "PROBE "
        + json.dumps(
            {
                "variant": args.probe,
                "rss_before_kib": before,
                "peak_rss_kib": _proc_status_kib("VmHWM"),
                "peak_reset": reset,
                "steps": args.rss_steps,
            }
        ),
        flush=True,
    )
    return 0


def measure_rss(args: argparse.Namespace, variants: list[str]) -> list[dict[str, Any]]:
    """Peak RSS of each variant, each in its own process, ``--rss-repeats`` times (alternating variants)."""
    out = []
    common = [
        "--lab", args.lab, "--threads", str(args.threads), "--rank", str(args.rank), "--batch", str(args.batch),
        "--k", str(args.k), "--beta", str(args.beta), "--rss-steps", str(args.rss_steps),
        "--lr-lora", str(args.lr_lora), "--lr-full", str(args.lr_full),
    ]  # fmt: skip
    for rep in range(args.rss_repeats):
        for variant in variants:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--probe", variant, *common]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE ")]
            if proc.returncode != 0 or not lines:
                raise RuntimeError(
                    f"RSS probe of {variant} failed:\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}"
                )
            r = json.loads(lines[-1][len("PROBE ") :])
            r["repeat"] = rep
            print(
                f"  peak RSS {variant}: {r['peak_rss_kib'] / 1024:.1f} MiB "
                f"(before building it: {r['rss_before_kib'] / 1024:.1f} MiB)",
                flush=True,
            )
            out.append(r)
    return out


# ---------------------------------------------------------------------------------------------- summary
def summarise(runs: list[dict[str, Any]], variants: list[str], fraction: float) -> dict[str, Any]:
    """Curves (mean ± 95% t-interval over seeds per eval step), final gold/KL, the paired LoRA − full difference,
    the target gold ``r_0 + fraction·(full's final mean − r_0)`` and the first eval step reaching it."""
    curves: dict[str, list[dict[str, float]]] = {}
    final: dict[str, dict[str, float]] = {}
    for v in variants:
        rs = sorted((r for r in runs if r["variant"] == v), key=lambda r: r["seed"])
        if not rs:
            continue
        rows = []
        for i, ev in enumerate(rs[0]["evals"]):
            gold = [r["evals"][i]["reward"] for r in rs]
            kl = [r["evals"][i]["kl"] for r in rs]
            q = [r["evals"][i]["quantile"] for r in rs]
            gm, gc = mean_ci95(gold)
            km, kc = mean_ci95(kl)
            qm, qc = mean_ci95(q)
            rows.append(
                {
                    "step": ev["step"],
                    "gold": gm,
                    "gold_ci": gc,
                    "kl": km,
                    "kl_ci": kc,
                    "quantile": qm,
                    "quantile_ci": qc,
                }
            )
        curves[v] = rows
        last = rows[-1]
        final[v] = {
            "seeds": len(rs),
            **{key: last[key] for key in ("gold", "gold_ci", "kl", "kl_ci", "quantile", "quantile_ci")},
        }
        # the highest gold reward each seed reached at any evaluation (a run may peak before its last step)
        final[v]["best_gold"], final[v]["best_gold_ci"] = mean_ci95(
            [max(e["reward"] for e in r["evals"]) for r in rs]
        )
    out: dict[str, Any] = {"curves": curves, "final": final}
    seeds = sorted({r["seed"] for r in runs})
    by = {(r["variant"], r["seed"]): r for r in runs}
    paired = [s for s in seeds if ("lora", s) in by and ("full", s) in by]
    if paired:
        d = [by["lora", s]["evals"][-1]["reward"] - by["full", s]["evals"][-1]["reward"] for s in paired]
        dk = [by["lora", s]["evals"][-1]["kl"] - by["full", s]["evals"][-1]["kl"] for s in paired]
        out["lora_minus_full"] = {"gold": mean_ci95(d), "kl": mean_ci95(dk), "seeds": paired}
    if "full" in curves:
        r0 = sum(by[v, s]["evals"][0]["reward"] for v, s in by) / len(by)
        target = r0 + fraction * (final["full"]["gold"] - r0)
        reach: dict[str, Any] = {"reference_gold": r0, "fraction": fraction, "target": target}
        for v in curves:
            per_seed = {}
            for s in seeds:
                if (v, s) in by:
                    per_seed[s] = next((e["step"] for e in by[v, s]["evals"] if e["reward"] >= target), None)
            mean_step = next((c["step"] for c in curves[v] if c["gold"] >= target), None)
            reach[v] = {"per_seed": per_seed, "mean_curve": mean_step}
        out["target"] = reach
    return out


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for v, rows in summary["curves"].items():
        steps = [r["step"] for r in rows]
        for ax, key in ((a1, "gold"), (a2, "kl")):
            m = [r[key] for r in rows]
            c = [
                r[f"{key}_ci"] if r[f"{key}_ci"] == r[f"{key}_ci"] else 0.0 for r in rows
            ]  # NaN → 0 (1 seed)
            label = "LoRA rank 8" if v == "lora" else "full fine-tuning"
            (line,) = ax.plot(steps, m, marker="o", ms=3, label=label)
            ax.fill_between(
                steps,
                [a - b for a, b in zip(m, c)],
                [a + b for a, b in zip(m, c)],
                color=line.get_color(),
                alpha=0.2,
            )
    if "target" in summary:
        t = summary["target"]
        a1.axhline(
            t["target"],
            color="k",
            ls="--",
            lw=0.8,
            label=f"target: {100 * t['fraction']:.0f}% of full's gain",
        )
        a1.axhline(t["reference_gold"], color="gray", ls=":", lw=0.8, label="reference")
    a1.set_xlabel("step")
    a1.set_ylabel("gold reward (mean of policy samples)")
    a1.set_title("gold reward (mean over seeds, 95% interval)")
    a2.set_xlabel("step")
    a2.set_ylabel("KL(π ‖ π_ref) [nats]")
    a2.set_title("KL to the reference")
    for ax in (a1, a2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    ap.add_argument(
        "--json", default="runs/reinforce_lora_full.json", help="results file (rewritten after every run)"
    )
    ap.add_argument("--plot", default=None, help="figure path (default: next to --json, .png)")
    ap.add_argument("--variants", default="lora,full", help="comma list of lora, full")
    ap.add_argument("--seeds", type=int, default=5, help="number of seeds")
    ap.add_argument(
        "--first-seed", type=int, default=0, help="the first seed (seeds first-seed … first-seed+seeds−1)"
    )
    ap.add_argument(
        "--resume",
        action="store_true",
        help="keep the runs already in --json (same settings) and add the missing ones",
    )
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    ap.add_argument("--batch", type=int, default=32, help="prompts per step")
    ap.add_argument("--k", type=int, default=4, help="samples per prompt (RLOO group)")
    ap.add_argument("--beta", type=float, default=0.05, help="KL coefficient β of the reward r − β·KL")
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank (α = 2·rank)")
    ap.add_argument("--lr-lora", type=float, default=3e-3, help="Adam learning rate, LoRA")
    ap.add_argument("--lr-full", type=float, default=1e-3, help="Adam learning rate, full fine-tuning")
    ap.add_argument("--eval-every", type=int, default=2, help="steps between evaluations")
    ap.add_argument("--eval-prompts", type=int, default=16, help="evaluation prompts (fixed)")
    ap.add_argument("--eval-samples", type=int, default=32, help="policy samples per evaluation prompt")
    ap.add_argument(
        "--pool", type=int, default=1024, help="reference samples per evaluation prompt (quantiles)"
    )
    ap.add_argument(
        "--target-fraction", type=float, default=0.9, help="target = this fraction of full's final gain"
    )
    ap.add_argument(
        "--rss-steps", type=int, default=5, help="training steps of each peak-RSS process (0: no RSS)"
    )
    ap.add_argument("--rss-repeats", type=int, default=3, help="peak-RSS processes per variant")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument(
        "--lab",
        default="tiny",
        choices=sorted(LABS),
        help="tiny: LabConfig.tiny(); default: LabConfig()",
    )
    ap.add_argument("--tiny", action="store_true", help="the same as --lab tiny")
    ap.add_argument(
        "--probe", choices=VARIANTS, default=None, help=argparse.SUPPRESS
    )  # internal: one RSS process
    args = ap.parse_args(argv)
    if args.tiny:
        args.lab = "tiny"
    for name in ("steps", "batch", "rank", "eval_every", "eval_prompts", "eval_samples", "seeds"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.k < 2:
        ap.error(f"--k must be >= 2 (RLOO needs another sample as baseline), got {args.k}")
    if args.pool < 2:
        ap.error(f"--pool must be >= 2, got {args.pool}")
    if args.beta < 0:
        ap.error(f"--beta must be >= 0, got {args.beta}")
    if not 0 < args.target_fraction <= 1:
        ap.error(f"--target-fraction must be in (0, 1], got {args.target_fraction}")
    if args.probe is not None:
        return probe(args)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = sorted(set(variants) - set(VARIANTS))
    if bad or not variants:
        ap.error(f"--variants: unknown {bad}; choose from {', '.join(VARIANTS)}")
    torch.set_num_threads(args.threads)
    t_start, c_start = time.perf_counter(), time.process_time()
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {
        k: v
        for k, v in vars(args).items()
        if k
        not in (
            "json",
            "plot",
            "resume",
            "probe",
            "seeds",
            "first_seed",
            "variants",
            "tiny",
            "rss_steps",
            "rss_repeats",
        )
    }
    runs: list[dict[str, Any]] = []
    previous: dict[str, Any] = {}
    if args.resume and out.exists():
        previous = json.loads(out.read_text())
        if previous.get("run_settings") != settings:
            ap.error(f"--resume: {out} was written with other settings: {previous.get('run_settings')}")
        runs = previous["runs"]
    lab = Lab(LABS[args.lab])
    reference, rep = lab.reference(progress=True)
    print(
        f"reference LM: {rep.num_parameters:,} parameters, NLL {rep.nll_per_token:.4f} nats/token "
        f"(language entropy {rep.entropy_per_token:.4f}), {'cached' if rep.loaded else f'{rep.seconds:.0f} s'}",
        flush=True,
    )
    prompts = lab.sample_prompts(args.eval_prompts, seed=12345)
    pool = reference_pool(lab, reference, prompts, samples_per_prompt=args.pool, seed=0)
    del reference
    done = {(r["variant"], r["seed"]) for r in runs}
    rss = previous.get("peak_rss", [])

    def write() -> dict[str, Any]:
        result = {
            "run_settings": settings,
            "settings": vars(args),
            "reference": rep.__dict__,
            "runs": runs,
            "summary": summarise(runs, variants, args.target_fraction),
            "peak_rss": rss,
            "wall_seconds": time.perf_counter() - t_start + previous.get("wall_seconds", 0.0),
            "cpu_seconds": time.process_time() - c_start + previous.get("cpu_seconds", 0.0),
        }
        out.write_text(json.dumps(result, indent=1))
        return result

    for seed in range(args.first_seed, args.first_seed + args.seeds):
        for variant in variants:
            if (variant, seed) in done:
                continue
            r = run(variant, seed, lab, pool, args)
            last = r["evals"][-1]
            print(
                f"{variant} seed {seed}: gold {r['evals'][0]['reward']:.3f} -> {last['reward']:.3f} ± {last['reward_se']:.3f}, "
                f"KL {last['kl']:.3f} ± {last['kl_se']:.3f}, trainable {r['trainable_params']:,}, "
                f"counted memory {r['memory_bytes']['total'] / 2**20:.2f} MiB  ({r['seconds']:.0f} s)",
                flush=True,
            )
            runs.append(r)
            write()
    if args.rss_steps > 0 and not rss:
        print("peak RSS, one process per variant:", flush=True)
        rss = measure_rss(args, variants)
    result = write()
    s = result["summary"]
    for v, f in s["final"].items():
        print(
            f"{v:<5} final gold {f['gold']:.3f} ± {f['gold_ci']:.3f}   KL {f['kl']:.3f} ± {f['kl_ci']:.3f}  ({f['seeds']} seeds)"
        )
    if "lora_minus_full" in s:
        (d, dc), (dk, dkc) = s["lora_minus_full"]["gold"], s["lora_minus_full"]["kl"]
        print(f"LoRA − full: gold {d:+.3f} ± {dc:.3f}, KL {dk:+.3f} ± {dkc:.3f}")
    if "target" in s:
        t = s["target"]
        print(
            f"target gold {t['target']:.3f} (reference {t['reference_gold']:.3f}): "
            + ", ".join(f"{v} {t[v]}" for v in variants if v in t)
        )
    fig = Path(args.plot) if args.plot else out.with_suffix(".png")
    try:
        plot(s, fig)
    except ImportError:
        print("matplotlib missing: no figure")
    print(
        f"wrote {out} and {fig} (wall {result['wall_seconds']:.0f} s, CPU {result['cpu_seconds']:.0f} s)",
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
