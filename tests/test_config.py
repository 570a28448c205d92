"""Training flags: official names and defaults, YAML configs, validation errors, shipped recipes."""
from __future__ import annotations

import dataclasses
import glob
import importlib
import os

import pytest
import torch
import yaml
from test_official_compat import OFFICIAL_MAIN_DINO

import sparo_vit
from sparo_dino.cli.train_flags import get_args_parser, parse_train_args
from sparo_dino.run_config import RunConfig, args_to_dict
from sparo_dino.train.step import resolve_precision
from sparo_vit import READOUT_OPTIONS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.yaml")))

def _parse(*argv: str):
    return parse_train_args(["--data_path", "/data", *argv])


def test_use_fp16_counts_only_when_given() -> None:
    args = _parse()
    assert args.use_fp16 is None and args.precision == "auto"


def test_local_rank_spellings_and_official_bool_flags() -> None:
    assert _parse("--local-rank", "3").local_rank == 3
    assert _parse("--local_rank", "2").local_rank == 2
    args = _parse("--norm_last_layer", "false", "--use_fp16", "true")
    assert args.norm_last_layer is False and args.use_fp16 is True


def test_precision_resolution() -> None:
    cpu = torch.device("cpu")
    assert resolve_precision("auto", None, cpu) == "fp32"
    assert resolve_precision("bf16", None, cpu) == "bf16"
    assert resolve_precision("auto", True, cpu) == "fp16"
    assert resolve_precision("fp32", False, cpu) == "fp32"
    with pytest.raises(ValueError, match="contradicts"):
        resolve_precision("bf16", True, cpu)


def fake_gpu(monkeypatch, native: bool, emulated: bool, capability: tuple[int, int]) -> None:
    """A GPU as torch.cuda describes it: V100 = bf16 emulated only (capability 7.0), A100/H100 = native (8.0+)."""
    def is_bf16_supported(including_emulation: bool = True) -> bool:
        return native or (including_emulation and emulated)

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)


@pytest.mark.parametrize("native, capability, expected", [(False, (7, 0), "fp16"), (True, (9, 0), "bf16")],
                         ids=["V100-emulated-bf16", "H100"])
def test_auto_precision_picks_bf16_only_where_the_gpu_has_it(monkeypatch, native, capability, expected) -> None:
    fake_gpu(monkeypatch, native=native, emulated=True, capability=capability)
    assert resolve_precision("auto", None, torch.device("cuda", 0)) == expected
    assert resolve_precision("bf16", None, torch.device("cuda", 0)) == "bf16"  # asked for: honoured


