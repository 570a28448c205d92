"""Weighted k-NN speed of sparo_dino.eval.knn on an ImageNet-sized bank of random features, per search backend.

Times knn_scores (exact cosine top-k search + exp(sim / T) votes, what eval_knn.py runs) with the faiss backend (GPU
index when faiss has a GPU, IndexFlatIP on the CPU otherwise) and the chunked torch matmul backend (on --device).
The default bank is ImageNet train x SPARO encoding, 1.28M x 4096 fp32 = 21 GB: a GPU-machine run. On a CPU try
--num_train 100000 --dim 4096. The bank is checked against free memory first, so a bank that does not fit stops
with one line instead of an out-of-memory kill.

`--memory` measures instead the peak memory of the torch backend's search (the bank given in host memory, as
eval_knn.py gathers it) for an fp32 and an fp16 bank, chunked (the search's own chunk sizes) and unchunked (the bank
normalized in one piece, one block of all queries x the whole bank), and prints each one's ratio to fp32 unchunked.
`--scale S` divides the bank, the queries and the chunk sizes by S, so a CPU measures the ImageNet shape at 1/S.
Peak memory: on CUDA torch's max_memory_allocated; on the CPU the process's peak resident set (VmHWM, reset
through /proc/self/clear_refs before each search, after the heap's free blocks went back to the OS) minus its
resident set before it, so the bank and the queries given to the search are not counted, everything the search
allocates is. (Not tracemalloc: it sees Python's allocations only, not torch's tensors.)
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import os
import sys
import time
from typing import Callable, Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import Row, pick_device  # noqa: E402

from sparo_dino.eval import knn  # noqa: E402

GIB = 2 ** 30
MIB = 2 ** 20


def free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def memory_needs(bank: int, backends: Sequence[str], device: torch.device, faiss_gpu: bool) -> dict[str, int]:
    """Bytes each memory needs at the peak: the bank, search_topk's L2-normalized copy (on the bank's device) and
    the torch backend's similarity block; faiss also takes a host copy (free when the bank is on the CPU) and puts
    the bank into its index (GPU or host)."""
    needs = {"cpu": 0, "cuda": 0}
    needs[device.type] += 2 * bank + knn._TORCH_BLOCK_ELEMENTS * 4
    if "faiss" in backends:
        needs["cpu"] += (bank if device.type == "cuda" else 0) + (0 if faiss_gpu else bank)
        needs["cuda"] += bank if faiss_gpu else 0
    return {where: needed for where, needed in needs.items() if needed}


def require_memory(num_train: int, dim: int, backends: Sequence[str], device: torch.device, faiss_gpu: bool) -> None:
    """Stop with one line when the bank and the copies the backends make do not fit in free memory."""
    bank = num_train * dim * 4
    for where, needed in memory_needs(bank, backends, device, faiss_gpu).items():
        target = device if where == device.type else torch.device(where)
        available = free_bytes(target)
        if needed > available:
            raise SystemExit(f"error: a {num_train} x {dim} fp32 bank is {bank / GIB:.1f} GiB and the search "
                             f"({', '.join(backends)}) needs about {needed / GIB:.1f} GiB of {where} memory, but "
                             f"{available / GIB:.1f} GiB are free; lower --num_train or --dim, or use a larger machine")


def time_backend(backend: str, train: torch.Tensor, labels: torch.Tensor, test: torch.Tensor, num_classes: int,
                 k: int, repeats: int) -> float:
    """Best wall time (s) of `repeats` runs of knn_scores (the first run also warms up faiss GPU / CUDA)."""
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        scores = knn.knn_scores(train, labels, test, num_classes, [k], backend=backend)[k]
        if train.is_cuda:
            torch.cuda.synchronize(train.device)
        times.append(time.perf_counter() - start)
    if scores.shape != (test.shape[0], num_classes):
        raise RuntimeError(f"{backend} returned scores of shape {tuple(scores.shape)}")
    return min(times[1:])


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--num_train", type=int, default=1_281_167, help="bank size (ImageNet train)")
    parser.add_argument("--dim", type=int, default=4096, help="feature width (SPARO 64 x 64)")
    parser.add_argument("--num_test", type=int, default=10_000, help="queries")
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--num_classes", type=int, default=1000)
    parser.add_argument("--backends", nargs="+", default=["faiss", "torch"], choices=["faiss", "torch"])
    parser.add_argument("--device", default="auto", help="where the bank lives for the torch backend")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per backend after one warm-up run")
    parser.add_argument("--memory", action="store_true",
                        help="measure the torch search's peak memory (fp32/fp16 bank, chunked/unchunked) instead")
    parser.add_argument("--scale", type=int, default=1,
                        help="divide the bank, the queries and the search's chunk sizes by this (1/64 fits a CPU)")
    return parser


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def _trim_heap() -> None:
    """Give the heap's free blocks back to the OS (glibc), so the resident set counts live memory only and a search
    that reuses freed blocks still raises the peak it measures."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the measure may then undercount reused blocks
        pass


