"""Checkpoints of prefopt.policy.LoraPolicy survive crashes and refuse the wrong base or broken files.

Crash oracle: a forked child saves a *new* state over a saved *old* one and is killed (``os._exit``, no
cleanup, like SIGKILL) just before its k-th fsync/rename, for every k, and also mid-way through writing the
tensor file; a real SIGKILL at random moments of a save loop is tried as well. Whatever is left on disk must
load as exactly the old or exactly the new state.
"""

from __future__ import annotations

import copy
import json
import os
import random
import signal
import sys
import time
from pathlib import Path

import peft
import pytest
import torch
import transformers as tf
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from prefopt.policy import POLICY_ADAPTER, LoraPolicy
from prefopt.reward_model import RewardModel

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

VOCAB = 64


def make_llama(seed: int = 0, layers: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=32,
    )
    return tf.LlamaForCausalLM(cfg).eval()


def cfg() -> peft.LoraConfig:
    return peft.LoraConfig(r=2, lora_alpha=4, target_modules="all-linear")


def set_state(policy: LoraPolicy, seed: int) -> dict[str, torch.Tensor]:
    """Fill every saved tensor with seeded random values; return a copy of the saved state."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for v in policy._saved_state().values():
            v.copy_(torch.randn(v.shape, generator=g))
    return {k: v.clone() for k, v in policy._saved_state().items()}


def same(state: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> bool:
    return state.keys() == other.keys() and all(torch.equal(state[k], other[k]) for k in state)


def unwrapped(model: nn.Module) -> bool:
    return not any(isinstance(m, BaseTunerLayer) for m in model.modules())


def _child_save(policy: LoraPolicy, directory: str, crash_at: int, mid_write: bool) -> None:
    """In a forked child: save, dying (no cleanup) at the ``crash_at``-th fsync/replace or mid-write."""
    import safetensors.torch

    count = [0]
    real_replace, real_save_file = os.replace, safetensors.torch.save_file

    def tick() -> None:
        if count[0] == crash_at:
            os._exit(0)
        count[0] += 1

    def replace(*args, **kwargs):
        tick()
        return real_replace(*args, **kwargs)

    def fsync(fd):  # a crash point; the real fsync only matters for power loss, which no test can cut
        tick()

    def save_file(tensors, filename, *args, **kwargs):
        real_save_file(tensors, filename, *args, **kwargs)
        if mid_write and filename.endswith(".safetensors") and "prefopt_policy" in filename:
            with open(filename, "r+b") as f:
                f.truncate(os.path.getsize(filename) // 2)
            os._exit(0)

    os.replace, os.fsync, safetensors.torch.save_file = replace, fsync, save_file
    policy.save(directory)
    os._exit(7)  # save finished before the crash point


def wait(pid: int, timeout: float = 60.0) -> int:
    """Exit code of the child ``pid``; a child that hangs (e.g. a thread pool inherited by fork) is killed
    and fails the test instead of hanging it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    raise AssertionError(f"forked child {pid} did not finish within {timeout} s")


def crash_save(policy: LoraPolicy, directory: str, crash_at: int, mid_write: bool = False) -> int:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            _child_save(policy, directory, crash_at, mid_write)
        finally:
            os._exit(9)
    return wait(pid)


@pytest.mark.slow  # ~16 forks of a torch process, one per crash point (about 10 s)
def test_killed_save_leaves_old_or_new_checkpoint(tmp_path):
    base = make_llama()
    policy = LoraPolicy(copy.deepcopy(base), cfg(), anchor_rank=3, value_head=True)
    old = set_state(policy, 1)
    new_seed = 2
    seen = {"old": 0, "new": 0}
    crash_points = []
    k = 0
    while True:
        d = str(tmp_path / f"ck{k}")
        set_state(policy, 1)
        policy.save(d)
        new = set_state(policy, new_seed)
        code = crash_save(policy, d, crash_at=k)
        assert code in (0, 7), code
        loaded = LoraPolicy.load(copy.deepcopy(base), d)
        got = {kk: v.clone() for kk, v in loaded._saved_state().items()}
        assert same(got, old) or same(got, new), f"crash before event {k}: checkpoint is neither old nor new"
        seen["old" if same(got, old) else "new"] += 1
        if k % 4 == 0 or code == 7:  # the next save completes, cleans up, and leaves one tensor file
            check_next_save(policy, base, d, new)
        crash_points.append(k)
        if code == 7:
            break
        k += 1
    assert len(crash_points) >= 8  # every fsync / rename of a save was a crash point
    assert seen["old"] >= 1 and seen["new"] >= 1
    # killed while writing the tensor file: the old checkpoint is intact
    d = str(tmp_path / "mid")
    set_state(policy, 1)
    policy.save(d)
    set_state(policy, new_seed)
    assert crash_save(policy, d, crash_at=-1, mid_write=True) == 0
    assert same(
        {kk: v.clone() for kk, v in LoraPolicy.load(copy.deepcopy(base), d)._saved_state().items()}, old
    )


