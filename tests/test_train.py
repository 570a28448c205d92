"""End-to-end training on CPU: outputs, exact resume, precisions and optimizers, and the user-facing errors.

Training is deterministic, so a rerun that silently started from scratch would reach the same end state as a real
resume; resume tests therefore also check which steps the rerun executed (its console progress lines with
--print_freq 1) and that log.txt holds every epoch once."""
from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import struct
from typing import NamedTuple

import numpy as np
import pytest
import torch
import yaml
from conftest import make_image_folder

import main_dino
from sparo_dino.cli.train_flags import parse_train_args
from sparo_dino.data.loader import TrainingData
from sparo_dino.distributed import DistInfo
from sparo_dino.run_config import RunConfig
from sparo_dino.train.preemption import REQUEUE_EXIT_CODE, StopRequest
from sparo_dino.train.step import TrainingStep
from sparo_dino.train.trainer import DinoTrainer, build_student_teacher

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# vit_tiny/8 on 32 px globals and 16 px locals, 16 images, 4 per step: a few seconds per epoch-pair on CPU.
TINY = ["--arch", "vit_tiny", "--patch_size", "8", "--img_size", "32", "--global_crop_size", "32",
        "--local_crop_size", "16", "--local_crops_number", "2", "--out_dim", "64", "--batch_size_per_gpu", "4",
        "--warmup_epochs", "1", "--num_workers", "0", "--print_freq", "2"]
ITERS_PER_EPOCH = 4  # TINY on the 16-image `images` fixture
EVERY_STEP = ("--print_freq", "1")  # a console progress line per step: the record of the steps a run executed
_PROGRESS = re.compile(r"^Epoch \[(\d+)/\d+\] it \[(\d+)/\d+\]", re.MULTILINE)


class Run(NamedTuple):
    code: int
    out: str
    err: str


def run(data: str, output: str, *extra: str, capsys=None) -> Run:
    """main_dino.main with TINY; with capsys, also what it printed."""
    code = main_dino.main([*TINY, "--data_path", data, "--output_dir", output, *extra])
    captured = capsys.readouterr() if capsys is not None else None
    return Run(code, captured.out if captured else "", captured.err if captured else "")


def executed_steps(console: str) -> list[tuple[int, int]]:
    """(epoch, 1-based iteration) of every console progress line, in order: with EVERY_STEP, the steps run."""
    return [(int(epoch), int(iteration)) for epoch, iteration in _PROGRESS.findall(console)]


def steps_between(start: tuple[int, int], stop: tuple[int, int]) -> list[tuple[int, int]]:
    """The steps, as executed_steps lists them, that take a run from position `start` to `stop`; a position is
    (epoch, iterations done in it), what a checkpoint's `epoch` and `iteration` hold."""
    epoch, done = start
    steps = []
    while (epoch, done) < stop:
        steps.append((epoch, done + 1))
        epoch, done = (epoch + 1, 0) if done + 1 == ITERS_PER_EPOCH else (epoch, done + 1)
    return steps


def logged_epochs(output_dir: str) -> list[int]:
    """The `epoch` of every log.txt record, in order: an epoch trained twice shows up twice."""
    with open(os.path.join(output_dir, "log.txt")) as handle:
        return [json.loads(line)["epoch"] for line in handle]


