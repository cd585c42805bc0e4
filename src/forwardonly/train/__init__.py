"""The training loop (:func:`fit`), its workers, run directories, checkpoints."""

from .builders import build, make_optimizer
from .fit import OutOfMemory, RunResult, RunWriteError, TrainingDiverged, fit
from .run_dir import load_run, resume_config
from .worker import LocalWorker, Worker, error_rate

__all__ = ["LocalWorker", "OutOfMemory", "RunResult", "RunWriteError", "TrainingDiverged",
           "Worker", "build", "error_rate", "fit", "load_run", "make_optimizer",
           "resume_config"]
