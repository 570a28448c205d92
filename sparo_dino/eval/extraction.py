"""Features of a frozen backbone over a dataset, computed by every rank on its own shard.

What a feature vector holds is named by a feature kind (stored with cached features, so a cache is never misused).
Each rank extracts its ShardSampler shard and the rows are gathered by position, so each sample appears exactly once
and in dataset order (a dataset that does not divide by the number of ranks is neither padded nor truncated). The
evaluations and the training k-NN monitor share this path, so they report the same number for the same network.
"""
from __future__ import annotations

import re
import time
from typing import Callable

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, Sampler

from sparo_dino import distributed
from sparo_dino.data import datasets
from sparo_dino.data.loader import batches_of
from sparo_dino.eval.interruption import guarded
from sparo_dino.model import registry
from sparo_dino.stop_signals import ignore_stop_signals

# What the linear probe of a read-out that replaces the last block reads (paper C.2, two readings for SPARO): the
# encoding alone, or the encoding after the final-norm CLS of the n-1 trunk blocks before it (official DINO's
# n_last_blocks idea).
SPARO_FEATURES: tuple[str, ...] = ("encoding", "encoding+cls")
# The attentive probe's features: every final-norm token of the trunk (CLS first), flattened to one row per image so
# the caches and the gathering treat them like any feature vector.
TOKENS_KIND = "tokens"
# Rows per rank and per collective when gathering features: bounds the extra (GPU) memory of the gather.
_GATHER_ROWS = 4096
# Where extracted features end up: gathered on the main process, gathered on every rank, or each rank's own shard.
GATHER_SCOPES: tuple[str, ...] = ("main", "all", "local")


def feature_kind(arch: str, n_last_blocks: int = 1, avgpool: bool = False, sparo_features: str = "encoding") -> str:
    """Name of what a feature vector holds, stored with cached features so a cache is never misused.

    CLS read-out (baselines): `cls_last<n>[_avgpool]`. Other read-outs: `<readout>_encoding` (e.g.
    `sparo_encoding`), or for one that replaces the last block with sparo_features="encoding+cls"
    `cls_last<n-1>+<readout>_encoding` (the CLS of the n-1 trunk blocks before the read-out, then the encoding)."""
    readout = registry.split_arch(arch)[1]
    if readout.name == "cls":
        return f"cls_last{n_last_blocks}" + ("_avgpool" if avgpool else "")
    if sparo_features == "encoding":
        return f"{readout.name}_encoding"
    if sparo_features != "encoding+cls":
        raise ValueError(f"unknown SPARO features {sparo_features!r}; choose from {', '.join(SPARO_FEATURES)}")
    if not readout.replaces_block:
        raise ValueError("--sparo_features encoding+cls applies to read-outs that replace the last block "
                         f"({registry.arch_patterns('replaces_block')}), not {arch}")
    if n_last_blocks < 2:
        raise ValueError(f"--sparo_features encoding+cls needs --n_last_blocks >= 2 (n-1 CLS tokens and the "
                         f"encoding), got {n_last_blocks}")
    return f"cls_last{n_last_blocks - 1}+{readout.name}_encoding"


_KIND = re.compile(r"cls_last(\d+)(_avgpool|\+[a-z0-9]+_encoding)?")


