"""Gradient estimators, one per module, registered by name in :data:`ESTIMATORS`.

Importing this package registers every estimator:

- :mod:`.backprop`: ``bp`` (:class:`Backprop`)
- :mod:`.forward_gradient`: ``fg-w``, ``fg-sign`` (:class:`ForwardGradient`,
  :class:`ForwardGradientSign`)
- :mod:`.zeroth_order`: ``zo``, ``zo-sign`` (:class:`ZerothOrder`, :class:`ZerothOrderSign`)
- :mod:`.activity`: ``fg-a``, ``lg-fg-a`` (:class:`ActivityPerturbation`,
  :class:`LocalActivityPerturbation`)
- :mod:`.local_bp`: ``l-bp``, ``lg-bp`` (:class:`LocalBackprop`, :class:`LocalGroupBackprop`)
- :mod:`.local_fg`: ``lg-fg-w``, ``fg-w-mixer`` (:class:`LocalWeightPerturbation`,
  :class:`MixerWeightPerturbation`)
- :mod:`.forward_forward`: ``ff`` (:class:`ForwardForward`)

:class:`LocalLosses` (:mod:`.local_losses`) is the base of Ren et al.'s local-loss estimators;
:class:`~.frozen_prefix.FrozenPrefix` lets ``zo`` run a model's frozen prefix once per step.
"""

from .activity import ActivityPerturbation, LocalActivityPerturbation
from .backprop import Backprop
from .base import ESTIMATORS, Estimator, make_estimator, register, set_grad
from .forward_forward import ForwardForward
from .forward_gradient import ForwardGradient, ForwardGradientSign
from .local_bp import LocalBackprop, LocalGroupBackprop
from .local_fg import LocalWeightPerturbation, MixerWeightPerturbation
from .local_losses import LocalLosses
from .zeroth_order import ZerothOrder, ZerothOrderSign

__all__ = [
    "ESTIMATORS", "ActivityPerturbation", "Backprop", "Estimator", "ForwardForward",
    "ForwardGradient", "ForwardGradientSign", "LocalActivityPerturbation", "LocalBackprop",
    "LocalGroupBackprop", "LocalLosses", "LocalWeightPerturbation", "MixerWeightPerturbation",
    "ZerothOrder", "ZerothOrderSign", "make_estimator", "register", "set_grad",
]
