"""Submit DINO+SPARO training to a SLURM cluster with submitit: one task per GPU, requeue on timeout/preemption.

    python launch/submit.py --nodes 2 --ngpus 8 --partition gpu --timeout 2880 -- \
        --config configs/dino_vit_small_sparo_in1k.yaml --data_path /imagenet/train --output_dir /runs/sparo

Flags before `--` are the launcher's; everything after goes to main_dino.py unchanged. The rendezvous uses
submitit's TorchDistributedEnvironment (first node of the allocation, port from the job id), so no shared folder is
needed. On timeout or preemption submitit calls `TrainingJob.checkpoint()` on rank 0: it asks the trainer to stop at
the next step boundary, waits for the checkpoint to be written, and hands submitit a resubmission of the same
command, which resumes from `output_dir/checkpoint.pth`.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import threading
from pathlib import Path
from typing import Any, Sequence

import submitit

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # lets `python launch/submit.py` work from a plain checkout
    sys.path.insert(0, str(REPO_ROOT))

import main_dino  # noqa: E402
from sparo_dino.preemption import StopRequest  # noqa: E402
from sparo_dino.train_args import parse_train_args  # noqa: E402

SAVE_WAIT_SECONDS = 600.0  # longest we wait in checkpoint() for the trainer to reach a step boundary and save


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--ngpus", type=int, default=8, help="GPUs per node; one task per GPU")
    parser.add_argument("--cpus_per_task", type=int, default=10, help="data-loader workers + main thread")
    parser.add_argument("--timeout", type=int, default=2880, help="minutes per job; the run requeues itself")
    parser.add_argument("--partition", type=str, default=None)
    parser.add_argument("--account", type=str, default=None)
    parser.add_argument("--qos", type=str, default=None)
    parser.add_argument("--constraint", type=str, default=None, help="e.g. a GPU type feature")
    parser.add_argument("--mem_gb", type=int, default=None, help="memory per node")
    parser.add_argument("--mail_user", type=str, default=None)
    parser.add_argument("--mail_type", type=str, default=None, help="e.g. END,FAIL")
    parser.add_argument("--job_name", type=str, default="sparo_dino")
    parser.add_argument("--signal_delay_s", type=int, default=180,
                        help="seconds before the time limit at which SLURM signals the job to checkpoint")
    parser.add_argument("--max_requeues", type=int, default=20, help="how many timeouts the run may survive")
    parser.add_argument("--cluster", choices=("slurm", "local"), default="slurm",
                        help="'local' runs the same job on this machine (submitit's LocalExecutor), for testing")
    parser.add_argument("--dry_run", action="store_true", help="print what would be submitted, submit nothing")
    return parser


def split_argv(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Launcher flags come before `--`, training flags after it."""
    argv = list(argv)
    if "--" not in argv:
        raise SystemExit("error: put the training flags after `--`, e.g. launch/submit.py --nodes 2 -- "
                         "--config configs/dino_vit_small_sparo_in1k.yaml --output_dir /runs/x")
    cut = argv.index("--")
    return argv[:cut], argv[cut + 1:]


def with_absolute_output_dir(train_argv: list[str]) -> tuple[list[str], Path]:
    """Resolve the run's output dir (from flags or --config) so requeued jobs find their checkpoint."""
    train_args = parse_train_args(train_argv)
    output_dir = Path(train_args.output_dir).resolve()
    kept, skip = [], False
    for arg in train_argv:  # drop the user's (maybe relative) --output_dir; the absolute one is appended
        if skip:
            skip = False
        elif arg == "--output_dir":
            skip = True
        elif not arg.startswith("--output_dir="):
            kept.append(arg)
    return kept + ["--output_dir", str(output_dir)], output_dir


class TrainingJob:
    """What each task runs: training in a worker thread, so submitit's signal handler can wait for a clean save."""

    def __init__(self, train_argv: Sequence[str]) -> None:
        self.train_argv = list(train_argv)
        self._stop: StopRequest | None = None
        self._thread: threading.Thread | None = None

    def __call__(self) -> int:
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        self._stop = StopRequest()
        outcome: dict[str, Any] = {}

        def run() -> None:
            try:
                outcome["code"] = main_dino.main(self.train_argv, stop=self._stop)
            except BaseException as error:  # re-raised in the main thread, where submitit reports it
                outcome["error"] = error

        self._thread = threading.Thread(target=run, name="dino-training")
        self._thread.start()
        while self._thread.is_alive():
            self._thread.join(timeout=0.5)  # short joins keep the main thread responsive to submitit's signal
        if "error" in outcome:
            raise outcome["error"]
        return outcome["code"]

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """submitit's preemption/timeout callback (rank 0): save at the next step, then requeue this command."""
        if self._stop is not None and self._thread is not None:
            self._stop.request("submitit: timeout or preemption")
            self._thread.join(timeout=SAVE_WAIT_SECONDS)
        return submitit.helpers.DelayedSubmission(TrainingJob(self.train_argv))


def executor_for(ns: argparse.Namespace, folder: Path) -> submitit.Executor:
    if ns.cluster == "local":
        executor = submitit.LocalExecutor(folder=folder)
        executor.update_parameters(timeout_min=ns.timeout, tasks_per_node=ns.ngpus, gpus_per_node=0,
                                   signal_delay_s=ns.signal_delay_s)
        return executor
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=ns.max_requeues)
    executor.update_parameters(**slurm_parameters(ns))
    return executor


def slurm_parameters(ns: argparse.Namespace) -> dict[str, Any]:
    parameters = dict(job_name=ns.job_name, nodes=ns.nodes, ntasks_per_node=ns.ngpus, gpus_per_node=ns.ngpus,
                      cpus_per_task=ns.cpus_per_task, time=ns.timeout, partition=ns.partition,
                      account=ns.account, qos=ns.qos, constraint=ns.constraint,
                      mem=f"{ns.mem_gb}GB" if ns.mem_gb else None, mail_user=ns.mail_user,
                      mail_type=ns.mail_type, signal_delay_s=ns.signal_delay_s)
    return {key: value for key, value in parameters.items() if value is not None}


def describe(ns: argparse.Namespace, train_argv: list[str], folder: Path) -> str:
    """The sbatch script submitit would write, and the training command each task runs."""
    from submitit.slurm.slurm import _make_sbatch_string  # submitit renders its sbatch files with this

    script = _make_sbatch_string(command="python -u -m submitit.core._submit " + shlex.quote(str(folder)),
                                 folder=str(folder), **slurm_parameters(ns))
    command = "main_dino.py " + " ".join(shlex.quote(a) for a in train_argv)
    return (f"# would submit {ns.nodes} node(s) x {ns.ngpus} task(s); each task runs:\n#   {command}\n"
            f"# requeues on timeout/preemption up to {ns.max_requeues} times, resuming from the checkpoint\n{script}")


def submit(argv: Sequence[str] | None = None) -> submitit.Job | None:
    launcher_argv, train_argv = split_argv(sys.argv[1:] if argv is None else argv)
    ns = build_parser().parse_args(launcher_argv)
    if ns.cluster == "local" and ns.nodes != 1:
        raise SystemExit("error: --cluster local runs on one node; use --nodes 1")
    train_argv, output_dir = with_absolute_output_dir(train_argv)
    folder = output_dir / "submitit"
    if ns.dry_run:
        print(describe(ns, train_argv, folder))
        return None
    os.makedirs(folder, exist_ok=True)
    job = executor_for(ns, folder).submit(TrainingJob(train_argv))
    print(f"submitted job {job.job_id}; logs in {folder}; checkpoints in {output_dir}")
    return job


if __name__ == "__main__":
    submit()
