"""Per-iteration schedules of the DINO recipe: learning rate, weight decay, teacher momentum, teacher temperature.

Schedules are precomputed arrays indexed by the global iteration (epoch * iterations_per_epoch + iteration), so a
run resumed mid-epoch continues on exactly the same curve, and the trainer never re-derives a value from floats.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def cosine_schedule(base_value: float, final_value: float, epochs: int, iters_per_epoch: int,
                    warmup_epochs: int = 0, start_warmup_value: float = 0.0) -> np.ndarray:
    """Linear warmup from `start_warmup_value` to `base_value`, then a half cosine down to `final_value`.

    The cosine reaches `final_value` only in the limit (its last step is one iteration short of it), which is the
    official DINO curve; keeping it makes runs comparable to published logs.
    """
    if epochs < 1 or iters_per_epoch < 1:
        raise ValueError(f"schedules need epochs >= 1 and iterations per epoch >= 1, got {epochs} and "
                         f"{iters_per_epoch}")
    if not 0 <= warmup_epochs <= epochs:
        raise ValueError(f"warmup_epochs must be in [0, epochs={epochs}], got {warmup_epochs}")
    warmup_iters = warmup_epochs * iters_per_epoch
    total = epochs * iters_per_epoch
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters)
    decay_iters = total - warmup_iters
    progress = np.arange(decay_iters) / max(decay_iters, 1)
    decay = final_value + 0.5 * (base_value - final_value) * (1.0 + np.cos(np.pi * progress))
    return np.concatenate([warmup, decay])


def teacher_temperature_schedule(warmup_temp: float, temp: float, warmup_epochs: int, epochs: int) -> np.ndarray:
    """Per-epoch teacher temperature: linear from `warmup_temp` to `temp` over `warmup_epochs`, then constant.

    A low starting temperature sharpens the teacher early, which DINO needs to avoid collapse on some setups.
    """
    if not 0 <= warmup_epochs <= epochs:
        raise ValueError(f"warmup_teacher_temp_epochs must be in [0, epochs={epochs}], got {warmup_epochs}")
    return np.concatenate([np.linspace(warmup_temp, temp, warmup_epochs), np.full(epochs - warmup_epochs, temp)])


def scaled_lr(lr: float, total_batch_size: int) -> float:
    """The official linear scaling rule, of DINO training and of its linear probe alike: `lr` is the value for a
    total batch (over all processes) of 256."""
    return lr * total_batch_size / 256.0


@dataclass(frozen=True)
class Schedules:
    """All per-iteration values of one run (arrays of length epochs * iters_per_epoch)."""

    lr: np.ndarray
    weight_decay: np.ndarray
    momentum: np.ndarray
    iters_per_epoch: int

    @classmethod
    def for_run(cls, *, lr: float, min_lr: float, warmup_epochs: int, weight_decay: float, weight_decay_end: float,
                momentum_teacher: float, epochs: int, iters_per_epoch: int,
                final_momentum_teacher: float = 1.0) -> "Schedules":
        """`lr` must already be scaled to the total batch (see `scaled_lr`)."""
        return cls(lr=cosine_schedule(lr, min_lr, epochs, iters_per_epoch, warmup_epochs=warmup_epochs),
                   weight_decay=cosine_schedule(weight_decay, weight_decay_end, epochs, iters_per_epoch),
                   momentum=cosine_schedule(momentum_teacher, final_momentum_teacher, epochs, iters_per_epoch),
                   iters_per_epoch=iters_per_epoch)

    def at(self, global_iteration: int) -> dict[str, float]:
        """The values of one step, named as TrainingStep takes them."""
        return {"lr": float(self.lr[global_iteration]), "weight_decay": float(self.weight_decay[global_iteration]),
                "momentum": float(self.momentum[global_iteration])}

    def epoch_means(self, epoch: int) -> dict[str, float]:
        """Mean lr and weight decay over the steps of `epoch`: what official DINO logs as train_lr / train_wd (its
        metric logger averages the per-step values). Taken from the schedule, so a run resumed mid-epoch logs the
        same numbers as an uninterrupted one."""
        steps = slice(epoch * self.iters_per_epoch, (epoch + 1) * self.iters_per_epoch)
        return {"lr": float(self.lr[steps].mean()), "wd": float(self.weight_decay[steps].mean())}