def test_auto_precision_without_the_emulation_keyword_reads_the_capability(monkeypatch) -> None:
    """torch versions whose is_bf16_supported has no including_emulation keyword."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    assert resolve_precision("auto", None, torch.device("cuda", 0)) == "fp16"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert resolve_precision("auto", None, torch.device("cuda", 0)) == "bf16"


@pytest.mark.parametrize("argv, message", [
    (["--arch", "vit_small", "--num_slots", "32"], "--num_slots does not apply to the cls read-out of vit_small"),
    (["--global_crop_size", "30", "--patch_size", "8"], "--global_crop_size 30 is not divisible"),
    (["--use_fp16", "true", "--precision", "bf16"], "contradicts --precision bf16"),
    (["--global_crops_scale", "0.4"], "--global_crops_scale must be two numbers"),
    (["--warmup_epochs", "20", "--epochs", "10"], "cannot exceed --epochs 10"),
    (["--arch", "vit_huge"], "invalid choice: 'vit_huge'"),
    (["--dist_url", "tcp://host:1234"], "not supported"),
    (["--final_momentum_teacher", "1.5"], "--final_momentum_teacher must be in [0, 1], got 1.5"),
    # issue 31: tracebacks (ValueError from the model, ZeroDivisionError) or silent acceptance before
    (["--arch", "vit_tiny_sparo", "--num_slots", "0"], "--num_slots must be >= 1, got 0"),
    (["--arch", "vit_tiny_sparo", "--attn_dim", "-4"], "--attn_dim must be >= 1, got -4"),
    (["--arch", "vit_tiny_mhca", "--slot_dim", "0"], "--slot_dim must be >= 1, got 0"),
    (["--arch", "vit_tiny_sparo", "--num_slots", "10", "--group_size", "4"],
     "--num_slots 10 must be a multiple of --group_size 4"),
    (["--patch_size", "0"], "--patch_size must be >= 1, got 0"),
    (["--drop_path_rate", "2"], "--drop_path_rate must be < 1"),
    (["--drop_path_rate", "-0.1"], "--drop_path_rate must be >= 0, got -0.1"),
    (["--lr", "-0.001"], "--lr must be >= 0, got -0.001"),
    (["--teacher_temp", "0"], "--teacher_temp must be > 0, got 0"),
    (["--warmup_teacher_temp", "-0.04"], "--warmup_teacher_temp must be > 0, got -0.04"),
    (["--weight_decay", "-1"], "--weight_decay must be >= 0, got -1"),
    (["--train_subset", "0"], "--train_subset must be >= 1, got 0"),
])
def test_bad_flags_fail_with_one_line(argv, message, capsys) -> None:
    with pytest.raises(SystemExit):
        _parse(*argv)
    error_lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(error_lines) == 1 and message in error_lines[0]


# Every command-line entry point, as "module:function" taking argv.
ENTRY_POINTS = ["main_dino:main", "eval_knn:main", "eval_linear:main", "plot_logs:main", "visualize_slots:main",
                "visualize_attention:main", "launch.submit:submit", "experiments.demo:main",
                "experiments.reproduce:main", "experiments.demo_search:main"]


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_argparse_errors_are_one_line_that_says_where_to_look(entry: str, capsys) -> None:
    """Before: argparse's usage block of every flag (46 lines for main_dino.py), then the error."""
    module, function = entry.split(":")
    with pytest.raises(SystemExit) as info:
        getattr(importlib.import_module(module), function)(["--no_such_flag", "1"])
    assert info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "error: " in lines[0] and lines[0].endswith("--help)"), lines


def test_bad_value_is_one_line_not_the_usage_block(capsys) -> None:
    with pytest.raises(SystemExit):
        _parse("--arch", "vit_huge")
    assert capsys.readouterr().err == ("main_dino.py: error: argument --arch: invalid choice: 'vit_huge' (choose from "
                                       f"{', '.join(map(repr, sparo_vit.ARCHS))}) (see main_dino.py --help)\n")


@pytest.mark.parametrize("argv, message", [
    (["--freeze_last_layer", "5", "--epochs", "3", "--warmup_epochs", "0"],
     "--freeze_last_layer 5 exceeds --epochs 3: the head's last layer is never trained"),
    (["--local_crop_size", "256"], "--local_crop_size 256 is larger than --global_crop_size 224"),
])
def test_legal_but_surprising_flags_warn_in_one_line(argv, message, capsys) -> None:
    _parse(*argv)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: ") and message in lines[0], lines


def test_no_warning_for_the_default_recipe(capsys) -> None:
    _parse()
    assert capsys.readouterr().err == ""


def test_imagefolder_needs_data_path_and_fashion_mnist_has_a_default(capsys) -> None:
    with pytest.raises(SystemExit):
        parse_train_args([])
    assert "--data_path is required" in capsys.readouterr().err
    assert parse_train_args(["--dataset", "fashion_mnist"]).data_path == "/usr/share/datasets/fashion-mnist"


