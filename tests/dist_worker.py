"""Worker for ``tests/test_distributed.py``: one training step of prefopt losses under DDP and FSDP2 (CPU, gloo).

Run by the test through ``python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist_worker.py
--out DIR``; each rank writes ``DIR/rank{r}.pt``. The model/batch builders and the step functions are shared
with the test, which runs the *same* functions single-process on the whole global batch as the oracle.

Scaling rule exercised here (see ``docs/distributed.md``): DDP and FSDP **average** gradients over the ``W``
ranks. A global-batch mean ``(1/N) Σ_global ℓ`` therefore needs, on every rank, the local loss
``(W/N) Σ_local ℓ`` with ``N`` the *global* count (pairs, sequences or tokens, all-reduced). The shards are
deliberately unequal (3 and 2 rows), so a plain local ``.mean()`` gives the wrong gradient (the "naive" runs).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from prefopt.logprobs import token_logps
from prefopt.losses.margin import dpo
from prefopt.losses.policy_gradient import grpo, reinforce
from prefopt.masked import seq_len, seq_sum, token_mean
from prefopt.policy import LoraPolicy
from prefopt.testing import tiny_causal_lm
from prefopt.types import PairLogps

VOCAB = 128
N_ROWS = 5  # pairs (DPO) or sequences (RL) in the global batch
SPLITS = ((0, 3), (3, 5))  # rows of rank 0 and rank 1: deliberately unequal
T = 12
DTYPE = torch.float64


# --------------------------------------------------------------------------------------------------------------
# deterministic model and batches
# --------------------------------------------------------------------------------------------------------------


def build_policy(seed: int = 0) -> LoraPolicy:
    """A float64 tiny Llama + LoraPolicy with non-zero policy and anchor adapters (anchor ≠ policy ≠ base)."""
    model = tiny_causal_lm("llama", vocab_size=VOCAB, hidden_size=32, num_layers=2, seed=seed).to(DTYPE)
    policy = LoraPolicy(model)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_" in name and ".default." in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
        policy.update_anchor_(0.0)  # anchor := current policy ...
        for name, p in policy.model.named_parameters():
            if "lora_" in name and ".default." in name:
                p.add_(
                    0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype)
                )  # ... then the policy moves on
    return policy


def _rows(gen: torch.Generator, n: int, prompt_len: Tensor, comp_len: Tensor) -> dict[str, Tensor]:
    ids = torch.randint(3, VOCAB, (n, T), generator=gen)
    pos = torch.arange(T)
    total = prompt_len + comp_len
    attn = pos[None, :] < total[:, None]
    comp = attn & (pos[None, :] >= prompt_len[:, None])
    ids = torch.where(attn, ids, torch.zeros_like(ids))
    return {"input_ids": ids, "attention_mask": attn.long(), "completion_mask": comp}


def pair_batch(seed: int = 0) -> dict[str, Tensor]:
    """Collated preference batch ``(2B, T)``: rows 0..B-1 chosen, B..2B-1 rejected (shared prompts)."""
    gen = torch.Generator().manual_seed(seed + 10)
    prompt_len = torch.randint(2, 5, (N_ROWS,), generator=gen)
    chosen = _rows(gen, N_ROWS, prompt_len, torch.randint(1, T - 4, (N_ROWS,), generator=gen))
    rejected = _rows(gen, N_ROWS, prompt_len, torch.randint(1, T - 4, (N_ROWS,), generator=gen))
    rejected["input_ids"][:, :4] = chosen["input_ids"][:, :4]  # same prompt tokens
    return {k: torch.cat([chosen[k], rejected[k]]) for k in chosen}


def rl_batch(seed: int = 0) -> dict[str, Tensor]:
    """Sampled sequences with very unequal completion lengths, rewards, advantages and old log-probs."""
    gen = torch.Generator().manual_seed(seed + 20)
    prompt_len = torch.randint(2, 4, (N_ROWS,), generator=gen)
    comp_len = torch.tensor([8, 1, 5, 2, 7])
    out = _rows(gen, N_ROWS, prompt_len, comp_len)
    out["rewards"] = torch.randn(N_ROWS, generator=gen, dtype=DTYPE)
    out["advantages"] = torch.randn(N_ROWS, generator=gen, dtype=DTYPE)
    out["old_noise"] = 0.3 * torch.randn(N_ROWS, T, generator=gen, dtype=DTYPE)  # ratio ≠ 1, clips active
    return out


def shard_pairs(batch: dict[str, Tensor], lo: int, hi: int) -> dict[str, Tensor]:
    """Pairs ``lo..hi-1`` of a collated pair batch (chosen rows and their rejected rows)."""
    idx = torch.cat([torch.arange(lo, hi), torch.arange(N_ROWS + lo, N_ROWS + hi)])
    return {k: v[idx] for k, v in batch.items()}


def shard_rows(batch: dict[str, Tensor], lo: int, hi: int) -> dict[str, Tensor]:
    return {k: v[lo:hi] for k, v in batch.items()}


# --------------------------------------------------------------------------------------------------------------
# the forward DDP/FSDP must see
# --------------------------------------------------------------------------------------------------------------


class TokenLogps(nn.Module):
    """``forward(...) = token_logps(policy.model, ...)``: DDP only syncs gradients of a forward run through
    the DDP wrapper, so the log-prob computation is what gets wrapped (3 lines of user code)."""

    def __init__(self, policy: LoraPolicy) -> None:
        super().__init__()
        self.policy = policy

    def forward(self, input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor) -> Tensor:
        out = token_logps(self.policy.model, input_ids, attention_mask, completion_mask)
        assert isinstance(out, Tensor)
        return out


def global_count(x: Tensor | int, world: int) -> Tensor:
    """All-reduced (summed) count; the identity in a single process."""
    t = torch.as_tensor(x, dtype=DTYPE).clone()
    if world > 1:
        dist.all_reduce(t)
    return t


# --------------------------------------------------------------------------------------------------------------
# one step per loss: returns (global loss as a number, local loss that is backpropagated)
# --------------------------------------------------------------------------------------------------------------

Forward = Callable[[Tensor, Tensor, Tensor], Tensor]


def dpo_step(
    fwd: Forward, policy: LoraPolicy, batch: dict[str, Tensor], world: int, *, naive: bool = False
) -> tuple[Tensor, Tensor]:
    """DPO (Rafailov et al. 2023, Eq. 7) on summed log-probs; global mean over pairs."""
    mask = batch["completion_mask"]
    logp = fwd(batch["input_ids"], batch["attention_mask"], mask)
    with policy.reference():
        ref = token_logps(policy.model, batch["input_ids"], batch["attention_mask"], mask)
    assert isinstance(ref, Tensor)
    s, s_ref, n = seq_sum(logp, mask), seq_sum(ref, mask), seq_len(mask)
    b = mask.shape[0] // 2
    pairs = PairLogps(s[:b], s[b:], s_ref[:b], s_ref[b:], n[:b], n[b:])
    per_pair = dpo(pairs, beta=0.5).loss  # (b,)
    if naive:
        return per_pair.detach().mean(), per_pair.mean()
    n_pairs = global_count(b, world)
    total = global_count(per_pair.detach().sum(), world)
    return total / n_pairs, per_pair.sum() * world / n_pairs


def grpo_step(
    fwd: Forward, policy: LoraPolicy, batch: dict[str, Tensor], world: int, *, naive: bool = False
) -> tuple[Tensor, Tensor]:
    """GRPO/DAPO per-token clipped surrogate (Shao et al. 2024, Eq. 3), global token mean."""
    mask = batch["completion_mask"]
    logp = fwd(batch["input_ids"], batch["attention_mask"], mask)
    old = torch.where(mask, logp.detach() + batch["old_noise"].to(logp.dtype), torch.zeros_like(logp))
    per_token = grpo(logp, old, batch["advantages"], mask, epsilon_low=0.2, epsilon_high=0.28).loss  # (b, t)
    if naive:
        return token_mean(per_token.detach(), mask), token_mean(per_token, mask)
    n_tok = global_count(mask.sum(), world)
    total = global_count(per_token.detach().sum(), world)
    return total / n_tok, token_mean(per_token, mask, num_tokens=n_tok / world)


def reinforce_step(
    fwd: Forward, policy: LoraPolicy, batch: dict[str, Tensor], world: int, *, naive: bool = False
) -> tuple[Tensor, Tensor]:
    """REINFORCE (one loss per sequence), global mean over sequences."""
    mask = batch["completion_mask"]
    logp = fwd(batch["input_ids"], batch["attention_mask"], mask)
    per_seq = seq_sum(reinforce(logp, None, batch["rewards"].to(logp.dtype), mask).loss, mask)  # (b,)
    if naive:
        return per_seq.detach().mean(), per_seq.mean()
    n_seq = global_count(mask.shape[0], world)
    total = global_count(per_seq.detach().sum(), world)
    return total / n_seq, per_seq.sum() * world / n_seq


STEPS = {"dpo": (dpo_step, pair_batch, shard_pairs), "grpo": (grpo_step, rl_batch, shard_rows)}
STEPS["reinforce"] = (reinforce_step, rl_batch, shard_rows)


def trainable(policy: LoraPolicy) -> dict[str, Tensor]:
    return {n: p for n, p in policy.named_parameters() if p.requires_grad}


def _full(x: Any) -> Tensor:
    """A plain tensor from a tensor or a (sharded) DTensor."""
    full = getattr(x, "full_tensor", None)
    return (full() if callable(full) else x).detach().clone()


def run_case(case: str, fwd: Forward, policy: LoraPolicy, rank: int, world: int, naive: bool) -> dict:
    """Loss, gradients and parameters after one SGD step (lr 0.1) on this rank's shard (or the whole batch)."""
    step, make_batch, shard = STEPS[case]
    batch = make_batch()
    if world > 1:
        batch = shard(batch, *SPLITS[rank])
    params = trainable(policy)
    opt = torch.optim.SGD(params.values(), lr=0.1)
    opt.zero_grad(set_to_none=True)
    loss, local = step(fwd, policy, batch, world, naive=naive)
    local.backward()
    grads = {n: _full(p.grad) for n, p in params.items()}
    opt.step()
    return {"loss": float(loss), "grads": grads, "params": {n: _full(p) for n, p in params.items()}}


