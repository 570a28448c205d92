"""The image datasets training and evaluation read: image files (an ImageFolder tree, or the files that
image_files.py finds for training), or the Fashion-MNIST IDX files.

All give `(transform(rgb_pil_image), label)` with `.targets` and `.classes`, so the rest of the code never asks
which kind it holds. Bad input fails early with one line that names the missing or corrupt file, because a
stack trace from deep inside a data-loader worker is the usual way these mistakes surface otherwise.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import warnings
from typing import Any, Callable, Optional, Sized

import numpy as np
import torch
import torchvision
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from sparo_dino.io import atomic

DATASETS: tuple[str, ...] = ("imagefolder", "fashion_mnist")
# Where `apt-get install dataset-fashion-mnist` (Debian/Ubuntu) puts the IDX files.
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES: tuple[str, ...] = tuple(torchvision.datasets.FashionMNIST.classes)
# Fashion-MNIST's file prefix for each accepted split name; it has no val split, so val means its test set.
_FASHION_SPLITS = {None: "train", "train": "train", "val": "t10k", "test": "t10k"}
# IDX header: two zero bytes, a type code (0x08 = unsigned byte), the number of dimensions; sizes are big endian.
_IDX_UBYTE = 0x08
_GZIP_MAGIC = b"\x1f\x8b"

Transform = Optional[Callable[[Image.Image], Any]]


class BadImageError(OSError):
    """An image file that PIL cannot decode; the message names the file."""


def load_rgb_image(path: str) -> Image.Image:
    """Decode `path` fully into an RGB image (grayscale is replicated to 3 channels).

    Decoding here, not lazily later, is what lets a truncated file fail with its own name attached."""
    try:
        with open(path, "rb") as handle:
            return Image.open(handle).convert("RGB")
    except UnidentifiedImageError as error:  # its message would repeat the path inside a file object's repr
        raise BadImageError(f"cannot read image {path}: not in an image format PIL can decode") from error
    except Exception as error:  # PIL raises many unrelated types for bad files; all mean "unreadable image"
        raise BadImageError(f"cannot read image {path}: {type(error).__name__}: {error}") from error


class CheckedImages(Dataset):
    """Images at known paths whose unreadable files either stop the run naming the file, or are replaced and counted.

    `samples` is a list of (path, label), label -1 for unlabeled images. With `skip_bad_images`, sample i falls back
    to the next readable sample (i+1, i+2, ... wrapping), so the replacement depends only on i and the file
    contents, never on worker count or order. `bad_images` lists the unreadable files this process met (each
    data-loader worker keeps its own list; every file is also warned about once per process, so workers' findings
    reach the log).
    """

    def __init__(self, root: str, samples: list[tuple[str, int]], classes: list[str], transform: Transform = None,
                 skip_bad_images: bool = False) -> None:
        self.root = root
        self.samples = samples
        self.classes = classes
        self.transform = transform
        self.skip_bad_images = skip_bad_images
        self.loader: Callable[[str], Image.Image] = load_rgb_image
        self.bad_images: list[str] = []

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        for offset in range(len(self.samples)):
            path, target = self.samples[(index + offset) % len(self.samples)]
            try:
                image = self.loader(path)
            except BadImageError as error:
                if not self.skip_bad_images:
                    raise
                self._record_bad(path, error)
                continue
            return (self.transform(image) if self.transform is not None else image), target
        raise BadImageError(f"no readable image in {self.root} (all {len(self.samples)} files failed to decode)")

    def _record_bad(self, path: str, error: BadImageError) -> None:
        if path not in self.bad_images:
            self.bad_images.append(path)
            warnings.warn(f"skipping unreadable image ({error}); {len(self.bad_images)} skipped so far",
                          RuntimeWarning, stacklevel=3)


class CheckedImageFolder(CheckedImages):
    """torchvision's ImageFolder (same classes, samples and order), with CheckedImages' handling of bad files and
    a one-line error for a folder without class sub-folders."""

    def __init__(self, root: str, transform: Transform = None, skip_bad_images: bool = False) -> None:
        root = os.path.expanduser(root)
        require_class_folders(root)
        classes, class_to_idx = find_classes(root)
        samples = make_dataset(root, class_to_idx, IMG_EXTENSIONS)
        super().__init__(root, samples, classes, transform, skip_bad_images)


def require_class_folders(root: str) -> None:
    """Raise a one-line ValueError unless `root` has sub-folders: labelled images are `root/<class>/<image>`, and
    what reads them (k-NN, linear probe, the k-NN monitor) has no other source of labels."""
    with os.scandir(root) as entries:
        if any(entry.is_dir() for entry in entries):
            return
    raise ValueError(f"{root} has no class sub-folders: k-NN and linear evaluation need labelled images, one "
                     f"sub-folder per class ({root}/<class>/<image>); a folder of unlabeled images can only be "
                     f"trained on")


def read_idx_ubyte(path: str, ndim: int) -> np.ndarray:
    """An unsigned-byte IDX array (the MNIST file format) with `ndim` dimensions, from a plain or gzip file.

    Compression is detected from the content, not the name, so renamed or decompressed copies work too."""
    with open(path, "rb") as handle:
        data = handle.read()
    if data[:2] == _GZIP_MAGIC:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as error:
            raise ValueError(f"corrupt gzip IDX file {path}: {error}") from error
    header = 4 + 4 * ndim
    if len(data) < header or data[0:2] != b"\0\0" or data[2] != _IDX_UBYTE or data[3] != ndim:
        raise ValueError(f"{path} is not an unsigned-byte IDX file with {ndim} dimension(s) "
                         f"(header {data[:4].hex() or 'empty'}, expected 0000080{ndim})")
    shape = tuple(int(size) for size in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape))
    if len(data) != expected:
        raise ValueError(f"IDX file {path} holds {len(data)} bytes, its header {shape} needs {expected} (truncated?)")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def write_idx_ubyte(path: str, array: np.ndarray) -> None:
    """Write an unsigned-byte IDX file (plain), the inverse of read_idx_ubyte. Through a temporary file and a
    rename, so that a reader (another driver sharing the folder) sees the old file or the new one, never half."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, _IDX_UBYTE, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    with atomic.replaced(path, "wb") as handle:
        handle.write(header + array.tobytes())


