"""Tests of forwardonly.data: tiny files built in tmp_path (valid and broken), the real data
sets when ../shared/data (or $FORWARDONLY_DATA) holds them, standardize and the downloader."""

from __future__ import annotations

import gzip
import io
import os
import tarfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from forwardonly.data import (
    DATA_ENV,
    DATASETS,
    DataError,
    Dataset,
    channel_stats,
    download_dataset,
    load_dataset,
    standardize,
)

DATA_ROOT = Path(os.environ.get(DATA_ENV)
                 or Path(__file__).resolve().parents[3] / "shared" / "data")
IDX_STEMS = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
CIFAR_STEMS = tuple(f"data_batch_{i}.bin" for i in range(1, 6)) + ("test_batch.bin",)
H, W = 4, 5  # tiny IDX image size
N_TRAIN, N_TEST = 3, 2


# ---------------------------------------------------------------------------------------------
# Builders of tiny files


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    """An IDX file: big-endian int32 magic and dims, then the uint8 data."""
    magic = magic if magic is not None else (2051 if array.ndim == 3 else 2049)
    return np.array([magic, *array.shape], dtype=">i4").tobytes() + array.astype(np.uint8).tobytes()


def write(path: Path, data: bytes, gz: bool) -> Path:
    """Write ``data`` to ``path`` (``path.gz``, gzip-compressed, when ``gz``)."""
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)
    return path


def tiny_idx(seed: int = 0) -> dict[str, np.ndarray]:
    """Arrays for the four IDX files; pixels cover 0 and 255, labels cover 0 and 9."""
    rng = np.random.default_rng(seed)
    arrays = {
        IDX_STEMS[0]: rng.integers(0, 256, (N_TRAIN, H, W)),
        IDX_STEMS[1]: np.array([0, 9, 4]),
        IDX_STEMS[2]: rng.integers(0, 256, (N_TEST, H, W)),
        IDX_STEMS[3]: np.array([7, 1]),
    }
    arrays[IDX_STEMS[0]][0, 0, 0], arrays[IDX_STEMS[0]][0, 0, 1] = 0, 255
    return {k: v.astype(np.uint8) for k, v in arrays.items()}


def write_idx_dir(directory: Path, gz: bool | tuple[bool, ...] = False) -> dict[str, np.ndarray]:
    directory.mkdir(parents=True, exist_ok=True)
    arrays = tiny_idx()
    flags = gz if isinstance(gz, tuple) else (gz,) * 4
    for (stem, array), flag in zip(arrays.items(), flags, strict=True):
        write(directory / stem, idx_bytes(array), flag)
    return arrays


def cifar_bytes(labels: np.ndarray, images: np.ndarray) -> bytes:
    """Records of 1 label byte + 3072 image bytes (R, G, B planes, row-major)."""
    flat = images.astype(np.uint8).reshape(len(labels), -1)
    return np.concatenate([labels.astype(np.uint8)[:, None], flat], axis=1).tobytes()


def write_cifar_dir(directory: Path, gz: bool = False) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    batches = {}
    for i, stem in enumerate(CIFAR_STEMS):
        n = 3 if stem == "test_batch.bin" else 2
        labels = (np.arange(n) + i) % 10
        images = rng.integers(0, 256, (n, 3, 32, 32))
        write(directory / stem, cifar_bytes(labels, images), gz)
        batches[stem] = (labels, images)
    return batches


def unit(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array.astype(np.float32)) / 255


# ---------------------------------------------------------------------------------------------
# digits


