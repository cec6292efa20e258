"""Training checkpoints that survive a crash and resume a run exactly.

A training checkpoint is one folder holding everything the next optimizer step depends on:

    <run>/checkpoints/step-00000010/
        policy/              LoraPolicy.save: policy adapter, anchor adapter, value head (exact)
        training_state.pt    step, optimizer state, RNG states (python, numpy, torch CPU and CUDA),
                             and the loop's own ``extra`` state (data order, data RNG, metrics so far)

[`save_training_state`][prefopt.checkpoint.save_training_state] writes it **atomically**: the whole folder
is built under a hidden name next to its final place, every file and folder is fsynced, and one rename
moves it into place (the commit point; the parent folder is then fsynced). A process killed at any moment
leaves either no ``step-…`` folder or a complete one, never a partial one, so
[`latest_checkpoint`][prefopt.checkpoint.latest_checkpoint] always finds a loadable checkpoint. The policy
files are written by [`LoraPolicy.save`][prefopt.policy.LoraPolicy.save] (itself atomic) and read back by
[`LoraPolicy.load`][prefopt.policy.LoraPolicy.load], with its checks of the base model.

Resuming reproduces the uninterrupted run exactly when the loop keeps all of its randomness in the saved
state: the global RNGs are saved and restored here; any private ``random.Random`` or ``torch.Generator``
of the loop, and its data position, go into ``extra``. A typical loop:

    if args.resume:
        state = load_training_state(args.resume, model)      # policy rebuilt on `model`
        policy = state.policy
    else:
        policy = LoraPolicy(model, lora_config)
    opt = torch.optim.AdamW(policy.trainable_parameters(), lr=args.lr)
    if args.resume:
        opt.load_state_dict(state.optimizer)
        state.restore_rng()                                    # last: nothing random may follow
    for step in range(start + 1, args.steps + 1):
        ...
        if step % args.save_every == 0:
            save_training_state(run_dir, policy=policy, optimizer=opt, step=step, extra=...)

``training_state.pt`` is read with ``torch.load(weights_only=True)``: ``extra`` may hold tensors, numbers,
strings, ``None`` and (nested) lists, tuples and dicts of them, nothing else.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prefopt.policy import LoraPolicy, _fsync_dir, _fsync_file

__all__ = [
    "TrainingState",
    "checkpoint_dir",
    "latest_checkpoint",
    "load_training_state",
    "prepare_run_dir",
    "save_training_state",
]

CHECKPOINTS = "checkpoints"
STATE_FILE = "training_state.pt"
POLICY_DIR = "policy"
_STEP_DIR = re.compile(r"^step-(\d{8,})$")
_STAGING_PREFIX = ".prefopt-ckpt-"
_FORMAT_VERSION = 1


def checkpoint_dir(run_dir: str | os.PathLike[str], step: int) -> Path:
    """The folder of the checkpoint taken after ``step`` optimizer steps: ``run_dir/checkpoints/step-%08d``."""
    return Path(run_dir) / CHECKPOINTS / f"step-{step:08d}"


def latest_checkpoint(path: str | os.PathLike[str]) -> Path | None:
    """The complete checkpoint with the highest step under ``path``: ``path`` itself if it is a checkpoint
    folder (holds ``training_state.pt``), else the newest ``step-…`` folder of ``path/checkpoints`` (or of
    ``path`` when it is a ``checkpoints`` folder). ``None`` when there is none."""
    root = Path(path)
    if (root / STATE_FILE).is_file():
        return root
    for parent in (root / CHECKPOINTS, root):
        if not parent.is_dir():
            continue
        found = [
            (int(m.group(1)), p)
            for p in parent.iterdir()
            if (m := _STEP_DIR.match(p.name)) and (p / STATE_FILE).is_file()
        ]
        if found:
            return max(found)[1]
    return None


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a dependency
        return state
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
    keys_t = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    state["numpy"] = (str(name), keys_t, int(pos), int(has_gauss), float(cached))
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def save_training_state(
    run_dir: str | os.PathLike[str],
    *,
    policy: LoraPolicy,
    optimizer: torch.optim.Optimizer,
    step: int,
    extra: dict[str, Any] | None = None,
    scheduler: Any = None,
) -> Path:
    """Write the checkpoint of ``step`` to ``run_dir/checkpoints/step-%08d`` atomically and return its path.

    Saved: ``policy`` with [`LoraPolicy.save`][prefopt.policy.LoraPolicy.save] (policy and anchor adapters,
    value head), ``optimizer.state_dict()``, ``scheduler.state_dict()`` if given, the global RNG states
    (python ``random``, numpy, torch CPU, and CUDA when initialised), ``step`` and ``extra`` (the loop's own
    state: data order, a private ``random.Random``'s ``getstate()``, metrics so far; see the module
    docstring for the types allowed). Take it after the optimizer step and before anything random of the
    next step.

    Atomic: built in a hidden folder inside ``run_dir/checkpoints``, fsynced, then moved into place by one
    rename; after a crash at any point the folder is either absent or complete (leftovers of interrupted
    saves are removed by the next save). A checkpoint already at that path (a re-run from an older
    checkpoint) is replaced: it is renamed aside first, so for a moment that step has no checkpoint while
    the older ones stay complete.
    """
    if not isinstance(policy, LoraPolicy):
        raise TypeError(f"policy must be a LoraPolicy, got {type(policy).__name__}")
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    if extra is not None and not isinstance(extra, dict):
        raise TypeError(f"extra must be a dict or None, got {type(extra).__name__}")
    final = checkpoint_dir(run_dir, step)
    parent = final.parent
    parent.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:16]
    staging = parent / f"{_STAGING_PREFIX}{token}"
    staging.mkdir()
    try:
        policy.save(staging / POLICY_DIR)  # fsyncs its own files and folder
        state = {
            "format_version": _FORMAT_VERSION,
            "step": step,
            "optimizer": optimizer.state_dict(),
            "scheduler": None if scheduler is None else scheduler.state_dict(),
            "rng": _rng_state(),
            "extra": {} if extra is None else extra,
        }
        torch.save(state, staging / STATE_FILE)
        _fsync_file(os.fspath(staging / STATE_FILE))
        _fsync_dir(os.fspath(staging))
        if final.exists():
            aside = parent / f"{_STAGING_PREFIX}old-{token}"
            os.replace(final, aside)
        os.replace(staging, final)  # commit
        _fsync_dir(os.fspath(parent))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for p in parent.iterdir():  # the replaced checkpoint, leftovers of interrupted saves
        if p.name.startswith(_STAGING_PREFIX):
            shutil.rmtree(p, ignore_errors=True)
    return final


@dataclass
class TrainingState:
    """What [`load_training_state`][prefopt.checkpoint.load_training_state] read back."""

    path: Path
    """The checkpoint folder."""
    policy: LoraPolicy
    """The policy rebuilt on the given base model, every adapter tensor and the value head exact."""
    step: int
    """Optimizer steps taken when the checkpoint was saved; the next step is ``step + 1``."""
    optimizer: dict[str, Any]
    """For ``optimizer.load_state_dict`` (build the optimizer on ``policy.trainable_parameters()``)."""
    scheduler: dict[str, Any] | None
    """For ``scheduler.load_state_dict``, or ``None`` if none was saved."""
    extra: dict[str, Any] = field(default_factory=dict)
    """The loop's own state, as given to ``save_training_state``."""
    rng: dict[str, Any] = field(default_factory=dict, repr=False)

    def restore_rng(self) -> None:
        """Set the global RNGs (python ``random``, numpy, torch CPU and CUDA) to their saved states. Call it
        last, after building everything that draws random numbers (a new LoRA adapter's init does)."""
        _set_rng_state(self.rng)


