"""Training metrics: device-side accumulation, console progress with ETA, log.txt JSON lines, TensorBoard.

Step metrics stay on the device and are summed there; they are read (one all-reduce and one host sync) only at
the logging interval and at epoch ends. That read is also where a non-finite loss is noticed, so the fast path
never synchronises per step. The logger reads the schedules itself, so a console line and an epoch record show the
values the steps used without the training loop assembling them.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import resource
import secrets
import time
from typing import Any, Callable, Mapping

import torch

from sparo_dino import distributed
from sparo_dino.io import atomic
from sparo_dino.train.loss import STEP_METRICS
from sparo_dino.train.schedules import Schedules

LOG_NAME = "log.txt"
# Short names of step metrics on the console line (others appear under their own name).
CONSOLE_LABELS = {"teacher_entropy": "H", "kl": "KL"}


class MetricSums:
    """Running sums of the per-step metric vector (ordered as STEP_METRICS) on the device."""

    def __init__(self) -> None:
        self._sums: torch.Tensor | None = None
        self.steps = 0

    def add(self, values: torch.Tensor) -> None:
        values = values.detach().float()
        self._sums = values.clone() if self._sums is None else self._sums.add_(values)
        self.steps += 1

    def global_means(self) -> dict[str, float]:
        """Means over steps and ranks (a collective: every rank calls it at the same step)."""
        if self._sums is None:
            return {}
        totals = self._sums.clone()
        distributed.all_reduce_sum_(totals)
        means = (totals / (self.steps * distributed.get_world_size())).tolist()
        return dict(zip(STEP_METRICS, means))

    def reset(self) -> None:
        self._sums, self.steps = None, 0

    def gathered(self) -> dict[str, Any]:
        """Every rank's sums (one row per rank) and the step count, for a checkpoint written inside an epoch, so the
        resumed epoch's log.txt means equal an uninterrupted run's. A collective."""
        if self._sums is None:
            return {"sums": None, "steps": 0}
        return {"sums": distributed.all_gather_tensor(self._sums[None]).cpu(), "steps": self.steps}

    def restore(self, state: Mapping[str, Any] | None, device: torch.device) -> None:
        """Continue from `gathered()`'s state; with another number of ranks the means restart at the resume."""
        self.reset()
        if not state or state["sums"] is None or state["sums"].shape[0] != distributed.get_world_size():
            return
        self._sums = state["sums"][distributed.get_rank()].to(device).clone()
        self.steps = int(state["steps"])


def trim_log(output_dir: str, epochs_done: int) -> int:
    """Keep only log.txt's records of the epochs a resumed checkpoint holds; returns how many lines were dropped.

    An epoch's record is appended just before its checkpoint is written, so a kill between the two (or inside the
    append) leaves a record, or half of one, that the resumed run writes again."""
    path = os.path.join(output_dir, LOG_NAME)
    if not os.path.isfile(path):
        return 0
    with open(path) as handle:
        lines = handle.read().splitlines()
    kept = []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("epoch", epochs_done) < epochs_done:
            kept.append(line)
    if len(kept) < len(lines):
        with atomic.replaced(path) as handle:
            handle.write("".join(line + "\n" for line in kept))
    return len(lines) - len(kept)


def all_finite(means: Mapping[str, float]) -> bool:
    return all(math.isfinite(value) for value in means.values())


