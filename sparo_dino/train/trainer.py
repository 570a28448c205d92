"""The DINO training loop: epochs of steps, logging, checkpoints, resume and stop requests.

`train(config)` runs (or continues) a run in this process; main_dino.py and the submitit launcher call it. The loop
keeps official DINO's shape (docs/architecture.md: one step) and reads nothing from the device between logging
intervals, except where it writes a checkpoint.
"""
from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from sparo_dino import distributed
from sparo_dino.data.loader import TrainingData
from sparo_dino.eval.extraction import ExtractionStopped
from sparo_dino.io.atomic import remove_stale_temporaries
from sparo_dino.io.checkpoint import CheckpointError
from sparo_dino.io.provenance import append_provenance, file_sha256, save_config
from sparo_dino.io.weights import TrunkLoad, fresh_parameter_names, load_pretrained_trunk
from sparo_dino.model.networks import build_student_teacher, parameter_line, seed_everything
from sparo_dino.run_config import RunConfig
from sparo_dino.train.knn_monitor import PeriodicKnn
from sparo_dino.train.loss import DINOLoss
from sparo_dino.train.optim import build_optimizer, param_groups
from sparo_dino.train.output_lock import locked_output_dir
from sparo_dino.train.preemption import StopPoll
from sparo_dino.train.progress import (
    LOG_NAME,
    MetricSums,
    ProgressLogger,
    all_finite,
    require_tensorboard,
    require_wandb,
    trim_log,
)
from sparo_dino.train.run_state import RunState, resume_source
from sparo_dino.train.schedules import Schedules, scaled_lr
from sparo_dino.train.step import DTYPES, NUM_GLOBAL_CROPS, TrainingStep, resolve_compile, resolve_precision

if TYPE_CHECKING:
    from sparo_dino.train.preemption import StopRequest


class TrainingError(RuntimeError):
    """A problem with the run's data or state that the user has to fix; its message is one line."""


class NonFiniteLossError(TrainingError):
    """The loss became NaN or infinite; training stopped before writing any checkpoint of the bad state."""


