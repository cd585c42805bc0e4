"""Training loop, run directories, checkpoints."""

from .loop import RunResult, TrainingDiverged, build, error_rate, load_run, train

__all__ = ["RunResult", "TrainingDiverged", "build", "error_rate", "load_run", "train"]