def load(path: str) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_training_state(reference: str, other: str) -> None:
    """Bit-exact equality of everything that determines how training continues."""
    a, b = load(os.path.join(reference, "checkpoint.pth")), load(os.path.join(other, "checkpoint.pth"))
    assert (a["epoch"], a["iteration"]) == (b["epoch"], b["iteration"])
    for part in ("student", "teacher", "dino_loss"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key}"
    for param_id, param_state in a["optimizer"]["state"].items():
        for key, value in param_state.items():
            assert torch.equal(value, b["optimizer"]["state"][param_id][key]), f"optimizer {param_id} {key}"


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_training_writes_checkpoints_logs_config_and_provenance(images, tmp_path, capsys) -> None:
    out = str(tmp_path / "run")
    assert run(images, out, "--epochs", "3", "--saveckp_freq", "2", capsys=capsys).code == 0
    assert sorted(n for n in os.listdir(out)) == ["checkpoint.pth", "checkpoint0000.pth", "checkpoint0002.pth",
                                                   "config.yaml", "data_index.json", "log.txt", "provenance.jsonl"]
    state = load(os.path.join(out, "checkpoint.pth"))
    assert {"student", "teacher", "optimizer", "dino_loss", "epoch", "iteration", "config", "rng"} <= set(state)
    assert state["epoch"] == 3 and state["iteration"] == 0 and "scaler" not in state
    assert all(k.startswith(("backbone.", "head.")) for k in state["student"])
    assert state["config"]["arch"] == "vit_tiny" and state["config"]["global_crops_scale"] == [0.4, 1.0]
    assert load(os.path.join(out, "checkpoint0000.pth"))["epoch"] == 1
    assert load(os.path.join(out, "checkpoint0002.pth"))["epoch"] == 3
    # the teacher is an EMA of the student: close to it but not equal
    key = "backbone.blocks.0.attn.qkv.weight"
    assert not torch.equal(state["student"][key], state["teacher"][key])

    records = [json.loads(line) for line in open(os.path.join(out, "log.txt"))]
    assert [r["epoch"] for r in records] == [0, 1, 2]
    for record in records:
        for field in ("train_loss", "train_lr", "train_wd", "train_teacher_temp", "train_momentum",
                      "train_teacher_entropy", "train_kl", "train_center_norm"):
            assert np.isfinite(record[field]), field
    assert 0 < records[0]["train_teacher_entropy"] <= np.log(64) + 1e-4
    assert records[-1]["train_center_norm"] == pytest.approx(float(state["dino_loss"]["center"].norm()), rel=1e-5)

    config = yaml.safe_load(open(os.path.join(out, "config.yaml")))
    assert config["epochs"] == 3 and config["out_dim"] == 64 and config["data_path"] == images
    # the saved config is a valid --config file that reproduces the run's flags
    reparsed = vars(parse_train_args(["--config", os.path.join(out, "config.yaml")]))
    assert {k: v for k, v in reparsed.items() if k != "config"} == config
    provenance = [json.loads(line) for line in open(os.path.join(out, "provenance.jsonl"))]
    assert len(provenance) == 1
    assert provenance[0]["git"]["commit"] and provenance[0]["packages"]["torch"] == torch.__version__.split("+")[0]
    assert provenance[0]["config"]["arch"] == "vit_tiny" and provenance[0]["precision"] == "fp32"
    assert isinstance(provenance[0]["command"], list) and provenance[0]["world_size"] == 1

    # rerunning the finished command does nothing (no step, no log record) and keeps the checkpoint
    before = open(os.path.join(out, "checkpoint.pth"), "rb").read()
    rerun = run(images, out, "--epochs", "3", "--saveckp_freq", "2", *EVERY_STEP, capsys=capsys)
    assert rerun.code == 0 and "nothing to do: 3 of 3 epochs are done" in rerun.out
    assert executed_steps(rerun.out) == [] and logged_epochs(out) == [0, 1, 2]
    assert open(os.path.join(out, "checkpoint.pth"), "rb").read() == before


@pytest.fixture(scope="module")
def straight_run(images, tmp_path_factory) -> str:
    """Two epochs in one go, keeping the checkpoint of each epoch."""
    straight = str(tmp_path_factory.mktemp("straight"))
    assert run(images, straight, "--epochs", "2", "--saveckp_freq", "1").code == 0
    return straight


@pytest.mark.parametrize("how", ["output_dir", "resume_flag"])
def test_resume_equals_straight_run(images, straight_run, tmp_path, capsys, how: str) -> None:
    """2 epochs straight == 1 epoch, a new start (other worker count, other global RNG), then the second epoch;
    the new start runs the second epoch's steps only."""
    straight = straight_run
    resumed = str(tmp_path / "resumed")
    first_epoch = os.path.join(straight, "checkpoint0000.pth")
    if how == "output_dir":
        os.makedirs(resumed)
        shutil.copy(first_epoch, os.path.join(resumed, "checkpoint.pth"))
        extra = []
    else:
        extra = ["--resume", first_epoch]
    torch.manual_seed(1234)  # a different global RNG state than the straight run had: restored from the file
    rerun = run(images, resumed, "--epochs", "2", "--saveckp_freq", "1", "--num_workers", "2", *EVERY_STEP, *extra,
                capsys=capsys)
    assert rerun.code == 0
    assert executed_steps(rerun.out) == steps_between((1, 0), (2, 0)) and logged_epochs(resumed) == [1]
    assert_same_training_state(straight, resumed)
    assert load(os.path.join(resumed, "checkpoint.pth"))["epoch"] == 2
    straight_log = [json.loads(line) for line in open(os.path.join(straight, "log.txt"))]
    resumed_log = [json.loads(line) for line in open(os.path.join(resumed, "log.txt"))]
    assert resumed_log[-1]["train_loss"] == straight_log[-1]["train_loss"]