def test_digits_split_is_fixed_and_stratified(tmp_path: Path) -> None:
    ds = load_dataset("digits", tmp_path / "ignored")
    again = load_dataset("digits")
    assert (ds.name, ds.classes, ds.in_shape) == ("digits", 10, (1, 8, 8))
    assert ds.train_x.dtype == torch.float32 and ds.train_y.dtype == torch.int64
    assert len(ds.train_y) + len(ds.test_y) == 1797 and len(ds.test_y) == 355
    assert float(ds.train_x.min()) == 0.0 and float(ds.train_x.max()) == 1.0
    # every fifth example of each class is held out: test count = floor(class count / 5)
    total = torch.bincount(ds.train_y, minlength=10) + torch.bincount(ds.test_y, minlength=10)
    assert torch.equal(torch.bincount(ds.test_y, minlength=10), total // 5)
    for a, b in ((ds.train_x, again.train_x), (ds.test_x, again.test_x), (ds.test_y, again.test_y)):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# IDX: valid files


@pytest.mark.parametrize(
    "gz", [False, True, (True, False, False, True)], ids=["raw", "gz", "mixed"]
)
def test_idx_round_trip(tmp_path: Path, gz: bool | tuple[bool, ...]) -> None:
    arrays = write_idx_dir(tmp_path, gz)
    ds = load_dataset("mnist", tmp_path)
    assert (ds.name, ds.classes, ds.in_shape) == ("mnist", 10, (1, H, W))
    assert ds.train_x.shape == (N_TRAIN, 1, H, W) and ds.train_x.dtype == torch.float32
    assert torch.equal(ds.train_x[:, 0], unit(arrays[IDX_STEMS[0]]))  # exact: k / 255 in float32
    assert torch.equal(ds.test_x[:, 0], unit(arrays[IDX_STEMS[2]]))
    assert ds.train_y.tolist() == [0, 9, 4] and ds.test_y.tolist() == [7, 1]
    assert ds.train_y.dtype == torch.int64
    assert float(ds.train_x.min()) == 0.0 and float(ds.train_x.max()) == 1.0


def test_gzip_content_is_detected_without_the_suffix(tmp_path: Path) -> None:
    write_idx_dir(tmp_path, gz=True)
    for stem in IDX_STEMS:
        (tmp_path / f"{stem}.gz").rename(tmp_path / stem)
    assert load_dataset("mnist", tmp_path).test_y.tolist() == [7, 1]


def test_idx_found_in_subdirectory_named_after_dataset(tmp_path: Path) -> None:
    write_idx_dir(tmp_path / "fashion-mnist", gz=True)
    ds = load_dataset("Fashion_MNIST", tmp_path)
    assert ds.name == "fashion-mnist" and len(ds.train_y) == N_TRAIN


def test_env_var_is_the_default_data_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_idx_dir(tmp_path / "kmnist")
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    assert load_dataset("kmnist").name == "kmnist"


def test_repr_is_short_and_dataset_checks_its_tensors() -> None:
    x, y = torch.zeros(2, 1, 3, 3), torch.zeros(2, dtype=torch.int64)
    assert repr(Dataset("t", x, y, x, y, 10)) == (
        "Dataset(name='t', train=2, test=2, in_shape=(1, 3, 3), classes=10)"
    )
    with pytest.raises(DataError, match="train_x must be a float32"):
        Dataset("t", x.double(), y, x, y, 10)
    with pytest.raises(DataError, match="test_y must be an int64"):
        Dataset("t", x, y, x, y[:1], 10)


# ---------------------------------------------------------------------------------------------
# IDX: errors


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(DataError, match="dataset must be one of 'digits', 'mnist'") as err:
        load_dataset("imagenet")
    assert all(name in str(err.value) for name in DATASETS)


def test_missing_or_unset_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match="does not exist") as err:
        load_dataset("mnist", missing)
    assert str(missing) in str(err.value)
    monkeypatch.delenv(DATA_ENV, raising=False)
    with pytest.raises(DataError, match=f"no data directory was given.*{DATA_ENV}"):
        load_dataset("cifar10")


def test_missing_file_lists_the_names_looked_for(tmp_path: Path) -> None:
    write_idx_dir(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError) as err:
        load_dataset("mnist", tmp_path)
    msg = str(err.value)
    assert "t10k-labels-idx1-ubyte" in msg and "NAME.gz" in msg and str(tmp_path) in msg
    assert "train-images" not in msg  # only the missing file is named