def memory_mb(device: torch.device) -> float:
    """Peak memory of this process: allocated CUDA memory on GPUs, resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _format_duration(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(seconds, 0))))


class ProgressLogger:
    """Console lines every N iterations and JSON lines per epoch, on the main process only.

    `teacher_temp` gives an epoch's teacher temperature (DINOLoss.teacher_temp, which owns that schedule)."""

    def __init__(self, output_dir: str, epochs: int, schedules: Schedules, teacher_temp: Callable[[int], float],
                 images_per_step: int, device: torch.device, tensorboard: bool = False,
                 wandb_project: str | None = None) -> None:
        self.enabled = distributed.is_main_process()
        self.output_dir = output_dir
        self.epochs = epochs
        self.schedules = schedules
        self.teacher_temp = teacher_temp
        self.iters_per_epoch = schedules.iters_per_epoch
        self.images_per_step = images_per_step
        self.device = device
        self.writer = None
        if tensorboard and self.enabled:
            from torch.utils.tensorboard import SummaryWriter  # checked at startup: see require_tensorboard
            self.writer = SummaryWriter(os.path.join(output_dir, "tensorboard"))
        self.wandb = WandbRun(wandb_project, output_dir) if wandb_project and self.enabled else None
        self.start_epoch(0)

    def start_epoch(self, first_iteration: int) -> None:
        """Reset the clocks; `first_iteration` > 0 when an epoch resumes in the middle."""
        self._epoch_start = self._window_start = time.perf_counter()
        self._epoch_first = self._window_first = first_iteration

    def schedule_values(self, epoch: int, iteration: int) -> dict[str, float]:
        """The hyperparameters of step `iteration` (0-based) of `epoch`, under the names the logs use."""
        step = self.schedules.at(epoch * self.iters_per_epoch + iteration)
        return {"lr": step["lr"], "wd": step["weight_decay"], "teacher_temp": self.teacher_temp(epoch),
                "momentum": step["momentum"]}

    def log_window(self, epoch: int, iteration: int, means: Mapping[str, float]) -> None:
        """One console line for the steps since the last line; `iteration` is the last finished step (0-based)."""
        hyper = self.schedule_values(epoch, iteration)
        now = time.perf_counter()
        steps = iteration + 1 - self._window_first
        images_per_s = steps * self.images_per_step / max(now - self._window_start, 1e-9)
        epoch_steps = iteration + 1 - self._epoch_first
        eta = (now - self._epoch_start) / max(epoch_steps, 1) * (self.iters_per_epoch - iteration - 1)
        self._window_start, self._window_first = now, iteration + 1
        if not self.enabled:
            return
        diagnostics = " ".join(f"{CONSOLE_LABELS.get(name, name)} {means[name]:.3f}" for name in STEP_METRICS[1:])
        print(f"Epoch [{epoch}/{self.epochs}] it [{iteration + 1}/{self.iters_per_epoch}] "
              f"eta {_format_duration(eta)} | loss {means['loss']:.4f} | lr {hyper['lr']:.3e} "
              f"wd {hyper['wd']:.4f} temp {hyper['teacher_temp']:.4f} mom {hyper['momentum']:.5f} | "
              f"{diagnostics} | {images_per_s:.1f} img/s | mem {memory_mb(self.device):.0f} MB", flush=True)
        step = epoch * self.iters_per_epoch + iteration
        if self.writer is not None:
            for key, value in {**means, **hyper}.items():
                self.writer.add_scalar(f"step/{key}", value, step)
        if self.wandb is not None:
            self.wandb.log("step", {**means, **hyper}, step)

    def epoch_record(self, epoch: int, means: Mapping[str, float], loss_state: Mapping[str, float],
                     evaluation: Mapping[str, float] | None = None) -> dict[str, Any]:
        """The log.txt record of `epoch`: official `train_*` keys for the step metrics' `means` and the schedules
        (lr and wd as epoch means, as official DINO's metric logger averages them; `*_last`, temperature and
        momentum at the epoch's last step), the loss's `loss_state` (DINOLoss.state_metrics), then evaluation
        results such as `knn_top1` unprefixed."""
        last = self.schedule_values(epoch, self.iters_per_epoch - 1)
        train = {**means, **self.schedules.epoch_means(epoch), "lr_last": last["lr"], "wd_last": last["wd"],
                 "teacher_temp": last["teacher_temp"], "momentum": last["momentum"], **loss_state}
        return {**{f"train_{key}": value for key, value in train.items()}, **(evaluation or {}),
                "epoch": epoch, "epoch_time_s": round(time.perf_counter() - self._epoch_start, 3)}

    def log_epoch(self, epoch: int, means: Mapping[str, float], loss_state: Mapping[str, float],
                  evaluation: Mapping[str, float] | None = None) -> dict[str, Any]:
        """Append `epoch_record` to log.txt and the console (and TensorBoard) and return it."""
        record = self.epoch_record(epoch, means, loss_state, evaluation)
        if not self.enabled:
            return record
        with open(os.path.join(self.output_dir, LOG_NAME), "a") as handle:
            handle.write(json.dumps(record) + "\n")
        print(f"Epoch [{epoch}/{self.epochs}] done in {_format_duration(record['epoch_time_s'])} | "
              + " | ".join(f"{k} {v:.4g}" for k, v in record.items()
                           if k not in ("epoch", "epoch_time_s") and isinstance(v, (int, float))), flush=True)
        self._epoch_scalars({key: value for key, value in record.items() if key != "epoch"}, epoch)
        return record

    def amend_epoch(self, epoch: int, values: Mapping[str, Any]) -> None:
        """Add `values` (the k-NN monitor's result, which comes after the epoch's checkpoint) to `epoch`'s log.txt
        record, the last one, and to TensorBoard. The file is rewritten atomically: a kill leaves the record with or
        without them, never half of it."""
        if not self.enabled or not values:
            return
        path = os.path.join(self.output_dir, LOG_NAME)
        with open(path) as handle:
            lines = handle.read().splitlines()
        record = json.loads(lines[-1])
        if record.get("epoch") != epoch:
            raise RuntimeError(f"{path} ends with epoch {record.get('epoch')}'s record, not epoch {epoch}'s")
        lines[-1] = json.dumps({**record, **values})
        with atomic.replaced(path) as handle:
            handle.write("".join(line + "\n" for line in lines))
        self._epoch_scalars(values, epoch)

    def _epoch_scalars(self, values: Mapping[str, Any], epoch: int) -> None:
        """The numbers among `values` to TensorBoard and Weights & Biases, on the epoch axis."""
        scalars = {key: value for key, value in values.items() if isinstance(value, (int, float))}
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(f"epoch/{key}", value, epoch)
            self.writer.flush()
        if self.wandb is not None:
            self.wandb.log("epoch", scalars, epoch)

    def record_run(self, config: Mapping[str, Any], provenance: Mapping[str, Any]) -> None:
        """The run's flags and this launch's provenance record, for the experiment trackers that keep them."""
        if self.wandb is not None:
            self.wandb.record_run(config, provenance)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()


