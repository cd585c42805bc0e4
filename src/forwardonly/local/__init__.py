"""Ren et al.'s local losses for LocalMixer (ICLR 2023): the loss and head functions.

- :mod:`.replicated`: the block × patch × group "replicated" losses, their closed-form
  derivatives (no B×P×G copies) and an autograd op for backprop through them.
- :mod:`.heads`: the linear heads' loss, its gradient w.r.t. the features and the heads'
  exact gradients.

The estimators built on them (``l-bp``, ``lg-bp``, ``fg-a``, ``lg-fg-a``, ``lg-fg-w``,
``fg-w-mixer``) live in :mod:`forwardonly.estimators`; the forward mode through the
LocalMixer layers in :mod:`forwardonly.autodiff.mixer`.
"""

from .heads import head_step
from .replicated import (
    pool_vjp,
    pooled_features,
    replicate,
    replicated_derivatives,
    replicated_jvp,
)

__all__ = ["head_step", "pool_vjp", "pooled_features", "replicate", "replicated_derivatives",
           "replicated_jvp"]
