"""Text classification sets read from TSV files and tokenized with the model's tokenizer.

Two kinds:

``sst2``
    The Stanford Sentiment Treebank, binary (GLUE's SST-2): ``train.tsv`` (GLUE train,
    67,349 phrases), ``dev.tsv`` (GLUE validation, 872 sentences: the split papers report)
    and ``test.tsv`` (the treebank's 1,821 labelled test sentences; GLUE's own test file has
    no labels). Train becomes the training split, dev the validation split, test the test
    split; 2 classes (0 negative, 1 positive).
``tsv``
    Any directory holding ``train.tsv`` and ``test.tsv``, and optionally ``dev.tsv`` (the
    validation split). Labels are integers ``0 .. C-1``; ``C`` is one more than the largest
    label, and every class must occur in the training file.

File format (both kinds): UTF-8 (a leading byte-order mark is allowed), one example per
line, fields separated by tabs, no quoting (GLUE's convention: a ``"`` is an ordinary
character), ``\\n`` or ``\\r\\n`` line ends, each file raw or gzip-compressed (``.gz``).
The first line is a header naming the columns; one of them is ``label``. The text column is
the one other column when there are two; with more columns it is the first of ``sentence``,
``text``, ``content`` the header names. Blank lines at the end of a file are ignored.

Texts are tokenized in chunks (``tokenizer(texts, truncation=True, max_length=...)``), and
each split becomes an int64 ``(N, L)`` tensor of token ids right-padded with the tokenizer's
pad id, ``L`` the longest tokenized example of that split (at most ``max_length``; longer
texts are truncated). Batches are trimmed further by the model (dynamic padding). Nothing
is cached on disk; the SST-2 training set tokenizes in a few seconds.

Every problem with a file raises :class:`DataError` naming the file and the line.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from forwardonly.data.idx import DataError, find_file, locate_files, read_bytes

SST2_FILES = ("train.tsv", "dev.tsv", "test.tsv")
TSV_FILES = ("train.tsv", "test.tsv")  # plus dev.tsv when present
TEXT_COLUMNS = ("sentence", "text", "content")  # tried in order when there are 3+ columns
LABEL_COLUMN = "label"
CHUNK = 4096  # texts per tokenizer call


class Tokenizer(Protocol):
    """What the loaders need of a (Hugging Face) tokenizer: a pad id, and a call on a list
    of strings returning ``{"input_ids": list of lists of ints, ...}``."""

    pad_token_id: int | None

    def __call__(self, text: list[str], *, truncation: bool, max_length: int,
                 **kwargs: Any) -> Mapping[str, Any]: ...


@dataclass(frozen=True)
class TextSplits:
    """Tokenized splits: ``*_x`` int64 ``(N, L)`` token ids, ``*_y`` int64 ``(N,)`` labels;
    ``val_*`` ``None`` when there is no validation file."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    val_x: Tensor | None
    val_y: Tensor | None
    classes: int
    pad_id: int


@dataclass(frozen=True)
class TsvFile:
    """One parsed file: its labels, its texts, and the line number of each example."""

    path: Path
    labels: np.ndarray  # (N,) int64
    texts: list[str]
    lines: np.ndarray  # (N,) int64, 1-based line numbers in the file


# ---------------------------------------------------------------------------------------------
# Reading


