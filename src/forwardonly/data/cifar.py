"""CIFAR-10, binary version (Krizhevsky 2009, https://www.cs.toronto.edu/~kriz/cifar.html).

Files ``data_batch_1.bin`` .. ``data_batch_5.bin`` (training) and ``test_batch.bin`` (test),
each raw or gzip-compressed (``.gz``). Every file is a run of 3073-byte records::

    uint8 label                  0..9 (airplane, automobile, bird, cat, deer, dog, frog,
                                       horse, ship, truck)
    uint8 red[1024], green[1024], blue[1024]     each a 32x32 plane, row-major

so a file of N records reshapes to ``(N, 3073)``; column 0 is the label and the rest reshapes
to ``(N, 3, 32, 32)`` without reordering a byte. This is the official "binary version"
(``cifar-10-binary.tar.gz``), not the Python (pickle) or MATLAB versions.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from forwardonly.data.idx import (
    DataError,
    Splits,
    check_labels,
    described_size,
    locate_files,
    read_bytes,
    to_unit_float,
)

CHANNELS, SIDE = 3, 32
RECORD = 1 + CHANNELS * SIDE * SIDE  # 3073 bytes: label, then R, G, B planes
TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
TEST_FILES = ("test_batch.bin",)
SUBDIRS = ("cifar10", "cifar-10-batches-bin", "cifar10/cifar-10-batches-bin")
CLASS_NAMES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip


def read_cifar_batch(path: Path, classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """Parse one binary batch file.

    Returns:
        images ``(N, 3, 32, 32)`` uint8 (a read-only view of the file's bytes) and labels
        ``(N,)`` int64.
    """
    data = read_bytes(path)
    if not data:
        raise DataError(f"{path} is empty; it should hold 3073-byte records. Download it again.")
    whole, extra = divmod(len(data), RECORD)
    if extra:
        raise DataError(
            f"{path} is truncated or corrupt: it holds {described_size(path, len(data))}, which "
            f"is not a multiple of the {RECORD}-byte record ({whole} whole records and {extra} "
            f"bytes left over; an official batch holds 10000 records = {10000 * RECORD} bytes). "
            f"Download it again."
        )
    records = np.frombuffer(data, dtype=np.uint8).reshape(whole, RECORD)
    labels = records[:, 0].astype(np.int64)
    check_labels(path, labels, classes)
    images = records[:, 1:].reshape(whole, CHANNELS, SIDE, SIDE)  # (N, 3, 32, 32): R, G, B
    return images, labels


def read_cifar_files(paths: list[Path], classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Read and concatenate batches: images ``(N, 3, 32, 32)`` float32 in [0, 1], labels int64."""
    batches = [read_cifar_batch(p, classes) for p in paths]
    x = to_unit_float([images for images, _ in batches])
    y = torch.from_numpy(np.concatenate([labels for _, labels in batches]))
    return x, y


def load_cifar10(data_dir: str | Path) -> Splits:
    """Load CIFAR-10 from ``data_dir``, ``data_dir/cifar10`` or ``data_dir/cifar-10-batches-bin``.

    Returns:
        ``train_x (50000, 3, 32, 32)`` float32 in [0, 1], ``train_y (50000,)`` int64, and
        the test split likewise (10000 images) for the official files.
    """
    hint = (
        "This loader reads the binary version (cifar-10-binary.tar.gz: data_batch_1..5.bin and "
        "test_batch.bin, raw or .gz), not the Python or MATLAB versions; fetch it with "
        "forwardonly.data.download_dataset('cifar10', root) on a machine with internet and pass "
        "that root as the data directory."
    )
    paths = locate_files("cifar10", data_dir, TRAIN_FILES + TEST_FILES, SUBDIRS, hint)
    train_x, train_y = read_cifar_files(paths[: len(TRAIN_FILES)])
    test_x, test_y = read_cifar_files(paths[len(TRAIN_FILES) :])
    return train_x, train_y, test_x, test_y
