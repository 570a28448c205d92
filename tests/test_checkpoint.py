"""Checkpoint files: atomic writes, weights_only loading, one-line errors for bad files, RNG round trips."""
from __future__ import annotations

import argparse
import os
import pickle
import random
import warnings

import numpy as np
import pytest
import torch

from sparo_dino.io.checkpoint import (
    CheckpointError,
    capture_rng_state,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)


def _state() -> dict:
    return {"student": {"w": torch.arange(6.0).view(2, 3)}, "epoch": 3, "iteration": 0,
            "config": {"arch": "vit_tiny", "global_crops_scale": [0.4, 1.0], "resume": None}}


def test_round_trip_is_weights_only_loadable(tmp_path) -> None:
    path = str(tmp_path / "checkpoint.pth")
    save_checkpoint(_state(), path)
    raw = torch.load(path, weights_only=True)
    assert raw["epoch"] == 3 and raw["config"]["arch"] == "vit_tiny"
    loaded = load_checkpoint(path)
    torch.testing.assert_close(loaded["student"]["w"], torch.arange(6.0).view(2, 3))
    assert os.listdir(tmp_path) == ["checkpoint.pth"]


def test_failed_write_keeps_previous_checkpoint(tmp_path) -> None:
    path = str(tmp_path / "checkpoint.pth")
    save_checkpoint(_state(), path)
    before = open(path, "rb").read()
    with pytest.raises(Exception):
        save_checkpoint({"bad": lambda: None}, path)  # lambdas cannot be pickled: the write fails midway
    assert open(path, "rb").read() == before
    assert os.listdir(tmp_path) == ["checkpoint.pth"]


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_files_give_one_line_error(tmp_path, damage: str) -> None:
    path = str(tmp_path / "checkpoint.pth")
    save_checkpoint(_state(), path)
    data = open(path, "rb").read()
    with open(path, "wb") as handle:
        handle.write({"garbage": b"not a checkpoint" * 10, "truncated": data[: len(data) // 2], "empty": b""}[damage])
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert path in message and "\n" not in message and "corrupt" in message


def test_missing_file(tmp_path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(str(tmp_path / "nope.pth"))


def test_pickled_namespace_needs_explicit_permission(tmp_path) -> None:
    """Official DINO's Namespace loads only from a file the user named, through the allow-list: no unpickling of
    arbitrary objects, so nothing to warn about."""
    path = str(tmp_path / "official.pth")
    torch.save({"args": argparse.Namespace(arch="vit_small"), "epoch": 1}, path)
    with pytest.raises(CheckpointError, match=r"pickled Python objects \(argparse.Namespace"):
        load_checkpoint(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        state = load_checkpoint(path, allow_official=True)
    assert state["args"].arch == "vit_small"


def test_non_dict_checkpoint_is_rejected(tmp_path) -> None:
    path = str(tmp_path / "tensor.pth")
    torch.save(torch.zeros(3), path)
    with pytest.raises(CheckpointError, match="expected a dict"):
        load_checkpoint(path)


def _draw() -> tuple:
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), np.random.randn(), [random.random() for _ in range(3)]


def test_rng_state_round_trip_through_a_file(tmp_path) -> None:
    torch.manual_seed(5)
    np.random.seed(5)
    random.seed(5)
    np.random.randn()  # leaves a cached Gaussian in numpy's state
    random.gauss(0, 1)  # and in Python's
    rng = capture_rng_state(torch.device("cpu"))
    expected = _draw()
    path = str(tmp_path / "rng.pth")
    save_checkpoint({"rng": rng}, path)
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    assert restore_rng_state(torch.load(path, weights_only=True)["rng"], rank=0, device=torch.device("cpu"))
    assert _draw() == expected


def test_rng_state_of_a_missing_rank_is_reported() -> None:
    rng = capture_rng_state(torch.device("cpu"))
    assert not restore_rng_state(rng, rank=1, device=torch.device("cpu"))


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_plain_pickle_is_named_as_such_not_corrupt(tmp_path, protocol: int) -> None:
    """Before: "corrupt or truncated (Unsupported operand 149)" for a file pickle.dump wrote intact, and torch's
    warning about pickle protocols on stderr."""
    path = str(tmp_path / "weights.pkl")
    with open(path, "wb") as handle:
        pickle.dump({"student": {"w": [1.0, 2.0]}, "epoch": 3}, handle, protocol=protocol)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(path)
    assert str(info.value) == (f"{path} is a plain Python pickle, not a checkpoint this tool loads (it reads files "
                               "written by torch.save)")

