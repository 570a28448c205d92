"""Reading backbone weights from the files users name, and building a frozen backbone from them.

Every reader of weights goes through here (an export_model.py folder reads like a checkpoint); `clean_state_dict`
maps every wrapper's names to ours, and the model comes from the checkpoint's `config` (a contradicting flag is an
error: it would load mismatched weights). `load_pretrained_trunk` is main_dino.py --pretrained_trunk's loader."""
from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed

from sparo_dino.io.checkpoint import load_checkpoint
from sparo_dino.model import networks, registry
from sparo_dino.model.backbone import DinoVisionTransformer, backbone_kwargs, build_backbone

# The backbone options an evaluation reads from a checkpoint's config (flags may fill the gaps, never contradict).
BACKBONE_OPTION_KEYS: tuple[str, ...] = ("arch", "patch_size", "img_size", "pos_embed_interpolation",
                                         *registry.OPTIONS)
# What export_model.py writes into its folder (the Hugging Face Hub layout timm reads): weights and model config.
EXPORT_WEIGHTS_NAME = "model.safetensors"
EXPORT_CONFIG_NAME = "config.json"
# The networks a training checkpoint holds (--checkpoint_key).
TRAINING_KEYS: tuple[str, ...] = ("teacher", "student")
# Where other tools keep a state dict inside a checkpoint dict (timm, MAE, DeiT: `model`; Lightning: `state_dict`).
_WRAPPER_KEYS: tuple[str, ...] = ("model", "state_dict")
# Official DINO's head was saved with the deprecated nn.utils.weight_norm; torch's parametrization names them so now.
_OLD_WEIGHT_NORM_NAMES: dict[str, str] = {"last_layer.weight_g": "last_layer.parametrizations.weight.original0",
                                          "last_layer.weight_v": "last_layer.parametrizations.weight.original1"}
# The entries of a ViT state dict that make up a trunk (patch and position embeddings, CLS, blocks, final norm):
# everything else in a file (a classifier, a DINO head, an earlier read-out) is left out of a pretrained trunk.
_TRUNK_PREFIXES: tuple[str, ...] = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.")


@dataclass(frozen=True)
class Weights:
    """A backbone state dict and what the file said about the model that produced it."""
    state_dict: dict[str, torch.Tensor]
    config: dict[str, Any] | None  # the training run's flags; None for a plain state dict
    tag: str  # names result files: "<file stem>_<checkpoint key>" or "<file stem>"
    epoch: int | None = None  # a training checkpoint's completed epochs


def clean_state_dict(state: Mapping[str, Any], submodule: str | None = None) -> dict[str, Any]:
    """`state` under the names of this repository's modules, whichever wrapper saved it.

    DDP's `module.` prefix goes and official DINO's old weight-norm names become the parametrization's. With
    `submodule` (e.g. "backbone"), a MultiCropWrapper state dict gives only that submodule's entries, unprefixed; a
    state dict without that prefix is taken to be the submodule's own (a plain backbone file)."""
    cleaned = {}
    for key, value in state.items():
        key = key.removeprefix("module.")
        for old, new in _OLD_WEIGHT_NORM_NAMES.items():
            if key.endswith(old):
                key = key[: -len(old)] + new
        cleaned[key] = value
    prefix = f"{submodule}."
    if submodule is not None and any(key.startswith(prefix) for key in cleaned):
        cleaned = {key.removeprefix(prefix): value for key, value in cleaned.items() if key.startswith(prefix)}
    return cleaned