def read_tsv(path: Path) -> TsvFile:
    """Parse one labelled TSV file (format in the module docstring).

    Raises:
        DataError: not UTF-8, empty or header only, no ``label`` column, no text column, a
            line with the wrong number of fields, a label that is not a non-negative integer.
    """
    data = read_bytes(path)
    try:
        content = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise DataError(
            f"{path} is not UTF-8 text: byte {err.start} (line {line}) is "
            f"0x{data[err.start]:02x}, which cannot start or continue a UTF-8 character "
            f"({err.reason}). Save the file as UTF-8."
        ) from err
    rows = content.removeprefix("\ufeff").split("\n")
    rows = [r[:-1] if r.endswith("\r") else r for r in rows]
    while rows and not rows[-1].strip():
        rows.pop()
    if not rows:
        raise DataError(
            f"{path} is empty; it should start with a header line naming a {LABEL_COLUMN!r} "
            f"and a text column, followed by one example per line."
        )
    header = [h.strip() for h in rows[0].split("\t")]
    label_col, text_col = _columns(path, header)
    if len(rows) == 1:
        raise DataError(f"{path} holds only its header line (line 1) and no examples.")
    width = len(header)
    labels = np.empty(len(rows) - 1, dtype=np.int64)
    texts: list[str] = []
    for i, row in enumerate(rows[1:]):
        line = i + 2
        fields = row.split("\t")
        if len(fields) != width:
            what = "is empty" if not row.strip() else f"has {len(fields)} tab-separated fields"
            raise DataError(
                f"{path}, line {line} {what}, but the header (line 1) names {width} columns "
                f"({', '.join(header)}). Each example needs exactly one field per column, "
                f"separated by tabs (a tab inside a text must be replaced by a space)."
            )
        label = fields[label_col].strip()
        if not (label.isascii() and label.isdigit()):
            raise DataError(
                f"{path}, line {line}: the label {label!r} (column {label_col + 1}, "
                f"{header[label_col]!r}) is not a non-negative integer. Labels must be the "
                f"class numbers 0, 1, ..."
            )
        labels[i] = int(label)
        texts.append(fields[text_col])
    return TsvFile(path, labels, texts, np.arange(2, len(rows) + 1, dtype=np.int64))


def _columns(path: Path, header: list[str]) -> tuple[int, int]:
    """Indices of the label and the text column in ``header`` (lower-cased names)."""
    names = [h.lower() for h in header]
    shown = ", ".join(repr(h) for h in header)
    if LABEL_COLUMN not in names:
        note = ""
        if header[0].isdigit():
            note = " The first line looks like an example: the file needs a header line."
        elif "index" in names:
            note = (" A file with an 'index' column and no labels is an unlabelled test set "
                    "(such as GLUE's own SST-2 test.tsv); labelled examples are needed.")
        raise DataError(
            f"{path}, line 1: the header ({shown}) has no {LABEL_COLUMN!r} column.{note}"
        )
    label = names.index(LABEL_COLUMN)
    others = [i for i in range(len(names)) if i != label]
    if len(others) == 1:
        return label, others[0]
    for name in TEXT_COLUMNS:
        if name in names:
            return label, names.index(name)
    raise DataError(
        f"{path}, line 1: cannot tell the text column from the header ({shown}). With "
        f"{LABEL_COLUMN!r} and one other column that column is the text; with more, one of "
        f"them must be named {', '.join(repr(n) for n in TEXT_COLUMNS)}."
    )


def check_label_range(file: TsvFile, classes: int, why: str) -> None:
    """Raise :class:`DataError` naming the first line whose label is not below ``classes``."""
    bad = np.flatnonzero(file.labels >= classes)
    if bad.size:
        i = int(bad[0])
        raise DataError(
            f"{file.path}, line {int(file.lines[i])}: label {int(file.labels[i])} is out of "
            f"range; {why} the labels are 0..{classes - 1} ({bad.size} line(s) in all are "
            f"outside it)."
        )


# ---------------------------------------------------------------------------------------------
# Tokenizing


def tokenize(texts: Sequence[str], tokenizer: Tokenizer, max_length: int) -> Tensor:
    """Token ids of ``texts``: int64 ``(N, L)``, right-padded with the tokenizer's pad id to
    the longest example (``L <= max_length``; longer texts are truncated)."""
    pad_id = pad_id_of(tokenizer)
    ids: list[list[int]] = []
    for start in range(0, len(texts), CHUNK):
        chunk = list(texts[start : start + CHUNK])
        # only the ids are kept (the attention mask follows from pad_id): skip the masks
        out = tokenizer(chunk, truncation=True, max_length=max_length,
                        return_attention_mask=False, return_token_type_ids=False)
        ids.extend(out["input_ids"])
    lengths = np.fromiter((len(t) for t in ids), dtype=np.int64, count=len(ids))
    width = int(lengths.max()) if len(ids) else 0
    if width > max_length:
        raise DataError(
            f"the tokenizer returned {width} tokens for one text although max_length is "
            f"{max_length}; it does not truncate (pass a tokenizer that supports truncation)."
        )
    padded = np.full((len(ids), width), pad_id, dtype=np.int64)
    flat = np.fromiter((t for row in ids for t in row), dtype=np.int64, count=int(lengths.sum()))
    padded[np.arange(width) < lengths[:, None]] = flat  # row-major: each row's ids in order
    return torch.from_numpy(padded)


