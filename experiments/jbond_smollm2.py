r"""J-BOND vs REINFORCE (RLOO) vs Best-of-N on SmolLM2-135M-Instruct, with ONE backbone: reward quantile
against \(\mathrm{KL}(\pi \| \pi_{\mathrm{ref}})\).

The study behind `docs/bond_experiments.md` §1. The readable J-BOND loop alone, what to copy, is
`examples/jbond.py`; this script trains the same J-BOND (its reward, prompts and quantile are the same; the
example keeps its own copy of them) next to its baselines, and plots the comparison.

J-BOND (Sessa et al. 2024, "BOND: Aligning LLMs with Best-of-N Distillation", arXiv 2407.14622, Algorithm 2;
the conventions of [`jbond`][prefopt.losses.bond.jbond] and `docs/bond.md` §6). One step, per prompt:
one policy sample \(y \sim \pi_\theta\) (LoRA adapter `"default"`), two anchor samples
\(y'_1, y'_2 \sim \pi_a\) (adapter `"anchor"`, an EMA of the policy's \(\Delta W\)),
\(r_J(y) = -\log 16 \cdot \mathbf{1}[r(y) < \min(r(y'_1), r(y'_2))]\) and
$$ \ell = (1 - w)\,\bigl(-\log \pi_\theta(y'_{\mathrm{best}})\bigr)
   + w\,\bigl(-(r_J - \log\tfrac{\pi_\theta(y)}{\pi_a(y)} - B)\,\log \pi_\theta(y)\bigr), $$
\(B\) the leave-one-out batch baseline; an Adam step on the policy adapter, then
`policy.update_anchor_(decay=1 - eta)`.

The reference \(\pi_{\mathrm{ref}}\) (adapters disabled, exactly the base model) is used only to *measure*:
reward quantiles are taken against a pool of reference samples per eval prompt, and
\(\mathrm{KL}(\pi \| \pi_{\mathrm{ref}})\) is estimated from policy samples as the mean of
\(\sum_t (\log \pi - \log \pi_{\mathrm{ref}})\) (the k1 estimator, temperature 1).

The baselines of the comparison plot:

- REINFORCE with a leave-one-out baseline (RLOO, 2 samples per prompt) and the KL to the reference in the
  reward, \(R = r - c \sum_t (\log \pi - \log \pi_{\mathrm{ref}})\)
  ([`kl_penalized_rewards`][prefopt.rl.kl_penalized_rewards] and `rloo`), for several coefficients \(c\);
- Best-of-N on the reference, \(N \in \{2, 4, 8, 16\}\): its expected quantile is computed exactly on the
  empirical distribution of a pool of reference samples (`bon_expected_quantile`); its KL is bounded by
  \(\log N - (N-1)/N\) ([`bon_kl_bound`][prefopt.bon.bon_kl_bound]) and drawn at the bound.

The reward (`reward`; cheap, programmatic, deterministic) scores a *friendly, on-topic reply*: the tone
\(\#\text{positive words}(y) - \#\text{negative words}(y)\) (an integer) plus the relevance
\(|\text{content}(x) \cap \text{words}(y)| / |\text{content}(x)| \in [0, 1]\). Words are lower-cased
`[a-z']+` runs; the two small lexicons are `POSITIVE` and `NEGATIVE`; content words of the question are
those of length ≥ 4 not in `STOPWORDS`. Under SmolLM2 at temperature 1 with 16 new tokens about 60 % of
replies have tone 0, and relevance breaks most of those ties, so the reward has spread under the reference
and the quantiles are informative. It is a toy reward (it can be gamed by stuffing "happy to help" into
every answer) — exactly what a small BOND/RLHF demo needs.

Prompts: single-turn HH-RLHF dialogues (`--data`, via `prefopt.data.load_preferences`), the human turn
rendered with the model's chat template and a one-line system prompt (shorter than SmolLM2's default one,
which would double the prompt length on CPU). Questions of at most `--max-question-words` words; the first
`--eval-prompts` of them (after a seeded shuffle) are the fixed eval set, the rest are for training.

    python experiments/jbond_smollm2.py --out runs/jbond          # all methods, SmolLM2, CPU
    python experiments/jbond_smollm2.py --methods jbond --steps 30 --eta 0.1
    python experiments/jbond_smollm2.py --smoke --out /tmp/jbond  # tiny random model, 2 steps

Writes `OUT/jbond.json` and `OUT/jbond.png` after every evaluation. Each trained policy is saved with
[`LoraPolicy.save`][prefopt.policy.LoraPolicy.save] (the policy adapter, for J-BOND also its anchor) to
`OUT/adapters/<run>` (`jbond`, `reinforce_0.05`, …). `--save-every N` also writes training checkpoints to
`OUT/adapters/<run>/checkpoints` ([`prefopt.checkpoint`][prefopt.checkpoint]), and `--resume OUT` continues
every run from its latest one, reproducing the uninterrupted run exactly. An existing, non-empty `--out` is
refused unless `--overwrite`. `--merge` combines the `jbond.json` of several runs into one plot.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import peft
import torch
from torch import Tensor

from prefopt import rl
from prefopt.bon import bon_distribution, bon_kl_bound
from prefopt.checkpoint import latest_checkpoint, load_training_state, prepare_run_dir, save_training_state
from prefopt.data import PromptCollator, load_builtin_pairs, load_preferences
from prefopt.logprobs import token_logps
from prefopt.losses.bond import jbond
from prefopt.losses.policy_gradient import rloo
from prefopt.masked import aggregate, seq_sum
from prefopt.policy import LoraPolicy
from prefopt.sampling import Rollout, pack_rollout
from prefopt.types import BestOfNSamples, PromptBatch

DEFAULT_DATA = (
    Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "hh-rlhf" / "helpful-base.test.jsonl.gz"
)
SYSTEM_PROMPT = "You are a helpful assistant."
BON_NS = (2, 4, 8, 16)

# ------------------------------------------------------------------------------------------------------------
# the reward
# ------------------------------------------------------------------------------------------------------------

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
_WORD = re.compile(r"[a-z']+")


def words(text: str) -> list[str]:
    """Lower-cased ``[a-z']+`` runs of ``text`` (``’`` is read as ``'``)."""
    return _WORD.findall(text.lower().replace("’", "'"))


def content_words(question: str) -> set[str]:
    """Distinct words of length ≥ 4 of ``question`` that are not in `STOPWORDS`."""
    return {w for w in words(question) if len(w) >= 4 and w not in STOPWORDS}


@dataclass(frozen=True)
class RewardParts:
    """``tone = #positive − #negative`` words of the reply; ``relevance`` = fraction of the question's content
    words found in the reply (0 if the question has none); ``total = tone + relevance``."""

    tone: int
    relevance: float

    @property
    def total(self) -> float:
        return self.tone + self.relevance


def reward_parts(question: str, reply: str) -> RewardParts:
    """The two terms of `reward` (see the module docstring)."""
    ws = words(reply)
    tone = sum(w in POSITIVE for w in ws) - sum(w in NEGATIVE for w in ws)
    topic = content_words(question)
    relevance = len(topic & set(ws)) / len(topic) if topic else 0.0
    return RewardParts(tone, relevance)


def reward(question: str, reply: str) -> float:
    """``r(x, y) = #positive(y) − #negative(y) + |content(x) ∩ words(y)| / |content(x)|`` (module docstring)."""
    return reward_parts(question, reply).total


