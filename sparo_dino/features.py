"""Frozen-backbone feature extraction shared by eval_knn.py and eval_linear.py.

Both evaluations need the same things: a backbone rebuilt from a training checkpoint (teacher by default) or a
plain state dict, the official Resize/CenterCrop view of a dataset, features computed by every rank on its own
shard and gathered so that each sample appears exactly once and in dataset order (a dataset that does not divide
by the number of ranks is neither padded nor truncated), and an on-disk cache so repeated evaluations skip the
forward passes. The architecture comes from the checkpoint's `config`; a flag that contradicts it is an error,
because silently building another model would load mismatched weights or evaluate the wrong thing.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, Sampler

import sparo_vit
from sparo_dino import augmentation, datasets, distributed
from sparo_dino.checkpoint import CheckpointError, load_checkpoint

MODEL_KEYS: tuple[str, ...] = ("arch", "patch_size", "img_size") + sparo_vit.SPARO_OPTIONS
TRAINING_KEYS: tuple[str, ...] = ("teacher", "student")
SPLITS: tuple[str, ...] = ("train", "val")
# Rows per rank and per collective when gathering features: bounds the extra (GPU) memory of the gather.
_GATHER_ROWS = 4096


def add_feature_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Flags every evaluation shares: weights, architecture, data, preprocessing, caching, output."""
    group = parser.add_argument_group("weights and architecture")
    group.add_argument("--pretrained_weights", type=str, default=None,
                       help="training checkpoint (with teacher/student/config) or a plain backbone state dict")
    group.add_argument("--checkpoint_key", type=str, default="teacher", choices=TRAINING_KEYS,
                       help="which network of a training checkpoint to evaluate")
    group.add_argument("--arch", type=str, default=None, choices=sparo_vit.ARCHS,
                       help="read from the checkpoint's config; required for a plain state dict")
    group.add_argument("--patch_size", type=int, default=None,
                       help="read from the checkpoint's config; required for a plain state dict")
    group.add_argument("--img_size", type=int, default=None,
                       help="position-embedding grid of the backbone (config; default 224 for a plain state dict)")
    for option in sparo_vit.SPARO_OPTIONS:
        group.add_argument(f"--{option}", type=int, default=None,
                           help="SPARO option, read from the checkpoint's config (default 64 / 1 for a plain state dict)")
    group = parser.add_argument_group("data")
    group.add_argument("--dataset", type=str, default="imagefolder", choices=datasets.DATASETS)
    group.add_argument("--data_path", type=str, default=None,
                       help="folder with train/ and val/ (imagefolder) or the Fashion-MNIST IDX files")
    group.add_argument("--resize_size", type=int, default=256, help="Resize of the evaluation view")
    group.add_argument("--crop_size", type=int, default=224, help="CenterCrop (and linear RandomResizedCrop) size")
    group.add_argument("--batch_size_per_gpu", type=int, default=128)
    group.add_argument("--num_workers", type=int, default=10)
    group = parser.add_argument_group("caching and output")
    group.add_argument("--dump_features", type=str, default=None,
                       help="save the extracted train/val features to this folder")
    group.add_argument("--load_features", type=str, default=None,
                       help="use features saved by --dump_features instead of running the backbone")
    group.add_argument("--output_dir", type=str, default=None,
                       help="where results go (default: next to the checkpoint, or the features folder)")
    return parser


# ----------------------------------------------------------------------------------------------- weights


@dataclass(frozen=True)
class Weights:
    """A backbone state dict and what the file said about the model that produced it."""
    state_dict: dict[str, torch.Tensor]
    config: dict[str, Any] | None  # the training run's flags; None for a plain state dict
    tag: str  # names result files: "<file stem>_<checkpoint key>" or "<file stem>"


