"""What a training run resumes from: the objects its checkpoint captures, writing them from every rank, and
reading them back.

checkpoint.py knows files (atomic writes, safe loads, RNG states); this module knows what a DINO run puts in them
and what must hold before a checkpoint may continue this run: which file wins (the run's own over --resume), that
it belongs to the same model, that a rerun in the same output dir keeps its recipe and its images, and then weights,
optimizer, position inside the epoch, the epoch's running metric sums and every rank's RNG streams.
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
import torch.nn as nn

from sparo_dino import distributed
from sparo_dino.io.checkpoint import (
    CHECKPOINT_NAME,
    CheckpointError,
    capture_rng_state,
    load_checkpoint,
    load_with_fallback,
    periodic_checkpoints,
    restore_rng_state,
    save_checkpoint,
)
from sparo_dino.io.weights import BACKBONE_OPTION_KEYS, clean_state_dict
from sparo_dino.run_config import RunConfig, args_to_dict
from sparo_dino.train.progress import MetricSums

# Flags that define the networks (the backbone's options and the DINO head's sizes): a checkpoint trained with other
# values cannot be resumed.
RESUME_MUST_MATCH_KEYS = (*BACKBONE_OPTION_KEYS, "out_dim", "use_bn_in_head", "norm_last_layer")
# Flags that say how a run executes, not what it computes: a rerun in the same output dir may change them freely
# (another machine picks another precision or augmentation device; logging, workers, checkpoint frequency). Every
# other flag, and the number of processes (the total batch), changes the run's meaning: continuing with another
# value needs --resume_overrides.
RESUME_FREE_KEYS = frozenset({
    "config", "output_dir", "resume", "resume_overrides", "num_workers", "print_freq", "tensorboard", "wandb_project",
    "saveckp_freq", "ckpt_every_iters", "skip_bad_images", "precision", "use_fp16", "compile", "fused_adamw",
    "augmentation", "grad_checkpointing", "knn_every", "knn_data_path", "knn_subset", "knn_crop_size",
    "knn_resize_size", "dist_url", "local_rank", "dist_timeout_minutes"})


def changed_recipe(saved: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, str]:
    """{key: "key=saved (this run: new)"} for every flag that changes the run's meaning and differs from the
    checkpoint's config (plain data, so `current` is compared as args_to_dict writes it), except model flags (checked
    separately: those can never be resumed), flags the checkpoint predates, and those named in --resume_overrides."""
    allowed = RESUME_FREE_KEYS | set(RESUME_MUST_MATCH_KEYS) | set(current.get("resume_overrides") or ())
    return {key: f"{key}={saved[key]!r} (this run: {value!r})" for key, value in args_to_dict(dict(current)).items()
            if key not in allowed and key in saved and saved[key] != value}


def resume_source(output_dir: str, resume: str | None) -> tuple[str, bool] | None:
    """(file, named by the user) to resume from, or None for a fresh run. The run's own checkpoint.pth wins
    (requeued jobs continue); --resume only seeds a fresh output dir."""
    own = os.path.join(output_dir, CHECKPOINT_NAME)
    if os.path.isfile(own):
        if resume and distributed.is_main_process():
            print(f"{own} exists: continuing this run, --resume {resume} is not used", flush=True)
        return own, False
    if resume:
        return resume, True
    return None


def _saved_config(state: Mapping[str, Any], path: str) -> dict[str, Any]:
    """The flags the checkpoint was trained with; official DINO pickles them as a Namespace under `args`."""
    config = state.get("config")
    if config is None and "args" in state:
        config = vars(state["args"])
    if not isinstance(config, dict) or "student" not in state or "teacher" not in state:
        raise CheckpointError(f"{path} is not a DINO training checkpoint (needs student, teacher and config)")
    return config


def _check_same_model(path: str, saved: Mapping[str, Any], ours: Mapping[str, Any]) -> None:
    differences = [f"{key}={saved[key]!r} (this run: {ours[key]!r})" for key in RESUME_MUST_MATCH_KEYS
                   if key in saved and saved[key] != ours[key]]
    if differences:
        raise CheckpointError(f"{path} belongs to another model: {', '.join(differences)}; "
                              "use matching flags or another --output_dir")


def _check_same_recipe(path: str, saved: Mapping[str, Any], ours: Mapping[str, Any], world_size: int) -> None:
    """Stop a rerun whose flags would silently change the run it continues (another lr, epochs, data...)."""
    changes = changed_recipe(saved, {**ours, "world_size": world_size})
    if changes:
        raise CheckpointError(
            f"{path} was trained with other settings: {', '.join(changes.values())}; to start afresh use another "
            f"--output_dir, to continue with the new values on purpose add --resume_overrides {' '.join(changes)}")


def _check_same_data(path: str, saved: Mapping[str, Any] | None, current: Mapping[str, Any] | None,
                     ours: Mapping[str, Any]) -> None:
    """Stop a rerun whose training images changed since the checkpoint (added, removed, renamed: the same
    --data_path holding other images), unless --resume_overrides data_path says so on purpose. A checkpoint
    written before checkpoints recorded their data resumes unchecked, with a note."""
    if current is None or "data_path" in ours["resume_overrides"]:
        return
    if saved is None:
        if distributed.is_main_process():
            print(f"note: {path} does not record its training data (written by an older version): not checked "
                  "against the images at --data_path", flush=True)
        return
    if dict(saved) != dict(current):
        raise CheckpointError(
            f"{path} was trained on other data: {saved['images']} images (fingerprint {saved['fingerprint'][7:19]}),"
            f" --data_path {ours['data_path']} now holds {current['images']} (fingerprint "
            f"{current['fingerprint'][7:19]}); to start afresh use another --output_dir, to continue on these "
            "images on purpose add --resume_overrides data_path")


@dataclass
class RunState:
    """The objects a checkpoint captures and the run's position: `epoch` completed epochs, `iteration` steps done
    in the running epoch (0 at epoch ends). `student` is the module without its DDP wrapper, so saved keys carry
    no `module.` prefix. `epoch_sums` are the running epoch's metric sums, saved inside an epoch so that a resumed
    epoch logs the same means as an uninterrupted one."""

    config: RunConfig
    info: distributed.DistInfo
    student: nn.Module
    teacher: nn.Module
    optimizer: torch.optim.Optimizer
    dino_loss: nn.Module
    scaler: torch.amp.GradScaler | None
    epoch_sums: MetricSums = field(default_factory=MetricSums)
    epoch: int = 0
    iteration: int = 0
    data: dict[str, Any] | None = None  # the training data's size and fingerprint (TrainingData.identity)

    @property
    def checkpoint_path(self) -> str:
        return os.path.join(self.config.run.output_dir, CHECKPOINT_NAME)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue from (epoch, iteration). Collective (gathers RNG states and sums)."""
        state: dict[str, Any] = {
            "student": self.student.state_dict(),
            "teacher": self.teacher.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "dino_loss": self.dino_loss.state_dict(),
            "epoch": self.epoch,
            "iteration": self.iteration,
            "config": dict(self.config.flat),
            "rng": capture_rng_state(self.info.device),
            "epoch_sums": self.epoch_sums.gathered() if self.iteration else None,
            "world_size": self.info.world_size,  # with batch_size_per_gpu, the total batch (lr scaling, epoch length)
            "data": self.data,
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
                    save_checkpoint(state, os.path.join(self.config.run.output_dir, extra_copy))
            except CheckpointError as error:
                failure = error
        failed = torch.tensor(0 if failure is None else 1, device=self.info.device)
        if distributed.all_reduce_sum_(failed).item():
            raise failure or CheckpointError(f"rank 0 could not write {self.checkpoint_path}; see its error")

    def resume(self, iters_per_epoch: int) -> str | None:
        """Continue from the run's own checkpoint or --resume, if any; returns the file used. A run's own damaged
        checkpoint.pth falls back to its newest loadable checkpointNNNN.pth."""
        source = resume_source(self.config.run.output_dir, self.config.run.resume)
        if source is None:
            return None
        path, named_by_user = source
        if named_by_user:
            state = load_checkpoint(path, allow_official=True)
        else:
            state, path = load_with_fallback(path, periodic_checkpoints(self.config.run.output_dir))
        config = _saved_config(state, path)
        _check_same_model(path, config, self.config.flat)
        if not named_by_user:  # a rerun in the same output dir; a named --resume seeds a new run on purpose
            saved = {**config, **{k: state[k] for k in ("world_size",) if k in state}}
            _check_same_recipe(path, saved, self.config.flat, self.info.world_size)
            _check_same_data(path, state.get("data"), self.data, self.config.flat)
        self._load_weights(state, path)
        self._load_optimizer_state(state, path)
        self._load_position(state, path, iters_per_epoch)
        if distributed.is_main_process():
            print(f"resumed from {path}: {self.epoch} epochs done, iteration {self.iteration}", flush=True)
        return path

    def _load_weights(self, state: Mapping[str, Any], path: str) -> None:
        try:
            self.student.load_state_dict(clean_state_dict(state["student"]))
            self.teacher.load_state_dict(clean_state_dict(state["teacher"]))
            if "dino_loss" in state:
                self.dino_loss.load_state_dict(state["dino_loss"])
        except RuntimeError as error:
            detail = " ".join(line.strip() for line in str(error).splitlines()[:2])
            raise CheckpointError(f"{path} does not fit this model: {detail}") from error

    def _load_optimizer_state(self, state: Mapping[str, Any], path: str) -> None:
        if "config" not in state:
            warnings.warn(f"{path} is an official DINO checkpoint: its optimizer and scaler states are not "
                          "restored (parameter order differs); optimizer moments restart", stacklevel=3)
            return
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as error:
            raise CheckpointError(f"{path} has an optimizer state that does not fit --optimizer "
                                  f"{self.config.optim.optimizer}: {error}") from error
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])

    def _load_position(self, state: Mapping[str, Any], path: str, iters_per_epoch: int) -> None:
        """Epoch, iteration, the epoch's metric sums and the RNG streams: where the next step starts."""
        self.epoch, self.iteration = int(state["epoch"]), int(state.get("iteration", 0))
        if self.iteration >= iters_per_epoch:
            raise CheckpointError(f"{path} stopped at iteration {self.iteration} of an epoch, but this run has "
                                  f"{iters_per_epoch} iterations per epoch (other data or batch size?)")
        self.epoch_sums.restore(state.get("epoch_sums"), self.info.device)
        if "rng" in state and not restore_rng_state(state["rng"], self.info.rank, self.info.device):
            warnings.warn(f"{path} has no RNG state for rank {self.info.rank} (written by fewer processes); "
                          "drop-path randomness of this rank restarts from the seed", stacklevel=3)
