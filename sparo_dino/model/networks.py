"""The student and teacher networks of a run, built from its config: for training, and again for evaluating the
untrained network (the random-init baseline every learned result is reported next to).
"""
from __future__ import annotations

import random
from typing import Any, Mapping

import numpy as np
import torch

import sparo_vit


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def build_student_teacher(config: Mapping[str, Any]) -> tuple[sparo_vit.MultiCropWrapper, sparo_vit.MultiCropWrapper]:
    """Student and teacher of a run config (flags or a checkpoint's `config`): the one place they are built.

    Both have the same backbone and unchanged DINO head; the student alone gets drop-path. The teacher starts as
    a copy of the student and never receives gradients (it follows the student by EMA).
    """
    kwargs = sparo_vit.backbone_kwargs(config)

    def network(drop_path_rate: float, grad_checkpointing: bool) -> sparo_vit.MultiCropWrapper:
        backbone = sparo_vit.build_backbone(**{**kwargs, "drop_path_rate": drop_path_rate,
                                               "grad_checkpointing": grad_checkpointing})
        head = sparo_vit.DINOHead(backbone.num_features, config["out_dim"], use_bn=config["use_bn_in_head"],
                                  norm_last_layer=config["norm_last_layer"])
        return sparo_vit.MultiCropWrapper(backbone, head)

    student = network(config.get("drop_path_rate", 0.0), bool(config.get("grad_checkpointing", False)))
    with torch.device("meta"):  # skip a random init that the copy below overwrites anyway
        teacher = network(0.0, False)
    teacher.to_empty(device="cpu")
    teacher.load_state_dict(student.state_dict())
    teacher.requires_grad_(False)
    return student, teacher


def parameter_line(arch: str, backbone: sparo_vit.DinoVisionTransformer) -> str:
    """The backbone's size and its read-out's share, printed at the start of a run: read-outs are compared at
    their parameter counts (the issue with SPARO at small widths: 64x64 keys outgrow the block they replace)."""
    total = sum(parameter.numel() for parameter in backbone.parameters())
    part = "its last block" if backbone.readout in ("cls", "gap") else "the read-out replacing the last block"
    return (f"{arch}: {total:,} backbone parameters, {backbone.readout_parameter_count():,} in {part}; "
            f"encoding of {backbone.num_features} dims")


def initial_teacher_backbone(config: Mapping[str, Any]) -> sparo_vit.DinoVisionTransformer:
    """The teacher backbone a run with this config starts from (its weights before the first step).

    Seeded and built exactly as the trainer does, so a checkpoint's `config` gives back the network it was trained
    from: the same architecture, the same seed, the same weights.
    """
    seed_everything(int(config.get("seed", 0)))
    _, teacher = build_student_teacher(config)
    return teacher.backbone
