"""The quickstart demo end to end at a tiny size: train, k-NN, raw-pixel baseline on the same subset."""
from __future__ import annotations

import gzip
import json
import os
import struct

import numpy as np
import pytest
import torch

import eval_knn
from experiments import demo
from sparo_dino.data import datasets
from sparo_dino.eval import knn
from sparo_dino.io import weights

needs_fashion_mnist = pytest.mark.skipif(not os.path.isdir(datasets.FASHION_MNIST_DIR),
                                         reason="Debian's dataset-fashion-mnist is not installed (make data)")


@needs_fashion_mnist
def test_subset_idx_files_round_trip(tmp_path):
    subset = datasets.write_fashion_mnist_subset(datasets.FASHION_MNIST_DIR, str(tmp_path), 50, 20)
    full = datasets.build_dataset("fashion_mnist", datasets.FASHION_MNIST_DIR, split="val")
    small = datasets.build_dataset("fashion_mnist", subset, split="val")
    assert len(small) == 20 and small.targets == full.targets[:20]
    assert torch.equal(small.data, full.data[:20])
    assert len(datasets.build_dataset("fashion_mnist", subset, split="train")) == 50


def test_raw_pixel_baseline_uses_pixels_in_unit_range(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(40, 28, 28), dtype=np.uint8)
    labels = (np.arange(40) % 2).astype(np.uint8)
    images[labels == 0, :14] = 0  # black top half vs white top half: separable in cosine pixel space
    images[labels == 1, :14] = 255
    for split in ("train", "t10k"):
        datasets.write_idx_ubyte(str(tmp_path / f"{split}-images-idx3-ubyte"), images)
        datasets.write_idx_ubyte(str(tmp_path / f"{split}-labels-idx1-ubyte"), labels)
    assert demo.raw_pixel_top1(str(tmp_path)) == 100.0
    expected = knn.weighted_knn(torch.tensor(images).flatten(1) / 255.0, torch.tensor(labels).long(),
                                torch.tensor(images).flatten(1) / 255.0, 2)
    assert expected.argmax(1).tolist() == labels.tolist()


def _first_items(name: str, count: int) -> np.ndarray:
    """The first `count` items of one of the installed Fashion-MNIST IDX files, read straight from its bytes."""
    with gzip.open(os.path.join(datasets.FASHION_MNIST_DIR, name + ".gz")) as handle:
        ndim = handle.read(4)[3]
        shape = struct.unpack(f">{ndim}I", handle.read(4 * ndim))
        size = int(np.prod(shape[1:], dtype=np.int64))
        return np.frombuffer(handle.read(count * size), dtype=np.uint8).reshape(count, *shape[1:])


def _weighted_knn_top1(train: np.ndarray, train_labels: np.ndarray, test: np.ndarray, test_labels: np.ndarray,
                       k: int = 20, temperature: float = 0.07) -> float:
    """Reference top-1 (%) in float64 numpy: cosine similarity of flattened rows, the k most similar train rows,
    votes exp(sim / T) summed per class."""
    train = train.reshape(len(train), -1).astype(np.float64)
    test = test.reshape(len(test), -1).astype(np.float64)
    sims = (test / np.linalg.norm(test, axis=1, keepdims=True)) @ (train / np.linalg.norm(train, axis=1)[:, None]).T
    votes = np.zeros((len(test), int(train_labels.max()) + 1))
    for row, neighbours in enumerate(np.argsort(-sims, axis=1)[:, :k]):
        np.add.at(votes[row], train_labels[neighbours], np.exp(sims[row, neighbours] / temperature))
    return 100.0 * float(np.mean(votes.argmax(axis=1) == test_labels))


@needs_fashion_mnist
def test_demo_trains_evaluates_and_reports_against_its_own_random_init(tmp_path, capsys):
    """A tiny profile: the trained teacher's weights moved away from the init, the init baseline is the run's own
    initial network on the same images with the same k-NN, and the one-line report carries all three numbers."""
    tiny = demo.Profile("tiny", num_train=64, num_test=32, epochs=1, warmup_epochs=0, batch_size=16, local_crops=1,
                        flags=("--patch_size", "16", "--out_dim", "256", "--lr", "0.01"))
    summary = demo.run(tmp_path, tiny, num_workers=0)
    out = capsys.readouterr().out
    saved = json.loads((tmp_path / "knn_checkpoint_teacher.json").read_text())
    assert (saved["num_train"], saved["num_test"]) == (64, 32)
    assert summary["trained_top1"] == saved["knn"]["20"]["top1"]
    assert summary["init_top1"] == saved["init_baseline"]["20"]["top1"]
    # the numbers themselves: raw pixels as computed from the original files' first 64 / 32 images, and encodings
    # far above the 10% of chance (measured: 43.75% trained and at init, 14 of the 32 test images)
    expected_pixels = _weighted_knn_top1(_first_items("train-images-idx3-ubyte", 64),
                                         _first_items("train-labels-idx1-ubyte", 64),
                                         _first_items("t10k-images-idx3-ubyte", 32),
                                         _first_items("t10k-labels-idx1-ubyte", 32))
    assert summary["raw_pixel_top1"] == pytest.approx(expected_pixels)
    assert summary["trained_top1"] > 25 and summary["init_top1"] > 25
    assert (f"trained {summary['trained_top1']:.2f}% | same network at random init {summary['init_top1']:.2f}% | "
            f"raw pixels {summary['raw_pixel_top1']:.2f}%  (same k-NN, same 64 train / 32 test images" in out)
    assert demo.verdict(summary["trained_top1"], summary["init_top1"]) in out
    assert summary["teacher_entropy"] > 0 and summary["kl"] >= 0

    args = eval_knn.build_parser().parse_args(["--pretrained_weights", str(tmp_path / "train" / "checkpoint.pth")])
    trained, _, _ = weights.load_backbone(args)
    initial, _, _ = weights.load_backbone(args, at_init=True)
    moved = [key for key, value in trained.state_dict().items() if not torch.equal(value, initial.state_dict()[key])]
    assert "sparo.query" in moved and "blocks.0.attn.qkv.weight" in moved


def test_verdict_names_the_bar() -> None:
    assert demo.verdict(60.0, 54.0).startswith("training helped: +6.00 points")
    assert "less than the 5 points" in demo.verdict(56.0, 54.0)
    assert demo.verdict(50.0, 54.0).startswith("training did not help: -4.00 points")


def test_demo_epochs_and_data_path_shorten_the_profile_for_a_quick_check(monkeypatch, tmp_path):
    """`make gpu-check` runs the GPU profile for 2 epochs on IDX files it carries: the profile keeps everything
    else, the warmup fits in the shorter run, and the named folder is used instead of a download."""
    calls = []
    monkeypatch.setattr(demo, "run", lambda output_dir, profile, workers, arch, data_path: calls.append(
        (profile, data_path)))
    demo.main(["--profile", "gpu", "--epochs", "1", "--data_path", str(tmp_path), "--output_dir", str(tmp_path)])
    profile, data_path = calls[0]
    assert profile == demo.dataclasses.replace(demo.PROFILES["gpu"], epochs=1, warmup_epochs=1)
    assert data_path == str(tmp_path)
