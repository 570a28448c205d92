"""`make bench`: every benchmark at the size that fits the machine, in one Markdown table with the machine's facts.

On a GPU: the benchmark recipe (vit_small and vit_small_sparo, 64 images per GPU, 2x224 + 10x96 crops, out_dim 65536;
a 1.28M x 4096 k-NN bank, and its search's peak memory at 1/4; ImageNet-sized synthetic JPEGs, a data-loader worker
per core up to 16), and the Fashion-MNIST GPU profile shortened to one epoch. Longer than a device loan: `make
gpu-check` runs step and data of these in its two calls, the rest needs a longer GPU session.
On a CPU: small sizes that finish in minutes and show the scripts and the fast/reference ratios work; they say
nothing about GPU speed. The k-NN search's peak memory is measured on that bank's shape at 1/64.

Writes benchmarks/results/<date>-<time>-<device>.md (or --output) and prints its path. A benchmark that fails
leaves a row saying so; the others still run.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from typing import Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import data  # noqa: E402
import file_index  # noqa: E402
import fmnist  # noqa: E402
import knn  # noqa: E402
import step  # noqa: E402
import train  # noqa: E402
from common import Row, machine, markdown, pick_device, write_synthetic_jpegs  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
# ImageNet-sized synthetic JPEGs: about 330-550 px per side.
JPEG_SIZE = 440


def plans(on_gpu: bool, images: str, workers: int) -> list[tuple[str, object, list[str]]]:
    """(name, benchmark module, argv) of every benchmark for this kind of machine."""
    if on_gpu:
        return [("step", step, []),
                ("data", data, ["--data_path", images, "--workers", str(workers), "--batches", "8"]),
                ("train", train, ["--data_path", images, "--workers", str(workers)]),
                ("knn", knn, []),
                ("knn", knn, ["--memory", "--scale", "4"]),  # unchunked fp32 at full scale needs ~93 GB
                ("file_index", file_index, []),
                ("fmnist", fmnist, [])]
    small_model = ["--patch_size", "8", "--global_size", "32", "--local_size", "16", "--local_crops_number", "2"]
    return [("step", step, ["--device", "cpu", "--archs", "vit_tiny", "vit_tiny_sparo", "--batch_size_per_gpu", "4",
                            *small_model, "--out_dim", "256", "--steps", "3", "--warmup", "1", "--compile", "false"]),
            ("data", data, ["--data_path", images, "--device", "cpu", "--workers", str(workers), "--batch_size", "16",
                            "--batches", "2", "--cost_images", "32"]),
            ("train", train, ["--data_path", images, "--device", "cpu", "--archs", "vit_tiny",
                              "--batch_size_per_gpu", "8", *small_model, "--out_dim", "256",
                              "--workers", str(workers), "--steps", "4", "--warmup", "1"]),
            ("knn", knn, ["--device", "cpu", "--num_train", "20000", "--dim", "1024", "--num_test", "500"]),
            ("knn", knn, ["--device", "cpu", "--memory", "--scale", "64"]),  # the ImageNet x SPARO bank at 1/64
            ("file_index", file_index, [])]  # 100,000 generated files: about 20 s to write on a 2-core machine


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cuda, cpu")
    parser.add_argument("--only", nargs="+", choices=["step", "data", "train", "knn", "file_index", "fmnist"],
                        help="run only these")
    parser.add_argument("--images", type=int, default=None,
                        help="synthetic JPEGs for data and train (default 1536 on a GPU, 96 on a CPU)")
    parser.add_argument("--output", default=None, help="Markdown file to write (default: benchmarks/results/...)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    device = pick_device(args.device)
    on_gpu = device.type == "cuda"
    workers = min(16, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="sparo_bench_images_") as images:
        write_synthetic_jpegs(images, args.images or (1536 if on_gpu else 96), JPEG_SIZE, processes=workers)
        for name, module, module_argv in plans(on_gpu, images, workers):
            if args.only and name not in args.only:
                continue
            print(f"== {name}: python benchmarks/{name}.py {' '.join(module_argv)}", flush=True)
            try:
                rows += module.measure(module.get_parser().parse_args(module_argv))
            except (Exception, SystemExit) as error:  # noqa: BLE001 - one failing benchmark must not lose the others
                traceback.print_exc()
                rows.append(Row(name, " ".join(module_argv), "failed", f"{type(error).__name__}: {error}"))
    notes = [] if on_gpu else ["No GPU: small CPU sizes that show the scripts work and give the fast/reference "
                               "ratios on this CPU; they say nothing about GPU speed (GPU figures: not measured)."]
    path = args.output or os.path.join(RESULTS, time.strftime("%Y%m%d-%H%M") + f"-{device.type}.md")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as handle:
        handle.write(markdown(rows, machine(device), notes))
    print(f"wrote {path}", flush=True)
    return 1 if any(row.metric == "failed" or row.value.endswith("FAIL") for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
