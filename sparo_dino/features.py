"""Frozen-backbone feature extraction shared by eval_knn.py and eval_linear.py.

Both evaluations need the same things: a backbone rebuilt from a training checkpoint (teacher by default) or a
plain state dict, the official Resize/CenterCrop view of a dataset, features computed by every rank on its own
shard and gathered so that each sample appears exactly once and in dataset order (a dataset that does not divide
by the number of ranks is neither padded nor truncated), and an on-disk cache so repeated evaluations skip the
forward passes (in this repository's format, which keeps the raw features and says what produced them, and/or the
official DINO format, which other DINO tools read). The architecture comes from the checkpoint's `config`; a flag
that contradicts it is an error, because silently building another model would load mismatched weights or evaluate
the wrong thing.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

import sparo_vit
from sparo_dino import augmentation, datasets, distributed, networks
from sparo_dino.checkpoint import CheckpointError, load_checkpoint
from sparo_dino.cli_errors import exit_with, print_once, require_writable_dirs

MODEL_KEYS: tuple[str, ...] = ("arch", "patch_size", "img_size", "pos_embed_interpolation") + sparo_vit.SPARO_OPTIONS
TRAINING_KEYS: tuple[str, ...] = ("teacher", "student")
SPLITS: tuple[str, ...] = ("train", "val")
# What the SPARO linear probe reads (paper C.2, two readings): the encoding alone, or the encoding after the
# final-norm CLS of the n-1 trunk blocks before SPARO (official DINO's n_last_blocks idea).
SPARO_FEATURES: tuple[str, ...] = ("encoding", "encoding+cls")
# --dump_features formats: this repository's (raw features, classes, what produced them), official DINO's
# (L2-normalized features and labels as plain tensors, what official eval_knn.py --load_features reads), or both.
DUMP_FORMATS: tuple[str, ...] = ("own", "official", "both")
# Official DINO's dump: (features file, labels file) per split; its val split is called test.
OFFICIAL_DUMP_FILES: dict[str, tuple[str, str]] = {"train": ("trainfeat.pth", "trainlabels.pth"),
                                                   "val": ("testfeat.pth", "testlabels.pth")}
OFFICIAL_DUMP_KIND = "official_dump"
# Rows per rank and per collective when gathering features: bounds the extra (GPU) memory of the gather.
_GATHER_ROWS = 4096
# Where extracted features end up: gathered on the main process, gathered on every rank, or each rank's own shard.
GATHER_SCOPES: tuple[str, ...] = ("main", "all", "local")


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
    group.add_argument("--dump_format", type=str, default="own", choices=DUMP_FORMATS,
                       help="own: raw features with classes and model (train_features.pth, val_features.pth); "
                            "official: official DINO's L2-normalized trainfeat/testfeat/trainlabels/testlabels.pth; "
                            "both: the two")
    group.add_argument("--load_features", type=str, default=None,
                       help="use features saved by --dump_features (either format, e.g. an official DINO dump) "
                            "instead of running the backbone")
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
    # The user named this file, so an official DINO checkpoint may load (its Namespace through an allow-list).
    loaded = load_checkpoint(path, allow_official=True)
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


def load_backbone(args: argparse.Namespace, at_init: bool = False) -> tuple[nn.Module, dict[str, Any], str]:
    """(frozen eval-mode backbone on CPU, its build options, result tag) from --pretrained_weights and flags.

    With `at_init`, the network the checkpoint's run started from instead (same config and seed, weights before the
    first step): the random-init baseline that a trained result must clear to show that training did something.
    """
    if args.pretrained_weights is None:
        raise ValueError("--pretrained_weights is required (or --load_features with cached features)")
    weights = read_weights(args.pretrained_weights, args.checkpoint_key)
    options = resolve_model_options(args, weights.config)
    if not at_init:
        return build_frozen_backbone(options, weights.state_dict, args.pretrained_weights), options, weights.tag
    if weights.config is None:
        raise ValueError(f"the random-init baseline needs a training checkpoint with its config (seed, head); "
                         f"{args.pretrained_weights} is a plain state dict")
    with torch.random.fork_rng(devices=[]):  # rebuilding the init reseeds torch; leave the caller's stream alone
        initial = networks.initial_teacher_backbone(weights.config)
    return build_frozen_backbone(options, initial.state_dict(), "the run's random init"), options, \
        f"{weights.tag}_init"


# ----------------------------------------------------------------------------------------------- features


def feature_kind(arch: str, n_last_blocks: int = 1, avgpool: bool = False, sparo_features: str = "encoding") -> str:
    """Name of what a feature vector holds, stored with cached features so a cache is never misused.

    Baselines: `cls_last<n>[_avgpool]`. SPARO archs: `sparo_encoding`, or with sparo_features="encoding+cls"
    `cls_last<n-1>+sparo_encoding` (the CLS of the n-1 trunk blocks before SPARO, then the encoding)."""
    if not sparo_vit.is_sparo_arch(arch):
        return f"cls_last{n_last_blocks}" + ("_avgpool" if avgpool else "")
    if sparo_features == "encoding":
        return "sparo_encoding"
    if sparo_features != "encoding+cls":
        raise ValueError(f"unknown SPARO features {sparo_features!r}; choose from {', '.join(SPARO_FEATURES)}")
    if n_last_blocks < 2:
        raise ValueError(f"--sparo_features encoding+cls needs --n_last_blocks >= 2 (n-1 CLS tokens and the "
                         f"encoding), got {n_last_blocks}")
    return f"cls_last{n_last_blocks - 1}+sparo_encoding"


_KIND = re.compile(r"cls_last(\d+)(_avgpool|\+sparo_encoding)?")


def feature_function(backbone: nn.Module, kind: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """images -> features for a feature kind, in one pass through the trunk.

    - `sparo_encoding`: the SPARO encoding (unnormalized); `cls_last1`: a baseline's final-norm CLS.
    - `cls_last<n>`: the final-norm CLS of the last n blocks, earliest first (official linear-probe features).
    - `_avgpool`: plus the mean final-norm patch token, interleaved with the last CLS dim by dim as official DINO
      lays it out (its reshape of the pair), so official linear heads (ViT-B: n=1 + avgpool) read it correctly.
    - `+sparo_encoding`: the CLS of the last n trunk blocks of a SPARO arch (the ones before SPARO), then the encoding.
    """
    if kind in ("sparo_encoding", "cls_last1"):
        return backbone
    match = _KIND.fullmatch(kind)
    if match is None:
        raise ValueError(f"unknown feature kind {kind!r}")
    n_blocks, extra = int(match[1]), match[2]
    if not 1 <= n_blocks <= len(backbone.blocks):
        raise ValueError(f"{kind} needs the CLS of {n_blocks} blocks, but the trunk has {len(backbone.blocks)}")
    if (extra == "+sparo_encoding") != (backbone.sparo is not None):
        raise ValueError(f"feature kind {kind} does not apply to this backbone (SPARO: {backbone.sparo is not None})")

    def features(images: torch.Tensor) -> torch.Tensor:
        # timm's single pass: final-norm tokens of the last block and final-norm CLS of the last n blocks.
        final, intermediates = backbone.forward_intermediates(images, indices=n_blocks, norm=True, output_fmt="NLC",
                                                              return_prefix_tokens=True)
        parts = [prefix[:, 0] for _, prefix in intermediates]
        if extra == "_avgpool":
            mean = final[:, backbone.num_prefix_tokens:].mean(dim=1)
            parts[-1] = torch.stack((parts[-1], mean), dim=-1).flatten(1)
        elif extra == "+sparo_encoding":
            parts.append(backbone.sparo(final).flatten(1))
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


def gather_shards(local: torch.Tensor, num_samples: int, device: torch.device, everywhere: bool = False
                  ) -> torch.Tensor | None:
    """Reassemble rows sharded by ShardSampler into dataset order on the main process (None on other ranks), or
    with `everywhere` on every rank.

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
    keep = everywhere or distributed.is_main_process()
    output = torch.empty(num_samples, width, dtype=local.dtype) if keep else None
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
                     num_workers: int, device: torch.device, name: str = "features", scope: str = "main"
                     ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(features (N, D) float32 CPU, labels (N,)) of the whole dataset in order on the main process, None elsewhere.

    Each rank runs its ShardSampler shard; results are gathered by position, so no sample is duplicated or lost.
    `scope` (GATHER_SCOPES): "all" gathers on every rank, "local" returns this rank's shard ungathered.
    The backbone runs in fp32 whatever autocast the caller is under: the training k-NN monitor (inside the
    trainer's bf16/fp16 autocast) and eval_knn.py must report the same number for the same network.
    """
    if len(dataset) == 0:
        raise ValueError(f"cannot extract {name}: the dataset is empty")
    if scope not in GATHER_SCOPES:
        raise ValueError(f"unknown gather scope {scope!r}; choose from {', '.join(GATHER_SCOPES)}")
    rank, world = distributed.get_rank(), distributed.get_world_size()
    loader = DataLoader(dataset, batch_size=batch_size, sampler=ShardSampler(len(dataset), rank, world),
                        num_workers=num_workers, pin_memory=device.type == "cuda", drop_last=False,
                        persistent_workers=False)
    features, labels = [], []
    started, report_every = time.time(), max(1, len(loader) // 10)
    for step, (images, targets) in enumerate(loader):
        with torch.autocast(device.type, enabled=False):
            features.append(feature_fn(images.to(device, non_blocking=True)).float().cpu())
        labels.append(torch.as_tensor(targets).long())
        if distributed.is_main_process() and ((step + 1) % report_every == 0 or step + 1 == len(loader)):
            print(f"{name}: {step + 1}/{len(loader)} batches on rank 0 ({time.time() - started:.0f}s)", flush=True)
    local = torch.cat(features) if features else torch.empty(0, 0)
    local_labels = torch.cat(labels) if labels else torch.empty(0, dtype=torch.long)
    if scope == "local":
        return local, local_labels
    gathered = gather_shards(local, len(dataset), device, everywhere=scope == "all")
    gathered_labels = gather_shards(local_labels[:, None], len(dataset), device, everywhere=scope == "all")
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


def _own_files(folder: str) -> list[str]:
    return [os.path.join(folder, f"{split}_features.pth") for split in SPLITS]


def _official_files(folder: str) -> list[str]:
    return [os.path.join(folder, name) for split in SPLITS for name in OFFICIAL_DUMP_FILES[split]]


def save_features(features: FeatureSet, folder: str, dump_format: str = "own") -> None:
    """Write `features` in this repository's format, official DINO's, or both (see DUMP_FORMATS)."""
    if dump_format not in DUMP_FORMATS:
        raise ValueError(f"unknown dump format {dump_format!r}; choose from {', '.join(DUMP_FORMATS)}")
    os.makedirs(folder, exist_ok=True)
    if dump_format in ("own", "both"):
        for split, path in zip(SPLITS, _own_files(folder)):
            torch.save({"features": getattr(features, f"{split}_features"),
                        "labels": getattr(features, f"{split}_labels"),
                        "classes": features.classes, "meta": features.meta}, path)
    if dump_format in ("official", "both"):  # official eval_knn.py dumps L2-normalized features, labels as int64
        for split in SPLITS:
            feature_file, label_file = OFFICIAL_DUMP_FILES[split]
            torch.save(F.normalize(getattr(features, f"{split}_features").float(), dim=1),
                       os.path.join(folder, feature_file))
            torch.save(getattr(features, f"{split}_labels").long(), os.path.join(folder, label_file))
    print(f"features saved to {folder} ({dump_format} format)", flush=True)


def _load_tensor(path: str) -> torch.Tensor:
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(loaded, torch.Tensor):
        raise ValueError(f"{path} holds a {type(loaded).__name__}, not a tensor as official DINO dumps do")
    return loaded


def load_official_dump(folder: str) -> FeatureSet:
    """An official DINO feature dump: L2-normalized features and labels, nothing about classes or the model.

    Classes are numbered 0..max label (official DINO hard-codes 1000); the model options stay empty, so flags
    cannot be checked against it."""
    tensors = {split: tuple(_load_tensor(os.path.join(folder, name)) for name in OFFICIAL_DUMP_FILES[split])
               for split in SPLITS}
    for split, (feats, labels) in tensors.items():
        if feats.ndim != 2 or labels.ndim != 1 or len(feats) != len(labels):
            raise ValueError(f"official dump in {folder}: {split} features {tuple(feats.shape)} and labels "
                             f"{tuple(labels.shape)} do not match (expected (N, D) and (N,))")
    num_classes = max((int(labels.max()) for _, labels in tensors.values() if len(labels)), default=-1) + 1
    meta = {"kind": OFFICIAL_DUMP_KIND, "options": {}, "tag": "official_dump", "source": os.path.abspath(folder),
            "normalized": True}
    return FeatureSet(tensors["train"][0].float(), tensors["train"][1].long(), tensors["val"][0].float(),
                      tensors["val"][1].long(), [str(label) for label in range(num_classes)], meta)


def load_features(folder: str) -> FeatureSet:
    """Features saved by save_features in this repository's format, else an official DINO dump in `folder`."""
    if all(map(os.path.isfile, _own_files(folder))):
        splits = {split: torch.load(path, map_location="cpu", weights_only=True)
                  for split, path in zip(SPLITS, _own_files(folder))}
        return FeatureSet(splits["train"]["features"], splits["train"]["labels"], splits["val"]["features"],
                          splits["val"]["labels"], list(splits["train"]["classes"]), dict(splits["train"]["meta"]))
    if all(map(os.path.isfile, _official_files(folder))):
        return load_official_dump(folder)
    raise FileNotFoundError(f"cached features not found in {folder}: it needs train_features.pth and "
                            "val_features.pth (--dump_features) or an official DINO dump (trainfeat.pth, testfeat.pth, "
                            "trainlabels.pth, testlabels.pth)")


def _check_cached(cached: FeatureSet, args: argparse.Namespace, kind_for: Callable[[str], str],
                  accept_official_dump: bool) -> FeatureSet:
    """Cached features must be the ones this evaluation needs; an official dump records no model, so only the flags
    describe it."""
    if cached.meta["kind"] == OFFICIAL_DUMP_KIND:
        if not accept_official_dump:
            raise ValueError(f"{args.load_features} holds an official DINO dump (L2-normalized features); this "
                             "evaluation needs the raw features: dump them with --dump_format own")
        options = {key: getattr(args, key, None) for key in MODEL_KEYS if getattr(args, key, None) is not None}
        if "arch" in options:
            kind_for(options["arch"])  # flags that do not apply to the arch are an error here too
        cached.meta["options"] = options
        return cached
    options = cached.meta["options"]
    resolve_model_options(args, options)  # a flag contradicting the cached model is an error here too
    expected = kind_for(options["arch"])
    if cached.meta["kind"] != expected:
        raise ValueError(f"features in {args.load_features} are {cached.meta['kind']!r}, "
                         f"this evaluation needs {expected!r}")
    return cached


def release_cached_memory() -> None:
    """Hand the blocks that extraction's activations left in torch's CUDA cache back to the driver (a no-op without
    CUDA): the k-NN bank (21 GB at ImageNet x SPARO) and faiss-gpu, which allocates outside torch's cache, come
    next and need them."""
    torch.cuda.empty_cache()


def compute_features(args: argparse.Namespace, device: torch.device, kind_for: Callable[[str], str] = feature_kind,
                     accept_official_dump: bool = False, at_init: bool = False, shard_train: bool = False
                     ) -> FeatureSet | None:
    """Features of train and val from --load_features or the backbone (main process gets them, others None).

    `kind_for(arch)` names the features the evaluation needs (default: what k-NN uses); `accept_official_dump`
    says whether L2-normalized features of an unknown model (an official DINO dump) will do, as they do for k-NN.
    `at_init`: features of the run's random-init network (see load_backbone), never cached or dumped.
    `shard_train`: every rank gets a FeatureSet holding its own ShardSampler shard of train (never gathered: the
    ImageNet x SPARO bank is 21 GB) and all of val; meta["train_shard"] says so and counts the whole train set."""
    if args.load_features is not None:
        if at_init:
            raise ValueError("the random-init baseline needs --pretrained_weights (a training checkpoint), not "
                             "--load_features")
        if not distributed.is_main_process():
            return None
        return _check_cached(load_features(args.load_features), args, kind_for, accept_official_dump)
    backbone, options, tag = load_backbone(args, at_init)
    backbone.to(device)
    kind = kind_for(options["arch"])
    fn = feature_function(backbone, kind)
    transform = augmentation.eval_transform(args.resize_size, args.crop_size)
    splits = dict(zip(SPLITS, build_splits(args, transform, transform)))
    scopes = {"train": "local", "val": "all"} if shard_train else {"train": "main", "val": "main"}
    results = {split: extract_features(fn, dataset, args.batch_size_per_gpu, args.num_workers, device,
                                       name=f"{split} features", scope=scopes[split])
               for split, dataset in splits.items()}
    del backbone, fn
    release_cached_memory()
    if not distributed.is_main_process() and not shard_train:
        return None
    meta = {"kind": kind, "options": options, "tag": tag, "source": os.path.abspath(args.pretrained_weights),
            "checkpoint_key": args.checkpoint_key, "dataset": args.dataset,
            "resize_size": args.resize_size, "crop_size": args.crop_size}
    if shard_train:
        meta["train_shard"] = {"rank": distributed.get_rank(), "world_size": distributed.get_world_size(),
                               "num_train": len(splits["train"])}
    features = FeatureSet(*results["train"], *results["val"], list(splits["train"].classes), meta)
    if args.dump_features is not None and not at_init:
        save_features(features, args.dump_features, args.dump_format)
    return features


def default_output_dir(args: argparse.Namespace) -> str:
    """--output_dir, else the checkpoint's folder, else the cached features' folder."""
    if args.output_dir is not None:
        return args.output_dir
    if args.pretrained_weights is not None:
        return os.path.dirname(os.path.abspath(args.pretrained_weights))
    if args.load_features is not None:
        return os.path.abspath(args.load_features)
    raise ValueError("--pretrained_weights is required (or --load_features with cached features)")


def check_output_dirs(args: argparse.Namespace) -> None:
    """The folders an evaluation writes to (results, --dump_features) must take files: checked at start-up, so a
    bad one stops the run before the process group, the weights and the feature extraction."""
    require_writable_dirs({"--output_dir": default_output_dir(args), "--dump_features": args.dump_features})


def write_results(results: Mapping[str, Any], path: str) -> str:
    """Write an evaluation's results JSON (the file scripts parse) and say where it went."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as handle:
        json.dump(results, handle, indent=2)
    print(f"results written to {path}", flush=True)
    return path


# Errors of the evaluation scripts that end them with one line instead of a traceback.
USER_ERRORS = (ValueError, FileNotFoundError, CheckpointError, datasets.BadImageError)


def run_cli(main: Callable[[], Any]) -> None:
    """Run an evaluation entry point; bad input ends with one line naming the problem instead of a traceback (also
    when a data-loader worker raised it and the message carries the worker's traceback)."""
    try:
        main()
    except USER_ERRORS as error:
        exit_with(error)


def print_user_error(error: BaseException) -> None:
    """The one line of a user's mistake (see run_cli); other errors keep their traceback."""
    if isinstance(error, USER_ERRORS):
        print_once(error)
