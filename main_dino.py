"""Train DINO with a SPARO read-out (or the baseline ViT).

    python main_dino.py --arch vit_small_sparo --data_path /imagenet/train --output_dir out/
    python -m torch.distributed.run --nproc_per_node=8 main_dino.py --config configs/dino_vit_small_sparo_in1k.yaml

Every official DINO flag keeps its name and default; `--config FILE.yaml` sets any flag, the command line wins.
Rerunning the same command continues from OUTPUT_DIR/checkpoint.pth.
"""
from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Sequence

from sparo_dino.checkpoint import CheckpointError
from sparo_dino.datasets import BadImageError
from sparo_dino.train_args import parse_train_args
from sparo_dino.trainer import TrainingError, train

if TYPE_CHECKING:
    from sparo_dino.preemption import StopRequest


def _one_line(error: BaseException) -> str:
    """The error's own message on one line. Errors raised in data-loader workers arrive wrapped in the worker's
    traceback, whose last line is `module.Type: message`."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    last = lines[-1]
    for prefix in (f"{type(error).__module__}.{type(error).__name__}: ", f"{type(error).__name__}: "):
        last = last.removeprefix(prefix)
    return last


def main(argv: Sequence[str] | None = None, stop: StopRequest | None = None) -> int:
    """Train; returns the exit status: 0 done, 1 a one-line error, REQUEUE_EXIT_CODE stopped early on request
    (`stop`, e.g. from the submitit launcher) with a checkpoint to resume from."""
    args = parse_train_args(argv)
    try:
        train(args, stop)
    except (TrainingError, CheckpointError, FileNotFoundError, BadImageError) as error:
        print(f"error: {_one_line(error)}", file=sys.stderr, flush=True)
        return 1
    if stop is not None and stop.requested:
        from sparo_dino.preemption import REQUEUE_EXIT_CODE  # only reachable when a StopRequest was passed
        return REQUEUE_EXIT_CODE
    return 0


if __name__ == "__main__":
    sys.exit(main())
