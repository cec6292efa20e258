"""prefopt.checkpoint: atomic training checkpoints, and resumes that reproduce the uninterrupted run exactly.

Oracle for resume: the same loop run N steps in one go, and N/2 steps + a checkpoint + a fresh process state
(new base model, RNGs scrambled) + resume + N/2 steps, must give bit-identical losses at every step. The loop
draws from every RNG that is saved (python ``random``, numpy, torch via LoRA dropout) and uses the anchor
adapter and the value head, so a state that is not restored shows up as a different loss.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import peft
import pytest
import torch

from prefopt.checkpoint import (
    STATE_FILE,
    checkpoint_dir,
    latest_checkpoint,
    load_training_state,
    prepare_run_dir,
    save_training_state,
)
from prefopt.policy import LoraPolicy
from prefopt.testing import tiny_causal_lm

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 48


def base() -> Any:
    return tiny_causal_lm("llama", vocab_size=VOCAB, hidden_size=16, num_layers=1, seed=3)


def new_policy() -> LoraPolicy:
    cfg = peft.LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", lora_dropout=0.2)
    return LoraPolicy(base(), cfg, anchor_rank=2, value_head=True)


def one_step(policy: LoraPolicy, opt: torch.optim.Optimizer, data_rng: random.Random) -> float:
    """A step that depends on every saved RNG, the anchor, the value head and the optimizer state."""
    ids = torch.tensor([[data_rng.randrange(VOCAB) for _ in range(6)] for _ in range(2)])
    ids[:, 0] = random.randrange(VOCAB)  # global python RNG
    ids[:, 1] = int(np.random.randint(VOCAB))  # global numpy RNG
    policy.train()  # LoRA dropout: global torch RNG
    out = policy.model(input_ids=ids)
    with policy.anchor():
        anchor_logits = policy.model(input_ids=ids).logits
    values = policy.values(ids, torch.ones_like(ids))
    loss = (out.logits - anchor_logits).pow(2).mean() + out.logits.logsumexp(-1).mean() + values.pow(2).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    policy.update_anchor_(0.5)
    return float(loss.detach())


def run(
    steps: int, run_dir: Path | None = None, *, save_at: int = 0, resume: Path | None = None
) -> list[float]:
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    data_rng = random.Random(1)
    start = 0
    if resume is not None:
        state = load_training_state(resume, base())
        policy = state.policy
    else:
        policy = new_policy()
    opt = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-2)
    if resume is not None:
        opt.load_state_dict(state.optimizer)
        data_rng.setstate(state.extra["data_rng"])
        start = state.step
        state.restore_rng()
    losses = []
    for step in range(start + 1, steps + 1):
        losses.append(one_step(policy, opt, data_rng))
        if save_at and step == save_at:
            assert run_dir is not None
            save_training_state(
                run_dir, policy=policy, optimizer=opt, step=step, extra={"data_rng": data_rng.getstate()}
            )
    return losses


def test_resume_reproduces_every_loss_exactly(tmp_path: Path) -> None:
    full = run(6)
    first = run(3, tmp_path, save_at=3)
    random.seed(123)  # scramble everything the checkpoint must restore
    np.random.seed(123)
    torch.manual_seed(123)
    rest = run(6, resume=tmp_path)
    assert first + rest == full  # bit-identical floats, every step
    assert len(set(full)) == 6


def test_each_restored_piece_matters(tmp_path: Path) -> None:
    """Sanity of the oracle: resuming without the RNG restore, or without the optimizer state, differs."""
    full = run(6)
    run(3, tmp_path, save_at=3)
    state = load_training_state(tmp_path, base())
    opt = torch.optim.AdamW(state.policy.trainable_parameters(), lr=1e-2)
    opt.load_state_dict(state.optimizer)
    data_rng = random.Random(1)
    data_rng.setstate(state.extra["data_rng"])
    torch.manual_seed(99)  # RNG not restored
    assert one_step(state.policy, opt, data_rng) != full[3]
    state = load_training_state(tmp_path, base())
    opt = torch.optim.AdamW(state.policy.trainable_parameters(), lr=1e-2)  # optimizer state not restored
    data_rng.setstate(state.extra["data_rng"])
    state.restore_rng()
    first = one_step(state.policy, opt, data_rng)  # the loss is taken before the optimizer step
    assert first == full[3] and one_step(state.policy, opt, data_rng) != full[4]


def test_checkpoint_contents_round_trip(tmp_path: Path) -> None:
    policy = new_policy()
    opt = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-2)
    one_step(policy, opt, random.Random(0))
    random.seed(5)
    np.random.seed(5)
    torch.manual_seed(5)
    extra = {"order": [3, 1, 2], "name": "x", "records": [{"step": 1, "loss": 0.5}], "t": torch.arange(3)}
    path = save_training_state(tmp_path, policy=policy, optimizer=opt, step=7, extra=extra)
    assert path == checkpoint_dir(tmp_path, 7) == tmp_path / "checkpoints" / "step-00000007"
    expected = (random.random(), float(np.random.rand()), float(torch.rand(())))
    state = load_training_state(path, base())
    assert state.step == 7 and state.path == path and state.scheduler is None
    assert state.extra["order"] == [3, 1, 2] and state.extra["records"] == extra["records"]
    assert torch.equal(state.extra["t"], torch.arange(3))
    saved, loaded = policy._saved_state(), state.policy._saved_state()
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    opt2 = torch.optim.AdamW(state.policy.trainable_parameters(), lr=1e-2)
    opt2.load_state_dict(state.optimizer)
    for a, b in zip(opt.state.values(), opt2.state.values()):
        assert all(torch.equal(a[k], b[k]) for k in ("step", "exp_avg", "exp_avg_sq"))
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    state.restore_rng()
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == expected


def test_latest_checkpoint_and_interrupted_saves(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    policy = new_policy()
    opt = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-2)
    assert latest_checkpoint(tmp_path) is None
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_training_state(tmp_path, base())
    for step in (2, 10, 4):
        save_training_state(tmp_path, policy=policy, optimizer=opt, step=step)
    assert latest_checkpoint(tmp_path) == checkpoint_dir(tmp_path, 10)
    assert latest_checkpoint(tmp_path / "checkpoints") == checkpoint_dir(tmp_path, 10)
    assert latest_checkpoint(checkpoint_dir(tmp_path, 4)) == checkpoint_dir(tmp_path, 4)

    # a save that dies before its commit (here: an error just before the rename) leaves no step folder
    real_replace = os.replace

    def failing_replace(src: Any, dst: Any) -> None:
        if Path(dst).name == "step-00000012":
            raise OSError("simulated crash")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="simulated crash"):
        save_training_state(tmp_path, policy=policy, optimizer=opt, step=12)
    monkeypatch.setattr(os, "replace", real_replace)
    assert not checkpoint_dir(tmp_path, 12).exists()
    assert latest_checkpoint(tmp_path) == checkpoint_dir(tmp_path, 10)
    # a killed process leaves its hidden staging folder (and maybe a partial step folder's contents in it):
    # never taken for a checkpoint, removed by the next save
    staging = tmp_path / "checkpoints" / ".prefopt-ckpt-deadbeef"
    (staging / "policy").mkdir(parents=True)
    (staging / STATE_FILE).write_bytes(b"partial")
    assert latest_checkpoint(tmp_path) == checkpoint_dir(tmp_path, 10)
    assert load_training_state(tmp_path, base()).step == 10
    save_training_state(tmp_path, policy=policy, optimizer=opt, step=10)  # replaces the step-10 checkpoint
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step-00000002",
        "step-00000004",
        "step-00000010",
    ]


def test_bad_arguments_and_corrupt_state_are_named(tmp_path: Path) -> None:
    policy = new_policy()
    opt = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-2)
    with pytest.raises(ValueError, match="step"):
        save_training_state(tmp_path, policy=policy, optimizer=opt, step=-1)
    with pytest.raises(TypeError, match="policy"):
        save_training_state(tmp_path, policy=policy.model, optimizer=opt, step=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="optimizer"):
        save_training_state(tmp_path, policy=policy, optimizer={}, step=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="extra"):
        save_training_state(tmp_path, policy=policy, optimizer=opt, step=1, extra=[1])  # type: ignore[arg-type]
    path = save_training_state(tmp_path, policy=policy, optimizer=opt, step=1)
    state_file = path / STATE_FILE
    state_file.write_bytes(state_file.read_bytes()[:100])
    with pytest.raises(ValueError, match=str(state_file)):
        load_training_state(path, base())
    torch.save({"hello": 1}, state_file)
    with pytest.raises(ValueError, match="not a prefopt training state"):
        load_training_state(path, base())


def test_prepare_run_dir_never_overwrites_silently(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert prepare_run_dir(out) == out and out.is_dir()
    prepare_run_dir(out)  # empty: fine
    (out / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(FileExistsError, match="--overwrite"):
        prepare_run_dir(out)
    policy = new_policy()
    opt = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-2)
    save_training_state(out, policy=policy, optimizer=opt, step=3)
    prepare_run_dir(out, resume=out)  # continuing the run inside it
    prepare_run_dir(out, resume=checkpoint_dir(out, 3))
    other = tmp_path / "other"
    save_training_state(other, policy=policy, optimizer=opt, step=1)
    with pytest.raises(FileExistsError, match="not empty"):
        prepare_run_dir(out, resume=other)  # a checkpoint elsewhere does not license writing into `out`
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        prepare_run_dir(tmp_path / "fresh", resume=tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()
    prepare_run_dir(out, overwrite=True)
    assert (out / "metrics.jsonl").exists() and latest_checkpoint(out) is None  # old checkpoints are gone
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        prepare_run_dir(tmp_path / "file", overwrite=True)


# --------------------------------------------------------------------------------- the examples, end to end
def _run_example(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), "--smoke", *args],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "smoke ok" in proc.stdout
    # a tool prints no warning on every run (e.g. "Converting a tensor with requires_grad=True to a scalar",
    # transformers' `is_gradient_checkpointing` FutureWarning reached through peft)
    assert "Warning" not in proc.stderr and "warn" not in proc.stderr, proc.stderr[-3000:]
    return proc


def _strip(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


@pytest.mark.slow
def test_dpo_example_resume_matches_uninterrupted_run(tmp_path: Path) -> None:
    full, part = tmp_path / "full", tmp_path / "part"
    _run_example("dpo_lora.py", "--steps", "4", "--out", str(full))
    _run_example("dpo_lora.py", "--steps", "2", "--save-every", "2", "--out", str(part))
    proc = _run_example(
        "dpo_lora.py", "--steps", "4", "--save-every", "2", "--out", str(part), "--resume", str(part)
    )
    assert "resuming from" in proc.stdout and "step 2" in proc.stdout

    def records(out: Path) -> list[dict[str, Any]]:
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    a, b = _strip(records(full)), _strip(records(part))
    assert [r["step"] for r in a] == [0, 1, 2, 3, 4, 4]
    assert a == b  # every loss and metric bit-identical, the final evaluation included
    assert len({r["loss"] for r in a if "loss" in r}) == 4
    # the same --out again is refused unless --overwrite
    again = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "dpo_lora.py"), "--smoke", "--out", str(full)],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert again.returncode != 0 and "--overwrite" in again.stderr


@pytest.mark.slow
def test_grpo_example_resume_matches_uninterrupted_run(tmp_path: Path) -> None:
    full, part = tmp_path / "full", tmp_path / "part"
    _run_example("grpo_lora.py", "--steps", "4", "--out", str(full))
    _run_example("grpo_lora.py", "--steps", "2", "--save-every", "2", "--out", str(part))
    _run_example(
        "grpo_lora.py", "--steps", "4", "--save-every", "2", "--out", str(part), "--resume", str(part)
    )
    a = json.loads((full / "grpo_lora.json").read_text())
    b = json.loads((part / "grpo_lora.json").read_text())
    assert [r["step"] for r in a["history"]] == [0, 1, 2, 3]
    assert _strip(a["history"]) == _strip(b["history"])  # sampled rewards, loss, KL, log-probs: exact
    assert a["held_out"] == b["held_out"]
    assert any(r["kl_k3_per_token"] != 0 for r in a["history"])  # the adapter really moved
    assert len({r["logp_per_token"] for r in a["history"]}) == 4


@pytest.mark.slow
def test_jbond_example_resume_matches_uninterrupted_run(tmp_path: Path) -> None:
    """``examples/jbond.py`` in process (its ``main``): J-BOND, whose checkpoint carries the EMA anchor
    adapter (and the reference pool and the prompt RNG in ``extra``)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("jbond_resume_example", ROOT / "examples" / "jbond.py")
    assert spec is not None and spec.loader is not None
    jb = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = jb
    spec.loader.exec_module(jb)
    common = ["--smoke", "--data", str(tmp_path / "absent.gz"), "--eval-every", "3"]
    full, part = tmp_path / "full", tmp_path / "part"
    a = jb.main([*common, "--steps", "4", "--out", str(full)])
    jb.main([*common, "--steps", "2", "--save-every", "2", "--out", str(part)])
    assert (part / "checkpoints" / "step-00000002").is_dir()
    b = jb.main([*common, "--steps", "4", "--save-every", "2", "--out", str(part), "--resume", str(part)])
    assert [r["step"] for r in a["history"]] == [0, 3, 4]
    assert a["history"] == b["history"]  # quantiles, KL, rewards: exact
    assert len({r["kl"] for r in a["history"]}) == 3  # the policy moved
    from safetensors.torch import load_file

    def tensors(out: Path) -> dict[str, torch.Tensor]:
        meta = json.loads((out / "prefopt_policy.json").read_text())
        return load_file(str(out / meta["tensor_file"]))

    ta, tb = tensors(full), tensors(part)
    assert ta.keys() == tb.keys() and any(".anchor." in k for k in ta)
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.mark.slow
def test_jbond_experiment_resume_matches_uninterrupted_run(tmp_path: Path) -> None:
    """``experiments/jbond_smollm2.py`` in process (its ``main``): each run resumes from its own checkpoints."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "jbond_resume_experiment", ROOT / "experiments" / "jbond_smollm2.py"
    )
    assert spec is not None and spec.loader is not None
    jb = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = jb  # its dataclasses need the module registered
    spec.loader.exec_module(jb)
    common = ["--smoke", "--no-progress", "--methods", "jbond", "--data", str(tmp_path / "absent.gz")]
    full, part = tmp_path / "full", tmp_path / "part"
    a = jb.main([*common, "--steps", "4", "--out", str(full)])
    jb.main([*common, "--steps", "2", "--save-every", "2", "--out", str(part)])
    assert (part / "adapters" / "jbond" / "checkpoints" / "step-00000002").is_dir()
    b = jb.main([*common, "--steps", "4", "--save-every", "2", "--out", str(part), "--resume", str(part)])
    strip = [{k: v for k, v in r.items() if k != "train_seconds"} for r in a["runs"]["jbond"]]
    assert [r["step"] for r in strip] == [0, 1, 2, 3, 4]
    assert strip == [{k: v for k, v in r.items() if k != "train_seconds"} for r in b["runs"]["jbond"]]
    assert len({r["train_loss"] for r in strip[1:]}) == 4
    # the adapters were saved like the other examples' (policy + anchor), and they are equal
    from safetensors.torch import load_file

    def tensors(out: Path) -> dict[str, torch.Tensor]:
        meta = json.loads((out / "adapters" / "jbond" / "prefopt_policy.json").read_text())
        return load_file(str(out / "adapters" / "jbond" / meta["tensor_file"]))

    ta, tb = tensors(full), tensors(part)
    assert ta.keys() == tb.keys() and any(".anchor." in k for k in ta)
    assert all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.mark.slow
def test_accelerate_example_resume_matches_uninterrupted_run(tmp_path: Path) -> None:
    """``examples/accelerate_dpo.py`` in one process: 4 steps vs 2 + resume + 2, every logged number equal,
    the final adapters equal tensor for tensor; a resume with another batch size is refused."""
    pytest.importorskip("accelerate")
    full, part = tmp_path / "full", tmp_path / "part"
    _run_example("accelerate_dpo.py", "--steps", "4", "--out", str(full))
    _run_example("accelerate_dpo.py", "--steps", "2", "--save-every", "2", "--out", str(part))
    proc = _run_example(
        "accelerate_dpo.py", "--steps", "4", "--save-every", "2", "--out", str(part), "--resume", str(part)
    )
    assert "resuming from" in proc.stdout and "step 2" in proc.stdout

    def records(out: Path) -> list[dict[str, Any]]:
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    a, b = records(full), records(part)
    assert [r["step"] for r in a] == [1, 2, 3, 4]
    assert a == b  # losses and accuracies bit-identical
    assert len({r["loss"] for r in a}) == 4
    from safetensors.torch import load_file

    def tensors(out: Path) -> dict[str, torch.Tensor]:
        meta = json.loads((out / "prefopt_policy.json").read_text())
        return load_file(str(out / meta["tensor_file"]))

    ta, tb = tensors(full), tensors(part)
    assert ta.keys() == tb.keys() and len(ta) > 0
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    # the data position means other rows under another global batch: refused, named
    argv = ["--smoke", "--steps", "6", "--batch-size", "2", "--out", str(part), "--resume", str(part)]
    bad = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "accelerate_dpo.py"), *argv],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert bad.returncode != 0 and "1 processes × 4 pairs" in bad.stderr, bad.stderr[-2000:]


@pytest.mark.slow
def test_reward_model_example_resume_matches_uninterrupted_run(tmp_path: Path) -> None:
    """``examples/reward_model.py`` (coffee_bce, LoRA and full workers, 4 steps each): 2 steps + checkpoint +
    resume gives the LoRA worker's uninterrupted losses, accuracy and saved reward model exactly."""
    full, part = tmp_path / "full", tmp_path / "part"
    common = ["--tasks", "coffee_bce", "--train-examples", "32"]
    _run_example("reward_model.py", *common, "--out", str(full), "--save-lora", str(tmp_path / "rm_full"))
    _run_example("reward_model.py", *common, "--max-steps", "2", "--save-every", "2", "--out", str(part))
    _run_example(
        "reward_model.py",
        *common,
        "--save-every",
        "2",
        "--out",
        str(part),
        "--resume",
        str(part),
        "--save-lora",
        str(tmp_path / "rm_part"),
    )
    a = json.loads((full / "reward_model.json").read_text())["runs"]
    b = json.loads((part / "reward_model.json").read_text())["runs"]
    assert [(r["variant"], r["resumed_from_step"]) for r in b] == [("lora", 2), ("full", 0)]
    for ra, rb in zip(a, b):
        assert ra["steps"] == 4 and rb["steps"] == 4
        assert ra["losses"] == rb["losses"] and ra["accuracy"] == rb["accuracy"]
    assert len(set(a[0]["losses"])) == 4
    from safetensors.torch import load_file

    def tensors(out: Path) -> dict[str, torch.Tensor]:
        meta = json.loads((out / "prefopt_policy.json").read_text())
        return load_file(str(out / meta["tensor_file"]))

    ta, tb = tensors(tmp_path / "rm_full"), tensors(tmp_path / "rm_part")
    assert ta.keys() == tb.keys() and any("value_head" in k for k in ta)
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
