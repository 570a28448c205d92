"""k-NN accuracy of the teacher during training (--knn_every), computed with the evaluation code of eval_knn.py.

A fixed random subset of a small labelled train/val split is embedded by every rank (its shard, gathered in order)
and classified by the weighted 20-NN vote (cosine, T = 0.07), so the monitored number is the one eval_knn.py would
report on the same images. It runs under a forked RNG: extraction must not shift the random streams that the
rest of the run (drop-path, the next epoch) draws from, or runs with and without the monitor, and a run resumed
after it, would diverge.
"""
from __future__ import annotations

import os
from typing import Callable

import torch
import torch.nn as nn
from torch.utils.data import Dataset, Subset

from sparo_dino import distributed
from sparo_dino.data import augmentation, datasets, image_files
from sparo_dino.eval import extraction, knn
from sparo_dino.eval.subsets import seeded_split

K = 20
TEMPERATURE = 0.07


def require_labelled_data(data_path: str, knn_data_path: str | None) -> None:
    """Raise a one-line ValueError when the monitor of an image-file run would have no labels: no --knn_data_path
    (training images never serve as the monitor's: an ImageFolder root is one split, a folder or list has no
    labels), or one whose train/ or val/ split is not a folder of class sub-folders.

    Only what the file system shows is judged: a path that does not exist is left to the start-up error that names
    it, since a launcher validates the flags on a submission host that may not see the data."""
    if knn_data_path is None:
        try:
            kind = image_files.detect_kind(data_path)
        except OSError:  # missing or unreadable: reported at start-up
            kind = "imagefolder"
        unlabeled = f"; --data_path {data_path} is {image_files.KINDS[kind]}" if kind != "imagefolder" else ""
        raise ValueError(f"--knn_every needs --knn_data_path: the k-NN monitor needs labelled images split in two, "
                         f"a folder holding train/ and val/ with one sub-folder per class{unlabeled}")
    if not os.path.exists(knn_data_path):
        return
    for split in ("train", "val"):
        try:
            datasets.require_class_folders(datasets.image_folder_root(knn_data_path, split))
        except (OSError, ValueError) as error:
            raise ValueError(f"--knn_data_path: {error}") from error


def _fixed_subset(dataset: Dataset, size: int, seed: int) -> Dataset:
    """At most `size` samples, drawn once at random (ImageFolder is sorted by class: a prefix would miss classes)."""
    if len(dataset) <= size:
        return dataset
    return Subset(dataset, seeded_split(len(dataset), size, seed)[0].tolist())


class PeriodicKnn:
    """The monitor's data, built (and checked) once at start-up; `top1(backbone)` is a collective."""

    def __init__(self, dataset: str, path: str, subset: int, resize_size: int, crop_size: int, batch_size: int,
                 num_workers: int, device: torch.device, seed: int = 0) -> None:
        transform = augmentation.eval_transform(resize_size, crop_size)
        train, val = extraction.build_splits(dataset, path, transform, transform)
        self.num_classes = len(train.classes)
        self.train = _fixed_subset(train, subset, seed)
        self.val = _fixed_subset(val, subset, seed + 1)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.device = device

    @torch.no_grad()
    def top1(self, backbone: nn.Module, arch: str, label: str = "", stop: Callable[[], bool] | None = None
             ) -> float | None:
        """Weighted 20-NN top-1 (percent) of `backbone`'s evaluation features on the main process, None elsewhere.

        Extracted by eval_knn.py's own path (extraction.extract_features), so in its fp32 whatever the trainer's
        precision: under bf16 the monitor would otherwise report another number than eval_knn.py. `stop` (asked
        between batches on every rank) ends it early with extraction.ExtractionStopped."""
        feature_fn = extraction.feature_function(backbone, extraction.feature_kind(arch))
        was_training = backbone.training
        backbone.eval()
        forked = [self.device] if self.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=forked):
                train = extraction.extract_features(feature_fn, self.train, self.batch_size, self.num_workers,
                                                    self.device, name="k-NN train features", stop=stop)
                val = extraction.extract_features(feature_fn, self.val, self.batch_size, self.num_workers,
                                                  self.device, name="k-NN val features", stop=stop)
        finally:
            backbone.train(was_training)
        if not distributed.is_main_process():
            return None
        scores = knn.weighted_knn(train[0], train[1], val[0], self.num_classes, K, TEMPERATURE, backend="torch")
        top1, _ = knn.topk_accuracy(scores, val[1])
        print(f"k-NN monitor{' ' + label if label else ''}: weighted {K}-NN top-1 {top1:.2f}% "
              f"({len(self.train)} train / {len(self.val)} val images)", flush=True)
        return top1
