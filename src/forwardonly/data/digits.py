"""scikit-learn's embedded 8x8 handwritten digits: the zero-download default data set.

``sklearn.datasets.load_digits`` ships 1797 images of 8x8 pixels with values 0..16 (the UCI
"Optical Recognition of Handwritten Digits" test set), 10 classes.

The train/test split is fixed and needs no random numbers, so it is identical on every run and
every library version: within each class, taken in the order the file stores them, every
fifth example (positions 4, 9, 14, ...) goes to the test split and the rest to training. That is
a stratified 80/20 split: 1442 training and 355 test images.
"""

from __future__ import annotations

import numpy as np
import torch

from forwardonly.data.idx import Splits

TEST_EVERY = 5  # every fifth example of each class is a test example
MAX_VALUE = 16.0  # pixel values are counts of set bits in 4x4 blocks: 0..16


def held_out_mask(labels: np.ndarray, every: int = TEST_EVERY) -> np.ndarray:
    """Boolean ``(N,)`` mask of the test examples: each class's every-``every``-th example."""
    mask = np.zeros(labels.shape[0], dtype=bool)
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)  # this class, in file order
        mask[members[every - 1 :: every]] = True
    return mask


def load_digits() -> Splits:
    """The fixed split: ``train_x (1442, 1, 8, 8)`` float32 in [0, 1], ``train_y (1442,)`` int64,
    ``test_x (355, 1, 8, 8)``, ``test_y (355,)``."""
    from sklearn.datasets import load_digits as _sklearn_digits  # imported when needed

    bunch = _sklearn_digits()
    x = (bunch.data.reshape(-1, 1, 8, 8) / MAX_VALUE).astype(np.float32)  # (N, 1, 8, 8)
    y = bunch.target.astype(np.int64)
    test = held_out_mask(y)
    return (
        torch.from_numpy(x[~test]),
        torch.from_numpy(y[~test]),
        torch.from_numpy(x[test]),
        torch.from_numpy(y[test]),
    )