class DinoTrainer:
    """One process's share of a DINO run. Construction validates data and checkpoint before writing anything."""

    def __init__(self, config: RunConfig, info: distributed.DistInfo, stop: StopRequest | None = None) -> None:
        self.config = config
        model, optim, run = config.model, config.optim, config.run
        self.info = info
        self.stop = stop
        self.stopped = False
        self.device = info.device
        self.precision = resolve_precision(optim.precision, optim.use_fp16, self.device)
        if self.precision == "fp16" and self.device.type == "cpu" and distributed.is_main_process():
            print("warning: fp16 on a CPU: float16 autocast has no fast CPU kernels, so training runs several times "
                  "slower than in fp32 (--precision auto picks fp32 on CPUs)", file=sys.stderr, flush=True)
        if run.tensorboard:
            require_tensorboard()
        if run.wandb_project:
            require_wandb()
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.batch_size = optim.batch_size_per_gpu
        self.data = self._build_data()
        self.iters_per_epoch = self.data.iters_per_epoch
        self.knn = self._build_knn_monitor()

        seed_everything(run.seed)  # identical initial weights on every rank
        student, self.teacher = build_student_teacher(config.flat)
        if distributed.is_main_process():
            print(parameter_line(model.arch, student.backbone), flush=True)
        self.trunk = self._load_pretrained_trunk(student, self.teacher)
        if model.use_bn_in_head and info.world_size > 1 and self.device.type == "cuda":
            student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
            self.teacher = nn.SyncBatchNorm.convert_sync_batchnorm(self.teacher)
        self.student_module = student.to(self.device)
        self.teacher.to(self.device)
        self.optimizer = build_optimizer(optim.optimizer, param_groups(self.student_module), fused=optim.fused_adamw)
        self.scaler = torch.amp.GradScaler(self.device.type) if self.precision == "fp16" else None
        self.dino_loss = DINOLoss(model.out_dim, NUM_GLOBAL_CROPS + config.crops.local_crops_number,
                                  optim.warmup_teacher_temp, optim.teacher_temp, optim.warmup_teacher_temp_epochs,
                                  optim.epochs).to(self.device)
        self.schedules = Schedules.for_run(
            lr=scaled_lr(optim.lr, self.batch_size * info.world_size), min_lr=optim.min_lr,
            warmup_epochs=optim.warmup_epochs, weight_decay=optim.weight_decay,
            weight_decay_end=optim.weight_decay_end, momentum_teacher=optim.momentum_teacher, epochs=optim.epochs,
            iters_per_epoch=self.iters_per_epoch, final_momentum_teacher=optim.final_momentum_teacher)

        seed_everything(run.seed + info.rank)  # per-rank streams (drop-path); a checkpoint's states override
        self.state = RunState(config, info, self.student_module, self.teacher, self.optimizer, self.dino_loss,
                              self.scaler, data=self.data.identity)
        self.resumed_from = self.state.resume(self.iters_per_epoch)
        self.start_position = (self.state.epoch, self.state.iteration)
        self._provenance_recorded = False
        self.student: nn.Module = self.student_module
        if info.world_size > 1:
            self.student = DistributedDataParallel(
                self.student_module, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.step = TrainingStep(self.student, self.student_module, self.teacher, self.dino_loss, self.optimizer,
                                 self.precision, self.device, compiled=resolve_compile(optim.compile, self.device),
                                 clip_grad=optim.clip_grad, freeze_last_layer=optim.freeze_last_layer,
                                 scaler=self.scaler, freeze_trunk_epochs=optim.freeze_trunk_epochs,
                                 trunk_params=self._trunk_parameters())
        self.stop_poll = StopPoll(stop, self.device)
        self.progress = ProgressLogger(run.output_dir, optim.epochs, self.schedules, self.dino_loss.teacher_temp,
                                       self.batch_size * info.world_size, self.device, run.tensorboard,
                                       run.wandb_project)
        self._window, self._window_first = MetricSums(), 0  # the steps since the last console line

    @property
    def epoch(self) -> int:
        """Completed epochs; the position lives in RunState, which saves and restores it."""
        return self.state.epoch

    @property
    def iteration(self) -> int:
        """Steps done in the running epoch (0 at epoch ends)."""
        return self.state.iteration

    # ----------------------------------------------------------------------------------------------- set-up
    def _build_data(self) -> TrainingData:
        try:
            return TrainingData(self.config.flat, self.info.rank, self.info.world_size, self.device,
                                crop_dtype=DTYPES[self.precision])
        except ValueError as error:  # fewer images than one global batch
            raise TrainingError(str(error)) from error

    def _load_pretrained_trunk(self, student: nn.Module, teacher: nn.Module) -> TrunkLoad | None:
        """--pretrained_trunk on a fresh run: the student's trunk from the file and the teacher's backbone a copy of
        the student's (read-out included). A resumed run's weights come from its checkpoint, whose config recorded
        the same file (a rerun naming another is refused as a changed recipe)."""
        path = self.config.model.pretrained_trunk
        if path is None or resume_source(self.config.run.output_dir, None) is not None:
            return None
        try:
            loaded = load_pretrained_trunk(student.backbone, path)
        except ValueError as error:
            raise TrainingError(f"--pretrained_trunk: {error}") from error
        teacher.backbone.load_state_dict(student.backbone.state_dict())
        if distributed.is_main_process():
            print(f"{loaded.summary()}; the DINO head starts fresh", flush=True)
        return loaded

    def _trunk_parameters(self) -> list[nn.Parameter]:
        """What --freeze_trunk_epochs holds still: the student backbone's parameters but the read-out's."""
        backbone = self.student_module.backbone
        fresh = set(fresh_parameter_names(backbone))
        return [param for name, param in backbone.named_parameters() if name not in fresh]

    def _build_knn_monitor(self) -> PeriodicKnn | None:
        run = self.config.run
        if not run.knn_every:
            return None
        try:
            return PeriodicKnn(run.dataset, run.knn_data_path, run.knn_subset, run.knn_resize_size,
                               run.knn_crop_size, self.batch_size, run.num_workers, self.device, seed=run.seed)
        except ValueError as error:
            raise TrainingError(f"--knn_data_path: {error}") from error

    def write_run_files(self) -> None:
        if not distributed.is_main_process():
            return
        for path in remove_stale_temporaries(self.config.run.output_dir):
            print(f"removed {path}, a partial checkpoint of a killed run", flush=True)
        dropped = trim_log(self.config.run.output_dir, self.epoch)
        if dropped:
            print(f"dropped {dropped} line(s) of {LOG_NAME} written after the checkpoint's epoch {self.epoch} "
                  "(the run was killed before saving it)", flush=True)
        save_config(self.config.flat, self.config.run.output_dir)
        self.data.save_index()

    def record_provenance(self) -> None:
        """Append this launch's provenance record, once: after its first step, when whether the step really ran
        compiled is known (`compiled`; null when the launch ran no step), or when fit ends without a step."""
        if self._provenance_recorded:
            return
        self._provenance_recorded = True
        if distributed.is_main_process():
            record = append_provenance(
                self.config.run.output_dir, self.config.flat,
                {"world_size": self.info.world_size, "precision": self.precision,
                 "augmentation": self.data.pipeline, "compiled": self.step.ran_compiled, "device": str(self.device),
                 "resumed_from": self.resumed_from, "start_epoch": self.start_position[0],
                 "start_iteration": self.start_position[1],
                 "pretrained_trunk": None if self.trunk is None else {
                     **self.trunk.record(), "sha256": file_sha256(self.trunk.source)}})
            self.progress.record_run(self.config.flat, record)

    # ------------------------------------------------------------------------------------------- the loop
    def fit(self) -> list[dict[str, Any]]:
        """Train the remaining epochs; returns the log.txt records of the epochs this call ran.

        An epoch ends with its log record and checkpoint, and only then the k-NN monitor, which can take minutes:
        a stop or a kill during the monitor loses no training. The monitor's result is added to the record after."""
        self.write_run_files()
        if self.epoch >= self.config.optim.epochs and distributed.is_main_process():
            print(f"nothing to do: {self.epoch} of {self.config.optim.epochs} epochs are done", flush=True)
        records: list[dict[str, Any]] = []
        try:
            init_evaluation = self.evaluate_init()
            if self._stop_agreed():  # asked during the monitor of the random init, before any step
                self._announce_stop()
            while self.epoch < self.config.optim.epochs and not self.stopped:
                epoch = self.epoch
                means = self.train_one_epoch(epoch)
                if self.stopped:  # inside the epoch, its position saved
                    break
                records.append(self.progress.log_epoch(epoch, means, self.dino_loss.state_metrics(), init_evaluation))
                init_evaluation = {}
                self._save_epoch(epoch)
                records[-1].update(self.evaluate(epoch))
                if self.epoch < self.config.optim.epochs and self._stop_agreed():
                    self._announce_stop()
        finally:
            self.record_provenance()
            self.progress.close()
            self.data.close()  # the loader workers ignore SIGTERM: end them now, also after an error
        return records

    def train_one_epoch(self, epoch: int) -> dict[str, float]:
        """Run the epoch from `self.iteration` to its end, or to a requested stop (then `self.stopped` is set and
        a checkpoint of the position was written); returns the epoch's mean metrics over all ranks (plus, with
        --skip_bad_images, how many unreadable images were replaced in the part of the epoch this call ran)."""
        first = self.iteration
        self.data.start_epoch(epoch, first)
        self.progress.start_epoch(first)
        self._window, self._window_first = MetricSums(), first
        if first == 0:
            self.state.epoch_sums.reset()
        skipped = torch.zeros((), dtype=torch.int64)
        for iteration, batch in enumerate(self.data.loader, start=first):
            metrics = self.train_step(self.data.crops(batch, epoch, iteration), epoch,
                                      epoch * self.iters_per_epoch + iteration)
            self.record_provenance()
            self.state.iteration = iteration + 1
            self._window.add(metrics)
            self.state.epoch_sums.add(metrics)
            skipped += self.data.replaced(batch).sum()
            if self._at_step_boundary(epoch):
                break
        self.stop_poll.reset()
        return self._epoch_means(skipped)

    def train_step(self, crops: list[torch.Tensor], epoch: int, global_iteration: int) -> torch.Tensor:
        """One optimisation step at the schedules' values of `global_iteration`, on crops already on the device;
        returns the metric vector (loss, teacher entropy, KL) on the device, unsynced."""
        return self.step(crops, epoch, **self.schedules.at(global_iteration))

    # ----------------------------------------------------------------------------------------- boundaries
    def _at_step_boundary(self, epoch: int) -> bool:
        """Every decision between two steps of an epoch, in this order; returns whether to stop now.

        1. every --print_freq steps and at the epoch end: the window's means are read (the only device read),
           checked finite and logged;
        2. inside the epoch, a stop request that any rank got: save the position and stop (at the epoch end fit()
           asks instead, after the epoch's own checkpoint);
        3. a periodic save every --ckpt_every_iters global steps (epoch ends are saved anyway).
        Every rank reaches the same decisions at the same step, as they all take part in the collectives."""
        in_epoch = self.iteration < self.iters_per_epoch
        if self.iteration % self.config.run.print_freq == 0 or not in_epoch:
            self.progress.log_window(epoch, self.iteration - 1, self._finite_window_means(epoch))
            self._window.reset()
            self._window_first = self.iteration
        if in_epoch and self.stop_poll.poll():
            self._save_checked(epoch)
            self._announce_stop()
            return True
        every = self.config.run.ckpt_every_iters
        if in_epoch and every and (epoch * self.iters_per_epoch + self.iteration) % every == 0:
            self._save_checked(epoch)
        return False

    def _finite_window_means(self, epoch: int) -> dict[str, float]:
        """The means of the steps since the last console line over all ranks (a collective); NonFiniteLossError
        naming those steps when the loss is not finite."""
        means = self._window.global_means()
        if all_finite(means):
            return means
        path = self.state.checkpoint_path
        kept = (f"the last good checkpoint {path} is kept" if os.path.isfile(path)
                else "no checkpoint had been written yet")
        raise NonFiniteLossError(f"loss is not finite ({means['loss']}) in epoch {epoch}, iterations "
                                 f"{self._window_first}-{self.iteration - 1}; training stopped and {kept} (try "
                                 "--precision fp32/bf16, a lower --lr or --clip_grad)")

    def _save_checked(self, epoch: int) -> None:
        """Checkpoint at this step boundary, after checking that the steps not yet logged had a finite loss
        (a bad state must never overwrite the last good checkpoint)."""
        if self._window.steps:
            self._finite_window_means(epoch)
        self.state.save()

    def _save_epoch(self, epoch: int) -> None:
        """After `epoch`: checkpoint.pth, and every --saveckp_freq epochs a checkpointNNNN.pth copy as official
        DINO."""
        self.state.epoch, self.state.iteration = epoch + 1, 0
        keep = self.config.run.saveckp_freq and epoch % self.config.run.saveckp_freq == 0
        self.state.save(extra_copy=f"checkpoint{epoch:04d}.pth" if keep else None)

    def _stop_agreed(self) -> bool:
        """Whether any rank was asked to stop (a collective, answered at once; False without a StopRequest)."""
        return self.stop is not None and self.stop.agreed_to_stop(self.device)

    def _announce_stop(self) -> None:
        self.stopped = True
        if not distributed.is_main_process():
            return
        path = self.state.checkpoint_path
        saved = (f"{path} holds epoch {self.epoch}, iteration {self.iteration}" if os.path.isfile(path)
                 else "nothing was trained yet, so nothing was saved")
        print(f"stopping ({self.stop.reason}): {saved}; run the same command again to continue", flush=True)

    def _epoch_means(self, skipped: torch.Tensor) -> dict[str, float]:
        """The epoch's step metrics over all ranks; with --skip_bad_images also how many unreadable images were
        replaced (`skipped` on this rank) in the part of the epoch this process ran."""
        means = self.state.epoch_sums.global_means()
        if self.config.run.skip_bad_images:
            means["bad_images_skipped"] = int(distributed.all_reduce_sum_(skipped.to(self.device)).item())
        return means

    # ---------------------------------------------------------------------------------------- evaluation
    def evaluate(self, epoch: int) -> dict[str, Any]:
        """The k-NN monitor's result after `epoch` when it is due (every --knn_every epochs and the last), on the
        main process, also added to the epoch's log.txt record; empty otherwise. All ranks take part in the
        extraction. A stop request ends it early: the record then says `knn_skipped`."""
        last = epoch + 1 == self.config.optim.epochs
        if self.knn is None or not ((epoch + 1) % self.config.run.knn_every == 0 or last):
            return {}
        result = self._monitor("knn_top1", f"after epoch {epoch}", label="")
        self.progress.amend_epoch(epoch, result)
        return result

    def evaluate_init(self) -> dict[str, Any]:
        """The k-NN monitor's result for the untrained teacher (= the student's random init), when a fresh run
        starts: the baseline that tells training from no training. Logged with epoch 0 as knn_top1_init."""
        if self.knn is None or (self.epoch, self.iteration) != (0, 0):
            return {}
        return self._monitor("knn_top1_init", "at random init", label="at random init")

    def _monitor(self, key: str, when: str, label: str) -> dict[str, Any]:
        """{key: top-1} of the k-NN monitor on the main process ({} elsewhere), or {"knn_skipped": why} when a
        stop request ended it (every rank agrees between two batches)."""
        try:
            top1 = self.knn.top1(self.teacher.backbone, self.config.model.arch, label=label, stop=self._stop_agreed)
        except ExtractionStopped:
            if not distributed.is_main_process():
                return {}
            why = f"stop requested ({self.stop.reason})"
            print(f"k-NN monitor {when} skipped: {why}", flush=True)
            return {"knn_skipped": why}
        return {} if top1 is None else {key: top1}


def train(config: RunConfig, stop: StopRequest | None = None,
          report_error: Callable[[BaseException], None] | None = None) -> bool:
    """Run (or continue) the training of `config` in this process; returns whether all epochs are done (False:
    stopped early, resume from the checkpoint). The process group is destroyed on success and aborted on an error, after
    `report_error` printed it (peers may be stuck in a collective a coordinated destroy would wait for).
    """
    with distributed.process_group(config.run.dist_timeout_minutes, report_error) as info, \
            locked_output_dir(config.run.output_dir):
        trainer = DinoTrainer(config, info, stop)
        try:
            trainer.fit()
        except RuntimeError as error:
            if isinstance(error, (TrainingError, CheckpointError)) or not distributed.is_collective_failure(error):
                raise
            where = f"in epoch {trainer.epoch} after step {trainer.iteration}/{trainer.iters_per_epoch}"
            message = distributed.describe_collective_failure(error, where, config.run.dist_timeout_minutes)
            raise TrainingError(message) from error
        return not trainer.stopped
