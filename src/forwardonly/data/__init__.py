"""Data sets as tensors: ``load_dataset(name, data_dir) -> Dataset``.

=================  ==============  ===========================================================
name               shape (C,H,W)   source
=================  ==============  ===========================================================
``digits``         (1, 8, 8)       scikit-learn's embedded set; no files, ``data_dir`` ignored
``mnist``          (1, 28, 28)     four MNIST-format IDX files (raw or ``.gz``)
``fashion-mnist``  (1, 28, 28)     the same four file names, Fashion-MNIST content
``kmnist``         (1, 28, 28)     the same four file names, Kuzushiji-MNIST content
``cifar10``        (3, 32, 32)     the binary version: ``data_batch_1..5.bin``, ``test_batch.bin``
=================  ==============  ===========================================================

File-based sets are looked up in ``data_dir`` and then in ``data_dir/<name>``, so one data root
can hold them all (``root/mnist``, ``root/cifar10``). When ``data_dir`` is ``None`` the
environment variable ``FORWARDONLY_DATA`` names the root. Images are float32 in [0, 1]
(bytes / 255; digits / 16), labels int64; :func:`standardize` then maps each channel to zero
mean and unit variance using statistics of the training split only.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch
from torch import Tensor

from forwardonly.data.cifar import load_cifar10
from forwardonly.data.digits import load_digits
from forwardonly.data.download import download_dataset
from forwardonly.data.idx import DataError, Splits, load_idx

__all__ = [
    "DATASETS",
    "TEXT_DATASETS",
    "resolve_data_dir",
    "DATA_ENV",
    "DataError",
    "Dataset",
    "channel_stats",
    "download_dataset",
    "load_dataset",
    "standardize",
]

DATASETS: tuple[str, ...] = ("digits", "mnist", "fashion-mnist", "kmnist", "cifar10")
TEXT_DATASETS: tuple[str, ...] = ()  # tokenized with the model's tokenizer
DATA_ENV = "FORWARDONLY_DATA"  # default data root when data_dir is None

_LOADERS: dict[str, Callable[[Path], Splits]] = {
    "mnist": partial(load_idx, "mnist"),
    "fashion-mnist": partial(load_idx, "fashion-mnist"),
    "kmnist": partial(load_idx, "kmnist"),
    "cifar10": load_cifar10,
}
_CLASSES = {"digits": 10, "mnist": 10, "fashion-mnist": 10, "kmnist": 10, "cifar10": 10}
_ALIASES = {"fashion": "fashion-mnist", "fashionmnist": "fashion-mnist", "cifar-10": "cifar10"}


@dataclass(frozen=True, eq=False)
class Dataset:
    """A labelled train/test split held in memory.

    Attributes:
        name: the canonical data set name (one of :data:`DATASETS`).
        train_x: ``(N, C, H, W)`` float32 images, in [0, 1] as loaded.
        train_y: ``(N,)`` int64 labels in ``0 .. classes - 1``.
        test_x: ``(M, C, H, W)`` float32.
        test_y: ``(M,)`` int64.
        classes: number of classes.
    """

    name: str
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    classes: int

    def __post_init__(self) -> None:
        for split, x, y in (
            ("train", self.train_x, self.train_y),
            ("test", self.test_x, self.test_y),
        ):
            if x.dtype != torch.float32 or x.dim() != 4:
                raise DataError(
                    f"{self.name} {split}_x must be a float32 (N, C, H, W) tensor, got "
                    f"{x.dtype} of shape {tuple(x.shape)}."
                )
            if y.dtype != torch.int64 or y.shape != (x.shape[0],):
                raise DataError(
                    f"{self.name} {split}_y must be an int64 tensor of shape ({x.shape[0]},) "
                    f"to match {split}_x, got {y.dtype} of shape {tuple(y.shape)}."
                )
        if self.train_x.shape[1:] != self.test_x.shape[1:]:
            raise DataError(
                f"{self.name} train and test images differ in shape: "
                f"{tuple(self.train_x.shape[1:])} vs {tuple(self.test_x.shape[1:])}."
            )

    @property
    def in_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one example."""
        c, h, w = self.train_x.shape[1:]
        return (int(c), int(h), int(w))

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, train={len(self.train_y)}, test={len(self.test_y)}, "
            f"in_shape={self.in_shape}, classes={self.classes})"
        )


