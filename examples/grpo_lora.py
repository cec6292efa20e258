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

    python examples/grpo_lora.py --steps 20 --out runs/grpo
    python examples/grpo_lora.py --smoke --out /tmp/grpo          # tiny model, 2 steps
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
from prefopt.data import PromptCollator
from prefopt.logprobs import token_logps
from prefopt.losses.policy_gradient import grpo
from prefopt.masked import aggregate, masked_mean
from prefopt.policy import LoraPolicy
from prefopt.sampling import HFSampler

_INT = re.compile(r"-?\d+")


def arithmetic_reward(completions: list[str], answers: list[int]) -> torch.Tensor:
    """1.0 where the last integer in the completion equals the answer, else 0.0 (no integer → 0)."""
    out = []
    for text, ans in zip(completions, answers):
        found = _INT.findall(text)
        out.append(float(bool(found) and int(found[-1]) == ans))
    return torch.tensor(out)


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny model, 2 steps")
    ap.add_argument("--out", default="runs/grpo_lora")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--prompts-per-step", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=4, help="G completions per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--max-operand", type=int, default=9)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--beta", type=float, default=0.04, help="KL coefficient (k3, in the loss)")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-every", type=int, default=10, help="held-out evaluation every N steps (0 = off)")
    ap.add_argument("--eval-prompts", type=int, default=16)
    ap.add_argument("--eval-samples", type=int, default=4, help="samples per held-out problem")
    args = ap.parse_args()
    if args.smoke:
        args.steps, args.prompts_per_step, args.group_size, args.max_new_tokens, args.threads = 2, 2, 2, 6, 1
        args.eval_every, args.eval_prompts, args.eval_samples = 1, 2, 2
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    os.makedirs(args.out, exist_ok=True)

    model, tok = load_model(args)
    cfg = peft.LoraConfig(
        r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear", lora_dropout=0.0, bias="none"
    )
    policy = LoraPolicy(model, cfg)
    opt = torch.optim.AdamW(policy.trainable_parameters(), lr=args.lr, weight_decay=0.0)
    sampler = HFSampler(policy, tok, max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    collate = PromptCollator(tok, add_special_tokens=False)

    def render(problems: list[tuple[str, int]]) -> list[str]:
        return [
            tok.apply_chat_template(
                [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
            )
            for q, _ in problems
        ]

    held_out = make_problems(args.eval_prompts, random.Random(args.seed + 10_000), args.max_operand)
    evals: list[dict[str, float]] = []

    def evaluate(step: int) -> None:
        roll = sampler.generate(collate(render(held_out)), n=args.eval_samples)
        answers = [held_out[int(k)][1] for k in roll.prompt_index]
        acc = arithmetic_reward(roll.completions(tok), answers)
        rec = {
            "step": step,
            "held_out_accuracy": float(acc.mean()),
            "stderr": float(acc.std() / len(acc) ** 0.5),
        }
        evals.append(rec)
        print(json.dumps(rec), flush=True)

    history: list[dict[str, float]] = []
    if args.eval_every:
        evaluate(0)
    for step in range(args.steps):
        t0 = time.perf_counter()
        problems = make_problems(args.prompts_per_step, rng, args.max_operand)
        texts = render(problems)
        roll = sampler.generate(collate(texts), n=args.group_size)
        assert roll.logp is not None and roll.ref_logp is not None
        answers = [problems[int(k)][1] for k in roll.prompt_index]
        rewards = arithmetic_reward(roll.completions(tok), answers)
        adv = rl.group_advantages(roll.grouped(rewards)).reshape(-1)

        policy.train()
        mask = roll.completion_mask
        logp = token_logps(
            policy.model, roll.input_ids, roll.attention_mask, mask, temperature=args.temperature
        )
        out = grpo(logp, roll.logp, adv, mask, ref_logp=roll.ref_logp, beta=args.beta)
        opt.zero_grad(set_to_none=True)
        aggregate(out.loss, mask, "seq-mean-token-mean").backward()
        torch.nn.utils.clip_grad_norm_(policy.trainable_parameters(), 1.0)
        opt.step()
        policy.eval()

        kl = rl.kl_estimate(roll.logp, roll.ref_logp, estimator="k3")
        rec = {
            "step": step,
            "reward": float(rewards.mean()),
            "kl_k3_per_token": float(masked_mean(kl, mask)),
            "completion_len": float(roll.completion_len.float().mean()),
            "groups_with_signal": float((roll.grouped(rewards).std(1) > 0).float().mean()),
            "seconds": time.perf_counter() - t0,
        }
        history.append(rec)
        print(json.dumps(rec), flush=True)
        if args.eval_every and (step + 1) % args.eval_every == 0:
            evaluate(step + 1)
    print("sample:", repr(texts[-1][-60:]), "->", repr(roll.completions(tok)[-1][:80]))

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
