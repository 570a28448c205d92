"""DINO multi-crop augmentation on batches of decoded uint8 image tensors, on any device (`--augmentation batched`).

The per-image pipeline's recipe and parameter distributions (crop_recipe), every parameter of a batch drawn at once on
the CPU; its deliberate differences and host cost: docs/architecture.md (design notes), docs/performance.md."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torchvision.ops import roi_align
from torchvision.transforms.v2.functional import rgb_to_grayscale

from sparo_dino.data.augmentation import IMAGENET_MEAN, IMAGENET_STD, blur_sigma_range, check_multicrop_args
from sparo_dino.data.crop_recipe import (
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

CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)  # torchvision RandomResizedCrop default
CROP_TRIES = 10  # torchvision RandomResizedCrop: tries before the centre-crop fallback
# Order of the jitter factors in ViewParams.factors and of the op ids in ViewParams.order (torchvision's fn_idx).
JITTER_OPS = ("brightness", "contrast", "saturation", "hue")
CONTRAST_OP, SATURATION_OP, HUE_OP = 1, 2, 3
# (low, high) of each jitter factor, in JITTER_OPS order: torchvision's ColorJitter ranges for the recipe's strengths.
JITTER_RANGES = torch.tensor([(1 - BRIGHTNESS, 1 + BRIGHTNESS), (1 - CONTRAST, 1 + CONTRAST),
                              (1 - SATURATION, 1 + SATURATION), (-HUE, HUE)], dtype=torch.float64)


@dataclass(frozen=True)
class ViewSpec:
    """One crop of the recipe: its output size, area scale range, the probabilities that differ per view and the
    blur sigma range (the run's, from its global crop size)."""
    size: int
    scale: tuple[float, float]
    blur_p: float
    solarize_p: float
    sigma: tuple[float, float]

    @property
    def blur_radius(self) -> int:
        """Half-width of the blur kernel: 3 of the largest sigma the view draws (the Gaussian's tails beyond are
        below 0.3% of its mass)."""
        return max(1, math.ceil(3 * self.sigma[1]))


@dataclass
class ViewParams:
    """Random parameters of one or more views for a batch of B images (CPU tensors, first dim B per view, views
    one after the other).

    boxes: (B, 4) float (left, top, right, bottom) in pixels, right/bottom exclusive; flip, jitter, gray, blur,
    solarize: (B,) bool; factors: (B, 4) brightness, contrast, saturation, hue factors (drawn for every sample, used
    where jitter is set); order: (B, 4) long, a permutation of the op ids 0-3 (JITTER_OPS) per sample; sigma: (B,).
    """
    boxes: torch.Tensor
    flip: torch.Tensor
    jitter: torch.Tensor
    factors: torch.Tensor
    order: torch.Tensor
    gray: torch.Tensor
    blur: torch.Tensor
    sigma: torch.Tensor
    solarize: torch.Tensor

    @staticmethod
    def cat(params: Sequence["ViewParams"]) -> "ViewParams":
        """Stack the parameters of several views (of the same crop size) view-major, as their crops are processed."""
        return ViewParams(*(torch.cat([getattr(p, name) for p in params]) for name in ViewParams.__dataclass_fields__))

    def split(self, views: int) -> list["ViewParams"]:
        """The parameters of each of `views` equal consecutive views."""
        return [ViewParams(*fields) for fields in zip(*(getattr(self, name).chunk(views)
                                                          for name in ViewParams.__dataclass_fields__))]

    def narrow(self, start: int, length: int) -> "ViewParams":
        """The rows start .. start + length (views stored one after the other: a range of whole views)."""
        return ViewParams(*(getattr(self, name).narrow(0, start, length) for name in ViewParams.__dataclass_fields__))


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on `device` without making the host wait: a copy to a GPU from pageable memory may wait for
    the device, one from pinned memory is queued behind the work already there. On the CPU: the tensor itself."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def _uniform(shape: tuple[int, ...], low: float | torch.Tensor, high: float | torch.Tensor,
             generator: torch.Generator | None) -> torch.Tensor:
    """U(low, high) draws; low and high may be tensors that broadcast to `shape` (a range per row or column)."""
    return torch.rand(shape, generator=generator, dtype=torch.float64) * (high - low) + low