def pad_id_of(tokenizer: Tokenizer) -> int:
    """The tokenizer's pad id, or a :class:`DataError` if it has none."""
    pad_id = getattr(tokenizer, "pad_token_id", None)
    if not isinstance(pad_id, int):
        raise DataError(
            f"the tokenizer {type(tokenizer).__name__} has no pad token (pad_token_id is "
            f"{pad_id!r}); examples of different lengths cannot be padded. Set one, e.g. "
            f"tokenizer.pad_token = tokenizer.eos_token."
        )
    return pad_id


# ---------------------------------------------------------------------------------------------
# The two kinds


def load_sst2(data_dir: str | Path, tokenizer: Tokenizer, max_length: int = 128) -> TextSplits:
    """SST-2 from ``data_dir`` or ``data_dir/sst2``: train.tsv -> train, dev.tsv -> val,
    test.tsv -> test; 2 classes."""
    hint = (
        "SST-2 is three tab-separated UTF-8 files with a header line and the label (0 or 1) "
        "in one column: GLUE's train.tsv and dev.tsv, and test.tsv holding the treebank's "
        "labelled test sentences (GLUE's own test.tsv has no labels)."
    )
    paths = locate_files("sst2", data_dir, SST2_FILES, ("sst2", "SST-2"), hint)
    train, dev, test = (read_tsv(p) for p in paths)
    for f in (train, dev, test):
        check_label_range(f, 2, "SST-2 has 2 classes:")
    return _tokenized(train, dev, test, 2, tokenizer, max_length)


def load_tsv(data_dir: str | Path, tokenizer: Tokenizer, max_length: int = 128) -> TextSplits:
    """A directory of ``train.tsv``, ``test.tsv`` and optionally ``dev.tsv`` (validation)."""
    hint = (
        "A 'tsv' data set is a directory holding train.tsv and test.tsv (and optionally "
        "dev.tsv, the validation split): UTF-8, tab-separated, a header line naming a "
        "'label' column and a text column."
    )
    train_path, test_path = locate_files("tsv", data_dir, TSV_FILES, (), hint)
    dev_path = find_file(train_path.parent, "dev.tsv")
    train, test = read_tsv(train_path), read_tsv(test_path)
    dev = read_tsv(dev_path) if dev_path is not None else None
    classes = int(train.labels.max()) + 1
    missing = sorted(set(range(classes)) - set(np.unique(train.labels).tolist()))
    if missing:
        raise DataError(
            f"{train_path}: labels must be the class numbers 0..C-1, each occurring in the "
            f"training file, but its largest label is {classes - 1} and label(s) "
            f"{', '.join(map(str, missing))} never occur."
        )
    why = f"the training file {train_path.name} has {classes} classes, so"
    for f in (test, dev):
        if f is not None:
            check_label_range(f, classes, why)
    return _tokenized(train, dev, test, classes, tokenizer, max_length)


def _tokenized(train: TsvFile, dev: TsvFile | None, test: TsvFile, classes: int,
               tokenizer: Tokenizer, max_length: int) -> TextSplits:
    def split(f: TsvFile) -> tuple[Tensor, Tensor]:
        return tokenize(f.texts, tokenizer, max_length), torch.from_numpy(f.labels)

    train_x, train_y = split(train)
    test_x, test_y = split(test)
    val_x, val_y = split(dev) if dev is not None else (None, None)
    return TextSplits(train_x, train_y, test_x, test_y, val_x, val_y, classes,
                      pad_id_of(tokenizer))
