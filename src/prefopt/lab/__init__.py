"""prefopt.lab — a CPU-scale testbed where preference and RL objectives converge in minutes.

A synthetic language with a known gold reward, a tiny reference LM pre-trained on it (cached), exact
reward quantiles and Best-of-N points, and policy evaluation with standard errors. Everything a training
loop touches is ordinary prefopt: ``LoraPolicy``, the registry's losses, ``HFSampler``, ``prefopt.rl``.
See ``docs/lab.md``.
"""

from prefopt.lab.measure import (
    BestOfNPoint,
    PolicyEval,
    ReferencePool,
    best_of_n_frontier,
    best_of_n_point,
    continuous_best_of_n,
    evaluate_policy,
    lab_sampler,
    mean_ci95,
    mid_rank_quantile,
    reference_pool,
    t_quantile_975,
)
from prefopt.lab.pairs import LabPairs, gold_pairs
from prefopt.lab.testbed import BOS, EOS, PAD, Lab, LabConfig, PretrainReport

__all__ = [
    "BOS",
    "EOS",
    "PAD",
    "BestOfNPoint",
    "Lab",
    "LabConfig",
    "LabPairs",
    "PolicyEval",
    "PretrainReport",
    "ReferencePool",
    "best_of_n_frontier",
    "best_of_n_point",
    "continuous_best_of_n",
    "evaluate_policy",
    "gold_pairs",
    "lab_sampler",
    "mean_ci95",
    "mid_rank_quantile",
    "reference_pool",
    "t_quantile_975",
]
