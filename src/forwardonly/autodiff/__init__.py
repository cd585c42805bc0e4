"""The forward-mode core: every rule that carries tangents, and the directions they start from.

- :mod:`.directions`: :class:`DirectionSampler` — weight directions (Gaussian, Rademacher,
  rank-one) and activity tangents, each regenerated from ``(seed, step, tensor index)``.
- :mod:`.rules`: one rule per layer type (Linear, ReLU and other activations, Flatten; any
  other layer through ``torch.func.jvp``), :func:`run_layers` over a flattened
  ``nn.Sequential``, the loss's directional derivatives, :class:`ForwardModeError`.
- :mod:`.forward_mode`: :func:`directional_derivatives` of any model — layer by layer for
  ``nn.Sequential``, ``torch.func.jvp`` over the whole model otherwise.
- :mod:`.mixer`: LocalMixer layers and blocks (LayerNorm, linear map, activity tangents,
  residual, ReLU) and the layer-local weight gradient from an activity gradient.
- :mod:`.activity`: activity tangents through a plain MLP.
- :mod:`.attention`: scaled dot-product attention with closed-form JVP and VJP rules, and
  its Hugging Face ``attn_implementation="forwardonly"``.

Nothing here writes ``.grad``: that is the estimators' part (:mod:`forwardonly.estimators`).
"""

from ..models.attention import (
    HF_ATTENTION,
    dot_product_attention,
    hf_attention,
    register_hf_attention,
)
from ..models.local_norm import ln_jvp, ln_stats
from .activity import ActivityTrace, activity_forward, activity_rule_error
from .directions import (
    ACTIVITY_DISTRIBUTIONS,
    DISTRIBUTIONS,
    SEEDED_DISTRIBUTIONS,
    DirectionSampler,
    Factored,
    LowRank,
    NoiseFn,
    Rank1,
    check_distribution,
    check_rank,
    rademacher,
)
from .forward_mode import (
    directional_derivatives,
    streamed_directional_derivative,
    streamed_jvp,
)
from .mixer import LayerTrace, WeightTangentFn, activity_weight_grads, block_forward, layer_forward
from .noise_table import NoiseTable
from .rules import (
    ACTIVATIONS,
    RULES,
    ForwardModeError,
    LossFn,
    TangentFn,
    activation_jvp,
    batched_jvp,
    linear_jvp,
    loss_and_derivatives,
    relu_tangent,
    run_layers,
    sequential_layers,
)

__all__ = [
    "ACTIVATIONS", "ACTIVITY_DISTRIBUTIONS", "DISTRIBUTIONS", "HF_ATTENTION", "RULES",
    "SEEDED_DISTRIBUTIONS", "NoiseTable",
    "ActivityTrace", "DirectionSampler", "Factored", "ForwardModeError", "LayerTrace", "LossFn",
    "LowRank", "NoiseFn", "Rank1", "TangentFn", "WeightTangentFn", "activation_jvp",
    "activity_forward", "activity_rule_error", "activity_weight_grads", "batched_jvp",
    "block_forward", "check_distribution", "check_rank", "directional_derivatives",
    "dot_product_attention", "hf_attention", "layer_forward", "linear_jvp", "ln_jvp", "ln_stats",
    "loss_and_derivatives", "rademacher", "register_hf_attention", "relu_tangent", "run_layers",
    "sequential_layers", "streamed_directional_derivative", "streamed_jvp",
]
