"""MNIST-format IDX files, and the file helpers every on-disk loader shares.

The IDX format (LeCun et al., http://yann.lecun.com/exdb/mnist/) is a big-endian header
followed by raw bytes::

    int32 magic      0x00000803 = 2051 for images (uint8, 3 dims), 0x00000801 = 2049 for labels
    int32 dims[k]    images: count, rows, cols;  labels: count
    uint8 data[prod(dims)]

MNIST, Fashion-MNIST and KMNIST all ship as the same four files::

    train-images-idx3-ubyte   train-labels-idx1-ubyte
    t10k-images-idx3-ubyte    t10k-labels-idx1-ubyte

each raw or gzip-compressed (``.gz``). Everything here is parsed with ``np.frombuffer``: no
Python loop touches a sample. Every problem with a file raises :class:`DataError` naming the
file, what is wrong with it, and how to fix it.
"""

from __future__ import annotations

import gzip
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

GZIP_MAGIC = b"\x1f\x8b"
IMAGE_MAGIC = 2051  # 0x0803: unsigned bytes, 3 dimensions
LABEL_MAGIC = 2049  # 0x0801: unsigned bytes, 1 dimension

TRAIN_IMAGES = "train-images-idx3-ubyte"
TRAIN_LABELS = "train-labels-idx1-ubyte"
TEST_IMAGES = "t10k-images-idx3-ubyte"
TEST_LABELS = "t10k-labels-idx1-ubyte"
IDX_FILES = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)

Splits = tuple[Tensor, Tensor, Tensor, Tensor]  # train_x, train_y, test_x, test_y


class DataError(ValueError):
    """A data set is missing, unreadable or corrupt; the message says which file and why."""


# ---------------------------------------------------------------------------------------------
# Shared file helpers (also used by the CIFAR reader)


def find_file(directory: Path, name: str) -> Path | None:
    """``directory/name`` if it is a file, else ``directory/name.gz``, else ``None``."""
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def locate_files(
    dataset: str, data_dir: str | Path, names: Sequence[str], subdirs: Sequence[str], hint: str
) -> list[Path]:
    """Find every file of ``names`` (raw or ``.gz``) in one directory.

    The directories tried, in order, are ``data_dir`` itself and ``data_dir/<subdir>`` for each
    of ``subdirs``; the first one that holds all the files wins, so one data root can hold
    several data sets side by side (``root/mnist``, ``root/cifar10``).

    Returns:
        The paths, in the order of ``names``.
    """
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        what = "is not a directory" if root.exists() else "does not exist"
        raise DataError(
            f"The data directory {root} for {dataset!r} {what}. Pass the directory that holds "
            f"the files {', '.join(names)} (each raw or .gz). {hint}"
        )
    candidates = [root, *(root / s for s in subdirs)]
    best: tuple[int, Path, list[str]] | None = None
    for directory in candidates:
        found = [find_file(directory, n) for n in names]
        if all(p is not None for p in found):
            return [p for p in found if p is not None]
        missing = [n for n, p in zip(names, found, strict=True) if p is None]
        if best is None or len(names) - len(missing) > best[0]:
            best = (len(names) - len(missing), directory, missing)
    assert best is not None
    _, directory, missing = best
    places = ", ".join(str(d) for d in candidates)
    raise DataError(
        f"Cannot find the {dataset!r} file(s) {', '.join(missing)} in {directory}: looked for "
        f"each as NAME and NAME.gz in {places}. {hint}"
    )


def read_bytes(path: Path) -> bytes:
    """The contents of ``path``, gunzipped if it is gzip-compressed.

    A file is decompressed when it starts with the gzip signature ``1f 8b`` (whatever its
    name); a file named ``*.gz`` without that signature is an error.
    """
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataError(f"Cannot read {path}: {err.strerror}. Check that it is readable.") from err
    if data[:2] == GZIP_MAGIC:
        try:
            return gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as err:
            raise DataError(
                f"{path} is a corrupt gzip file ({err}). Download it again, or replace it with "
                f"the uncompressed file."
            ) from err
    if path.suffix == ".gz":
        raise DataError(
            f"{path} is named .gz but is not gzip-compressed (it does not start with the gzip "
            f"signature 1f 8b). Download it again, or remove the .gz suffix if the file is "
            f"uncompressed."
        )
    return data


def described_size(path: Path, nbytes: int) -> str:
    """``"123 bytes"``, saying "uncompressed" for a gzip file so the number is not misread."""
    return f"{nbytes} bytes (uncompressed)" if path.suffix == ".gz" else f"{nbytes} bytes"


def to_unit_float(arrays: Sequence[np.ndarray]) -> Tensor:
    """Stack uint8 arrays of equal trailing shape into one float32 tensor with values / 255.

    Writes straight into one preallocated buffer, so a large split is converted without an
    extra uint8 concatenation.
    """
    total = sum(a.shape[0] for a in arrays)
    out = np.empty((total, *arrays[0].shape[1:]), dtype=np.float32)
    start = 0
    for a in arrays:
        np.divide(a, np.float32(255), out=out[start : start + a.shape[0]])
        start += a.shape[0]
    return torch.from_numpy(out)