def peak_bytes(run: Callable[[], object], device: torch.device) -> int:
    """Memory `run` needs at its peak beyond what was allocated before it (see the module docstring)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        run()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    gc.collect()
    _trim_heap()
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # resets VmHWM to the current resident set
    except OSError as error:
        raise SystemExit(f"error: --memory on the CPU needs Linux's /proc/self/clear_refs to reset the peak resident "
                         f"set ({error})") from error
    before = _status_kib("VmRSS")
    run()
    return (_status_kib("VmHWM") - before) * 1024


MEMORY_REPEATS = 2  # searches per case; the peak reported is the least of them
# (name, bank dtype, chunked)
MEMORY_CASES = (("fp32 unchunked", "fp32", False), ("fp32 chunked", "fp32", True),
                ("fp16 unchunked", "fp16", False), ("fp16 chunked", "fp16", True))


def measure_memory(args: argparse.Namespace) -> list[Row]:
    """Peak memory of knn_scores (torch backend) per MEMORY_CASES, with ratios to fp32 unchunked."""
    device = pick_device(args.device)
    num_train, num_test = max(1, args.num_train // args.scale), max(1, args.num_test // args.scale)
    chunked = (max(1, knn._BANK_CHUNK_ROWS // args.scale), max(1, knn._TORCH_BLOCK_ELEMENTS // args.scale))
    unchunked = (num_train, num_train * num_test)
    require_memory(num_train, args.dim, ["torch"], torch.device("cpu"), False)
    g = torch.Generator().manual_seed(0)
    train = torch.randn(num_train, args.dim, generator=g)
    test = torch.randn(num_test, args.dim, generator=g)
    labels = torch.randint(0, args.num_classes, (num_train,), generator=g)
    setting = (f"bank {num_train} x {args.dim} (1/{args.scale} of {args.num_train}), {num_test} queries, "
               f"k={args.k}, on {device}")
    print(f"peak memory of the torch search | {setting} | bank chunk {chunked[0]} rows, block {chunked[1]} elements",
          flush=True)
    saved = knn._BANK_CHUNK_ROWS, knn._TORCH_BLOCK_ELEMENTS
    peaks, rows = {}, []
    try:
        for name, bank_dtype, is_chunked in MEMORY_CASES:
            knn._BANK_CHUNK_ROWS, knn._TORCH_BLOCK_ELEMENTS = chunked if is_chunked else unchunked
            started = time.perf_counter()
            # the least of MEMORY_REPEATS: the search's own peak is the same each time, while another thread of the
            # process (a data-loader or gloo thread of a test before) can only add to the resident set measured
            peaks[name] = min(peak_bytes(lambda: knn.knn_scores(train, labels, test, args.num_classes, [args.k],
                                                                backend="torch", device=device,
                                                                bank_dtype=bank_dtype), device)
                              for _ in range(MEMORY_REPEATS))
            seconds = (time.perf_counter() - started) / MEMORY_REPEATS
            ratio = peaks[name] / peaks[MEMORY_CASES[0][0]]
            print(f"bank={name} peak_MiB={peaks[name] / MIB:.1f} ratio_to_fp32_unchunked={ratio:.3f} "
                  f"s={seconds:.3f}", flush=True)
            rows.append(Row("knn", f"{setting}, torch {name}", "peak MiB (ratio to fp32 unchunked)",
                            f"{peaks[name] / MIB:.1f} ({ratio:.3f})"))
    finally:
        knn._BANK_CHUNK_ROWS, knn._TORCH_BLOCK_ELEMENTS = saved
    return rows


def measure(args: argparse.Namespace) -> list[Row]:
    """Time each backend (or with --memory, measure peak memory), print a line per case, return them as rows."""
    if min(args.num_train, args.dim, args.num_test, args.k, args.num_classes, args.repeats, args.scale) < 1:
        raise SystemExit("error: --num_train, --dim, --num_test, --k, --num_classes, --repeats and --scale must be "
                         ">= 1")
    if args.memory:
        return measure_memory(args)
    device = pick_device(args.device)
    backends = [b for b in args.backends if b != "faiss" or knn.faiss is not None]
    if len(backends) < len(args.backends):
        print("faiss is not installed: skipping the faiss backend", flush=True)
    if not backends:
        raise SystemExit("error: no backend to time (faiss is not installed; add --backends torch)")
    faiss_gpus = getattr(knn.faiss, "get_num_gpus", lambda: 0)() if knn.faiss is not None else 0
    require_memory(args.num_train, args.dim, backends, device, faiss_gpus > 0)
    print(f"device: {device} | bank {args.num_train} x {args.dim} fp32 ({args.num_train * args.dim * 4 / GIB:.2f} "
          f"GiB) | {args.num_test} queries | k={args.k} | threads {torch.get_num_threads()} | "
          f"faiss {'GPU' if faiss_gpus else 'CPU'}", flush=True)
    g = torch.Generator().manual_seed(0)
    train = torch.randn(args.num_train, args.dim, generator=g).to(device)
    test = torch.randn(args.num_test, args.dim, generator=g).to(device)
    labels = torch.randint(0, args.num_classes, (args.num_train,), generator=g)
    seconds = {}
    setting = f"bank {args.num_train} x {args.dim}, {args.num_test} queries, k={args.k}"
    rows = []
    for backend in backends:
        seconds[backend] = time_backend(backend, train, labels, test, args.num_classes, args.k, args.repeats)
        where = ("GPU" if faiss_gpus else "CPU") if backend == "faiss" else str(device)
        print(f"backend={backend} ({where}) s={seconds[backend]:.6f} queries/s={args.num_test / seconds[backend]:.1f}",
              flush=True)
        rows.append(Row("knn", f"{setting}, {backend} ({where})", "queries/s",
                        f"{args.num_test / seconds[backend]:.1f}"))
    if len(seconds) == 2:
        print(f"ratio faiss/torch: queries/s x{seconds['torch'] / seconds['faiss']:.2f}", flush=True)
        rows.append(Row("knn", setting, "faiss/torch queries/s", f"x{seconds['torch'] / seconds['faiss']:.2f}"))
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    measure(get_parser().parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
