"""See what SPARO slots attend to: attention-map grids and slot galleries from a checkpoint (any slot read-out:
*_sparo, and *_mhca, whose slot maps average its heads).

    python visualize_slots.py --pretrained_weights out/checkpoint.pth --images img1.jpg photos/ --select_by entropy
    python visualize_slots.py --pretrained_weights out/checkpoint.pth --dataset fashion_mnist --split val \
        --num_images 8 --select_by knn --knn_results out/knn_checkpoint_teacher.json --gallery_query 0
    python visualize_slots.py --pretrained_weights sparo/checkpoint.pth --compare_weights dino/checkpoint.pth \
        --images photos/                                         # baseline heads above SPARO slots, same images

The grid has one row per selected slot and one column per image: each cell is the slot's attention over the patch
tokens (not renormalized; its share on CLS is printed in the corner), upsampled and overlaid on the image. The
gallery shows, for each selected slot, the dataset images whose slot vector is nearest (cosine) to the query
image's, so a slot's concept can be seen across images. Slots are chosen by index (--slots), by per-slot k-NN
top-1 from eval_knn.py --per_slot (--select_by knn), or by attention sharpness (--select_by entropy). With
--compare_weights, a second grid puts a baseline DINO checkpoint's per-head CLS attention in the last block (what
official DINO's visualize_attention.py draws) above the selected slots, on the same images.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # files only; no display on clusters or in CI
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD  # noqa: E402

import sparo_vit  # noqa: E402
from sparo_dino.cli import config, eval_flags  # noqa: E402
from sparo_dino.cli import errors as cli_errors  # noqa: E402
from sparo_dino.data import datasets
from sparo_dino.eval import feature_cache
from sparo_dino.io import weights
from sparo_dino.model import registry

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def build_parser() -> argparse.ArgumentParser:
    parser = cli_errors.ArgumentParser(description=__doc__.split("\n\n")[0],
                                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    eval_flags.add_feature_args(parser)
    group = parser.add_argument_group("images")
    group.add_argument("--images", type=str, nargs="*", default=None, help="image files and/or folders of images")
    group.add_argument("--split", type=str, default="val", choices=feature_cache.SPLITS,
                       help="dataset split to draw images from when --images is not given")
    group.add_argument("--num_images", type=int, default=8, help="columns of the grid")
    group = parser.add_argument_group("slot selection")
    group.add_argument("--slots", type=int, nargs="*", default=None,
                       help="slot indices to show (overrides --select_by)")
    group.add_argument("--select_by", type=str, default="entropy", choices=("index", "knn", "entropy"),
                       help="index: first slots; knn: best per-slot k-NN top-1; entropy: sharpest attention")
    group.add_argument("--num_slots_shown", type=int, default=8)
    group.add_argument("--knn_results", type=str, default=None,
                       help="JSON written by eval_knn.py --per_slot (for --select_by knn)")
    group = parser.add_argument_group("gallery")
    group.add_argument("--gallery_query", type=int, default=None,
                       help="column index of the query image; draws a slot gallery from the --split dataset")
    group.add_argument("--gallery_pool", type=int, default=2000, help="dataset images searched for the gallery")
    group.add_argument("--gallery_size", type=int, default=8, help="nearest images per slot")
    group = parser.add_argument_group("comparison with a baseline")
    group.add_argument("--compare_weights", type=str, default=None,
                       help="baseline (vit_tiny|small|base) checkpoint whose last-block head maps are drawn above "
                            "the slots (same --checkpoint_key)")
    group.add_argument("--compare_arch", type=str, default=None, choices=sparo_vit.ARCHS,
                       help="arch of --compare_weights when it is a plain state dict (else read from its config)")
    group.add_argument("--compare_patch_size", type=int, default=None,
                       help="patch size of --compare_weights when it is a plain state dict")
    return parser


def load_named_backbone(path: str, checkpoint_key: str, given: Mapping[str, Any], plain_hint: str,
                        plain_defaults: Mapping[str, Any] | None = None) -> tuple[torch.nn.Module, dict[str, Any], str]:
    """(frozen backbone, build options, tag) of a weights file whose model flags are not the evaluation flags
    (--compare_weights; official visualize_attention.py flags), through the evaluation loader: the file's config
    wins and `given` model options fill its gaps (a contradiction is an error). For a plain state dict,
    `plain_defaults` fill what is still unset, and `plain_hint` says which flags give the arch and patch size when
    they stay unknown."""
    loaded = weights.read_weights(path, checkpoint_key)
    flags = {key: given.get(key) for key in weights.BACKBONE_OPTION_KEYS}
    if loaded.config is None:
        flags.update({key: value for key, value in (plain_defaults or {}).items() if flags.get(key) is None})
        if flags["arch"] is None or flags["patch_size"] is None:
            raise ValueError(f"{path} is a plain state dict without a config; {plain_hint}")
    options = weights.resolve_model_options(flags, loaded.config)
    return weights.build_frozen_backbone(options, loaded.state_dict, path), options, loaded.tag


def image_files(entries: Sequence[str]) -> list[Path]:
    files: list[Path] = []
    for entry in entries:
        path = Path(entry)
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"image or folder not found: {entry}")
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {', '.join(entries)}")
    return files


def split_dataset(args: argparse.Namespace, transform):
    return datasets.build_dataset(args.dataset, eval_flags.data_path(args), split=args.split, transform=transform)


def load_images(args: argparse.Namespace) -> torch.Tensor:
    """Normalized evaluation views (B, 3, crop, crop) of --images, or of the first --num_images of the split."""
    from sparo_dino.data.augmentation import eval_transform

    transform = eval_transform(args.resize_size, args.crop_size)
    if args.images:
        pictures = []
        for path in image_files(args.images)[:args.num_images]:
            try:
                pictures.append(transform(Image.open(path).convert("RGB")))
            except OSError as error:
                raise ValueError(f"cannot read image {path}: {error}") from error
        return torch.stack(pictures)
    dataset = split_dataset(args, transform)
    count = min(args.num_images, len(dataset))
    return torch.stack([dataset[i][0] for i in range(count)])


def for_display(images: torch.Tensor) -> torch.Tensor:
    """Undo the ImageNet normalization: (B, H, W, 3) in [0, 1]."""
    mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_DEFAULT_STD).view(1, 3, 1, 1)
    return (images.cpu() * std + mean).clamp(0, 1).permute(0, 2, 3, 1)


def attention_entropy(maps: torch.Tensor, cls_share: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of each slot's attention over all tokens, (L,): low means a sharp, selective slot."""
    weights = torch.cat([cls_share[..., None], maps.flatten(2)], dim=-1).clamp_min(1e-12)
    return -(weights * weights.log()).sum(dim=-1).mean(dim=0)


