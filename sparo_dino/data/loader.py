"""The training data of one process: images -> sampler -> data loader -> the batch's crops on the device.

Either pipeline (`--augmentation per_image|batched`; auto: batched on CUDA). A resume mid-epoch or another worker
count sees the uninterrupted run's crops: the sampler skips what the epoch consumed, crops are seeded by position."""
from __future__ import annotations

import atexit
import contextlib
import itertools
import os
import weakref
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from sparo_dino import distributed, node_limits
from sparo_dino.data import image_files
from sparo_dino.data.augmentation import MultiCropAugmentation, SeededDataset, multicrop_kwargs
from sparo_dino.data.batched_data import (
    DeviceMultiCrop,
    collate_decoded,
    decoded_sizes,
    min_decode_area,
    reduce_jpeg_decoding,
    rgb_to_uint8_tensor,
)
from sparo_dino.data.datasets import build_dataset, require_min_size
from sparo_dino.eval.subsets import seeded_split
from sparo_dino.stop_signals import ignore_stop_signals

AUGMENTATIONS = ("auto", "per_image", "batched")
# The pipelines' former names, kept for command lines, YAML files and the config of checkpoints that use them.
AUGMENTATION_ALIASES = {"cpu": "per_image", "gpu": "batched"}
SHM_SAMPLE = 64  # image headers read at start-up to estimate the batched pipeline's shared memory
# Training data whose loader workers may still run; see _close_at_exit.
_OPEN: weakref.WeakSet[TrainingData] = weakref.WeakSet()


def canonical_augmentation(augmentation: str) -> str:
    """auto or a pipeline's name, with a former name (AUGMENTATION_ALIASES) replaced by today's."""
    name = AUGMENTATION_ALIASES.get(augmentation, augmentation)
    if name not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {augmentation!r}; choose from {', '.join(AUGMENTATIONS)}")
    return name


def resolve_augmentation(augmentation: str, device: torch.device) -> str:
    """The pipeline that runs: auto is batched on CUDA devices, where the batched crops are cheap, and per_image
    elsewhere (on a CPU the PIL workers are faster than batched crops on the training threads)."""
    name = canonical_augmentation(augmentation)
    if name == "auto":
        return "batched" if device.type == "cuda" else "per_image"
    return name


def loader_batch_bytes(config: Mapping[str, Any], pipeline: str, dataset: Dataset) -> int:
    """About what one loader worker passes per batch through shared memory. per_image: the recipe's float32 crops
    (exact). batched: the uint8 images padded to the batch's largest height and width, at the sizes the reduced
    decoding gives SHM_SAMPLE images spread over the data (headers only), or, without image files (Fashion-MNIST),
    at the size of the first image."""
    batch = config["batch_size_per_gpu"]
    if pipeline == "per_image":
        return batch * 3 * 4 * (2 * config["global_crop_size"] ** 2
                                + config["local_crops_number"] * config["local_crop_size"] ** 2)
    samples = getattr(dataset, "samples", None)
    if samples is None:
        return batch * dataset[0][0].numel()
    stride = max(1, len(samples) // SHM_SAMPLE)
    sizes = decoded_sizes([path for path, _ in samples[::stride][:SHM_SAMPLE]], min_decode_area(config))
    if not sizes:  # none readable: the workers will say which files
        return 0
    return batch * 3 * max(height for height, _ in sizes) * max(width for _, width in sizes)


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start an epoch after its first `start` samples (exact mid-epoch resume).

    With `subset` (dataset indices), it shuffles and shards those only, as if they were the whole dataset: the
    dataset itself stays whole, so its file names and bad-image records keep their indices."""

    start = 0

    def __init__(self, dataset: Dataset, subset: Sequence[int] | None = None, **kwargs: Any) -> None:
        super().__init__(range(len(subset)) if subset is not None else dataset, **kwargs)  # type: ignore[arg-type]
        self.subset = subset

    def set_position(self, epoch: int, start: int) -> None:
        self.set_epoch(epoch)
        self.start = start

    def __iter__(self) -> Iterator[int]:
        positions = itertools.islice(super().__iter__(), self.start, None)
        return positions if self.subset is None else (self.subset[position] for position in positions)

    def __len__(self) -> int:
        return self.num_samples - self.start


def train_subset(num_images: int, size: int | None, seed: int) -> list[int] | None:
    """--train_subset: the indices of at most `size` images, drawn from `seed` alone (sorted), so every rank and
    every resume trains on the same images; None trains on all of them."""
    if size is None or size >= num_images:
        return None
    return seeded_split(num_images, size, seed)[0].tolist()


class SkipFlags(Dataset):
    """Adds a third field to every sample: 1 when the image at that index was unreadable and replaced
    (--skip_bad_images), so the main process can count replacements however many workers met them."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:
        if name == "dataset":  # not yet set (e.g. during unpickling in a worker)
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, index: int) -> tuple[Any, int, int]:
        image, label = self.dataset[index]
        bad = getattr(self.dataset, "bad_images", ())  # files this worker failed to decode, each failing every time
        return image, label, int(bool(bad) and self.dataset.samples[index][0] in bad)


