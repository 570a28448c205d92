"""Datasets: ImageFolder with corrupt-image handling, Fashion-MNIST from IDX files the test writes itself (plain
and gzip), the real Debian files when installed, and one-line errors for missing or malformed input."""
from __future__ import annotations

import gzip
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_image_folder
from PIL import Image
from torchvision.datasets.mnist import read_image_file, read_label_file

from sparo_dino.data import datasets
from sparo_dino.data.datasets import (
    DATASETS,
    FASHION_MNIST_DIR,
    BadImageError,
    build_dataset,
    read_idx_ubyte,
    require_min_size,
)

# Independent reference: the class names published with Fashion-MNIST.
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------- ImageFolder

def test_imagefolder_splits_classes_targets_and_rgb_images(image_folder):
    train = build_dataset("imagefolder", image_folder, split="train")
    assert train.classes == ["class_0", "class_1", "class_2"]
    assert len(train) == 24 and train.targets == [0] * 8 + [1] * 8 + [2] * 8
    image, label = train[9]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and label == 1
    val = build_dataset("imagefolder", os.path.join(image_folder, "val"), transform=lambda im: im.size)
    assert val[0] == ((32, 32), 0)


def test_imagefolder_replicates_grayscale_to_rgb(tmp_path):
    (tmp_path / "a").mkdir()
    pixels = np.arange(64, dtype=np.uint8).reshape(8, 8)
    Image.fromarray(pixels).save(tmp_path / "a" / "gray.png")
    image, _ = build_dataset("imagefolder", str(tmp_path))[0]
    assert image.mode == "RGB" and np.array_equal(np.asarray(image), np.repeat(pixels[..., None], 3, axis=2))


def _corrupt(folder: str, truncate: bool) -> str:
    """Damage the second image of class_1 (index 9): garbage bytes, or a PNG cut in half."""
    path = os.path.join(folder, "class_1", "img_001.png")
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: len(data) // 2] if truncate else b"not an image at all")
    return path


@pytest.mark.parametrize("truncate", [False, True])
def test_corrupt_image_error_names_the_file(tmp_path, truncate):
    root = make_image_folder(tmp_path / "data")
    path = _corrupt(root, truncate)
    dataset = build_dataset("imagefolder", root)
    with pytest.raises(BadImageError) as error:
        dataset[9]
    assert one_line(error).count(path) == 1 and "<_io." not in one_line(error)  # named once, no file-object repr
    assert isinstance(dataset[8][0], Image.Image)  # neighbours still load


def test_skip_bad_images_replaces_with_next_valid_sample_and_counts(tmp_path):
    root = make_image_folder(tmp_path / "data")
    path = _corrupt(root, truncate=False)
    clean = build_dataset("imagefolder", make_image_folder(tmp_path / "clean"))
    dataset = build_dataset("imagefolder", root, transform=np.asarray, skip_bad_images=True)
    with pytest.warns(RuntimeWarning, match="img_001.png"):
        image, label = dataset[9]
    expected, expected_label = clean[10]  # same generator seed: identical files except the damaged one
    assert np.array_equal(image, np.asarray(expected)) and label == expected_label
    assert np.array_equal(dataset[9][0], image)  # deterministic
    assert dataset.bad_images == [path]  # counted once however often it is met


def test_all_images_bad_is_an_error(tmp_path):
    (tmp_path / "a").mkdir()
    for name in ("x.png", "y.png"):
        (tmp_path / "a" / name).write_bytes(b"junk")
    dataset = build_dataset("imagefolder", str(tmp_path), skip_bad_images=True)
    with pytest.warns(RuntimeWarning), pytest.raises(BadImageError) as error:
        dataset[0]
    assert str(tmp_path) in one_line(error)


def test_missing_imagefolder_and_split_are_one_line_errors(tmp_path, image_folder):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError) as error:
        build_dataset("imagefolder", missing)
    assert missing in one_line(error)
    with pytest.raises(FileNotFoundError) as error:
        build_dataset("imagefolder", image_folder, split="test")
    message = one_line(error)
    assert os.path.join(image_folder, "test") in message and "train, val" in message


def test_unknown_kind_lists_the_valid_kinds(tmp_path):
    with pytest.raises(ValueError) as error:
        build_dataset("cifar", str(tmp_path))
    assert all(kind in one_line(error) for kind in ("imagefolder", "fashion_mnist"))
    assert DATASETS == ("imagefolder", "fashion_mnist")


def test_require_min_size():
    require_min_size(range(8), 8, "training set")
    with pytest.raises(ValueError) as error:
        require_min_size(range(7), 8, "training set")
    assert "training set has 7" in one_line(error) and "8" in one_line(error)


# ---------------------------------------------------------------- Fashion-MNIST from test-written IDX files

def write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    """IDX as specified on Yann LeCun's MNIST page: 0, 0, type 0x08 (ubyte), ndim, big-endian uint32 sizes, data."""
    data = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    if compress:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)


