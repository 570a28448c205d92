"""Multi-crop data cost from a JPEG ImageFolder: the trainer's two pipelines (train_data.TrainingData).

- per_image (`--augmentation per_image`, the reference): a data-loader worker decodes each image with PIL and makes
  its 2 global + N local crops (augmentation.MultiCropAugmentation).
- batched (`--augmentation batched`, the default on GPUs): a worker only decodes (batched_data: PIL, large JPEGs at
  a reduced DCT scale) and packs the batch into one uint8 tensor; the device makes the crops
  (batched_data.DeviceMultiCrop).

Four measurements:
1. worker CPU time per image, in this process with one thread (CPU time, so other jobs on the machine count less
   than in wall time): everything a data-loader worker does per image in each pipeline, the img/s one core feeds
   and the ratio of the two pipelines. This is what decides whether a machine's cores can feed its GPUs.
2. throughput through the real data loader with --workers processes: images (with all their crops) delivered to
   the device per second. On a CPU-only machine the batched pipeline's crops are made by the main process on the CPU,
   so its number there says nothing about a GPU.
3. the device multi-crop alone (random pixels already on the device) and the price of its blur's fixed shapes:
   blurring every sample of a crop-size group vs only the samples that drew a blur (ratio and share of the crops).
4. what a batch of the device multi-crop costs the host (benchmarks/crop_host_cost.py): the aten ops it issues
   (`aten ops per batch`, machine-independent) and its host CPU ms per batch on this CPU, against --baseline, the
   revision before issue 27.6 cut the ops, in the same run (its package from git archive, in its own process;
   the two alternate --host_rounds times, so a load on the machine falls on both).
With CUDA, a third pipeline for comparison: workers only read the JPEG bytes, nvjpeg decodes the batch on the GPU
(torchvision.io.decode_jpeg), then the same device crops (not wired into the trainer).

--synthetic N writes N random JPEGs of about --synthetic_size px to a temporary ImageFolder.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Iterable, Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import Row, on_image_folder, pick_device, synchronize  # noqa: E402

from sparo_dino.cli.train_flags import parse_train_args  # noqa: E402
from sparo_dino.data.batched_augmentation import BatchedMultiCrop, ViewParams, gaussian_blur  # noqa: E402
from sparo_dino.data.batched_data import collate_decoded  # noqa: E402
from sparo_dino.data.loader import TrainingData  # noqa: E402

PIPELINES = ("per_image", "batched")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOST_COST = os.path.join(REPO, "benchmarks", "crop_host_cost.py")
# The last revision before issue 27.6 (2,716 aten ops per batch), and where its package kept the multi-crop.
BASELINE = "67e4f2f058745a1d5a7b2246a975852d25ba38c8"
BASELINE_MODULE = "sparo_dino.batched_augmentation"


def training_config(args: argparse.Namespace, root: str, pipeline: str, workers: int) -> dict[str, Any]:
    """main_dino.py's flags for this benchmark's data settings (defaults and validation of the real CLI)."""
    argv = ["--data_path", root, "--augmentation", pipeline, "--num_workers", str(workers),
            "--batch_size_per_gpu", str(args.batch_size), "--local_crops_number", str(args.local_crops_number),
            "--global_crop_size", str(args.global_size), "--local_crop_size", str(args.local_size),
            "--img_size", str(args.global_size), "--patch_size", str(args.patch_size)]
    return vars(parse_train_args(argv))


def worker_ms_per_image(data: TrainingData, count: int) -> float:
    """CPU milliseconds per image of a worker's whole job in this pipeline (sample loading and collation)."""
    samples = range(count)
    start = time.process_time()
    batch = [data.dataset[index] for index in samples]
    if data.pipeline == "batched":
        collate_decoded(batch)
    else:
        torch.utils.data.default_collate(batch)
    return 1000 * (time.process_time() - start) / count


def images_per_second(batches: Iterable, process: Callable[[Any], Any], batch_size: int, warmup: int, timed: int,
                      device: torch.device) -> float:
    """Pull warmup + timed batches through `process` (which makes their crops on the device); img/s of the timed."""
    iterator = iter(batches)
    for _ in range(warmup):
        process(next(iterator))
    synchronize(device)
    start = time.perf_counter()
    for _ in range(timed):
        process(next(iterator))
    synchronize(device)
    return batch_size * timed / (time.perf_counter() - start)


