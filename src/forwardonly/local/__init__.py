"""Local losses for LocalMixer (Ren, Kornblith, Liao, Hinton, ICLR 2023).

- :mod:`.tangents`: forward mode through LocalMixer layers by hand (primal + K tangents,
  activity tangents after each output LayerNorm, weight tangents), and the layer-local
  weight gradient from an activity-gradient estimate.
- :mod:`.replicated`: the block × patch × group "replicated" losses, their closed-form
  derivatives (no B×P×G copies) and an autograd op for backprop through them.
- :mod:`.heads`: the linear heads' exact gradients.
- :mod:`.base`: the frame shared by the local estimators (``l-bp``, ``lg-bp``, ``fg-a``,
  ``lg-fg-a``, ``lg-fg-w`` in :mod:`forwardonly.estimators`).
"""

from .replicated import pool_vjp, pooled_features, replicate, replicated_jvp
from .tangents import activity_noise, activity_weight_grads, block_forward, layer_forward

__all__ = [
    "activity_noise", "activity_weight_grads", "block_forward", "layer_forward", "pool_vjp",
    "pooled_features", "replicate", "replicated_jvp",
]
