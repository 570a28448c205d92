"""What one batch of the batched multi-crop costs the host: the aten ops it issues and its CPU milliseconds.

A GPU does the pixel work of `--augmentation batched`; the host draws the parameters and issues every op, and a host
that issues too many ops per batch starves the GPU. Both numbers are taken with the pixel work shrunk to nearly
nothing (4 and 2 px crops of 6-8 px images, the given batch and views): the op count does not depend on pixel sizes
(tests/test_batched_augmentation.py), and the CPU time is then about what is left on the host, the parameter draws
at full size and one dispatch per op (a GPU adds its launch latency to each op; the CPU's grouped convolution keeps
a share of pixel-independent work). One thread, as the trainer's main process issues them; CPU time, so that other
jobs on the machine count less than in wall time.

benchmarks/data.py runs this script in its own process on this checkout and on an earlier revision's package (git
archive), so it imports the multi-crop by the module name it is given and nothing else from the package. Prints one
JSON line: ops of a padded batch (the trainer's path), ops of a list of images, and the CPU ms of each timed batch.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from typing import Any, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched while it is active (each op an eager GPU run would launch)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        self.count += 1
        return func(*args, **(kwargs or {}))


def measure(module_name: str, batch_size: int, local_crops_number: int, warmup: int, batches: int) -> dict:
    module = importlib.import_module(module_name)
    augment = module.BatchedMultiCrop(local_crops_number=local_crops_number, global_crop_size=4, local_crop_size=2)
    generator = torch.Generator().manual_seed(0)
    sides = torch.randint(6, 9, (batch_size, 2), generator=generator).tolist()
    images = [torch.randint(0, 256, (3, h, w), generator=generator, dtype=torch.uint8) for h, w in sides]
    padded, sizes = module.pad_images(images)
    ops = {}
    for name, call in (("padded", lambda: augment(padded, sizes, generator=generator)),
                       ("list", lambda: augment(images, generator=generator))):
        with OpCounter() as counter:
            call()
        ops[name] = counter.count
    times = []
    for index in range(warmup + batches):
        start = time.process_time()
        augment(padded, sizes, generator=generator)
        times.append(1000 * (time.process_time() - start))
    return {"ops_padded": ops["padded"], "ops_list": ops["list"], "ms": times[warmup:]}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--module", required=True, help="the module holding BatchedMultiCrop and pad_images")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--local_crops_number", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batches", type=int, default=20)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(json.dumps(measure(args.module, args.batch_size, args.local_crops_number, args.warmup, args.batches)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