def test_yaml_sets_flags_and_cli_overrides(tmp_path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("arch: vit_tiny_sparo\nnum_slots: 16\nepochs: 7\nlocal_crops_scale: [0.1, 0.3]\n")
    args = _parse("--config", str(config), "--epochs", "12")
    assert (args.arch, args.num_slots, args.epochs, args.local_crops_scale) == ("vit_tiny_sparo", 16, 12, [0.1, 0.3])


def test_unknown_yaml_key_names_it_and_the_valid_keys(tmp_path) -> None:
    config = tmp_path / "typo.yaml"
    config.write_text("arch: vit_tiny\nteacher_tmp: 0.07\n")
    with pytest.raises(SystemExit) as info:
        _parse("--config", str(config))
    message = str(info.value)
    assert "teacher_tmp" in message and "teacher_temp" in message and "warmup_teacher_temp" in message


def test_bad_yaml_value_is_an_error(tmp_path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("optimizer: adam\n")
    with pytest.raises(SystemExit, match="optimizer"):
        _parse("--config", str(config))


def test_yaml_scalar_for_a_list_flag_is_the_command_lines_one_line(tmp_path, capsys) -> None:
    """Before: `global_crops_scale: 0.4` in YAML was a TypeError traceback, `--global_crops_scale 0.4` one line."""
    config = tmp_path / "scale.yaml"
    config.write_text("global_crops_scale: 0.4\n")
    for argv in (["--config", str(config)], ["--global_crops_scale", "0.4"]):
        with pytest.raises(SystemExit):
            _parse(*argv)
        lines = capsys.readouterr().err.splitlines()
        assert len(lines) == 1 and "--global_crops_scale must be two numbers 0 < min <= max <= 1, got 0.4" in lines[0]
    config.write_text("resume_overrides: epochs\n")
    assert _parse("--config", str(config)).resume_overrides == ["epochs"]


@pytest.mark.parametrize("text, message", [
    ("batch_size_per_gpu: 16.5\n", "expected an integer, got float 16.5"),  # before: silently 16
    ("epochs: true\n", "expected an integer, got bool True"),
    ("lr: [0.1]\n", "bad value [0.1] for key lr"),
    ("norm_last_layer: 1\n", "bad value 1 for key norm_last_layer"),
])
def test_yaml_values_must_have_the_flags_type(tmp_path, text, message) -> None:
    config = tmp_path / "typed.yaml"
    config.write_text(text)
    with pytest.raises(SystemExit) as info:
        _parse("--config", str(config))
    assert message in str(info.value) and str(config) in str(info.value)


def test_yaml_numbers_convert_as_the_command_line_does(tmp_path) -> None:
    config = tmp_path / "numbers.yaml"
    config.write_text("lr: 1\nmin_lr: 1e-6\nbatch_size_per_gpu: '16'\n")  # PyYAML reads 1e-6 as text
    args = _parse("--config", str(config))
    assert (args.lr, args.min_lr, args.batch_size_per_gpu) == (1.0, 1e-6, 16)
    assert isinstance(args.lr, float)


def test_arch_from_the_command_line_drops_the_configs_readout_options_with_one_line(tmp_path, capsys) -> None:
    """Before: `--config fmnist_vit_tiny_sparo.yaml --arch vit_tiny` dropped SPARO's options without a word (and
    non-default ones were blamed on flags the user never typed)."""
    args = _parse("--config", os.path.join(REPO, "configs", "fmnist_vit_tiny_sparo.yaml"), "--arch", "vit_tiny")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: --arch vit_tiny overrides") and \
        "num_slots, slot_dim, attn_dim, group_size do not apply to vit_tiny and are ignored" in lines[0]
    assert args.arch == "vit_tiny"
    config = tmp_path / "sparo16.yaml"
    config.write_text("arch: vit_tiny_sparo\nnum_slots: 16\n")
    args = _parse("--config", str(config), "--arch", "vit_tiny_mhca")
    assert "num_slots" not in capsys.readouterr().err and args.num_slots == 16  # mhca takes num_slots
    args = _parse("--config", str(config), "--arch", "vit_tiny")
    assert "num_slots do not apply" in capsys.readouterr().err and args.num_slots == 64
    config.write_text("arch: vit_tiny\nnum_slots: 16\n")  # the YAML contradicts itself: still an error
    with pytest.raises(SystemExit):
        _parse("--config", str(config))
    assert "--num_slots does not apply to the cls read-out of vit_tiny" in capsys.readouterr().err


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_shipped_configs_parse_with_valid_keys(path: str) -> None:
    with open(path) as handle:
        values = yaml.safe_load(handle)
    valid = {action.dest for action in get_args_parser()._actions}
    assert set(values) <= valid
    args = _parse("--config", path)
    assert args.arch.endswith("_sparo") == ("sparo" in os.path.basename(path))


def test_four_recipes_are_shipped() -> None:
    names = {os.path.basename(path) for path in CONFIGS}
    assert {"dino_vit_small_in1k.yaml", "dino_vit_small_sparo_in1k.yaml", "fmnist_vit_tiny.yaml",
            "fmnist_vit_tiny_sparo.yaml"} <= names


@pytest.mark.parametrize("name, arch", [("dino_vit_small_in1k.yaml", "vit_small"),
                                        ("dino_vit_small_sparo_in1k.yaml", "vit_small_sparo")])
def test_paper_configs_are_the_official_recipe_in_fp16(name: str, arch: str) -> None:
    args = _parse("--config", os.path.join(REPO, "configs", name))
    expected = {**OFFICIAL_MAIN_DINO, "arch": arch}
    for key in ("output_dir", "dist_url", "local_rank", "data_path", "use_fp16"):
        expected.pop(key)
    for key, value in expected.items():
        assert getattr(args, key) == (list(value) if isinstance(value, tuple) else value), key
    assert args.precision == "fp16" and args.dataset == "imagefolder" and args.pos_embed_interpolation == "dino"
    assert (args.num_slots, args.slot_dim, args.attn_dim, args.group_size) == (64, 64, 64, 1)
    assert (args.global_crop_size, args.local_crop_size, args.img_size) == (224, 96, 224)


# Official DINO's ViT-B/16 run (https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/args.txt), written out
# here independently of the configs: where it differs from the ViT-S defaults above.
OFFICIAL_VIT_B16 = {"arch": "vit_base", "patch_size": 16, "lr": 0.00075, "min_lr": 2e-06, "epochs": 400,
                    "batch_size_per_gpu": 32, "teacher_temp": 0.07, "warmup_teacher_temp": 0.04,
                    "warmup_teacher_temp_epochs": 50, "clip_grad": 0.3, "freeze_last_layer": 3, "norm_last_layer": True,
                    "global_crops_scale": [0.25, 1.0], "local_crops_number": 10, "local_crops_scale": [0.05, 0.25],
                    "momentum_teacher": 0.996, "weight_decay": 0.04, "weight_decay_end": 0.4, "out_dim": 65536,
                    "drop_path_rate": 0.1, "warmup_epochs": 10, "optimizer": "adamw", "use_bn_in_head": False}


@pytest.mark.parametrize("name, arch", [("dino_vit_base_in1k.yaml", "vit_base"),
                                        ("dino_vit_base_sparo_in1k.yaml", "vit_base_sparo")])
def test_vit_base_configs_are_official_dinos_vit_b16_run(name: str, arch: str) -> None:
    args = _parse("--config", os.path.join(REPO, "configs", name))
    for key, value in {**OFFICIAL_VIT_B16, "arch": arch}.items():
        assert getattr(args, key) == value, key
    assert args.precision == "fp32"  # official use_fp16 false
    assert (args.global_crop_size, args.local_crop_size, args.img_size) == (224, 96, 224)
    assert (args.num_slots, args.slot_dim, args.attn_dim, args.group_size) == (64, 64, 64, 1)


@pytest.mark.parametrize("name, arch", [("fmnist_vit_tiny.yaml", "vit_tiny"),
                                        ("fmnist_vit_tiny_sparo.yaml", "vit_tiny_sparo")])
def test_fashion_mnist_configs(name: str, arch: str) -> None:
    args = parse_train_args(["--config", os.path.join(REPO, "configs", name)])
    assert (args.arch, args.patch_size, args.img_size, args.dataset) == (arch, 4, 32, "fashion_mnist")
    assert (args.global_crop_size, args.local_crop_size) == (32, 16)
    assert args.out_dim <= 8192


def test_the_run_config_holds_every_training_flag_in_one_section_and_keeps_the_flat_config() -> None:
    args = parse_train_args(["--data_path", "x", "--arch", "vit_tiny_sparo", "--num_slots", "8", "--lr", "0.002"])
    config = RunConfig.from_flags(args)
    sections = [config.model, config.crops, config.optim, config.run]
    names = [item.name for section in sections for item in dataclasses.fields(section)]
    assert len(names) == len(set(names))
    # read from `flat` by the network builder (read-out options) or by the launcher and the resume check only
    elsewhere = {*READOUT_OPTIONS, "config", "resume_overrides", "dist_url", "local_rank"}
    assert set(names) | elsewhere == set(vars(args)) and not set(names) & elsewhere
    assert config.flat == args_to_dict(args)  # what checkpoints, config.yaml and provenance keep
    assert config.optim.lr == 0.002 and config.model.arch == "vit_tiny_sparo" and config.flat["num_slots"] == 8
    assert config.crops.global_crops_scale == (0.4, 1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.optim.lr = 1.0