def choose_slots(args: argparse.Namespace, num_slots: int, maps: torch.Tensor, cls_share: torch.Tensor) -> list[int]:
    if args.slots:
        bad = [s for s in args.slots if not 0 <= s < num_slots]
        if bad:
            raise ValueError(f"slot indices {bad} out of range: this model has {num_slots} slots (0..{num_slots - 1})")
        return list(args.slots)
    count = min(args.num_slots_shown, num_slots)
    if args.select_by == "index":
        return list(range(count))
    if args.select_by == "entropy":
        return attention_entropy(maps, cls_share).argsort()[:count].tolist()
    if args.knn_results is None:
        raise ValueError("--select_by knn needs --knn_results (the JSON of eval_knn.py --per_slot)")
    with open(args.knn_results) as handle:
        results = json.load(handle)
    if "per_slot" not in results:
        raise ValueError(f"{args.knn_results} has no per-slot accuracies; run eval_knn.py with --per_slot")
    top1 = results["per_slot"]["top1"]
    if len(top1) != num_slots:
        raise ValueError(f"{args.knn_results} scores {len(top1)} slots but this model has {num_slots}")
    return sorted(range(num_slots), key=lambda s: -top1[s])[:count]


@dataclass(frozen=True)
class MapRow:
    """One row of an attention grid: per image, a map over the patch grid and the share the attention puts on CLS.
    Rows of different models (patch sizes) share a grid, since each map is upsampled to the image on its own."""
    label: str
    maps: torch.Tensor  # (B, h, w)
    cls_share: torch.Tensor  # (B,)


def map_rows(name: str, maps: torch.Tensor, cls_share: torch.Tensor, indices: Sequence[int]) -> list[MapRow]:
    """Rows `name i` for the chosen slots or heads i of (B, n, h, w) maps and (B, n) CLS shares."""
    return [MapRow(f"{name} {i}", maps[:, i], cls_share[:, i]) for i in indices]


