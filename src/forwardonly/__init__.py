"""forwardonly: train neural networks without backpropagating through them.

Estimators fill ``param.grad`` so any ``torch.optim`` optimizer works::

    est = forwardonly.ForwardGradient(model, loss_fn, directions=4)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    opt.zero_grad(); stats = est.step(x, y); opt.step()
"""

__version__ = "0.1.0"

from . import (
    ff,  # noqa: E402  (registers "ff" and "ff-mlp")
    models,  # noqa: E402
)
from .config import ConfigError, TrainConfig  # noqa: E402
from .data import DataError, Dataset, load_dataset  # noqa: E402
from .estimators import (  # noqa: E402
    ESTIMATORS,
    Backprop,
    Estimator,
    ForwardGradient,
    ForwardGradientSign,
    ZerothOrder,
    ZerothOrderSign,
    make_estimator,
)
from .estimators import activity as _activity  # noqa: E402,F401  (fg-a, lg-fg-a)
from .estimators import local_bp as _local_bp  # noqa: E402,F401  (l-bp, lg-bp)
from .estimators import local_fg as _local_fg  # noqa: E402,F401  (lg-fg-w)
from .forward_mode import ForwardModeError, directional_derivatives  # noqa: E402
from .models import build_model  # noqa: E402
from .models import cnn as _cnn  # noqa: E402,F401  (registers "cnn")
from .models import local_mixer as _local_mixer  # noqa: E402,F401  (registers "local-mixer")
from .models import mlp as _mlp  # noqa: E402,F401  (registers "mlp")
from .train import RunResult, TrainingDiverged, fit  # noqa: E402

__all__ = [
    "ESTIMATORS", "Backprop", "ConfigError", "DataError", "Dataset", "Estimator",
    "ForwardGradient", "ForwardGradientSign", "ForwardModeError", "RunResult", "TrainConfig",
    "TrainingDiverged", "ZerothOrder", "ZerothOrderSign", "build_model",
    "directional_derivatives", "ff", "fit", "load_dataset", "make_estimator", "models",
]
