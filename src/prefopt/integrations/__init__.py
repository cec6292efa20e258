"""Optional bridges to other training libraries.

- :mod:`prefopt.integrations.trl` — :class:`~prefopt.integrations.trl.PrefoptDPOTrainer`, TRL's
  ``DPOTrainer`` with the loss computed by any pairwise prefopt loss (needs the ``trl`` extra).

Nothing here is imported by ``import prefopt``; each submodule raises a clear ``ImportError`` naming its extra
when the library it bridges to is missing.
"""

__all__: list[str] = []