def rewards(questions: Sequence[str], replies: Sequence[str]) -> Tensor:
    """``(b,)`` float64 rewards of ``b`` (question, reply) pairs."""
    if len(questions) != len(replies):
        raise ValueError(f"questions has {len(questions)} items but replies has {len(replies)}")
    return torch.tensor([reward(q, y) for q, y in zip(questions, replies)], dtype=torch.float64)


# ------------------------------------------------------------------------------------------------------------
# quantiles and Best-of-N on an empirical pool
# ------------------------------------------------------------------------------------------------------------


def mid_quantile(values: Tensor, pool: Tensor) -> Tensor:
    """Mid-rank quantile of each value among a pool: ``(#{pool < v} + #{pool ≤ v}) / (2k)``.

    Args:
        values: ``(E, S)`` rewards of ``S`` samples for each of ``E`` prompts.
        pool: ``(E, k)`` rewards of ``k`` reference samples for the same prompts.

    Returns:
        ``(E, S)`` float64 in ``[0, 1]``. Ties count one half, so a fresh reference sample has expected
        quantile exactly ½ whatever the ties (with ``p_≤`` alone it would be above ½).
    """
    if values.ndim != 2 or pool.ndim != 2 or values.shape[0] != pool.shape[0]:
        raise ValueError(
            f"values (E, S) and pool (E, k) must share E; got {tuple(values.shape)} and {tuple(pool.shape)}"
        )
    v = values.double().unsqueeze(-1)
    p = pool.double().unsqueeze(-2)
    return ((p < v).double().sum(-1) + (p <= v).double().sum(-1)) / (2 * pool.shape[-1])


def loo_mid_quantile(pool: Tensor) -> Tensor:
    """``(E, M)``: the mid-rank quantile of each pool member among the *other* ``M − 1`` members."""
    if pool.ndim != 2 or pool.shape[1] < 2:
        raise ValueError(f"pool must have shape (E, M) with M >= 2, got {tuple(pool.shape)}")
    p = pool.double()
    lt = (p.unsqueeze(-2) < p.unsqueeze(-1)).double().sum(-1)
    le = (p.unsqueeze(-2) <= p.unsqueeze(-1)).double().sum(-1) - 1  # drop the member itself
    return (lt + le) / (2 * (pool.shape[1] - 1))


