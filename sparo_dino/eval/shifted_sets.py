"""Shifted test sets (ImageNet-V2, -R, -A, -Sketch, ...) evaluated against the training set's classes.

Class folders map to training classes by name, else as class indices (ImageNet-V2); a set holding only some classes
predicts among those (`restrict`). An unmatched folder is an error (docs/evaluation.md, Robustness evaluation)."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from sparo_dino.data import datasets

_NAME = re.compile(r"[A-Za-z0-9_.-]+")
# The usual splits' names in features, tables and results; a test set may not take them.
VAL_NAME = "val"
RESERVED_NAMES = ("train", VAL_NAME)


@dataclass(frozen=True)
class TestSetSpec:
    """One `--test_sets NAME=PATH` entry."""
    name: str
    path: str


def parse_specs(entries: Sequence[str] | None) -> list[TestSetSpec]:
    """`NAME=PATH` strings -> specs, in the given order; a malformed entry, a reused name or a missing folder is one
    line naming it, raised before any image is read."""
    specs: list[TestSetSpec] = []
    for entry in entries or ():
        name, equals, path = entry.partition("=")
        if not equals or not path or not _NAME.fullmatch(name):
            raise ValueError(f"--test_sets entry {entry!r} is not NAME=PATH (NAME: letters, digits, '_', '.', '-'), "
                             "e.g. imagenet_r=/data/imagenet-r")
        if name in RESERVED_NAMES:
            raise ValueError(f"--test_sets name {name!r} is the {name} split's; choose another name")
        if name in {spec.name for spec in specs}:
            raise ValueError(f"--test_sets names {name!r} twice")
        if not os.path.isdir(path):
            raise FileNotFoundError(f"--test_sets {name}: folder {path} does not exist (expected <class>/<image>)")
        specs.append(TestSetSpec(name, path))
    return specs


def _is_index(folder: str) -> bool:
    return folder.isascii() and folder.isdigit()


def class_indices(folders: Sequence[str], train_classes: Sequence[str], name: str) -> list[int]:
    """The training class index of each class folder of test set `name` (see the module docstring)."""
    index = {cls: i for i, cls in enumerate(train_classes)}
    if all(folder in index for folder in folders):
        return [index[folder] for folder in folders]
    if folders and all(map(_is_index, folders)):  # ImageNet-V2's release: folders 0..999 are class indices
        beyond = [folder for folder in folders if int(folder) >= len(train_classes)]
        if beyond:
            raise ValueError(f"test set {name}: class folder {beyond[0]} is read as a class index (all its folder "
                             f"names are integers, as in ImageNet-V2's release) but the training set has "
                             f"{len(train_classes)} classes (0..{len(train_classes) - 1})")
        return [int(folder) for folder in folders]
    missing = [folder for folder in folders if folder not in index]
    raise ValueError(f"test set {name}: class folder {missing[0]!r} is not a class of the training set "
                     f"({len(missing)} of its {len(folders)} folders are not; training classes look like "
                     f"{train_classes[0]!r})")


class Relabeled(Dataset):
    """A dataset whose labels are mapped through `mapping` (test-set folder index -> training class index)."""

    def __init__(self, dataset: Dataset, mapping: Sequence[int]) -> None:
        self.dataset = dataset
        self.mapping = list(mapping)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image, label = self.dataset[index]
        return image, self.mapping[label]


def present_classes(indices: Sequence[int], num_classes: int) -> torch.Tensor | None:
    """Sorted training classes a test set holds; None when it holds them all (nothing to restrict)."""
    present = sorted(set(indices))
    return None if len(present) == num_classes else torch.tensor(present, dtype=torch.long)


def describe(path: str | None, num_images: int, present: torch.Tensor | None, num_train_classes: int
             ) -> dict[str, Any]:
    """What a results file records of a set beside its accuracies: the classes are those predicted among."""
    return {"path": path, "num_test": num_images, "restricted": present is not None,
            "num_classes": num_train_classes if present is None else len(present)}


@dataclass
class TestSet:
    """A test set's images with training-class labels, and which training classes it holds."""
    spec: TestSetSpec
    dataset: Dataset
    present: torch.Tensor | None  # training class indices it holds; None: all of them


def build(specs: Sequence[TestSetSpec], train_classes: Sequence[str], transform: Callable) -> list[TestSet]:
    """Each spec as an ImageFolder (unreadable images stop the run naming the file) labelled by training class."""
    sets = []
    for spec in specs:
        folder = datasets.build_dataset("imagefolder", spec.path, transform=transform)
        mapping = class_indices(folder.classes, train_classes, spec.name)
        sets.append(TestSet(spec, Relabeled(folder, mapping), present_classes(mapping, len(train_classes))))
    return sets


@dataclass
class EvalSet:
    """Features and training-class labels of one evaluation set (val or a test set), for k-NN or a head."""
    features: torch.Tensor
    labels: torch.Tensor
    present: torch.Tensor | None  # training class indices to predict among; None: all
    path: str | None = None  # the test set's folder; None for val

    def describe(self, num_train_classes: int) -> dict[str, Any]:
        return describe(self.path, len(self.labels), self.present, num_train_classes)


def restrict(scores: torch.Tensor, present: torch.Tensor | None) -> torch.Tensor:
    """Scores (..., num_classes) with every class outside `present` at -inf, so top-k picks present classes only
    (the ImageNet-R/-A protocol); unchanged when `present` is None."""
    if present is None:
        return scores
    absent = torch.ones(scores.shape[-1], dtype=torch.bool, device=scores.device)
    absent[present.to(scores.device)] = False
    return scores.masked_fill(absent, float("-inf"))


class RestrictedHead(nn.Module):
    """A trained head whose logits are restricted to a test set's classes (cross-entropy stays finite: every label
    is a present class)."""

    def __init__(self, head: nn.Module, present: torch.Tensor | None) -> None:
        super().__init__()
        self.head = head
        self.present = present

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return restrict(self.head(features), self.present)
