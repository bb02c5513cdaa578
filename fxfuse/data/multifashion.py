"""MultiFashion: two Fashion-MNIST items overlapped in one image, a two-task vision set.

Built like MultiMNIST. On a 36x36 canvas one 28x28 item sits at the top left (rows
and columns 0..27), a second at the bottom right (rows and columns 8..35); where
they overlap the brighter pixel wins. Task ``left`` is the first item's class, task
``right`` the second's. Every item of a split is the left item of exactly one image
and the right item of exactly one other, paired by a seeded permutation inside the
split, so the images of each split only mix that split's items: validation items
are drawn from Fashion-MNIST's train items before pairing, and no item of a
validation image appears in a training image.
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from ._split import Dataset, Split

log = logging.getLogger("fxfuse")

DEBIAN_ROOT = Path("/usr/share/datasets/fashion-mnist")
URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"

ITEM = 28
SHIFT = 8
SIZE = ITEM + SHIFT
NUM_CLASSES = 10

# SHA-256 of the IDX content (after gunzip) of Zalando's four files. Computed from
# Debian's dataset-fashion-mnist, whose archives are recompressed (so their MD5 is not
# the one Zalando publishes) but whose content is the same; others publish the same
# content hashes for archives that match Zalando's MD5 table.
CONTENT_SHA256 = {
    "train-images-idx3-ubyte": (
        "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"
    ),
    "train-labels-idx1-ubyte": (
        "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"
    ),
    "t10k-images-idx3-ubyte": (
        "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"
    ),
    "t10k-labels-idx1-ubyte": (
        "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"
    ),
}
_PARTS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_UBYTE = 0x08


def multifashion(
    root: str | Path | None = None,
    *,
    download: bool = False,
    seed: int = 0,
    n_val: int = 10000,
) -> Dataset:
    """Build MultiFashion from the Fashion-MNIST IDX files.

    The files (``train-images-idx3-ubyte`` and the three others, gzipped or not) are
    read from ``root``; without ``root`` from Debian's ``dataset-fashion-mnist``
    (``/usr/share/datasets/fashion-mnist``), then from ``~/.cache/fxfuse``. With
    ``download=True``, missing files are fetched from Zalando's server into ``root``
    (or the cache folder) and each is checked against its known SHA-256 before use.

    The same ``seed`` gives the same images, pairs and split.

    Args:
        root: Folder holding the four IDX files.
        download: Fetch the files when they are not found.
        seed: Seed of the validation draw and of the pairing.
        n_val: Fashion-MNIST train items set aside for validation; they make as
            many validation images.

    Returns:
        The data set: inputs float32 ``[N, 1, 36, 36]`` in [0, 1]; tasks ``left`` and
        ``right`` (multiclass, 10 classes, int64 labels). Train and validation are
        made of disjoint sets of Fashion-MNIST's 60,000 train items (60,000 -
        ``n_val`` and ``n_val`` images), test of its 10,000 test items.

    Raises:
        InputError: The files are missing (and not downloaded), a download fails or
            does not match its checksum, a file is not IDX, or ``n_val`` is out of
            range.
    """
    folder = _locate(root, download)
    rng = np.random.default_rng(seed)
    items, classes = _read_part(folder, "train")
    train_items, val_items = _draw_val(len(items), n_val, rng)
    return Dataset(
        train=_to_split(*_pair(items[train_items], classes[train_items], rng)),
        val=_to_split(*_pair(items[val_items], classes[val_items], rng)),
        test=_to_split(*_pair(*_read_part(folder, "test"), rng)),
        tasks={"left": "multiclass", "right": "multiclass"},
        sparse={},
        dense=[],
        num_classes={"left": NUM_CLASSES, "right": NUM_CLASSES},
    )


def cache_folder() -> Path:
    """Where downloads go when no folder is given: ``$XDG_CACHE_HOME/fxfuse/...``."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "fxfuse" / "fashion-mnist"


def _locate(root: str | Path | None, download: bool) -> Path:
    """Return the folder holding all four files, downloading them if asked."""
    folders = [Path(root)] if root is not None else [DEBIAN_ROOT, cache_folder()]
    for folder in folders:
        if not _missing_files(folder):
            return folder
    if download:
        target = folders[0] if root is not None else cache_folder()
        _download(target)
        return target

    looked = "; ".join(
        f"{folder} lacks {', '.join(_missing_files(folder))}" for folder in folders
    )
    raise InputError(
        f"Fashion-MNIST files not found ({looked}, each gzipped or not); install "
        "Debian's dataset-fashion-mnist, or give a folder holding them (--data-root "
        "FOLDER on the command line, root= in Python, where download=True also works)"
    )


def _missing_files(folder: Path) -> list[str]:
    return [name for name in CONTENT_SHA256 if _file_path(folder, name) is None]


