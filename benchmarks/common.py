"""What the benchmark scripts share: the device to run on, synthetic JPEGs, the machine they ran on, and result
rows that `benchmarks/report.py` (`make bench`) collects into one Markdown table."""
from __future__ import annotations

import multiprocessing
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, TypeVar

import numpy as np
import torch
from PIL import Image

T = TypeVar("T")


@dataclass(frozen=True)
class Row:
    """One measured number: which benchmark, under which setting, what was measured, its value as printed."""
    benchmark: str
    setting: str
    metric: str
    value: str


def pick_device(name: str) -> torch.device:
    """--device auto|cpu|cuda|cuda:N: auto is the GPU when there is one."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"error: --device {name} but CUDA is not available")
    return device


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _write_synthetic_jpeg(folder: str, index: int, size: int, seed: int) -> None:
    rng = np.random.default_rng((seed, index))  # one stream per image: the same files whatever the process count
    width, height = (int(size * rng.uniform(0.75, 1.25)) for _ in range(2))
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    pixels = np.asarray(coarse.resize((width, height), Image.BICUBIC), dtype=np.float32)
    pixels = np.clip(pixels + rng.normal(0, 8, pixels.shape), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(os.path.join(folder, f"{index:06d}.jpg"), quality=90)


def write_synthetic_jpegs(root: str, count: int, size: int, seed: int = 0, processes: int = 1) -> str:
    """`count` JPEGs (quality 90) of (0.75-1.25 x size) px per side in root/synthetic/: smooth random colour fields
    plus noise, so they compress and decode roughly like photos rather than like white noise. `processes` > 1
    writes them in parallel (1024 ImageNet-sized ones take ~30 ms each on one core)."""
    folder = os.path.join(root, "synthetic")
    os.makedirs(folder, exist_ok=True)
    jobs = [(folder, index, size, seed) for index in range(count)]
    if processes > 1:
        with multiprocessing.get_context("fork").Pool(processes) as pool:
            pool.starmap(_write_synthetic_jpeg, jobs, chunksize=8)
    else:
        for job in jobs:
            _write_synthetic_jpeg(*job)
    return root


def on_image_folder(data_path: str | None, synthetic: int, synthetic_size: int, run: Callable[[str], T]) -> T:
    """`run(root)` on the user's JPEG folder, or on `synthetic` generated JPEGs in a temporary folder."""
    if data_path is not None:
        if not os.path.isdir(data_path):
            raise SystemExit(f"error: --data_path {data_path} is not a directory")
        return run(data_path)
    with tempfile.TemporaryDirectory(prefix="sparo_bench_images_") as root:
        write_synthetic_jpegs(root, synthetic, synthetic_size)
        return run(root)


def fashion_mnist_dir(repo: str) -> str | None:
    """The Fashion-MNIST IDX files: $FASHION_MNIST_DIR, Debian's package, or the copy `make gpu-check-files` puts
    into the ignored .gpu_data/ for a device machine that has neither (docs/gpus.md)."""
    places = (os.environ.get("FASHION_MNIST_DIR", ""), "/usr/share/datasets/fashion-mnist",
              os.path.join(repo, ".gpu_data", "fashion-mnist"))
    return next((path for path in places if path and os.path.isdir(path) and os.listdir(path)), None)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device) -> dict[str, str]:
    """The facts a reader needs to compare two result tables."""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    return {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "host": platform.node(), "cpu": cpu_model(),
            "cpu cores": str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()),
            "gpu": gpu, "torch": torch.__version__, "device": str(device)}


def markdown(rows: list[Row], facts: dict[str, str], notes: list[str] | None = None) -> str:
    """The machine's facts, then one table of all rows."""
    lines = ["# Benchmark results", ""] + [f"- {key}: {value}" for key, value in facts.items()] + [""]
    lines += [f"{note}" for note in notes or []] + ([""] if notes else [])
    lines += ["| benchmark | setting | metric | value |", "| --- | --- | --- | --- |"]
    lines += [f"| {row.benchmark} | {row.setting} | {row.metric} | {row.value} |" for row in rows]
    return "\n".join(lines) + "\n"