def check_labels(path: Path, labels: np.ndarray, classes: int) -> None:
    """Raise :class:`DataError` if any label is outside ``0 .. classes - 1``."""
    bad = np.flatnonzero(labels >= classes)
    if bad.size:
        i = int(bad[0])
        raise DataError(
            f"{path} holds label {int(labels[i])} at index {i} ({bad.size} label(s) in all are "
            f"outside the valid range 0..{classes - 1}). The file is corrupt or belongs to "
            f"another data set; download it again."
        )


# ---------------------------------------------------------------------------------------------
# IDX


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Parse one IDX file of unsigned bytes with ``ndim`` dimensions.

    Returns:
        A read-only uint8 array of the shape the header gives, e.g. ``(N, rows, cols)``.
    """
    data = read_bytes(path)
    expected_magic = {3: IMAGE_MAGIC, 1: LABEL_MAGIC}[ndim]
    kind = "image" if ndim == 3 else "label"
    header = 4 * (1 + ndim)
    if len(data) < 4:
        raise DataError(
            f"{path} is truncated: an IDX {kind} file starts with a 4-byte magic number, but "
            f"it holds only {described_size(path, len(data))}. Download it again."
        )
    magic = int.from_bytes(data[:4], "big")
    if magic != expected_magic:
        swapped = {IMAGE_MAGIC: "an image file", LABEL_MAGIC: "a label file"}.get(magic)
        why = f", which marks {swapped}: are the image and label files swapped?" if swapped else "."
        raise DataError(
            f"{path} has the wrong magic number: expected {expected_magic} (an IDX {kind} "
            f"file), found {magic}{why} Check that this is the MNIST-format {kind} file."
        )
    if len(data) < header:
        raise DataError(
            f"{path} is truncated: an IDX {kind} file starts with a header of {header} bytes, but "
            f"it holds only {described_size(path, len(data))}. Download it again."
        )
    dims = [int(d) for d in np.frombuffer(data, dtype=">i4", count=ndim, offset=4)]
    if min(dims) <= 0:
        raise DataError(
            f"{path} has a header with dimensions {dims}; every dimension must be positive. "
            f"The file is empty or corrupt; download it again."
        )
    count = int(np.prod(dims))
    expected = header + count
    if len(data) != expected:
        shape = "x".join(str(d) for d in dims[1:])
        promise = f"{dims[0]} {kind}s" + (f" of {shape} pixels" if shape else "")
        state = (
            f"is truncated: expected {expected} bytes from the header ({promise})"
            if len(data) < expected
            else f"is too long: expected {expected} bytes from the header ({promise})"
        )
        raise DataError(
            f"{path} {state}, found {described_size(path, len(data))}. The file is corrupt; "
            f"download it again."
        )
    return np.frombuffer(data, dtype=np.uint8, count=count, offset=header).reshape(dims)


def read_idx_split(images: Path, labels: Path, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One split: images ``(N, rows, cols)`` uint8 and labels ``(N,)`` int64, checked."""
    x = read_idx(images, 3)
    y = read_idx(labels, 1)
    if x.shape[0] != y.shape[0]:
        raise DataError(
            f"{images} holds {x.shape[0]} images but {labels} holds {y.shape[0]} labels; the "
            f"two files must come from the same split of the same data set."
        )
    check_labels(labels, y, classes)
    return x, y.astype(np.int64)


def load_idx(dataset: str, data_dir: str | Path, classes: int = 10) -> Splits:
    """Load an MNIST-format data set from ``data_dir`` (or ``data_dir/<dataset>``).

    Returns:
        ``train_x (N, 1, H, W)`` float32 in [0, 1], ``train_y (N,)`` int64, and the same
        for the test split.
    """
    hint = (
        f"Put the four MNIST-format files there (raw or .gz), or fetch them with "
        f"forwardonly.data.download_dataset({dataset!r}, root) on a machine with internet "
        f"and pass that root as the data directory."
    )
    tr_x, tr_y, te_x, te_y = locate_files(dataset, data_dir, IDX_FILES, (dataset,), hint)
    train_x, train_y = read_idx_split(tr_x, tr_y, classes)
    test_x, test_y = read_idx_split(te_x, te_y, classes)
    if train_x.shape[1:] != test_x.shape[1:]:
        raise DataError(
            f"{tr_x} holds {train_x.shape[1]}x{train_x.shape[2]} images but {te_x} holds "
            f"{test_x.shape[1]}x{test_x.shape[2]} images; both splits must have one image size."
        )
    return (
        to_unit_float([train_x[:, None]]),  # (N, 1, H, W)
        torch.from_numpy(train_y),
        to_unit_float([test_x[:, None]]),
        torch.from_numpy(test_y),
    )