def _file_path(folder: Path, name: str) -> Path | None:
    for candidate in (folder / f"{name}.gz", folder / name):
        if candidate.is_file():
            return candidate
    return None


def _download(folder: Path) -> None:
    """Fetch the missing files into ``folder``, keeping only verified ones."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in _missing_files(folder):
        url = f"{URL}{name}.gz"
        log.info("downloading %s", url)
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                archive = response.read()
        except (urllib.error.URLError, OSError) as error:
            raise InputError(f"could not download {url}: {error}") from error

        digest = hashlib.sha256(_gunzip(archive, url)).hexdigest()
        if digest != CONTENT_SHA256[name]:
            raise InputError(
                f"{url} does not match its known SHA-256 (got {digest}); nothing was "
                "kept; retry, or install Debian's dataset-fashion-mnist"
            )
        partial = folder / f"{name}.gz.part"
        partial.write_bytes(archive)
        partial.replace(folder / f"{name}.gz")


def _gunzip(data: bytes, source: str | Path) -> bytes:
    try:
        return gzip.decompress(data)
    except (OSError, EOFError) as error:
        raise InputError(f"{source} is not a valid gzip file: {error}") from error


def _read_part(folder: Path, part: str) -> tuple[np.ndarray, np.ndarray]:
    """One part's items ``[N, 28, 28]`` (uint8) and classes ``[N]`` (int64)."""
    images_name, labels_name = _PARTS[part]
    items = read_idx(_file_path(folder, images_name), ndim=3)
    classes = read_idx(_file_path(folder, labels_name), ndim=1).astype(np.int64)
    if len(items) != len(classes) or items.shape[1:] != (ITEM, ITEM):
        raise InputError(
            f"Fashion-MNIST {part} files in {folder} disagree: images "
            f"{items.shape}, labels {classes.shape}; expected [N, 28, 28] and [N]"
        )
    return items, classes


def _pair(
    items: np.ndarray, classes: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Overlay each item with its partner.

    Returns:
        The uint8 canvases ``[N, 36, 36]`` and the int64 labels ``[N, 2]`` (left,
        right).
    """
    partner = pair_items(len(items), rng)
    canvas = overlay(items, partner)
    return canvas, np.stack([classes, classes[partner]], axis=1)


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read an unsigned-byte IDX file (gzipped when its name ends in ``.gz``).

    Args:
        path: The file.
        ndim: The number of dimensions it must have.

    Returns:
        A uint8 array of the shape the file's header gives.
    """
    data = path.read_bytes()
    if path.suffix == ".gz":
        data = _gunzip(data, path)
    header = 4 + 4 * ndim
    if len(data) < header or data[:4] != bytes([0, 0, _IDX_UBYTE, ndim]):
        raise InputError(
            f"{path} is not an unsigned-byte IDX file with {ndim} dimension(s)"
        )
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    if len(data) != header + int(np.prod(shape)):
        raise InputError(f"{path}: size does not match its IDX header shape {shape}")
    return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


def pair_items(n: int, rng: np.random.Generator) -> np.ndarray:
    """Choose each item's right-hand partner: the next item in a seeded cycle.

    Following one random cycle through all items means no item is paired with
    itself and every item is a right-hand partner exactly once.
    """
    order = rng.permutation(n)
    partner = np.empty(n, dtype=np.int64)
    partner[order] = np.roll(order, -1)
    return partner


def overlay(items: np.ndarray, partner: np.ndarray) -> np.ndarray:
    """Place item ``i`` top left and item ``partner[i]`` bottom right, keep the max.

    Args:
        items: uint8 ``[N, 28, 28]``.
        partner: int ``[N]``, the right-hand item of each image.

    Returns:
        uint8 ``[N, 36, 36]``.
    """
    canvas = np.zeros((len(items), SIZE, SIZE), dtype=np.uint8)
    canvas[:, :ITEM, :ITEM] = items
    right = canvas[:, SHIFT:, SHIFT:]
    np.maximum(right, items[partner], out=right)
    return canvas


def _draw_val(n: int, n_val: int, rng: np.random.Generator):
    """Shuffle ``n`` items; the last ``n_val`` are validation. Both in order."""
    if not 0 <= n_val < n:
        raise InputError(f"n_val must lie in 0..{n - 1}, got {n_val}")
    order = rng.permutation(n)
    return np.sort(order[: n - n_val]), np.sort(order[n - n_val :])


def _to_split(canvas: np.ndarray, labels: np.ndarray) -> Split:
    """Scale uint8 canvases to float32 [0, 1] images ``[N, 1, 36, 36]``."""
    images = torch.from_numpy(canvas[:, None]).to(torch.float32).div_(255)
    return Split(
        inputs=images,
        labels={
            "left": torch.from_numpy(labels[:, 0].copy()),
            "right": torch.from_numpy(labels[:, 1].copy()),
        },
    )
