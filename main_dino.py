"""Train DINO with a SPARO read-out (or the baseline ViT).

    python main_dino.py --arch vit_small_sparo --data_path /imagenet/train --output_dir out/
    python -m torch.distributed.run --nproc_per_node=8 main_dino.py --config configs/dino_vit_small_sparo_in1k.yaml
    srun --ntasks-per-node=8 --gpus-per-task=1 python main_dino.py ...   # one job of all tasks, as official

Every official DINO flag keeps its name (defaults: see docs/compatibility.md); `--config
FILE.yaml` sets any flag, the command line wins. Rerunning the same command continues from OUTPUT_DIR/checkpoint.pth.
SIGTERM or SIGUSR1 (SLURM's warning before a kill) makes every rank stop at the same step boundary (on several GPUs
one step after the request, where the ranks' agreement is read without stalling the host), save the position inside
the epoch, and exit with status 75 (requeue); a first Ctrl-C does the same and exits with 130, a second one exits at
once. A second run into an OUTPUT_DIR that a run holds stops with one line naming the holder.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Sequence

from sparo_dino.cli.errors import print_once
from sparo_dino.cli.train_flags import parse_train_args
from sparo_dino.data.datasets import BadImageError
from sparo_dino.distributed import LaunchError
from sparo_dino.io.checkpoint import CheckpointError
from sparo_dino.run_config import RunConfig
from sparo_dino.train.output_lock import OutputDirBusy
from sparo_dino.train.preemption import StopRequest, stop_on_signals
from sparo_dino.train.trainer import TrainingError, train

# Errors that end a run with their one line instead of a traceback: bad data, checkpoints, runs, a busy output dir,
# a lost rank, a launch whose process group cannot be derived.
USER_ERRORS = (TrainingError, CheckpointError, FileNotFoundError, BadImageError, OutputDirBusy, LaunchError)


def _print_user_error(error: BaseException) -> None:
    if isinstance(error, USER_ERRORS):
        print_once(error)


def main(argv: Sequence[str] | None = None, stop: StopRequest | None = None) -> int:
    """Train; returns the exit status: 0 done, 1 a one-line error, stopped early with a checkpoint to resume from:
    REQUEUE_EXIT_CODE (75), or INTERRUPT_EXIT_CODE (130) after Ctrl-C.

    A stop comes from `stop` (the submitit launcher passes its own and owns the signals), or else, when called from
    the main thread, from SIGTERM/SIGUSR1 (what SLURM sends before a kill) and SIGINT, which are turned into a stop
    request while training runs.
    """
    config = RunConfig.from_flags(parse_train_args(argv))  # the flags, parsed once, in sections
    with contextlib.nullcontext(stop) if stop is not None else stop_on_signals() as stop:
        try:
            finished = train(config, stop, report_error=_print_user_error)
        except USER_ERRORS as error:
            print_once(error)  # printed already when it ended a process group
            return 1
    return 0 if finished else stop.exit_code


if __name__ == "__main__":
    sys.exit(main())
