"""REINFORCE with a LoRA policy and a LoRA value model on ONE backbone — the PE-RLHF recipe.

PE-RLHF (Sidahmed et al. 2024, arXiv 2403.10704, §3): policy, value and reference share the frozen backbone
of SmolLM2-135M-Instruct. ``LoraPolicy(model, value_head=True, value_adapter=True)`` holds the policy adapter,
a separate critic adapter + scalar head for the value ``V(x, y_<t)``, and the reference (adapters off).

One step::

    rollout  = sampler.generate(prompts, n)                  # behaviour + reference log-probs (prefopt.sampling)
    score    = reward(x, y)                                  # LoRA reward model or a programmatic reward
    R        = score − β Σ_t log π/π_ref                     # KL in the reward (rl.kl_penalized_rewards, k1)
    V_t      = value of the state before token t              # values() shifted right by one position
    L        = −Σ_t sg(R − V_t) log π(y_t|·) + c_v Σ_t (R − V_t)²   (prefopt reinforce, per-token baseline)

Rewards: ``--reward concise`` (default, programmatic): ``1 − |y|/max_new_tokens`` if the answer ends with EOS,
else 0 — easy to verify, and it moves; ``--reward rm --rm-path DIR``: the LoRA reward model trained by
``examples/reward_model.py --save-lora DIR`` on Taskmaster coffee (prompts are then coffee contexts; needs
``--data``).

    python examples/reinforce_lora.py --steps 20 --out runs/reinforce
    python examples/reinforce_lora.py --reward rm --rm-path runs/rm_lora --data ../shared/data
    python examples/reinforce_lora.py --smoke --out /tmp/reinforce        # tiny model, 2 steps
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
from pathlib import Path
from typing import Any

import peft
import torch

from prefopt import rl
from prefopt.checkpoint import load_training_state, prepare_run_dir, save_training_state
from prefopt.data import PromptCollator, load_builtin_pairs, load_pointwise
from prefopt.logprobs import token_logps
from prefopt.losses.policy_gradient import reinforce
from prefopt.masked import aggregate
from prefopt.policy import LoraPolicy
from prefopt.sampling import HFSampler, Rollout


def load_model(args: argparse.Namespace) -> tuple[Any, Any]:
    if args.smoke:
        from prefopt.testing import char_tokenizer, tiny_causal_lm

        tok = char_tokenizer()
        return tiny_causal_lm("llama", vocab_size=len(tok), seed=args.seed, initializer_range=0.3), tok
    from prefopt.models import load_smollm2

    return load_smollm2()


def question_prompts(tok: Any) -> list[str]:
    """The built-in questions, rendered with the chat template (generation prompt added)."""
    qs = [r["prompt"].removeprefix("Question: ").removesuffix("\nAnswer:") for r in load_builtin_pairs()]
    return [
        tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in qs
    ]


def coffee_prompts(data: str) -> list[str]:
    ds = load_pointwise(sorted(str(p) for p in (Path(data) / "taskmaster" / "coffee").glob("reward_0*.json")))
    return sorted(set(ds["prompt"]))


def concise_reward(roll: Rollout, max_new_tokens: int) -> torch.Tensor:
    """``1 − |y| / max_new_tokens`` for a completion that ended with EOS, 0 for one cut at the limit."""
    return torch.where(roll.finished, 1.0 - roll.completion_len.float() / max_new_tokens, 0.0)


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
        "--out",
        default="runs/reinforce_lora",
        help="reinforce_lora.json, reinforce_lora.png, adapter, checkpoints",
    )
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps in all (a resumed run included)")
    ap.add_argument("--prompts-per-step", type=int, default=4, help="prompts per step")
    ap.add_argument("--n", type=int, default=2, help="samples per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=32, help="completion length limit")
    ap.add_argument(
        "--max-prompt-length", type=int, default=192, help="max prompt tokens (longer prompts keep their end)"
    )
    ap.add_argument(
        "--temperature", type=float, default=1.0, help="sampling temperature (also in the log-probs)"
    )
    ap.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate (constant)")
    ap.add_argument("--beta", type=float, default=0.05, help="KL coefficient (in the reward)")
    ap.add_argument("--value-coef", type=float, default=0.1, help="weight of the critic's value loss")
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank r (lora_alpha = 2r)")
    ap.add_argument(
        "--reward",
        choices=("concise", "rm"),
        default="concise",
        help="concise: 1 - |y|/max_new_tokens if finished; rm: a reward model (--rm-path)",
    )
    ap.add_argument(
        "--rm-path",
        default=None,
        help="RewardModel folder (examples/reward_model.py --save-lora), for --reward rm",
    )
    ap.add_argument(
        "--data",
        default=str(Path(__file__).resolve().parents[1] / ".." / "shared" / "data"),
        help="the shared data folder (Taskmaster coffee prompts for --reward rm)",
    )
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
    else:  # policy + critic adapters, one backbone
        policy = LoraPolicy(model, cfg, value_head=True, value_adapter=True)
    opt = torch.optim.AdamW(policy.trainable_parameters(), lr=args.lr, weight_decay=0.0)
    sampler = HFSampler(policy, tok, max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    collate = PromptCollator(tok, max_prompt_length=args.max_prompt_length, add_special_tokens=False)

    reward_model = None
    if args.reward == "rm":
        if args.smoke or not args.rm_path:
            raise SystemExit(
                "--reward rm needs --rm-path (from examples/reward_model.py --save-lora) and the real model"
            )
        from prefopt.models import load_smollm2
        from prefopt.reward_model import RewardModel

        reward_model = RewardModel.load(load_smollm2()[0], args.rm_path).eval()
        prompts = coffee_prompts(args.data)
    else:
        prompts = question_prompts(tok)
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
        if reward_model is not None:
            with torch.no_grad():
                scores = reward_model(roll.input_ids, roll.attention_mask)
        else:
            scores = concise_reward(roll, args.max_new_tokens)
        pen = rl.kl_penalized_rewards(scores, roll.logp, roll.ref_logp, mask, beta=args.beta)

        policy.train()
        logp = token_logps(
            policy.model, roll.input_ids, roll.attention_mask, mask, temperature=args.temperature
        )
        values = policy.values(roll.input_ids, roll.attention_mask)  # critic adapter + head
        # values[:, i] has read tokens 0..i; the baseline for token t is the value of the state y_<t
        v_before = torch.cat([values.new_zeros(values.shape[0], 1), values[:, :-1]], dim=1)
        ret = pen.sequence_rewards
        adv = ret.unsqueeze(1) - v_before.detach()
        out = reinforce(logp, None, adv, mask, values=v_before, returns=ret, value_coef=args.value_coef)
        loss = aggregate(out.loss, mask, "seq-mean-token-sum")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.trainable_parameters(), 1.0)
        opt.step()
        policy.eval()

        rec = {
            "step": step,
            "loss": float(loss.detach()),
            "score": float(scores.mean()),
            "return": float(pen.sequence_rewards.mean()),
            "kl": float(pen.kl.sum(1).mean()),
            "value_loss": float(aggregate(out.metrics["value_loss"], mask, "seq-mean-token-sum")),
            "completion_len": float(roll.completion_len.float().mean()),
            "finished": float(roll.finished.float().mean()),
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
        if step == args.steps - 1:
            print("sample:", repr(roll.completions(tok)[0][:200]))

    if writer is not None:
        writer.close()
    policy.save(args.out)
    with open(os.path.join(args.out, "reinforce_lora.json"), "w") as f:
        json.dump({"args": vars(args), "history": history}, f, indent=2)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
    steps = [h["step"] for h in history]
    ax[0].plot(steps, [h["score"] for h in history], label="score")
    ax[0].plot(steps, [h["return"] for h in history], label="score − β·KL")
    ax[0].set_xlabel("step")
    ax[0].set_title(f"reward ({args.reward})")
    ax[0].legend()
    ax[1].plot(steps, [h["kl"] for h in history])
    ax[1].set_xlabel("step")
    ax[1].set_title("KL(π‖π_ref) per sequence (k1)")
    fig.tight_layout()
    fig.savefig(os.path.join(args.out, "reinforce_lora.png"), dpi=110)
    if args.smoke:
        print("smoke ok")


if __name__ == "__main__":
    main()
