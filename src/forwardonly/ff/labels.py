"""Writing a label into an image, as supervised Forward-Forward does (Hinton 2022, §3.3).

The one-hot label (times ``scale``) replaces the first ``K`` entries of the flattened image
(for MNIST the first 10 pixels of the top row, which are always background). The *neutral*
label used for the softmax readout and for picking hard negatives puts ``scale/K`` in every
one of those entries.
"""

from __future__ import annotations

import torch
from torch import Tensor


def check_label_room(features: int, num_classes: int) -> None:
    if num_classes < 2:
        raise ValueError(f"Forward-Forward needs at least 2 classes, got {num_classes}")
    if features <= num_classes:
        raise ValueError(
            f"a label of {num_classes} classes is written into the first {num_classes} input "
            f"values, but an example has only {features}; use a larger input or the "
            "unsupervised mode (ff_mode='unsupervised')"
        )


def label_codes(
    labels: Tensor | None,
    count: int,
    num_classes: int,
    scale: float = 1.0,
    *,
    device: torch.device | str | None = None,
) -> Tensor:
    """The K label entries of ``count`` examples (count, K): ``scale·e_y``, or ``scale/K``
    everywhere for the neutral label (``labels=None``)."""
    if labels is None:
        return torch.full((count, num_classes), scale / num_classes, device=device)
    if labels.shape != (count,):
        raise ValueError(
            f"labels must be a vector of one class index per example, shape ({count},); "
            f"got shape {tuple(labels.shape)}"
        )
    codes = torch.zeros(count, num_classes, device=labels.device)
    return codes.scatter_(1, labels.view(-1, 1).long(), scale)


def write_codes(x: Tensor, codes: Tensor) -> Tensor:
    """Stacked copies of ``x`` (B, D) with label codes (V·B, K) written in: (V·B, D).

    Row ``v·B + i`` is example ``i`` with code ``codes[v·B + i]``.
    """
    B, K = x.shape[0], codes.shape[1]
    check_label_room(x.shape[1], K)
    if codes.shape[0] % B:
        raise ValueError(f"codes must stack whole blocks of {B} rows, got {codes.shape[0]} rows")
    out = x.repeat(codes.shape[0] // B, 1)
    out[:, :K] = codes
    return out


def embed_labels(x: Tensor, labels: Tensor | None, num_classes: int, scale: float = 1.0) -> Tensor:
    """Copy of ``x`` (B, D) with its first ``num_classes`` entries set to the label code.

    Arguments:
        x: flattened examples, shape (B, D) with D > num_classes.
        labels: int class indices (B,), or ``None`` for the neutral label.
        num_classes: K, the number of label entries.
        scale: value of the "on" entry (Hinton's ``labelstrength``).

    Returns:
        (B, D): one-hot ``scale·e_y`` (or ``scale/K`` everywhere) in ``[:, :K]``, ``x`` elsewhere.
    """
    check_label_room(x.shape[1], num_classes)
    codes = label_codes(labels, x.shape[0], num_classes, scale, device=x.device)
    return write_codes(x, codes.to(x.dtype))


def trial_codes(
    count: int, num_classes: int, scale: float = 1.0, *, device: torch.device | str | None = None
) -> Tensor:
    """Codes of every label for ``count`` examples, label-major: (K·count, K)."""
    eye = torch.eye(num_classes, device=device) * scale
    return eye.repeat_interleave(count, dim=0)


def label_trials(x: Tensor, num_classes: int, scale: float = 1.0) -> Tensor:
    """Every label written into every example: (B, D) -> (K·B, D), label-major.

    Row ``c·B + i`` is example ``i`` with label ``c``; used to score all labels at once.
    """
    codes = trial_codes(x.shape[0], num_classes, scale, device=x.device)
    return write_codes(x, codes.to(x.dtype))


def extract_labels(x: Tensor, num_classes: int) -> Tensor:
    """The class written by :func:`embed_labels`: argmax of the first K entries, (B,) int64."""
    check_label_room(x.shape[1], num_classes)
    return x[:, :num_classes].argmax(dim=1)