def write_fashion_mnist_subset(source: str, destination: str, num_train: int, num_test: int) -> str:
    """Copy the first images of each Fashion-MNIST split into a new IDX folder.

    Short CPU demos train and evaluate on a subset; writing it as real IDX files keeps every entry point's
    --data_path semantics instead of adding subset flags to each. The files are already shuffled, so the first
    images cover all classes.
    """
    os.makedirs(destination, exist_ok=True)
    for split, count in (("train", num_train), ("t10k", num_test)):
        images = read_idx_ubyte(_find_idx_file(source, f"{split}-images-idx3-ubyte"), 3)
        labels = read_idx_ubyte(_find_idx_file(source, f"{split}-labels-idx1-ubyte"), 1)
        write_idx_ubyte(os.path.join(destination, f"{split}-images-idx3-ubyte"), images[:count])
        write_idx_ubyte(os.path.join(destination, f"{split}-labels-idx1-ubyte"), labels[:count])
    return destination


def _find_idx_file(folder: str, name: str) -> str:
    for candidate in (name, name + ".gz"):
        if os.path.isfile(os.path.join(folder, candidate)):
            return os.path.join(folder, candidate)
    raise FileNotFoundError(f"Fashion-MNIST file {name}[.gz] not found in {folder} "
                            f"(expected the 4 IDX files train|t10k-images-idx3-ubyte, train|t10k-labels-idx1-ubyte)")


