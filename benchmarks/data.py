"""Multi-crop data throughput from a JPEG ImageFolder: the CPU PIL pipeline vs the batched tensor pipeline.

- cpu: what training uses today, build_dataset + MultiCropAugmentation (PIL decode and augmentation per image) in
  --workers data-loader processes.
- tensor: JPEG bytes read by the workers; decoded with torchvision.io.decode_jpeg on the GPU in one batched call
  (--decode gpu, the default with CUDA) or in the workers (--decode cpu); then gpu_augmentation.BatchedMultiCrop on
  the device for the whole batch.
Both produce 2 global + N local normalized crops per image; img/s counts images (with all their crops) delivered to
the device. --synthetic N writes N random JPEGs of about --synthetic_size px to a temporary ImageFolder.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder
from torchvision.io import ImageReadMode, decode_jpeg, read_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sparo_dino.augmentation import MultiCropAugmentation  # noqa: E402
from sparo_dino.datasets import build_dataset  # noqa: E402
from sparo_dino.gpu_augmentation import BatchedMultiCrop  # noqa: E402


def write_synthetic_jpegs(root: str, count: int, size: int, seed: int = 0) -> str:
    """`count` JPEGs (quality 90) of (0.75-1.25 x size) px per side in root/synthetic/: smooth random colour fields
    plus noise, so they compress and decode roughly like photos rather than like white noise."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "synthetic")
    os.makedirs(folder, exist_ok=True)
    for index in range(count):
        width, height = (int(size * rng.uniform(0.75, 1.25)) for _ in range(2))
        coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
        pixels = np.asarray(coarse.resize((width, height), Image.BICUBIC), dtype=np.float32)
        pixels = np.clip(pixels + rng.normal(0, 8, pixels.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(os.path.join(folder, f"{index:06d}.jpg"), quality=90)
    return root


def decoded_rgb(path: str) -> torch.Tensor:
    return decode_jpeg(read_file(path), mode=ImageReadMode.RGB)


def as_list(batch: list[tuple[torch.Tensor, int]]) -> list[torch.Tensor]:
    """Collate images of different sizes (JPEG bytes or decoded) into a plain list."""
    return [item for item, _ in batch]


def images_per_second(batches: Iterable, process, batch_size: int, warmup: int, timed: int,
                      device: torch.device) -> float:
    """Pull warmup + timed batches through `process` (which moves them to the device); img/s of the timed ones."""
    iterator = iter(batches)
    for _ in range(warmup):
        process(next(iterator))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(timed):
        process(next(iterator))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return batch_size * timed / (time.perf_counter() - start)


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data_path", help="JPEG ImageFolder root (class subfolders)")
    source.add_argument("--synthetic", type=int, metavar="N", help="write N random JPEGs to a temporary folder")
    parser.add_argument("--synthetic_size", type=int, default=400, help="side of the synthetic JPEGs (about)")
    parser.add_argument("--workers", type=int, default=2, help="data-loader processes for both pipelines")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=4, help="timed batches per pipeline")
    parser.add_argument("--warmup", type=int, default=1, help="untimed batches first (worker start-up)")
    parser.add_argument("--global_size", type=int, default=224)
    parser.add_argument("--local_size", type=int, default=96)
    parser.add_argument("--local_crops_number", type=int, default=10)
    parser.add_argument("--device", default="auto", help="where the tensor pipeline runs: auto, cuda, cpu")
    parser.add_argument("--decode", default="auto", choices=["auto", "cpu", "gpu"],
                        help="tensor pipeline JPEG decode: gpu (batched nvjpeg) or cpu (in the workers)")
    return parser


def run(args: argparse.Namespace, root: str) -> None:
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    decode_on_gpu = args.decode == "gpu" or (args.decode == "auto" and device.type == "cuda")
    if decode_on_gpu and device.type != "cuda":
        raise SystemExit("error: --decode gpu needs a CUDA --device")
    needed = args.batch_size * (args.warmup + args.batches)
    crops = dict(local_crops_number=args.local_crops_number, global_crop_size=args.global_size,
                 local_crop_size=args.local_size)
    cpu_dataset = build_dataset("imagefolder", root, transform=MultiCropAugmentation(**crops))
    if len(cpu_dataset) < needed:
        raise SystemExit(f"error: {root} has {len(cpu_dataset)} images but --batch_size {args.batch_size} x "
                         f"(--warmup {args.warmup} + --batches {args.batches}) needs {needed}")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device: {name} | tensor pipeline decode on {'gpu' if decode_on_gpu else 'cpu workers'} | "
          f"workers {args.workers} | cores {os.cpu_count()} | threads {torch.get_num_threads()} | "
          f"{len(cpu_dataset)} images | crops 2x{args.global_size} + {args.local_crops_number}x{args.local_size}",
          flush=True)
    loader_options = dict(batch_size=args.batch_size, num_workers=args.workers, shuffle=False, drop_last=True,
                          pin_memory=device.type == "cuda")

    def to_device(batch: tuple[list[torch.Tensor], torch.Tensor]) -> list[torch.Tensor]:
        return [crop.to(device, non_blocking=True) for crop in batch[0]]

    cpu_rate = images_per_second(DataLoader(cpu_dataset, **loader_options), to_device, args.batch_size,
                                 args.warmup, args.batches, device)
    print(f"pipeline=cpu img/s={cpu_rate:.2f} img/s_per_worker={cpu_rate / max(1, args.workers):.2f}", flush=True)

    augment = BatchedMultiCrop(**crops)
    tensor_dataset = ImageFolder(root, loader=read_file if decode_on_gpu else decoded_rgb)
    tensor_loader = DataLoader(tensor_dataset, collate_fn=as_list, **{**loader_options, "pin_memory": False})

    def tensor_process(batch: list[torch.Tensor]) -> list[torch.Tensor]:
        if decode_on_gpu:
            images = decode_jpeg(batch, mode=ImageReadMode.RGB, device=device)
        else:
            images = [image.to(device, non_blocking=True) for image in batch]
        return augment(images)

    tensor_rate = images_per_second(tensor_loader, tensor_process, args.batch_size, args.warmup, args.batches,
                                    device)
    print(f"pipeline=tensor img/s={tensor_rate:.2f} device={device.type}", flush=True)
    print(f"ratio tensor/cpu: img/s x{tensor_rate / cpu_rate:.2f}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    if min(args.batch_size, args.batches) < 1 or args.warmup < 0 or args.workers < 0:
        raise SystemExit("error: --batch_size and --batches must be >= 1, --warmup and --workers >= 0")
    if args.data_path is not None:
        if not os.path.isdir(args.data_path):
            raise SystemExit(f"error: --data_path {args.data_path} is not a directory")
        run(args, args.data_path)
        return 0
    with tempfile.TemporaryDirectory(prefix="sparo_data_bench_") as root:
        write_synthetic_jpegs(root, args.synthetic, args.synthetic_size)
        run(args, root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