def _swap_in_labels(d: Path) -> None:
    write(d / IDX_STEMS[0], idx_bytes(np.zeros(N_TRAIN, np.uint8)), gz=False)


def _bad_magic(d: Path) -> None:
    write(d / IDX_STEMS[2], idx_bytes(np.zeros((N_TEST, H, W)), magic=1234), gz=False)


def _truncate_images(d: Path) -> None:
    write(d / IDX_STEMS[0], idx_bytes(tiny_idx()[IDX_STEMS[0]])[:-7], gz=False)


def _lengthen_images(d: Path) -> None:
    write(d / IDX_STEMS[0], idx_bytes(tiny_idx()[IDX_STEMS[0]]) + b"\0\0\0", gz=False)


def _short_header(d: Path) -> None:
    write(d / IDX_STEMS[1], b"\0\0\x08\x01\0\0", gz=False)


def _count_mismatch(d: Path) -> None:
    write(d / IDX_STEMS[1], idx_bytes(np.array([1, 2, 3, 4])), gz=False)


def _label_out_of_range(d: Path) -> None:
    write(d / IDX_STEMS[3], idx_bytes(np.array([3, 10])), gz=False)


def _corrupt_gzip(d: Path) -> None:
    (d / IDX_STEMS[2]).unlink()
    data = gzip.compress(idx_bytes(tiny_idx()[IDX_STEMS[2]]))
    (d / f"{IDX_STEMS[2]}.gz").write_bytes(data[: len(data) // 2])  # stream cut short


def _gz_name_raw_content(d: Path) -> None:
    (d / IDX_STEMS[3]).rename(d / f"{IDX_STEMS[3]}.gz")


def _test_size_differs(d: Path) -> None:
    write(d / IDX_STEMS[2], idx_bytes(np.zeros((N_TEST, H + 1, W))), gz=False)


IDX_BREAKS: list[tuple[Callable[[Path], None], str, tuple[str, ...]]] = [
    (_swap_in_labels, IDX_STEMS[0], ("wrong magic", "expected 2051", "found 2049", "swapped")),
    (_bad_magic, IDX_STEMS[2], ("wrong magic number", "expected 2051", "found 1234")),
    (_truncate_images, IDX_STEMS[0], ("truncated", f"expected {16 + N_TRAIN * H * W} bytes",
                                      f"found {16 + N_TRAIN * H * W - 7} bytes", "4x5")),
    (_lengthen_images, IDX_STEMS[0], ("too long", f"found {16 + N_TRAIN * H * W + 3} bytes")),
    (_short_header, IDX_STEMS[1], ("truncated", "header of 8 bytes", "only 6 bytes")),
    (_count_mismatch, IDX_STEMS[1], ("holds 3 images", "holds 4 labels")),
    (_label_out_of_range, IDX_STEMS[3], ("label 10 at index 1", "0..9")),
    (_corrupt_gzip, IDX_STEMS[2], ("corrupt gzip",)),
    (_gz_name_raw_content, IDX_STEMS[3], ("not gzip-compressed", "1f 8b")),
    (_test_size_differs, IDX_STEMS[2], ("5x5 images", "4x5 images")),
]  # fmt: skip


@pytest.mark.parametrize(
    ("breaker", "stem", "fragments"), IDX_BREAKS, ids=[b.__name__[1:] for b, _, _ in IDX_BREAKS]
)
def test_broken_idx_file_is_named_with_the_problem(
    tmp_path: Path, breaker: Callable[[Path], None], stem: str, fragments: tuple[str, ...]
) -> None:
    write_idx_dir(tmp_path)
    breaker(tmp_path)
    with pytest.raises(DataError) as err:
        load_dataset("mnist", tmp_path)
    msg = str(err.value)
    assert str(tmp_path / stem) in msg
    for fragment in fragments:
        assert fragment in msg, f"{fragment!r} not in {msg!r}"
    assert isinstance(err.value, ValueError)


# ---------------------------------------------------------------------------------------------
# CIFAR-10 binary


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_cifar_round_trip(tmp_path: Path, gz: bool) -> None:
    batches = write_cifar_dir(tmp_path / "cifar-10-batches-bin", gz)
    ds = load_dataset("cifar10", tmp_path)
    assert (ds.name, ds.classes, ds.in_shape) == ("cifar10", 10, (3, 32, 32))
    train = [batches[s] for s in CIFAR_STEMS[:5]]
    assert ds.train_y.tolist() == np.concatenate([lab for lab, _ in train]).tolist()
    assert torch.equal(ds.train_x, unit(np.concatenate([img for _, img in train])))
    labels, images = batches["test_batch.bin"]
    assert ds.test_y.tolist() == labels.tolist() and torch.equal(ds.test_x, unit(images))


def test_cifar_record_layout_is_label_then_rgb_planes_row_major(tmp_path: Path) -> None:
    write_cifar_dir(tmp_path)
    red = np.arange(1024) % 256  # red[r * 32 + c] = (r * 32 + c) % 256
    record = np.concatenate([[7], red, np.full(1024, 100), np.full(1024, 200)]).astype(np.uint8)
    write(tmp_path / "test_batch.bin", record.tobytes(), gz=False)
    ds = load_dataset("cifar10", tmp_path)
    x = ds.test_x[0] * 255  # (3, 32, 32)
    assert ds.test_y.tolist() == [7]
    assert float(x[0, 0, 1]) == 1.0 and float(x[0, 1, 0]) == 32.0 and float(x[0, 2, 3]) == 67.0
    assert bool((x[1] == 100).all()) and bool((x[2] == 200).all())


def test_cifar_missing_file_names_it_and_the_binary_version(tmp_path: Path) -> None:
    write_cifar_dir(tmp_path / "cifar10")
    (tmp_path / "cifar10" / "data_batch_3.bin").unlink()
    with pytest.raises(DataError) as err:
        load_dataset("cifar10", tmp_path)
    msg = str(err.value)
    assert msg.startswith(f"Cannot find the 'cifar10' file(s) data_batch_3.bin in {tmp_path}")
    assert "binary version" in msg


@pytest.mark.parametrize(
    ("content", "fragments"),
    [
        (cifar_bytes(np.array([1, 2]), np.zeros((2, 3, 32, 32)))[:-10],
         ("not a multiple of the 3073-byte record", "6136 bytes", "1 whole records")),
        (cifar_bytes(np.array([1, 12]), np.zeros((2, 3, 32, 32))),
         ("label 12 at index 1", "0..9")),
        (b"", ("is empty",)),
    ],
    ids=["truncated", "label", "empty"],
)  # fmt: skip
def test_broken_cifar_file_is_named_with_the_problem(
    tmp_path: Path, content: bytes, fragments: tuple[str, ...]
) -> None:
    write_cifar_dir(tmp_path)
    write(tmp_path / "data_batch_4.bin", content, gz=False)
    with pytest.raises(DataError) as err:
        load_dataset("cifar10", tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "data_batch_4.bin") in msg
    for fragment in fragments:
        assert fragment in msg, f"{fragment!r} not in {msg!r}"


# ---------------------------------------------------------------------------------------------
# standardize


def _random_dataset(seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    scale = torch.tensor([0.5, 2.0, 0.1]).view(1, 3, 1, 1)
    shift = torch.tensor([0.1, -3.0, 7.0]).view(1, 3, 1, 1)
    train_x = torch.rand(50, 3, 6, 7, generator=g) * scale + shift
    test_x = torch.rand(20, 3, 6, 7, generator=g) * scale + shift
    y = torch.zeros(50, dtype=torch.int64)
    return Dataset("t", train_x, y, test_x, y[:20], 10)


def test_channel_stats_match_float64_reference_across_chunks() -> None:
    x = _random_dataset().train_x
    mean, std = channel_stats(x, chunk_elements=100)  # 100 // 126 -> one image per chunk
    ref_var, ref_mean = torch.var_mean(x.double(), dim=(0, 2, 3), correction=0)
    torch.testing.assert_close(mean, ref_mean, rtol=0, atol=1e-12)
    torch.testing.assert_close(std, ref_var.sqrt(), rtol=0, atol=1e-10)


def test_standardize_uses_train_statistics_for_both_splits() -> None:
    ds = _random_dataset()
    before = ds.train_x.clone()
    z = standardize(ds)
    mean, std = channel_stats(z.train_x)
    # float32 rounding of x ~ 7 (4e-7) divided by that channel's std (0.029) is ~1.5e-5
    torch.testing.assert_close(mean, torch.zeros(3, dtype=torch.float64), rtol=0, atol=2e-5)
    torch.testing.assert_close(std, torch.ones(3, dtype=torch.float64), rtol=0, atol=2e-5)
    var, m = torch.var_mean(ds.train_x.double(), dim=(0, 2, 3), correction=0)
    expected = (ds.test_x.double() - m.view(1, 3, 1, 1)) / var.sqrt().view(1, 3, 1, 1)
    torch.testing.assert_close(z.test_x.double(), expected, rtol=0, atol=5e-5)
    assert torch.equal(ds.train_x, before) and z.train_y is ds.train_y
    assert z.test_x.dtype == torch.float32 and (z.name, z.classes) == ("t", 10)


def test_standardize_rejects_a_constant_channel() -> None:
    ds = _random_dataset()
    x = ds.train_x.clone()
    x[:, 1] = 0.5
    with pytest.raises(DataError, match=r"channel\(s\) \[1\]"):
        standardize(Dataset("t", x, ds.train_y, ds.test_x, ds.test_y, 10))


# ---------------------------------------------------------------------------------------------
# download (file:// mirrors only)


def _idx_mirror(directory: Path) -> str:
    directory.mkdir()
    for stem, array in tiny_idx().items():
        write(directory / stem, idx_bytes(array), gz=True)
    return directory.as_uri() + "/"


def test_download_idx_from_a_file_mirror(tmp_path: Path) -> None:
    mirror = _idx_mirror(tmp_path / "mirror")
    dead = (tmp_path / "no-such-mirror").as_uri()
    dest = download_dataset("kmnist", tmp_path / "data", mirrors=[dead, mirror], verify=False)
    assert dest == tmp_path / "data" / "kmnist"
    assert sorted(p.name for p in dest.iterdir()) == sorted(f"{s}.gz" for s in IDX_STEMS)
    assert load_dataset("kmnist", tmp_path / "data").train_y.tolist() == [0, 9, 4]
    # present files are not fetched again, so a dead mirror is fine now
    download_dataset("kmnist", tmp_path / "data", mirrors=[dead], verify=False)


def test_download_checks_the_published_md5(tmp_path: Path) -> None:
    mirror = _idx_mirror(tmp_path / "mirror")
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz.*does not match the published"):
        download_dataset("mnist", tmp_path / "data", mirrors=[mirror])
    assert not list((tmp_path / "data" / "mnist").iterdir())  # no partial file left behind


def test_download_cifar_extracts_only_the_batches(tmp_path: Path) -> None:
    src = tmp_path / "src"
    write_cifar_dir(src)
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    with tarfile.open(mirror / "cifar-10-binary.tar.gz", "w:gz") as tar:
        for stem in CIFAR_STEMS:
            tar.add(src / stem, arcname=f"cifar-10-batches-bin/{stem}")
        evil = tarfile.TarInfo("../../escape.txt")
        evil.size = 3
        tar.addfile(evil, io.BytesIO(b"bad"))
    dest = download_dataset("cifar10", tmp_path / "data", mirrors=[mirror.as_uri()], verify=False)
    assert sorted(p.name for p in dest.iterdir()) == sorted(CIFAR_STEMS)
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "data/escape.txt").exists()
    assert len(load_dataset("cifar10", tmp_path / "data").test_y) == 3


# ---------------------------------------------------------------------------------------------
# The real data sets (skipped when absent)


@pytest.mark.skipif(not (DATA_ROOT / "mnist").is_dir(), reason="no MNIST files in the data root")
def test_real_mnist() -> None:
    ds = load_dataset("mnist", DATA_ROOT)
    assert ds.train_x.shape == (60000, 1, 28, 28) and ds.test_x.shape == (10000, 1, 28, 28)
    assert ds.train_y[:5].tolist() == [5, 0, 4, 1, 9]
    counts = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert torch.bincount(ds.train_y).tolist() == counts
    mean, std = channel_stats(ds.train_x)
    assert abs(float(mean[0]) - 0.1307) < 1e-4 and abs(float(std[0]) - 0.3081) < 1e-4


@pytest.mark.skipif(not (DATA_ROOT / "cifar10").is_dir(), reason="no CIFAR-10 in the data root")
def test_real_cifar10() -> None:
    ds = load_dataset("cifar10", DATA_ROOT)
    assert ds.train_x.shape == (50000, 3, 32, 32) and ds.test_x.shape == (10000, 3, 32, 32)
    assert ds.train_y[:5].tolist() == [6, 9, 9, 4, 1]
    assert ds.test_y[:5].tolist() == [3, 8, 8, 0, 6]
    assert torch.bincount(ds.train_y).tolist() == [5000] * 10
    assert torch.bincount(ds.test_y).tolist() == [1000] * 10
    mean, std = channel_stats(ds.train_x)
    torch.testing.assert_close(
        mean.float(), torch.tensor([0.4914, 0.4822, 0.4465]), rtol=0, atol=1e-4
    )
    torch.testing.assert_close(
        std.float(), torch.tensor([0.2470, 0.2435, 0.2616]), rtol=0, atol=1e-4
    )


def _manual_shift(img, dy, dx):
    """img (C, H, W) moved down by dy and right by dx, edge pixels repeated."""
    h, w = img.shape[1:]
    rows = (torch.arange(h) - dy).clamp(0, h - 1)
    cols = (torch.arange(w) - dx).clamp(0, w - 1)
    return img[:, rows][:, :, cols]


def test_hflip_mirrors_about_half_of_the_images():
    from forwardonly.data.augment import random_hflip

    x = torch.rand(2000, 3, 4, 5)
    out = random_hflip(x, torch.Generator().manual_seed(0))
    flipped = (out == x.flip(-1)).flatten(1).all(1)
    kept = (out == x).flatten(1).all(1)
    assert bool((flipped | kept).all())
    assert abs(flipped.float().mean().item() - 0.5) < 0.05  # 4.5 standard errors


def test_shift_translates_each_image_by_at_most_two_pixels():
    from forwardonly.data.augment import random_shift

    x = torch.rand(300, 2, 7, 6)
    out = random_shift(x, torch.Generator().manual_seed(1))
    seen = set()
    for img, res in zip(x, out, strict=True):
        match = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                 if torch.equal(_manual_shift(img, dy, dx), res)]
        assert len(match) == 1
        seen.add(match[0])
    assert len(seen) == 25  # every offset occurs


def test_augmentation_is_seeded_and_checked():
    from forwardonly.data.augment import augmenter

    x = torch.rand(8, 1, 5, 5)
    a = augmenter(["hflip", "shift"], torch.Generator().manual_seed(3))(x)
    b = augmenter(["hflip", "shift"], torch.Generator().manual_seed(3))(x)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="unknown augmentation"):
        augmenter(["rotate"], torch.Generator())
    with pytest.raises(ValueError, match=r"image batches \(B, C, H, W\)"):
        augmenter(["hflip"], torch.Generator())(torch.rand(8, 25))