# What only each optimizer keeps in its state dict: its per-parameter state, and an option of its param groups
# (SGD and LARS both keep momentum buffers).
OPTIMIZER_STATE = {"adamw": {"step", "exp_avg", "exp_avg_sq"}, "sgd": {"momentum_buffer"}, "lars": {"momentum_buffer"}}
OPTIMIZER_OPTION = {"adamw": "betas", "sgd": "nesterov", "lars": "trust_coefficient"}


def assert_written_by(optimizer_state: dict, name: str) -> None:
    """The optimizer state dict was written by the optimizer `name` (by what it holds, not by the run's config)."""
    assert {key for state in optimizer_state["state"].values() for key in state} == OPTIMIZER_STATE[name]
    options = {option for group in optimizer_state["param_groups"] for option in OPTIMIZER_OPTION.values()
               if option in group}
    assert options == {OPTIMIZER_OPTION[name]}


@pytest.mark.parametrize("flags, optimizer, dtype", [
    (["--precision", "bf16", "--optimizer", "lars"], "lars", torch.bfloat16),
    (["--use_fp16", "true", "--optimizer", "sgd", "--use_bn_in_head", "true"], "sgd", torch.float16),
    (["--arch", "vit_tiny_sparo", "--num_slots", "8", "--slot_dim", "8", "--attn_dim", "8", "--group_size", "2",
      "--grad_checkpointing", "true", "--norm_last_layer", "false", "--freeze_last_layer", "0"],
     "adamw", torch.float32),  # the defaults: AdamW, precision auto = fp32 on CPU
], ids=["bf16-lars", "fp16-sgd-bn", "sparo-checkpointing"])
def test_precisions_optimizers_and_archs_train(images, tmp_path, flags, optimizer, dtype) -> None:
    """Each combination trains to finite weights, and the flags really act: every linear layer computed in the
    requested precision (seen by a forward hook on all modules), except the DINO head's weight-normalized last layer,
    which stays fp32, and the checkpoint holds that optimizer's state."""
    linear_output_dtypes, last_layer_dtypes = set(), set()

    def record(module: torch.nn.Module, inputs, output) -> None:
        if isinstance(module, torch.nn.Linear):
            last_layer = torch.nn.utils.parametrize.is_parametrized(module)
            (last_layer_dtypes if last_layer else linear_output_dtypes).add(output.dtype)

    hook = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        code = run(images, str(tmp_path / "run"), "--epochs", "1", "--warmup_epochs", "0", *flags).code
    finally:
        hook.remove()
    assert code == 0
    assert linear_output_dtypes == {dtype} and last_layer_dtypes == {torch.float32}
    state = load(os.path.join(tmp_path / "run", "checkpoint.pth"))
    assert ("scaler" in state) == ("--use_fp16" in flags)
    assert_written_by(state["optimizer"], optimizer)
    assert all(torch.isfinite(v).all() for v in state["student"].values() if v.is_floating_point())


def test_last_layer_is_frozen_in_the_first_epoch(straight_run) -> None:
    first = load(os.path.join(straight_run, "checkpoint0000.pth"))["student"]
    second = load(os.path.join(straight_run, "checkpoint0001.pth"))["student"]
    torch.manual_seed(0)  # the run's seed: the builder gives the run's initial weights
    fresh = build_student_teacher(vars(parse_train_args([*TINY, "--data_path", "unused"])))[0].state_dict()
    direction = "head.last_layer.parametrizations.weight.original1"
    assert torch.equal(first[direction], fresh[direction])
    assert not torch.equal(second[direction], first[direction])
    assert not torch.equal(first["head.mlp.0.weight"], fresh["head.mlp.0.weight"])


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(images, tmp_path, monkeypatch, capsys) -> None:
    original = TrainingStep.forward

    def poisoned(self, crops, epoch):
        output = original(self, crops, epoch)
        return output._replace(loss=output.loss * float("nan")) if epoch == 1 else output

    monkeypatch.setattr(TrainingStep, "forward", poisoned)
    out = str(tmp_path / "run")
    code, _, err = run(images, out, "--epochs", "3", "--saveckp_freq", "1", capsys=capsys)
    assert code == 1
    line = error_line(err)
    assert "not finite" in line and "epoch 1, iterations 0-1" in line and "checkpoint.pth is kept" in line
    state = load(os.path.join(out, "checkpoint.pth"))
    assert state["epoch"] == 1
    assert not os.path.exists(os.path.join(out, "checkpoint0001.pth"))


