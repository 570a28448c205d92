"""main_dino.py --pretrained_trunk: a fresh run whose student and teacher trunks come from a pretrained ViT file,
whatever format it was written in, with the read-out and the DINO head fresh; --freeze_trunk_epochs; the choice
recorded in the config and the provenance and checked when the run is resumed.

The reference trunks are timm's own ViT (built by timm.create_model, not by this repository) and a checkpoint laid
out as official DINO's main_dino.py saves it (tests/test_untrusted_checkpoints.py)."""
from __future__ import annotations

import json
import os

import pytest
import timm
import torch
import yaml
from safetensors.torch import save_file
from test_untrusted_checkpoints import official_training_checkpoint, save

import main_dino
import sparo_vit
from sparo_dino.cli.train_flags import parse_train_args
from sparo_dino.io.provenance import file_sha256
from sparo_dino.io.weights import load_pretrained_trunk, read_weights
from sparo_dino.train.optim import ema_update_

# vit_tiny_sparo/8 on 32 px globals: 16 images, 4 per step, 4 steps per epoch.
TINY_SPARO = ["--arch", "vit_tiny_sparo", "--patch_size", "8", "--img_size", "32", "--global_crop_size", "32",
              "--local_crop_size", "16", "--local_crops_number", "2", "--out_dim", "64", "--batch_size_per_gpu", "4",
              "--warmup_epochs", "0", "--num_workers", "0", "--print_freq", "4", "--num_slots", "8", "--slot_dim", "8",
              "--attn_dim", "8"]
NO_LEARNING = ("--lr", "0", "--min_lr", "0")  # the cosine ends at --min_lr: 0 too, or the last steps still learn
KEPT_BLOCKS = 11  # vit_tiny has 12; SPARO replaces the last


def timm_vit(**overrides) -> torch.nn.Module:
    """timm's ViT-Tiny/8 at 32 px: the trunk a user brings, built by timm itself (with its ImageNet classifier)."""
    torch.manual_seed(1)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **{"patch_size": 8, "img_size": 32,
                                                                         "num_classes": 10, **overrides})