def sample_crop_boxes(heights: torch.Tensor, widths: torch.Tensor,
                      scale: tuple[float | torch.Tensor, float | torch.Tensor],
                      generator: torch.Generator | None = None,
                      ratio: tuple[float, float] = CROP_RATIO) -> torch.Tensor:
    """RandomResizedCrop boxes (B, 4) = (left, top, right, bottom) for images of the given sizes, in batch.

    torchvision's sampler, vectorized: up to CROP_TRIES draws of (area fraction ~ U(scale), log aspect ~ U(log
    ratio)), w = round(sqrt(area * aspect)), h = round(sqrt(area / aspect)); the first draw that fits wins and its
    position is uniform over the valid offsets; if none fits, the largest centre crop with an aspect ratio clamped
    to `ratio`. All draws are made for every sample (the stream differs from torchvision's, not the distribution).
    `scale` may hold (B, 1) tensors: a range per sample (views of one size with different scales).
    """
    heights, widths = heights.to(torch.float64), widths.to(torch.float64)
    batch = heights.shape[0]
    area = (heights * widths)[:, None]
    target = area * _uniform((batch, CROP_TRIES), scale[0], scale[1], generator)
    aspect = _uniform((batch, CROP_TRIES), math.log(ratio[0]), math.log(ratio[1]), generator).exp()
    w_try, h_try = torch.round(torch.sqrt(target * aspect)), torch.round(torch.sqrt(target / aspect))
    fits = (w_try > 0) & (w_try <= widths[:, None]) & (h_try > 0) & (h_try <= heights[:, None])
    first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # index of the first fitting try (0 if none fits)
    w, h = w_try.gather(1, first)[:, 0], h_try.gather(1, first)[:, 0]

    in_ratio = widths / heights  # fallback: centre crop of the whole image, aspect clamped to `ratio`
    fallback_w = torch.where(in_ratio > ratio[1], torch.round(heights * ratio[1]), widths)
    fallback_h = torch.where(in_ratio < ratio[0], torch.round(widths / ratio[0]), heights)
    found = fits.any(dim=1)
    w, h = torch.where(found, w, fallback_w), torch.where(found, h, fallback_h)

    offsets = torch.rand((batch, 2), generator=generator, dtype=torch.float64)
    top = torch.where(found, torch.floor(offsets[:, 0] * (heights - h + 1)), torch.floor((heights - h) / 2))
    left = torch.where(found, torch.floor(offsets[:, 1] * (widths - w + 1)), torch.floor((widths - w) / 2))
    return torch.stack([left, top, left + w, top + h], dim=1).float()


def sample_view_params(specs: Sequence[ViewSpec], sizes: torch.Tensor,
                       generator: torch.Generator | None = None) -> ViewParams:
    """All random parameters of the views `specs` for images of `sizes` (B, 2) = (height, width), view-major (row
    v * B + i: view v of image i). Each parameter is one draw for every row at once (a few host ops per batch, not
    per view); the rows are independent, each with its own view's scale and probabilities."""
    views, batch = len(specs), sizes.shape[0]
    count = views * batch

    def coin(p: float | torch.Tensor) -> torch.Tensor:
        return torch.rand(count, generator=generator, dtype=torch.float64) < p

    heights, widths = sizes.to(torch.float64).repeat(views, 1).unbind(dim=1)
    per_view = [(*spec.scale, spec.blur_p, *spec.sigma, spec.solarize_p) for spec in specs]
    scale_low, scale_high, blur_p, sigma_low, sigma_high, solarize_p = (
        torch.tensor(per_view, dtype=torch.float64).repeat_interleave(batch, dim=0).unbind(dim=1))
    boxes = sample_crop_boxes(heights, widths, (scale_low[:, None], scale_high[:, None]), generator)
    flip, jitter = coin(FLIP_P), coin(JITTER_P)
    factors = _uniform((count, len(JITTER_OPS)), JITTER_RANGES[:, 0], JITTER_RANGES[:, 1], generator).float()
    order = torch.rand((count, len(JITTER_OPS)), generator=generator).argsort(dim=1)  # uniform permutations
    gray, blur = coin(GRAYSCALE_P), coin(blur_p)
    sigma = _uniform((count,), sigma_low, sigma_high, generator).float()
    solarize = coin(solarize_p)
    return ViewParams(boxes, flip, jitter, factors, order, gray, blur, sigma, solarize)