def token_shape(options: dict, crop_size: int, width: int) -> tuple[int, int]:
    """(tokens, embed_dim) of a row of TOKENS_KIND features of `width` values: CLS plus the crop's patches."""
    num_tokens = 1 + (crop_size // int(options.get("patch_size", 16))) ** 2
    if width % num_tokens:
        raise ValueError(f"token features of width {width} do not split into {num_tokens} tokens "
                         f"({crop_size} px crops, patch {options.get('patch_size')})")
    return num_tokens, width // num_tokens


def feature_function(backbone: nn.Module, kind: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """images -> features for a feature kind, in one pass through the trunk.

    - `<readout>_encoding`: the read-out's encoding (unnormalized); `cls_last1`: a baseline's final-norm CLS.
    - `cls_last<n>`: the final-norm CLS of the last n blocks, earliest first (official linear-probe features).
    - `_avgpool`: plus the mean final-norm patch token, interleaved with the last CLS dim by dim as official DINO
      lays it out (its reshape of the pair), so official linear heads (ViT-B: n=1 + avgpool) read it correctly.
    - `+<readout>_encoding`: the CLS of the last n trunk blocks (the ones before the read-out), then the encoding.
    - `tokens` (TOKENS_KIND): all final-norm tokens of the trunk, (B, tokens * embed_dim): what the read-out reads.
    """
    if kind == TOKENS_KIND:
        return lambda images: backbone.tokens(images).flatten(1)
    if kind == f"{backbone.readout}_encoding" or (kind == "cls_last1" and backbone.readout == "cls"):
        return backbone
    match = _KIND.fullmatch(kind)
    if match is None:
        raise ValueError(f"unknown feature kind {kind!r}")
    n_blocks, extra = int(match[1]), match[2]
    if not 1 <= n_blocks <= len(backbone.blocks):
        raise ValueError(f"{kind} needs the CLS of {n_blocks} blocks, but the trunk has {len(backbone.blocks)}")
    wanted = extra[1:].removesuffix("_encoding") if extra and extra.startswith("+") else "cls"
    if wanted != backbone.readout:
        raise ValueError(f"feature kind {kind} does not apply to this backbone (read-out: {backbone.readout})")

    def features(images: torch.Tensor) -> torch.Tensor:
        # timm's single pass: final-norm tokens of the last block and final-norm CLS of the last n blocks.
        final, intermediates = backbone.forward_intermediates(images, indices=n_blocks, norm=True, output_fmt="NLC",
                                                              return_prefix_tokens=True)
        parts = [prefix[:, 0] for _, prefix in intermediates]
        if extra == "_avgpool":
            mean = final[:, backbone.num_prefix_tokens:].mean(dim=1)
            parts[-1] = torch.stack((parts[-1], mean), dim=-1).flatten(1)
        elif extra is not None:  # +<readout>_encoding
            parts.append(backbone.encode_tokens(final))
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


class ExtractionStopped(Exception):
    """A stop request (`extract_features`'s `stop`) ended an extraction before its last batch."""


@torch.no_grad()
def extract_features(feature_fn: Callable[[torch.Tensor], torch.Tensor], dataset: Dataset, batch_size: int,
                     num_workers: int, device: torch.device, name: str = "features", scope: str = "main",
                     stop: Callable[[], bool] | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(features (N, D) float32 CPU, labels (N,)) of the whole dataset in order on the main process, None elsewhere.

    Each rank runs its ShardSampler shard; results are gathered by position, so no sample is duplicated or lost.
    `scope` (GATHER_SCOPES): "all" gathers on every rank, "local" returns this rank's shard ungathered.
    The backbone runs in fp32 whatever autocast the caller is under: the training k-NN monitor (inside the
    trainer's bf16/fp16 autocast) and eval_knn.py must report the same number for the same network.
    `stop` (a collective when distributed: every rank calls it before each of the batches all shards have) ends
    the extraction with ExtractionStopped when it says so; the loader's workers ignore SIGTERM and SIGINT, so a
    signal to the whole job reaches the caller's handler instead of killing them.
    """
    if len(dataset) == 0:
        raise ValueError(f"cannot extract {name}: the dataset is empty")
    if scope not in GATHER_SCOPES:
        raise ValueError(f"unknown gather scope {scope!r}; choose from {', '.join(GATHER_SCOPES)}")
    rank, world = distributed.get_rank(), distributed.get_world_size()
    loader = DataLoader(dataset, batch_size=batch_size, sampler=ShardSampler(len(dataset), rank, world),
                        num_workers=num_workers, pin_memory=device.type == "cuda", drop_last=False,
                        persistent_workers=False, worker_init_fn=ignore_stop_signals)
    polled = -(-len(ShardSampler(len(dataset), world - 1, world)) // batch_size)  # batches of the smallest shard
    features, labels = [], []
    started, report_every = time.time(), max(1, len(loader) // 10)
    with batches_of(loader) as batches:
        for step, (images, targets) in enumerate(guarded(batches)):
            if stop is not None and step < polled and stop():
                raise ExtractionStopped(f"{name} stopped after {step} of {len(loader)} batches")
            with torch.autocast(device.type, enabled=False):
                features.append(feature_fn(images.to(device, non_blocking=True)).float().cpu())
            labels.append(torch.as_tensor(targets).long())
            if distributed.is_main_process() and ((step + 1) % report_every == 0 or step + 1 == len(loader)):
                print(f"{name}: {step + 1}/{len(loader)} batches on rank 0 ({time.time() - started:.0f}s)",
                      flush=True)
    local = torch.cat(features) if features else torch.empty(0, 0)
    local_labels = torch.cat(labels) if labels else torch.empty(0, dtype=torch.long)
    if scope == "local":
        return local, local_labels
    gathered = gather_shards(local, len(dataset), device, everywhere=scope == "all")
    gathered_labels = gather_shards(local_labels[:, None], len(dataset), device, everywhere=scope == "all")
    if gathered is None:
        return None
    return gathered, gathered_labels[:, 0]


def build_splits(dataset: str, path: str, train_transform: Callable, val_transform: Callable
                 ) -> tuple[Dataset, Dataset]:
    """Train and val of `dataset` at `path` (Fashion-MNIST's val is its test set), with the same classes.

    ImageFolder numbers the class folders of each split on its own, so a val/ missing a class folder would shift
    every later label; that is an error rather than a silently wrong accuracy."""
    train = datasets.build_dataset(dataset, path, split="train", transform=train_transform)
    val = datasets.build_dataset(dataset, path, split="val", transform=val_transform)
    if list(train.classes) != list(val.classes):
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        raise ValueError(f"train and val splits of {path} have different classes (only in train: {only_train[:5]}, "
                         f"only in val: {only_val[:5]}); labels would not match")
    return train, val


def release_cached_memory() -> None:
    """Hand the blocks that extraction's activations left in torch's CUDA cache back to the driver (a no-op without
    CUDA): the k-NN bank (21 GB at ImageNet x SPARO) and faiss-gpu, which allocates outside torch's cache, come
    next and need them."""
    torch.cuda.empty_cache()
