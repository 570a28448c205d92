"""Shared fixtures: small generated image datasets, so tests need no downloads."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pytest
import torch
from PIL import Image

_PALETTE = [(220, 40, 40), (40, 200, 60), (40, 70, 220), (230, 200, 40), (200, 40, 200), (40, 210, 210)]


def make_image_folder(root: str | os.PathLike, num_classes: int = 3, per_class: int = 8, size: int = 32,
                      splits: Sequence[str] | None = None, seed: int = 0) -> str:
    """Write an ImageFolder whose classes are easy to tell apart (own colour and stripe direction, plus noise).

    With `splits`, each split gets its own subfolder (`root/train/<class>/...`), the layout evaluation expects.
    Returns the root path.
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    for split in (splits or [None]):
        base = root / split if split else root
        for label in range(num_classes):
            folder = base / f"class_{label}"
            folder.mkdir(parents=True, exist_ok=True)
            colour = np.array(_PALETTE[label % len(_PALETTE)], dtype=np.float32)
            for index in range(per_class):
                yy, xx = np.mgrid[0:size, 0:size]
                phase = rng.uniform(0, 2 * np.pi)
                coord = xx if label % 2 == 0 else yy
                stripes = 0.5 + 0.5 * np.sin(coord * (0.5 + 0.25 * (label // 2)) + phase)
                image = colour[None, None, :] * (0.55 + 0.45 * stripes[..., None])
                image += rng.normal(0, 12, size=image.shape)
                pixels = np.clip(image, 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"img_{index:03d}.png")
    return str(root)


@pytest.fixture
def image_folder(tmp_path: Path) -> str:
    """A 3-class ImageFolder of 32 px images with train/ and val/ splits."""
    return make_image_folder(tmp_path / "data", splits=("train", "val"))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on a busy 2-core machine OpenMP spin-waiting makes 2 threads several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> str:
    """A 2-class ImageFolder of 16 small images, shared by the training tests of a module."""
    return make_image_folder(tmp_path_factory.mktemp("images"), num_classes=2, per_class=8, size=32)
