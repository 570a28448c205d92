"""Start-up cost of finding the training images: listing a folder tree, reading the cached index, a list file.

    python benchmarks/file_index.py                      # 100,000 generated 8x8 PNGs in 100 class folders
    python benchmarks/file_index.py --data_path /imagenet/train

Times (median of --repeats, in seconds) what a training start spends before its first batch on finding its images
(sparo_dino.data.image_files): the first start lists the tree and writes OUTPUT_DIR/data_index.json, a later start
checks the folders' times and reads that file, and a list file given as --data_path is read and every entry
checked to exist (then cached the same way); for an ImageFolder tree also torchvision's scan, which every start
paid before the cache. Generated files sit in the page cache: on a network file system the
first listing is much slower, the cached start barely so (it stats the folders, not the files).
"""
from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from typing import Callable, Sequence

import numpy as np
from PIL import Image
from torchvision.datasets import ImageFolder

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import Row  # noqa: E402

from sparo_dino.data.image_files import INDEX_NAME, load_index, write_cache  # noqa: E402


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data_path", default=None,
                        help="measure this folder of images instead of generated files (read only)")
    parser.add_argument("--files", type=int, default=100_000, help="generated 8x8 PNGs")
    parser.add_argument("--folders", type=int, default=100,
                        help="class folders they are spread over; 0: all directly in one folder of unlabeled images")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each measurement; the median is reported")
    return parser


def write_tiny_pngs(root: str, files: int, folders: int) -> str:
    """`files` copies of one 8x8 PNG in `folders` class folders of `root` (an ImageFolder tree), or with 0 folders
    all in `root` (a flat folder of unlabeled images)."""
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(buffer, format="PNG")
    data = buffer.getvalue()
    names = [f"class_{folder:04d}" for folder in range(folders)] or [""]
    for name in names:
        os.makedirs(os.path.join(root, name), exist_ok=True)
    for index in range(files):
        with open(os.path.join(root, names[index % len(names)], f"{index:07d}.png"), "wb") as handle:
            handle.write(data)
    return root


def median_seconds(run: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(args: argparse.Namespace) -> list[Row]:
    with tempfile.TemporaryDirectory(prefix="sparo_bench_index_") as scratch:
        root = args.data_path or write_tiny_pngs(os.path.join(scratch, "images"), args.files, args.folders)
        cache = os.path.join(scratch, "run", INDEX_NAME)

        def first_start() -> None:
            if os.path.exists(cache):
                os.remove(cache)
            index = load_index(root, cache)
            assert not index.cached
            write_cache(index, cache)

        def cached_start() -> None:
            assert load_index(root, cache).cached

        first = median_seconds(first_start, args.repeats)
        cached = median_seconds(cached_start, args.repeats)
        index = load_index(root, cache)
        # what every start paid before the cache, for an ImageFolder tree: torchvision's scan
        before = median_seconds(lambda: ImageFolder(root), args.repeats) if index.kind == "imagefolder" else None
        listing = os.path.join(scratch, "train_list.txt")  # relative to its folder: the paths below `root`
        with open(listing, "w") as handle:
            handle.writelines(os.path.join(os.path.relpath(index.base, scratch), name) + "\n" for name in index.files)
        list_cache = os.path.join(scratch, "list_run", INDEX_NAME)
        list_first = median_seconds(lambda: load_index(listing), args.repeats)
        write_cache(load_index(listing), list_cache)
        list_cached = median_seconds(lambda: load_index(listing, list_cache), args.repeats)

    where = args.data_path or (f"generated, {args.folders} folders" if args.folders else "generated, one folder")
    setting = f"{len(index.files)} images, {index.kind} ({where})"
    print(f"file index: {setting}; median of {args.repeats} runs", flush=True)
    rows = [Row("file_index", setting, "first start: list + write cache (s)", f"{first:.4f}"),
            Row("file_index", setting, "cached start (s)", f"{cached:.4f}"),
            Row("file_index", setting, "list file, first start (s)", f"{list_first:.4f}"),
            Row("file_index", setting, "list file, cached start (s)", f"{list_cached:.4f}"),
            Row("file_index", setting, "ratio cached / first start", f"{cached / first:.4f}")]
    if before is not None:
        rows.append(Row("file_index", setting, "torchvision ImageFolder scan, every start before (s)", f"{before:.4f}"))
    for row in rows:
        print(f"{row.metric}: {row.value}", flush=True)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    measure(get_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
