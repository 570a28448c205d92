"""Multi-crop augmentation: crop shapes, the recipe's probabilities measured on crafted images, blur scaling, eval
transforms against hand-computed normalization, and per-sample seeding (determinism, order/worker independence,
untouched global random state)."""
from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from sparo_dino.data.augmentation import (
    MultiCropAugmentation,
    RandomRadiusBlur,
    SeededDataset,
    blur_sigma_range,
    eval_transform,
    linear_train_transform,
    random_blur,
)

# Independent references (official DINO / ImageNet constants).
MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
DRAWS = 600  # per measured frequency: std of a 0.5 rate is 0.02, tolerances below are >= 3 std


def to_uint8(tensor: torch.Tensor) -> torch.Tensor:
    """Undo ImageNet normalization back to 0..255 pixel values."""
    return (tensor * STD + MEAN).mul(255).round()


def solid(colour: tuple[int, int, int], size: int = 16) -> Image.Image:
    return Image.new("RGB", (size, size), colour)


def gradient(size: int = 16) -> Image.Image:
    """Gray, brighter to the right; values stay < 128 after any jitter so solarize cannot reverse it."""
    row = np.linspace(0, 90, size)
    pixels = np.repeat(np.tile(row, (size, 1))[..., None], 3, axis=2).astype(np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture
def tiny_aug() -> MultiCropAugmentation:
    return MultiCropAugmentation(local_crops_number=2, global_crop_size=8, local_crop_size=4)


def rate(pipeline, image: Image.Image, event) -> float:
    torch.manual_seed(0)
    return sum(bool(event(pipeline(image))) for _ in range(DRAWS)) / DRAWS


def test_multicrop_gives_two_globals_then_locals_of_requested_sizes():
    aug = MultiCropAugmentation(local_crops_number=3, global_crop_size=32, local_crop_size=16)
    crops = aug(Image.fromarray(np.random.default_rng(0).integers(0, 256, (28, 28, 3), dtype=np.uint8)))
    assert [tuple(crop.shape) for crop in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
    assert all(type(crop) is torch.Tensor and crop.dtype == torch.float32 for crop in crops)
    no_locals = MultiCropAugmentation(local_crops_number=0, global_crop_size=8, local_crop_size=4)
    assert len(no_locals(solid((1, 2, 3)))) == 2


@pytest.mark.parametrize("kwargs", [dict(local_crops_number=-1), dict(global_crops_scale=(1.0, 0.4)),
                                    dict(local_crops_scale=(0.0, 0.4)), dict(global_crop_size=0)])
def test_bad_arguments_are_one_line_errors(kwargs):
    with pytest.raises(ValueError) as error:
        MultiCropAugmentation(**kwargs)
    assert "\n" not in str(error.value)


def test_flip_probability_is_one_half(tiny_aug):
    def flipped(crop: torch.Tensor) -> bool:
        half = crop.shape[-1] // 2
        return crop[0, :, :half].mean() > crop[0, :, -half:].mean()

    for pipeline in (tiny_aug.global_transform1, tiny_aug.local_transform):
        assert rate(pipeline, gradient(), flipped) == pytest.approx(0.5, abs=0.07)


def test_grayscale_probability_is_one_fifth_on_every_crop(tiny_aug):
    def gray(crop: torch.Tensor) -> bool:
        pixels = to_uint8(crop)
        return torch.equal(pixels[0], pixels[1]) and torch.equal(pixels[1], pixels[2])

    for pipeline in (tiny_aug.global_transform1, tiny_aug.global_transform2, tiny_aug.local_transform):
        assert rate(pipeline, solid((200, 60, 30)), gray) == pytest.approx(0.2, abs=0.06)


def test_colour_jitter_probability_is_four_fifths(tiny_aug):
    # A solid colour survives crop, flip and blur exactly; only jitter or grayscale change it:
    # P(unchanged) = P(no jitter) * P(no grayscale) = 0.2 * 0.8.
    colour = torch.tensor([200.0, 60.0, 30.0]).view(3, 1, 1)

    def unchanged(crop: torch.Tensor) -> bool:
        return torch.equal(to_uint8(crop), colour.expand_as(crop))

    for pipeline in (tiny_aug.global_transform1, tiny_aug.local_transform):
        assert rate(pipeline, solid((200, 60, 30)), unchanged) == pytest.approx(0.16, abs=0.05)


def test_solarize_only_on_second_global_crop_with_probability_one_fifth(tiny_aug):
    # White stays >= 153 under any brightness factor (>= 0.6); solarized it becomes <= 102.
    def solarized(crop: torch.Tensor) -> bool:
        return bool((to_uint8(crop) < 128).all())

    white = solid((255, 255, 255))
    assert rate(tiny_aug.global_transform1, white, solarized) == 0
    assert rate(tiny_aug.local_transform, white, solarized) == 0
    assert rate(tiny_aug.global_transform2, white, solarized) == pytest.approx(0.2, abs=0.06)


def _blurs(pipeline: v2.Compose) -> list[v2.RandomApply]:
    return [t for t in pipeline.transforms
            if isinstance(t, v2.RandomApply) and isinstance(t.transforms[0], RandomRadiusBlur)]


def test_blur_probabilities_and_one_sigma_range_for_every_crop(tiny_aug):
    """tiny_aug has 8 px global and 4 px local crops: every crop's sigma range is the official one x 8 / 224."""
    assert blur_sigma_range(224) == pytest.approx((0.1, 2.0))
    assert blur_sigma_range(32) == pytest.approx((0.1 * 32 / 224, 2.0 * 32 / 224))
    expected = {"global_transform1": 1.0, "global_transform2": 0.1, "local_transform": 0.5}
    for name, p in expected.items():
        (blur,) = _blurs(getattr(tiny_aug, name))
        assert blur.p == p
        assert list(blur.transforms[0].sigma) == pytest.approx([0.1 * 8 / 224, 2.0 * 8 / 224])


@pytest.mark.parametrize("config, sigma", [
    ("dino_vit_small_in1k.yaml", (0.1, 2.0)), ("dino_vit_small_sparo_in1k.yaml", (0.1, 2.0)),
    ("fmnist_vit_tiny_sparo.yaml", (0.1 * 32 / 224, 2.0 * 32 / 224))])
def test_shipped_configs_blur_every_crop_with_the_runs_sigma_range(config, sigma):
    """The paper's ImageNet recipe blurs global and 96 px local crops alike with sigma in [0.1, 2.0] (official DINO),
    in both pipelines, as the trainer wires them; the 32/16 px Fashion-MNIST recipe in proportion to 32 px."""
    from sparo_dino.cli.train_flags import parse_train_args
    from sparo_dino.data.augmentation import multicrop_kwargs
    from sparo_dino.data.batched_augmentation import BatchedMultiCrop

    args = parse_train_args(["--config", os.path.join(CONFIGS, config), "--data_path", "unused"])
    recipe = multicrop_kwargs(vars(args))
    pil = MultiCropAugmentation(**recipe)
    for name in ("global_transform1", "global_transform2", "local_transform"):
        (blur,) = _blurs(getattr(pil, name))
        assert list(blur.transforms[0].sigma) == pytest.approx(list(sigma)), name
    batched = BatchedMultiCrop(**recipe)
    assert len(batched.views) == 2 + args.local_crops_number
    assert all(list(view.sigma) == pytest.approx(list(sigma)) for view in batched.views)


@pytest.mark.parametrize("crop_size", [224, 448])
def test_blur_spread_stays_within_the_scaled_sigma_range(crop_size):
    # Blur a vertical step edge; the x-derivative of the result is the blur kernel, whose std is sigma.
    low, high = 0.1 * crop_size / 224, 2.0 * crop_size / 224
    step = Image.fromarray(np.repeat(np.where(np.arange(64) < 32, 0, 255).astype(np.uint8)[None], 8, axis=0))
    blur = random_blur(crop_size, p=1.0)
    torch.manual_seed(0)
    spreads = []
    for _ in range(100):
        kernel = np.diff(np.asarray(blur(step), dtype=np.float64)[4])
        x = np.arange(kernel.size) - (kernel * np.arange(kernel.size)).sum() / kernel.sum()
        spreads.append(float(np.sqrt((kernel * x**2).sum() / kernel.sum())))
    assert max(spreads) <= high * 1.02 and max(spreads) > 0.9 * high
    assert min(spreads) < low + 0.15 * (high - low)


def test_eval_transform_resizes_short_side_centre_crops_and_normalizes():
    image = Image.new("RGB", (40, 28), (10, 128, 250))
    out = eval_transform(resize_size=36, crop_size=32)(image)
    expected = (torch.tensor([10.0, 128.0, 250.0]).view(3, 1, 1) / 255 - MEAN) / STD
    assert out.shape == (3, 32, 32) and type(out) is torch.Tensor
    assert torch.allclose(out, expected.expand(3, 32, 32), atol=1e-5)


def test_linear_train_transform_shape():
    out = linear_train_transform(crop_size=16)(solid((1, 2, 3), size=28))
    assert out.shape == (3, 16, 16) and out.dtype == torch.float32


class _Images(Dataset):
    """A few distinct images, augmented by `transform`; labels = index."""

    def __init__(self, transform, n: int = 6):
        rng = np.random.default_rng(1)
        self.images = [Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)) for _ in range(n)]
        self.transform = transform
        self.targets = list(range(n))
        self.classes = [str(i) for i in range(n)]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.transform(self.images[index]), index


