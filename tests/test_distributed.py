"""prefopt under PyTorch DDP and FSDP2: 2 CPU processes (gloo) through ``torch.distributed.run``.

One launch of ``tests/dist_worker.py`` (module-scoped fixture) runs, on a global batch split *unequally* over
2 ranks (3 + 2 rows), one SGD step of DPO (summed log-probs), GRPO (per-token loss, global token mean) and
REINFORCE (per-sequence loss) under DDP, and a DPO step plus the policy / reference / anchor forwards under
FSDP2 ``fully_shard``. The oracle is the same step run here, in one process, on the whole global batch (float64
model). The "naive" runs (local ``.mean()`` under DDP's gradient averaging) must *differ* from the oracle:
they show the test can fail and why the global-count scaling of ``docs/distributed.md`` is needed.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

import dist_worker as w
from prefopt.logprobs import token_logps
from prefopt.testing import tiny_causal_lm

pytestmark = pytest.mark.slow

WORKER = Path(__file__).with_name("dist_worker.py")
LAUNCH_TIMEOUT_S = 150
TOL = 1e-6
CASES = tuple(w.STEPS)


def _tail(text: str, n: int = 4000) -> str:
    return text if len(text) <= n else "…" + text[-n:]


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available in this torch build")
    out = tmp_path_factory.mktemp("dist")
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONWARNINGS": "ignore",
    }
    src = str(Path(__file__).parents[1] / "src")
    env["PYTHONPATH"] = os.pathsep.join([src, str(WORKER.parent), env.get("PYTHONPATH", "")])
    # --standalone: a c10d rendezvous on a free port chosen by the OS (no fixed port, no clash between runs)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["--max_restarts", "0", str(WORKER), "--out", str(out)]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired as err:
        log = (err.stdout or b"").decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        log += (err.stderr or b"").decode() if isinstance(err.stderr, bytes) else (err.stderr or "")
        pytest.fail(f"torchrun did not finish in {LAUNCH_TIMEOUT_S} s; output tail:\n{_tail(log)}")
    files = [out / f"rank{r}.pt" for r in range(2)]
    if proc.returncode != 0 or not all(f.exists() for f in files):
        pytest.fail(
            f"torchrun exited with {proc.returncode} (result files: {[f.name for f in files if f.exists()]})\n"
            f"stdout tail:\n{_tail(proc.stdout)}\nstderr tail:\n{_tail(proc.stderr)}"
        )
    return [torch.load(f, weights_only=False) for f in files]


@pytest.fixture(scope="module")
def oracle() -> dict[str, dict[str, Any]]:
    """The same step, single process, whole global batch."""
    out = {}
    for case in CASES:
        policy = w.build_policy()
        out[case] = w.run_case(case, w.TokenLogps(policy), policy, rank=0, world=1, naive=False)
    return out


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _check_equal(run: dict[str, Any], ref: dict[str, Any]) -> None:
    assert abs(run["loss"] - ref["loss"]) <= TOL * max(1.0, abs(ref["loss"])), (run["loss"], ref["loss"])
    assert _max_diff(run["grads"], ref["grads"]) <= TOL
    assert _max_diff(run["params"], ref["params"]) <= TOL
    assert max(float(g.abs().max()) for g in ref["grads"].values()) > 1e-2  # a real gradient was compared


@pytest.mark.parametrize("case", CASES)
def test_ddp_step_equals_single_process(results: list[dict[str, Any]], oracle: dict, case: str) -> None:
    for rank in (0, 1):
        _check_equal(results[rank][f"ddp/{case}"], oracle[case])
    # DDP leaves identical gradients on every rank
    assert _max_diff(results[0][f"ddp/{case}"]["grads"], results[1][f"ddp/{case}"]["grads"]) == 0.0


@pytest.mark.parametrize("case", CASES)
def test_ddp_local_mean_is_wrong_on_unequal_shards(
    results: list[dict[str, Any]], oracle: dict, case: str
) -> None:
    """Negative control: local ``.mean()`` + DDP averaging is the mean of shard means, not the global mean."""
    naive = results[0][f"ddp/{case}/naive"]
    assert _max_diff(naive["grads"], oracle[case]["grads"]) > 1e-3


def test_fsdp2_dpo_step_equals_single_process(results: list[dict[str, Any]], oracle: dict) -> None:
    for rank in (0, 1):
        assert results[rank]["fsdp/error"] is None, results[rank]["fsdp/error"]
        _check_equal(results[rank]["fsdp/dpo"], oracle["dpo"])


def test_fsdp2_anchor_ema_update_equals_single_process(results: list[dict[str, Any]]) -> None:
    """``update_anchor_`` on FSDP2-sharded LoRA factors (DTensors) equals the single-process update."""
    policy = w.build_policy()
    w.run_case("dpo", w.TokenLogps(policy), policy, rank=0, world=1, naive=False)
    expected = w.anchor_after_update(policy)
    for rank in (0, 1):
        assert results[rank]["fsdp/error"] is None, results[rank]["fsdp/error"]
        torch.testing.assert_close(results[rank]["fsdp/anchor_after_update"], expected, rtol=0, atol=TOL)
    # the update really moved the anchor (compare with the anchor before it, i.e. the contexts snapshot)
    assert float((expected - results[0]["fsdp/contexts"]["anchor"]).abs().max()) > 1e-3


def _plain_model_with(delta: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The base tiny model (no peft) with ``W0 + ΔW`` written into the named linear layers."""
    model = tiny_causal_lm("llama", vocab_size=w.VOCAB, hidden_size=32, num_layers=2, seed=0).to(w.DTYPE)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, d in delta.items():
            modules[name].weight.add_(d)
    return model


