"""DINO's multi-crop augmentation, the evaluation transforms, and per-sample seeding of their randomness.

The official recipe (numbers from crop_recipe) on PIL images; blur sigma scales with global_crop_size / 224
(docs/training.md, The recipe). SeededDataset reseeds per sample, so resumes and worker counts see the same crops."""
from __future__ import annotations

import random
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image, ImageFilter
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode, v2

from sparo_dino.data.crop_recipe import (
    BLUR_REFERENCE_SIZE,
    BLUR_SIGMA_AT_REFERENCE,
    BRIGHTNESS,
    CONTRAST,
    FLIP_P,
    GLOBAL1_BLUR_P,
    GLOBAL2_BLUR_P,
    GLOBAL2_SOLARIZE_P,
    GRAYSCALE_P,
    HUE,
    JITTER_P,
    LOCAL_BLUR_P,
    SATURATION,
    SOLARIZE_THRESHOLD,
)

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def blur_sigma_range(global_crop_size: int) -> tuple[float, float]:
    """The blur sigma range of every crop (global and local) of a run with `global_crop_size` px global crops.

    The official range scaled by global_crop_size / 224: a run's scale is set by its global crops, so local crops
    keep the official sigma in pixels (as in the paper's 224/96 recipe) rather than a range shrunk to their size."""
    if global_crop_size <= 0:
        raise ValueError(f"global_crop_size must be positive, got {global_crop_size}")
    scale = global_crop_size / BLUR_REFERENCE_SIZE
    return BLUR_SIGMA_AT_REFERENCE[0] * scale, BLUR_SIGMA_AT_REFERENCE[1] * scale


class RandomRadiusBlur:
    """PIL Gaussian blur of a PIL image with sigma (PIL's radius) drawn uniformly from `sigma` using torch's RNG.

    PIL rather than torchvision's tensor blur: about 7x faster at 224 px on one core (data loading is DINO's
    bottleneck) and the blur the official recipe specifies."""

    def __init__(self, sigma: tuple[float, float]) -> None:
        self.sigma = sigma

    def __call__(self, image: Image.Image) -> Image.Image:
        radius = float(torch.empty(()).uniform_(self.sigma[0], self.sigma[1]))
        return image.filter(ImageFilter.GaussianBlur(radius=radius))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sigma={self.sigma})"


def random_blur(global_crop_size: int, p: float) -> v2.RandomApply:
    """Gaussian blur with probability p, sigma range of a run with these global crops (see blur_sigma_range)."""
    return v2.RandomApply([RandomRadiusBlur(blur_sigma_range(global_crop_size))], p=p)


def to_normalized_tensor() -> list[v2.Transform]:
    """PIL -> float tensor in [0, 1] -> ImageNet-normalized plain torch.Tensor (what the models and collate take)."""
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            v2.ToPureTensor()]


def _check_scale(name: str, scale: Sequence[float]) -> tuple[float, float]:
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"{name} must be two numbers 0 < min <= max <= 1, got {' '.join(map(str, scale))}")
    return float(scale[0]), float(scale[1])


def check_multicrop_args(global_crops_scale: Sequence[float], local_crops_scale: Sequence[float],
                         local_crops_number: int, global_crop_size: int, local_crop_size: int
                         ) -> tuple[tuple[float, float], tuple[float, float]]:
    """Validate a multi-crop recipe; returns both scales as floats.

    The one place these rules live: both pipelines call it, and main_dino's flag validation reports its error (each
    message starts with the argument's name, which is also the flag's)."""
    if local_crops_number < 0:
        raise ValueError(f"local_crops_number must be >= 0, got {local_crops_number}")
    for name, size in (("global_crop_size", global_crop_size), ("local_crop_size", local_crop_size)):
        if size <= 0:
            raise ValueError(f"{name} must be positive, got {size}")
    return _check_scale("global_crops_scale", global_crops_scale), _check_scale("local_crops_scale", local_crops_scale)


def multicrop_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
    """The multi-crop recipe of a run config (training flags or a checkpoint's `config`), as keyword arguments of
    either pipeline (MultiCropAugmentation here, batched_augmentation.BatchedMultiCrop): one wiring for both."""
    return {"global_crops_scale": tuple(config["global_crops_scale"]),
            "local_crops_scale": tuple(config["local_crops_scale"]),
            "local_crops_number": config["local_crops_number"],
            "global_crop_size": config["global_crop_size"], "local_crop_size": config["local_crop_size"]}


