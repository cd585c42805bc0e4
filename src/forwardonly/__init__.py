"""forwardonly: train neural networks without backpropagating through them.

Estimators fill ``param.grad`` so any ``torch.optim`` optimizer works::

    est = forwardonly.ForwardGradient(model, loss_fn, directions=4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    opt.zero_grad(); stats = est.step(x, y); opt.step()
"""

__version__ = "0.1.0"

from . import (
    ff,  # noqa: E402  (registers the model "ff-mlp")
    models,  # noqa: E402
)
from .autodiff import DirectionSampler, ForwardModeError, directional_derivatives  # noqa: E402
from .config import ConfigError, TrainConfig  # noqa: E402
from .data import DataError, Dataset, load_dataset  # noqa: E402
from .estimators import (  # noqa: E402
    ESTIMATORS,
    ActivityPerturbation,
    Backprop,
    Estimator,
    ForwardForward,
    ForwardGradient,
    ForwardGradientSign,
    LocalActivityPerturbation,
    LocalBackprop,
    LocalGroupBackprop,
    LocalLosses,
    LocalWeightPerturbation,
    MixerWeightPerturbation,
    ZerothOrder,
    ZerothOrderSign,
    make_estimator,
)
from .ff import FFNet  # noqa: E402
from .models import build_model  # noqa: E402
from .models import cnn as _cnn  # noqa: E402,F401  (registers "cnn")
from .models import local_mixer as _local_mixer  # noqa: E402,F401  (registers "local-mixer")
from .models import mlp as _mlp  # noqa: E402,F401  (registers "mlp")
from .train import RunResult, TrainingDiverged, train  # noqa: E402

__all__ = [
    "ESTIMATORS", "ActivityPerturbation", "Backprop", "ConfigError", "DataError", "Dataset",
    "DirectionSampler", "Estimator", "FFNet", "ForwardForward", "ForwardGradient",
    "ForwardGradientSign", "ForwardModeError", "LocalActivityPerturbation", "LocalBackprop",
    "LocalGroupBackprop", "LocalLosses", "LocalWeightPerturbation", "MixerWeightPerturbation",
    "RunResult", "TrainConfig", "TrainingDiverged", "ZerothOrder", "ZerothOrderSign",
    "build_model", "directional_derivatives", "ff", "load_dataset", "make_estimator",
    "models", "train",
]