def load_training_state(
    path: str | os.PathLike[str], base_model: nn.Module, *, check_base: bool = True
) -> TrainingState:
    """Read a checkpoint written by [`save_training_state`][prefopt.checkpoint.save_training_state].

    ``path``: a checkpoint folder, or a run folder (its latest complete checkpoint is taken, see
    [`latest_checkpoint`][prefopt.checkpoint.latest_checkpoint]). The policy is rebuilt on ``base_model``
    (wrapped in place) with [`LoraPolicy.load`][prefopt.policy.LoraPolicy.load], which refuses a different
    base model unless ``check_base=False``. The global RNGs are *not* touched until
    [`TrainingState.restore_rng`][prefopt.checkpoint.TrainingState.restore_rng] is called.

    Raises ``FileNotFoundError`` when ``path`` holds no checkpoint and ``ValueError`` naming the file when
    ``training_state.pt`` is corrupt or not a training state.
    """
    found = latest_checkpoint(path)
    if found is None:
        raise FileNotFoundError(f"no checkpoint (a folder with {STATE_FILE}) in {os.fspath(path)}")
    state_path = found / STATE_FILE
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{state_path}: corrupt or unreadable training state ({err!r})") from err
    if not isinstance(state, dict) or state.get("format_version") != _FORMAT_VERSION:
        raise ValueError(f"{state_path}: not a prefopt training state (format_version {_FORMAT_VERSION})")
    try:
        step, optimizer, rng = int(state["step"]), dict(state["optimizer"]), dict(state["rng"])
        scheduler, extra = state["scheduler"], dict(state["extra"])
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{state_path}: incomplete training state ({err!r})") from err
    policy = LoraPolicy.load(base_model, found / POLICY_DIR, check_base=check_base)
    return TrainingState(found, policy, step, optimizer, scheduler, extra, rng)


def prepare_run_dir(
    out: str | os.PathLike[str], *, overwrite: bool = False, resume: str | os.PathLike[str] | None = None
) -> Path:
    """Create the output folder ``out`` of a training run, refusing to overwrite an earlier run silently.

    An ``out`` that exists and is not empty raises ``FileExistsError`` unless ``overwrite=True`` (then its
    ``checkpoints`` folder is deleted, so that old checkpoints cannot be taken for the new run's) or
    ``resume`` is a checkpoint inside ``out`` (continuing that run). An ``out`` that is a file raises
    ``FileExistsError`` always; a ``resume`` that holds no checkpoint raises ``FileNotFoundError`` (before
    anything is created or loaded).
    """
    root = Path(out)
    if root.exists() and not root.is_dir():
        raise FileExistsError(f"output folder is a file: {root}")
    continuing = False
    if resume is not None:
        ckpt = latest_checkpoint(resume)
        if ckpt is None:
            raise FileNotFoundError(f"nothing to resume: no checkpoint ({STATE_FILE}) in {os.fspath(resume)}")
        continuing = root.resolve() in ckpt.resolve().parents
    if root.is_dir() and any(root.iterdir()) and not continuing:
        if not overwrite:
            raise FileExistsError(
                f"output folder {root} is not empty: choose another --out, pass --overwrite to replace its "
                "contents, or --resume a checkpoint inside it"
            )
        shutil.rmtree(root / CHECKPOINTS, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    return root
