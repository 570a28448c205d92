"""Schedules of the DINO recipe against closed-form values."""
from __future__ import annotations

import math

import numpy as np
import pytest

from sparo_dino.train.schedules import Schedules, cosine_schedule, scaled_lr, teacher_temperature_schedule


def test_cosine_with_warmup_matches_formula() -> None:
    base, final, epochs, ipe, warmup = 1.0, 0.1, 5, 4, 2
    values = cosine_schedule(base, final, epochs, ipe, warmup_epochs=warmup)
    assert len(values) == epochs * ipe
    warmup_iters = warmup * ipe
    np.testing.assert_allclose(values[:warmup_iters], [base * i / (warmup_iters - 1) for i in range(warmup_iters)])
    decay = epochs * ipe - warmup_iters
    expected = [final + (base - final) * (1 + math.cos(math.pi * i / decay)) / 2 for i in range(decay)]
    np.testing.assert_allclose(values[warmup_iters:], expected)
    assert values[warmup_iters] == pytest.approx(base)
    assert np.all(np.diff(values[warmup_iters:]) < 0)
    assert values[-1] > final


def test_cosine_without_warmup_starts_at_base() -> None:
    values = cosine_schedule(0.996, 1.0, 3, 10)
    assert values[0] == pytest.approx(0.996)
    assert np.all(np.diff(values) > 0) and values[-1] < 1.0


def test_schedule_errors() -> None:
    with pytest.raises(ValueError, match="warmup_epochs"):
        cosine_schedule(1.0, 0.0, 2, 3, warmup_epochs=3)
    with pytest.raises(ValueError, match="iterations per epoch"):
        cosine_schedule(1.0, 0.0, 2, 0)


def test_teacher_temperature_warmup() -> None:
    temps = teacher_temperature_schedule(0.04, 0.07, 30, 100)
    assert len(temps) == 100
    assert temps[0] == pytest.approx(0.04) and temps[29] == pytest.approx(0.07)
    assert temps[15] == pytest.approx(0.04 + 0.03 * 15 / 29)
    assert np.all(temps[30:] == 0.07)
    np.testing.assert_allclose(teacher_temperature_schedule(0.04, 0.04, 0, 5), [0.04] * 5)


def test_linear_scaling_rule() -> None:
    assert scaled_lr(5e-4, 64 * 8) == pytest.approx(5e-4 * 2)
    assert scaled_lr(5e-4, 32) == pytest.approx(5e-4 / 8)


def test_run_schedules() -> None:
    schedules = Schedules.for_run(lr=1e-3, min_lr=1e-6, warmup_epochs=1, weight_decay=0.04, weight_decay_end=0.4,
                                  momentum_teacher=0.996, epochs=4, iters_per_epoch=5)
    assert schedules.lr[0] == 0.0 and schedules.lr[4] == pytest.approx(1e-3) and schedules.lr.argmax() == 4
    assert schedules.weight_decay[0] == pytest.approx(0.04) and np.all(np.diff(schedules.weight_decay) > 0)
    assert schedules.momentum[0] == pytest.approx(0.996)
    assert all(len(a) == 20 for a in (schedules.lr, schedules.weight_decay, schedules.momentum))


def test_final_teacher_momentum() -> None:
    """Official DINO's momentum cosine ends at 1; DINOv2's final_momentum_teacher sets that end, and equal to the base
    value it keeps the teacher's momentum constant."""
    def momentum(final: float) -> np.ndarray:
        return Schedules.for_run(lr=1e-3, min_lr=1e-6, warmup_epochs=0, weight_decay=0.04, weight_decay_end=0.4,
                                 momentum_teacher=0.99, epochs=2, iters_per_epoch=5,
                                 final_momentum_teacher=final).momentum
    official = [1.0 + 0.5 * (0.99 - 1.0) * (1 + math.cos(math.pi * i / 10)) for i in range(10)]
    np.testing.assert_allclose(momentum(1.0), official)
    np.testing.assert_allclose(momentum(0.99), [0.99] * 10)
    half_way = momentum(0.995)[5]
    assert half_way == pytest.approx(0.995 + 0.5 * (0.99 - 0.995) * (1 + math.cos(math.pi / 2)))


def test_epoch_means_are_the_official_log_values() -> None:
    """Official DINO logs train_lr / train_wd as the mean of the per-step values of the epoch (its MetricLogger's
    global_avg), not the last step's value."""
    schedules = Schedules.for_run(lr=1.0, min_lr=0.0, warmup_epochs=1, weight_decay=0.04, weight_decay_end=0.4,
                                  momentum_teacher=0.996, epochs=3, iters_per_epoch=4)
    # epoch 0 warms up linearly over its 4 steps: 0, 1/3, 2/3, 1
    assert schedules.epoch_means(0)["lr"] == pytest.approx((0 + 1 / 3 + 2 / 3 + 1) / 4)
    decay = [0.5 * (1 + math.cos(math.pi * i / 8)) for i in range(8)]
    assert schedules.epoch_means(2)["lr"] == pytest.approx(sum(decay[4:]) / 4)
    wd = [0.4 + 0.5 * (0.04 - 0.4) * (1 + math.cos(math.pi * i / 12)) for i in range(12)]
    assert schedules.epoch_means(1)["wd"] == pytest.approx(sum(wd[4:8]) / 4)