def write_fashion(folder: Path, compress: bool, n_train: int = 5, n_test: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        arrays[f"{prefix}-images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{prefix}-labels"] = rng.integers(0, 10, n, dtype=np.uint8)
        write_idx(folder / f"{prefix}-images-idx3-ubyte", arrays[f"{prefix}-images"], compress)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte", arrays[f"{prefix}-labels"], compress)
    return arrays


@pytest.mark.parametrize("compress", [False, True])
def test_fashion_mnist_reads_idx_files_as_rgb(tmp_path, compress):
    arrays = write_fashion(tmp_path, compress)
    train = build_dataset("fashion_mnist", str(tmp_path))
    assert len(train) == 5 and train.classes == FASHION_CLASSES
    assert train.targets == arrays["train-labels"].tolist()
    image, label = train[3]
    assert image.mode == "RGB" and image.size == (28, 28) and label == arrays["train-labels"][3]
    assert np.array_equal(np.asarray(image), np.repeat(arrays["train-images"][3][..., None], 3, axis=2))
    assert torch.equal(train.data, torch.from_numpy(arrays["train-images"]))
    for split in ("val", "test"):
        test = build_dataset("fashion_mnist", str(tmp_path), split=split, transform=np.asarray)
        assert len(test) == 3 and test.targets == arrays["t10k-labels"].tolist()
        assert np.array_equal(test[2][0][..., 0], arrays["t10k-images"][2])


def test_fashion_mnist_in_torchvision_download_layout(tmp_path):
    write_fashion(tmp_path / "FashionMNIST" / "raw", compress=True)
    assert len(build_dataset("fashion_mnist", str(tmp_path), split="train")) == 5


def test_fashion_mnist_missing_folder_or_file_is_one_line_error(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        build_dataset("fashion_mnist", str(tmp_path / "nowhere"))
    assert str(tmp_path / "nowhere") in one_line(error)
    write_fashion(tmp_path, compress=False)
    os.remove(tmp_path / "t10k-labels-idx1-ubyte")
    with pytest.raises(FileNotFoundError) as error:
        build_dataset("fashion_mnist", str(tmp_path), split="val")
    assert "t10k-labels-idx1-ubyte" in one_line(error) and str(tmp_path) in one_line(error)
    with pytest.raises(ValueError) as error:
        build_dataset("fashion_mnist", str(tmp_path), split="validation")
    assert "validation" in one_line(error)


def test_malformed_idx_files_are_named(tmp_path):
    write_fashion(tmp_path, compress=False)
    images = tmp_path / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-10])
    with pytest.raises(ValueError) as error:
        build_dataset("fashion_mnist", str(tmp_path))
    assert str(images) in one_line(error) and "truncated" in one_line(error)

    labels = tmp_path / "not-idx"
    labels.write_bytes(b"\x89PNG....")
    with pytest.raises(ValueError) as error:
        read_idx_ubyte(str(labels), ndim=1)
    assert str(labels) in one_line(error)

    write_fashion(tmp_path, compress=False, n_train=4)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(3, dtype=np.uint8), compress=False)
    with pytest.raises(ValueError) as error:
        build_dataset("fashion_mnist", str(tmp_path))
    assert "4 images" in one_line(error) and "3 labels" in one_line(error)


# ---------------------------------------------------------------- the real files

@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_DIR),
                    reason=f"{FASHION_MNIST_DIR} absent (apt-get install dataset-fashion-mnist)")
def test_real_fashion_mnist_files(tmp_path):
    train = build_dataset("fashion_mnist", FASHION_MNIST_DIR, split="train")
    test = build_dataset("fashion_mnist", FASHION_MNIST_DIR, split="val")
    assert (len(train), len(test)) == (60000, 10000) and train.classes == FASHION_CLASSES
    assert np.bincount(train.targets).tolist() == [6000] * 10  # Fashion-MNIST is exactly balanced
    assert np.bincount(test.targets).tolist() == [1000] * 10
    assert train[0][0].mode == "RGB" and train[0][0].size == (28, 28)
    # Independent parser: torchvision's reader on decompressed copies of the test split.
    for name, reader, ours in (("t10k-images-idx3-ubyte", read_image_file, test.data),
                               ("t10k-labels-idx1-ubyte", read_label_file, torch.tensor(test.targets))):
        source = os.path.join(FASHION_MNIST_DIR, name)
        if not os.path.exists(source):
            source += ".gz"
        with (gzip.open if source.endswith(".gz") else open)(source, "rb") as src, open(tmp_path / name, "wb") as dst:
            shutil.copyfileobj(src, dst)
        assert torch.equal(reader(str(tmp_path / name)), ours)


def _rewrite_subset(source: str, destination: str, times: int) -> None:
    for _ in range(times):
        datasets.write_fashion_mnist_subset(source, destination, 30, 10)


def test_a_subset_rewritten_while_read_is_never_seen_half_written(tmp_path):
    """Two drivers sharing an output folder both write its data subset (experiments.reproduce, two processes):
    each file goes through a temporary name and a rename, so a reader meets a whole file every time."""
    import multiprocessing

    source, destination = tmp_path / "source", tmp_path / "subset"
    write_fashion(source, compress=False, n_train=40, n_test=20)
    datasets.write_fashion_mnist_subset(str(source), str(destination), 30, 10)
    writer = multiprocessing.get_context("spawn").Process(target=_rewrite_subset,
                                                          args=(str(source), str(destination), 300))
    writer.start()
    reads = 0
    while writer.is_alive() or reads == 0:
        assert datasets.read_idx_ubyte(str(destination / "train-images-idx3-ubyte"), 3).shape == (30, 28, 28)
        reads += 1
    writer.join()
    assert writer.exitcode == 0 and not list(destination.glob(".*.tmp.*"))  # no temporary left behind
