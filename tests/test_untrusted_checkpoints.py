"""Checkpoints a user names are data, never code.

A crafted file whose unpickling would run code is refused by every entry point that reads a file the user names
(--pretrained_weights through weights.read_weights, --linear_weights, hub `weights=`, load_pretrained_trunk,
main_dino --resume): one line names the file and the refused global, and the code never runs.

Official DINO checkpoints still load. What they hold is written out here from facebookresearch/dino: main_dino.py
saves student (DDP, `module.` prefix), teacher, optimizer, epoch, args (an argparse.Namespace; run_with_submitit
makes its output_dir a pathlib.PosixPath), dino_loss and, with fp16, fp16_scaler; its lr and weight-decay schedules
are numpy arrays, so the optimizer's param groups hold numpy float64 values. eval_linear.py's checkpoint.pth.tar
holds epoch, state_dict (DDP), optimizer, scheduler and best_acc.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import pickle
import types

import numpy as np
import pytest
import torch
from test_train import TINY

import eval_knn
import eval_linear
import main_dino
import sparo_vit
from sparo_dino.cli import eval_flags
from sparo_dino.cli.train_flags import parse_train_args
from sparo_dino.eval import extraction, linear_probe
from sparo_dino.eval.feature_cache import FeatureSet, save_features
from sparo_dino.io import weights
from sparo_dino.io.checkpoint import CheckpointError, load_checkpoint
from sparo_dino.model.networks import build_student_teacher

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_marker(path: str) -> None:
    """A function of this test module that a crafted file asks the unpickler to call."""
    with open(path, "w") as handle:
        handle.write("code ran")


class Payload:
    """Unpickling this object calls `function(*args)`: what a crafted checkpoint does."""

    def __init__(self, function, args: tuple) -> None:
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


PAYLOADS = {  # name: (a payload writing the marker, the global torch refuses as its message names it)
    "os.system": (lambda marker: Payload(os.system, (f"touch {marker}",)), f"{os.system.__module__}.system"),
    "builtins.exec": (lambda marker: Payload(exec, (f"open({marker!r}, 'w').write('code ran')",)), "exec"),
    "test function": (lambda marker: Payload(write_marker, (marker,)), f"{__name__}.write_marker"),
}


def vit_tiny_state() -> dict[str, torch.Tensor]:
    return sparo_vit.build_backbone("vit_tiny", patch_size=8, img_size=32).state_dict()


def write_crafted(folder: pathlib.Path, payload: str) -> tuple[str, str, str]:
    """A checkpoint that looks official (real teacher weights) but whose `args` runs code when unpickled;
    returns (its path, the marker file the code would write, the global torch must refuse)."""
    make, refused = PAYLOADS[payload]
    marker = str(folder / "marker")
    path = str(folder / "crafted.pth")
    teacher = {f"backbone.{key}": value for key, value in vit_tiny_state().items()}
    torch.save({"teacher": teacher, "student": teacher, "epoch": 1, "args": make(marker)}, path)
    return path, marker, refused


def feature_cache(folder: pathlib.Path) -> str:
    """Cached features of a vit_tiny, enough for eval_linear --fast --evaluate to reach --linear_weights."""
    options = {"arch": "vit_tiny", "patch_size": 8, "img_size": 32}
    kind = extraction.feature_kind("vit_tiny", eval_linear.DEFAULT_N_LAST_BLOCKS)
    meta = {"kind": kind, "options": options, "tag": "cache", "source": "test"}
    data = FeatureSet(torch.randn(6, 768), torch.tensor([0, 1, 2] * 2), torch.randn(3, 768),
                      torch.tensor([0, 1, 2]), ["a", "b", "c"], meta)
    save_features(data, str(folder / "cache"))
    return str(folder / "cache")


def cli_error(main, argv: list[str]) -> str:
    """The line an evaluation script exits with (its __main__ runs eval_flags.run_cli)."""
    with pytest.raises(SystemExit) as info:
        eval_flags.run_cli(lambda: main(argv))
    return str(info.value.code)


def raised(function, *args, **kwargs) -> str:
    with pytest.raises(CheckpointError) as info:
        function(*args, **kwargs)
    return str(info.value)


def main_dino_error(path: str, folder: pathlib.Path, images: str, capsys) -> str:
    code = main_dino.main([*TINY, "--data_path", images, "--output_dir", str(folder / "run"), "--resume", path])
    assert code == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    return errors[0]


ENTRY_POINTS = {
    "eval_knn --pretrained_weights": lambda path, folder, images, capsys: cli_error(
        eval_knn.main, ["--pretrained_weights", path, "--data_path", str(folder / "no_data")]),
    "eval_linear --linear_weights": lambda path, folder, images, capsys: cli_error(
        eval_linear.main, ["--load_features", feature_cache(folder), "--fast", "--evaluate", "--linear_weights", path,
                           "--output_dir", str(folder / "probe")]),
    "linear_probe.load_head": lambda path, folder, images, capsys: raised(
        linear_probe.load_head, path, linear_probe.LinearClassifier(192, 3), {"kind": "cls", "num_classes": 3}),
    "hub weights=": lambda path, folder, images, capsys: raised(
        torch.hub.load, REPO, "vit_tiny", source="local", weights=path),
    "load_pretrained_trunk": lambda path, folder, images, capsys: raised(
        weights.load_pretrained_trunk, sparo_vit.build_backbone("vit_tiny", patch_size=8, img_size=32), path),
    "main_dino --resume": main_dino_error,
}


@pytest.mark.parametrize("payload", PAYLOADS)
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_crafted_checkpoint_runs_no_code_and_fails_with_one_line(entry, payload, tmp_path, images, capsys):
    path, marker, refused = write_crafted(tmp_path, payload)
    message = ENTRY_POINTS[entry](path, tmp_path, images, capsys)
    assert not os.path.exists(marker), f"{entry} ran the file's code"
    assert "\n" not in message and path in message and refused in message and "not allowed" in message, message


# --- official DINO checkpoints ---------------------------------------------------------------------------------

_NUMPY_SCALAR = np.float64(0).__reduce__()[0]


class _Numpy1Pickler(pickle._Pickler):
    """Names numpy's scalar constructor numpy.core.multiarray.scalar, as official checkpoints (numpy 1) do."""

    def save_global(self, obj, name=None) -> None:
        if obj is _NUMPY_SCALAR:
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\nscalar\n")
            self.memoize(obj)
        else:
            super().save_global(obj, name)