def _same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a[0], b[0])) and a[1] == b[1]


def test_seeded_samples_depend_only_on_seed_epoch_and_index(tiny_aug):
    first, second = SeededDataset(_Images(tiny_aug), seed=3), SeededDataset(_Images(tiny_aug), seed=3)
    in_order = [first[i] for i in range(6)]
    reversed_order = [second[i] for i in reversed(range(6))][::-1]
    assert all(_same(a, b) for a, b in zip(in_order, reversed_order))
    assert _same(first[2], first[2])

    first.set_epoch(1)
    assert first.epoch == 1
    assert not any(_same(a, first[i]) for i, a in enumerate(in_order))
    assert not _same(SeededDataset(_Images(tiny_aug), seed=4)[0], in_order[0])
    first.set_epoch(0)
    assert _same(first[4], in_order[4])


def test_seeding_covers_python_and_numpy_randomness_and_restores_global_state():
    def draws(_image):
        return [torch.tensor([random.random(), float(np.random.rand()), float(torch.rand(()))])]

    dataset = SeededDataset(_Images(draws), seed=0)
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    states = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state()
    a, b, c = dataset[1][0][0], dataset[1][0][0], dataset[2][0][0]
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert (a != c).all()  # every one of the three generators is reseeded per sample
    assert random.getstate() == states[0]
    assert np.array_equal(np.random.get_state()[1], states[1])
    assert torch.equal(torch.get_rng_state(), states[2])


def test_seeded_dataset_forwards_dataset_attributes(tiny_aug):
    dataset = SeededDataset(_Images(tiny_aug, n=4), seed=0)
    assert len(dataset) == 4 and dataset.targets == [0, 1, 2, 3] and dataset.classes == ["0", "1", "2", "3"]


def test_persistent_workers_give_the_single_process_crops_every_epoch(tiny_aug):
    def crops(num_workers: int) -> list[list[torch.Tensor]]:
        dataset = SeededDataset(_Images(tiny_aug), seed=7)
        loader = DataLoader(dataset, batch_size=2, num_workers=num_workers, persistent_workers=num_workers > 0,
                            collate_fn=lambda batch: batch)
        epochs = []
        for epoch in range(2):
            dataset.set_epoch(epoch)
            epochs.append([crop for batch in loader for sample in batch for crop in sample[0]])
        return epochs

    single, workers = crops(0), crops(2)
    for epoch in range(2):
        assert all(torch.equal(a, b) for a, b in zip(single[epoch], workers[epoch]))
    assert not torch.equal(single[0][0], single[1][0])
