"""DPO (or any pairwise prefopt loss) with a LoRA policy under Hugging Face accelerate: DDP or FSDP, any GPUs.

prefopt adds nothing distributed of its own: accelerate (or torchrun + DDP/FSDP) does the wrapping and the
gradient averaging, prefopt's losses are pure functions of per-sequence log-probs. Two things matter:

1. **The forward that DDP/FSDP sees.** Gradient sync (DDP) and parameter gathering (FSDP) hook into the
   *wrapped module's forward*. ``pair_logps`` calls the backbone and reads the LM head directly, so wrap the
   log-prob computation in a small ``nn.Module`` (:class:`PolicyAndReference` below) and ``prepare`` that.
   The reference pass (``policy.reference()``: adapters off, same backbone) runs inside the same forward, so
   under FSDP it sees gathered weights too.
2. **Scaling.** DDP/FSDP *average* gradients over the ``W`` processes. For the mean over the global batch of
   ``N`` pairs, backpropagate ``W · Σ_local ℓ / N`` with ``N`` all-reduced (``accelerator.reduce(..., "sum")``).
   A local ``.mean()`` is only right when every process holds the same number of pairs (the collator may
   drop bad rows, so it is not guaranteed). See ``docs/distributed.md``.

Run::

    python examples/accelerate_dpo.py --smoke                         # tiny model, CPU, one process
    torchrun --nproc_per_node 2 examples/accelerate_dpo.py --smoke    # 2 CPU processes (gloo)
    accelerate launch --config_file examples/accelerate_configs/ddp.yaml  examples/accelerate_dpo.py --steps 100
    accelerate launch --config_file examples/accelerate_configs/fsdp.yaml examples/accelerate_dpo.py --steps 100

Each step prints one JSON line (main process): the global-batch mean loss, the global pair count, reward
accuracy. ``--loss simpo --hparams '{"beta": 2.0, "gamma": 0.5}'`` picks another registered pairwise loss.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn
from torch.utils.data import DataLoader

from prefopt.data import PreferenceCollator, load_builtin_pairs
from prefopt.logprobs import pair_logps
from prefopt.policy import LoraPolicy
from prefopt.registry import get_loss
from prefopt.types import PairBatch, PairLogps


class PolicyAndReference(nn.Module):
    """``forward(batch) -> PairLogps``: the policy's sequence log-probs (with grad) and, if ``with_reference``,
    the reference's (adapters off, no grad), by [`pair_logps`][prefopt.logprobs.pair_logps]."""

    def __init__(self, policy: LoraPolicy, with_reference: bool) -> None:
        super().__init__()
        self.policy = policy
        self.with_reference = with_reference

    def forward(self, batch: PairBatch) -> PairLogps:
        return pair_logps(self.policy, batch, reference=self.with_reference)


def load_model(args: argparse.Namespace) -> tuple[Any, Any]:
    if args.smoke:
        from prefopt.testing import char_tokenizer, tiny_causal_lm

        tok = char_tokenizer()
        return tiny_causal_lm("llama", vocab_size=len(tok), seed=args.seed), tok
    if args.model == "smollm2":
        from prefopt.models import load_smollm2

        return load_smollm2()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(args.model), AutoTokenizer.from_pretrained(args.model)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """``--help``: the module docstring as written, every flag with its default."""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", default="smollm2", help="'smollm2' (offline) or a transformers model id/path")
    p.add_argument("--smoke", action="store_true", help="tiny random model + char tokenizer, 2 steps")
    p.add_argument("--loss", default="dpo", help="a registered pairwise loss (prefopt.available_losses())")
    p.add_argument("--hparams", default='{"beta": 0.1}', help="JSON dict of the loss's hyperparameters")
    p.add_argument("--steps", type=int, default=50, help="optimizer steps (--smoke: at most 2)")
    p.add_argument("--batch-size", type=int, default=4, help="pairs per process per step")
    p.add_argument("--lr", type=float, default=5e-4, help="AdamW learning rate (constant)")
    p.add_argument("--max-length", type=int, default=256, help="prompt + completion tokens per row")
    p.add_argument("--seed", type=int, default=0, help="seed of torch and the data order")
    p.add_argument("--no-shuffle", action="store_true", help="keep the data in file order")
    p.add_argument("--out", default=None, help="save the trained adapter here")
    args = p.parse_args()
    if args.smoke:
        args.steps = min(args.steps, 2)

    # cpu=True lets accelerate run torchrun-launched CPU processes as MULTI_CPU (gloo) instead of ignoring them
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    torch.manual_seed(args.seed)
    model, tok = load_model(args)
    policy = LoraPolicy(model)
    loss_fn = get_loss(args.loss, **json.loads(args.hparams))
    net = PolicyAndReference(policy, with_reference=loss_fn.needs_reference)
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=args.lr)
    collate = PreferenceCollator(tok, max_length=args.max_length)
    rows = list(load_builtin_pairs())
    loader = DataLoader(rows, batch_size=args.batch_size, shuffle=not args.no_shuffle, collate_fn=collate)
    net, optimizer, loader = accelerator.prepare(net, optimizer, loader)
    world = accelerator.num_processes

    step = 0
    net.train()
    while step < args.steps:
        for batch in loader:
            pairs = net(batch)
            out = loss_fn(pairs)
            per_pair = out.loss  # (B_local,), unreduced
            n_local = torch.tensor(float(per_pair.shape[0]), device=per_pair.device)
            n_global = accelerator.reduce(n_local, reduction="sum")
            loss = per_pair.sum() * world / n_global  # DDP/FSDP average → the global-batch mean
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            total = accelerator.reduce(per_pair.detach().sum(), reduction="sum")
            margin = pairs.chosen - pairs.rejected
            if pairs.has_reference:
                assert pairs.ref_chosen is not None and pairs.ref_rejected is not None
                margin = margin - (pairs.ref_chosen - pairs.ref_rejected)
            correct = accelerator.reduce((margin.detach() > 0).float().sum(), reduction="sum")
            step += 1
            accelerator.print(
                json.dumps(
                    {
                        "step": step,
                        "loss": float(total / n_global),
                        "pairs": int(n_global),
                        "reward_accuracy": float(correct / n_global),
                        "processes": world,
                        "distributed_type": str(accelerator.distributed_type),
                    }
                )
            )
            if step >= args.steps:
                break

    if args.out:
        accelerator.wait_for_everyone()
        if accelerator.distributed_type == DistributedType.FSDP:
            state = accelerator.get_state_dict(net)  # gathered on the main process
            if accelerator.is_main_process:
                from safetensors.torch import save_file

                os.makedirs(args.out, exist_ok=True)
                lora = {k: v.contiguous() for k, v in state.items() if "lora_" in k}
                save_file(lora, os.path.join(args.out, "lora_state.safetensors"))
        elif accelerator.is_main_process:
            accelerator.unwrap_model(net).policy.save(args.out)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if world > 1:
        # Leave without interpreter teardown. Destroying gloo's process group at exit races with its worker
        # thread: seen here both as an abort ("terminate called without an active exception") and as a
        # deadlock (the DDP reducer's destructor joins a worker that waits for the GIL to free a finished
        # collective's tensors). Everything is printed and saved by now.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
