"""The training images of `--dataset imagefolder`: what `--data_path` holds, its index, and the index cache.

A list file, a folder of unlabeled images or an ImageFolder tree (`detect_kind`; docs/training.md, Your own data).
Only the main process lists or reads the cache; the other ranks receive its index, so all train on the same images."""
from __future__ import annotations

import hashlib
import json
import os
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from torchvision.datasets.folder import IMG_EXTENSIONS

from sparo_dino import distributed
from sparo_dino.data.datasets import CheckedImages, Transform
from sparo_dino.io import atomic

INDEX_NAME = "data_index.json"
NO_LABEL = -1
# What the kinds are called in messages.
KINDS = {"list": "a list of images", "folder": "a folder of unlabeled images", "imagefolder": "an ImageFolder tree"}
# Extensions of the formats Pillow decodes by itself (no plugin, no external program), matched case-insensitively.
# ImageFolder trees keep torchvision's shorter IMG_EXTENSIONS, so they give exactly the samples they always gave.
UNLABELED_EXTENSIONS = (".bmp", ".dib", ".gif", ".jpg", ".jpeg", ".jpe", ".jfif", ".j2k", ".jp2", ".png", ".apng",
                        ".pbm", ".pgm", ".ppm", ".pnm", ".tga", ".tif", ".tiff", ".webp")
_FORMAT = "sparo-dino image index 1"  # a new layout of the file gets a new number: old files are then listed again
Stamp = tuple[str, int, int, int]  # (path relative to the data root, st_mtime_ns, st_ctime_ns, st_size)


class DataIndexError(ValueError):
    """Training data whose images cannot be listed (a missing listed file, no image at all); one line."""


@dataclass
class ImageIndex:
    """The training images of one --data_path, in training order.

    `files` are relative to `base`; `labels` are class indices (ImageFolder trees) or None; `stamps` are what a
    cached copy is checked against; `cached`: read from the cache rather than listed."""

    kind: str
    source: str
    files: list[str]
    labels: list[int] | None
    classes: list[str]
    stamps: list[Stamp]
    cached: bool = False

    @property
    def base(self) -> str:
        return os.path.dirname(self.source) if self.kind == "list" else self.source

    def dataset(self, transform: Transform, skip_bad_images: bool) -> CheckedImages:
        """The images as a dataset of (transform(image), label), with datasets.CheckedImages' bad-file handling."""
        labels = self.labels if self.labels is not None else [NO_LABEL] * len(self.files)
        samples = [(os.path.join(self.base, name), label) for name, label in zip(self.files, labels)]
        return CheckedImages(self.source, samples, self.classes, transform, skip_bad_images)

    def fingerprint(self) -> str:
        """sha256 of the images' names and labels in training order (the order the sampler indexes): it changes
        when an image is added, removed, renamed or moved; about a second for ImageNet's 1.28M names."""
        digest = hashlib.sha256("\0".join(self.files).encode())  # no file name holds a NUL
        labels = self.labels if self.labels is not None else [NO_LABEL] * len(self.files)
        digest.update(b"\0\0labels")
        digest.update(np.asarray(labels, dtype=np.int64).tobytes())
        return "sha256:" + digest.hexdigest()

    def describe(self) -> str:
        classes = f", {len(self.classes)} class folders, labels unused" if self.kind == "imagefolder" else ""
        return f"{len(self.files)} images, {KINDS[self.kind]}{classes}"


def is_image_name(name: str) -> bool:
    """Whether a file of a folder of unlabeled images is read: a known image extension, not hidden."""
    return not name.startswith(".") and name.lower().endswith(UNLABELED_EXTENSIONS)


def detect_kind(path: str) -> str:
    """"list", "folder" or "imagefolder" (see the module's docstring); FileNotFoundError when `path` is missing.

    Reads only the top level of a folder: it stops at the first image file."""
    if os.path.isfile(path):
        return "list"
    if not os.path.isdir(path):
        raise FileNotFoundError(f"training data {path} does not exist (expected a folder of images, an ImageFolder "
                                f"tree or a text file listing images)")
    with os.scandir(path) as entries:
        if any(is_image_name(entry.name) and entry.is_file() for entry in entries):
            return "folder"
    return "imagefolder"


def _extensions(kind: str) -> tuple[str, ...]:
    return {"list": (), "folder": UNLABELED_EXTENSIONS, "imagefolder": tuple(IMG_EXTENSIONS)}[kind]