def trunk_of(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The entries a SPARO backbone takes from a 12-block ViT: all but block 11, the classifier and the read-out."""
    return {key: value for key, value in state.items()
            if not key.startswith(("head.", f"blocks.{KEPT_BLOCKS}.")) and key.split(".")[0] != "sparo"}


def train(images: str, output: str, *extra: str, capsys=None) -> tuple[int, str]:
    code = main_dino.main([*TINY_SPARO, "--data_path", images, "--output_dir", output, *extra])
    return code, capsys.readouterr().out if capsys is not None else ""


def backbone_of(checkpoint: str, network: str) -> dict[str, torch.Tensor]:
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)[network]
    return {key.removeprefix("backbone."): value for key, value in state.items() if key.startswith("backbone.")}


def assert_equal_tensors(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    different = [key for key in expected if not torch.equal(actual[key], expected[key])]
    assert not different, f"not bit-for-bit the file's: {different[:5]}"


def test_a_timm_hub_download_is_a_plain_state_dict(tmp_path) -> None:
    """timm's Hub folders also hold model.safetensors beside a config.json (of timm's archs): the file still loads."""
    source = timm_vit()
    save_file({key: value.contiguous() for key, value in source.state_dict().items()},
              str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "vit_tiny_patch16_224", "num_classes": 10}))
    model = sparo_vit.build_backbone("vit_tiny_sparo", patch_size=8, img_size=32, num_slots=8, slot_dim=8)
    loaded = load_pretrained_trunk(model, str(tmp_path / "model.safetensors"))
    assert loaded.missing == ["sparo.key.bias", "sparo.key.weight", "sparo.proj.bias", "sparo.proj.weight",
                              "sparo.query"]
    assert torch.equal(model.blocks[3].mlp.fc1.weight, source.blocks[3].mlp.fc1.weight)
    assert read_weights(str(tmp_path / "model.safetensors")).config is None  # not mistaken for an export's config


@pytest.fixture
def timm_file(tmp_path) -> tuple[str, dict[str, torch.Tensor]]:
    state = {key: value.contiguous() for key, value in timm_vit().state_dict().items()}
    path = str(tmp_path / "vit_tiny_timm.safetensors")
    save_file(state, path)
    return path, state


def test_with_lr_0_the_teachers_trunk_after_training_is_the_files(images, timm_file, tmp_path, capsys) -> None:
    path, state = timm_file
    out = str(tmp_path / "run")
    code, printed = train(images, out, "--epochs", "1", *NO_LEARNING, "--pretrained_trunk", path, capsys=capsys)
    assert code == 0
    checkpoint = os.path.join(out, "checkpoint.pth")
    teacher, student = backbone_of(checkpoint, "teacher"), backbone_of(checkpoint, "student")
    expected = trunk_of(state)
    assert_equal_tensors({k: v for k, v in teacher.items() if not k.startswith("sparo.")}, expected)
    assert_equal_tensors({k: v for k, v in student.items() if not k.startswith("sparo.")}, expected)
    # the read-out starts from the run's own init, the same in student and teacher
    assert sorted(k for k in teacher if k.startswith("sparo.")) == [
        "sparo.key.bias", "sparo.key.weight", "sparo.proj.bias", "sparo.proj.weight", "sparo.query"]
    summary = [line for line in printed.splitlines() if line.startswith("pretrained trunk")]
    assert summary == [f"pretrained trunk {path}: {11 * 12 + 6} tensors loaded; not loaded: blocks.11.* (12): the "
                       "block the sparo read-out replaces, head.* (2); missing (fresh init): sparo.* (5); the DINO "
                       "head starts fresh"]
    # recorded: the flag in the config, the file's digest in the provenance
    with open(os.path.join(out, "config.yaml")) as handle:
        assert yaml.safe_load(handle)["pretrained_trunk"] == path
    with open(os.path.join(out, "provenance.jsonl")) as handle:
        record = json.loads(handle.readline())["pretrained_trunk"]
    assert record["sha256"] == file_sha256(path) and record["loaded"] == 11 * 12 + 6


def test_the_ema_of_a_teacher_equal_to_its_student_is_exact() -> None:
    """Why the trunk above stays bit for bit: teacher + (1 - m)(student - teacher) adds exactly 0."""
    torch.manual_seed(0)
    student = [torch.randn(1000), torch.randn(30, 30)]
    teacher = [tensor.clone() for tensor in student]
    for momentum in (0.996, 0.99, 0.9995):
        ema_update_(teacher, student, momentum)
    assert all(torch.equal(t, s) for t, s in zip(teacher, student))


def test_an_official_dino_checkpoint_gives_the_trunk(images, tmp_path, capsys) -> None:
    """The full training checkpoint official main_dino.py writes (its teacher, weight_g/weight_v head names, argparse
    Namespace, numpy scalars) and its published backbone-only state dict."""
    official_args = parse_train_args(["--arch", "vit_tiny", "--patch_size", "8", "--img_size", "32", "--out_dim", "64",
                                      "--data_path", images, "--output_dir", str(tmp_path / "official")])
    state = official_training_checkpoint(official_args)
    teacher = {key.removeprefix("backbone."): value for key, value in state["teacher"].items()
               if key.startswith("backbone.")}
    full = save(state, str(tmp_path / "checkpoint.pth"), "numpy 1")
    hub = str(tmp_path / "dino_deitsmall8_pretrain.pth")
    torch.save(teacher, hub)
    for path in (full, hub):
        out = str(tmp_path / f"run_{os.path.basename(path)}")
        code, printed = train(images, out, "--epochs", "1", *NO_LEARNING, "--pretrained_trunk", path, capsys=capsys)
        assert code == 0, printed
        loaded = backbone_of(os.path.join(out, "checkpoint.pth"), "teacher")
        assert_equal_tensors({k: v for k, v in loaded.items() if not k.startswith("sparo.")}, trunk_of(teacher))


def test_freeze_trunk_epochs_trains_only_the_readout_and_head_first(images, timm_file, tmp_path) -> None:
    path, state = timm_file
    out = str(tmp_path / "run")
    code, _ = train(images, out, "--epochs", "2", "--lr", "0.01", "--freeze_last_layer", "0", "--saveckp_freq", "1",
                    "--pretrained_trunk", path, "--freeze_trunk_epochs", "1")
    assert code == 0
    after_first = backbone_of(os.path.join(out, "checkpoint0000.pth"), "student")
    after_second = backbone_of(os.path.join(out, "checkpoint0001.pth"), "student")
    expected = trunk_of(state)
    assert_equal_tensors({k: v for k, v in after_first.items() if k in expected}, expected)
    assert not torch.equal(after_first["sparo.query"], after_second["sparo.query"])  # the read-out learns
    assert not torch.equal(after_second["blocks.0.attn.qkv.weight"], expected["blocks.0.attn.qkv.weight"])


def test_a_file_of_another_width_or_depth_is_one_line(images, tmp_path, capsys) -> None:
    for name, model in {"small": timm.create_model("vit_small_patch16_224", pretrained=False, patch_size=8,
                                                   img_size=32),
                        "shallow": timm_vit(depth=6)}.items():
        path = str(tmp_path / f"{name}.pth")
        torch.save(model.state_dict(), path)
        code = main_dino.main([*TINY_SPARO, "--data_path", images, "--output_dir", str(tmp_path / name), "--epochs",
                               "1", "--pretrained_trunk", path])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 1
        size = "width 384 and depth 12" if name == "small" else "width 192 and depth 6"
        assert err == [f"error: --pretrained_trunk: {path} holds a ViT of {size}; this backbone has width 192 and "
                       "depth 12 (pick the --arch of the file's size)"]
        assert not os.path.exists(os.path.join(tmp_path, name, "checkpoint.pth"))


def test_the_choice_is_checked_on_resume(images, timm_file, tmp_path, capsys) -> None:
    path, _ = timm_file
    out = str(tmp_path / "run")
    assert train(images, out, "--epochs", "1", "--pretrained_trunk", path)[0] == 0
    other = str(tmp_path / "other.safetensors")
    os.link(path, other)
    capsys.readouterr()
    code, _ = train(images, out, "--epochs", "2", "--resume_overrides", "epochs", "--pretrained_trunk", other)
    assert code == 1
    assert f"pretrained_trunk='{path}' (this run: '{other}')" in capsys.readouterr().err
    code, _ = train(images, out, "--epochs", "2", "--resume_overrides", "epochs")
    assert code == 1
    assert f"pretrained_trunk='{path}' (this run: None)" in capsys.readouterr().err
    # the same command continues from the checkpoint without reading the trunk again
    os.remove(path)
    code, printed = train(images, out, "--epochs", "2", "--resume_overrides", "epochs", "--pretrained_trunk", path,
                          capsys=capsys)
    assert code == 0 and "pretrained trunk" not in printed and "resumed from" in printed


@pytest.mark.parametrize("flags, message", [
    (["--freeze_trunk_epochs", "1"], "--freeze_trunk_epochs needs --pretrained_trunk"),
    (["--pretrained_trunk", "t.pth", "--resume", "c.pth"], "--pretrained_trunk starts a run from a trunk"),
    (["--pretrained_trunk", "t.pth", "--freeze_trunk_epochs", "5", "--epochs", "2"], "cannot exceed --epochs 2"),
])
def test_inconsistent_flags_are_refused(images, tmp_path, capsys, flags, message) -> None:
    with pytest.raises(SystemExit):
        parse_train_args([*TINY_SPARO, "--data_path", images, "--output_dir", str(tmp_path), *flags])
    assert message in capsys.readouterr().err


def test_a_missing_trunk_file_is_one_line(images, tmp_path, capsys) -> None:
    code, _ = train(images, str(tmp_path / "run"), "--pretrained_trunk", str(tmp_path / "nothing.pth"))
    assert code == 1
    assert capsys.readouterr().err.strip() == f"error: pretrained weights not found: {tmp_path / 'nothing.pth'}"
