"""A training run's configuration in sections (model, crops, optimisation, run), built once from the flat flags.

The flags stay official DINO's flat names on the command line, in YAML and in checkpoints (`flat`, plain data), so
old checkpoints, official ones and feature caches keep loading; the trainer reads the sections.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from typing import Any, Mapping, TypeVar


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    patch_size: int
    img_size: int
    pos_embed_interpolation: str
    out_dim: int
    use_bn_in_head: bool
    norm_last_layer: bool
    drop_path_rate: float
    grad_checkpointing: bool
    pretrained_trunk: str | None


@dataclass(frozen=True)
class CropsConfig:
    global_crops_scale: tuple[float, float]
    local_crops_number: int
    local_crops_scale: tuple[float, float]
    global_crop_size: int
    local_crop_size: int
    augmentation: str


@dataclass(frozen=True)
class OptimConfig:
    """The optimiser, its schedules (lr, weight decay, teacher momentum and temperature) and the numerics."""
    optimizer: str
    lr: float
    min_lr: float
    warmup_epochs: int
    weight_decay: float
    weight_decay_end: float
    momentum_teacher: float
    final_momentum_teacher: float
    warmup_teacher_temp: float
    teacher_temp: float
    warmup_teacher_temp_epochs: int
    clip_grad: float
    freeze_last_layer: int
    freeze_trunk_epochs: int
    batch_size_per_gpu: int
    epochs: int
    precision: str
    use_fp16: bool | None
    compile: str
    fused_adamw: bool


@dataclass(frozen=True)
class RunSettings:
    """Data, output, checkpoints, logging and the periodic k-NN monitor."""
    dataset: str
    data_path: str
    train_subset: int | None
    output_dir: str
    seed: int
    num_workers: int
    print_freq: int
    saveckp_freq: int
    ckpt_every_iters: int
    skip_bad_images: bool
    resume: str | None
    tensorboard: bool
    wandb_project: str | None
    knn_every: int
    knn_data_path: str | None
    knn_subset: int
    knn_crop_size: int
    knn_resize_size: int
    dist_timeout_minutes: float


Section = TypeVar("Section")


def _section(cls: type[Section], flat: Mapping[str, Any]) -> Section:
    return cls(**{item.name: flat[item.name] for item in fields(cls)})


def _plain(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)


def args_to_dict(args: argparse.Namespace | Mapping[str, Any]) -> dict[str, Any]:
    """Plain data only, so checkpoints stay loadable with torch.load(weights_only=True)."""
    items = vars(args) if isinstance(args, argparse.Namespace) else args
    return {key: _plain(value) for key, value in items.items()}


@dataclass(frozen=True)
class RunConfig:
    """The sections, and `flat`: every flag as plain data, as checkpoints, config.yaml and provenance keep it (and
    what the builders shared with checkpoint configs read: networks, data)."""
    model: ModelConfig
    crops: CropsConfig
    optim: OptimConfig
    run: RunSettings
    flat: Mapping[str, Any]

    @classmethod
    def from_flags(cls, flags: argparse.Namespace | Mapping[str, Any]) -> RunConfig:
        """The sections of validated main_dino flags (cli/train_flags.parse_train_args)."""
        flat = args_to_dict(flags)
        crops = {**flat, "global_crops_scale": tuple(flat["global_crops_scale"]),
                 "local_crops_scale": tuple(flat["local_crops_scale"])}
        return cls(_section(ModelConfig, flat), _section(CropsConfig, crops), _section(OptimConfig, flat),
                   _section(RunSettings, flat), flat)