# ------------------------------------------------------------------------------------------------ listing
def _stamp(relative: str, status: os.stat_result) -> Stamp:
    """What tells a folder (or list file) changed: its content changes its modification time, a permission change
    its status-change time; the size is a second sign where times are coarse."""
    return relative, status.st_mtime_ns, status.st_ctime_ns, status.st_size


Listing = dict[str, tuple[list[str], list[str]]]  # folder relative to the root ("" = root) -> (files, sub-folders)


def _walk(root: str, skip_hidden: bool) -> tuple[Listing, list[Stamp]]:
    """Every folder below `root`, with the names of the files and sub-folders directly inside, and its stamp.

    As os.walk(followlinks=True), which torchvision's ImageFolder uses: symbolic links to folders are followed and
    a folder that cannot be read is skipped; unlike it, a link back to one of its own ancestors is not entered.
    A folder's stamp is taken before it is read, so a change made while it is listed shows at the next start."""
    listing: Listing = {}
    stamps: list[Stamp] = []

    def visit(relative: str, path: str, ancestors: frozenset[tuple[int, int]]) -> None:
        try:
            status = os.stat(path)
            identity = (status.st_dev, status.st_ino)
            if identity in ancestors:
                return
            stamps.append(_stamp(relative, status))  # also for a folder that cannot be read: a chmod shows
            with os.scandir(path) as iterator:
                entries = list(iterator)
        except OSError:
            if not relative:
                raise
            return
        files, folders = listing[relative] = ([], [])
        for entry in entries:
            if skip_hidden and entry.name.startswith("."):
                continue
            try:
                is_folder = entry.is_dir()
            except OSError:
                is_folder = False
            (folders if is_folder else files).append(entry.name)
        for name in folders:
            visit(os.path.join(relative, name), os.path.join(path, name), ancestors | {identity})

    visit("", root, frozenset())
    return listing, stamps


def _list_imagefolder(root: str) -> ImageIndex:
    """torchvision's ImageFolder samples, from one walk: classes are the sorted top-level folders; a class's images
    follow its folders in sorted path order, each folder's files sorted by name (torchvision.datasets.folder's
    find_classes and make_dataset). A class without images is no error here: training ignores labels."""
    listing, stamps = _walk(root, skip_hidden=False)
    classes = sorted(listing[""][1])
    folders_of: dict[str, list[str]] = defaultdict(list)
    for folder in listing:
        if folder:
            folders_of[folder.split(os.sep, 1)[0]].append(folder)
    files, labels = [], []
    for label, name in enumerate(classes):
        for folder in sorted(folders_of[name]):
            for file in sorted(listing[folder][0]):
                if file.lower().endswith(tuple(IMG_EXTENSIONS)):
                    files.append(os.path.join(folder, file))
                    labels.append(label)
    if not files:
        raise DataIndexError(f"no images in {root}: with no image file directly inside, it is read as an ImageFolder "
                             f"tree, {root}/<class>/.../<image> with extension {', '.join(IMG_EXTENSIONS)}")
    return ImageIndex("imagefolder", root, files, labels, classes, stamps)


def _list_folder(root: str) -> ImageIndex:
    listing, stamps = _walk(root, skip_hidden=True)
    files = sorted(os.path.join(folder, name) for folder, (names, _) in listing.items() for name in names
                   if is_image_name(name))
    return ImageIndex("folder", root, files, None, [], stamps)


def _files_in(folder: str) -> set[str]:
    """Names of the files (or links to files) directly in `folder`; empty when it cannot be read."""
    try:
        with os.scandir(folder) as entries:
            return {entry.name for entry in entries if entry.is_file()}
    except OSError:
        return set()


