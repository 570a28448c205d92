"""The DINO training loop: epochs of steps, logging, checkpoints, resume and stop requests.

`train(args)` is the whole run for one process; main_dino.py and the submitit launcher both call it. The loop is
built around `DinoTrainer.train_step` and an explicit (epoch, iteration) position, so a checkpoint can be written
at any step boundary and resumed exactly: the data (train_data.TrainingData) skips what the epoch already consumed
and seeds every crop by its position, and the RNG streams of every rank are restored. The step itself (eager or
compiled) is training_step.TrainingStep; between logging intervals the loop reads nothing from the device, except
where it writes a checkpoint.
"""
from __future__ import annotations

import argparse
import os
import warnings
from typing import TYPE_CHECKING, Any, Callable, Mapping

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from sparo_dino import distributed
from sparo_dino.checkpoint import (CHECKPOINT_NAME, CheckpointError, capture_rng_state, load_checkpoint,
                                   load_with_fallback, periodic_checkpoints, remove_stale_temporaries,
                                   restore_rng_state, save_checkpoint)
from sparo_dino.config import args_to_dict, save_config
from sparo_dino.loss import DINOLoss
from sparo_dino.networks import build_student_teacher, seed_everything
from sparo_dino.optim import build_optimizer, param_groups
from sparo_dino.periodic_knn import PeriodicKnn
from sparo_dino.preemption import StopPoll
from sparo_dino.progress import LOG_NAME, MetricSums, ProgressLogger, all_finite, require_tensorboard, trim_log
from sparo_dino.provenance import append_provenance
from sparo_dino.schedules import Schedules, scaled_lr
from sparo_dino.train_args import RESUME_MUST_MATCH_KEYS, changed_recipe, resolve_precision
from sparo_dino.train_data import TrainingData
from sparo_dino.training_step import DTYPES, NUM_GLOBAL_CROPS, TrainingStep, resolve_compile
from sparo_dino.weights import clean_state_dict

if TYPE_CHECKING:
    from sparo_dino.preemption import StopRequest


class TrainingError(RuntimeError):
    """A problem with the run's data or state that the user has to fix; its message is one line."""


class NonFiniteLossError(TrainingError):
    """The loss became NaN or infinite; training stopped before writing any checkpoint of the bad state."""