def _strip_prefixes(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Drop DDP's `module.`, keep only `backbone.` entries when present (the DINO head is not evaluated)."""
    state = {key.removeprefix("module."): value for key, value in state.items()}
    if any(key.startswith("backbone.") for key in state):
        state = {key.removeprefix("backbone."): value for key, value in state.items() if key.startswith("backbone.")}
    return state


def read_weights(path: str, checkpoint_key: str = "teacher") -> Weights:
    """Read a training checkpoint (`checkpoint_key` network and its `config`) or a plain backbone state dict."""
    # The user named this file, so a pickled official DINO checkpoint may load (load_checkpoint warns).
    loaded = load_checkpoint(path, allow_pickle=True)
    if not isinstance(loaded, Mapping):
        raise ValueError(f"{path} holds a {type(loaded).__name__}, not a checkpoint dict or a state dict")
    stem = os.path.splitext(os.path.basename(path))[0]
    if any(key in loaded for key in TRAINING_KEYS):
        if not isinstance(loaded.get(checkpoint_key), Mapping):
            present = [key for key in TRAINING_KEYS if key in loaded]
            raise ValueError(f"{path} has no {checkpoint_key!r} network; it holds {', '.join(present)} "
                             "(choose with --checkpoint_key)")
        config = loaded.get("config")
        if config is None and "args" in loaded:  # official DINO pickles its argparse Namespace as `args`
            config = vars(loaded["args"])
        return Weights(_strip_prefixes(loaded[checkpoint_key]), dict(config) if config else None,
                       f"{stem}_{checkpoint_key}")
    if not all(isinstance(value, torch.Tensor) for value in loaded.values()):
        raise ValueError(f"{path} is neither a training checkpoint (no teacher/student key) nor a state dict of "
                         f"tensors; top-level keys: {', '.join(list(map(str, loaded))[:8])}")
    return Weights(_strip_prefixes(loaded), None, stem)


def resolve_model_options(args: argparse.Namespace, config: Mapping[str, Any] | None) -> dict[str, Any]:
    """build_backbone kwargs: the checkpoint's config wins, flags fill gaps, a contradicting flag is an error."""
    flags = {key: getattr(args, key, None) for key in MODEL_KEYS}
    if config is None:
        missing = [f"--{key}" for key in ("arch", "patch_size") if flags[key] is None]
        if missing:
            raise ValueError(f"{' and '.join(missing)} required: the weights are a plain state dict without a config")
        merged = dict(flags)
    else:
        merged = {}
        for key in MODEL_KEYS:
            stored = config.get(key)
            if stored is not None and flags[key] is not None and flags[key] != stored:
                raise ValueError(f"--{key} {flags[key]} conflicts with the checkpoint's config ({key}={stored}); "
                                 "drop the flag")
            merged[key] = stored if stored is not None else flags[key]
        if merged["arch"] is None:
            raise ValueError("the checkpoint's config names no arch; give --arch")
    if not sparo_vit.is_sparo_arch(merged["arch"]):
        given = [f"--{key}" for key in sparo_vit.SPARO_OPTIONS if flags[key] is not None]
        if given:
            raise ValueError(f"{', '.join(given)} apply only to *_sparo archs, not {merged['arch']}")
    kwargs = sparo_vit.backbone_kwargs(merged)
    kwargs.pop("drop_path_rate", None)
    kwargs.pop("grad_checkpointing", None)
    return kwargs


def build_frozen_backbone(options: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor],
                          source: str) -> nn.Module:
    """Build the backbone and load the weights strictly: a partial load would evaluate a random network."""
    backbone = sparo_vit.build_backbone(**options)
    own = backbone.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    if missing or unexpected:
        raise ValueError(f"weights in {source} do not fit {options['arch']} (patch {options.get('patch_size')}): "
                         f"missing {missing[:4]}, unexpected {unexpected[:4]}")
    for key, value in state_dict.items():
        if own[key].shape != value.shape:
            raise ValueError(f"weights in {source} do not fit {options}: {key} has shape {tuple(value.shape)}, "
                             f"the model expects {tuple(own[key].shape)}")
    backbone.load_state_dict(state_dict, strict=True)
    backbone.requires_grad_(False)
    return backbone.eval()


def load_backbone(args: argparse.Namespace) -> tuple[nn.Module, dict[str, Any], str]:
    """(frozen eval-mode backbone on CPU, its build options, result tag) from --pretrained_weights and flags."""
    if args.pretrained_weights is None:
        raise ValueError("--pretrained_weights is required (or --load_features with cached features)")
    weights = read_weights(args.pretrained_weights, args.checkpoint_key)
    options = resolve_model_options(args, weights.config)
    return build_frozen_backbone(options, weights.state_dict, args.pretrained_weights), options, weights.tag


# ----------------------------------------------------------------------------------------------- features


def feature_kind(arch: str, n_last_blocks: int = 1, avgpool: bool = False) -> str:
    """Name of what a feature vector holds, stored with cached features so a cache is never misused."""
    if sparo_vit.is_sparo_arch(arch):
        return "sparo_encoding"
    return f"cls_last{n_last_blocks}" + ("_avgpool" if avgpool else "")


