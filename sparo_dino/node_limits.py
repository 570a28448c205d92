"""What one rank may take of the node it shares with the job's other ranks: Inductor's compile workers and the
/dev/shm that its data-loader workers pass batches through.

Both are node resources that every rank sizes as if it were alone: Inductor starts min(32, CPUs) compile workers
per process (8 ranks would start ~256), and each loader worker keeps `prefetch_factor` batches in shared memory (a
container's default 64 MB /dev/shm ends in a bus error). docs/gpus.md has the numbers.
"""
from __future__ import annotations

import os
import sys

from sparo_dino import distributed

COMPILE_THREADS_VARIABLE = "TORCHINDUCTOR_COMPILE_THREADS"
MAX_COMPILE_THREADS = 32  # Inductor's own cap (torch._inductor.config.decide_compile_threads)
SHM_PATH = "/dev/shm"


def compile_threads_per_rank(local_world_size: int, usable_cpus: int, node_cpus: int) -> int:
    """This rank's share of the node's CPUs for compile workers: at most the CPUs it may run on (SLURM may bind
    each task to its own) and at most the node's CPUs divided among its ranks (unbound ranks share them all)."""
    return max(1, min(MAX_COMPILE_THREADS, usable_cpus, node_cpus // max(1, local_world_size)))


def bound_compile_threads() -> int:
    """Set Inductor's compile workers to this rank's share (compile_threads_per_rank) before anything compiles,
    unless the user set TORCHINDUCTOR_COMPILE_THREADS; returns the number in force."""
    if COMPILE_THREADS_VARIABLE in os.environ:
        return int(os.environ[COMPILE_THREADS_VARIABLE])
    node_cpus = os.cpu_count() or 1
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else node_cpus
    threads = compile_threads_per_rank(distributed.local_world_size(), usable, node_cpus)
    os.environ[COMPILE_THREADS_VARIABLE] = str(threads)
    config = sys.modules.get("torch._inductor.config")  # read the variable when imported: set the value itself
    if config is not None:
        config.compile_threads = threads
    return threads


def shm_free_bytes(path: str = SHM_PATH) -> int | None:
    """Free bytes of the shared-memory file system that loader workers pass batches through; None without one."""
    try:
        stats = os.statvfs(path)
    except (OSError, AttributeError):  # no /dev/shm (macOS), no statvfs (Windows)
        return None
    return stats.f_bavail * stats.f_frsize


def _size(num_bytes: float) -> str:
    """1234567 -> '1.2 MB'."""
    for unit in ("B", "KB", "MB"):
        if num_bytes < 1024:
            return f"{num_bytes:.1f} {unit}"
        num_bytes /= 1024
    return f"{num_bytes:.1f} GB"


def check_shm(batch_bytes: int, num_workers: int, prefetch_factor: int, local_world_size: int,
              free_bytes: int | None) -> str | None:
    """None when the loader workers' prefetched batches of every rank on this node fit in `free_bytes` of
    /dev/shm (or it is unknown, or there are no workers); else one line naming the size needed and the
    --num_workers that fits. Raises ValueError with that line when not even one worker's batches fit."""
    per_worker = batch_bytes * prefetch_factor * max(1, local_world_size)
    if num_workers == 0 or free_bytes is None or per_worker * num_workers <= free_bytes:
        return None
    fits = free_bytes // per_worker
    ranks = f" x {local_world_size} ranks on this node" if local_world_size > 1 else ""
    need = (f"{SHM_PATH} has {_size(free_bytes)} free but {num_workers} loader workers x {prefetch_factor} "
            f"prefetched batches of {_size(batch_bytes)}{ranks} need {_size(per_worker * num_workers)}")
    if fits == 0:
        gigabytes = -(-per_worker * num_workers // 2**30)
        raise ValueError(f"{need}, so the workers would die with a bus error; use --num_workers 0 or give the "
                         f"container a larger {SHM_PATH} (docker run --shm-size={gigabytes}g)")
    return (f"warning: {need}; the workers may die with a bus error: use --num_workers {fits} (fits) or a larger "
            f"{SHM_PATH}")