# ------------------------------------------------------------------------------------------- per-sample ops
# Each takes a float batch (n, 3, h, w) in [0, 1] and one factor per sample, and equals the torchvision.transforms.v2
# functional op applied to each sample with its own factor.

def _per_sample(factor: torch.Tensor) -> torch.Tensor:
    return factor.reshape(-1, 1, 1, 1)


def blend(images: torch.Tensor, weight: torch.Tensor, gray_weight: torch.Tensor,
          mean_weight: torch.Tensor) -> torch.Tensor:
    """clamp(w x + g gray(x) + m mean(gray(x)), 0, 1) with per-sample weights (n, 1, 1, 1): torchvision's brightness,
    saturation and contrast with factor f are this blend with (w, g, m) = (f, 0, 0), (f, 1 - f, 0), (f, 0, 1 - f),
    the identity is (1, 0, 0), so one pass applies to each sample whichever of them it draws."""
    gray = rgb_to_grayscale(images)
    out = (images * weight).addcmul_(gray_weight, gray)
    return out.addcmul_(mean_weight, gray.mean(dim=(-3, -2, -1), keepdim=True)).clamp_(0, 1)


def adjust_brightness(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    factor = _per_sample(factor)
    return blend(images, factor, torch.zeros_like(factor), torch.zeros_like(factor))


def adjust_contrast(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    factor = _per_sample(factor)
    return blend(images, factor, torch.zeros_like(factor), 1 - factor)


def adjust_saturation(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    factor = _per_sample(factor)
    return blend(images, factor, 1 - factor, torch.zeros_like(factor))


def adjust_hue(images: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue by `factor` turns, in closed form: channel_n = V - C * clamp(min(k, 4 - k), 0, 1),
    k = (n + 6 H + 6 factor) mod 6, n = 5, 3, 1 for R, G, B (value V = max and chroma C = max - min are unchanged by
    a hue rotation); 6 H = 2 m + (next - previous channel) / C at the largest channel m (ties give the same hue)."""
    value, largest = images.max(dim=-3, keepdim=True)
    chroma = value - images.amin(dim=-3, keepdim=True)
    turn = (images.roll(-1, dims=-3) - images.roll(1, dims=-3)).gather(-3, largest)
    hue6 = turn / chroma.clamp(min=1e-12) + 2 * largest + 6 * _per_sample(factor)  # turn is 0 where C is
    offsets = torch.arange(5.0, 0.0, -2.0, device=images.device).view(1, 3, 1, 1)  # 5, 3, 1 without a copy
    k = torch.remainder(hue6 + offsets, 6.0)
    return value - chroma * torch.minimum(k, 4 - k).clamp_(0, 1)


def color_jitter(images: torch.Tensor, factors: torch.Tensor, order: torch.Tensor, apply: torch.Tensor) -> torch.Tensor:
    """ColorJitter with per-sample factors (n, 4) and op order (n, 4), on the samples where `apply` (n,) is set.

    At each of the 4 positions every sample goes through one `blend`, with the weights of its brightness, contrast
    or saturation there or the identity's. The hue rotation (some 20 kernels) runs only on the samples whose op
    there is hue: sorted by their hue's position (one gather in, one out), those of each position are a slice (a
    view). factors/order/apply live on the CPU, so none of this waits for the device.
    """
    device, (count, positions) = images.device, order.shape
    # Position of each sample's hue op; `positions` (after all of them) for the samples without jitter.
    hue_position = torch.where(apply, (order == HUE_OP).to(torch.uint8).argmax(dim=1), positions)
    sort = hue_position.argsort(stable=True)
    hue_counts = torch.bincount(hue_position, minlength=positions + 1).tolist()
    ops, on = order[sort], apply[sort, None]
    factor = factors[sort].gather(1, ops)  # (n, positions): the factor of the op at each position
    weight = torch.where(on & (ops != HUE_OP), factor, 1.0)
    rest = 1 - weight
    weights = torch.stack([weight, torch.where(ops == SATURATION_OP, rest, 0.0),
                           torch.where(ops == CONTRAST_OP, rest, 0.0)]).permute(2, 0, 1)  # (positions, 3, n)
    per_sample = torch.cat([weights.reshape(-1, count), factors[sort, HUE_OP][None]]).view(-1, count, 1, 1, 1)
    *blend_weights, hue = to_device(per_sample, device).unbind()  # one copy to the device
    gathers = to_device(torch.stack([sort, sort.argsort()]), device)
    images = images.index_select(0, gathers[0])
    start = 0
    for position in range(positions):
        images = blend(images, *blend_weights[3 * position:3 * position + 3])
        if hue_counts[position]:
            rotated = images.narrow(0, start, hue_counts[position])
            rotated.copy_(adjust_hue(rotated, hue.narrow(0, start, hue_counts[position])))
            start += hue_counts[position]
    return images.index_select(0, gathers[1])


def gaussian_kernels(sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Normalized 1-D Gaussian kernels (n, 2 * radius + 1), one per sigma."""
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=sigma.device)
    weights = torch.exp(-0.5 * (x / sigma[:, None]) ** 2)
    return weights / weights.sum(dim=1, keepdim=True)


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Separable Gaussian blur with one sigma per sample (n,), kernel 2 * radius + 1, reflect padding: equals
    torchvision's gaussian_blur(image, kernel_size=2 * radius + 1, sigma=s) of each sample."""
    n, channels, height, width = images.shape
    radius = min(radius, height - 1, width - 1)  # reflect padding needs pad < size
    kernels = gaussian_kernels(to_device(sigma.float(), images.device), radius).repeat_interleave(channels, dim=0)
    flat = images.reshape(1, n * channels, height, width)
    flat = F.pad(flat, (radius, radius, radius, radius), mode="reflect")
    kernels = kernels.to(images.dtype)
    flat = F.conv2d(flat, kernels.view(n * channels, 1, 1, -1), groups=n * channels)
    flat = F.conv2d(flat, kernels.view(n * channels, 1, -1, 1), groups=n * channels)
    return flat.reshape(n, channels, height, width)


def solarize(images: torch.Tensor, apply: torch.Tensor, threshold: float = SOLARIZE_THRESHOLD / 255) -> torch.Tensor:
    """Invert the pixels >= threshold of the samples where `apply` is set (PIL/torchvision solarize)."""
    inverted = torch.where(images >= threshold, 1 - images, images)
    return torch.where(_per_sample(to_device(apply, images.device)), inverted, images)


# ---------------------------------------------------------------------------------------------- the pipeline

def pad_images(images: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """A list of uint8 (3, H_i, W_i) images -> (padded batch (B, 3, H_max, W_max), sizes (B, 2) = (H_i, W_i)).

    The padding repeats each image's last row and column, so bilinear samples at an image edge never read zeros.
    (The resampling reads at most one pixel beyond an edge: a batch whose first padding row and column repeat the
    edge, as batched_data.pack_images makes them, gives the same crops.)
    """
    if len(images) == 0:
        raise ValueError("the batch of images is empty")
    for index, image in enumerate(images):
        if image.ndim != 3 or image.shape[0] != 3 or image.dtype != torch.uint8:
            raise ValueError(f"image {index} must be a uint8 (3, H, W) tensor, got {image.dtype} "
                             f"{tuple(image.shape)}")
    sizes = torch.tensor([tuple(image.shape[1:]) for image in images], dtype=torch.long)
    max_h, max_w = (int(v) for v in sizes.max(dim=0).values)
    return torch.stack([F.pad(image, (0, max_w - image.shape[2], 0, max_h - image.shape[1]), mode="replicate")
                        for image in images]), sizes


class BatchedMultiCrop:
    """uint8 images (a list of (3, H, W) tensors, or a padded (batch, sizes) as pad_images or batched_data.pack_images
    make them; sizes on the CPU) -> [global 1, global 2, local 1..N] as ImageNet-normalized (B, 3, size, size)
    tensors on the images' device: the trainer's crop list.

    Randomness comes only from `generator` (a CPU torch.Generator; None = torch's global one), so a seed gives the
    same crops on any device.
    """

    def __init__(self, global_crops_scale: Sequence[float] = (0.4, 1.0),
                 local_crops_scale: Sequence[float] = (0.05, 0.4), local_crops_number: int = 8,
                 global_crop_size: int = 224, local_crop_size: int = 96,
                 out_dtype: torch.dtype = torch.float32) -> None:
        global_scale, local_scale = check_multicrop_args(global_crops_scale, local_crops_scale, local_crops_number,
                                                         global_crop_size, local_crop_size)
        sigma = blur_sigma_range(global_crop_size)
        self.views = [ViewSpec(global_crop_size, global_scale, GLOBAL1_BLUR_P, 0.0, sigma),
                      ViewSpec(global_crop_size, global_scale, GLOBAL2_BLUR_P, GLOBAL2_SOLARIZE_P, sigma)]
        self.views += [ViewSpec(local_crop_size, local_scale, LOCAL_BLUR_P, 0.0, sigma)] * local_crops_number
        self.groups: list[tuple[int, int]] = []  # (first view, number of views): consecutive views of one size
        for index, view in enumerate(self.views):
            if self.groups and self.views[self.groups[-1][0]].size == view.size:
                self.groups[-1] = (self.groups[-1][0], self.groups[-1][1] + 1)
            else:
                self.groups.append((index, 1))
        self.out_dtype = out_dtype
        self.mean, self.std = (torch.tensor(values).view(1, 3, 1, 1) for values in (IMAGENET_MEAN, IMAGENET_STD))

    def sample(self, sizes: torch.Tensor, generator: torch.Generator | None = None) -> list[ViewParams]:
        """The random parameters of every view for images of `sizes` (B, 2)."""
        return sample_view_params(self.views, sizes, generator).split(len(self.views))

    def __call__(self, images: Sequence[torch.Tensor] | torch.Tensor, sizes: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> list[torch.Tensor]:
        if sizes is None:
            if isinstance(images, torch.Tensor):
                raise ValueError("a padded batch needs its sizes (B, 2); pass a list of images or pad_images' output")
            batch, sizes = pad_images(images)
        else:
            batch = images
            if (batch.ndim != 4 or batch.shape[1] != 3 or batch.dtype != torch.uint8
                    or sizes.shape != (batch.shape[0], 2)):
                raise ValueError(f"expected a uint8 (B, 3, H, W) batch and (B, 2) sizes, got {batch.dtype} "
                                 f"{tuple(batch.shape)} and {tuple(sizes.shape)}")
        sizes = sizes.cpu()
        return self._crops(batch, sample_view_params(self.views, sizes, generator))

    def apply(self, batch: torch.Tensor, sizes: torch.Tensor, params: Sequence[ViewParams]) -> list[torch.Tensor]:
        """Crops of a padded uint8 batch with given parameters (one ViewParams per view)."""
        return self._crops(batch, ViewParams.cat(params))

    def _crops(self, batch: torch.Tensor, params: ViewParams) -> list[torch.Tensor]:
        """Crops of every view from the parameters of all views (view-major), in one pass per crop-size group."""
        pixels, images = batch.float(), batch.shape[0]
        crops: list[torch.Tensor] = []
        for first, views in self.groups:  # the views of one size share every kernel launch
            out = self._augment(pixels, params.narrow(first * images, views * images), self.views[first])
            crops.extend(out.chunk(views))
        return crops

    def _augment(self, pixels: torch.Tensor, params: ViewParams, spec: ViewSpec) -> torch.Tensor:
        device = pixels.device
        batch_index = torch.arange(params.boxes.shape[0]) % pixels.shape[0]
        rois = to_device(torch.cat([batch_index[:, None].float(), params.boxes], dim=1), device)
        images = roi_align(pixels, rois, output_size=spec.size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
        images = images.div_(255).clamp_(0, 1)
        masks = torch.stack([params.flip, params.gray, params.blur])[:, :, None, None, None]
        flip, gray, blur = to_device(masks, device).unbind()
        images = torch.where(flip, images.flip(-1), images)
        images = color_jitter(images, params.factors, params.order, params.jitter)
        images = torch.where(gray, rgb_to_grayscale(images, num_output_channels=3), images)
        if params.blur.any():
            # The whole batch, then a per-sample choice: the convolution sees one shape per crop size, however many
            # samples drew a blur (a shape per count would make cudnn.benchmark tune each of ~B shapes).
            images = torch.where(blur, gaussian_blur(images, params.sigma, spec.blur_radius), images)
        if params.solarize.any():
            images = solarize(images, params.solarize)
        return ((images - to_device(self.mean, device)) / to_device(self.std, device)).to(self.out_dtype)
