"""run_state.RunState alone, without a trainer: what a checkpoint holds, and that resuming gives back every part of
the state (weights, optimizer moments, position, the running epoch's metric sums, the RNG stream) bit for bit."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from test_train import TINY, load

import eval_linear
from sparo_dino.cli.train_flags import parse_train_args
from sparo_dino.distributed import DistInfo
from sparo_dino.eval import linear_probe
from sparo_dino.io.checkpoint import CheckpointError
from sparo_dino.run_config import RunConfig
from sparo_dino.train import schedules
from sparo_dino.train.loss import DINOLoss
from sparo_dino.train.run_state import RunState

CPU = DistInfo(0, 1, 0, torch.device("cpu"))
CHECKPOINT_KEYS = ["student", "teacher", "optimizer", "dino_loss", "epoch", "iteration", "config", "rng",
                   "epoch_sums", "world_size", "data"]


def new_state(output_dir: str, seed: int, *flags: str) -> RunState:
    """A RunState over small stand-in networks, initialised from `seed`."""
    torch.manual_seed(seed)
    student, teacher = nn.Linear(3, 2), nn.Linear(3, 2)
    config = RunConfig.from_flags(parse_train_args([*TINY, "--data_path", "x", "--output_dir", output_dir, *flags]))
    return RunState(config, CPU, student, teacher, torch.optim.AdamW(student.parameters(), lr=0.1),
                    DINOLoss(4, 4, 0.04, 0.04, 0, 2), None)


def trained_state(output_dir: str) -> RunState:
    """Saved two steps into epoch 1, with optimizer moments, a moved center and two steps of metric sums."""
    state = new_state(output_dir, seed=0)
    state.student(torch.randn(5, 3)).sum().backward()
    state.optimizer.step()
    state.dino_loss.center += 1.0
    state.epoch, state.iteration = 1, 2
    state.epoch_sums.add(torch.tensor([1.0, 2.0, 3.0]))
    state.epoch_sums.add(torch.tensor([3.0, 4.0, 5.0]))
    return state


def test_a_saved_run_state_resumes_weights_optimizer_position_sums_and_rng(tmp_path, capsys) -> None:
    saved = trained_state(str(tmp_path))
    saved.save(extra_copy="checkpoint0001.pth")
    next_draw = torch.rand(4)  # the stream a resumed run must continue
    assert list(load(str(tmp_path / "checkpoint.pth"))) == CHECKPOINT_KEYS
    assert list(load(str(tmp_path / "checkpoint0001.pth"))) == CHECKPOINT_KEYS

    resumed = new_state(str(tmp_path), seed=1)
    assert resumed.resume(iters_per_epoch=4) == str(tmp_path / "checkpoint.pth")
    assert f"resumed from {tmp_path / 'checkpoint.pth'}: 1 epochs done, iteration 2" in capsys.readouterr().out
    assert torch.equal(torch.rand(4), next_draw)
    assert (resumed.epoch, resumed.iteration) == (1, 2)
    assert resumed.epoch_sums.global_means() == {"loss": 2.0, "teacher_entropy": 3.0, "kl": 4.0}
    for ours, theirs in ((resumed.student, saved.student), (resumed.teacher, saved.teacher),
                         (resumed.dino_loss, saved.dino_loss)):
        for key, value in theirs.state_dict().items():
            assert torch.equal(ours.state_dict()[key], value), key
    moments = resumed.optimizer.state_dict()["state"][0]
    assert torch.equal(moments["exp_avg"], saved.optimizer.state_dict()["state"][0]["exp_avg"])


def test_an_epoch_end_checkpoint_holds_no_metric_sums(tmp_path) -> None:
    state = trained_state(str(tmp_path))
    state.iteration = 0
    state.save()
    assert load(str(tmp_path / "checkpoint.pth"))["epoch_sums"] is None


def test_resume_source_prefers_the_runs_own_checkpoint_over_resume(tmp_path, capsys) -> None:
    seed = tmp_path / "seed"
    trained_state(str(seed)).save()
    fresh = new_state(str(tmp_path / "run"), 1, "--resume", str(seed / "checkpoint.pth"))
    assert fresh.resume(iters_per_epoch=4) == str(seed / "checkpoint.pth")  # seeds a fresh output dir
    own = trained_state(str(tmp_path / "run"))
    own.epoch = 3
    own.save()
    rerun = new_state(str(tmp_path / "run"), 1, "--resume", str(seed / "checkpoint.pth"))
    assert rerun.resume(iters_per_epoch=4) == str(tmp_path / "run" / "checkpoint.pth") and rerun.epoch == 3
    assert "exists: continuing this run, --resume" in capsys.readouterr().out
    assert new_state(str(tmp_path / "empty"), seed=1).resume(iters_per_epoch=4) is None


def test_a_position_past_this_runs_epoch_length_is_refused(tmp_path) -> None:
    trained_state(str(tmp_path)).save()
    with pytest.raises(CheckpointError, match="stopped at iteration 2 of an epoch, but this run has 2 iterations"):
        new_state(str(tmp_path), seed=1).resume(iters_per_epoch=2)


def test_a_rerun_on_other_images_stops_unless_data_path_is_overridden(tmp_path, capsys) -> None:
    """The checkpoint records the data's size and fingerprint: a rerun whose --data_path now holds other images
    (added, removed, renamed) stops with one line naming both and the way on; --resume_overrides data_path
    continues on purpose, and the next checkpoint records the new data (before: resumed silently)."""
    saved = trained_state(str(tmp_path))
    saved.data = {"images": 16, "fingerprint": "sha256:" + "a" * 64}
    saved.save()
    rerun = new_state(str(tmp_path), seed=1)
    rerun.data = {"images": 38, "fingerprint": "sha256:" + "b" * 64}
    with pytest.raises(CheckpointError) as refused:
        rerun.resume(iters_per_epoch=4)
    assert str(refused.value) == (
        f"{tmp_path / 'checkpoint.pth'} was trained on other data: 16 images (fingerprint aaaaaaaaaaaa), --data_path "
        "x now holds 38 (fingerprint bbbbbbbbbbbb); to start afresh use another --output_dir, to continue on these "
        "images on purpose add --resume_overrides data_path")
    data = rerun.data
    rerun = new_state(str(tmp_path), 1, "--resume_overrides", "data_path")
    rerun.data = data
    assert rerun.resume(iters_per_epoch=4) and (rerun.epoch, rerun.iteration) == (1, 2)
    rerun.save()
    assert load(str(tmp_path / "checkpoint.pth"))["data"] == rerun.data
    same = new_state(str(tmp_path), seed=1)
    same.data = dict(rerun.data)
    assert same.resume(iters_per_epoch=4)


def test_a_checkpoint_that_predates_the_data_record_resumes_with_a_note(tmp_path, capsys) -> None:
    old = trained_state(str(tmp_path))
    state = old.state_dict()
    del state["data"]
    torch.save(state, tmp_path / "checkpoint.pth")
    rerun = new_state(str(tmp_path), seed=1)
    rerun.data = {"images": 16, "fingerprint": "sha256:" + "a" * 64}
    assert rerun.resume(iters_per_epoch=4) and (rerun.epoch, rerun.iteration) == (1, 2)
    assert (f"note: {tmp_path / 'checkpoint.pth'} does not record its training data (written by an older version): "
            "not checked against the images at --data_path") in capsys.readouterr().out


def test_training_and_the_linear_probe_scale_the_lr_by_one_rule() -> None:
    """Official DINO and its eval_linear.py both use lr x total batch / 256: one definition serves both."""
    assert not hasattr(linear_probe, "scaled_lr") and eval_linear.scaled_lr is schedules.scaled_lr
    assert schedules.scaled_lr(1e-3, 4 * 256) == pytest.approx(4e-3)