def test_checkpoint_of_another_arch_is_refused_and_kept(images, tmp_path, capsys) -> None:
    out = str(tmp_path / "run")
    assert run(images, out, "--epochs", "1").code == 0
    files = {name: open(os.path.join(out, name), "rb").read() for name in os.listdir(out)}
    code, _, err = run(images, out, "--epochs", "2", "--arch", "vit_tiny_sparo", capsys=capsys)
    assert code == 1
    assert "belongs to another model: arch='vit_tiny'" in error_line(err)
    assert {name: open(os.path.join(out, name), "rb").read() for name in os.listdir(out)} == files


def test_corrupt_checkpoint_is_an_error_and_kept(images, tmp_path, capsys) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pth").write_bytes(b"\x00garbage" * 100)
    code, _, err = run(images, str(out), "--epochs", "1", capsys=capsys)
    assert code == 1 and "corrupt" in error_line(err) and str(out / "checkpoint.pth") in error_line(err)
    assert (out / "checkpoint.pth").read_bytes() == b"\x00garbage" * 100
    assert sorted(os.listdir(out)) == ["checkpoint.pth"]


def test_missing_data_path(tmp_path, capsys) -> None:
    code, _, err = run(str(tmp_path / "nowhere"), str(tmp_path / "run"), "--epochs", "1", capsys=capsys)
    assert code == 1 and "nowhere" in error_line(err) and "does not exist" in error_line(err)


def test_dataset_smaller_than_one_batch(tmp_path, capsys) -> None:
    data = make_image_folder(tmp_path / "few", num_classes=3, per_class=1, size=32)
    code, _, err = run(data, str(tmp_path / "run"), "--epochs", "1", capsys=capsys)
    assert code == 1 and "fewer than one global batch of 4" in error_line(err)


def test_corrupt_image_names_the_file(images, tmp_path, capsys) -> None:
    data = tmp_path / "data"
    shutil.copytree(images, data)
    bad = data / "class_0" / "img_003.png"
    bad.write_bytes(b"this is not a png")
    code, _, err = run(str(data), str(tmp_path / "run"), "--epochs", "1", "--num_workers", "1", capsys=capsys)
    assert code == 1 and str(bad) in error_line(err)


