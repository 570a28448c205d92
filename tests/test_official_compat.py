"""Every official DINO flag of every script keeps its name and its official default, or is a documented exception.

The official defaults below are written out from facebookresearch/dino (main_dino.py, eval_knn.py,
eval_linear.py, run_with_submitit.py), independently of our parsers. An exception must appear in the exceptions
table of docs/compatibility.md, so a changed default cannot go unnoticed or undocumented.
"""
from __future__ import annotations

import argparse
import os
import re

import pytest

import eval_knn
import eval_linear
from launch import submit
from sparo_dino.cli.train_flags import get_args_parser

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

OFFICIAL_MAIN_DINO = {
    "arch": "vit_small", "patch_size": 16, "out_dim": 65536, "norm_last_layer": True, "momentum_teacher": 0.996,
    "use_bn_in_head": False, "warmup_teacher_temp": 0.04, "teacher_temp": 0.04, "warmup_teacher_temp_epochs": 0,
    "use_fp16": True, "weight_decay": 0.04, "weight_decay_end": 0.4, "clip_grad": 3.0, "batch_size_per_gpu": 64,
    "epochs": 100, "freeze_last_layer": 1, "lr": 0.0005, "warmup_epochs": 10, "min_lr": 1e-6, "optimizer": "adamw",
    "drop_path_rate": 0.1, "global_crops_scale": (0.4, 1.0), "local_crops_number": 8,
    "local_crops_scale": (0.05, 0.4), "data_path": "/path/to/imagenet/train/", "output_dir": ".",
    "saveckp_freq": 20, "seed": 0, "num_workers": 10, "dist_url": "env://", "local_rank": 0,
}
OFFICIAL_EVAL_KNN = {
    "batch_size_per_gpu": 128, "nb_knn": [10, 20, 100, 200], "temperature": 0.07, "pretrained_weights": "",
    "use_cuda": True, "arch": "vit_small", "patch_size": 16, "checkpoint_key": "teacher", "dump_features": None,
    "load_features": None, "num_workers": 10, "dist_url": "env://", "local_rank": 0,
    "data_path": "/path/to/imagenet/",
}
OFFICIAL_EVAL_LINEAR = {
    "n_last_blocks": 4, "avgpool_patchtokens": False, "arch": "vit_small", "patch_size": 16, "pretrained_weights": "",
    "checkpoint_key": "teacher", "epochs": 100, "lr": 0.001, "batch_size_per_gpu": 128, "dist_url": "env://",
    "local_rank": 0, "data_path": "/path/to/imagenet/", "num_workers": 10, "val_freq": 1, "output_dir": ".",
    "num_labels": 1000, "evaluate": False,
}
OFFICIAL_RUN_WITH_SUBMITIT = {"ngpus": 8, "nodes": 2, "timeout": 2800, "partition": "learnfair",
                              "use_volta32": False, "comment": ""}

# Flags whose default differs on purpose; each must be in the exceptions table of docs/compatibility.md.
EXCEPTIONS = {
    "main_dino": {"use_fp16", "data_path"},
    "eval_knn": {"pretrained_weights", "arch", "patch_size", "data_path"},
    "eval_linear": {"pretrained_weights", "arch", "patch_size", "data_path", "n_last_blocks", "num_labels",
                    "output_dir"},
    "submit": {"partition", "nodes"},  # nodes: 2 as official, resolved after parsing (1 with --cluster local)
}
SCRIPTS = {
    "main_dino": (get_args_parser, OFFICIAL_MAIN_DINO),
    "eval_knn": (eval_knn.build_parser, OFFICIAL_EVAL_KNN),
    "eval_linear": (eval_linear.build_parser, OFFICIAL_EVAL_LINEAR),
    "submit": (submit.build_parser, OFFICIAL_RUN_WITH_SUBMITIT),
}


def _defaults(parser: argparse.ArgumentParser) -> dict[str, object]:
    return {action.dest: action.default for action in parser._actions}


def _as_list(value: object) -> object:
    return list(value) if isinstance(value, tuple) else value


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_official_flag_exists_with_its_official_default_or_is_an_exception(script: str) -> None:
    build, official = SCRIPTS[script]
    parser = build()
    ours = _defaults(parser)
    options = {option for action in parser._actions for option in action.option_strings}
    missing = [flag for flag in official if f"--{flag}" not in options]
    assert not missing, f"{script}: official flags missing: {missing}"
    changed = {flag for flag, value in official.items() if _as_list(ours[flag]) != _as_list(value)}
    assert changed <= EXCEPTIONS[script], f"{script}: undocumented default changes: {changed - EXCEPTIONS[script]}"


def test_submit_resolves_the_official_node_count() -> None:
    launcher, _ = submit.split_argv(["--arch", "vit_small", "--data_path", "/data"])
    assert launcher.nodes == OFFICIAL_RUN_WITH_SUBMITIT["nodes"]


def test_every_exception_is_in_the_compatibility_table() -> None:
    with open(os.path.join(REPO, "docs", "compatibility.md")) as handle:
        page = handle.read()
    section = page.split("## Exceptions, each for a reason", 1)[1].split("\n## ", 1)[0]
    table_flags = set(re.findall(r"`--([a-z0-9_]+)`", "\n".join(line for line in section.splitlines()
                                                               if line.startswith("|"))))
    documented = set().union(*EXCEPTIONS.values()) - {"nodes"}
    assert documented <= table_flags, f"exceptions missing from docs/compatibility.md: {documented - table_flags}"
