"""Reading backbone weights from the files users name, and building a frozen backbone from them.

Every reader of weights goes through here: the evaluations (eval_knn.py, eval_linear.py), the figures
(visualize_*.py), torch.hub, `load_pretrained_trunk`, training's resume and the linear head's --evaluate. Wrappers
write the same weights under different names (DDP's `module.`, MultiCropWrapper's `backbone.`/`head.`, the weight-norm
names of older torch), so one function, `clean_state_dict`, maps them all to this repository's names. The
architecture comes from the checkpoint's `config`; a flag that contradicts it is an error, because silently building
another model would load mismatched weights or evaluate the wrong thing.
"""
from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn as nn
from timm.layers import resample_abs_pos_embed

import sparo_vit
from sparo_dino.io.checkpoint import load_checkpoint
from sparo_dino.model import networks

# The backbone options an evaluation reads from a checkpoint's config (flags may fill the gaps, never contradict).
BACKBONE_OPTION_KEYS: tuple[str, ...] = ("arch", "patch_size", "img_size",
                                         "pos_embed_interpolation") + sparo_vit.READOUT_OPTIONS
# The networks a training checkpoint holds (--checkpoint_key).
TRAINING_KEYS: tuple[str, ...] = ("teacher", "student")
# Where other tools keep a state dict inside a checkpoint dict (timm, MAE, DeiT: `model`; Lightning: `state_dict`).
_WRAPPER_KEYS: tuple[str, ...] = ("model", "state_dict")
# Official DINO's head was saved with the deprecated nn.utils.weight_norm; torch's parametrization names them so now.
_OLD_WEIGHT_NORM_NAMES: dict[str, str] = {"last_layer.weight_g": "last_layer.parametrizations.weight.original0",
                                          "last_layer.weight_v": "last_layer.parametrizations.weight.original1"}
# Entries of a classifier (timm) or a DINO head saved without its wrapper: not part of a pretrained trunk.
_NOT_TRUNK_PREFIXES: tuple[str, ...] = ("head.", "fc_norm.", "last_layer", "mlp.", "attn_pool.")
# The modules of the read-outs that replace the last block: a pretrained trunk leaves them at their fresh init.
_READOUT_PREFIXES: tuple[str, ...] = ("sparo.", "mhca.", "attn_pool.")


@dataclass(frozen=True)
class Weights:
    """A backbone state dict and what the file said about the model that produced it."""
    state_dict: dict[str, torch.Tensor]
    config: dict[str, Any] | None  # the training run's flags; None for a plain state dict
    tag: str  # names result files: "<file stem>_<checkpoint key>" or "<file stem>"


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
    `config`), a plain backbone state dict (also .safetensors), or one under `model`/`state_dict` (timm and others)."""
    stem = os.path.splitext(os.path.basename(path))[0]
    if path.endswith(".safetensors") and os.path.isfile(path):
        from safetensors.torch import load_file  # timm's dependency; only this format needs it
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
        return Weights(clean_state_dict(loaded[checkpoint_key], "backbone"), dict(config) if config else None,
                       f"{stem}_{checkpoint_key}")
    wrapped = next((loaded[key] for key in _WRAPPER_KEYS if isinstance(loaded.get(key), Mapping)), loaded)
    if not all(isinstance(value, torch.Tensor) for value in wrapped.values()):
        raise ValueError(f"{path} is neither a training checkpoint (no teacher/student key) nor a state dict of "
                         f"tensors; top-level keys: {', '.join(list(map(str, loaded))[:8])}")
    return Weights(clean_state_dict(wrapped, "backbone"), None, stem)


def resolve_model_options(flags: Mapping[str, Any], config: Mapping[str, Any] | None) -> dict[str, Any]:
    """build_backbone kwargs: the checkpoint's config wins, `flags` (unset: None or absent) fill gaps, a
    contradicting flag is an error."""
    flags = {key: flags.get(key) for key in BACKBONE_OPTION_KEYS}
    arch = (config or {}).get("arch") or flags["arch"]
    if arch is not None:  # before the comparison: a config saves every read-out flag, also those its arch ignores
        sparo_vit.reject_readout_options(arch, [f"--{key}" for key in sparo_vit.READOUT_OPTIONS
                                                if flags[key] is not None])
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
    kwargs = sparo_vit.backbone_kwargs(merged)
    kwargs.pop("drop_path_rate", None)
    kwargs.pop("grad_checkpointing", None)
    return kwargs


def build_frozen_backbone(options: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor],
                          source: str) -> nn.Module:
    """Build the backbone and load the weights strictly: a partial load would evaluate a random network."""
    backbone = sparo_vit.build_backbone(**options)
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
    first step): the random-init baseline that a trained result must clear to show that training did something.
    """
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


def load_pretrained_trunk(backbone: sparo_vit.DinoVisionTransformer,
                          source: str | Mapping[str, torch.Tensor]) -> list[str]:
    """Initialize a backbone from a timm or official-DINO ViT state dict (or a file holding one).

    For a read-out that replaces the last block (attpool, mhca, sparo) all blocks but the last go into the trunk and
    the last block is dropped, which is how the paper suggests placing SPARO on a pre-trained model; the read-out
    keeps its fresh init. Returns the names of the parameters that were not in the source (the read-out's).
    """
    if isinstance(source, str) and not os.path.isfile(source):
        raise FileNotFoundError(f"pretrained weights not found: {source}")
    state = read_weights(source).state_dict if isinstance(source, str) else clean_state_dict(source, "backbone")
    depth = len(backbone.blocks)
    trunk = {key: value for key, value in state.items() if not key.startswith(_NOT_TRUNK_PREFIXES)
             and not (key.startswith("blocks.") and int(key.split(".")[1]) >= depth)}
    if "pos_embed" in trunk and trunk["pos_embed"].shape != backbone.pos_embed.shape:
        old_side = math.isqrt(trunk["pos_embed"].shape[1] - backbone.num_prefix_tokens)
        trunk["pos_embed"] = resample_abs_pos_embed(
            trunk["pos_embed"], new_size=list(backbone.patch_embed.grid_size), old_size=[old_side, old_side],
            num_prefix_tokens=backbone.num_prefix_tokens)
    own = backbone.state_dict()
    for key, value in trunk.items():
        if key in own and own[key].shape != value.shape:
            raise ValueError(f"pretrained weights do not fit this backbone: {key} has shape {tuple(value.shape)}, "
                             f"expected {tuple(own[key].shape)} (another arch or patch size?)")
    missing, unexpected = backbone.load_state_dict(trunk, strict=False)
    if unexpected:
        raise ValueError(f"pretrained weights hold keys this backbone lacks: {', '.join(sorted(unexpected)[:5])}")
    trunk_missing = [k for k in missing if not k.startswith(_READOUT_PREFIXES)]
    if trunk_missing:
        raise ValueError(f"pretrained weights lack trunk keys: {', '.join(sorted(trunk_missing)[:5])}")
    return list(missing)
