"""Optional bridges to other training libraries.

- [`prefopt.integrations.trl`][prefopt.integrations.trl] —
  [`PrefoptDPOTrainer`][prefopt.integrations.trl.PrefoptDPOTrainer], TRL's ``DPOTrainer`` with the loss
  computed by any pairwise prefopt loss (needs the ``trl`` extra).

Nothing here is imported by ``import prefopt``; each submodule raises a clear ``ImportError`` naming its extra
when the library it bridges to is missing.
"""

__all__: list[str] = []