def _pickle_module(name: str, pickler: type) -> types.ModuleType:
    module = types.ModuleType(name)
    module.Pickler = pickler
    return module


NUMPY_PICKLES = {"numpy 2": pickle, "numpy 1": _pickle_module("numpy1_pickle", _Numpy1Pickler)}


def run_args(folder: pathlib.Path, images: str) -> argparse.Namespace:
    return parse_train_args([*TINY, "--data_path", images, "--output_dir", str(folder / "run")])


def _official_head_names(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Official DINO's head uses nn.utils.weight_norm (last_layer.weight_g / weight_v) and DDP's `module.`."""
    renames = {"parametrizations.weight.original0": "weight_g", "parametrizations.weight.original1": "weight_v"}
    renamed = {}
    for key, value in state.items():
        for new, old in renames.items():
            key = key.replace(new, old)
        renamed[prefix + key] = value
    return renamed


def official_training_checkpoint(args: argparse.Namespace) -> dict:
    """What official main_dino.py saves after its first epoch of an fp16 run under run_with_submitit, for the model
    `args` builds (and with its flags, so only the file's format differs from this run)."""
    student, teacher = build_student_teacher(vars(args))
    regularized = [p for n, p in student.named_parameters() if not n.endswith(".bias") and p.ndim > 1]
    not_regularized = [p for n, p in student.named_parameters() if n.endswith(".bias") or p.ndim <= 1]
    optimizer = torch.optim.AdamW([{"params": regularized}, {"params": not_regularized, "weight_decay": 0.0}])
    for parameter in student.parameters():
        parameter.grad = torch.zeros_like(parameter)
    for index, group in enumerate(optimizer.param_groups):
        group["lr"] = np.linspace(0, 5e-4, 10)[3]  # official: lr_schedule[it], a numpy float64
        if index == 0:
            group["weight_decay"] = np.float64(0.04)
    optimizer.step()
    official_args = argparse.Namespace(**{**vars(args), "rank": 0, "gpu": 0, "world_size": 1,
                                          "output_dir": pathlib.PosixPath(args.output_dir)})
    return {"student": _official_head_names(student.state_dict(), "module."),
            "teacher": _official_head_names(teacher.state_dict(), ""),
            "optimizer": optimizer.state_dict(), "epoch": 1, "args": official_args,
            "dino_loss": {"center": torch.zeros(1, args.out_dim)},
            "fp16_scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                            "_growth_tracker": 0}}


def save(state: dict, path: str, numpy_version: str = "numpy 2") -> str:
    torch.save(state, path, pickle_module=NUMPY_PICKLES[numpy_version])
    return path


@pytest.fixture
def official(tmp_path, images) -> tuple[argparse.Namespace, dict]:
    args = run_args(tmp_path, images)
    return args, official_training_checkpoint(args)


@pytest.mark.parametrize("numpy_version", NUMPY_PICKLES)
def test_official_training_checkpoint_loads_as_usable_data(official, tmp_path, numpy_version):
    args, state = official
    path = save(state, str(tmp_path / "checkpoint.pth"), numpy_version)
    raw = open(path, "rb").read()
    assert (b"numpy.core.multiarray" in raw) == (numpy_version == "numpy 1")  # the file names what it says
    loaded = load_checkpoint(path, allow_official=True)
    assert vars(loaded["args"])["arch"] == "vit_tiny" and loaded["args"].output_dir == pathlib.Path(args.output_dir)
    assert [group["lr"] for group in loaded["optimizer"]["param_groups"]] == [np.linspace(0, 5e-4, 10)[3]] * 2
    assert loaded["optimizer"]["param_groups"][0]["weight_decay"] == 0.04
    assert loaded["fp16_scaler"]["scale"] == 65536.0 and loaded["epoch"] == 1
    torch.testing.assert_close(loaded["teacher"], state["teacher"])


def test_official_checkpoint_loads_through_eval_hub_and_trunk(official, tmp_path):
    args, state = official
    path = save(state, str(tmp_path / "checkpoint.pth"), "numpy 1")
    expected = {key.removeprefix("backbone."): value for key, value in state["teacher"].items()
                if key.startswith("backbone.")}
    loaded = weights.read_weights(path)
    assert loaded.config["arch"] == "vit_tiny" and loaded.config["patch_size"] == 8
    torch.testing.assert_close(loaded.state_dict, expected)
    hub = torch.hub.load(REPO, "vit_tiny", source="local", weights=path)
    torch.testing.assert_close(hub.state_dict(), expected)
    trunk = sparo_vit.build_backbone("vit_tiny", patch_size=8, img_size=32)
    assert weights.load_pretrained_trunk(trunk, path).missing == []
    torch.testing.assert_close(trunk.state_dict(), expected)


def test_main_dino_resumes_an_official_checkpoint(official, tmp_path, images, capsys):
    args, state = official
    path = save(state, str(tmp_path / "official.pth"), "numpy 1")
    with pytest.warns(UserWarning, match="official DINO checkpoint: its optimizer and scaler states are not"):
        code = main_dino.main([*TINY, "--data_path", images, "--output_dir", args.output_dir, "--epochs", "2",
                               "--resume", path])
    out = capsys.readouterr().out
    assert code == 0 and f"resumed from {path}: 1 epochs done, iteration 0" in out
    assert torch.load(os.path.join(args.output_dir, "checkpoint.pth"), weights_only=True)["epoch"] == 2


def test_official_linear_checkpoint_loads_its_head(tmp_path):
    """eval_linear.py's checkpoint.pth.tar: DDP head, SGD + cosine schedule states, Python float best_acc."""
    head = linear_probe.LinearClassifier(192, 3)
    optimizer = torch.optim.SGD(head.parameters(), lr=1e-3 * 1024 / 256.0, momentum=0.9, weight_decay=0)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 100, eta_min=0)
    optimizer.step()
    scheduler.step()
    path = save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in head.state_dict().items()},
                 "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "best_acc": 71.5},
                str(tmp_path / "checkpoint.pth.tar"))
    loaded = linear_probe.LinearClassifier(192, 3)
    linear_probe.load_head(path, loaded, {"kind": "cls", "num_classes": 3, "dim": 192})
    torch.testing.assert_close(loaded.state_dict(), head.state_dict())