WANDB_ID_NAME = "wandb_run_id.txt"  # in the output dir: a resumed run logs into the same W&B run


class WandbRun:
    """--wandb_project: the scalars TensorBoard gets, under the same `step/` and `epoch/` names, each family on its
    own axis (global step, epoch), plus the run's config and provenance. The run id is kept in the output dir, so
    a resumed or requeued run continues the same W&B run; WANDB_MODE=offline logs to OUTPUT_DIR/wandb only."""

    def __init__(self, project: str, output_dir: str) -> None:
        import wandb  # checked at start-up: see require_wandb

        id_path = os.path.join(output_dir, WANDB_ID_NAME)
        if os.path.isfile(id_path):
            with open(id_path) as handle:
                run_id = handle.read().strip()
        else:
            run_id = secrets.token_hex(4)  # W&B ids: lower-case letters and digits
            os.makedirs(output_dir, exist_ok=True)
            with open(id_path, "w") as handle:
                handle.write(run_id + "\n")
        self.run = wandb.init(project=project, dir=output_dir, id=run_id, resume="allow",
                              name=os.path.basename(os.path.abspath(output_dir)))
        self.run.define_metric("step/*", step_metric="global_step")
        self.run.define_metric("epoch/*", step_metric="epoch")

    def log(self, family: str, values: Mapping[str, float], step: int) -> None:
        self.run.log({**{f"{family}/{key}": value for key, value in values.items()},
                      "global_step" if family == "step" else "epoch": step})

    def record_run(self, config: Mapping[str, Any], provenance: Mapping[str, Any]) -> None:
        self.run.config.update({**config, "provenance": dict(provenance)}, allow_val_change=True)

    def finish(self) -> None:
        self.run.finish()


def require_wandb() -> None:
    """Fail at startup with one line when --wandb_project is given but wandb is not installed."""
    try:
        import wandb  # noqa: F401
    except ImportError as error:
        raise SystemExit("error: --wandb_project needs the wandb package (pip install wandb, or the extra "
                         "sparo-dino[wandb])") from error


def require_tensorboard() -> None:
    """Fail at startup, not after the first epoch, when --tensorboard is asked for but not installed."""
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError as error:
        raise SystemExit("error: --tensorboard true needs the tensorboard package (pip install tensorboard)") from error
