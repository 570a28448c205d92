"""End-to-end training throughput: main_dino.py's trainer from a JPEG folder to the optimizer step, per path.

Each path builds the real trainer (trainer.DinoTrainer from main_dino.py's flags, no files written) and runs its data
loader, its crops (train_data.TrainingData.crops) and its step (DinoTrainer.train_step), as the training loop does:
- reference: --augmentation per_image --compile false --precision fp32 --fused_adamw false (PIL crops in the workers,
  eager fp32, foreach AdamW);
- fast: --augmentation batched --compile auto --precision auto (main_dino.py's default on a GPU: crops made on the
  device, compiled bf16 step, fused AdamW).
After --warmup steps (compilation, worker start-up), --steps timed steps give img/s and where the time went:
- CPU side: `data wait`, the time the loop waited for the data-loader workers (more than ~0 means the workers, not
  the device, set the pace) and `host`, the time the main thread spent issuing crops and step;
- device side: the device time of the crops and of the step, from CUDA events (GPU only; on a CPU the host times
  are the computation itself).

GPU (the benchmark recipe): python benchmarks/train.py --synthetic 1536 --workers 16
CPU smoke size: see `make bench` (benchmarks/report.py).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import Row, on_image_folder, pick_device, synchronize  # noqa: E402

from sparo_dino.cli.train_flags import parse_train_args  # noqa: E402
from sparo_dino.distributed import DistInfo  # noqa: E402
from sparo_dino.run_config import RunConfig  # noqa: E402
from sparo_dino.train.progress import memory_mb  # noqa: E402
from sparo_dino.train.trainer import DinoTrainer  # noqa: E402

PATHS = {"reference": ["--augmentation", "per_image", "--compile", "false", "--precision", "fp32",
                       "--fused_adamw", "false"],
         "fast": ["--augmentation", "batched", "--precision", "auto"]}


@dataclass
class Split:
    """Per-step means (ms) of where the time went, and the throughput of the timed steps."""
    images_per_s: float
    data_wait_ms: float
    host_ms: float
    device_crops_ms: float | None
    device_step_ms: float | None
    peak_memory_mb: float


def trainer_argv(args: argparse.Namespace, arch: str, root: str, output_dir: str, path: str) -> list[str]:
    compile_flag = ["--compile", args.compile] if path == "fast" else []
    return ["--arch", arch, "--data_path", root, "--output_dir", output_dir, "--patch_size", str(args.patch_size),
            "--img_size", str(args.img_size or args.global_size), "--global_crop_size", str(args.global_size),
            "--local_crop_size", str(args.local_size), "--local_crops_number", str(args.local_crops_number),
            "--out_dim", str(args.out_dim), "--batch_size_per_gpu", str(args.batch_size_per_gpu),
            "--num_workers", str(args.workers), *PATHS[path], *compile_flag]


def batches(trainer: DinoTrainer) -> Iterator[tuple[int, int, object]]:
    """(epoch, iteration, batch) from the first epoch on, as the training loop gets them."""
    epoch = 0
    while True:
        trainer.data.start_epoch(epoch, 0)
        for iteration, batch in enumerate(trainer.data.loader):
            yield epoch, iteration, batch
        epoch += 1


def time_trainer(trainer: DinoTrainer, steps: int, warmup: int) -> Split:
    device = trainer.device
    on_gpu = device.type == "cuda"
    source = batches(trainer)
    waits, hosts, events = [], [], []
    for count in range(warmup + steps):
        if count == warmup:
            synchronize(device)
            if on_gpu:
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
        before = time.perf_counter()
        epoch, iteration, batch = next(source)
        fetched = time.perf_counter()
        marks = [torch.cuda.Event(enable_timing=True) for _ in range(3)] if on_gpu else []
        if marks:
            marks[0].record()
        crops = trainer.data.crops(batch, epoch, iteration)
        if marks:
            marks[1].record()
        # epoch 1 and after: the head's last layer trains, as in all but the first epoch
        trainer.train_step(crops, max(epoch, trainer.config.optim.freeze_last_layer), iteration)
        if marks:
            marks[2].record()
        if count >= warmup:
            waits.append(fetched - before)
            hosts.append(time.perf_counter() - fetched)
            events.append(marks)
    synchronize(device)
    elapsed = time.perf_counter() - start
    batch_size = trainer.batch_size

    def mean_ms(values: Sequence[float]) -> float:
        return 1000 * sum(values) / len(values)

    crops_ms = mean_ms([a.elapsed_time(b) / 1000 for a, b, _ in events]) if on_gpu else None
    step_ms = mean_ms([b.elapsed_time(c) / 1000 for _, b, c in events]) if on_gpu else None
    return Split(batch_size * steps / elapsed, mean_ms(waits), mean_ms(hosts), crops_ms, step_ms, memory_mb(device))


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data_path", help="JPEG ImageFolder root (class subfolders)")
    source.add_argument("--synthetic", type=int, metavar="N", help="write N random JPEGs to a temporary folder")
    parser.add_argument("--synthetic_size", type=int, default=440, help="side of the synthetic JPEGs (about)")
    parser.add_argument("--archs", nargs="+", default=["vit_small", "vit_small_sparo"])
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS))
    parser.add_argument("--batch_size_per_gpu", type=int, default=64)
    parser.add_argument("--global_size", type=int, default=224)
    parser.add_argument("--img_size", type=int, default=None,
                        help="position-embedding grid (default: --global_size); the CPU demo trains 16 px crops of a "
                             "32 px grid")
    parser.add_argument("--local_size", type=int, default=96)
    parser.add_argument("--local_crops_number", type=int, default=10, help="the benchmark recipe: 2x224 + 10x96")
    parser.add_argument("--patch_size", type=int, default=16)
    parser.add_argument("--out_dim", type=int, default=65536)
    parser.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1), help="data-loader processes")
    parser.add_argument("--compile", default="auto", help="the fast path's --compile (auto: true on GPUs)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per path")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation, worker start-up)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cuda, cuda:1, cpu")
    return parser


def run(args: argparse.Namespace, root: str) -> list[Row]:
    device = pick_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    setting = (f"batch {args.batch_size_per_gpu}, 2x{args.global_size} + {args.local_crops_number}x{args.local_size}, "
               f"img_size {args.img_size or args.global_size}, patch {args.patch_size}, out_dim {args.out_dim}, "
               f"{args.workers} workers")
    print(f"device: {name} | torch {torch.__version__} | cores {os.cpu_count()} | {setting}", flush=True)
    rows = []
    for arch in args.archs:
        rates = {}
        for path in args.paths:
            with tempfile.TemporaryDirectory(prefix="sparo_train_bench_") as output_dir:
                flags = parse_train_args(trainer_argv(args, arch, root, output_dir, path))
                trainer = DinoTrainer(RunConfig.from_flags(flags), DistInfo(0, 1, 0, device))
                split = time_trainer(trainer, args.steps, args.warmup)
                label = (f"augmentation {trainer.data.pipeline}, {trainer.precision}, "
                         f"{'compiled' if trainer.step.compiled else 'eager'}")
                del trainer
            rates[path] = split.images_per_s
            device_part = ("" if split.device_step_ms is None else
                           f" device_crops_ms={split.device_crops_ms:.1f} device_step_ms={split.device_step_ms:.1f}")
            print(f"arch={arch} path={path} ({label}) img/s={split.images_per_s:.2f} "
                  f"data_wait_ms={split.data_wait_ms:.1f} host_ms={split.host_ms:.1f}{device_part} "
                  f"peak_mem_MB={split.peak_memory_mb:.0f}", flush=True)
            path_setting = f"{arch}, {setting}, {path}: {label}"
            rows += [Row("train", path_setting, "img/s (JPEG to optimizer step)", f"{split.images_per_s:.2f}"),
                     Row("train", path_setting, "CPU side ms/step: data wait, host",
                         f"{split.data_wait_ms:.1f}, {split.host_ms:.1f}")]
            if split.device_step_ms is not None:
                rows.append(Row("train", path_setting, "device ms/step: crops, step",
                                f"{split.device_crops_ms:.1f}, {split.device_step_ms:.1f}"))
        if len(rates) == 2:
            ratio = rates["fast"] / rates["reference"]
            print(f"arch={arch} ratio fast/reference: img/s x{ratio:.2f}", flush=True)
            rows.append(Row("train", f"{arch}, {setting}", "fast/reference img/s", f"x{ratio:.2f}"))
    return rows


def measure(args: argparse.Namespace) -> list[Row]:
    if args.steps < 1 or args.warmup < 0 or args.workers < 0:
        raise SystemExit("error: --steps must be >= 1, --warmup and --workers >= 0")
    return on_image_folder(args.data_path, args.synthetic, args.synthetic_size, lambda root: run(args, root))


def main(argv: Sequence[str] | None = None) -> int:
    measure(get_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
