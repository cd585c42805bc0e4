"""Data sets as tensors: ``load_dataset(name, data_dir) -> Dataset``.

=================  ==============  ===========================================================
name               one example     source
=================  ==============  ===========================================================
``digits``         (1, 8, 8)       scikit-learn's embedded set; no files, ``data_dir`` ignored
``mnist``          (1, 28, 28)     four MNIST-format IDX files (raw or ``.gz``)
``fashion-mnist``  (1, 28, 28)     the same four file names, Fashion-MNIST content
``kmnist``         (1, 28, 28)     the same four file names, Kuzushiji-MNIST content
``cifar10``        (3, 32, 32)     the binary version: ``data_batch_1..5.bin``, ``test_batch.bin``
``sst2``           (L,) token ids  ``train.tsv``, ``dev.tsv`` (validation), ``test.tsv``
``tsv``            (L,) token ids  ``train.tsv``, ``test.tsv``, optional ``dev.tsv`` (validation)
=================  ==============  ===========================================================

File-based sets are looked up in ``data_dir`` and then in ``data_dir/<name>``, so one data root
can hold them all (``root/mnist``, ``root/cifar10``, ``root/sst2``); a ``tsv`` set is read from
``data_dir`` itself. When ``data_dir`` is ``None`` the environment variable
``FORWARDONLY_DATA`` names the root. Images are float32 in [0, 1] (bytes / 255; digits / 16),
labels int64; :func:`standardize` then maps each channel to zero mean and unit variance using
statistics of the training split only.

Text sets (:data:`TEXT_DATASETS`, see :mod:`forwardonly.data.text`) need the model's tokenizer:
``load_dataset("sst2", root, tokenizer=tok, max_length=128)``. Each split is an int64
``(N, L)`` tensor of token ids right-padded with ``Dataset.pad_id`` to its longest example
(``L <= max_length``), so ``L`` may differ between splits; the model trims each batch to its
longest example.
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
from forwardonly.data.text import Tokenizer, load_sst2, load_tsv

__all__ = [
    "DATASETS",
    "IMAGE_DATASETS",
    "TEXT_DATASETS",
    "resolve_data_dir",
    "DATA_ENV",
    "DataError",
    "Dataset",
    "channel_stats",
    "download_dataset",
    "load_dataset",
    "standardize",
    "Tokenizer",
]

IMAGE_DATASETS: tuple[str, ...] = ("digits", "mnist", "fashion-mnist", "kmnist", "cifar10")
TEXT_DATASETS: tuple[str, ...] = ("sst2", "tsv")  # tokenized with the model's tokenizer
DATASETS: tuple[str, ...] = IMAGE_DATASETS + TEXT_DATASETS
DATA_ENV = "FORWARDONLY_DATA"  # default data root when data_dir is None

_LOADERS: dict[str, Callable[[Path], Splits]] = {
    "mnist": partial(load_idx, "mnist"),
    "fashion-mnist": partial(load_idx, "fashion-mnist"),
    "kmnist": partial(load_idx, "kmnist"),
    "cifar10": load_cifar10,
}
_CLASSES = {"digits": 10, "mnist": 10, "fashion-mnist": 10, "kmnist": 10, "cifar10": 10}
_TEXT_LOADERS = {"sst2": load_sst2, "tsv": load_tsv}
_ALIASES = {"fashion": "fashion-mnist", "fashionmnist": "fashion-mnist", "cifar-10": "cifar10",
            "sst-2": "sst2"}


@dataclass(frozen=True, eq=False)
class Dataset:
    """Labelled train/test splits (and an optional validation split) held in memory.

    Attributes:
        name: the canonical data set name (one of :data:`DATASETS`).
        train_x: images ``(N, C, H, W)`` float32, in [0, 1] as loaded; or, for text
            (``pad_id`` set), token ids ``(N, L)`` int64 right-padded with ``pad_id``.
        train_y: ``(N,)`` int64 labels in ``0 .. classes - 1``.
        test_x: ``(M, ...)`` like ``train_x`` (for text, ``L`` may differ between splits).
        test_y: ``(M,)`` int64.
        classes: number of classes.
        val_x: the validation split (``(V, ...)`` like ``train_x``) where the data set has one
            (SST-2's dev set), else ``None``; hyperparameters are chosen on it.
        val_y: ``(V,)`` int64, or ``None`` with ``val_x``.
        pad_id: the token id that pads text examples; ``None`` for images.
    """

    name: str
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    classes: int
    val_x: Tensor | None = None
    val_y: Tensor | None = None
    pad_id: int | None = None

    def __post_init__(self) -> None:
        if (self.val_x is None) != (self.val_y is None):
            raise DataError(f"{self.name} val_x and val_y must both be given or both be None.")
        for split, x, y in self.splits():
            if self.pad_id is None and (x.dtype != torch.float32 or x.dim() != 4):
                raise DataError(
                    f"{self.name} {split}_x must be a float32 (N, C, H, W) tensor (or int64 "
                    f"(N, L) token ids with a pad_id), got {x.dtype} of shape {tuple(x.shape)}."
                )
            if self.pad_id is not None and (x.dtype != torch.int64 or x.dim() != 2):
                raise DataError(
                    f"{self.name} {split}_x must be an int64 (N, L) tensor of token ids (the "
                    f"data set has a pad_id), got {x.dtype} of shape {tuple(x.shape)}."
                )
            if y.dtype != torch.int64 or y.shape != (x.shape[0],):
                raise DataError(
                    f"{self.name} {split}_y must be an int64 tensor of shape ({x.shape[0]},) "
                    f"to match {split}_x, got {y.dtype} of shape {tuple(y.shape)}."
                )
            if self.pad_id is None and x.shape[1:] != self.train_x.shape[1:]:
                raise DataError(
                    f"{self.name} train and {split} images differ in shape: "
                    f"{tuple(self.train_x.shape[1:])} vs {tuple(x.shape[1:])}."
                )

    def splits(self) -> list[tuple[str, Tensor, Tensor]]:
        """``(name, x, y)`` of each split present: train, then val if any, then test."""
        out = [("train", self.train_x, self.train_y)]
        if self.val_x is not None and self.val_y is not None:
            out.append(("val", self.val_x, self.val_y))
        out.append(("test", self.test_x, self.test_y))
        return out

    @property
    def is_text(self) -> bool:
        """Whether the examples are token ids (padded with :attr:`pad_id`)."""
        return self.pad_id is not None

    @property
    def in_shape(self) -> tuple[int, ...]:
        """Shape of one training example: ``(C, H, W)`` for images, ``(L,)`` for text (``L``
        the padded length of the training split)."""
        return tuple(int(s) for s in self.train_x.shape[1:])

    def __repr__(self) -> str:
        val = "" if self.val_y is None else f", val={len(self.val_y)}"
        pad = "" if self.pad_id is None else f", pad_id={self.pad_id}"
        return (
            f"Dataset(name={self.name!r}, train={len(self.train_y)}{val}, "
            f"test={len(self.test_y)}, in_shape={self.in_shape}, classes={self.classes}{pad})"
        )


def load_dataset(
    name: str,
    data_dir: str | Path | None = None,
    *,
    tokenizer: Tokenizer | None = None,
    max_length: int = 128,
) -> Dataset:
    """Load data set ``name`` (one of :data:`DATASETS`).

    Arguments:
        name: data set name; case and ``_``/``-`` are not significant.
        data_dir: directory holding the files, directly or in a subdirectory named ``name``
            (a ``tsv`` set: the directory itself). ``None`` uses the environment variable
            ``FORWARDONLY_DATA``. Ignored for ``digits``.
        tokenizer: the model's tokenizer (a Hugging Face tokenizer, or anything with a
            ``pad_token_id`` and the same call); needed by the text sets, ignored otherwise.
        max_length: text sets: the most tokens kept of one example (special tokens
            included); longer texts are truncated.

    Raises:
        DataError: unknown name, no directory, no tokenizer for a text set, missing or
            corrupt files.
    """
    key = name.strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key not in DATASETS:
        valid = ", ".join(repr(n) for n in DATASETS)
        raise DataError(f"dataset must be one of {valid}, got {name!r}.")
    if key in TEXT_DATASETS:
        if tokenizer is None:
            raise DataError(
                f"Dataset {key!r} is text: it is tokenized with the model's tokenizer, and none "
                f"was given. Train it with a text model (e.g. --model minilm, or --model hf "
                f"--model-path DIR), or pass tokenizer= to load_dataset."
            )
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 1:
            raise DataError(f"max_length must be a positive integer, got {max_length!r}.")
    if key == "digits":
        splits = load_digits()
        return Dataset(key, *splits, _CLASSES[key])
    if data_dir is None:
        data_dir = os.environ.get(DATA_ENV) or None
    if data_dir is None:
        where = (
            "the directory holding train.tsv and test.tsv" if key == "tsv" else
            f"the directory holding the files, or a root with a {key!r} subdirectory"
        )
        raise DataError(
            f"Dataset {key!r} is read from files, but no data directory was given. Pass "
            f"data_dir ({where}), or set the environment variable {DATA_ENV} to such a "
            f"directory."
        )
    if key in TEXT_DATASETS:
        assert tokenizer is not None
        t = _TEXT_LOADERS[key](Path(data_dir), tokenizer, max_length)
        return Dataset(key, t.train_x, t.train_y, t.test_x, t.test_y, t.classes,
                       val_x=t.val_x, val_y=t.val_y, pad_id=t.pad_id)
    splits = _LOADERS[key](Path(data_dir))
    return Dataset(key, *splits, _CLASSES[key])


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

    ``mean_c`` and ``std_c`` come from the training split only and are applied to every
    split (train, val, test), so no held-out information leaks into training. Returns a new
    :class:`Dataset`.
    """
    if ds.is_text:
        raise DataError(f"Cannot standardize {ds.name}: its examples are token ids, not images.")
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
    val_x = None if ds.val_x is None else (ds.val_x - m).div_(s)
    return replace(ds, train_x=(ds.train_x - m).div_(s), test_x=(ds.test_x - m).div_(s),
                   val_x=val_x)