def load_dataset(name: str, data_dir: str | Path | None = None) -> Dataset:
    """Load data set ``name`` (one of :data:`DATASETS`).

    Arguments:
        name: data set name; case and ``_``/``-`` are not significant.
        data_dir: directory holding the files, directly or in a subdirectory named ``name``.
            ``None`` uses the environment variable ``FORWARDONLY_DATA``. Ignored for
            ``digits``.

    Raises:
        DataError: unknown name, no directory, missing or corrupt files.
    """
    key = name.strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key not in DATASETS:
        valid = ", ".join(repr(n) for n in DATASETS)
        raise DataError(f"dataset must be one of {valid}, got {name!r}.")
    if key == "digits":
        splits = load_digits()
    else:
        if data_dir is None:
            data_dir = os.environ.get(DATA_ENV) or None
        if data_dir is None:
            raise DataError(
                f"Dataset {key!r} is read from files, but no data directory was given. Pass "
                f"data_dir (the directory holding the files, or a root with a {key!r} "
                f"subdirectory), or set the environment variable {DATA_ENV} to such a root."
            )
        splits = _LOADERS[key](Path(data_dir))
    train_x, train_y, test_x, test_y = splits
    return Dataset(key, train_x, train_y, test_x, test_y, _CLASSES[key])


def resolve_data_dir(name: str, data_dir: str | Path | None = None) -> str | None:
    """The absolute directory :func:`load_dataset` reads ``name`` from (``data_dir``, else
    ``$FORWARDONLY_DATA``), or ``None`` for the embedded ``digits``: what a run records, so
    it can be read again from any working directory."""
    key = _ALIASES.get(name.strip().lower().replace("_", "-"), name)
    if key == "digits":
        return None
    chosen = data_dir if data_dir is not None else (os.environ.get(DATA_ENV) or None)
    return None if chosen is None else str(Path(chosen).expanduser().resolve())


def channel_stats(x: Tensor, chunk_elements: int = 1 << 22) -> tuple[Tensor, Tensor]:
    """Per-channel mean and (population) standard deviation of ``(N, C, H, W)`` images.

    Sums of x and x**2 are accumulated in float64 over chunks of images, so the statistics of
    a large set are exact to float32 precision without a float64 copy of the whole set.

    Returns:
        ``mean (C,)`` and ``std (C,)``, float64.
    """
    n, c = x.shape[0], x.shape[1]
    rows = max(1, chunk_elements // max(1, x[0].numel()))
    s1 = torch.zeros(c, dtype=torch.float64)
    s2 = torch.zeros(c, dtype=torch.float64)
    for start in range(0, n, rows):
        xb = x[start : start + rows].double()  # (rows, C, H, W)
        s1 += xb.sum(dim=(0, 2, 3))
        s2 += (xb * xb).sum(dim=(0, 2, 3))
    count = n * x.shape[2] * x.shape[3]
    mean = s1 / count
    var = (s2 / count - mean * mean).clamp_min(0.0)
    return mean, var.sqrt()


def standardize(ds: Dataset) -> Dataset:
    """Map each channel to zero mean and unit variance, ``x' = (x - mean_c) / std_c``.

    ``mean_c`` and ``std_c`` come from the training split only and are applied to both
    splits, so no test information leaks into training. Returns a new :class:`Dataset`.
    """
    mean, std = channel_stats(ds.train_x)
    if bool((std == 0).any()):
        flat = [int(i) for i in torch.nonzero(std == 0).flatten()]
        raise DataError(
            f"Cannot standardize {ds.name}: channel(s) {flat} of the training images are "
            f"constant (standard deviation 0)."
        )
    m = mean.float().view(1, -1, 1, 1)
    s = std.float().view(1, -1, 1, 1)
    # (N, C, H, W) - (1, C, 1, 1): one new tensor per split, divided in place
    return replace(ds, train_x=(ds.train_x - m).div_(s), test_x=(ds.test_x - m).div_(s))
