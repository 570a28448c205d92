"""Submit DINO+SPARO training to a SLURM cluster with submitit: one task per GPU, requeue on timeout/preemption.

    python launch/submit.py --nodes 2 --ngpus 8 --arch vit_small_sparo --data_path /imagenet/train \
        --output_dir /runs/%j                                    # official run_with_submitit.py form
    python launch/submit.py --nodes 2 --ngpus 8 --partition gpu --timeout 2880 -- \
        --config configs/dino_vit_small_sparo_in1k.yaml --data_path /imagenet/train --output_dir /runs/sparo

Without `--`, the launcher takes the flags it knows and passes every other flag to main_dino.py, as official DINO's
run_with_submitit.py does; with `--`, flags before it are the launcher's and everything after goes to main_dino.py.
`%j` in --output_dir becomes the SLURM job id inside the job, so a requeued job finds its own folder again. The
rendezvous uses submitit's TorchDistributedEnvironment (first node of the allocation, port from the job id), so no
shared folder is needed. On timeout or preemption submitit calls `TrainingJob.checkpoint()` on rank 0: it asks the
trainer to stop at the next step boundary, waits for the checkpoint to be written, and hands submitit a
resubmission of the same command, which resumes from `output_dir/checkpoint.pth`.
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import threading
from pathlib import Path
from typing import Any, Sequence

import submitit

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # lets `python launch/submit.py` work from a plain checkout
    sys.path.insert(0, str(REPO_ROOT))

import main_dino  # noqa: E402
from sparo_dino.cli import errors as cli_errors  # noqa: E402
from sparo_dino.cli.config import parse_args  # noqa: E402
from sparo_dino.cli.train_flags import get_args_parser, parse_train_args  # noqa: E402
from sparo_dino.data.datasets import FASHION_MNIST_DIR  # noqa: E402
from sparo_dino.train.preemption import StopRequest  # noqa: E402

SAVE_WAIT_SECONDS = 600.0  # longest we wait in checkpoint() for the trainer to reach a step boundary and save
JOB_ID = "%j"  # placeholder in --output_dir for the SLURM job id, as in official DINO
GB_PER_GPU = 40  # official DINO requests 40 GB of host memory per GPU
VOLTA32_CONSTRAINT = "volta32gb"  # what official DINO's --use_volta32 asks SLURM for


def build_parser() -> argparse.ArgumentParser:
    """Launcher flags; official run_with_submitit.py flags keep their names and defaults (docs/compatibility.md
    lists the few that differ). No abbreviations, so a training flag is never mistaken for a prefix of a launcher
    flag."""
    parser = cli_errors.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                       allow_abbrev=False)
    parser.add_argument("--nodes", type=int, default=None,
                        help="number of nodes to request (default 2, as official; 1 with --cluster local)")
    parser.add_argument("--ngpus", type=int, default=8, help="GPUs per node; one task per GPU")
    parser.add_argument("--cpus_per_task", type=int, default=None,
                        help="CPUs per task (default: --num_workers + 1, the main process needs a core of its own)")
    parser.add_argument("--timeout", type=int, default=2800, help="minutes per job; the run requeues itself")
    parser.add_argument("--partition", type=str, default=None, help="default: the cluster's default partition")
    parser.add_argument("--use_volta32", action="store_true", help=f"ask for the {VOLTA32_CONSTRAINT} constraint")
    parser.add_argument("--comment", type=str, default="", help="comment passed to the scheduler")
    parser.add_argument("--account", type=str, default=None)
    parser.add_argument("--qos", type=str, default=None)
    parser.add_argument("--constraint", type=str, default=None, help="e.g. a GPU type feature")
    parser.add_argument("--mem_gb", type=int, default=None,
                        help=f"memory per node (default {GB_PER_GPU} per GPU, as official; 0: the cluster's default)")
    parser.add_argument("--mail_user", type=str, default=None)
    parser.add_argument("--mail_type", type=str, default=None, help="e.g. END,FAIL")
    parser.add_argument("--job_name", type=str, default="dino")
    parser.add_argument("--signal_delay_s", type=int, default=120,
                        help="seconds before the time limit at which SLURM signals the job to checkpoint")
    parser.add_argument("--max_requeues", type=int, default=30, help="how many timeouts the run may survive")
    parser.add_argument("--cluster", choices=("slurm", "local"), default="slurm",
                        help="'local' runs the same job on this machine (submitit's LocalExecutor), for testing")
    parser.add_argument("--dry_run", action="store_true", help="print what would be submitted, submit nothing")
    return parser


def split_argv(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """(launcher flags, training argv). With `--`, the launcher flags come before it and the training flags after
    it; without, the launcher takes its own flags wherever they are and the rest is the training argv, in order."""
    argv, parser = list(argv), build_parser()
    if "--" in argv:
        cut = argv.index("--")
        ns, train_argv = parser.parse_args(argv[:cut]), argv[cut + 1:]
    else:
        ns, train_argv = parser.parse_known_args(argv)
    if ns.nodes is None:
        ns.nodes = 1 if ns.cluster == "local" else 2
    ns.cpus_per_task = cpus_per_task(ns.cpus_per_task, train_argv)
    return ns, train_argv


def cpus_per_task(requested: int | None, train_argv: Sequence[str]) -> int:
    """The CPUs each task asks for: one per data-loader worker plus one for the main process, which feeds the GPU
    (official DINO asks for 10 with 10 workers, so one worker or the main process always waits for a core)."""
    workers = parse_train_args(train_argv).num_workers
    if requested is None:
        return workers + 1
    if requested < workers + 1:
        raise SystemExit(f"error: --cpus_per_task {requested} leaves the main process no core of its own next to "
                         f"--num_workers {workers}; ask for {workers + 1} or lower --num_workers")
    return requested


def with_absolute_output_dir(train_argv: list[str]) -> tuple[list[str], Path]:
    """Resolve the run's output dir (from flags or --config) so requeued jobs find their checkpoint. A `%j` in it
    stays as is until the job knows its id (with_job_id)."""
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


def with_job_id(train_argv: Sequence[str], job_id: str) -> list[str]:
    """The training argv with `%j` in the --output_dir value (as with_absolute_output_dir writes it) replaced by
    the job id, as official DINO does inside the job."""
    argv = list(train_argv)
    for index in range(len(argv) - 1):
        if argv[index] == "--output_dir":
            argv[index + 1] = argv[index + 1].replace(JOB_ID, str(job_id))
    return argv


class TrainingJob:
    """What each task runs: training in a worker thread, so submitit's signal handler can wait for a clean save."""

    def __init__(self, train_argv: Sequence[str]) -> None:
        self.train_argv = list(train_argv)
        self._stop: StopRequest | None = None
        self._thread: threading.Thread | None = None

    def __call__(self) -> int:
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        # self.train_argv keeps its `%j`: a requeued job has the same id, so it resolves to the same folder
        train_argv = with_job_id(self.train_argv, submitit.JobEnvironment().job_id)
        self._stop = StopRequest()
        outcome: dict[str, Any] = {}

        def run() -> None:
            try:
                outcome["code"] = main_dino.main(train_argv, stop=self._stop)
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
    """SlurmExecutor parameters (sbatch flags) of the launcher flags; unset ones are left to the cluster."""
    mem_gb = GB_PER_GPU * ns.ngpus if ns.mem_gb is None else ns.mem_gb
    parameters = dict(job_name=ns.job_name, nodes=ns.nodes, ntasks_per_node=ns.ngpus, gpus_per_node=ns.ngpus,
                      cpus_per_task=ns.cpus_per_task, time=ns.timeout, partition=ns.partition,
                      account=ns.account, qos=ns.qos,
                      constraint=VOLTA32_CONSTRAINT if ns.use_volta32 else ns.constraint,
                      comment=ns.comment or None, mem=f"{mem_gb}GB" if mem_gb else None, mail_user=ns.mail_user,
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


def check_launcher_flags(ns: argparse.Namespace, output_dir: Path) -> None:
    """One-line errors for launcher flags that cannot work together."""
    if ns.use_volta32 and ns.constraint:
        raise SystemExit(f"error: --use_volta32 sets the constraint {VOLTA32_CONSTRAINT}; drop it or --constraint")
    if ns.cluster == "local" and ns.nodes != 1:
        raise SystemExit("error: --cluster local runs on one node; use --nodes 1")
    if ns.cluster == "local" and JOB_ID in str(output_dir):
        # submitit's local controller creates the log folder without resolving %j
        raise SystemExit(f"error: {JOB_ID} in --output_dir needs a SLURM job id; give --cluster local a plain folder")


# Launcher numbers and the least each may be: a value below makes an sbatch line SLURM rejects, or no job at all.
# (--cpus_per_task has its own check against the training's --num_workers: cpus_per_task above.)
LAUNCHER_MINIMA = {"nodes": 1, "ngpus": 1, "timeout": 1, "mem_gb": 0, "max_requeues": 0, "signal_delay_s": 0}
SLURM_COMMANDS = ("sbatch", "srun")  # what submitit's SlurmExecutor calls to submit and to start the tasks


def validate_launcher_args(ns: argparse.Namespace, train_argv: Sequence[str]) -> None:
    """One line for each launcher value that cannot work, before anything is submitted: numbers below their least
    value, no SLURM on this machine, training data that is not there (found now instead of inside the job)."""
    for name, least in LAUNCHER_MINIMA.items():
        value = getattr(ns, name)
        if value is not None and value < least:
            raise SystemExit(f"error: --{name} must be >= {least}, got {value}")
    data_path = _training_data_path(train_argv)
    if not os.path.exists(data_path):
        missing = f"--data_path {data_path} does not exist on this machine"
        if not ns.dry_run:
            raise SystemExit(f"error: {missing}; the job would fail at its start")
        print(f"warning: {missing}", file=sys.stderr)
    absent = [command for command in SLURM_COMMANDS if shutil.which(command) is None]
    if ns.cluster == "slurm" and not ns.dry_run and absent:
        raise SystemExit(f"error: --cluster slurm needs a SLURM cluster ({' and '.join(absent)} not found on this "
                         "machine): submit from a SLURM login node, or use --cluster local to run here")


def _training_data_path(train_argv: Sequence[str]) -> str:
    """The --data_path the tasks will read (flag, --config, or the Fashion-MNIST default); the flags were already
    validated by with_absolute_output_dir."""
    args = parse_args(get_args_parser(), list(train_argv))
    return args.data_path or FASHION_MNIST_DIR


def submit(argv: Sequence[str] | None = None) -> submitit.Job | None:
    ns, train_argv = split_argv(sys.argv[1:] if argv is None else argv)
    train_argv, output_dir = with_absolute_output_dir(train_argv)
    check_launcher_flags(ns, output_dir)
    validate_launcher_args(ns, train_argv)
    folder = output_dir / "submitit"  # submitit resolves a %j in it and creates it at submission
    if ns.dry_run:
        print(describe(ns, train_argv, folder))
        return None
    job = executor_for(ns, folder).submit(TrainingJob(train_argv))
    run_dir = str(output_dir).replace(JOB_ID, str(job.job_id))
    print(f"submitted job {job.job_id}; logs in {run_dir}/submitit; checkpoints in {run_dir}")
    return job


if __name__ == "__main__":
    submit()