class DinoTrainer:
    """One process's share of a DINO run. Construction validates data and checkpoint before writing anything."""

    def __init__(self, args: argparse.Namespace, info: distributed.DistInfo, stop: StopRequest | None = None) -> None:
        self.args = args
        self.info = info
        self.stop = stop
        self.stopped = False
        self.device = info.device
        self.precision = resolve_precision(args.precision, args.use_fp16, self.device)
        if args.tensorboard:
            require_tensorboard()
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.batch_size = args.batch_size_per_gpu
        self.data = self._build_data()
        self.iters_per_epoch = self.data.iters_per_epoch
        self.knn = self._build_knn_monitor()

        seed_everything(args.seed)  # identical initial weights on every rank
        student, self.teacher = build_student_teacher(vars(args))
        if args.use_bn_in_head and info.world_size > 1 and self.device.type == "cuda":
            student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
            self.teacher = nn.SyncBatchNorm.convert_sync_batchnorm(self.teacher)
        self.student_module = student.to(self.device)
        self.teacher.to(self.device)
        self.optimizer = build_optimizer(args.optimizer, param_groups(self.student_module),
                                         fused=args.fused_adamw)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None
        self.dino_loss = DINOLoss(args.out_dim, NUM_GLOBAL_CROPS + args.local_crops_number,
                                  args.warmup_teacher_temp, args.teacher_temp, args.warmup_teacher_temp_epochs,
                                  args.epochs).to(self.device)
        self.schedules = Schedules.for_run(
            lr=scaled_lr(args.lr, self.batch_size * info.world_size), min_lr=args.min_lr,
            warmup_epochs=args.warmup_epochs, weight_decay=args.weight_decay,
            weight_decay_end=args.weight_decay_end, momentum_teacher=args.momentum_teacher, epochs=args.epochs,
            iters_per_epoch=self.iters_per_epoch, final_momentum_teacher=args.final_momentum_teacher)

        seed_everything(args.seed + info.rank)  # per-rank streams (drop-path); a checkpoint's states override
        self.epoch, self.iteration = 0, 0
        self.epoch_sums = MetricSums()  # the running epoch's metrics, saved with a checkpoint inside the epoch
        self.resumed_from = self._resume()
        self.student: nn.Module = self.student_module
        if info.world_size > 1:
            self.student = DistributedDataParallel(
                self.student_module, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.step = TrainingStep(self.student, self.student_module, self.teacher, self.dino_loss, self.optimizer,
                                 self.precision, self.device, compiled=resolve_compile(args.compile, self.device),
                                 clip_grad=args.clip_grad, freeze_last_layer=args.freeze_last_layer,
                                 scaler=self.scaler)
        self.stop_poll = StopPoll(stop, self.device)
        self.checkpoint_path = os.path.join(args.output_dir, CHECKPOINT_NAME)
        self.progress = ProgressLogger(args.output_dir, args.epochs, self.iters_per_epoch,
                                       self.batch_size * info.world_size, self.device, args.tensorboard)

    # ----------------------------------------------------------------------------------------------- set-up
    def _build_data(self) -> TrainingData:
        try:
            return TrainingData(vars(self.args), self.info.rank, self.info.world_size, self.device,
                                crop_dtype=DTYPES[self.precision])
        except ValueError as error:  # fewer images than one global batch
            raise TrainingError(str(error)) from error

    def _build_knn_monitor(self) -> PeriodicKnn | None:
        args = self.args
        if not args.knn_every:
            return None
        try:
            return PeriodicKnn(args.dataset, args.knn_data_path, args.knn_subset, args.knn_resize_size,
                               args.knn_crop_size, self.batch_size, args.num_workers, self.device, seed=args.seed)
        except ValueError as error:
            raise TrainingError(f"--knn_data_path: {error}") from error

    def _resume_source(self) -> tuple[str, bool] | None:
        """The run's own checkpoint.pth wins (requeued jobs continue); --resume only seeds a fresh output dir."""
        own = os.path.join(self.args.output_dir, CHECKPOINT_NAME)
        if os.path.isfile(own):
            if self.args.resume and distributed.is_main_process():
                print(f"{own} exists: continuing this run, --resume {self.args.resume} is not used", flush=True)
            return own, False
        if self.args.resume:
            return self.args.resume, True
        return None

    def _resume(self) -> str | None:
        source = self._resume_source()
        if source is None:
            return None
        path, named_by_user = source
        if named_by_user:
            state = load_checkpoint(path, allow_official=True)
        else:  # this run's own file: a damaged one falls back to the newest loadable checkpointNNNN.pth
            state, path = load_with_fallback(path, periodic_checkpoints(self.args.output_dir))
        config = state.get("config")
        if config is None and "args" in state:  # official DINO: a pickled Namespace
            config = vars(state["args"])
        if not isinstance(config, dict) or "student" not in state or "teacher" not in state:
            raise CheckpointError(f"{path} is not a DINO training checkpoint (needs student, teacher and config)")
        ours = vars(self.args)
        differences = [f"{key}={config[key]!r} (this run: {ours[key]!r})" for key in RESUME_MUST_MATCH_KEYS
                       if key in config and config[key] != ours[key]]
        if differences:
            raise CheckpointError(f"{path} belongs to another model: {', '.join(differences)}; "
                                  "use matching flags or another --output_dir")
        if not named_by_user:  # a rerun in the same output dir; a named --resume seeds a new run on purpose
            self._check_same_recipe(path, {**config, **{k: state[k] for k in ("world_size",) if k in state}})
        try:
            self.student_module.load_state_dict(clean_state_dict(state["student"]))
            self.teacher.load_state_dict(clean_state_dict(state["teacher"]))
            if "dino_loss" in state:
                self.dino_loss.load_state_dict(state["dino_loss"])
        except RuntimeError as error:
            detail = " ".join(line.strip() for line in str(error).splitlines()[:2])
            raise CheckpointError(f"{path} does not fit this model: {detail}") from error
        self._load_optimizer_state(state, path)
        self.epoch, self.iteration = int(state["epoch"]), int(state.get("iteration", 0))
        if self.iteration >= self.iters_per_epoch:
            raise CheckpointError(f"{path} stopped at iteration {self.iteration} of an epoch, but this run has "
                                  f"{self.iters_per_epoch} iterations per epoch (other data or batch size?)")
        self.epoch_sums.restore(state.get("epoch_sums"), self.device)
        if "rng" in state and not restore_rng_state(state["rng"], self.info.rank, self.device):
            warnings.warn(f"{path} has no RNG state for rank {self.info.rank} (written by fewer processes); "
                          "drop-path randomness of this rank restarts from the seed", stacklevel=2)
        if distributed.is_main_process():
            print(f"resumed from {path}: {self.epoch} epochs done, iteration {self.iteration}", flush=True)
        return path

    def _check_same_recipe(self, path: str, saved: Mapping[str, Any]) -> None:
        """Stop a rerun whose flags would silently change the run it continues (another lr, epochs, data...)."""
        changes = changed_recipe(saved, {**vars(self.args), "world_size": self.info.world_size})
        if changes:
            raise CheckpointError(
                f"{path} was trained with other settings: {', '.join(changes.values())}; to start afresh use another "
                f"--output_dir, to continue with the new values on purpose add --resume_overrides {' '.join(changes)}")

    def _load_optimizer_state(self, state: Mapping[str, Any], path: str) -> None:
        if "config" not in state:
            warnings.warn(f"{path} is an official DINO checkpoint: its optimizer and scaler states are not "
                          "restored (parameter order differs); optimizer moments restart", stacklevel=3)
            return
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as error:
            raise CheckpointError(f"{path} has an optimizer state that does not fit --optimizer "
                                  f"{self.args.optimizer}: {error}") from error
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])

    # ------------------------------------------------------------------------------------------ training
    def train_step(self, crops: list[torch.Tensor], epoch: int, global_iteration: int) -> torch.Tensor:
        """One optimisation step on crops already on the device; returns the metric vector (loss, teacher entropy,
        KL) on the device, unsynced."""
        return self.step(crops, epoch, lr=float(self.schedules.lr[global_iteration]),
                         weight_decay=float(self.schedules.weight_decay[global_iteration]),
                         momentum=float(self.schedules.momentum[global_iteration]))

    def hyperparameters(self, epoch: int, global_iteration: int) -> dict[str, float]:
        return {"lr": float(self.schedules.lr[global_iteration]),
                "wd": float(self.schedules.weight_decay[global_iteration]),
                "teacher_temp": self.dino_loss.teacher_temp(epoch),
                "momentum": float(self.schedules.momentum[global_iteration])}

    def _check_finite(self, means: Mapping[str, float], epoch: int, first: int, last: int) -> None:
        if all_finite(means):
            return
        kept = (f"the last good checkpoint {self.checkpoint_path} is kept" if os.path.isfile(self.checkpoint_path)
                else "no checkpoint had been written yet")
        raise NonFiniteLossError(f"loss is not finite ({means['loss']}) in epoch {epoch}, iterations {first}-{last}; "
                                 f"training stopped and {kept} (try --precision fp32/bf16, a lower --lr or "
                                 "--clip_grad)")

    def _stop_agreed(self) -> bool:
        """Whether any rank was asked to stop, answered at once (a collective; at epoch ends, after the save)."""
        return self.stop is not None and self.stop.agreed_to_stop(self.device)

    def _check_window_and_save(self, epoch: int, window: MetricSums, window_first: int) -> None:
        """Checkpoint at this step boundary, after checking that the steps not yet logged had a finite loss
        (a bad state must never overwrite the last good checkpoint)."""
        if window.steps:
            self._check_finite(window.global_means(), epoch, window_first, self.iteration - 1)
        self.save()

    def _save_and_stop(self, epoch: int, window: MetricSums, window_first: int) -> None:
        self._check_window_and_save(epoch, window, window_first)
        self._announce_stop()

    def _announce_stop(self) -> None:
        self.stopped = True
        if distributed.is_main_process():
            print(f"stopping ({self.stop.reason}): {self.checkpoint_path} holds epoch {self.epoch}, iteration "
                  f"{self.iteration}; run the same command again to continue", flush=True)

    def _periodic_save_due(self, epoch: int) -> bool:
        """--ckpt_every_iters, counted in global steps; epoch ends are saved anyway."""
        every = self.args.ckpt_every_iters
        return bool(every) and self.iteration < self.iters_per_epoch and \
            (epoch * self.iters_per_epoch + self.iteration) % every == 0

    def train_one_epoch(self, epoch: int) -> dict[str, float]:
        """Run the epoch from `self.iteration` to its end, or to a requested stop (then `self.stopped` is set and
        a checkpoint of the position was written); returns the epoch's mean metrics over all ranks (plus, with
        --skip_bad_images, how many unreadable images were replaced in the part of the epoch this call ran)."""
        first = self.iteration
        self.data.start_epoch(epoch, first)
        self.progress.start_epoch(first)
        window, totals = MetricSums(), self.epoch_sums
        if first == 0:
            totals.reset()
        window_first = first
        skipped = torch.zeros((), dtype=torch.int64)
        for iteration, batch in enumerate(self.data.loader, start=first):
            global_iteration = epoch * self.iters_per_epoch + iteration
            metrics = self.train_step(self.data.crops(batch, epoch, iteration), epoch, global_iteration)
            self.iteration = iteration + 1
            window.add(metrics)
            totals.add(metrics)
            skipped += self.data.replaced(batch).sum()
            if self.iteration % self.args.print_freq == 0 or self.iteration == self.iters_per_epoch:
                means = window.global_means()
                self._check_finite(means, epoch, window_first, iteration)
                self.progress.log_window(epoch, iteration, means, self.hyperparameters(epoch, global_iteration))
                window.reset()
                window_first = self.iteration
            if self.iteration < self.iters_per_epoch and self.stop_poll.poll():  # epoch ends: fit() asks at once
                self._save_and_stop(epoch, window, window_first)
                break
            if self._periodic_save_due(epoch):
                self._check_window_and_save(epoch, window, window_first)
        self.stop_poll.reset()
        means = totals.global_means()
        if self.args.skip_bad_images:
            means["bad_images_skipped"] = int(distributed.all_reduce_sum_(skipped.to(self.device)).item())
        return means

    # ----------------------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue from (self.epoch, self.iteration). Collective (gathers RNG states)."""
        state: dict[str, Any] = {
            "student": self.student_module.state_dict(),
            "teacher": self.teacher.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "dino_loss": self.dino_loss.state_dict(),
            "epoch": self.epoch,
            "iteration": self.iteration,
            "config": args_to_dict(self.args),
            "rng": capture_rng_state(self.device),
            "epoch_sums": self.epoch_sums.gathered() if self.iteration else None,
            "world_size": self.info.world_size,  # with batch_size_per_gpu, the total batch (lr scaling, epoch length)
        }
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def save(self, extra_copy: str | None = None) -> None:
        """checkpoint.pth (and `extra_copy` in the output dir) from the main process; call on every rank.

        A failed write (e.g. a full disk) raises on every rank, not only the writer: the others would otherwise
        wait for it forever in the next collective."""
        state = self.state_dict()
        failure: CheckpointError | None = None
        if distributed.is_main_process():
            try:
                save_checkpoint(state, self.checkpoint_path)
                if extra_copy:
                    save_checkpoint(state, os.path.join(self.args.output_dir, extra_copy))
            except CheckpointError as error:
                failure = error
        failed = torch.tensor(0 if failure is None else 1, device=self.device)
        if distributed.all_reduce_sum_(failed).item():
            raise failure or CheckpointError(f"rank 0 could not write {self.checkpoint_path}; see its error")

    # ------------------------------------------------------------------------------------------------- run
    def write_run_files(self) -> None:
        if not distributed.is_main_process():
            return
        for path in remove_stale_temporaries(self.args.output_dir):
            print(f"removed {path}, a partial checkpoint of a killed run", flush=True)
        dropped = trim_log(self.args.output_dir, self.epoch)
        if dropped:
            print(f"dropped {dropped} line(s) of {LOG_NAME} written after the checkpoint's epoch {self.epoch} "
                  "(the run was killed before saving it)", flush=True)
        save_config(self.args, self.args.output_dir)
        append_provenance(self.args.output_dir, args_to_dict(self.args),
                          {"world_size": self.info.world_size, "precision": self.precision,
                           "augmentation": self.data.pipeline, "compiled": self.step.compiled,
                           "device": str(self.device), "resumed_from": self.resumed_from,
                           "start_epoch": self.epoch, "start_iteration": self.iteration})

    def evaluate(self, epoch: int) -> dict[str, float]:
        """The k-NN monitor's result after `epoch` when it is due (every --knn_every epochs and the last), on the
        main process; empty otherwise. All ranks take part in the extraction."""
        last = epoch + 1 == self.args.epochs
        if self.knn is None or not ((epoch + 1) % self.args.knn_every == 0 or last):
            return {}
        top1 = self.knn.top1(self.teacher.backbone, self.args.arch)
        return {} if top1 is None else {"knn_top1": top1}

    def evaluate_init(self) -> dict[str, float]:
        """The k-NN monitor's result for the untrained teacher (= the student's random init), when a fresh run
        starts: the baseline that tells training from no training. Logged with epoch 0 as knn_top1_init."""
        if self.knn is None or (self.epoch, self.iteration) != (0, 0):
            return {}
        top1 = self.knn.top1(self.teacher.backbone, self.args.arch, label="at random init")
        return {} if top1 is None else {"knn_top1_init": top1}

    def fit(self) -> list[dict[str, Any]]:
        """Train the remaining epochs; returns the log.txt records of the epochs this call ran."""
        self.write_run_files()
        if self.epoch >= self.args.epochs and distributed.is_main_process():
            print(f"nothing to do: {self.epoch} of {self.args.epochs} epochs are done", flush=True)
        records = []
        init_evaluation = self.evaluate_init()
        try:
            while self.epoch < self.args.epochs:
                epoch = self.epoch
                means = self.train_one_epoch(epoch)
                if self.stopped:
                    break
                last_step = self.hyperparameters(epoch, epoch * self.iters_per_epoch + self.iters_per_epoch - 1)
                extra = {**self.schedules.epoch_means(epoch), "lr_last": last_step["lr"], "wd_last": last_step["wd"],
                         "teacher_temp": last_step["teacher_temp"], "momentum": last_step["momentum"],
                         "center_norm": float(self.dino_loss.center.norm())}
                records.append(self.progress.log_epoch(epoch, means, extra,
                                                       {**init_evaluation, **self.evaluate(epoch)}))
                init_evaluation = {}
                self.epoch, self.iteration = epoch + 1, 0
                keep = self.args.saveckp_freq and epoch % self.args.saveckp_freq == 0
                self.save(extra_copy=f"checkpoint{epoch:04d}.pth" if keep else None)
                if self.epoch < self.args.epochs and self._stop_agreed():
                    self._announce_stop()
                    break
        finally:
            self.progress.close()
            self.data.close()  # the loader workers ignore SIGTERM: end them now, also after an error
        return records


def train(args: argparse.Namespace, stop: StopRequest | None = None,
          report_error: Callable[[BaseException], None] | None = None) -> bool:
    """Run (or continue) the DINO training described by `args` in this process.

    Joins the process group given by the environment (torchrun, submitit) or runs alone. A group created here is
    destroyed on success, so jobs exit instead of hanging in NCCL teardown; on an error `report_error` prints it
    first and the group is aborted, since the peers may be stuck in a collective that a coordinated destroy would
    wait for. With `stop`, a request (signal handler, submitit's checkpoint callback) makes every rank save a
    checkpoint at the next step boundary and return. Returns whether all epochs are done (False: stopped early,
    resume from the checkpoint).
    """
    with distributed.process_group(args.dist_timeout_minutes, report_error) as info:
        trainer = DinoTrainer(args, info, stop)
        try:
            trainer.fit()
        except RuntimeError as error:
            if isinstance(error, (TrainingError, CheckpointError)) or not distributed.is_collective_failure(error):
                raise
            where = f"in epoch {trainer.epoch} after step {trainer.iteration}/{trainer.iters_per_epoch}"
            raise TrainingError(distributed.describe_collective_failure(error, where, args.dist_timeout_minutes)) \
                from error
        return not trainer.stopped
