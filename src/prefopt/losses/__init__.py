"""The loss zoo. Every loss is a pure function of tensors returning [`prefopt.LossOutput`][prefopt.types.LossOutput].

Submodules register their losses with [`prefopt.registry.register_loss`][prefopt.registry.register_loss] on
import; use [`prefopt.get_loss`][prefopt.registry.get_loss] /
[`prefopt.available_losses`][prefopt.registry.available_losses] rather than importing them one by one.
"""