def test_fsdp2_reference_and_anchor_reach_the_sharded_modules(results: list[dict[str, Any]]) -> None:
    policy = w.build_policy()
    prefix = "base_model.model."
    anchor_delta = {}
    for name, layer in policy.model.named_modules():
        if hasattr(layer, "lora_A") and "anchor" in layer.lora_A:
            b = layer.lora_B["anchor"].weight.detach()
            a = layer.lora_A["anchor"].weight.detach()
            anchor_delta[name.removeprefix(prefix)] = float(layer.scaling["anchor"]) * (b @ a)
    assert anchor_delta and all(float(d.abs().max()) > 0 for d in anchor_delta.values())
    batch = w.pair_batch()
    args = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    with torch.no_grad():
        expected = {
            "reference": token_logps(_plain_model_with({}), *args),
            "anchor": token_logps(_plain_model_with(anchor_delta), *args),
            "policy": token_logps(policy.model, *args),
        }
    for rank in (0, 1):
        assert results[rank]["fsdp/error"] is None, results[rank]["fsdp/error"]
        got = results[rank]["fsdp/contexts"]
        for key, exp in expected.items():
            torch.testing.assert_close(got[key], exp, rtol=0, atol=TOL, msg=f"rank {rank}, {key}")
    # the three distributions are really different, so the comparisons above discriminate
    for a, b in (("reference", "anchor"), ("anchor", "policy"), ("reference", "policy")):
        assert float((expected[a] - expected[b]).abs().max()) > 1e-2


EXAMPLE = Path(__file__).parents[1] / "examples" / "accelerate_dpo.py"


def _json_lines(text: str) -> list[dict[str, Any]]:
    import json

    return [json.loads(line) for line in text.splitlines() if line.startswith('{"step"')]


def test_accelerate_example_two_processes_equal_one(tmp_path: Path) -> None:
    """``examples/accelerate_dpo.py`` under torchrun (accelerate MULTI_CPU, gloo, 2 × 2 pairs) reports the
    same global losses as one process on the same 4 pairs per step (step 2 depends on the step-1 update)."""
    pytest.importorskip("accelerate")
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONWARNINGS": "ignore",
    }
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1] / "src"), env.get("PYTHONPATH", "")])
    common = [str(EXAMPLE), "--smoke", "--no-shuffle", "--steps", "2"]
    two = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    two += ["--max_restarts", "0", *common, "--batch-size", "2"]
    one = [sys.executable, *common, "--batch-size", "4"]
    procs = [
        subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for c in (one, two)
    ]
    outs = []
    for proc in procs:
        try:
            stdout, stderr = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail(f"{proc.args} did not finish in {LAUNCH_TIMEOUT_S} s")
        if proc.returncode != 0:
            pytest.fail(f"{proc.args} exited with {proc.returncode}\nstderr tail:\n{_tail(stderr)}")
        outs.append(_json_lines(stdout))
    single, multi = outs
    assert [r["processes"] for r in single] == [1, 1] and [r["processes"] for r in multi] == [2, 2]
    assert all(r["pairs"] == 4 for r in single + multi)
    for a, b in zip(single, multi):
        assert abs(a["loss"] - b["loss"]) <= TOL, (a, b)
    assert abs(single[1]["loss"] - single[0]["loss"]) > 1e-5  # the step-1 update changed the policy
