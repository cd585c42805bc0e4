"""Fetch a data set from its public mirrors (needs internet; never called by the loaders).

``download_dataset("mnist", "data")`` writes the four IDX files to ``data/mnist/``, checks the
published MD5 of each, and parses them once; afterwards ``load_dataset("mnist", "data")``
finds them. CIFAR-10 comes as one archive (``cifar-10-binary.tar.gz``), from which only the
six ``.bin`` batch files are extracted (by base name, so no member can write outside the
target directory); the archive is then deleted.

Files already present (raw or ``.gz``) are not fetched again. Every URL is read with
``urllib``, so ``file://`` mirrors work too (the tests use them).
"""

from __future__ import annotations

import hashlib
import shutil
import tarfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from forwardonly.data.cifar import TEST_FILES, TRAIN_FILES, load_cifar10
from forwardonly.data.idx import DataError, find_file, load_idx


@dataclass(frozen=True)
class Source:
    """Where a data set lives: mirror base URLs and the published MD5 of each file there."""

    mirrors: tuple[str, ...]
    md5: dict[str, str]
    archive_members: tuple[str, ...] = ()  # non-empty: the one file is a .tar.gz of these


# Published checksums of the compressed files, as their authors (and torchvision) list them.
SOURCES: dict[str, Source] = {
    "mnist": Source(
        mirrors=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",
            "https://storage.googleapis.com/cvdf-datasets/mnist/",
        ),
        md5={
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
    ),
    "fashion-mnist": Source(
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        md5={
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
    ),
    "kmnist": Source(
        mirrors=("http://codh.rois.ac.jp/kmnist/dataset/kmnist/",),
        md5={
            "train-images-idx3-ubyte.gz": "bdb82020997e1d708af4cf47b453dcf7",
            "train-labels-idx1-ubyte.gz": "e144d726b3acfaa3e44228e80efcd344",
            "t10k-images-idx3-ubyte.gz": "5c965bf0a639b31b8f53240b1b52f4d7",
            "t10k-labels-idx1-ubyte.gz": "7320c461ea6c1c855c0b718fb2a4b134",
        },
    ),
    "cifar10": Source(
        mirrors=("https://www.cs.toronto.edu/~kriz/",),
        md5={"cifar-10-binary.tar.gz": "c32a1d4ab5d03f1284b67883e8d87530"},
        archive_members=TRAIN_FILES + TEST_FILES,
    ),
}


def download_dataset(
    name: str,
    root: str | Path,
    *,
    mirrors: Sequence[str] | None = None,
    verify: bool = True,
    timeout: float = 60.0,
) -> Path:
    """Download data set ``name`` into ``root/name`` and check it.

    Arguments:
        name: one of ``"mnist"``, ``"fashion-mnist"``, ``"kmnist"``, ``"cifar10"``.
        root: data root; the files go to ``root/name`` (created if needed).
        mirrors: base URLs to try in order instead of the built-in ones (each gets the file
            name appended), e.g. a local ``file://`` copy.
        verify: compare each downloaded file with its published MD5.
        timeout: seconds to wait on each connection.

    Returns:
        The directory holding the files; pass ``root`` or it to ``load_dataset``.
    """
    if name not in SOURCES:
        valid = ", ".join(repr(n) for n in SOURCES)
        raise DataError(f"download_dataset name must be one of {valid}, got {name!r}.")
    source = SOURCES[name]
    dest = Path(root).expanduser() / name
    dest.mkdir(parents=True, exist_ok=True)
    bases = tuple(mirrors) if mirrors is not None else source.mirrors
    if source.archive_members:
        if any(find_file(dest, m) is None for m in source.archive_members):
            (archive,) = source.md5
            path = _fetch(archive, bases, dest, source.md5[archive] if verify else None, timeout)
            _extract_members(path, source.archive_members, dest)
            path.unlink()
        load_cifar10(dest)
    else:
        for file, md5 in source.md5.items():
            if find_file(dest, file.removesuffix(".gz")) is None:
                _fetch(file, bases, dest, md5 if verify else None, timeout)
        load_idx(name, dest)
    return dest


def _fetch(file: str, bases: Sequence[str], dest: Path, md5: str | None, timeout: float) -> Path:
    """Download ``file`` from the first mirror that serves it; check its MD5 if given."""
    target = dest / file
    partial = dest / f"{file}.part"
    failures = []
    for base in bases:
        url = base.rstrip("/") + "/" + file
        digest = hashlib.md5(usedforsecurity=False)
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response, partial.open("wb") as f:
                while chunk := response.read(1 << 20):
                    digest.update(chunk)
                    f.write(chunk)
        except (urllib.error.URLError, OSError) as err:
            failures.append(f"{url}: {getattr(err, 'reason', err)}")
            partial.unlink(missing_ok=True)
            continue
        if md5 is not None and digest.hexdigest() != md5:
            failures.append(f"{url}: MD5 {digest.hexdigest()} does not match the published {md5}")
            partial.unlink(missing_ok=True)
            continue
        partial.replace(target)
        return target
    raise DataError(
        f"Could not download {file}: " + "; ".join(failures) + ". Check the internet "
        f"connection, or fetch the file by hand into {dest}."
    )


def _extract_members(archive: Path, members: Sequence[str], dest: Path) -> None:
    """Copy the regular files of ``archive`` whose base name is in ``members`` into ``dest``."""
    wanted = set(members)
    try:
        with tarfile.open(archive, "r:*") as tar:
            for info in tar:
                base = Path(info.name).name
                if info.isfile() and base in wanted:
                    source = tar.extractfile(info)
                    assert source is not None  # regular files always have contents
                    with source, (dest / base).open("wb") as out:
                        shutil.copyfileobj(source, out)
                    wanted.discard(base)
    except (tarfile.TarError, EOFError, OSError) as err:
        raise DataError(
            f"{archive} is not a readable tar archive ({err}). Download it again."
        ) from err
    if wanted:
        raise DataError(
            f"{archive} lacks the file(s) {', '.join(sorted(wanted))}. It is not the CIFAR-10 "
            f"binary version (cifar-10-binary.tar.gz); download that one."
        )