def bon_expected_quantile(pool: Tensor, n: int) -> Tensor:
    """Expected quantile of Best-of-``n`` when the ``n`` draws come from the empirical pool (with replacement).

    Per prompt, ``π̂_ref`` is uniform over the ``M`` pool members; ``π̂_BoN = bon_distribution(π̂_ref, r, n)``
    (exact, first-drawn wins among tied maxima, ``prefopt.sampling.best_of_n``); each member is scored by its
    `loo_mid_quantile` among the other members (so the reference, ``n = 1``, scores exactly ½ on
    average). Returns ``(E,)`` float64 ``Σ_j π̂_BoN(j)·q_j``. Drawing with replacement from ``M`` samples
    under-estimates the true Best-of-``n`` when ``n`` is not small compared with ``M`` (repeated draws).
    """
    if pool.ndim != 2:
        raise ValueError(f"pool must have shape (E, M), got {tuple(pool.shape)}")
    e, m = pool.shape
    probs = torch.full((e, m), 1.0 / m, dtype=torch.float64)
    return (bon_distribution(probs, pool.double(), n) * loo_mid_quantile(pool)).sum(-1)


# ------------------------------------------------------------------------------------------------------------
# prompts and sampling
# ------------------------------------------------------------------------------------------------------------


def hh_questions(path: str | os.PathLike[str], *, max_words: int) -> list[str]:
    """The human turn of every single-turn HH-RLHF prompt with at most ``max_words`` words, deduplicated, in
    file order. The prompt is taken by ``load_preferences`` (the shared prefix through the last
    ``"\\n\\nAssistant:"``)."""
    ds = load_preferences(str(path))
    out: list[str] = []
    seen: set[str] = set()
    for prompt in ds["prompt"]:
        if prompt.count("Human:") != 1 or "Assistant:" in prompt.rsplit("\n\nAssistant:", 1)[0]:
            continue
        q = prompt.split("Human:", 1)[1].rsplit("\n\nAssistant:", 1)[0].strip()
        if q and q not in seen and len(q.split()) <= max_words:
            seen.add(q)
            out.append(q)
    return out


def builtin_questions() -> list[str]:
    """The questions of prefopt's built-in pairs (used by ``--smoke`` when the HH-RLHF file is absent)."""
    return [r["prompt"].removeprefix("Question: ").removesuffix("\nAnswer:") for r in load_builtin_pairs()]


def render(tok: Any, question: str) -> str:
    """``question`` as a chat prompt (short system prompt, generation prompt added)."""
    msgs = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]
    return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