def _read_list(path: str) -> ImageIndex:
    """The images a list file names, each checked to exist; DataIndexError naming the list, line and image of the
    first entry that is not a file. Existence is read from one listing per folder, not one stat per entry: on a
    network file system a million stats take minutes."""
    status = os.stat(path)
    base = os.path.dirname(path)
    files, lines = [], []
    with open(path, encoding="utf-8", errors="surrogateescape") as handle:
        for number, line in enumerate(handle, start=1):
            entry = line.strip()
            if entry and not entry.startswith("#"):
                files.append(entry)
                lines.append(number)
    present: dict[str, set[str]] = {}
    missing = []
    for number, entry in zip(lines, files):
        folder, name = os.path.split(os.path.join(base, entry))
        if folder not in present:
            present[folder] = _files_in(folder or ".")
        if name not in present[folder]:
            missing.append((number, entry))
    if missing:
        number, entry = missing[0]
        more = f"; {len(missing) - 1} more of its {len(files)} entries are missing too" if len(missing) > 1 else ""
        raise DataIndexError(f"{path} line {number}: {entry} is not an image file ({os.path.join(base, entry)} "
                             f"not found; paths are relative to the list's folder){more}")
    if not files:
        raise DataIndexError(f"{path} lists no images (one path per line; blank lines and # comments are skipped)")
    return ImageIndex("list", path, files, None, [], [_stamp("", status)])


_LISTERS: dict[str, Callable[[str], ImageIndex]] = {"list": _read_list, "folder": _list_folder,
                                                     "imagefolder": _list_imagefolder}


def load_index(source: str, cache_path: str | None = None) -> ImageIndex:
    """The index of the images at `source`: the one cached at `cache_path` when it is still valid (read_cache),
    else listed from the file system."""
    source = os.path.expanduser(source)
    kind = detect_kind(source)
    cached = read_cache(cache_path, kind, source) if cache_path is not None else None
    return cached or _LISTERS[kind](source)


# -------------------------------------------------------------------------------------------------- cache
def _cache_key(kind: str, source: str) -> dict[str, Any]:
    return {"format": _FORMAT, "kind": kind, "source": os.path.abspath(source), "extensions": list(_extensions(kind))}


def _unchanged(source: str, stamps: list[Stamp]) -> bool:
    for stamp in stamps:
        relative = stamp[0]
        try:
            status = os.stat(os.path.join(source, relative) if relative else source)
        except OSError:
            return False
        if _stamp(relative, status) != stamp:
            return False
    return True


def read_cache(cache_path: str, kind: str, source: str) -> ImageIndex | None:
    """The index cached at `cache_path` when it belongs to `source` of `kind` (same path, kind and extensions) and no
    folder (or list file) it was listed from changed since; None otherwise, also for an unreadable or torn file."""
    try:
        with open(cache_path, encoding="utf-8") as handle:
            saved = json.load(handle)
        if saved["key"] != _cache_key(kind, source):
            return None
        stamps = [(relative, mtime_ns, ctime_ns, size) for relative, mtime_ns, ctime_ns, size in saved["stamps"]]
        files, labels, classes = saved["files"], saved["labels"], saved["classes"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not _unchanged(source, stamps):
        return None
    return ImageIndex(kind, source, files, labels, classes, stamps, cached=True)


def write_cache(index: ImageIndex, cache_path: str) -> None:
    """Write `index` to `cache_path` atomically (io/atomic.py: a temporary file renamed over it, so a
    killed writer's leftover is removed at the next start). A failure only costs the next start a new listing:
    it is reported as a warning line, not an error."""
    payload = {"key": _cache_key(index.kind, index.source), "stamps": index.stamps, "classes": index.classes,
               "files": index.files, "labels": index.labels}
    try:
        with atomic.replaced(cache_path) as handle:
            json.dump(payload, handle, separators=(",", ":"))
    except OSError as error:
        print(f"warning: could not write the image index {cache_path} ({error.strerror or error}); the next start "
              f"lists the images again", flush=True)


# ------------------------------------------------------------------------------------------ every rank
def training_index(source: str, cache_path: str | None) -> ImageIndex:
    """The index of the training images at `source`, the same on every rank: the main process reads the cache at
    `cache_path` (None: no cache) or lists the images, and broadcasts the index, or the one-line error that stopped
    it, to the others. It prints where the index came from and how long that took."""
    result: ImageIndex | OSError | ValueError | None = None
    if distributed.is_main_process():
        start = time.perf_counter()
        try:
            result = load_index(source, cache_path)
        except (OSError, ValueError) as error:
            result = error
        else:
            how = f"index read from {cache_path}" if result.cached else "listed"
            print(f"training data {source}: {result.describe()} ({how} in {time.perf_counter() - start:.1f} s)",
                  flush=True)
    result = distributed.broadcast_object(result)
    if isinstance(result, Exception):
        raise result
    return result
