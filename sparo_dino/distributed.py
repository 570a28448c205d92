"""Process-group setup and the few collectives the trainer and evaluators need.

One code path serves a single process (no process group at all), torchrun (env:// rendezvous from RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), SLURM through submitit (the launcher exports the same
variables with submitit's TorchDistributedEnvironment, so no shared folder is needed for the rendezvous) and a
plain `srun python main_dino.py` (srun_environment derives the same variables from SLURM's, as official DINO does).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import itertools
import os
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def _pick_device(local_rank: int) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


DEFAULT_TIMEOUT_MINUTES = 30.0  # torch's default for collectives and the rendezvous
DEFAULT_MASTER_PORT = 29500  # official DINO's and torchrun's, for an srun launch without MASTER_PORT
# where an srun task finds the job's hosts: its own step's first, then the allocation's
NODE_LIST_VARIABLES = ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
_HOST_GROUP = r"(?:[^,\[\]]|\[[^\[\]]*\])+"  # one comma-separated entry of a node list: text and [ranges]
_store: dist.Store | None = None  # this attempt's rendezvous store, kept to ask which ranks are alive after a failure


class LaunchError(ValueError):
    """A launch whose process group cannot be derived from the environment; the message says what to set."""


def parse_node_list(node_list: str) -> list[str]:
    """SLURM's compressed host list, e.g. `node[01-03,07],gpu-b5` or `rack[1-2]-n[001-002]x`, as host names in
    order (zero padding kept). Raises LaunchError on a list that is not in this form."""
    if re.fullmatch(rf"{_HOST_GROUP}(?:,{_HOST_GROUP})*", node_list) is None:
        raise LaunchError(f"cannot read the SLURM node list {node_list!r}; set MASTER_ADDR to the first node's host")
    hosts: list[str] = []
    for group in re.findall(_HOST_GROUP, node_list):
        parts = re.split(r"\[([^\[\]]*)\]", group)  # literal, bracket, literal, bracket, ..., literal
        choices = [[text] if index % 2 == 0 else _expand_ranges(text, node_list) for index, text in enumerate(parts)]
        hosts.extend("".join(host) for host in itertools.product(*choices))
    return hosts


def _expand_ranges(ranges: str, node_list: str) -> list[str]:
    """`01-03,07` -> 01 02 03 07: the numbers of one bracket, each as wide as its range's first bound."""
    numbers: list[str] = []
    for item in ranges.split(","):
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if match is None or (match[2] is not None and int(match[2]) < int(match[1])):
            raise LaunchError(f"cannot read {item!r} in the SLURM node list {node_list!r}; set MASTER_ADDR to the "
                              "first node's host")
        first, last = match[1], match[2] or match[1]
        numbers.extend(str(number).zfill(len(first)) for number in range(int(first), int(last) + 1))
    return numbers