class FashionMNISTDataset(Dataset):
    """One split of Fashion-MNIST from its IDX files, served as 3-channel RGB PIL images.

    `data` keeps the raw (N, 28, 28) uint8 pixels for baselines that want them without decoding PIL images."""

    def __init__(self, folder: str, split: str | None = None, transform: Transform = None) -> None:
        if split not in _FASHION_SPLITS:
            raise ValueError(f"Fashion-MNIST split must be one of train, val, test (or None = train), got {split!r}")
        prefix = _FASHION_SPLITS[split]
        images_path = _find_idx_file(folder, f"{prefix}-images-idx3-ubyte")
        labels_path = _find_idx_file(folder, f"{prefix}-labels-idx1-ubyte")
        images = read_idx_ubyte(images_path, ndim=3)
        labels = read_idx_ubyte(labels_path, ndim=1)
        if len(images) != len(labels):
            raise ValueError(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels")
        if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
            raise ValueError(f"{labels_path} has label {labels.max()}, Fashion-MNIST has "
                             f"{len(FASHION_MNIST_CLASSES)} classes")
        self.root = folder
        self.split = prefix
        self.transform = transform
        self.data = torch.from_numpy(images.copy())
        self.targets: list[int] = labels.astype(np.int64).tolist()
        self.classes: list[str] = list(FASHION_MNIST_CLASSES)

    def __len__(self) -> int:
        return len(self.targets)

    def fingerprint(self) -> str:
        """sha256 of the pixels and labels (47 MB for the training split: well under a second)."""
        digest = hashlib.sha256(self.data.numpy().tobytes())
        digest.update(np.asarray(self.targets, dtype=np.int64).tobytes())
        return "sha256:" + digest.hexdigest()

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = Image.fromarray(self.data[index].numpy()).convert("RGB")
        return (self.transform(image) if self.transform is not None else image), self.targets[index]


def _fashion_mnist_folder(path: str) -> str:
    """`path` itself, or torchvision's download layout below it (`path/FashionMNIST/raw`)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"Fashion-MNIST folder {path} does not exist (expected the IDX files there; on "
                                f"Debian/Ubuntu `apt-get install dataset-fashion-mnist` puts them in "
                                f"{FASHION_MNIST_DIR})")
    torchvision_layout = os.path.join(path, "FashionMNIST", "raw")
    has_own_files = any(name.startswith("train-images-idx3-ubyte") for name in os.listdir(path))
    return torchvision_layout if not has_own_files and os.path.isdir(torchvision_layout) else path


def image_folder_root(path: str, split: str | None) -> str:
    """The ImageFolder root of `split` (None: `path` itself) below `path`; an error naming what is missing."""
    layout = "<class>/<image>" if split is None else f"{split}/<class>/<image>"
    if os.path.isfile(path):
        raise ValueError(f"dataset folder {path} is a file: a list of images is for training only, labelled images "
                         f"are an ImageFolder tree {layout}")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"dataset folder {path} does not exist (expected an ImageFolder tree {layout})")
    if split is None:
        return path
    root = os.path.join(path, split)
    if not os.path.isdir(root):
        found = sorted(name for name in os.listdir(path) if os.path.isdir(os.path.join(path, name)))
        raise FileNotFoundError(f"split folder {root} does not exist (expected {path}/{split}/<class>/<image>; "
                                f"subfolders found: {', '.join(found) or 'none'})")
    return root


def build_dataset(kind: str, path: str, split: str | None = None, transform: Transform = None,
                  skip_bad_images: bool = False) -> Dataset:
    """The dataset `kind` (one of DATASETS) at `path`.

    imagefolder: root is `path`, or `path/split` when a split ("train"/"val") is given; unreadable images raise
    BadImageError naming the file unless `skip_bad_images`. fashion_mnist: `path` holds the IDX files (plain or
    gzip); split None/"train" is the training set, "val"/"test" the test set.
    """
    if kind == "imagefolder":
        return CheckedImageFolder(image_folder_root(path, split), transform, skip_bad_images)
    if kind == "fashion_mnist":
        return FashionMNISTDataset(_fashion_mnist_folder(path), split, transform)
    raise ValueError(f"unknown dataset kind {kind!r}; choose one of: {', '.join(DATASETS)}")


def require_min_size(dataset: Sized, n: int, what: str) -> None:
    """Raise when `dataset` has fewer than `n` samples: a drop_last loader would run zero steps and say nothing."""
    if len(dataset) < n:
        raise ValueError(f"{what} has {len(dataset)} samples, fewer than one global batch of {n}; "
                         f"use a smaller batch size or more data")