@torch.no_grad()
def sample(
    policy: LoraPolicy, batch: PromptBatch, n: int, *, mode: str, max_new_tokens: int, eos: int, pad: int
) -> Rollout:
    """``n`` samples per prompt of a LEFT-padded prompt batch from ``mode`` ∈ {policy, anchor, reference}
    (temperature 1, no top-k/top-p: the exact distribution the losses and the KL are about). Returns an
    unscored right-padded [`Rollout`][prefopt.sampling.Rollout] (EOS cut by ``pack_rollout``)."""
    ctx = {"policy": None, "anchor": policy.anchor, "reference": policy.reference}[mode]
    ids = batch.input_ids.repeat_interleave(n, 0)
    am = batch.attention_mask.repeat_interleave(n, 0)
    policy.eval()
    kwargs = dict(
        max_new_tokens=max_new_tokens,
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    if ctx is None:
        out = policy.model.generate(input_ids=ids, attention_mask=am, **kwargs)
    else:
        with ctx():
            out = policy.model.generate(input_ids=ids, attention_mask=am, **kwargs)
    prompts = [row[m.bool()].tolist() for row, m in zip(ids, am)]
    return pack_rollout(prompts, out[:, ids.shape[1] :], eos_token_id=eos, pad_token_id=pad, num_samples=n)


def seq_logps(model: Any, ids: Tensor, am: Tensor, cm: Tensor) -> Tensor:
    """``(b,)`` sequence log-probs ``Σ_t log π(y_t | ·)`` over the completion (temperature 1)."""
    lp = token_logps(model, ids, am, cm)
    return seq_sum(lp, cm)


def stack_rows(parts: Sequence[tuple[Tensor, Tensor, Tensor]], pad: int) -> tuple[Tensor, Tensor, Tensor]:
    """Concatenate right-padded ``(ids, attention_mask, completion_mask)`` triples of different widths."""
    t = max(p[0].shape[1] for p in parts)
    out = []
    for k, fill in enumerate((pad, 0, False)):
        out.append(
            torch.cat([torch.nn.functional.pad(p[k], (0, t - p[k].shape[1]), value=fill) for p in parts])
        )
    return out[0], out[1], out[2]


# ------------------------------------------------------------------------------------------------------------
# evaluation
# ------------------------------------------------------------------------------------------------------------


@dataclass
class Ctx:
    """What every run shares: tokenizer ids, the collated eval prompts and the reference pool."""

    tok: Any
    collate: PromptCollator
    eos: int
    pad: int
    eval_q: list[str]
    eval_batch: PromptBatch
    pool: Tensor  # (E, M) rewards of reference samples
    train_q: list[str]

    def reference_point(self) -> dict[str, float]:
        """Step 0 of every run: the LoRA policy starts at ``ΔW = 0``, i.e. at the reference, whose mid-rank
        quantile is ½ in expectation and whose KL is 0."""
        return {
            "quantile": 0.5,
            "quantile_se": 0.0,
            "reward": float(self.pool.mean()),
            "kl": 0.0,
            "kl_se": 0.0,
        }


def evaluate(policy: LoraPolicy, ctx: Ctx, args: argparse.Namespace) -> dict[str, float]:
    """Quantile (mid-rank, vs the reference pool), reward and ``KL(π‖π_ref)`` of the policy on the eval set.

    ``KL`` = mean over ``E·S`` policy samples of ``Σ_t (log π − log π_ref)``; ``kl_se`` its standard error.
    """
    s = args.eval_samples
    roll = sample(
        policy, ctx.eval_batch, s, mode="policy", max_new_tokens=args.max_new_tokens, eos=ctx.eos, pad=ctx.pad
    )
    qs = [q for q in ctx.eval_q for _ in range(s)]
    r = rewards(qs, roll.completions(ctx.tok))
    q = mid_quantile(r.view(-1, s), ctx.pool)
    with torch.no_grad():
        lp = seq_logps(policy.model, roll.input_ids, roll.attention_mask, roll.completion_mask)
        with policy.reference():
            ref = seq_logps(policy.model, roll.input_ids, roll.attention_mask, roll.completion_mask)
    kl = (lp - ref).double()
    return {
        "quantile": float(q.mean()),
        "quantile_se": float(q.std() / math.sqrt(q.numel())),
        "reward": float(r.mean()),
        "kl": float(kl.mean()),
        "kl_se": float(kl.std() / math.sqrt(kl.numel())),
        "completion_len": float(roll.completion_len.float().mean()),
    }


# ------------------------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------------------------


def new_policy(args: argparse.Namespace, seed: int) -> LoraPolicy:
    model, _ = load_model(args, seed)
    cfg = peft.LoraConfig(
        r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear", lora_dropout=0.0, bias="none"
    )
    return LoraPolicy(model, cfg)


def jbond_step(
    policy: LoraPolicy, opt: torch.optim.Optimizer, ctx: Ctx, qs: list[str], args: argparse.Namespace
) -> dict[str, float]:
    """One J-BOND step on the prompts ``qs`` (see the module docstring)."""
    batch = ctx.collate([render(ctx.tok, q) for q in qs])
    b = len(qs)
    kw = dict(max_new_tokens=args.max_new_tokens, eos=ctx.eos, pad=ctx.pad)
    pol = sample(policy, batch, 1, mode="policy", **kw)
    anc = sample(policy, batch, 2, mode="anchor", **kw)
    r_pol = rewards(qs, pol.completions(ctx.tok))
    r_anc = rewards([q for q in qs for _ in range(2)], anc.completions(ctx.tok)).view(b, 2)
    best = 2 * torch.arange(b) + r_anc.argmax(-1)  # first on ties, as BoN
    with policy.anchor():
        anchor_logp = seq_logps(policy.model, pol.input_ids, pol.attention_mask, pol.completion_mask)
    ids, am, cm = stack_rows(
        [
            (pol.input_ids, pol.attention_mask, pol.completion_mask),
            (anc.input_ids[best], anc.attention_mask[best], anc.completion_mask[best]),
        ],
        ctx.pad,
    )
    policy.train()
    both = seq_logps(policy.model, ids, am, cm)
    samples = BestOfNSamples(both[:b], anchor_logp, r_pol, r_anc, both[b:])
    out = jbond(samples, backward_weight=args.jbond_beta, gamma=args.jbond_gamma)
    loss = out.loss.mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    gnorm = torch.nn.utils.clip_grad_norm_(policy.trainable_parameters(), args.clip)
    opt.step()
    upd = policy.update_anchor_(1.0 - args.eta)
    policy.eval()
    return {
        "loss": float(loss.detach()),
        "reward": float(r_pol.mean()),
        "anchor_reward": float(r_anc.mean()),
        "lost_both": float((out.metrics["jbond/reward"] < 0).double().mean()),
        "kl_anchor": float(out.metrics["kl/anchor"].mean()),
        "grad_norm": float(gnorm),
        "anchor_trunc_err": upd.max_relative_error,
    }


def reinforce_step(
    policy: LoraPolicy,
    opt: torch.optim.Optimizer,
    ctx: Ctx,
    qs: list[str],
    args: argparse.Namespace,
    kl_coef: float,
) -> dict[str, float]:
    """One RLOO step: 2 samples per prompt, ``R = r − kl_coef·Σ_t(log π − log π_ref)``, leave-one-out baseline."""
    batch = ctx.collate([render(ctx.tok, q) for q in qs])
    k = args.rloo_k
    roll = sample(
        policy, batch, k, mode="policy", max_new_tokens=args.max_new_tokens, eos=ctx.eos, pad=ctx.pad
    )
    scores = rewards([q for q in qs for _ in range(k)], roll.completions(ctx.tok)).float()
    with policy.reference():
        ref = token_logps(policy.model, roll.input_ids, roll.attention_mask, roll.completion_mask)
    policy.train()
    logp = token_logps(policy.model, roll.input_ids, roll.attention_mask, roll.completion_mask)
    pen = rl.kl_penalized_rewards(scores, logp.detach(), ref, roll.completion_mask, beta=kl_coef)
    adv = rl.rloo_advantages(pen.sequence_rewards.view(-1, k)).reshape(-1)
    out = rloo(logp, None, adv, roll.completion_mask)
    loss = aggregate(out.loss, roll.completion_mask, "seq-mean-token-sum")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    gnorm = torch.nn.utils.clip_grad_norm_(policy.trainable_parameters(), args.clip)
    opt.step()
    policy.eval()
    return {
        "loss": float(loss.detach()),
        "reward": float(scores.mean()),
        "kl_ref": float(pen.kl.sum(1).mean()),
        "grad_norm": float(gnorm),
    }


def evaluate_and_log(
    policy: LoraPolicy,
    ctx: Ctx,
    args: argparse.Namespace,
    name: str,
    step: int,
    rec: dict[str, float],
    history: list[dict[str, float]],
    bar: Any,
    on_eval: Callable[[], None] | None,
) -> None:
    ev = evaluate(policy, ctx, args)
    history.append({"step": step, **ev, **{f"train_{k}": v for k, v in rec.items()}})
    if on_eval is not None:
        on_eval()
    bar.write(
        f"{name} step {step}: quantile {ev['quantile']:.3f} ± {ev['quantile_se']:.3f}, KL {ev['kl']:.2f} ± {ev['kl_se']:.2f}, reward {ev['reward']:.2f}"
    )


def train(
    method: str,
    ctx: Ctx,
    args: argparse.Namespace,
    kl_coef: float = 0.0,
    *,
    history: list[dict[str, float]] | None = None,
    on_eval: Callable[[], None] | None = None,
    save_dir: str | None = None,
    resume: bool = False,
) -> list[dict[str, float]]:
    """Train a fresh policy with ``method`` ∈ {jbond, reinforce}; evaluate every ``--eval-every`` steps.

    Returns the eval history (step 0 is the reference itself: the LoRA policy starts at ``ΔW = 0``), appended
    to ``history`` if given; ``on_eval`` is called after every evaluation (``main`` saves the JSON and PNG).
    With ``save_dir`` the trained policy is saved there at the end (``LoraPolicy.save``), and with
    ``--save-every N`` a training checkpoint every N steps to ``save_dir/checkpoints`` (policy and anchor
    adapters, optimizer, RNG states, prompt order, history; taken after the step's regular evaluation, so a
    resumed run draws the same samples). ``resume``: continue from the latest of them, if any."""
    from tqdm.auto import tqdm

    torch.manual_seed(args.seed + 1)
    ckpt = latest_checkpoint(save_dir) if resume and save_dir is not None else None
    if ckpt is not None:
        state = load_training_state(ckpt, load_model(args, args.seed)[0])
        policy = state.policy
    else:
        policy = new_policy(args, args.seed)
    opt = torch.optim.Adam(policy.trainable_parameters(), lr=args.lr)
    rng = random.Random(args.seed + 2)
    order = list(ctx.train_q)
    history = [] if history is None else history
    name = method if method == "jbond" else f"reinforce β={kl_coef:g}"
    start = 0
    if ckpt is not None:
        opt.load_state_dict(state.optimizer)
        start, order = state.step, state.extra["order"]
        history.extend(state.extra["history"])
        rng.setstate(state.extra["data_rng"])
        state.restore_rng()
        print(f"{name}: resuming from {ckpt} (step {start})", flush=True)
    else:
        history.append({"step": 0, **ctx.reference_point()})
    bar = tqdm(
        range(start + 1, args.steps + 1), desc=name, unit="step", disable=args.no_progress, initial=start
    )
    for step in bar:
        if (step - 1) * args.prompts_per_step % len(order) == 0:
            rng.shuffle(order)
        start = (step - 1) * args.prompts_per_step % len(order)
        qs = [order[(start + i) % len(order)] for i in range(args.prompts_per_step)]
        t0 = time.perf_counter()
        if method == "jbond":
            rec = jbond_step(policy, opt, ctx, qs, args)
        else:
            rec = reinforce_step(policy, opt, ctx, qs, args, kl_coef)
        rec["seconds"] = time.perf_counter() - t0
        bar.set_postfix(reward=f"{rec['reward']:.2f}", sec=f"{rec['seconds']:.1f}")
        if args.verbose:
            print(json.dumps({"method": name, "step": step, **rec}), flush=True)
        regular = step % args.eval_every == 0
        if regular:
            evaluate_and_log(policy, ctx, args, name, step, rec, history, bar, on_eval)
        if save_dir is not None and args.save_every and step % args.save_every == 0:
            extra = {"order": order, "data_rng": rng.getstate(), "history": history}
            save_training_state(save_dir, policy=policy, optimizer=opt, step=step, extra=extra)
        if step == args.steps and not regular:  # after the checkpoint: its samples are not in the saved RNG
            evaluate_and_log(policy, ctx, args, name, step, rec, history, bar, on_eval)
    if save_dir is not None:
        policy.save(save_dir)
    return history


# ------------------------------------------------------------------------------------------------------------
# main
# ------------------------------------------------------------------------------------------------------------


def load_model(args: argparse.Namespace, seed: int) -> tuple[Any, Any]:
    if args.smoke:
        from prefopt.testing import char_tokenizer, tiny_causal_lm

        tok = char_tokenizer()
        return tiny_causal_lm("llama", vocab_size=len(tok), seed=seed, initializer_range=0.3), tok
    from prefopt.models import load_smollm2

    return load_smollm2()


def build_ctx(args: argparse.Namespace) -> Ctx:
    """Prompts, the eval set and the reference pool (``--pool`` reference samples per eval prompt)."""
    if Path(args.data).is_file():
        questions = hh_questions(args.data, max_words=args.max_question_words)
        source = args.data
    elif args.smoke:
        questions, source = builtin_questions(), "built-in pairs (HH-RLHF file not found)"
    else:
        raise SystemExit(
            f"--data {args.data} not found (HH-RLHF helpful-base test split, see ../shared/data/README.md)"
        )
    rng = random.Random(args.seed)
    rng.shuffle(questions)
    if len(questions) <= args.eval_prompts:
        raise SystemExit(
            f"only {len(questions)} usable questions; need more than --eval-prompts {args.eval_prompts}"
        )
    eval_q, train_q = questions[: args.eval_prompts], questions[args.eval_prompts :]
    print(
        f"prompts: {source}: {len(questions)} questions, {len(eval_q)} for eval, {len(train_q)} for training"
    )
    model, tok = load_model(args, args.seed)
    collate = PromptCollator(tok, max_prompt_length=args.max_prompt_length, add_special_tokens=False)
    eos = int(tok.eos_token_id)
    pad = int(tok.pad_token_id if tok.pad_token_id is not None else eos)
    eval_batch = collate([render(tok, q) for q in eval_q])
    key = {"eval_q": eval_q, "pool": args.pool, "max_new_tokens": args.max_new_tokens, "smoke": args.smoke}
    if args.pool_file and Path(args.pool_file).is_file():
        saved = json.loads(Path(args.pool_file).read_text())
        if saved["key"] != key:
            raise SystemExit(
                f"--pool-file {args.pool_file} was made with other settings; delete it or change the path"
            )
        pool = torch.tensor(saved["rewards"], dtype=torch.float64)
        print(f"reference pool: read {args.pool_file}")
    else:
        ref = LoraPolicy(model)  # ΔW = 0: the policy is the reference; sampled with adapters off anyway
        torch.manual_seed(args.seed + 3)
        t0 = time.perf_counter()
        roll = sample(
            ref, eval_batch, args.pool, mode="reference", max_new_tokens=args.max_new_tokens, eos=eos, pad=pad
        )
        pool = rewards([q for q in eval_q for _ in range(args.pool)], roll.completions(tok)).view(
            len(eval_q), args.pool
        )
        print(
            f"reference pool: {args.pool} samples × {len(eval_q)} eval prompts in {time.perf_counter() - t0:.0f} s"
        )
        if args.pool_file:
            Path(args.pool_file).write_text(json.dumps({"key": key, "rewards": pool.tolist()}))
    distinct = float(torch.tensor([len(set(r.tolist())) for r in pool]).double().mean())
    print(
        f"reference pool: mean reward {float(pool.mean()):.3f}, {distinct:.1f} distinct values per prompt (of {args.pool})"
    )
    return Ctx(tok, collate, eos, pad, eval_q, eval_batch, pool, train_q)


def plot(results: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    # x range: the Best-of-N points and J-BOND; a run that drifts far beyond (reward hacking at a weak KL
    # coefficient) is drawn clipped at the right edge, with its real KL written next to it
    bon_max = max((b["kl_bound"] for b in results["bon"]), default=1.0)
    jb_max = max((h["kl"] for h in results["runs"].get("jbond", [])), default=0.0)
    x_max = 1.25 * max(bon_max, jb_max, 0.5)
    for name, hist in results["runs"].items():
        xs = [min(h["kl"], x_max) for h in hist]
        ys = [h["quantile"] for h in hist]
        for h, x, y in zip(hist, xs, ys):
            if h["kl"] > x_max:
                ax.annotate(
                    f"KL {h['kl']:.0f} →", (x, y), fontsize=7, xytext=(-34, -10), textcoords="offset points"
                )
        style: dict[str, Any] = (
            {"lw": 2.2, "marker": "o", "color": "C3"}
            if name == "jbond"
            else {"lw": 1.2, "marker": ".", "ls": "--"}
        )
        ax.plot(xs, ys, label=name.replace("reinforce", "RLOO, KL coef"), **style)
        ax.annotate(
            f"{hist[-1]['step']}", (xs[-1], ys[-1]), fontsize=7, xytext=(3, 3), textcoords="offset points"
        )
    bon = results["bon"]
    ax.plot(
        [b["kl_bound"] for b in bon],
        [b["quantile"] for b in bon],
        "k^",
        ms=7,
        label="Best-of-N on π_ref (KL at its bound)",
    )
    for b in bon:
        ax.annotate(
            f"N={b['n']}",
            (b["kl_bound"], b["quantile"]),
            fontsize=8,
            xytext=(4, -10),
            textcoords="offset points",
        )
    ax.axhline(0.5, color="0.7", lw=0.8)
    ax.set_xlim(-0.05 * x_max, 1.04 * x_max)
    ax.set_xlabel("KL(π ‖ π_ref)  [nats / completion; k1 estimate]")
    ax.set_ylabel("reward quantile vs π_ref samples (mid-rank)")
    ax.set_title(results.get("title", "J-BOND vs RLOO vs Best-of-N"), fontsize=10)
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def merge(paths: Sequence[str], out: str) -> dict[str, Any]:
    """Combine the runs of several ``jbond.json`` files made with the same eval set and pool; plot them."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    first = parts[0]
    for p, part in zip(paths[1:], parts[1:]):
        if part["bon"] != first["bon"]:
            raise SystemExit(
                f"{p}: its Best-of-N points differ from {paths[0]}'s (another eval set or pool?)"
            )
    results = {
        **first,
        "runs": {k: v for part in parts for k, v in part["runs"].items()},
        "merged_from": list(paths),
    }
    results["seconds_total"] = sum(part["seconds_total"] for part in parts)
    with open(os.path.join(out, "jbond.json"), "w") as f:
        json.dump(results, f, indent=2)
    plot(results, os.path.join(out, "jbond.png"))
    print(f"merged {len(parts)} files into {out}/jbond.json and {out}/jbond.png")
    return results


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """``--help``: the module docstring as written, every flag with its default."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    ap.add_argument(
        "--smoke",
        action="store_true",
        help="tiny random model + char tokenizer; 2 steps unless --steps is given",
    )
    ap.add_argument("--out", default="runs/jbond", help="jbond.json, jbond.png, adapters/<run>")
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="HH-RLHF JSONL(.gz) file of the prompts")
    ap.add_argument("--methods", default="jbond,reinforce", help="comma list of jbond, reinforce")
    ap.add_argument("--kl-coefs", default="0.05,0.5", help="REINFORCE KL coefficients (comma list)")
    ap.add_argument("--steps", type=int, default=15, help="optimizer steps per run")
    ap.add_argument("--eval-every", type=int, default=5, help="evaluate every N steps (and at the last)")
    ap.add_argument("--prompts-per-step", type=int, default=4, help="prompts per step")
    ap.add_argument("--eval-prompts", type=int, default=12, help="fixed eval prompts (never trained on)")
    ap.add_argument("--eval-samples", type=int, default=4, help="policy samples per eval prompt")
    ap.add_argument(
        "--pool", type=int, default=24, help="reference samples per eval prompt (quantiles, Best-of-N)"
    )
    ap.add_argument("--max-new-tokens", type=int, default=12, help="completion length limit")
    ap.add_argument("--max-prompt-length", type=int, default=64, help="max prompt tokens")
    ap.add_argument(
        "--max-question-words", type=int, default=16, help="use questions of at most this many words"
    )
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank r (lora_alpha = 2r)")
    ap.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate")
    ap.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip")
    ap.add_argument("--eta", type=float, default=0.2, help="anchor EMA rate η (decay 1 − η)")
    ap.add_argument(
        "--jbond-beta",
        type=float,
        default=0.5,
        help="Jeffreys weight w on the backward KL (jbond backward_weight)",
    )
    ap.add_argument("--jbond-gamma", type=float, default=0.0, help="extra KL-to-anchor weight γ")
    ap.add_argument("--rloo-k", type=int, default=2, help="REINFORCE samples per prompt")
    ap.add_argument(
        "--pool-file", default=None, help="cache of the reference pool's rewards (JSON), shared by runs"
    )
    ap.add_argument(
        "--merge",
        nargs="+",
        default=None,
        metavar="JSON",
        help="only merge the runs of these jbond.json files and plot",
    )
    ap.add_argument(
        "--seed", type=int, default=0, help="seed of the prompt order, the samples and the adapters"
    )
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy machine)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty --out")
    ap.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps, per run (0: never)")
    ap.add_argument(
        "--resume",
        default=None,
        metavar="OUT",
        help="continue an interrupted run folder (= --out): each run from its latest checkpoint",
    )
    ap.add_argument("--verbose", action="store_true", help="print every training step as JSON")
    args = ap.parse_args(argv)
    if args.smoke:
        if args.steps == ap.get_default("steps"):
            args.steps = 2
        args.eval_every, args.prompts_per_step, args.eval_prompts = 1, 2, 2
        args.eval_samples, args.pool, args.max_new_tokens, args.threads = 2, 4, 6, 1
        args.kl_coefs, args.lr = "0.1", 1e-2
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.merge:
        os.makedirs(args.out, exist_ok=True)
        return merge(args.merge, args.out)
    if args.resume is not None and Path(args.resume).resolve() != Path(args.out).resolve():
        raise SystemExit("--resume must be the run folder --out (each run resumes from OUT/adapters/<run>)")
    try:
        prepare_run_dir(args.out, overwrite=args.overwrite or args.resume is not None)
    except FileExistsError as err:
        raise SystemExit(str(err)) from None
    t_start = time.perf_counter()
    ctx = build_ctx(args)
    bon = []
    for n in BON_NS:
        q = bon_expected_quantile(ctx.pool, n)
        bon.append({"n": n, "quantile": float(q.mean()), "kl_bound": bon_kl_bound(n)})
    print(
        "Best-of-N on the reference pool: "
        + ", ".join(f"N={b['n']}: quantile {b['quantile']:.3f} (KL ≤ {b['kl_bound']:.3f})" for b in bon)
    )
    runs: dict[str, Any] = {}
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in ("jbond", "reinforce"):
            raise SystemExit(f"--methods: unknown method {m!r} (jbond, reinforce)")
    title = f"J-BOND (η={args.eta}, w={args.jbond_beta}) vs RLOO vs BoN — {'tiny smoke model' if args.smoke else 'SmolLM2-135M'}"
    results: dict[str, Any] = {
        "args": vars(args),
        "reward": "tone (#positive − #negative words) + relevance (fraction of the question's content words)",
        "bon": bon,
        "runs": runs,
        "title": title,
    }

    def save() -> None:  # after every evaluation, so an interrupted run still leaves its results
        results["seconds_total"] = time.perf_counter() - t_start
        with open(os.path.join(args.out, "jbond.json"), "w") as f:
            json.dump(results, f, indent=2)
        plot(results, os.path.join(args.out, "jbond.png"))

    todo = [("jbond", 0.0)] if "jbond" in methods else []
    if "reinforce" in methods:
        todo += [("reinforce", float(x)) for x in args.kl_coefs.split(",")]
    for method, coef in todo:
        name = "jbond" if method == "jbond" else f"reinforce {coef:g}"
        runs[name] = []
        adapter_dir = os.path.join(args.out, "adapters", name.replace(" ", "_"))
        train(
            method,
            ctx,
            args,
            kl_coef=coef,
            history=runs[name],
            on_eval=save,
            save_dir=adapter_dir,
            resume=args.resume is not None,
        )
    save()
    print(f"wrote {args.out}/jbond.json and {args.out}/jbond.png in {results['seconds_total']:.0f} s")
    if args.smoke:
        print("smoke ok")
    return results


if __name__ == "__main__":
    main()
