"""PPO with a LoRA policy and a LoRA critic on ONE backbone (the PE-RLHF layout with the PPO objective).

Schulman et al. 2017 (Eq. 7, 9) as used for RLHF by Ziegler et al. 2019 / Ouyang et al. 2022:
``LoraPolicy(model, value_head=True, value_adapter=True)`` — policy adapter, critic adapter + head, reference
= adapters off. One iteration::

    rollout           = sampler.generate(prompts, n)          # old_logp, ref_logp
    V_old             = critic values of the states y_<t       # values() shifted right by one
    r_t               = −β·k1_t + 1[t = last]·score            # rl.kl_penalized_rewards (KL in the reward)
    Â, Ĝ              = rl.gae(r, V_old, γ=1, λ=0.95); Â ← whiten(Â)
    for epoch in 1..K:  L = aggregate(ppo(logp, old_logp, Â, mask, values=V, ...), "token-mean")  (clipped ratio and value)

Reward: ``1 − |y|/max_new_tokens`` for answers that end with EOS, else 0 (``--reward concise``, programmatic).

    python examples/ppo_lora.py --steps 20 --out runs/ppo
    python examples/ppo_lora.py --smoke --out /tmp/ppo          # tiny model, 2 steps
Checkpoints and resume: ``--save-every N`` writes ``OUT/checkpoints/step-…`` atomically
(:mod:`prefopt.checkpoint`: policy and critic adapters, value head, optimizer, RNG states — sampling
included —, history); ``--resume OUT`` continues from the latest one and reproduces the uninterrupted run
exactly. An existing, non-empty ``--out`` is refused unless ``--overwrite`` (or ``--resume`` a checkpoint
inside it).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time
from typing import Any

import peft
import torch

from prefopt import rl
from prefopt.checkpoint import load_training_state, prepare_run_dir, save_training_state
from prefopt.data import PromptCollator, load_builtin_pairs
from prefopt.logprobs import token_logps
from prefopt.losses.policy_gradient import ppo
from prefopt.masked import aggregate, masked_mean, masked_whiten
from prefopt.policy import LoraPolicy
from prefopt.sampling import HFSampler, Rollout


def load_model(args: argparse.Namespace) -> tuple[Any, Any]:
    if args.smoke:
        from prefopt.testing import char_tokenizer, tiny_causal_lm

        tok = char_tokenizer()
        return tiny_causal_lm("llama", vocab_size=len(tok), seed=args.seed, initializer_range=0.3), tok
    from prefopt.models import load_smollm2

    return load_smollm2()


def concise_reward(roll: Rollout, max_new_tokens: int) -> torch.Tensor:
    """``1 − |y| / max_new_tokens`` for a completion that ended with EOS, 0 for one cut at the limit."""
    return torch.where(roll.finished, 1.0 - roll.completion_len.float() / max_new_tokens, 0.0)


def state_values(policy: LoraPolicy, roll: Rollout) -> torch.Tensor:
    """``V[:, t]`` = value of the state before token ``t`` (``values()[:, t-1]``), 0 at t = 0."""
    v = policy.values(roll.input_ids, roll.attention_mask)
    return torch.cat([v.new_zeros(v.shape[0], 1), v[:, :-1]], dim=1)


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


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="tiny random model, char tokenizer; 2 steps unless --steps is given",
    )
    ap.add_argument(
        "--out", default="runs/ppo_lora", help="ppo_lora.json, ppo_lora.png, adapter, checkpoints"
    )
    ap.add_argument(
        "--steps", type=int, default=20, help="rollouts (PPO iterations) in all (a resumed run included)"
    )
    ap.add_argument("--prompts-per-step", type=int, default=4, help="prompts per rollout")
    ap.add_argument("--n", type=int, default=2, help="samples per prompt")
    ap.add_argument("--ppo-epochs", type=int, default=2, help="optimizer steps per rollout")
    ap.add_argument("--max-new-tokens", type=int, default=32, help="completion length limit")
    ap.add_argument(
        "--temperature", type=float, default=1.0, help="sampling temperature (also in the log-probs)"
    )
    ap.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate (constant)")
    ap.add_argument("--beta", type=float, default=0.05, help="KL coefficient (in the reward)")
    ap.add_argument("--clip", type=float, default=0.2, help="PPO ratio clip epsilon (also the value clip)")
    ap.add_argument("--vf-coef", type=float, default=0.1, help="weight of the value loss")
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank r (lora_alpha = 2r)")
    ap.add_argument("--seed", type=int, default=0, help="seed of torch (sampling) and the prompt order")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
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
        args.prompts_per_step, args.n, args.max_new_tokens, args.threads = 2, 2, 8, 1
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    for flag in ("steps", "save_every"):
        if getattr(args, flag) < 0:
            raise SystemExit(f"--{flag.replace('_', '-')} must be >= 0")
    try:
        prepare_run_dir(args.out, overwrite=args.overwrite, resume=args.resume)
    except (FileExistsError, FileNotFoundError) as err:
        raise SystemExit(str(err)) from None
    writer = metrics_writer(args.report_to, args.out)

    model, tok = load_model(args)
    cfg = peft.LoraConfig(
        r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear", lora_dropout=0.0, bias="none"
    )
    if args.resume:
        state = load_training_state(args.resume, model)
        policy = state.policy
        print(f"resuming from {state.path} (step {state.step})", flush=True)
    else:
        policy = LoraPolicy(model, cfg, value_head=True, value_adapter=True)
    opt = torch.optim.AdamW(policy.trainable_parameters(), lr=args.lr, weight_decay=0.0)
    sampler = HFSampler(policy, tok, max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    collate = PromptCollator(tok, add_special_tokens=False)
    qs = [r["prompt"].removeprefix("Question: ").removesuffix("\nAnswer:") for r in load_builtin_pairs()]
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in qs
    ]
    random.shuffle(prompts)

    history: list[dict[str, float]] = []
    start = 0
    if args.resume:  # after the prompt shuffle above (it draws from the seeded python RNG)
        opt.load_state_dict(state.optimizer)
        start, history = state.step, state.extra["history"]
        state.restore_rng()
    for step in range(start, args.steps):
        t0 = time.perf_counter()
        batch_prompts = [
            prompts[(step * args.prompts_per_step + i) % len(prompts)] for i in range(args.prompts_per_step)
        ]
        roll = sampler.generate(collate(batch_prompts), n=args.n)
        assert roll.logp is not None and roll.ref_logp is not None
        mask = roll.completion_mask
        scores = concise_reward(roll, args.max_new_tokens)
        with torch.no_grad():
            old_values = state_values(policy, roll)
        pen = rl.kl_penalized_rewards(scores, roll.logp, roll.ref_logp, mask, beta=args.beta)
        adv, ret = rl.gae(pen.token_rewards, old_values, mask, gamma=1.0, lam=0.95)
        adv = masked_whiten(adv, mask)

        policy.train()
        metrics: dict[str, float] = {}
        for _ in range(args.ppo_epochs):
            logp = token_logps(
                policy.model, roll.input_ids, roll.attention_mask, mask, temperature=args.temperature
            )
            values = state_values(policy, roll)
            out = ppo(
                logp,
                roll.logp,
                adv,
                mask,
                values=values,
                old_values=old_values,
                returns=ret,
                clip=args.clip,
                vf_coef=args.vf_coef,
            )
            loss = aggregate(out.loss, mask, "token-mean")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(policy.trainable_parameters(), 1.0)
            opt.step()
            metrics = {k: float(masked_mean(v, mask)) for k, v in out.metrics.items()}
            metrics["loss"] = float(loss.detach())  # of the last epoch
        policy.eval()

        rec = {
            "step": step,
            "loss": metrics["loss"],
            "score": float(scores.mean()),
            "kl": float(pen.kl.sum(1).mean()),
            "completion_len": float(roll.completion_len.float().mean()),
            "clip_frac": metrics["clip_frac"],
            "approx_kl": metrics["approx_kl"],
            "value_loss": metrics["value_loss"],
            "seconds": time.perf_counter() - t0,
        }
        history.append(rec)
        print(json.dumps(rec), flush=True)
        if writer is not None:
            for k, v in rec.items():
                if k != "step":
                    writer.add_scalar(k, v, step + 1)
        if args.save_every and (step + 1) % args.save_every == 0:
            extra = {"history": history}
            save_training_state(args.out, policy=policy, optimizer=opt, step=step + 1, extra=extra)

    if writer is not None:
        writer.close()
    policy.save(args.out)
    with open(os.path.join(args.out, "ppo_lora.json"), "w") as f:
        json.dump({"args": vars(args), "history": history}, f, indent=2)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    steps = [h["step"] for h in history]
    ax[0].plot(steps, [h["score"] for h in history])
    ax[0].set_title("reward (concise)")
    ax[0].set_xlabel("step")
    ax[1].plot(steps, [h["kl"] for h in history])
    ax[1].set_title("KL(π‖π_ref) per sequence (k1)")
    ax[1].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "ppo_lora.png"), dpi=110)
    if args.smoke:
        print("smoke ok")


if __name__ == "__main__":
    main()
