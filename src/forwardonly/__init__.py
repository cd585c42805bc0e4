"""forwardonly: train neural networks without backpropagating through them.

Estimators fill ``param.grad`` so any ``torch.optim`` optimizer works::

    est = forwardonly.ForwardGradient(model, loss_fn, directions=4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    opt.zero_grad(); stats = est.step(x, y); opt.step()

or, with a config, ``forwardonly.fit(forwardonly.TrainConfig(method="fg-w", ...))``.
The public names below are imported on first use, so ``import forwardonly`` (and the command
line's ``--help``) stays quick; the registries are complete once any of them is used.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> the module that defines it
_PUBLIC = {
    **dict.fromkeys(("DirectionSampler", "ForwardModeError", "directional_derivatives"),
                    "forwardonly.autodiff"),
    **dict.fromkeys(("ConfigError", "TrainConfig"), "forwardonly.config"),
    **dict.fromkeys(("DataError", "Dataset", "load_dataset"), "forwardonly.data"),
    **dict.fromkeys(("ESTIMATORS", "ActivityPerturbation", "Backprop", "Estimator",
                     "ForwardForward", "ForwardGradient", "ForwardGradientSign",
                     "LocalActivityPerturbation", "LocalBackprop", "LocalGroupBackprop",
                     "LocalLosses", "LocalWeightPerturbation", "MixerWeightPerturbation",
                     "ZerothOrder", "ZerothOrderSign", "make_estimator"),
                    "forwardonly.estimators"),
    "FFNet": "forwardonly.ff",
    **dict.fromkeys(("MODELS", "build_model"), "forwardonly.models"),
    **dict.fromkeys(("RunResult", "TrainingDiverged", "fit", "load_run"), "forwardonly.train"),
    "train": "forwardonly.launch",
}
_SUBPACKAGES = ("autodiff", "data", "estimators", "experiments", "ff", "local", "models",
                "train", "distributed")

__all__ = sorted([*_PUBLIC, "ff", "models"])


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        importlib.import_module("forwardonly.estimators")  # every method and model registered
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    if name in _SUBPACKAGES:
        return importlib.import_module(f"forwardonly.{name}")
    raise AttributeError(f"module 'forwardonly' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