def srun_environment(env: Mapping[str, str]) -> dict[str, str]:
    """torchrun's variables for a task that `srun` started without a launcher; empty where there is nothing to
    derive: a launcher's RANK is set (torchrun, submitit: theirs win), no SLURM task, or a single task.

    Rank, world size and local rank come from SLURM_PROCID, SLURM_NTASKS and SLURM_LOCALID; the master address
    from MASTER_ADDR or else the first host of the step's node list, the port from MASTER_PORT or
    DEFAULT_MASTER_PORT. Without them the N tasks would be N independent runs writing into one output dir."""
    if "RANK" in env or "SLURM_PROCID" not in env or int(env.get("SLURM_NTASKS", "1")) <= 1:
        return {}
    world_size = int(env["SLURM_NTASKS"])
    master_addr = env.get("MASTER_ADDR")
    if not master_addr:
        node_list = next((env[name] for name in NODE_LIST_VARIABLES if env.get(name)), None)
        if node_list is None:
            raise LaunchError(f"srun started {world_size} tasks but neither MASTER_ADDR nor SLURM_JOB_NODELIST is "
                              "set; export MASTER_ADDR=<host of task 0> (and MASTER_PORT) before srun")
        master_addr = parse_node_list(node_list)[0]
    nodes = int(env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES") or 1)
    return {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": str(world_size), "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
            "LOCAL_WORLD_SIZE": str(-(-world_size // nodes)), "MASTER_ADDR": master_addr,
            "MASTER_PORT": env.get("MASTER_PORT") or str(DEFAULT_MASTER_PORT)}


def init_distributed(backend: str | None = None, timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES) -> DistInfo:
    """Join the process group described by the environment, or run alone when there is none.

    `timeout_minutes` bounds every collective: a rank that hangs makes the others fail after it instead of holding
    the allocation (see `describe_collective_failure`)."""
    if dist.is_available() and dist.is_initialized():
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, _pick_device(local_rank))
    os.environ.update(srun_environment(os.environ))  # as submitit's export: env:// reads them
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size <= 1 or "RANK" not in os.environ:
        return DistInfo(0, 1, 0, _pick_device(0))
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = _pick_device(local_rank)
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    kwargs: dict[str, Any] = {}
    if backend == "nccl":
        kwargs["device_id"] = device  # binds the communicator to this GPU and avoids a barrier hang at start
    timeout = datetime.timedelta(minutes=timeout_minutes)
    dist.init_process_group(backend=backend, store=_attempt_store(rank, world_size, timeout), rank=rank,
                            world_size=world_size, timeout=timeout, **kwargs)
    return DistInfo(rank, world_size, local_rank, device)


def _attempt_store(rank: int, world_size: int, timeout: datetime.timedelta) -> dist.Store:
    """The env:// rendezvous store, with its keys under the torchrun restart attempt.

    torchrun's agent keeps one store for all attempts of a job (workers connect to it as clients), so after a
    restart (--max-restarts) the new workers would find the dead workers' gloo/NCCL addresses in it and wait for
    them forever inside init_process_group. A prefix per TORCHELASTIC_RESTART_COUNT gives every attempt its own keys.
    """
    global _store
    store, _, _ = next(dist.rendezvous("env://", rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    _store = dist.PrefixStore(f"attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    return dist.PrefixStore("default_pg", _store)


# gloo's transport errors; narrow on purpose: a DataLoader's "timed out after N seconds" is not a collective's
_COLLECTIVE_FAILURES = ("Timed out waiting", "Connection closed by peer", "Connection reset by peer")


def is_collective_failure(error: BaseException) -> bool:
    """A collective that timed out or lost a peer. gloo raises plain RuntimeErrors for both, NCCL DistBackendError."""
    if not is_dist():
        return False
    return isinstance(error, dist.DistError) or any(text in str(error) for text in _COLLECTIVE_FAILURES)


def unresponsive_ranks(wait_s: float = 10.0) -> list[int] | None:
    """The ranks that do not report within `wait_s` after a failed collective (None: the store is gone too).

    Every live rank whose collective failed calls this and marks itself in the store, so the ranks left unmarked
    are the ones that hang or died. gloo's own message does not say which peer it waited for."""
    if _store is None:
        return None
    try:
        _store.set(f"failed_collective/{get_rank()}", "1")
        deadline = time.monotonic() + wait_s
        while True:
            missing = [r for r in range(get_world_size()) if not _store.check([f"failed_collective/{r}"])]
            if not missing or time.monotonic() > deadline:
                return missing
            time.sleep(0.2)
    except RuntimeError:  # the store lived in a process that is gone
        return None


def describe_collective_failure(error: BaseException, where: str, timeout_minutes: float) -> str:
    """One line for a failed collective: this rank, where it was, who did not arrive, and torch's own reason."""
    missing = unresponsive_ranks()
    if missing is None:
        who = "the rendezvous store is unreachable, so the missing ranks are unknown"
    elif missing:
        who = f"rank(s) {', '.join(map(str, missing))} did not arrive (hung or dead)"
    else:
        who = "every rank reported the failure, so a peer connection broke"
    reason = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
    return (f"rank {get_rank()}: a collective failed {where} (--dist_timeout_minutes {timeout_minutes:g}); "
            f"{who}; torch: {reason}")


def local_world_size() -> int:
    """The ranks on this node, as torchrun, submitit's export and srun_environment set LOCAL_WORLD_SIZE; 1 alone."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", 1))


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_dist():
        dist.barrier()


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks in place; the identity when running alone."""
    if is_dist():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate equally shaped tensors of all ranks along dim 0, in rank order."""
    if not is_dist():
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts, dim=0)


def all_gather_object(obj: Any) -> list[Any]:
    if not is_dist():
        return [obj]
    parts: list[Any] = [None] * get_world_size()
    dist.all_gather_object(parts, obj)
    return parts


def broadcast_object(obj: Any) -> Any:
    """The main process's `obj` on every rank (any picklable object; the others pass None). Unlike
    all_gather_object, only one copy travels: fit for a large object that one rank computed."""
    if not is_dist():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def cleanup() -> None:
    """Destroy the process group so the job exits instead of hanging in NCCL teardown."""
    if is_dist():
        dist.destroy_process_group()


def abort() -> None:
    """Tear the process group down without waiting for the peers.

    After an error on one rank the others may be blocked in a collective; a coordinated destroy (NCCL) would wait
    for them until the collective timeout. torch < 2.5 has no abort: the group is then left to the process exit."""
    abort_group = getattr(dist.distributed_c10d, "_abort_process_group", None)
    if is_dist() and abort_group is not None:
        abort_group()


@contextlib.contextmanager
def process_group(timeout_minutes: float = DEFAULT_TIMEOUT_MINUTES,
                  report_error: Callable[[BaseException], None] | None = None) -> Iterator[DistInfo]:
    """Join the process group of the environment for the body; a group created here is also torn down here.

    On success the group is destroyed in step with the peers. On an error, `report_error` prints it first (a
    teardown must never stand between a failing rank and its message), then a group created here is aborted."""
    owns_group = not is_dist()
    info = init_distributed(timeout_minutes=timeout_minutes)
    try:
        yield info
    except BaseException as error:
        if is_dist():  # alone, nothing stands between the error and the caller's own report
            if report_error is not None:
                report_error(error)
            if owns_group:
                abort()
        raise
    if owns_group:
        cleanup()


def add_launcher_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The official launch flags, so `python -m torch.distributed.launch ... eval_*.py` runs unchanged."""
    group = parser.add_argument_group("launcher (official flags)")
    group.add_argument("--dist_url", type=str, default="env://",
                       help="only env:// (torchrun, torch.distributed.launch and submitit set the environment)")
    group.add_argument("--local_rank", "--local-rank", type=int, default=0,
                       help="set by torch.distributed.launch; ignored (LOCAL_RANK from the environment is used)")
    group.add_argument("--dist_timeout_minutes", type=float, default=DEFAULT_TIMEOUT_MINUTES,
                       help="how long a collective waits for the other ranks before the run fails naming the "
                            "ranks that did not arrive (a hung or dead rank)")
    return parser


def check_launcher_args(args: argparse.Namespace) -> None:
    """Refuse a rendezvous other than env://, which is the only one the process group is set up from."""
    if not args.dist_timeout_minutes > 0:
        raise ValueError(f"--dist_timeout_minutes must be > 0, got {args.dist_timeout_minutes}")
    if args.dist_url != "env://":
        raise ValueError(f"--dist_url {args.dist_url} is not supported; launch with torchrun or "
                         "torch.distributed.launch (env://)")
