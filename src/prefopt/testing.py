"""Tiny, offline building blocks for tests, examples and the ``--tiny`` demo: no downloads.

- [`char_tokenizer`][prefopt.testing.char_tokenizer] — a character-level ``PreTrainedTokenizerFast``
  (printable ASCII + newline) with ``<pad>``, ``<eos>`` and a minimal ChatML-style chat template.
- [`tiny_causal_lm`][prefopt.testing.tiny_causal_lm] — a randomly initialised, seeded causal LM of a given
  architecture family.
- [`tv_distance`][prefopt.testing.tv_distance] and [`lbfgs_argmin`][prefopt.testing.lbfgs_argmin] — exact-case
  oracles on a categorical distribution (a one-token language model with its logits as parameters): the
  distance to a target distribution and the minimiser of an exact objective.
"""

from __future__ import annotations

import string
from typing import Any

__all__ = ["TINY_CHAT_TEMPLATE", "char_tokenizer", "lbfgs_argmin", "tiny_causal_lm", "tv_distance"]

TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}<eos>{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def char_tokenizer() -> Any:
    """A character-level fast tokenizer; ids 0..2 are ``<pad>``, ``<eos>``, ``<unk>``; role tags are tokens."""
    from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<unk>", "<system>", "<user>", "<assistant>"]
    chars = [c for c in string.printable if c not in "\t\r\x0b\x0c"]
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    fast.chat_template = TINY_CHAT_TEMPLATE
    return fast


def tiny_causal_lm(
    arch: str = "llama",
    *,
    vocab_size: int = 128,
    hidden_size: int = 32,
    num_layers: int = 2,
    seed: int = 0,
    tie_word_embeddings: bool = False,
    **overrides: Any,
) -> Any:
    """A tiny random causal LM (``llama``, ``gpt2``, ``qwen2``, ``mistral``, ``gpt_neox`` or ``gemma``), in eval mode."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    common: dict[str, Any] = {
        "vocab_size": vocab_size,
        "tie_word_embeddings": tie_word_embeddings,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 1,
    }
    if arch == "gpt2":
        cfg = dict(n_embd=hidden_size, n_layer=num_layers, n_head=4, n_positions=512)
    elif arch == "gpt_neox":
        cfg = dict(
            hidden_size=hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=4,
            intermediate_size=2 * hidden_size,
            max_position_embeddings=512,
        )
    elif arch in ("llama", "qwen2", "mistral", "gemma"):
        cfg = dict(
            hidden_size=hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=2 * hidden_size,
            max_position_embeddings=512,
        )
        if arch == "gemma":
            cfg["head_dim"] = hidden_size // 4
    else:
        raise ValueError(f"arch must be one of llama, gpt2, qwen2, mistral, gpt_neox, gemma; got {arch!r}")
    config = AutoConfig.for_model(arch, **common, **cfg, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.eval()
    return model


def tv_distance(p: Any, q: Any) -> float:
    """Total-variation distance ``½ Σ_y |p(y) − q(y)|`` of two distributions over the last dim (a float)."""
    return 0.5 * float((p - q).abs().sum())


def lbfgs_argmin(fn: Any, theta0: Any) -> Any:
    """``argmin_θ fn(θ)`` by L-BFGS with a strong-Wolfe line search from ``theta0`` (a tensor, not modified),
    to gradient tolerance 1e-13: the fixed point of an exact objective on a categorical, in float64."""
    import torch

    theta = theta0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS(
        [theta],
        lr=1,
        max_iter=2000,
        tolerance_grad=1e-13,
        tolerance_change=1e-16,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Any:
        opt.zero_grad()
        loss = fn(theta)
        loss.backward()
        return loss

    opt.step(closure)
    return theta.detach()
