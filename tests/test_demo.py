"""The quickstart demo end to end at a tiny size: train, k-NN, raw-pixel baseline on the same subset."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from sparo_dino import datasets, demo, knn

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


@needs_fashion_mnist
def test_demo_trains_evaluates_and_reports_honestly(tmp_path, capsys):
    tiny = demo.Profile("tiny", num_train=64, num_test=32, epochs=1, warmup_epochs=0, batch_size=16, local_crops=1)
    summary = demo.run(tmp_path, tiny, num_workers=0)
    out = capsys.readouterr().out
    assert "20-NN classifier result: Top1:" in out
    assert "vit_tiny_sparo 20-NN top-1" in out and "raw pixels, same k-NN, same 64 train / 32 test images" in out
    assert 0.0 <= summary["sparo_top1"] <= 100.0 and summary["raw_pixel_top1"] > 30.0
    if summary["sparo_top1"] <= summary["raw_pixel_top1"]:
        assert "does not beat raw pixels yet" in out
    assert (tmp_path / "train" / "checkpoint.pth").is_file()