class TrainingData:
    """Batches of one process's share of the training images, and their crops on `device`.

    A loader batch ends with the per-sample `replaced` flags (SkipFlags); `crops(batch, epoch, iteration)` gives
    the trainer's crop list [global 1, global 2, local 1..N], each (batch, 3, size, size) on the device. Raises
    ValueError when the data holds fewer images than one global batch, or its images cannot be listed (the same
    error on every rank). Image files are found by image_files.training_index; `save_index` keeps their index.
    `identity` is the data's size and fingerprint, which checkpoints record.
    """

    def __init__(self, config: Mapping[str, Any], rank: int, world_size: int, device: torch.device,
                 crop_dtype: torch.dtype = torch.float32) -> None:
        self.pipeline = resolve_augmentation(config["augmentation"], device)
        self.device = device
        self.batch_size = config["batch_size_per_gpu"]
        seed = config["seed"]
        # image files (ImageFolder, folder, list): their index, the same on every rank; None for Fashion-MNIST
        self._index_path = os.path.join(config["output_dir"], image_files.INDEX_NAME)
        index = (image_files.training_index(config["data_path"], self._index_path)
                 if config["dataset"] == "imagefolder" else None)
        # what save_index writes: a listed index, kept by the main process only (1.28M names are ~100 MB)
        self._unsaved_index = (index if index is not None and not index.cached and distributed.is_main_process()
                               else None)
        if self.pipeline == "per_image":
            images = self._images(config, index, MultiCropAugmentation(**multicrop_kwargs(config)))
            self.dataset: Dataset = SeededDataset(SkipFlags(images), seed=seed)
            collate = None
            self.device_crops: DeviceMultiCrop | None = None
        else:
            images = self._images(config, index, rgb_to_uint8_tensor)
            self.dataset = SkipFlags(reduce_jpeg_decoding(images, config))
            collate = collate_decoded
            self.device_crops = DeviceMultiCrop(config, seed, rank, device, out_dtype=crop_dtype)
        # what the run trains on, recorded in its checkpoints: a rerun on other images must not resume silently
        self.identity = {"images": len(images), "fingerprint": (index or images).fingerprint()}
        subset = train_subset(len(self.dataset), config.get("train_subset"), seed)
        require_min_size(self.dataset if subset is None else subset, self.batch_size * world_size,
                         f"training data {config['data_path']}"
                         f"{'' if subset is None else ' (--train_subset)'} ({self.batch_size} per process x "
                         f"{world_size} processes)")
        self.sampler = ResumableSampler(self.dataset, subset, num_replicas=world_size, rank=rank, shuffle=True,
                                        seed=seed)
        self.iters_per_epoch = self.sampler.num_samples // self.batch_size
        workers = config["num_workers"]
        # Own generator: creating an epoch's iterator draws a worker base seed, which must not shift the global
        # stream that drop-path uses (a mid-epoch resume creates its iterator at another point of that stream).
        # Worker seeds themselves do not matter: no crop depends on them.
        self.loader = DataLoader(self.dataset, sampler=self.sampler, batch_size=self.batch_size, num_workers=workers,
                                 collate_fn=collate, pin_memory=device.type == "cuda", drop_last=True,
                                 persistent_workers=workers > 0,  # SeededDataset's epoch reaches them
                                 worker_init_fn=ignore_stop_signals,  # SIGTERM to the job must not kill the workers
                                 generator=torch.Generator().manual_seed(seed + rank))
        self._check_shm(config)
        _OPEN.add(self)

    def _check_shm(self, config: Mapping[str, Any]) -> None:
        """One line at start-up when the workers' prefetched batches would not fit in /dev/shm (node_limits)."""
        if not self.loader.num_workers:
            return
        line = node_limits.check_shm(loader_batch_bytes(config, self.pipeline, self.dataset),
                                     self.loader.num_workers, self.loader.prefetch_factor or 0,
                                     distributed.local_world_size(), node_limits.shm_free_bytes())
        if line is not None and distributed.is_main_process():
            print(line, flush=True)

    @staticmethod
    def _images(config: Mapping[str, Any], index: image_files.ImageIndex | None,
                transform: Callable[[Any], Any]) -> Dataset:
        if index is None:
            return build_dataset(config["dataset"], config["data_path"], transform=transform,
                                 skip_bad_images=config["skip_bad_images"])
        return index.dataset(transform, config["skip_bad_images"])

    def save_index(self) -> None:
        """Keep the index of the training images in the output dir for the next start, unless it came from there
        (main process; called once the run's checkpoint checks passed, so a refused start writes nothing)."""
        if self._unsaved_index is not None:
            image_files.write_cache(self._unsaved_index, self._index_path)
            self._unsaved_index = None

    def close(self) -> None:
        """Stop the loader's workers now (a later epoch would start new ones); see `end_workers`."""
        iterator = getattr(self.loader, "_iterator", None)  # the persistent workers' iterator, once an epoch ran
        self.loader._iterator = None
        end_workers(iterator)

    def start_epoch(self, epoch: int, iteration: int) -> None:
        """Make the loader's next iterator yield `epoch`'s batches from `iteration` on."""
        self.sampler.set_position(epoch, iteration * self.batch_size)
        if isinstance(self.dataset, SeededDataset):
            self.dataset.set_epoch(epoch)

    def crops(self, batch: Sequence[Any], epoch: int, iteration: int) -> list[torch.Tensor]:
        """The crop list of a loader batch, on the device (no host synchronisation)."""
        if self.device_crops is None:
            return [crop.to(self.device, non_blocking=True) for crop in batch[0]]
        pixels, sizes = batch[0], batch[1]
        return self.device_crops(pixels, sizes, epoch, iteration)

    @staticmethod
    def replaced(batch: Sequence[Any]) -> torch.Tensor:
        """Per sample, 1 when its unreadable image was replaced by the next readable one (--skip_bad_images)."""
        return batch[-1]