def render_attention_grid(images: torch.Tensor, rows: Sequence[MapRow], path: str) -> str:
    """One row per MapRow, one column per image; each map upsampled over the image, its CLS share in the corner."""
    pictures = for_display(images)
    cols = images.shape[0]
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.6 * cols, 1.6 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        upsampled = F.interpolate(row.maps[:, None].float(), size=images.shape[-2:], mode="nearest")[:, 0]
        for c in range(cols):
            ax = axes[r][c]
            heat = upsampled[c]
            ax.imshow(pictures[c].numpy())
            ax.imshow((heat / heat.max().clamp_min(1e-12)).numpy(), cmap="inferno", alpha=0.6)
            ax.text(1, 1, f"cls {row.cls_share[c]:.2f}", color="white", fontsize=6, va="top")
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(row.label, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


@torch.no_grad()
def slot_vectors(backbone: sparo_vit.DinoVisionTransformer, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Per-slot outputs (B, L, V) of the read-out."""
    return torch.cat([backbone.slot_readout(backbone.tokens(images[i:i + batch_size]))
                      for i in range(0, len(images), batch_size)])


def render_gallery(query: torch.Tensor, pool: torch.Tensor, query_slots: torch.Tensor, pool_slots: torch.Tensor,
                   slots: Sequence[int], size: int, path: str, exclude: int | None = None) -> str:
    """Per slot: the query, then the pool images whose slot vector is nearest (cosine) to the query's.

    `exclude` is the query's own index when it was drawn from the pool, so it does not show up as its own match."""
    size = min(size, len(pool) - (exclude is not None))
    pictures, query_picture = for_display(pool), for_display(query[None])[0]
    fig, axes = plt.subplots(len(slots), size + 1, figsize=(1.4 * (size + 1), 1.4 * len(slots)), squeeze=False)
    for r, slot in enumerate(slots):
        similarity = F.normalize(pool_slots[:, slot], dim=-1) @ F.normalize(query_slots[slot], dim=-1)
        if exclude is not None:
            similarity[exclude] = -float("inf")
        nearest = similarity.topk(size).indices
        axes[r][0].imshow(query_picture.numpy())
        axes[r][0].set_ylabel(f"slot {slot}", fontsize=8)
        for c, index in enumerate(nearest.tolist(), start=1):
            axes[r][c].imshow(pictures[index].numpy())
            axes[r][c].set_title(f"{similarity[index]:.2f}", fontsize=6)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0][0].set_title("query", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def render_comparison(args: argparse.Namespace, images: torch.Tensor, slot_rows: Sequence[MapRow], tag: str,
                      output_dir: str) -> dict[str, object]:
    """Grid of the --compare_weights baseline's head maps (every head) above the SPARO slot rows, same images."""
    given = {"arch": args.compare_arch, "patch_size": args.compare_patch_size}
    baseline, options, baseline_tag = load_named_backbone(args.compare_weights, args.checkpoint_key, given,
                                                          "give --compare_arch and --compare_patch_size")
    if sparo_vit.has_slots(options["arch"]):
        raise ValueError(f"--compare_weights needs a checkpoint without slots (e.g. vit_tiny|small|base); "
                         f"{args.compare_weights} is {options['arch']}")
    maps, cls_share = sparo_vit.cls_attention_maps(baseline, images)
    rows = map_rows(f"{options['arch']} head", maps, cls_share, range(maps.shape[1])) + list(slot_rows)
    path = render_attention_grid(images, rows, os.path.join(output_dir, f"heads_{baseline_tag}_vs_slots_{tag}.png"))
    print(f"{maps.shape[1]} head maps of {args.compare_weights} above {len(slot_rows)} slot maps written to {path}")
    return {"comparison": path, "comparison_rows": [row.label for row in rows]}


def main(argv: Sequence[str] | None = None) -> dict[str, object]:
    args = config.parse_args(build_parser(), argv)
    eval_flags.check_output_dirs(args)
    backbone, options, tag = weights.load_backbone(args)
    if not sparo_vit.has_slots(options["arch"]):
        raise ValueError(f"slot maps need a slot read-out ({registry.arch_patterns('has_slots')}); "
                         f"{args.pretrained_weights} is {options['arch']}")
    images = load_images(args)
    maps, cls_share = sparo_vit.slot_attention_maps(backbone, images)
    slots = choose_slots(args, backbone.slot_readout.num_slots, maps, cls_share)
    output_dir = eval_flags.default_output_dir(args)
    os.makedirs(output_dir, exist_ok=True)
    outputs: dict[str, object] = {"slots": slots}
    slot_rows = map_rows("slot", maps, cls_share, slots)
    outputs["grid"] = render_attention_grid(images, slot_rows, os.path.join(output_dir, f"slot_maps_{tag}.png"))
    print(f"slot attention maps of slots {slots} written to {outputs['grid']}")
    if args.compare_weights is not None:
        outputs.update(render_comparison(args, images, slot_rows, tag, output_dir))
    if args.gallery_query is not None:
        if not 0 <= args.gallery_query < len(images):
            raise ValueError(f"--gallery_query {args.gallery_query} is not one of the {len(images)} images shown")
        from sparo_dino.data.augmentation import eval_transform

        dataset = split_dataset(args, eval_transform(args.resize_size, args.crop_size))
        pool = torch.stack([dataset[i][0] for i in range(min(args.gallery_pool, len(dataset)))])
        outputs["gallery"] = render_gallery(
            images[args.gallery_query], pool, slot_vectors(backbone, images[args.gallery_query:][:1], 1)[0],
            slot_vectors(backbone, pool, args.batch_size_per_gpu), slots, args.gallery_size,
            os.path.join(output_dir, f"slot_gallery_{tag}.png"),
            exclude=None if args.images else args.gallery_query)
        print(f"slot gallery for image {args.gallery_query} written to {outputs['gallery']}")
    return outputs


if __name__ == "__main__":
    eval_flags.run_cli(main)
