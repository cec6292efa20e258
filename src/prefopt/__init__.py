"""prefopt: preference-optimization and RLHF objectives for causal language models.

The top-level namespace is curated and cheap: ``import prefopt`` loads torch and the pure-loss machinery only.
Names that need ``transformers``, ``peft`` or ``datasets`` (the LoRA wrapper, data loading, the real model)
are resolved lazily on first access.

>>> import prefopt as po
>>> "dpo" in po.available_losses() or po.available_losses() == []
True
"""

import importlib as _importlib

from prefopt.registry import available_losses, get_loss, get_spec, register_loss
from prefopt.types import (
    BestOfNSamples,
    LossOutput,
    PairBatch,
    PairLogps,
    PromptBatch,
    SharedPromptBatch,
    UnpairedBatch,
    UnpairedLogps,
)

__version__ = "0.1.0"

# name -> module that defines it (imported on first access)
_LAZY: dict[str, str] = {
    "LoraPolicy": "prefopt.policy",
    "token_logps": "prefopt.logprobs",
    "token_logps_and_entropy": "prefopt.logprobs",
    "seq_sum": "prefopt.masked",
    "seq_mean": "prefopt.masked",
    "seq_len": "prefopt.masked",
    "aggregate": "prefopt.masked",
    "pair_logps": "prefopt.logprobs",
    "load_preferences": "prefopt.data",
    "load_pointwise": "prefopt.data",
    "load_unpaired": "prefopt.data",
    "pairs_from_pointwise": "prefopt.data",
    "PreferenceCollator": "prefopt.data",
    "PromptCollator": "prefopt.data",
    "UnpairedCollator": "prefopt.data",
    "SharedPromptCollator": "prefopt.data",
    "load_builtin_pairs": "prefopt.data",
    "load_smollm2": "prefopt.models",
    "HFSampler": "prefopt.sampling",
    "Rollout": "prefopt.sampling",
    "masked": "prefopt.masked",
    "rl": "prefopt.rl",
    "bon": "prefopt.bon",
    "losses": "prefopt.losses",
}

__all__ = [
    "BestOfNSamples",
    "LossOutput",
    "PairBatch",
    "PairLogps",
    "PromptBatch",
    "SharedPromptBatch",
    "UnpairedBatch",
    "UnpairedLogps",
    "__version__",
    "available_losses",
    "get_loss",
    "get_spec",
    "register_loss",
    *sorted(_LAZY),
]


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'prefopt' has no attribute {name!r}")
    mod = _importlib.import_module(module)
    value = mod if module.rsplit(".", 1)[-1] == name else getattr(mod, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The public names only (``__all__``), not helpers such as ``_importlib`` or imported submodules."""
    return sorted(__all__)