def ms_per_call(function: Callable[[], Any], device: torch.device, reps: int) -> float:
    function()  # warm-up (and, on a GPU with cudnn.benchmark, the shape's autotuning)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(reps):
        function()
    synchronize(device)
    return 1000 * (time.perf_counter() - start) / reps


def blur_cost(args: argparse.Namespace, device: torch.device) -> list[Row]:
    """What the device blur's fixed shapes cost: ms per batch of the whole device multi-crop, and of its blur as it
    runs (every sample of a crop-size group, one convolution shape per group, kept where the sample drew a blur)
    against blurring only the samples that drew one (a shape per count, which cudnn.benchmark would tune one by one).
    Images are --synthetic_size px random pixels already on the device, so JPEG decoding does not dilute the ratio."""
    aug = BatchedMultiCrop(local_crops_number=args.local_crops_number, global_crop_size=args.global_size,
                           local_crop_size=args.local_size)
    generator = torch.Generator().manual_seed(0)
    side = args.synthetic_size
    sizes = torch.full((args.batch_size, 2), side)
    pixels = torch.randint(0, 256, (args.batch_size, 3, side, side), generator=generator, dtype=torch.uint8)
    pixels = pixels.to(device)
    params = aug.sample(sizes, generator)
    crops_ms = ms_per_call(lambda: aug.apply(pixels, sizes, params), device, args.batches)
    setting = f"batch {args.batch_size}, 2x{args.global_size} + {args.local_crops_number}x{args.local_size}"
    rows = [Row("data", f"{setting}, device multi-crop on {device.type}", "ms/batch", f"{crops_ms:.1f}")]
    print(f"device crops ms/batch={crops_ms:.1f}", flush=True)
    blur_ms = {"all": 0.0, "drawn": 0.0}
    for name, views in (("global", slice(0, 2)), ("local", slice(2, None))):
        group = ViewParams.cat(params[views])
        if group.blur.numel() == 0:
            continue
        spec = aug.views[views][0]
        images = torch.rand(group.blur.numel(), 3, spec.size, spec.size, generator=generator).to(device)
        drawn = torch.nonzero(group.blur).flatten()
        blur_ms["all"] += ms_per_call(lambda: gaussian_blur(images, group.sigma, spec.blur_radius), device,
                                      args.batches)
        blur_ms["drawn"] += ms_per_call(lambda: gaussian_blur(images[drawn.to(device)], group.sigma[drawn],
                                                              spec.blur_radius), device, args.batches)
        print(f"blur {name} crops: {drawn.numel()} of {group.blur.numel()} drew a blur", flush=True)
    ratio = blur_ms["all"] / blur_ms["drawn"]
    print(f"blur ms/batch whole groups={blur_ms['all']:.1f} drawn only={blur_ms['drawn']:.1f} ratio x{ratio:.2f} "
          f"extra share of device crops={100 * (blur_ms['all'] - blur_ms['drawn']) / crops_ms:.1f}%", flush=True)
    return rows + [Row("data", f"{setting}, blur on {device.type}", "ms/batch whole groups (fixed shapes) vs drawn "
                       "samples only", f"{blur_ms['all']:.1f} vs {blur_ms['drawn']:.1f} (x{ratio:.2f})")]


