"""The loss zoo. Every loss is a pure function of tensors returning :class:`prefopt.LossOutput`.

Submodules register their losses with :func:`prefopt.registry.register_loss` on import; use
:func:`prefopt.get_loss` / :func:`prefopt.available_losses` rather than importing them one by one.
"""
