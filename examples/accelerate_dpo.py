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
accuracy (also written to ``OUT/metrics.jsonl`` with ``--out``). ``--loss simpo --hparams '{"beta": 2.0,
"gamma": 0.5}'`` picks another registered pairwise loss.

Data order: one ``random.Random(seed + 1)`` permutation per epoch (file order with ``--no-shuffle``), the same
on every process; each step takes the next ``W · batch-size`` rows and process ``r`` collates rows
``r · batch-size …`` of them (accelerate's own sharding of a prepared loader, done by hand so that the data
position is one list that a checkpoint can hold).

Checkpoints and resume: ``--save-every N`` writes ``OUT/checkpoints/step-…`` atomically
(:mod:`prefopt.checkpoint`), from the main process, with the *unwrapped* policy: adapter, optimizer state,
RNG states, data order, step and the metrics so far. ``--resume OUT`` continues from the latest checkpoint;
every process loads the same one, so the next steps reproduce the uninterrupted run's losses exactly
(tested for one process, ``--smoke``; 2 CPU processes under torchrun gave the same, checked by hand).
What holds with ``W > 1`` processes: under DDP every process holds the same adapter, optimizer state, torch RNG state (same seed, same draws) and data order, so the main
process's copy is every process's state and a resume with the **same** ``W`` and ``--batch-size`` continues
the same run (a different ``W`` or batch size is refused: the data position would mean other rows).
``OUT`` must be a folder every process can read. Under FSDP the unwrapped policy holds only this process's
shards, so ``--save-every``/``--resume`` are refused there (use accelerate's ``save_state``). An existing,
non-empty ``--out`` is refused unless ``--overwrite`` (or ``--resume`` a checkpoint inside it).

    python examples/accelerate_dpo.py --smoke --steps 4 --save-every 2 --out /tmp/acc
    python examples/accelerate_dpo.py --smoke --steps 4 --save-every 2 --out /tmp/acc --resume /tmp/acc
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from torch import nn

from prefopt.checkpoint import load_training_state, prepare_run_dir, save_training_state
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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", default="smollm2", help="'smollm2' (offline) or a transformers model id/path")
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny random model + char tokenizer, 2 steps unless --steps is given",
    )
    p.add_argument("--loss", default="dpo", help="a registered pairwise loss (prefopt.available_losses())")
    p.add_argument("--hparams", default='{"beta": 0.1}', help="JSON dict of the loss's hyperparameters")
    p.add_argument("--steps", type=int, default=50, help="optimizer steps in all (a resumed run included)")
    p.add_argument("--batch-size", type=int, default=4, help="pairs per process per step")
    p.add_argument("--lr", type=float, default=5e-4, help="AdamW learning rate (constant)")
    p.add_argument("--max-length", type=int, default=256, help="prompt + completion tokens per row")
    p.add_argument("--seed", type=int, default=0, help="seed of torch and the data order")
    p.add_argument("--no-shuffle", action="store_true", help="keep the data in file order")
    p.add_argument("--out", default=None, help="save the trained adapter, metrics.jsonl and checkpoints here")
    p.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty --out")
    p.add_argument(
        "--save-every", type=int, default=0, help="checkpoint every N steps (0: never; needs --out)"
    )
    p.add_argument(
        "--resume",
        default=None,
        metavar="DIR",
        help="continue from a checkpoint folder, or from the latest checkpoint of a run folder (needs --out)",
    )
    args = p.parse_args(argv)
    if args.smoke and args.steps == p.get_default("steps"):
        args.steps = 2
    for name in ("steps", "save_every"):
        if getattr(args, name) < 0:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 0")
    if (args.save_every or args.resume) and not args.out:
        raise SystemExit("--save-every and --resume need --out (the run folder)")

    # cpu=True lets accelerate run torchrun-launched CPU processes as MULTI_CPU (gloo) instead of ignoring them
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    if (args.save_every or args.resume) and accelerator.distributed_type == DistributedType.FSDP:
        raise SystemExit("--save-every/--resume: not under FSDP (each process holds only its shards)")
    if args.out and accelerator.is_main_process:
        try:
            prepare_run_dir(args.out, overwrite=args.overwrite, resume=args.resume)
        except (FileExistsError, FileNotFoundError) as err:
            raise SystemExit(str(err)) from None
    accelerator.wait_for_everyone()
    torch.manual_seed(args.seed)
    model, tok = load_model(args)
    world, rank = accelerator.num_processes, accelerator.process_index
    if args.resume:
        state = load_training_state(args.resume, model)  # every process loads the same checkpoint
        policy = state.policy
        if state.extra["world_batch"] != [world, args.batch_size]:
            raise SystemExit(
                f"--resume: the checkpoint was taken with {state.extra['world_batch'][0]} processes × "
                f"{state.extra['world_batch'][1]} pairs, this run has {world} × {args.batch_size}"
            )
        accelerator.print(f"resuming from {state.path} (step {state.step})")
    else:
        policy = LoraPolicy(model)
    loss_fn = get_loss(args.loss, **json.loads(args.hparams))
    net = PolicyAndReference(policy, with_reference=loss_fn.needs_reference)
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=args.lr)
    collate = PreferenceCollator(tok, max_length=args.max_length)
    rows = list(load_builtin_pairs())

    rng = random.Random(args.seed + 1)  # the data order, the same on every process
    order: list[int] = []  # rows not yet used in this epoch, next first
    records: list[dict[str, Any]] = []
    step = 0
    if args.resume:
        optimizer.load_state_dict(state.optimizer)
        step, order, records = state.step, state.extra["order"], state.extra["records"]
        rng.setstate(state.extra["data_rng"])
    net, optimizer = accelerator.prepare(net, optimizer)
    if args.resume:
        state.restore_rng()  # last: nothing random may follow
    log = None
    if args.out and accelerator.is_main_process:
        log = open(os.path.join(args.out, "metrics.jsonl"), "w")  # noqa: SIM115 (closed after the loop)
        for rec in records:
            log.write(json.dumps(rec) + "\n")

    net.train()
    while step < args.steps:
        need = world * args.batch_size
        while len(order) < need:  # a new epoch
            order += list(range(len(rows))) if args.no_shuffle else rng.sample(range(len(rows)), len(rows))
        mine = order[rank * args.batch_size : (rank + 1) * args.batch_size]
        del order[:need]
        batch = collate([rows[i] for i in mine]).to(accelerator.device)
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
        rec = {
            "step": step,
            "loss": float(total / n_global),
            "pairs": int(n_global),
            "reward_accuracy": float(correct / n_global),
            "processes": world,
            "distributed_type": str(accelerator.distributed_type),
        }
        records.append(rec)
        accelerator.print(json.dumps(rec))
        if log is not None:
            log.write(json.dumps(rec) + "\n")
            log.flush()
        if args.save_every and step % args.save_every == 0:
            if accelerator.is_main_process:
                extra = {
                    "order": order,
                    "data_rng": rng.getstate(),
                    "records": records,
                    "world_batch": [world, args.batch_size],
                }
                unwrapped = accelerator.unwrap_model(net).policy
                save_training_state(args.out, policy=unwrapped, optimizer=optimizer, step=step, extra=extra)
            accelerator.wait_for_everyone()  # nobody resumes from a checkpoint that is not complete yet
    if log is not None:
        log.close()

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
    if args.smoke:
        accelerator.print("smoke ok")
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