def feature_function(backbone: nn.Module, kind: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """images -> features for a feature kind: the SPARO encoding (unnormalized) or final-norm CLS tokens of the
    last n blocks, optionally with the mean of the last block's patch tokens (official linear-probe features)."""
    if kind in ("sparo_encoding", "cls_last1"):
        return backbone
    if not kind.startswith("cls_last"):
        raise ValueError(f"unknown feature kind {kind!r}")
    avgpool = kind.endswith("_avgpool")
    n_blocks = int(kind.removeprefix("cls_last").removesuffix("_avgpool"))

    def features(images: torch.Tensor) -> torch.Tensor:
        parts = backbone.intermediate_cls(images, n_blocks)
        if avgpool:
            parts.append(backbone.tokens(images)[:, backbone.num_prefix_tokens:].mean(dim=1))
        return torch.cat(parts, dim=-1)

    return features


class ShardSampler(Sampler[int]):
    """Indices rank, rank + world, ... of a dataset: every sample on exactly one rank, nothing padded."""

    def __init__(self, num_samples: int, rank: int, world_size: int) -> None:
        self.indices = range(rank, num_samples, world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def gather_shards(local: torch.Tensor, num_samples: int, device: torch.device) -> torch.Tensor | None:
    """Reassemble rows sharded by ShardSampler into dataset order on the main process (None on other ranks).

    Rows travel in fixed-size padded chunks, so ranks with one row fewer (or none) still join every collective
    and the padding is dropped by position, never mistaken for a sample.
    """
    world = distributed.get_world_size()
    if world == 1:
        return local
    widths = {width for width in distributed.all_gather_object(local.shape[1] if len(local) else None)
              if width is not None}
    if len(widths) != 1:
        raise RuntimeError(f"ranks computed features of different widths {sorted(widths)}")
    width = widths.pop()
    local = local.reshape(len(local), width)
    per_rank = -(-num_samples // world)
    output = torch.empty(num_samples, width, dtype=local.dtype) if distributed.is_main_process() else None
    for start in range(0, per_rank, _GATHER_ROWS):
        chunk = torch.zeros(min(_GATHER_ROWS, per_rank - start), width, dtype=local.dtype)
        mine = local[start:start + len(chunk)]
        chunk[:len(mine)] = mine
        gathered = distributed.all_gather_tensor(chunk.to(device)).cpu().view(world, len(chunk), width)
        if output is not None:
            for rank in range(world):
                rows = torch.arange(rank + world * start, num_samples, world)[:len(chunk)]
                output[rows] = gathered[rank, :len(rows)]
    return output


@torch.no_grad()
def extract_features(feature_fn: Callable[[torch.Tensor], torch.Tensor], dataset: Dataset, batch_size: int,
                     num_workers: int, device: torch.device, name: str = "features"
                     ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(features (N, D) float32 CPU, labels (N,)) of the whole dataset in order on the main process, None elsewhere.

    Each rank runs its ShardSampler shard; results are gathered by position, so no sample is duplicated or lost.
    """
    if len(dataset) == 0:
        raise ValueError(f"cannot extract {name}: the dataset is empty")
    rank, world = distributed.get_rank(), distributed.get_world_size()
    loader = DataLoader(dataset, batch_size=batch_size, sampler=ShardSampler(len(dataset), rank, world),
                        num_workers=num_workers, pin_memory=device.type == "cuda", drop_last=False,
                        persistent_workers=False)
    features, labels = [], []
    started, report_every = time.time(), max(1, len(loader) // 10)
    for step, (images, targets) in enumerate(loader):
        features.append(feature_fn(images.to(device, non_blocking=True)).float().cpu())
        labels.append(torch.as_tensor(targets).long())
        if distributed.is_main_process() and ((step + 1) % report_every == 0 or step + 1 == len(loader)):
            print(f"{name}: {step + 1}/{len(loader)} batches on rank 0 ({time.time() - started:.0f}s)", flush=True)
    local = torch.cat(features) if features else torch.empty(0, 0)
    local_labels = torch.cat(labels) if labels else torch.empty(0, dtype=torch.long)
    gathered = gather_shards(local, len(dataset), device)
    gathered_labels = gather_shards(local_labels[:, None], len(dataset), device)
    if gathered is None:
        return None
    return gathered, gathered_labels[:, 0]


# ----------------------------------------------------------------------------------------------- data and cache


def data_path(args: argparse.Namespace) -> str:
    """--data_path, or the packaged Fashion-MNIST folder for --dataset fashion_mnist."""
    if args.data_path is not None:
        return args.data_path
    if args.dataset == "fashion_mnist":
        return datasets.FASHION_MNIST_DIR
    raise ValueError("--data_path is required for --dataset imagefolder (a folder holding train/ and val/)")


def build_splits(args: argparse.Namespace, train_transform: Callable, val_transform: Callable
                 ) -> tuple[Dataset, Dataset]:
    """Train and val of --dataset (Fashion-MNIST's val is its test set), with the same classes.

    ImageFolder numbers the class folders of each split on its own, so a val/ missing a class folder would shift
    every later label; that is an error rather than a silently wrong accuracy."""
    path = data_path(args)
    train = datasets.build_dataset(args.dataset, path, split="train", transform=train_transform)
    val = datasets.build_dataset(args.dataset, path, split="val", transform=val_transform)
    if list(train.classes) != list(val.classes):
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        raise ValueError(f"train and val splits of {path} have different classes (only in train: {only_train[:5]}, "
                         f"only in val: {only_val[:5]}); labels would not match")
    return train, val


@dataclass
class FeatureSet:
    """Features and labels of both splits plus what produced them."""
    train_features: torch.Tensor
    train_labels: torch.Tensor
    val_features: torch.Tensor
    val_labels: torch.Tensor
    classes: list[str]
    meta: dict[str, Any]  # kind, options (build_backbone kwargs), tag, source

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def save_features(features: FeatureSet, folder: str) -> None:
    os.makedirs(folder, exist_ok=True)
    for split in SPLITS:
        torch.save({"features": getattr(features, f"{split}_features"), "labels": getattr(features, f"{split}_labels"),
                    "classes": features.classes, "meta": features.meta},
                   os.path.join(folder, f"{split}_features.pth"))
    print(f"features saved to {folder}", flush=True)


def load_features(folder: str) -> FeatureSet:
    """Features saved by save_features."""
    splits = {}
    for split in SPLITS:
        path = os.path.join(folder, f"{split}_features.pth")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"cached features not found: {path} (write them with --dump_features)")
        splits[split] = torch.load(path, map_location="cpu", weights_only=True)
    meta = splits["train"]["meta"]
    return FeatureSet(splits["train"]["features"], splits["train"]["labels"], splits["val"]["features"],
                      splits["val"]["labels"], list(splits["train"]["classes"]), dict(meta))


def compute_features(args: argparse.Namespace, device: torch.device,
                     kind_for: Callable[[str], str] = feature_kind) -> FeatureSet | None:
    """Features of train and val from --load_features or the backbone (main process gets them, others None).

    `kind_for(arch)` names the features the evaluation needs (default: what k-NN uses)."""
    if args.load_features is not None:
        if not distributed.is_main_process():
            return None
        cached = load_features(args.load_features)
        options = cached.meta["options"]
        resolve_model_options(args, options)  # a flag contradicting the cached model is an error here too
        expected = kind_for(options["arch"])
        if cached.meta["kind"] != expected:
            raise ValueError(f"features in {args.load_features} are {cached.meta['kind']!r}, "
                             f"this evaluation needs {expected!r}")
        return cached
    backbone, options, tag = load_backbone(args)
    backbone.to(device)
    kind = kind_for(options["arch"])
    fn = feature_function(backbone, kind)
    transform = augmentation.eval_transform(args.resize_size, args.crop_size)
    splits = dict(zip(SPLITS, build_splits(args, transform, transform)))
    results = {split: extract_features(fn, dataset, args.batch_size_per_gpu, args.num_workers, device,
                                       name=f"{split} features") for split, dataset in splits.items()}
    if not distributed.is_main_process():
        return None
    meta = {"kind": kind, "options": options, "tag": tag, "source": os.path.abspath(args.pretrained_weights),
            "checkpoint_key": args.checkpoint_key, "dataset": args.dataset,
            "resize_size": args.resize_size, "crop_size": args.crop_size}
    features = FeatureSet(*results["train"], *results["val"], list(splits["train"].classes), meta)
    if args.dump_features is not None:
        save_features(features, args.dump_features)
    return features


def default_output_dir(args: argparse.Namespace) -> str:
    """--output_dir, else the checkpoint's folder, else the cached features' folder."""
    if args.output_dir is not None:
        return args.output_dir
    if args.pretrained_weights is not None:
        return os.path.dirname(os.path.abspath(args.pretrained_weights))
    return os.path.abspath(args.load_features)


def write_results(results: Mapping[str, Any], path: str) -> str:
    """Write an evaluation's results JSON (the file scripts parse) and say where it went."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as handle:
        json.dump(results, handle, indent=2)
    print(f"results written to {path}", flush=True)
    return path


def run_cli(main: Callable[[], Any]) -> None:
    """Run an evaluation entry point; bad input ends with one line naming the problem instead of a traceback."""
    try:
        main()
    except (ValueError, FileNotFoundError, CheckpointError, datasets.BadImageError) as error:
        sys.exit(f"error: {error}")