def end_workers(iterator: Any) -> None:
    """Stop the workers of a data-loader iterator now (nothing to do for one without workers).

    They ignore SIGTERM and SIGINT (stop_signals.ignore_stop_signals), so only the stop request that the iterator
    sends from its finalizer ends them. After an error the iterator sits in the traceback's reference cycles: that
    request then waits for the garbage collector, which runs it after closing the queues that would carry it (the
    workers wait for indices forever), or never, when the interpreter exits first (see _close_at_exit). Here the
    same request goes out while everything is alive; a worker still busy after it is killed."""
    if iterator is None or not hasattr(iterator, "_shutdown_workers"):
        return
    iterator._shutdown_workers()
    for worker in iterator._workers:
        if worker.is_alive():
            worker.kill()
            worker.join()


@contextlib.contextmanager
def batches_of(loader: DataLoader) -> Iterator[Iterator[Any]]:
    """Iterate `loader` in a block whose end, also by an error or a stop, ends the loader's workers."""
    iterator = iter(loader)
    try:
        yield iterator
    finally:
        end_workers(iterator)


@atexit.register
def _close_at_exit() -> None:
    """Close the training data still open when the interpreter exits, e.g. after a one-line error.

    Otherwise multiprocessing's exit handler would send the workers SIGTERM, which they ignore, and wait for them
    forever: the run would print its error and hang. atexit runs handlers in reverse order of registration, and
    multiprocessing and torch's data loader registered theirs when imported above, so this one runs first."""
    for data in list(_OPEN):
        data.close()
