"""The data path of `--augmentation batched`: data-loader workers only decode, the training device builds every crop.

Crops are seeded by (seed, epoch, iteration, rank), so neither the worker count nor a resume changes them; large
JPEGs are decoded at a reduced DCT scale, never below `min_decode_area` (why: docs/architecture.md, design notes)."""
from __future__ import annotations

import functools
import math
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from sparo_dino.data.augmentation import multicrop_kwargs
from sparo_dino.data.batched_augmentation import BatchedMultiCrop
from sparo_dino.data.datasets import CheckedImages, load_rgb_image


def min_decode_area(config: Mapping[str, Any]) -> int:
    """Pixels an image needs so that the smallest crop of every view still covers its output size: the smallest
    crop of a view takes `min scale` of the image's area and is resized to `size` x `size`."""
    views = [(config["global_crop_size"], config["global_crops_scale"][0])]
    if config["local_crops_number"]:
        views.append((config["local_crop_size"], config["local_crops_scale"][0]))
    return max(math.ceil(size * size / scale) for size, scale in views)


def _draft_reduced(image: Image.Image, min_area: int) -> bool:
    """Set an opened, not yet decoded JPEG of at least 4 x `min_area` pixels to decode at the smallest DCT scale
    that keeps at least `min_area` pixels (its size changes at once); whether it was."""
    area = image.width * image.height
    if image.format != "JPEG" or area < 4 * min_area:
        return False
    scale = math.sqrt(min_area / area)
    image.draft("RGB", (math.ceil(image.width * scale), math.ceil(image.height * scale)))
    return True


def load_rgb_image_reduced(path: str, min_area: int) -> Image.Image:
    """The RGB image at `path`; a JPEG of at least 4 x `min_area` pixels is decoded at the smallest DCT scale that
    keeps at least `min_area` pixels. Anything else, unreadable files included, goes through
    datasets.load_rgb_image (whose error names the file)."""
    try:
        with open(path, "rb") as handle:
            image = Image.open(handle)
            if _draft_reduced(image, min_area):
                return image.convert("RGB")
    except Exception:  # noqa: BLE001 - decided again by load_rgb_image, which reports the file
        pass
    return load_rgb_image(path)


def decoded_sizes(paths: Sequence[str], min_area: int) -> list[tuple[int, int]]:
    """(height, width) at which load_rgb_image_reduced decodes each file, read from the headers alone; files that
    cannot be opened are left out."""
    sizes = []
    for path in paths:
        try:
            with Image.open(path) as image:
                _draft_reduced(image, min_area)
                sizes.append((image.height, image.width))
        except Exception:  # noqa: BLE001 - an unreadable file is the loader's to report
            continue
    return sizes


def rgb_to_uint8_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a uint8 (H, W, 3) tensor: PIL's own pixel layout, one copy (no transpose in the worker;
    the device puts the channels first)."""
    return torch.from_numpy(np.array(image, dtype=np.uint8, copy=True))


def reduce_jpeg_decoding(dataset: Dataset, config: Mapping[str, Any]) -> Dataset:
    """`dataset` (training images with the transform rgb_to_uint8_tensor), its large JPEGs now decoded at reduced
    size as the recipe in `config` allows; datasets without image files (Fashion-MNIST) are returned as they are."""
    if isinstance(dataset, CheckedImages):
        dataset.loader = functools.partial(load_rgb_image_reduced, min_area=min_decode_area(config))
    return dataset


def pack_images(images: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (H_i, W_i, 3) images -> (batch (B, H_max, W_max, 3), sizes (B, 2) = (H_i, W_i)); the batch's
    `permute(0, 3, 1, 2)` is what BatchedMultiCrop takes.

    Each image's first padding row and column repeat its last row and column (the one pixel beyond an edge that
    the resampling may read); the rest of the padding is zero. One contiguous copy of each image row, in the
    data-loader worker."""
    sizes = torch.tensor([tuple(image.shape[:2]) for image in images], dtype=torch.long)
    max_h, max_w = (int(v) for v in sizes.max(dim=0).values)
    batch = torch.zeros((len(images), max_h, max_w, 3), dtype=torch.uint8)
    for index, image in enumerate(images):
        height, width = image.shape[:2]
        batch[index, :height, :width] = image
        if height < max_h:
            batch[index, height, :width] = image[-1]
        if width < max_w:
            batch[index, :height, width] = image[:, -1]
            if height < max_h:
                batch[index, height, width] = image[-1, -1]
    return batch, sizes


def collate_decoded(samples: Sequence[tuple[torch.Tensor, int, int]]) -> tuple[torch.Tensor, ...]:
    """Data-loader collate of (image, label, replaced) samples: (pixels, sizes, labels, replaced)."""
    images, labels, replaced = zip(*samples)
    pixels, sizes = pack_images(images)
    return pixels, sizes, torch.tensor(labels), torch.tensor(replaced)


def batch_seed(seed: int, epoch: int, iteration: int, rank: int) -> int:
    """A well-mixed 64-bit seed for the crops of one batch, from its position in the run."""
    words = np.random.SeedSequence([seed, epoch, iteration, rank]).generate_state(2)
    return int(words[0]) << 32 | int(words[1])


class DeviceMultiCrop:
    """The crops of a packed uint8 batch, made on `device` from the batch's position in the run."""

    def __init__(self, config: Mapping[str, Any], seed: int, rank: int, device: torch.device,
                 out_dtype: torch.dtype = torch.float32) -> None:
        self.augment = BatchedMultiCrop(**multicrop_kwargs(config), out_dtype=out_dtype)
        self.seed, self.rank, self.device = seed, rank, device

    def __call__(self, pixels: torch.Tensor, sizes: torch.Tensor, epoch: int, iteration: int) -> list[torch.Tensor]:
        """Crops of pack_images' (batch, sizes) (the batch pinned, for an asynchronous copy, on GPUs)."""
        generator = torch.Generator().manual_seed(batch_seed(self.seed, epoch, iteration, self.rank))
        channels_first = pixels.to(self.device, non_blocking=True).permute(0, 3, 1, 2).contiguous()
        return self.augment(channels_first, sizes, generator=generator)