def host_cost_of(tree: str, module: str, args: argparse.Namespace) -> dict[str, Any]:
    """crop_host_cost.py's measurement of the multi-crop in `module` of the package in `tree`, in a fresh process."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tree, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    command = [sys.executable, HOST_COST, "--module", module, "--batch_size", str(args.batch_size),
               "--local_crops_number", str(args.local_crops_number), "--batches", str(args.host_batches)]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{HOST_COST} on {tree} failed: {result.stderr.strip()[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def extract_package(revision: str, folder: str) -> None:
    """This repository's sparo_dino/ at `revision` in `folder` (git archive); CalledProcessError if git cannot."""
    archive = subprocess.run(["git", "-C", REPO, "archive", "--format=tar", revision, "sparo_dino"],
                             capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", folder], input=archive.stdout, capture_output=True, check=True)


def host_cost(args: argparse.Namespace) -> list[Row]:
    """Aten ops and host ms per batch of this checkout's multi-crop against --baseline's (module BASELINE_MODULE
    there), alternating --host_rounds times; without git history or with --baseline '', this checkout's alone."""
    runs: dict[str, list[dict[str, Any]]] = {"new": [], "baseline": []}
    with tempfile.TemporaryDirectory(prefix="sparo_baseline_") as folder:
        trees = {"new": (REPO, BatchedMultiCrop.__module__)}
        if args.baseline:
            try:
                extract_package(args.baseline, folder)
                trees["baseline"] = (folder, BASELINE_MODULE)
            except (OSError, subprocess.CalledProcessError) as error:
                detail = error.stderr.decode().strip() if isinstance(error, subprocess.CalledProcessError) else error
                print(f"baseline {args.baseline:.7}: not measured (git archive: {detail})", flush=True)
        for _ in range(args.host_rounds):
            for name, (tree, module) in trees.items():
                runs[name].append(host_cost_of(tree, module, args))
    views = f"batch {args.batch_size}, 2 + {args.local_crops_number} views"
    measured = {name: {"ops_padded": done[0]["ops_padded"], "ops_list": done[0]["ops_list"],
                       "ms": statistics.median(ms for run in done for ms in run["ms"])}
                for name, done in runs.items() if done}
    new, old = measured["new"], measured.get("baseline")

    def against(key: str, unit: str) -> str:
        return f"; baseline {args.baseline:.7}: {old[key]:.{unit}f}, x{old[key] / new[key]:.2f}" if old else ""

    print(f"aten ops per batch: {new['ops_padded']} ({views}, the padded batch the trainer passes"
          f"{against('ops_padded', '0')})", flush=True)
    print(f"aten ops per batch from a list of images: {new['ops_list']} ({views}{against('ops_list', '0')})",
          flush=True)
    timed = args.host_rounds * args.host_batches
    print(f"host ms per batch: {new['ms']:.1f} ({views}, CPU time, median of {timed} batches, pixel work shrunk to "
          f"4/2 px crops{against('ms', '1')})", flush=True)
    baseline = f" (baseline {args.baseline:.7})" if old else ""
    return [Row("data", f"{views}, device multi-crop", f"aten ops per batch{baseline}",
                f"{new['ops_padded']}" + (f" ({old['ops_padded']})" if old else "")),
            Row("data", f"{views}, device multi-crop, pixel work shrunk", f"host ms per batch{baseline}",
                f"{new['ms']:.1f}" + (f" ({old['ms']:.1f}, x{old['ms'] / new['ms']:.2f})" if old else ""))]


def nvjpeg_rate(args: argparse.Namespace, root: str, device: torch.device, data: TrainingData) -> float:
    """img/s of the GPU-decode variant: workers read bytes, nvjpeg decodes the batch, the device crops it."""
    from torchvision.datasets import ImageFolder
    from torchvision.io import ImageReadMode, decode_jpeg, read_file

    from sparo_dino.data.batched_augmentation import pad_images

    files = ImageFolder(root, loader=read_file)
    loader = torch.utils.data.DataLoader(files, batch_size=args.batch_size, num_workers=args.workers, drop_last=True,
                                         collate_fn=lambda batch: [item for item, _ in batch])

    def process(batch: list[torch.Tensor]) -> list[torch.Tensor]:
        images = decode_jpeg(batch, mode=ImageReadMode.RGB, device=device)
        pixels, sizes = pad_images(images)
        return data.device_crops(pixels, sizes.cpu(), 0, 0)

    return images_per_second(loader, process, args.batch_size, args.warmup, args.batches, device)


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data_path", help="JPEG ImageFolder root (class subfolders)")
    source.add_argument("--synthetic", type=int, metavar="N", help="write N random JPEGs to a temporary folder")
    parser.add_argument("--synthetic_size", type=int, default=440,
                        help="side of the synthetic JPEGs (about; 440 gives ImageNet's typical 330-550 px)")
    parser.add_argument("--workers", type=int, default=2, help="data-loader processes for the throughput runs")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=4, help="timed batches per pipeline")
    parser.add_argument("--warmup", type=int, default=1, help="untimed batches first (worker start-up)")
    parser.add_argument("--cost_images", type=int, default=32, help="images timed for the per-image worker cost")
    parser.add_argument("--global_size", type=int, default=224)
    parser.add_argument("--local_size", type=int, default=96)
    parser.add_argument("--local_crops_number", type=int, default=10)
    parser.add_argument("--patch_size", type=int, default=16, help="only to satisfy the CLI's size checks")
    parser.add_argument("--device", default="auto", help="where the gpu pipeline crops: auto, cuda, cpu")
    parser.add_argument("--baseline", default=BASELINE,
                        help="git revision whose multi-crop host cost is measured too ('' for none)")
    parser.add_argument("--host_batches", type=int, default=20, help="timed batches per host cost run")
    parser.add_argument("--host_rounds", type=int, default=2, help="alternating runs of this checkout and --baseline")
    return parser