def read_weights(path: str, checkpoint_key: str = "teacher") -> Weights:
    """The backbone weights in a file the user named: a training checkpoint (`checkpoint_key` network and its
    `config`), a folder written by export_model.py (model.safetensors and config.json), a plain backbone state dict
    (also .safetensors), or one under `model`/`state_dict` (timm and others)."""
    stem = os.path.splitext(os.path.basename(os.path.normpath(path)))[0]
    exported = read_export_config(path)
    if exported is not None:
        from safetensors.torch import load_file  # timm's dependency; only this format needs it
        folder = path if os.path.isdir(path) else os.path.dirname(path)
        return Weights(load_file(os.path.join(folder, EXPORT_WEIGHTS_NAME)), exported_run_config(exported), stem,
                       exported.get("sparo_dino", {}).get("epoch"))
    if path.endswith(".safetensors") and os.path.isfile(path):
        from safetensors.torch import load_file
        return Weights(clean_state_dict(load_file(path), "backbone"), None, stem)
    # The user named this file, so an official DINO checkpoint may load (its Namespace through an allow-list).
    loaded = load_checkpoint(path, allow_official=True)
    if any(key in loaded for key in TRAINING_KEYS):
        if not isinstance(loaded.get(checkpoint_key), Mapping):
            present = [key for key in TRAINING_KEYS if key in loaded]
            raise ValueError(f"{path} has no {checkpoint_key!r} network; it holds {', '.join(present)} "
                             "(choose with --checkpoint_key)")
        config = loaded.get("config")
        if config is None and "args" in loaded:  # official DINO pickles its argparse Namespace as `args`
            config = vars(loaded["args"])
        epoch = loaded.get("epoch")
        return Weights(clean_state_dict(loaded[checkpoint_key], "backbone"), dict(config) if config else None,
                       f"{stem}_{checkpoint_key}", int(epoch) if epoch is not None else None)
    wrapped = next((loaded[key] for key in _WRAPPER_KEYS if isinstance(loaded.get(key), Mapping)), loaded)
    if not all(isinstance(value, torch.Tensor) for value in wrapped.values()):
        raise ValueError(f"{path} is neither a training checkpoint (no teacher/student key) nor a state dict of "
                         f"tensors; top-level keys: {', '.join(list(map(str, loaded))[:8])}")
    return Weights(clean_state_dict(wrapped, "backbone"), None, stem)


def read_export_config(path: str) -> dict[str, Any] | None:
    """The config.json of an export_model.py folder, for the folder itself or its model.safetensors; None for any
    other path. The folder is what timm's `local-dir:` and the Hugging Face Hub hold."""
    if os.path.isdir(path):
        folder = path
    elif os.path.basename(path) == EXPORT_WEIGHTS_NAME:
        folder = os.path.dirname(path)
    else:
        return None
    config_path = os.path.join(folder, EXPORT_CONFIG_NAME)
    if not os.path.isfile(config_path):
        if folder == path:
            raise FileNotFoundError(f"{path} is a folder without the {EXPORT_CONFIG_NAME} of an export_model.py "
                                    "export; name a checkpoint or state dict file")
        return None
    with open(config_path) as handle:
        config = json.load(handle)
    ours = isinstance(config, dict) and "sparo_dino" in config and "architecture" in config
    if not ours and folder != path:  # e.g. timm's own Hub download: its weights read as a plain state dict
        return None
    if not ours or not os.path.isfile(os.path.join(folder, EXPORT_WEIGHTS_NAME)):
        raise ValueError(f"{folder} is not an export_model.py folder ({EXPORT_CONFIG_NAME} with its `sparo_dino` "
                         f"entry, and {EXPORT_WEIGHTS_NAME})")
    return config


def exported_run_config(exported: Mapping[str, Any]) -> dict[str, Any]:
    """What an export says about the model, as a run config: the training run's flags when the export kept them
    (so the random-init baseline can be rebuilt), always with the architecture and the model options."""
    run_config = dict(exported.get("sparo_dino", {}).get("run_config") or {})
    return {**run_config, "arch": exported["architecture"], **exported.get("model_args", {})}


def resolve_model_options(flags: Mapping[str, Any], config: Mapping[str, Any] | None) -> dict[str, Any]:
    """build_backbone kwargs: the checkpoint's config wins, `flags` (unset: None or absent) fill gaps, a
    contradicting flag is an error."""
    flags = {key: flags.get(key) for key in BACKBONE_OPTION_KEYS}
    arch = (config or {}).get("arch") or flags["arch"]
    if arch is not None:  # before the comparison: a config saves every read-out flag, also those its arch ignores
        registry.reject_readout_options(arch, [f"--{key}" for key in registry.OPTIONS if flags[key] is not None])
    if config is None:
        missing = [f"--{key}" for key in ("arch", "patch_size") if flags[key] is None]
        if missing:
            raise ValueError(f"{' and '.join(missing)} required: the weights are a plain state dict without a config")
        merged = dict(flags)
    else:
        merged = {}
        for key in BACKBONE_OPTION_KEYS:
            stored = config.get(key)
            if stored is not None and flags[key] is not None and flags[key] != stored:
                raise ValueError(f"--{key} {flags[key]} conflicts with the checkpoint's config ({key}={stored}); "
                                 "drop the flag")
            merged[key] = stored if stored is not None else flags[key]
        if merged["arch"] is None:
            raise ValueError("the checkpoint's config names no arch; give --arch")
    kwargs = backbone_kwargs(merged)
    kwargs.pop("drop_path_rate", None)
    kwargs.pop("grad_checkpointing", None)
    return kwargs