class MultiCropAugmentation:
    """PIL image -> [global crop 1, global crop 2, local crop 1..N] as normalized (3, size, size) tensors."""

    def __init__(self, global_crops_scale: Sequence[float] = (0.4, 1.0),
                 local_crops_scale: Sequence[float] = (0.05, 0.4), local_crops_number: int = 8,
                 global_crop_size: int = 224, local_crop_size: int = 96) -> None:
        global_scale, local_scale = check_multicrop_args(global_crops_scale, local_crops_scale, local_crops_number,
                                                         global_crop_size, local_crop_size)
        self.local_crops_number = local_crops_number

        def crop_and_colour(size: int, scale: tuple[float, float]) -> list[v2.Transform]:
            return [
                v2.RandomResizedCrop(size, scale=scale, interpolation=InterpolationMode.BICUBIC),
                v2.RandomHorizontalFlip(p=FLIP_P),
                v2.RandomApply([v2.ColorJitter(brightness=BRIGHTNESS, contrast=CONTRAST, saturation=SATURATION,
                                               hue=HUE)], p=JITTER_P),
                v2.RandomGrayscale(p=GRAYSCALE_P),
            ]

        self.global_transform1 = v2.Compose(crop_and_colour(global_crop_size, global_scale)
                                            + [random_blur(global_crop_size, p=GLOBAL1_BLUR_P)]
                                            + to_normalized_tensor())
        self.global_transform2 = v2.Compose(crop_and_colour(global_crop_size, global_scale)
                                            + [random_blur(global_crop_size, p=GLOBAL2_BLUR_P),
                                               v2.RandomSolarize(threshold=SOLARIZE_THRESHOLD, p=GLOBAL2_SOLARIZE_P)]
                                            + to_normalized_tensor())
        self.local_transform = v2.Compose(crop_and_colour(local_crop_size, local_scale)
                                          + [random_blur(global_crop_size, p=LOCAL_BLUR_P)] + to_normalized_tensor())

    def __call__(self, image: Image.Image) -> list[torch.Tensor]:
        crops = [self.global_transform1(image), self.global_transform2(image)]
        crops.extend(self.local_transform(image) for _ in range(self.local_crops_number))
        return crops


EVAL_RESIZE_RATIO = 256 / 224  # official Resize 256 / CenterCrop 224, for evaluation views of other sizes


def eval_transform(resize_size: int = 256, crop_size: int = 224) -> Callable[[Image.Image], torch.Tensor]:
    """Official k-NN / linear-probe evaluation preprocessing: bicubic resize of the short side, centre crop."""
    return v2.Compose([v2.Resize(resize_size, interpolation=InterpolationMode.BICUBIC), v2.CenterCrop(crop_size)]
                      + to_normalized_tensor())


def linear_train_transform(crop_size: int = 224) -> Callable[[Image.Image], torch.Tensor]:
    """Official linear-probe training augmentation: RandomResizedCrop (torchvision defaults) and flip."""
    return v2.Compose([v2.RandomResizedCrop(crop_size), v2.RandomHorizontalFlip(p=0.5)] + to_normalized_tensor())


def sample_seed(seed: int, epoch: int, index: int) -> list[int]:
    """Four well-mixed 32-bit words from (seed, epoch, index): nearby triples give unrelated random streams."""
    return [int(word) for word in np.random.SeedSequence([seed, epoch, index]).generate_state(4)]


class SeededDataset(Dataset):
    """Wraps a dataset so that sample `index` in epoch `epoch` is augmented from a seed of (seed, epoch, index).

    The crops then depend only on that triple, not on the worker that draws them or what it drew before, so a run
    resumed mid-epoch, or one with another worker count, sees the same crops. The global torch, python and numpy
    random states are restored after every sample (the caller's stream is not disturbed). The epoch lives in a
    shared-memory tensor so that `set_epoch` also reaches persistent data-loader workers; call it before
    iterating the loader for that epoch.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.dataset = dataset
        self.seed = int(seed)
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self._epoch.fill_(epoch)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:
        # targets, classes, bad_images, ... of the wrapped dataset; only called for names not found on self.
        if name == "dataset":  # not yet set (e.g. during unpickling): avoid infinite recursion
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, index: int) -> Any:
        words = sample_seed(self.seed, self.epoch, int(index))
        python_state, numpy_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                # default_generator only: torch.manual_seed would also reseed (and initialise) CUDA generators
                torch.random.default_generator.manual_seed(words[0] << 32 | words[1])
                random.seed(words[2] << 32 | words[3])
                np.random.seed(words)
                return self.dataset[index]
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)
