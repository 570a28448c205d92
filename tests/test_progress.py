"""log.txt after a kill: records written after the resumed checkpoint's epoch are dropped, the others kept as they
were; the running epoch's metric sums survive a checkpoint inside the epoch."""
from __future__ import annotations

import json
import math

import pytest
import torch

from sparo_dino.train.progress import LOG_NAME, STEP_METRICS, MetricSums, ProgressLogger, trim_log
from sparo_dino.train.schedules import Schedules


def test_trim_log_keeps_the_checkpoints_epochs_and_drops_later_and_partial_lines(tmp_path) -> None:
    records = [json.dumps({"epoch": e, "train_loss": 10.0 - e}) for e in range(3)]
    (tmp_path / LOG_NAME).write_text("\n".join(records) + "\n" + '{"epoch": 3, "train_lo')  # killed mid-append
    assert trim_log(str(tmp_path), 2) == 2
    assert (tmp_path / LOG_NAME).read_text() == records[0] + "\n" + records[1] + "\n"
    assert trim_log(str(tmp_path), 2) == 0  # nothing more to drop
    assert trim_log(str(tmp_path / "missing"), 0) == 0


def test_metric_sums_restored_from_a_checkpoint_continue_bit_for_bit() -> None:
    steps = [torch.rand(len(STEP_METRICS)) for _ in range(5)]
    whole, first, resumed = MetricSums(), MetricSums(), MetricSums()
    for values in steps:
        whole.add(values)
    for values in steps[:2]:
        first.add(values)
    resumed.restore(first.gathered(), torch.device("cpu"))
    for values in steps[2:]:
        resumed.add(values)
    assert resumed.steps == 5 and resumed.global_means() == whole.global_means()
    fresh = MetricSums()
    fresh.restore(None, torch.device("cpu"))  # an epoch-end checkpoint holds no sums
    assert fresh.steps == 0 and fresh.global_means() == {}


def _cosine(base: float, final: float, step: int, steps: int) -> float:
    return final + 0.5 * (base - final) * (1 + math.cos(math.pi * step / steps))


def test_the_epoch_record_and_console_line_read_the_schedules_themselves(tmp_path, capsys) -> None:
    """The logger, not the loop, assembles log.txt's record: step-metric means, lr and wd as means over the epoch's
    steps (as official DINO's metric logger), their last-step values, temperature and momentum at the last step,
    the center norm, then evaluation results unprefixed. 2 epochs x 4 steps, lr warmup over epoch 0."""
    steps = Schedules.for_run(lr=1e-3, min_lr=0.0, warmup_epochs=1, weight_decay=0.04, weight_decay_end=0.4,
                              momentum_teacher=0.996, epochs=2, iters_per_epoch=4)
    logger = ProgressLogger(str(tmp_path), 2, steps, lambda epoch: 0.04 + 0.01 * epoch, images_per_step=8,
                            device=torch.device("cpu"))
    means = {"loss": 1.5, "teacher_entropy": 2.0, "kl": 0.5}
    logger.log_window(1, 1, means)
    assert "Epoch [1/2] it [2/4]" in capsys.readouterr().out
    lr = [_cosine(1e-3, 0.0, k, 4) for k in range(4)]  # epoch 1: the cosine after the warmup epoch
    wd = [_cosine(0.04, 0.4, k, 8) for k in range(4, 8)]
    record = logger.log_epoch(1, means, {"center_norm": 0.25}, evaluation={"knn_top1": 60.0})
    assert list(record) == ["train_loss", "train_teacher_entropy", "train_kl", "train_lr", "train_wd", "train_lr_last",
                            "train_wd_last", "train_teacher_temp", "train_momentum", "train_center_norm", "knn_top1",
                            "epoch", "epoch_time_s"]
    expected = {"train_loss": 1.5, "train_teacher_entropy": 2.0, "train_kl": 0.5, "train_lr": sum(lr) / 4,
                "train_wd": sum(wd) / 4, "train_lr_last": lr[3], "train_wd_last": wd[3], "train_teacher_temp": 0.05,
                "train_momentum": _cosine(0.996, 1.0, 7, 8), "train_center_norm": 0.25, "knn_top1": 60.0, "epoch": 1}
    assert {k: v for k, v in record.items() if k != "epoch_time_s"} == pytest.approx(expected, rel=1e-12)
    assert json.loads((tmp_path / LOG_NAME).read_text()) == record


def test_the_console_line_shows_the_schedules_values_of_its_step(capsys, tmp_path) -> None:
    steps = Schedules.for_run(lr=1e-3, min_lr=0.0, warmup_epochs=1, weight_decay=0.04, weight_decay_end=0.4,
                              momentum_teacher=0.996, epochs=2, iters_per_epoch=4)
    logger = ProgressLogger(str(tmp_path), 2, steps, lambda epoch: 0.07, images_per_step=8, device=torch.device("cpu"))
    logger.log_window(0, 2, {"loss": 1.0, "teacher_entropy": 2.0, "kl": 0.5})  # the warmup's third step: 2/3 of lr
    line = capsys.readouterr().out
    schedule = f"lr {2e-3 / 3:.3e} wd {_cosine(0.04, 0.4, 2, 8):.4f} temp 0.0700 mom {_cosine(0.996, 1.0, 2, 8):.5f}"
    assert schedule in line
