"""Shared test configuration.

Tests use tiny models, for which intra-op parallelism only adds overhead (and, on a loaded 2-core machine,
makes a tiny optimizer step ~100× slower). One thread per test process; run files in parallel with
``pytest -n 2`` instead.
"""

import os

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch

torch.set_num_threads(1)
