"""ptcore inside other trainers (docs/integrations.md).

* :mod:`ptcore.integrations.trl`: ``patch_trainer`` / ``unpatch_trainer`` for TRL 1.16's
  SFTTrainer, DPOTrainer and GRPOTrainer.
* :mod:`ptcore.integrations.verl`: ``linear_cross_entropy`` with the signature and outputs of
  verl's fused log-prob / entropy kernel.

The submodules import their peer (TRL) only when used, so ``import ptcore.integrations`` is cheap.
"""
