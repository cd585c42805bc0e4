"""Gradient estimators, one per module, registered by name in :data:`ESTIMATORS`."""

from .backprop import Backprop
from .base import ESTIMATORS, Estimator, make_estimator, register
from .forward_gradient import ForwardGradient, ForwardGradientSign
from .zeroth_order import ZerothOrder, ZerothOrderSign

__all__ = [
    "ESTIMATORS", "Backprop", "Estimator", "ForwardGradient", "ForwardGradientSign",
    "ZerothOrder", "ZerothOrderSign", "make_estimator", "register",
]