# --------------------------------------------------------------------------------------------------------------
# FSDP2: reference / anchor contexts reach the sharded modules
# --------------------------------------------------------------------------------------------------------------


def shard_fsdp(policy: LoraPolicy) -> None:
    """FSDP2 ``fully_shard`` on every decoder layer and on the backbone. The frozen LM head is left
    unsharded (replicated): ``token_logps`` reads ``lm_head.weight`` directly in its chunked head, outside any
    module forward, so it must be a plain tensor."""
    from torch.distributed.fsdp import fully_shard

    backbone = policy.model.get_base_model().model
    for layer in backbone.layers:
        fully_shard(layer)
    fully_shard(backbone)


def fsdp_contexts(policy: LoraPolicy) -> dict[str, Tensor]:
    """Full-batch (unsharded data) log-probs of policy, reference and anchor through the sharded model."""
    batch = pair_batch()
    args = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    out = {}
    with torch.no_grad():
        out["policy"] = token_logps(policy.model, *args)
    with policy.reference():
        out["reference"] = token_logps(policy.model, *args)
    with policy.anchor():
        out["anchor"] = token_logps(policy.model, *args)
    return {k: v.detach().clone() for k, v in out.items()}  # type: ignore[union-attr]


def anchor_after_update(policy: LoraPolicy) -> Tensor:
    """One EMA step of the anchor (decay 0.5, after the policy's DPO step), then the anchor's log-probs."""
    policy.update_anchor_(0.5)
    batch = pair_batch()
    with policy.anchor():
        out = token_logps(policy.model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    return out.detach().clone()  # type: ignore[union-attr]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 2, f"this worker expects 2 processes, got {world}"
    result: dict[str, Any] = {"world": world}
    from torch.nn.parallel import DistributedDataParallel as DDP

    for case in STEPS:
        for naive in (False, True):
            policy = build_policy()
            ddp = DDP(TokenLogps(policy))
            result[f"ddp/{case}{'/naive' if naive else ''}"] = run_case(case, ddp, policy, rank, world, naive)
            dist.barrier()

    try:
        policy = build_policy()
        shard_fsdp(policy)
        result["fsdp/contexts"] = fsdp_contexts(policy)
        result["fsdp/dpo"] = run_case("dpo", TokenLogps(policy), policy, rank, world, False)
        result["fsdp/anchor_after_update"] = anchor_after_update(policy)
        result["fsdp/error"] = None
    except Exception as err:  # reported by the test, which then fails with this message
        import traceback

        result["fsdp/error"] = f"{type(err).__name__}: {err}\n{traceback.format_exc()}"
    torch.save(result, os.path.join(args.out, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()
    # no interpreter teardown: destroying gloo's process group (held by the DDP reducers) at exit races with
    # its worker thread (abort or deadlock; see examples/accelerate_dpo.py); the results are saved
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
