"""Official DINO's visualize_attention.py command line and files: the last attention of one image, per head.

    python visualize_attention.py --pretrained_weights out/checkpoint.pth --image_path photo.jpg \
        --image_size 480 480 --output_dir attention/ --threshold 0.6

Writes what the official script writes to --output_dir: `img.png` (the resized image), `attn-head<j>.png` (head j's
CLS attention over the patches in the last block, upsampled by the patch size) and, with --threshold t,
`mask_th<t>_head<j>.png` (the smallest set of patches that holds a fraction t of that attention, over the image).
For a slot read-out (*_sparo; *_mhca averaged over its heads) the last attention is the read-out's, so the files are
`attn-slot<j>.png` and `mask_th<t>_slot<j>.png`, one per slot. The model comes from the checkpoint's config; --arch
and --patch_size (official defaults vit_small and 8) apply to plain state dicts. Nothing is downloaded: weights and
image must be given.
"""
from __future__ import annotations

import argparse
import os
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only; no display on clusters or in CI
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD  # noqa: E402
from torchvision import transforms  # noqa: E402

import sparo_vit  # noqa: E402
from sparo_dino.cli import errors as cli_errors  # noqa: E402
from sparo_dino.cli import eval_flags  # noqa: E402
from sparo_dino.cli.errors import require_writable_dirs  # noqa: E402
from sparo_dino.io import weights
from visualize_slots import for_display, load_named_backbone  # noqa: E402

OFFICIAL_PLAIN_DEFAULTS = {"arch": "vit_small", "patch_size": 8}  # official flag defaults (its paper figures)


def build_parser() -> argparse.ArgumentParser:
    """Official flags, names and defaults; arch and patch size are read from a checkpoint's config instead."""
    parser = cli_errors.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=str, default=None, choices=sparo_vit.ARCHS,
                        help="for a plain state dict (default vit_small); else read from the checkpoint's config")
    parser.add_argument("--patch_size", type=int, default=None,
                        help="for a plain state dict (default 8); else read from the checkpoint's config")
    parser.add_argument("--pretrained_weights", type=str, default="", help="checkpoint or plain state dict")
    parser.add_argument("--checkpoint_key", type=str, default="teacher", choices=weights.TRAINING_KEYS)
    parser.add_argument("--image_path", type=str, default=None, help="the image to visualize")
    parser.add_argument("--image_size", type=int, nargs="+", default=(480, 480),
                        help="Resize: (height, width), or one size for the shorter side")
    parser.add_argument("--output_dir", type=str, default=".", help="where the PNG files go")
    parser.add_argument("--threshold", type=float, default=None,
                        help="also draw masks that keep this fraction of each head's attention mass")
    return parser


def load_image(path: str, size: Sequence[int], patch_size: int) -> torch.Tensor:
    """(1, 3, H, W): resized and normalized as official, then cropped to a multiple of the patch size."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image not found: {path}")
    if not 1 <= len(size) <= 2:
        raise ValueError(f"--image_size takes one size (shorter side) or two (height width), got {list(size)}")
    try:
        picture = Image.open(path).convert("RGB")
    except OSError as error:
        raise ValueError(f"cannot read image {path}: {error}") from error
    transform = transforms.Compose([transforms.Resize(size[0] if len(size) == 1 else list(size)),
                                    transforms.ToTensor(),
                                    transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])
    image = transform(picture)
    height, width = image.shape[1] - image.shape[1] % patch_size, image.shape[2] - image.shape[2] % patch_size
    if min(height, width) == 0:
        raise ValueError(f"--image_size {list(size)} is smaller than the patch size {patch_size}")
    return image[None, :, :height, :width]


def mass_masks(weights: torch.Tensor, threshold: float) -> torch.Tensor:
    """Per row of (n, N) attention weights, the largest weights that together hold `threshold` of the row's mass:
    a weight is kept when the weights above it hold less than `threshold` (official DINO's --threshold)."""
    values, order = weights.sort(dim=-1)
    mass_up_to = (values / values.sum(dim=-1, keepdim=True)).cumsum(dim=-1)
    return torch.zeros_like(order, dtype=torch.bool).scatter(-1, order, mass_up_to > 1 - threshold)


def save_mask_figure(picture: torch.Tensor, mask: torch.Tensor, path: str) -> None:
    """The image with the mask tinted and outlined, at the image's own pixel size."""
    height, width = mask.shape
    fig = plt.figure(figsize=(width / 100, height / 100), dpi=100, frameon=False)
    ax = fig.add_axes((0.0, 0.0, 1.0, 1.0))
    ax.set_axis_off()
    tint = torch.tensor([0.1, 0.9, 0.9])
    alpha = 0.5 * mask.float()[..., None]
    ax.imshow(((1 - alpha) * picture + alpha * tint).numpy())
    if mask.any() and not mask.all():
        ax.contour(mask.float().numpy(), levels=[0.5], colors=[tint.tolist()], linewidths=1)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> list[str]:
    args = build_parser().parse_args(argv)
    require_writable_dirs({"--output_dir": args.output_dir})
    if not args.pretrained_weights:
        raise ValueError("--pretrained_weights is required: no reference weights are downloaded")
    if args.image_path is None:
        raise ValueError("--image_path is required: no example image is downloaded")
    if args.threshold is not None and not 0 < args.threshold <= 1:
        raise ValueError(f"--threshold must be in (0, 1], got {args.threshold}")
    given = {"arch": args.arch, "patch_size": args.patch_size}
    backbone, options, _ = load_named_backbone(args.pretrained_weights, args.checkpoint_key, given,
                                               "give --arch and --patch_size", OFFICIAL_PLAIN_DEFAULTS)
    patch_size = options["patch_size"]
    image = load_image(args.image_path, args.image_size, patch_size)
    if sparo_vit.has_slots(options["arch"]):
        kind, (maps, _) = "slot", sparo_vit.slot_attention_maps(backbone, image)
    else:
        kind, (maps, _) = "head", sparo_vit.cls_attention_maps(backbone, image)
    maps = maps[0]  # (n, h, w)
    upsampled = F.interpolate(maps[None], scale_factor=patch_size, mode="nearest")[0]
    os.makedirs(args.output_dir, exist_ok=True)
    picture = for_display(image)[0]
    written = [os.path.join(args.output_dir, "img.png")]
    plt.imsave(written[0], picture.numpy())
    for j, heat in enumerate(upsampled):
        written.append(os.path.join(args.output_dir, f"attn-{kind}{j}.png"))
        plt.imsave(written[-1], heat.numpy(), format="png")
    if args.threshold is not None:
        masks = mass_masks(maps.flatten(1), args.threshold).view_as(maps).float()
        masks = F.interpolate(masks[None], scale_factor=patch_size, mode="nearest")[0].bool()
        for j, mask in enumerate(masks):
            written.append(os.path.join(args.output_dir, f"mask_th{args.threshold}_{kind}{j}.png"))
            save_mask_figure(picture, mask, written[-1])
    print(f"{len(written)} files written to {args.output_dir}: img.png, attn-{kind}0..{len(maps) - 1}.png"
          + (f", mask_th{args.threshold}_{kind}*.png" if args.threshold is not None else ""))
    return written


if __name__ == "__main__":
    eval_flags.run_cli(main)
