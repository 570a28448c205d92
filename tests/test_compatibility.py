"""A checkpoint written by the previous release (67e4f2f, before sparo_dino/ moved into folders and the read-outs
into a registry) loads, evaluates and resumes with today's code. tests/fixtures/make_release_checkpoint.py wrote
it with that release's main_dino.py (the large tensors' values replaced by a pattern, so the file is small)."""
from __future__ import annotations

import json
import lzma
import os
from pathlib import Path

import pytest
import torch
from test_train import run

import eval_knn
import hubconf
from sparo_dino.io import weights

RELEASE = Path(__file__).resolve().parent / "fixtures" / "release_67e4f2f_checkpoint.pth.xz"
ARCH = ["--arch", "vit_tiny_sparo", "--num_slots", "4", "--slot_dim", "8", "--attn_dim", "8", "--group_size", "2"]


@pytest.fixture(scope="module")
def release_checkpoint(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("release") / "checkpoint.pth"
    path.write_bytes(lzma.decompress(RELEASE.read_bytes()))
    return str(path)


def test_a_release_checkpoint_loads_evaluates_and_resumes(release_checkpoint, images, image_folder, tmp_path,
                                                          capsys) -> None:
    state = torch.load(release_checkpoint, map_location="cpu", weights_only=True)
    assert (state["epoch"], state["iteration"], state["config"]["arch"]) == (1, 0, "vit_tiny_sparo")

    backbone = hubconf.vit_tiny_sparo(weights=release_checkpoint)  # the strict load every evaluation does
    for key, value in backbone.state_dict().items():
        assert torch.equal(value, state["teacher"][f"backbone.{key}"]), key
    assert weights.resolve_model_options({}, weights.read_weights(release_checkpoint).config) == {
        "arch": "vit_tiny_sparo", "patch_size": 8, "img_size": 32, "pos_embed_interpolation": "dino",
        "num_slots": 4, "slot_dim": 8, "attn_dim": 8, "group_size": 2, "slot_norm": False}
    knn = eval_knn.main(["--pretrained_weights", release_checkpoint, "--data_path", image_folder, "--resize_size",
                         "32", "--crop_size", "32", "--num_workers", "0", "--batch_size_per_gpu", "8", "--nb_knn", "5",
                         "--per_slot", "--output_dir", str(tmp_path / "eval")])
    assert knn["meta"]["kind"] == "sparo_encoding" and len(knn["per_slot"]["top1"]) == 4

    output = str(tmp_path / "resumed")
    resumed = run(images, output, *ARCH, "--epochs", "2", "--resume", release_checkpoint, capsys=capsys)
    assert resumed.code == 0
    assert f"resumed from {release_checkpoint}: 1 epochs done, iteration 0" in resumed.out
    after = torch.load(os.path.join(output, "checkpoint.pth"), map_location="cpu", weights_only=True)
    assert after["epoch"] == 2 and after["config"].keys() >= state["config"].keys()
    assert not torch.equal(after["student"]["backbone.sparo.query"], state["student"]["backbone.sparo.query"])
    with open(os.path.join(output, "log.txt")) as handle:
        assert [json.loads(line)["epoch"] for line in handle] == [1]