def build_frozen_backbone(options: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor],
                          source: str) -> nn.Module:
    """Build the backbone and load the weights strictly: a partial load would evaluate a random network."""
    backbone = build_backbone(**options)
    own = backbone.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    if missing or unexpected:
        raise ValueError(f"weights in {source} do not fit {options['arch']} (patch {options.get('patch_size')}): "
                         f"missing {missing[:4]}, unexpected {unexpected[:4]}")
    for key, value in state_dict.items():
        if own[key].shape != value.shape:
            raise ValueError(f"weights in {source} do not fit {options}: {key} has shape {tuple(value.shape)}, "
                             f"the model expects {tuple(own[key].shape)}")
    backbone.load_state_dict(state_dict, strict=True)
    backbone.requires_grad_(False)
    return backbone.eval()


def load_backbone(args: argparse.Namespace, at_init: bool = False) -> tuple[nn.Module, dict[str, Any], str]:
    """(frozen eval-mode backbone on CPU, its build options, result tag) from --pretrained_weights and flags.

    With `at_init`, the network the checkpoint's run started from instead (same config and seed, weights before the
    first step): the random-init baseline that a trained result must clear to show that training did something."""
    if args.pretrained_weights is None:
        raise ValueError("--pretrained_weights is required (or --load_features with cached features)")
    weights = read_weights(args.pretrained_weights, args.checkpoint_key)
    options = resolve_model_options(vars(args), weights.config)
    if not at_init:
        return build_frozen_backbone(options, weights.state_dict, args.pretrained_weights), options, weights.tag
    if weights.config is None:
        raise ValueError(f"the random-init baseline needs a training checkpoint with its config (seed, head); "
                         f"{args.pretrained_weights} is a plain state dict")
    with torch.random.fork_rng(devices=[]):  # rebuilding the init reseeds torch; leave the caller's stream alone
        initial = networks.initial_teacher_backbone(weights.config)
    return build_frozen_backbone(options, initial.state_dict(), "the run's random init"), options, \
        f"{weights.tag}_init"




def _replacing_readout_modules() -> list[str]:
    """The module names of the registered read-outs that replace the last block: a file holding one of them had one
    block fewer than the ViT it was trained as."""
    return [spec.attribute for spec in map(registry.get, registry.names()) if spec.replaces_block]


def fresh_parameter_names(backbone: DinoVisionTransformer) -> list[str]:
    """The backbone's parameters that a pretrained trunk does not set: the read-out that replaces the last block
    (none for cls and gap, which keep all blocks). --freeze_trunk_epochs trains these and the head only."""
    spec = backbone.readout_spec
    return [name for name, _ in backbone.named_parameters()
            if spec.replaces_block and name.startswith(f"{spec.attribute}.")]


def _trunk_size(state: Mapping[str, torch.Tensor]) -> tuple[int, int] | None:
    """(width, depth) of the ViT a state dict holds, counting a block replaced by one of this repository's read-outs;
    None when it holds no ViT trunk."""
    width_from = state.get("cls_token", state.get("patch_embed.proj.weight"))
    blocks = {int(key.split(".")[1]) for key in state if key.startswith("blocks.") and key.split(".")[1].isdigit()}
    if width_from is None or not blocks:
        return None
    width = width_from.shape[-1] if "cls_token" in state else width_from.shape[0]
    replaced = any(key.startswith(f"{module}.") for key in state for module in _replacing_readout_modules())
    return int(width), max(blocks) + 1 + int(replaced)


def _key_groups(keys: Sequence[str], notes: Mapping[str, str] | None = None) -> str:
    """Keys in a few words: one entry per block or top-level module ("blocks.11.* (12)", "head.weight")."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        parts = key.split(".")
        depth = 2 if parts[0] == "blocks" and len(parts) > 2 else 1
        groups.setdefault(".".join(parts[:depth]) + ".*" if len(parts) > depth else key, []).append(key)
    words = []
    for group, members in groups.items():
        word = members[0] if len(members) == 1 else f"{group} ({len(members)})"
        note = (notes or {}).get(group)
        words.append(f"{word}: {note}" if note else word)
    return ", ".join(words) or "none"


@dataclass(frozen=True)
class TrunkLoad:
    """What load_pretrained_trunk did: which keys of the file went into the backbone, which did not, and which
    backbone keys the file did not set (they keep their fresh init)."""
    source: str
    loaded: list[str]
    not_loaded: list[str]  # file keys left out: a replaced block, a classifier or DINO head, an earlier read-out
    missing: list[str]  # backbone keys left at their fresh init: the read-out's
    pos_embed: str | None = None  # "14x14 -> 4x4" when the file's position embeddings were resampled
    notes: dict[str, str] = field(default_factory=dict)  # key group -> why it was not loaded

    def summary(self) -> str:
        """The one line a run prints about its pretrained trunk."""
        resampled = f", pos_embed resampled {self.pos_embed} patches" if self.pos_embed else ""
        return (f"pretrained trunk {self.source}: {len(self.loaded)} tensors loaded{resampled}; not loaded: "
                f"{_key_groups(self.not_loaded, self.notes)}; missing (fresh init): {_key_groups(self.missing)}")

    def record(self) -> dict[str, Any]:
        """JSON-ready, for the run's provenance."""
        return {"source": self.source, "loaded": len(self.loaded), "not_loaded": _key_groups(self.not_loaded),
                "missing": _key_groups(self.missing), "pos_embed_resampled": self.pos_embed}