def check_next_save(policy: LoraPolicy, base: nn.Module, d: str, new: dict[str, torch.Tensor]) -> None:
    policy.save(d)
    got = {kk: v.clone() for kk, v in LoraPolicy.load(copy.deepcopy(base), d)._saved_state().items()}
    assert same(got, new)
    names = os.listdir(d)
    assert not [n for n in names if n.startswith(".prefopt-save-")]
    assert len([n for n in names if n.startswith("prefopt_policy-")]) == 1


def test_sigkill_during_save_loop(tmp_path):
    """A child saves state A, B, A, B, ... in a loop; SIGKILL at random moments; what is left loads as A or B."""
    base = make_llama()
    policy = LoraPolicy(copy.deepcopy(base), cfg())
    a = set_state(policy, 3)
    b = set_state(policy, 4)
    d = str(tmp_path / "loop")
    policy.save(d)
    rng = random.Random(0)
    for _ in range(4):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            try:
                i = 0
                while True:
                    set_state(policy, 3 + i % 2)
                    policy.save(d)
                    i += 1
            finally:
                os._exit(1)
        time.sleep(rng.uniform(0.05, 0.4))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        got = {k: v.clone() for k, v in LoraPolicy.load(copy.deepcopy(base), d)._saved_state().items()}
        assert same(got, a) or same(got, b)


def test_save_keeps_other_files_and_refuses_a_file(tmp_path):
    policy = LoraPolicy(make_llama(), cfg())
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    policy.save(tmp_path)
    policy.save(tmp_path)
    assert (tmp_path / "metrics.jsonl").read_text() == "{}\n"
    assert {"adapter_config.json", "adapter_model.safetensors", "prefopt_policy.json"} <= set(
        os.listdir(tmp_path)
    )
    f = tmp_path / "a_file"
    f.write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        policy.save(f)


def test_peft_export_still_loads(tmp_path):
    base = make_llama()
    policy = LoraPolicy(copy.deepcopy(base), cfg())
    set_state(policy, 5)
    policy.save(tmp_path)
    plain = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path)).eval()
    ids = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(plain(input_ids=ids).logits, policy.model(input_ids=ids).logits)


def test_format_1_checkpoint_still_loads(tmp_path):
    """A checkpoint in the previous layout (fixed tensor file name, config from adapter_config.json)."""
    from safetensors.torch import save_file

    base = make_llama()
    policy = LoraPolicy(copy.deepcopy(base), cfg(), anchor_rank=3)
    state = set_state(policy, 6)
    policy.model.save_pretrained(str(tmp_path), selected_adapters=[POLICY_ADAPTER])
    save_file(policy._saved_state(), str(tmp_path / "prefopt_policy.safetensors"))
    meta = {"format_version": 1, "anchor_rank": 3, "value_head": False, "value_adapter": False}
    (tmp_path / "prefopt_policy.json").write_text(json.dumps(meta))
    loaded = LoraPolicy.load(copy.deepcopy(base), tmp_path)
    assert same({k: v.clone() for k, v in loaded._saved_state().items()}, state)
    loaded.save(tmp_path)  # rewritten in the current format; the old tensor file is gone
    assert not (tmp_path / "prefopt_policy.safetensors").exists()
    assert same(
        {k: v.clone() for k, v in LoraPolicy.load(copy.deepcopy(base), tmp_path)._saved_state().items()},
        state,
    )


# ------------------------------------------------------------------------------------------- failed loads
def _saved(tmp_path, **kw) -> tuple[nn.Module, str]:
    base = make_llama(**kw)
    policy = LoraPolicy(copy.deepcopy(base), cfg(), value_head=True)
    set_state(policy, 8)
    policy.save(tmp_path)
    return base, str(tmp_path)