def _write_idx(path: str, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_config_trains_on_idx_files(tmp_path) -> None:
    folder = tmp_path / "fmnist"
    folder.mkdir()
    rng = np.random.default_rng(0)
    _write_idx(str(folder / "train-images-idx3-ubyte.gz"), rng.integers(0, 256, (16, 28, 28)))
    _write_idx(str(folder / "train-labels-idx1-ubyte.gz"), rng.integers(0, 10, (16,)))
    out = str(tmp_path / "run")
    code = main_dino.main(["--config", os.path.join(REPO, "configs", "fmnist_vit_tiny_sparo.yaml"),
                           "--data_path", str(folder), "--output_dir", out, "--epochs", "1", "--warmup_epochs", "0",
                           "--batch_size_per_gpu", "8", "--num_workers", "0", "--out_dim", "64",
                           "--local_crops_number", "2", "--num_slots", "4", "--slot_dim", "8",
                           "--knn_every", "0"])  # the generated folder has no test split
    assert code == 0
    state = load(os.path.join(out, "checkpoint.pth"))
    assert state["config"]["dataset"] == "fashion_mnist" and state["config"]["patch_size"] == 4


@pytest.mark.parametrize("stop_after, saved_at", [((1, 1), (1, 2)), ((0, 3), (1, 0))],
                         ids=["mid-epoch", "epoch-end"])
def test_stop_request_saves_and_the_rerun_resumes_exactly(images, straight_run, tmp_path, monkeypatch, capsys,
                                                          stop_after, saved_at) -> None:
    """A stop requested during step `stop_after` (epoch, index) saves at the next step boundary (epoch, iteration),
    exits with the requeue code, and the rerun runs the remaining steps only and ends where the uninterrupted run
    ended: the sampler skips consumed samples and the RNG streams continue where they stopped."""
    stop = StopRequest()
    step = DinoTrainer.train_step

    def step_then_request(self, crops, epoch, global_iteration):
        metrics = step(self, crops, epoch, global_iteration)
        if (epoch, self.iteration) == stop_after:
            stop.request("test")
        return metrics

    monkeypatch.setattr(DinoTrainer, "train_step", step_then_request)
    out = str(tmp_path / "run")
    argv = [*TINY, "--data_path", images, "--output_dir", out, "--epochs", "2", *EVERY_STEP]
    assert main_dino.main(argv, stop=stop) == REQUEUE_EXIT_CODE
    assert executed_steps(capsys.readouterr().out) == steps_between((0, 0), saved_at)
    partial = load(os.path.join(out, "checkpoint.pth"))
    assert (partial["epoch"], partial["iteration"]) == saved_at
    monkeypatch.undo()
    assert main_dino.main([*argv, "--num_workers", "2"]) == 0
    assert executed_steps(capsys.readouterr().out) == steps_between(saved_at, (2, 0))
    assert logged_epochs(out) == [0, 1]
    assert_same_training_state(straight_run, out)


def test_tensorboard_flag(images, tmp_path) -> None:
    out = str(tmp_path / "run")
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(SystemExit, match="pip install tensorboard"):
            run(images, out, "--epochs", "1", "--tensorboard", "true")
        assert not os.path.exists(os.path.join(out, "checkpoint.pth"))
        return
    assert run(images, out, "--epochs", "1", "--tensorboard", "true").code == 0
    assert os.listdir(os.path.join(out, "tensorboard"))


def test_periodic_knn_logs_the_teacher_accuracy_that_eval_knn_reports(images, straight_run, tmp_path,
                                                                       capsys) -> None:
    """--knn_every 3 over 2 epochs: k-NN after the last epoch only; its value equals eval_knn.py's 20-NN top-1 of
    the saved teacher on the same images, and the monitor leaves the training run bit-exactly unchanged."""
    import eval_knn

    labelled = make_image_folder(tmp_path / "labelled", num_classes=3, per_class=6, size=32, splits=("train", "val"))
    out = str(tmp_path / "run")
    assert run(images, out, "--epochs", "2", "--saveckp_freq", "1", "--knn_every", "3",
               "--knn_data_path", labelled, "--knn_subset", "100").code == 0
    assert capsys.readouterr().out.count("k-NN monitor: weighted 20-NN top-1") == 1
    records = [json.loads(line) for line in open(os.path.join(out, "log.txt"))]
    assert ["knn_top1" in r for r in records] == [False, True]
    results = eval_knn.main(["--pretrained_weights", os.path.join(out, "checkpoint.pth"),
                             "--data_path", labelled, "--resize_size", "37", "--crop_size", "32", "--nb_knn", "20",
                             "--num_workers", "0", "--batch_size_per_gpu", "8", "--knn_backend", "torch",
                             "--output_dir", str(tmp_path / "eval")])
    assert records[1]["knn_top1"] == pytest.approx(results["knn"]["20"]["top1"])
    a, b = load(os.path.join(straight_run, "checkpoint.pth")), load(os.path.join(out, "checkpoint.pth"))
    assert all(torch.equal(a[part][key], b[part][key]) for part in ("teacher", "student") for key in a[part])


def test_periodic_knn_evaluates_at_its_own_resolution(images, tmp_path, monkeypatch) -> None:
    """A run that trains on 16 px global crops and is judged at 32 px (the CPU demo) monitors the 32 px view:
    --knn_resize_size / --knn_crop_size give the number eval_knn.py reports with the same --resize_size /
    --crop_size; without them the monitor evaluates at the training resolution (resize 18, crop 16)."""
    from sparo_dino.data import augmentation

    views = []
    real_eval_transform = augmentation.eval_transform
    monkeypatch.setattr(augmentation, "eval_transform",
                        lambda resize, crop: views.append((resize, crop)) or real_eval_transform(resize, crop))
    labelled = make_image_folder(tmp_path / "labelled", num_classes=3, per_class=6, size=32, splits=("train", "val"))
    low_res = ["--epochs", "1", "--global_crop_size", "16", "--local_crops_number", "0", "--knn_every", "1",
               "--knn_data_path", labelled, "--knn_subset", "100"]
    assert run(images, str(tmp_path / "default"), *low_res).code == 0
    assert views == [(18, 16)]
    out = str(tmp_path / "run")
    assert run(images, out, *low_res, "--knn_resize_size", "32", "--knn_crop_size", "32").code == 0
    assert views[1:] == [(32, 32)]
    assert_monitor_matches_eval_knn(out, labelled, resize_size=32, crop_size=32, eval_dir=tmp_path / "eval")


def assert_monitor_matches_eval_knn(out: str, labelled: str, resize_size: int, crop_size: int, eval_dir) -> None:
    """The k-NN monitor's first logged top-1 equals eval_knn.py's 20-NN on the run's checkpoint at the same view."""
    import eval_knn

    monitored = json.loads(open(os.path.join(out, "log.txt")).readline())["knn_top1"]
    evaluated = eval_knn.main(["--pretrained_weights", os.path.join(out, "checkpoint.pth"), "--data_path", labelled,
                               "--resize_size", str(resize_size), "--crop_size", str(crop_size), "--nb_knn", "20",
                               "--num_workers", "0", "--batch_size_per_gpu", "8", "--knn_backend", "torch",
                               "--output_dir", str(eval_dir)])
    assert monitored == pytest.approx(evaluated["knn"]["20"]["top1"])


def test_knn_crop_size_must_suit_the_patch_size(capsys) -> None:
    with pytest.raises(SystemExit):
        parse_train_args([*TINY, "--data_path", "x", "--knn_crop_size", "20"])
    assert "--knn_crop_size 20 is not divisible by --patch_size 8" in capsys.readouterr().err


def test_knn_every_needs_labelled_data(images, tmp_path, capsys) -> None:
    with pytest.raises(SystemExit):
        parse_train_args([*TINY, "--data_path", "x", "--knn_every", "1"])
    assert "--knn_every needs --knn_data_path" in capsys.readouterr().err
    code, _, err = run(images, str(tmp_path / "run"), "--epochs", "1", "--knn_every", "1",
                    "--knn_data_path", str(tmp_path / "missing"), capsys=capsys)
    assert code == 1 and "missing" in error_line(err)
    assert not os.path.exists(tmp_path / "run" / "checkpoint.pth")  # checked before training


def _files(folder: str) -> dict[str, bytes]:
    return {name: open(os.path.join(folder, name), "rb").read() for name in os.listdir(folder)}


def test_rerun_with_another_recipe_stops_and_lists_the_differences(images, tmp_path, capsys) -> None:
    """Another --lr and --epochs in the same output dir would continue the old run with new schedules: one line
    names both differences and how to go on; nothing in the folder changes."""
    out = str(tmp_path / "run")
    assert run(images, out, "--epochs", "1").code == 0
    before = _files(out)
    code, _, err = run(images, out, "--epochs", "2", "--lr", "0.001", "--print_freq", "1", "--num_workers", "1",
                       capsys=capsys)
    assert code == 1
    assert error_line(err) == (
        f"error: {os.path.join(out, 'checkpoint.pth')} was trained with other settings: epochs=1 (this run: 2), "
        "lr=0.0005 (this run: 0.001); to start afresh use another --output_dir, to continue with the new values on "
        "purpose add --resume_overrides epochs lr")
    assert _files(out) == before


def test_rerun_with_other_data_or_another_number_of_processes_is_refused(images, tmp_path, capsys) -> None:
    out = str(tmp_path / "run")
    assert run(images, out, "--epochs", "1").code == 0
    other = shutil.copytree(images, tmp_path / "copy")
    code, _, err = run(str(other), out, "--epochs", "1", capsys=capsys)
    assert code == 1 and f"data_path={images!r} (this run: {str(other)!r})" in error_line(err)
    state = load(os.path.join(out, "checkpoint.pth"))
    state["world_size"] = 8  # as if written by 8 processes: another total batch, so another lr and epoch length
    torch.save(state, os.path.join(out, "checkpoint.pth"))
    code, _, err = run(images, out, "--epochs", "1", capsys=capsys)
    assert code == 1 and "world_size=8 (this run: 1)" in error_line(err) and "--resume_overrides world_size" in err


def test_rerun_after_images_were_added_and_removed_is_refused(images, tmp_path, capsys) -> None:
    """The same --data_path with 4 images added and 2 removed: one line (before: resumed silently, with another
    epoch length); --resume_overrides data_path continues on purpose."""
    data = str(shutil.copytree(images, tmp_path / "data"))
    out = str(tmp_path / "run")
    assert run(data, out, "--epochs", "1").code == 0
    make_image_folder(tmp_path / "more", num_classes=2, per_class=2, size=32, seed=1)
    for label in range(2):
        shutil.copy(tmp_path / "more" / f"class_{label}" / "img_000.png", f"{data}/class_{label}/new_{label}.png")
        shutil.copy(tmp_path / "more" / f"class_{label}" / "img_001.png", f"{data}/class_{label}/more_{label}.png")
    os.remove(f"{data}/class_0/img_000.png")
    os.remove(f"{data}/class_1/img_007.png")
    before = _files(out)
    code, _, err = run(data, out, "--epochs", "2", "--resume_overrides", "epochs", capsys=capsys)
    assert code == 1
    line = error_line(err)
    assert "was trained on other data: 16 images (fingerprint " in line and f"--data_path {data} now holds 18 " in line
    assert line.endswith("to continue on these images on purpose add --resume_overrides data_path"), line
    assert _files(out) == before
    code, console, _ = run(data, out, "--epochs", "2", "--resume_overrides", "epochs", "data_path", capsys=capsys)
    assert code == 0 and "resumed from" in console and logged_epochs(out) == [0, 1]
    assert load(os.path.join(out, "checkpoint.pth"))["data"]["images"] == 18


def test_resume_overrides_continue_with_the_new_values_and_cosmetic_flags_pass(images, tmp_path, capsys) -> None:
    out = str(tmp_path / "run")
    assert run(images, out, "--epochs", "1", capsys=capsys).code == 0
    code, console, _ = run(images, out, "--epochs", "2", "--resume_overrides", "epochs", *EVERY_STEP,
                           "--num_workers", "1", "--saveckp_freq", "5", capsys=capsys)
    assert code == 0 and "resumed from" in console
    assert executed_steps(console) == steps_between((1, 0), (2, 0))
    assert load(os.path.join(out, "checkpoint.pth"))["config"]["epochs"] == 2


def test_resume_overrides_must_name_flags(images, tmp_path, capsys) -> None:
    with pytest.raises(SystemExit):
        run(images, str(tmp_path / "run"), "--resume_overrides", "learning_rate")
    err = capsys.readouterr().err
    assert "--resume_overrides: unknown flag(s) learning_rate; valid: " in err and " lr," in err


def _sampled(data: TrainingData, epoch: int, start: int = 0) -> list[int]:
    data.start_epoch(epoch, start // data.batch_size)
    return list(data.sampler)


@pytest.mark.parametrize("dataset", ["imagefolder", "fashion_mnist"])
def test_train_subset_is_a_fixed_seeded_subset_that_every_epoch_and_resume_sees(images, tmp_path, dataset) -> None:
    if dataset == "fashion_mnist":
        data_path = tmp_path / "fmnist"
        data_path.mkdir()
        rng = np.random.default_rng(0)
        _write_idx(str(data_path / "train-images-idx3-ubyte.gz"), rng.integers(0, 256, (16, 28, 28)))
        _write_idx(str(data_path / "train-labels-idx1-ubyte.gz"), rng.integers(0, 10, (16,)))
        source = ["--dataset", "fashion_mnist", "--data_path", str(data_path)]
    else:
        source = ["--data_path", images]

    def training_data(*extra: str) -> TrainingData:
        args = parse_train_args([*TINY, *source, "--output_dir", str(tmp_path / "run"), *extra])
        return TrainingData(vars(args), 0, 1, torch.device("cpu"))

    whole, subset = training_data(), training_data("--train_subset", "8")
    assert (whole.iters_per_epoch, subset.iters_per_epoch) == (4, 2)
    epochs = [_sampled(subset, epoch) for epoch in range(3)]
    chosen = set(epochs[0])
    assert len(chosen) == 8 and chosen < set(range(16))
    assert all(set(order) == chosen for order in epochs) and epochs[0] != epochs[1]  # reshuffled, same images
    assert set(_sampled(training_data("--train_subset", "8"), 0)) == chosen  # a rerun draws the same subset
    assert _sampled(training_data("--train_subset", "8"), 1, start=4) == epochs[1][4:]  # a mid-epoch resume
    assert set(_sampled(training_data("--train_subset", "8", "--seed", "1"), 0)) != chosen
    assert training_data("--train_subset", "100").iters_per_epoch == 4  # at most N: all 16


def test_train_subset_is_recorded_and_a_rerun_with_another_is_refused(images, tmp_path, capsys) -> None:
    out = str(tmp_path / "run")
    code, stdout, _ = run(images, out, "--epochs", "1", "--train_subset", "8", "--print_freq", "1", capsys=capsys)
    assert code == 0 and executed_steps(stdout) == [(0, 1), (0, 2)]
    assert yaml.safe_load(open(os.path.join(out, "config.yaml")))["train_subset"] == 8
    assert load(os.path.join(out, "checkpoint.pth"))["config"]["train_subset"] == 8
    code, _, err = run(images, out, "--epochs", "1", "--train_subset", "12", capsys=capsys)
    assert code == 1 and "train_subset=8 (this run: 12)" in error_line(err)


def test_fp16_on_a_cpu_warns_in_one_line(images, tmp_path, capsys) -> None:
    """Before: fp16 autocast on a CPU ran about 10x slower than fp32 without a word."""
    args = parse_train_args([*TINY, "--data_path", images, "--output_dir", str(tmp_path / "run"),
                             "--precision", "fp16"])
    DinoTrainer(RunConfig.from_flags(args), DistInfo(0, 1, 0, torch.device("cpu"))).data.close()
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert lines == ["warning: fp16 on a CPU: float16 autocast has no fast CPU kernels, so training runs several "
                     "times slower than in fp32 (--precision auto picks fp32 on CPUs)"]


def wandb_history(path: str) -> tuple[list[dict[str, float]], dict[str, str]]:
    """(logged rows, config as JSON strings) of an offline W&B run file: LevelDB-log framed records (7-byte headers,
    32 KiB blocks) of W&B's own protobuf schema, read with wandb's generated classes."""
    from wandb.proto import wandb_internal_pb2

    data, position, pending, rows, config = open(path, "rb").read(), 7, b"", [], {}
    while position + 7 <= len(data):
        if 32768 - position % 32768 < 7:  # a block's tail too short for a header is padding
            position += 32768 - position % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if length == 0 and kind == 0:
            break
        pending += data[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({"/".join(item.nested_key) or item.key: json.loads(item.value_json)
                             for item in record.history.item})
            elif record.WhichOneof("record_type") == "config":
                config.update({item.key: item.value_json for item in record.config.update})
    return rows, config


def test_wandb_project_flag(images, tmp_path, monkeypatch) -> None:
    """--wandb_project: offline, the run logs TensorBoard's scalars (step/ and epoch/ names on their own axes) and its
    config and provenance under OUTPUT_DIR/wandb; a resumed run continues the same W&B run. Without wandb: one line."""
    out = str(tmp_path / "run")
    try:
        import wandb  # noqa: F401
    except ImportError:
        with pytest.raises(SystemExit, match="--wandb_project needs the wandb package"):
            run(images, out, "--epochs", "1", "--wandb_project", "sparo-test")
        assert not os.path.exists(os.path.join(out, "checkpoint.pth"))
        return
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    assert run(images, out, "--epochs", "1", "--wandb_project", "sparo-test").code == 0
    run_id = open(os.path.join(out, "wandb_run_id.txt")).read().strip()
    (folder,) = [name for name in os.listdir(os.path.join(out, "wandb")) if name.startswith("offline-run-")]
    rows, config = wandb_history(os.path.join(out, "wandb", folder, f"run-{run_id}.wandb"))
    record = json.loads(open(os.path.join(out, "log.txt")).readline())
    steps = [row for row in rows if "global_step" in row]
    assert [row["global_step"] for row in steps] == [1, 3]  # TensorBoard's steps: every --print_freq 2
    assert {"step/loss", "step/lr", "step/teacher_entropy", "step/kl"} <= set(steps[0])
    (epoch,) = [row for row in rows if "epoch" in row]
    assert epoch["epoch"] == 0 and epoch["epoch/train_loss"] == pytest.approx(record["train_loss"])
    assert json.loads(config["arch"]) == "vit_tiny" and json.loads(config["provenance"])["world_size"] == 1
    assert run(images, out, "--epochs", "2", "--resume_overrides", "epochs", "--wandb_project", "sparo-test").code == 0
    assert open(os.path.join(out, "wandb_run_id.txt")).read().strip() == run_id
