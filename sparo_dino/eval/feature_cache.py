"""On-disk caches of extracted features, so repeated evaluations skip the forward passes.

Two formats: this repository's, which keeps the raw features with the classes and what produced them (the
backbone options and feature kind, checked before a cache is reused), and official DINO's, L2-normalized features
and labels as plain tensors, which official eval_knn.py --load_features reads and writes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from sparo_dino.io.checkpoint import load_plain_data

SPLITS: tuple[str, ...] = ("train", "val")
# --dump_features formats: this repository's (raw features, classes, what produced them), official DINO's
# (L2-normalized features and labels as plain tensors, what official eval_knn.py --load_features reads), or both.
DUMP_FORMATS: tuple[str, ...] = ("own", "official", "both")
# Official DINO's dump: (features file, labels file) per split; its val split is called test.
OFFICIAL_DUMP_FILES: dict[str, tuple[str, str]] = {"train": ("trainfeat.pth", "trainlabels.pth"),
                                                   "val": ("testfeat.pth", "testlabels.pth")}
OFFICIAL_DUMP_KIND = "official_dump"


@dataclass
class FeatureSet:
    """Features and labels of both splits plus what produced them."""
    train_features: torch.Tensor
    train_labels: torch.Tensor
    val_features: torch.Tensor
    val_labels: torch.Tensor
    classes: list[str]
    meta: dict[str, Any]  # kind, options (build_backbone kwargs), tag, source
    # --test_sets: name -> test_sets.EvalSet, extracted with train and val; never saved (extracted fresh each run)
    test_sets: dict[str, Any] = field(default_factory=dict)

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
    loaded = load_plain_data(path, "feature file")
    if not isinstance(loaded, torch.Tensor):
        raise ValueError(f"{path} holds a {type(loaded).__name__}, not a tensor as official DINO dumps do")
    return loaded


def _load_split(path: str) -> dict[str, Any]:
    """One split of this repository's format, checked field by field: a file of another tool (or a damaged one)
    is a one-line error here instead of a KeyError or a shape error deep in an evaluation."""
    loaded = load_plain_data(path, "feature file")
    problem = None
    if not isinstance(loaded, dict) or not {"features", "labels", "classes", "meta"} <= set(loaded):
        keys = ", ".join(map(str, loaded)) if isinstance(loaded, dict) else type(loaded).__name__
        problem = f"not a feature file written by --dump_features (it holds {keys or 'nothing'})"
    elif not (isinstance(loaded["features"], torch.Tensor) and loaded["features"].ndim == 2
              and isinstance(loaded["labels"], torch.Tensor) and loaded["labels"].ndim == 1
              and len(loaded["labels"]) == len(loaded["features"])):
        problem = "features and labels are not an (N, D) and an (N,) tensor"
    elif not (isinstance(loaded["classes"], (list, tuple)) and isinstance(loaded["meta"], dict)
              and {"kind", "options", "tag"} <= set(loaded["meta"])):
        problem = "its classes or meta (kind, options, tag) are missing"
    elif len(loaded["labels"]) and not 0 <= int(loaded["labels"].min()) <= int(loaded["labels"].max()) < len(
            loaded["classes"]):
        problem = f"labels outside the {len(loaded['classes'])} classes"
    if problem is not None:
        raise ValueError(f"{path}: {problem}")
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
        splits = {split: _load_split(path) for split, path in zip(SPLITS, _own_files(folder))}
        if splits["train"]["features"].shape[1] != splits["val"]["features"].shape[1]:
            raise ValueError(f"cached features in {folder}: train and val features have other widths "
                             f"({splits['train']['features'].shape[1]} and {splits['val']['features'].shape[1]})")
        return FeatureSet(splits["train"]["features"], splits["train"]["labels"], splits["val"]["features"],
                          splits["val"]["labels"], list(splits["train"]["classes"]), dict(splits["train"]["meta"]))
    if all(map(os.path.isfile, _official_files(folder))):
        return load_official_dump(folder)
    raise FileNotFoundError(f"cached features not found in {folder}: it needs train_features.pth and "
                            "val_features.pth (--dump_features) or an official DINO dump (trainfeat.pth, testfeat.pth, "
                            "trainlabels.pth, testlabels.pth)")
