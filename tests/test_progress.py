"""log.txt after a kill: records written after the resumed checkpoint's epoch are dropped, the others kept as they
were; the running epoch's metric sums survive a checkpoint inside the epoch."""
from __future__ import annotations

import json

import torch

from sparo_dino.progress import LOG_NAME, STEP_METRICS, MetricSums, trim_log


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