def test_own_checkpoints_refuse_official_objects_with_a_hint(tmp_path):
    """This run's own checkpoint.pth must be plain data; a Namespace there is named, with how to load it."""
    path = str(tmp_path / "checkpoint.pth")
    torch.save({"args": argparse.Namespace(arch="vit_small"), "epoch": 1}, path)
    message = raised(load_checkpoint, path)
    assert "argparse.Namespace" in message and "--resume" in message and "\n" not in message


# --- the allow-list is scoped to the load, on every supported torch ------------------------------------------

def _namespace_file(tmp_path) -> str:
    return save({"args": argparse.Namespace(arch="vit_tiny"), "lr": np.float64(0.5)}, str(tmp_path / "ns.pth"))


def _assert_scoped(path: str, before: list) -> None:
    assert load_checkpoint(path, allow_official=True)["args"].arch == "vit_tiny"
    assert set(torch.serialization.get_safe_globals()) == set(before)
    with pytest.raises(pickle.UnpicklingError):  # a plain weights_only load elsewhere stays strict
        torch.load(path, weights_only=True)


def test_allow_list_does_not_leak_into_other_loads(tmp_path):
    _assert_scoped(_namespace_file(tmp_path), torch.serialization.get_safe_globals())


def test_torch_2_4_without_the_context_manager_restores_the_list(tmp_path, monkeypatch):
    """torch 2.4 has add_safe_globals but no safe_globals context manager: the list is put back by hand."""
    monkeypatch.delattr(torch.serialization, "safe_globals")
    existing = [types.SimpleNamespace]  # someone else's process-wide entry stays
    torch.serialization.add_safe_globals(existing)
    try:
        _assert_scoped(_namespace_file(tmp_path), torch.serialization.get_safe_globals())
        assert types.SimpleNamespace in torch.serialization.get_safe_globals()
    finally:
        torch.serialization.clear_safe_globals()


def test_before_torch_2_6_globals_are_matched_by_their_own_names(official, tmp_path, monkeypatch):
    """torch < 2.6 takes no (object, name) pairs: a numpy-2 file loads, a numpy-1 one fails with one line."""
    _, state = official
    monkeypatch.setattr(torch, "__version__", torch.torch_version.TorchVersion("2.5.1"))
    assert load_checkpoint(save(state, str(tmp_path / "new.pth")), allow_official=True)["epoch"] == 1
    old = save(state, str(tmp_path / "old.pth"), "numpy 1")
    message = raised(load_checkpoint, old, allow_official=True)
    assert "numpy.core.multiarray.scalar" in message and "torch >= 2.6" in message and old in message
    assert "\n" not in message
