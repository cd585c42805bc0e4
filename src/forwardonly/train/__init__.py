"""Training loop, run directories, checkpoints."""

from .loop import RunResult, TrainingDiverged, build, error_rate, train

__all__ = ["RunResult", "TrainingDiverged", "build", "error_rate", "train"]