def _retry_works(model: nn.Module, directory: str, **kw) -> None:
    assert unwrapped(model)
    LoraPolicy.load(model, directory, **kw)  # the same object can be wrapped again


def test_wrong_base_is_refused_and_unwrapped(tmp_path):
    base, d = _saved(tmp_path)
    other = make_llama(seed=1)  # same architecture, other weights
    with pytest.raises(ValueError, match="different weights") as err:
        LoraPolicy.load(other, d)
    assert "check_base=False" in str(err.value) and "prefopt_policy.json" in str(err.value)
    _retry_works(other, d, check_base=False)
    deeper = make_llama(layers=2)  # other architecture
    with pytest.raises(ValueError, match="parameters differ"):
        LoraPolicy.load(deeper, d)
    assert unwrapped(deeper)
    # the same weights in bfloat16 are the same base
    LoraPolicy.load(copy.deepcopy(base).to(torch.bfloat16), d)
    # the reward model goes through the same check
    with pytest.raises(ValueError, match="different weights"):
        RewardModel.load(make_llama(seed=1), d)
    RewardModel.load(make_llama(seed=1), d, check_base=False)


def test_mismatch_after_wrapping_unwraps(tmp_path):
    """A failure after the model was wrapped (tensor set mismatch) still gives back an un-wrapped model."""
    base, d = _saved(tmp_path)
    meta_path = os.path.join(d, "prefopt_policy.json")
    good = Path(meta_path).read_text()
    Path(meta_path).write_text(good.replace('"value_head": true', '"value_head": false'))
    model = copy.deepcopy(base)
    with pytest.raises(ValueError, match="unexpected") as err:
        LoraPolicy.load(model, d)
    assert "prefopt_policy-" in str(err.value)  # names the tensor file
    Path(meta_path).write_text(good)
    _retry_works(model, d)


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        ("truncate_tensors", r"prefopt_policy-\w+\.safetensors: corrupt or truncated"),
        ("garbage_tensors", r"prefopt_policy-\w+\.safetensors: corrupt or truncated"),
        ("truncate_meta", r"prefopt_policy\.json: corrupt or truncated JSON"),
        ("binary_meta", r"prefopt_policy\.json: corrupt or truncated JSON"),
        ("drop_key", r"prefopt_policy\.json: not a valid prefopt checkpoint record .*anchor_rank"),
        ("meta_list", r"prefopt_policy\.json: expected a JSON object"),
        ("bad_config", r"prefopt_policy\.json: invalid LoRA config"),
        ("remove_tensors", r"tensor file is missing: .*prefopt_policy-"),
    ],
)
def test_corrupt_files_name_the_file(tmp_path, damage, match):
    base, d = _saved(tmp_path)
    meta_path = os.path.join(d, "prefopt_policy.json")
    meta = json.loads(Path(meta_path).read_text())
    tensor_path = os.path.join(d, meta["tensor_file"])
    if damage == "truncate_tensors":
        with open(tensor_path, "r+b") as f:
            f.truncate(os.path.getsize(tensor_path) - 10)
    elif damage == "garbage_tensors":
        Path(tensor_path).write_bytes(b"\x07" * 64)
    elif damage == "truncate_meta":
        text = Path(meta_path).read_text()
        Path(meta_path).write_text(text[: len(text) // 2])
    elif damage == "binary_meta":
        Path(meta_path).write_bytes(b"\xff\xfe\x00garbage")
    elif damage == "drop_key":
        del meta["anchor_rank"]
        Path(meta_path).write_text(json.dumps(meta))
    elif damage == "meta_list":
        Path(meta_path).write_text("[1, 2]")
    elif damage == "bad_config":
        meta["lora_config"]["r"] = "eight"
        meta["lora_config"]["no_such_field"] = 1
        meta["lora_config"] = [meta["lora_config"]]
        Path(meta_path).write_text(json.dumps(meta))
    elif damage == "remove_tensors":
        os.remove(tensor_path)
    model = copy.deepcopy(base)
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        LoraPolicy.load(model, d)
    assert unwrapped(model)


def test_check_base_must_be_bool(tmp_path):
    _, d = _saved(tmp_path)
    with pytest.raises(TypeError, match="check_base"):
        LoraPolicy.load(make_llama(), d, check_base="no")  # type: ignore[arg-type]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