def run(args: argparse.Namespace, root: str) -> list[Row]:
    device = pick_device(args.device)
    needed = args.batch_size * (args.warmup + args.batches)
    try:
        data = {pipeline: TrainingData(training_config(args, root, pipeline, args.workers), 0, 1, device)
                for pipeline in PIPELINES}
    except ValueError as error:  # fewer images than one batch
        raise SystemExit(f"error: {error}") from error
    count = len(data["per_image"].dataset)
    if count < max(needed, args.cost_images):
        raise SystemExit(f"error: {root} has {count} images but --batch_size {args.batch_size} x (--warmup "
                         f"{args.warmup} + --batches {args.batches}) and --cost_images {args.cost_images} need "
                         f"{max(needed, args.cost_images)}")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    setting = f"2x{args.global_size} + {args.local_crops_number}x{args.local_size}"
    print(f"device: {name} | workers {args.workers} | cores {os.cpu_count()} | {count} images | crops {setting}",
          flush=True)
    rows = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a worker's share: one core each
    try:
        cost = {pipeline: worker_ms_per_image(data[pipeline], args.cost_images) for pipeline in PIPELINES}
    finally:
        torch.set_num_threads(threads)
    for pipeline in PIPELINES:
        per_core = 1000 / cost[pipeline]
        print(f"worker pipeline={pipeline} cpu_ms_per_image={cost[pipeline]:.2f} img/s_per_core={per_core:.1f}",
              flush=True)
        rows += [Row("data", f"{setting}, {pipeline} pipeline, one worker core", "worker CPU ms/image",
                     f"{cost[pipeline]:.2f}"),
                 Row("data", f"{setting}, {pipeline} pipeline, one worker core", "img/s one core feeds",
                     f"{per_core:.1f}")]
    ratio = cost["per_image"] / cost["batched"]
    print(f"ratio worker cost per_image/batched: x{ratio:.2f}", flush=True)
    rows.append(Row("data", setting, "worker CPU cost, per_image / batched pipeline", f"x{ratio:.2f}"))

    rates = {}
    for pipeline in PIPELINES:
        source = data[pipeline]
        source.start_epoch(0, 0)
        rates[pipeline] = images_per_second(
            source.loader, lambda batch, source=source: source.crops(batch, 0, 0), args.batch_size, args.warmup,
            args.batches, device)
        where = "device " + device.type if pipeline == "batched" else "workers"
        print(f"pipeline={pipeline} img/s={rates[pipeline]:.2f} crops_on={where}", flush=True)
        rows.append(Row("data", f"{setting}, {pipeline} pipeline, {args.workers} workers, crops on {where}",
                        "img/s", f"{rates[pipeline]:.2f}"))
    print(f"ratio batched/per_image pipeline: img/s x{rates['batched'] / rates['per_image']:.2f}", flush=True)
    if device.type == "cuda":
        rate = nvjpeg_rate(args, root, device, data["batched"])
        print(f"pipeline=nvjpeg img/s={rate:.2f}", flush=True)
        rows.append(Row("data", f"{setting}, nvjpeg decode on the GPU, {args.workers} workers read bytes", "img/s",
                        f"{rate:.2f}"))
    return rows + blur_cost(args, device) + host_cost(args)


def measure(args: argparse.Namespace) -> list[Row]:
    if (min(args.batch_size, args.batches, args.cost_images, args.host_batches, args.host_rounds) < 1
            or args.warmup < 0 or args.workers < 0):
        raise SystemExit("error: --batch_size, --batches, --cost_images, --host_batches and --host_rounds must be "
                         ">= 1, --warmup and --workers >= 0")
    return on_image_folder(args.data_path, args.synthetic, args.synthetic_size, lambda root: run(args, root))


def main(argv: Sequence[str] | None = None) -> int:
    measure(get_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
