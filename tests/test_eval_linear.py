"""eval_linear.py end to end on generated images: both protocols learn, outputs are labelled, resume is exact."""
from __future__ import annotations

import json
import os
import re

import pytest
import torch

import eval_linear
from sparo_dino import linear_probe
from test_eval_knn import SMALL_IMAGES, write_checkpoint
from test_features import SPARO_TINY

SUMMARY = re.compile(r"^Linear probe result \[(.+)\]: Top1: ([\d.]+), Top5: ([\d.]+), best Top1: ([\d.]+)", re.M)
BASELINE = {"arch": "vit_tiny", "patch_size": 8, "img_size": 32}


def test_fast_mode_on_sparo_encoding_learns_and_says_it_is_fast(image_folder, tmp_path, capsys):
    checkpoint = write_checkpoint(tmp_path / "run", SPARO_TINY)
    results = eval_linear.main(["--pretrained_weights", checkpoint, "--data_path", image_folder, *SMALL_IMAGES,
                                "--fast", "--epochs", "20", "--lr", "25"])
    protocol, top1, _, _ = SUMMARY.search(capsys.readouterr().out).groups()
    assert protocol.startswith("FAST MODE") and "no augmentation" in protocol
    assert float(top1) >= 90.0
    folder = tmp_path / "run" / "linear_fast_checkpoint_teacher"
    saved = json.loads((folder / "results_linear.json").read_text())
    assert saved["run"]["protocol"] == "fast" and saved["run"]["kind"] == "sparo_encoding"
    assert saved["run"]["dim"] == 4 * 16 and saved["final"]["top1"] == results["final"]["top1"]
    log = [json.loads(line) for line in (folder / "log_linear.txt").read_text().splitlines()]
    assert [record["epoch"] for record in log] == list(range(20))
    assert log[0]["lr"] == pytest.approx(25 * 8 / 256)  # lr scaled by batch / 256, cosine from there
    assert log[-1]["lr"] < log[0]["lr"] / 50


def test_official_protocol_on_baseline_uses_last_four_cls_tokens(image_folder, tmp_path, capsys):
    checkpoint = write_checkpoint(tmp_path / "base", BASELINE)
    results = eval_linear.main(["--pretrained_weights", checkpoint, "--data_path", image_folder, *SMALL_IMAGES,
                                "--epochs", "4", "--lr", "25", "--output_dir", str(tmp_path / "probe")])
    protocol, top1, top5, _ = SUMMARY.search(capsys.readouterr().out).groups()
    assert protocol == "official protocol"
    assert results["run"]["kind"] == "cls_last4" and results["run"]["dim"] == 4 * 192
    assert float(top1) >= 80.0 and float(top5) == 100.0
    state = torch.load(tmp_path / "probe" / "checkpoint_linear.pth", weights_only=True)
    assert state["epoch"] == 4


def test_fast_mode_resumes_exactly_after_an_interruption(image_folder, tmp_path, monkeypatch):
    checkpoint = write_checkpoint(tmp_path / "run", SPARO_TINY)
    cache = str(tmp_path / "cache")
    flags = ["--fast", "--epochs", "4", "--lr", "1", "--batch_size_per_gpu", "8"]
    whole = eval_linear.main(["--pretrained_weights", checkpoint, "--data_path", image_folder, *SMALL_IMAGES,
                              "--dump_features", cache, *flags, "--output_dir", str(tmp_path / "whole")])

    real_train_epoch, calls = linear_probe.train_epoch, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # killed during the third epoch
        return real_train_epoch(*args, **kwargs)

    monkeypatch.setattr(linear_probe, "train_epoch", interrupted)
    resumed_dir = str(tmp_path / "resumed")
    with pytest.raises(KeyboardInterrupt):
        eval_linear.main(["--load_features", cache, *flags, "--output_dir", resumed_dir])
    monkeypatch.setattr(linear_probe, "train_epoch", real_train_epoch)
    resumed = eval_linear.main(["--load_features", cache, *flags, "--output_dir", resumed_dir])
    assert resumed["final"] == whole["final"] and resumed["best"] == whole["best"]
    whole_state = torch.load(tmp_path / "whole" / "checkpoint_linear.pth", weights_only=True)["classifier"]
    resumed_state = torch.load(os.path.join(resumed_dir, "checkpoint_linear.pth"), weights_only=True)["classifier"]
    for key in whole_state:
        assert torch.equal(whole_state[key], resumed_state[key])
    with pytest.raises(ValueError, match="belongs to another linear probe"):
        eval_linear.main(["--load_features", cache, *flags[:-2], "--batch_size_per_gpu", "4",
                          "--output_dir", resumed_dir])


def test_flags_that_do_not_apply_are_errors(image_folder, tmp_path):
    checkpoint = write_checkpoint(tmp_path / "run", SPARO_TINY)
    common = ["--pretrained_weights", checkpoint, "--data_path", image_folder, *SMALL_IMAGES, "--epochs", "1"]
    with pytest.raises(ValueError, match="--n_last_blocks/--avgpool_patchtokens apply to baseline archs"):
        eval_linear.main([*common, "--n_last_blocks", "4"])
    with pytest.raises(ValueError, match="need --fast"):
        eval_linear.main([*common, "--dump_features", str(tmp_path / "cache")])