def load_pretrained_trunk(backbone: DinoVisionTransformer, source: str | Mapping[str, torch.Tensor],
                          checkpoint_key: str = "teacher") -> TrunkLoad:
    """Set a backbone's trunk from a pretrained ViT of the same width and depth, whichever read-out either has.

    `source`: a file read_weights reads (official DINO's training checkpoint or hub backbone, a timm state dict or
    .safetensors file, this repository's checkpoints; `checkpoint_key` picks a training checkpoint's network) or a
    state dict. Patch embedding, CLS, position embeddings (resampled when the grid differs), the blocks the
    backbone keeps and the final norm load; a block that the backbone's read-out replaces is dropped, which is how
    the paper suggests placing SPARO on a pre-trained model, and the read-out keeps its fresh init. Another width,
    depth or patch size, or a trunk entry that either side lacks, is a ValueError of one line.
    """
    if isinstance(source, str):
        if not os.path.exists(source):
            raise FileNotFoundError(f"pretrained weights not found: {source}")
        state, name = read_weights(source, checkpoint_key).state_dict, source
    else:
        state, name = clean_state_dict(source, "backbone"), "the state dict"
    replaces_block = backbone.readout_spec.replaces_block
    kept = len(backbone.blocks)
    size = _trunk_size(state)
    wanted = (backbone.embed_dim, kept + int(replaces_block))
    if size is None:
        raise ValueError(f"{name} holds no ViT trunk (no cls_token, patch_embed or blocks entries); first keys: "
                         f"{', '.join(list(state)[:5])}")
    if size != wanted:
        raise ValueError(f"{name} holds a ViT of width {size[0]} and depth {size[1]}; this backbone has width "
                         f"{wanted[0]} and depth {wanted[1]} (pick the --arch of the file's size)")

    def in_trunk(key: str) -> bool:
        return key.startswith(_TRUNK_PREFIXES) and not (key.startswith("blocks.") and int(key.split(".")[1]) >= kept)

    trunk = {key: value for key, value in state.items() if in_trunk(key)}
    own = backbone.state_dict()
    foreign = sorted(set(trunk) - set(own))
    if foreign:
        raise ValueError(f"{name} holds trunk entries this ViT lacks ({', '.join(foreign[:4])}): another ViT family "
                         "(layer scale, registers) cannot load")
    absent = sorted(key for key in own if in_trunk(key) and key not in trunk)
    if absent:
        raise ValueError(f"{name} lacks trunk entries: {_key_groups(absent)}")
    resampled = None
    if trunk["pos_embed"].shape != backbone.pos_embed.shape:
        old_side = math.isqrt(trunk["pos_embed"].shape[1] - backbone.num_prefix_tokens)
        grid = list(backbone.patch_embed.grid_size)
        trunk["pos_embed"] = resample_abs_pos_embed(trunk["pos_embed"], new_size=grid, old_size=[old_side, old_side],
                                                    num_prefix_tokens=backbone.num_prefix_tokens)
        resampled = f"{old_side}x{old_side} -> {grid[0]}x{grid[1]}"
    for key, value in trunk.items():
        if own[key].shape != value.shape:
            raise ValueError(f"{name} does not fit this backbone: {key} has shape {tuple(value.shape)}, the backbone "
                             f"{tuple(own[key].shape)} (another patch size?)")
    backbone.load_state_dict(trunk, strict=False)
    notes = {f"{module}.*": "a read-out, fresh here" for module in _replacing_readout_modules()}
    if replaces_block:
        notes[f"blocks.{kept}.*"] = f"the block the {backbone.readout} read-out replaces"
    return TrunkLoad(name, sorted(trunk), sorted(set(state) - set(trunk)), sorted(set(own) - set(trunk)), resampled,
                     notes)
