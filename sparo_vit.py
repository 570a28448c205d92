"""SPARO read-out, the read-outs it is compared with, and the ViT backbones they sit on (paper Sec. 3.2, 3.4,
5.3, Appendix A): the names checkpoints, torch.hub and users rely on, and the archs registered in timm.

The read-out is the arch name's suffix: `vit_<size>` returns the final-norm CLS token (official DINO), `_gap` the
mean final-norm patch token; `_attpool`, `_mhca` and `_sparo` replace the N-th block. The code lives in
sparo_dino/model/ (read-outs: its registry.py); this module re-exports it.
"""
from __future__ import annotations

import json
import os
from types import MappingProxyType
from typing import Any, Mapping

from timm.models import PretrainedCfg, is_model, load_pretrained, register_model, resolve_pretrained_cfg

from sparo_dino.model import registry
from sparo_dino.model.attention_maps import cls_attention_maps, slot_attention_maps
from sparo_dino.model.backbone import (
    DINO_INTERPOLATE_OFFSET,
    POS_EMBED_INTERPOLATIONS,
    DinoVisionTransformer,
    backbone_kwargs,
    build_backbone,
    interpolate_pos_embed_dino,
)
from sparo_dino.model.head import DINOHead, MultiCropWrapper
from sparo_dino.model.readouts.mhca import MultiHeadCrossAttention
from sparo_dino.model.readouts.sparo import SPARO, SPARO_DEFAULTS, check_readout_sizes
from sparo_dino.model.registry import has_slots, readout_of, reject_readout_options

__all__ = ["SPARO", "SPARO_DEFAULTS", "MultiHeadCrossAttention", "DinoVisionTransformer", "DINOHead",
           "MultiCropWrapper", "build_backbone", "backbone_kwargs", "interpolate_pos_embed_dino",
           "POS_EMBED_INTERPOLATIONS", "DINO_INTERPOLATE_OFFSET", "slot_attention_maps", "cls_attention_maps",
           "has_slots", "readout_of", "reject_readout_options", "check_readout_sizes", "split_arch", "is_sparo_arch",
           "ARCHS", "READOUTS", "SLOT_READOUTS", "READOUT_DEFAULTS", "READOUT_OPTIONS", "OPTIONS_OF_READOUT"]

# The built-in read-outs and archs as the registry lists them at import (registry.names() and registry.archs() also
# see read-outs registered later by plug-ins).
READOUTS: tuple[str, ...] = registry.names()
SLOT_READOUTS: tuple[str, ...] = tuple(name for name in READOUTS if registry.get(name).has_slots)
ARCHS: tuple[str, ...] = registry.archs()
READOUT_DEFAULTS: Mapping[str, int | bool] = MappingProxyType(registry.option_defaults())
READOUT_OPTIONS: tuple[str, ...] = tuple(READOUT_DEFAULTS)
OPTIONS_OF_READOUT: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {name: registry.get(name).options for name in READOUTS})


def split_arch(arch: str) -> tuple[str, str]:
    """(trunk size, read-out name) of an arch name: "vit_small_sparo" -> ("vit_small", "sparo")."""
    size, readout = registry.split_arch(arch)
    return size, readout.name


def is_sparo_arch(arch: str) -> bool:
    return readout_of(arch) == "sparo"


def _exported_config(path: str) -> dict[str, Any]:
    """The config.json beside a weights file written by export_model.py (timm's Hub layout), or {}."""
    config_path = os.path.join(os.path.dirname(path), "config.json")
    if not os.path.isfile(config_path):
        return {}
    with open(config_path) as handle:
        return json.load(handle)


def _pretrained(arch: str, pretrained_cfg: Any, overlay: Mapping[str, Any] | None, cache_dir: Any,
                kwargs: dict[str, Any]) -> DinoVisionTransformer:
    """timm's `pretrained=True`: the weights timm's pretrained config points at, loaded strictly by timm's loader.

    No weights are published, so the config must name them: a local file (pretrained_cfg_overlay=dict(file=...);
    an export_model.py config.json beside it supplies the model options and input config), or timm's
    `local-dir:DIR` / `hf-hub:ID` model names, for which timm reads config.json itself."""
    cfg = resolve_pretrained_cfg(arch, pretrained_cfg=pretrained_cfg or PretrainedCfg(architecture=arch),
                                 pretrained_cfg_overlay=overlay).to_dict()
    if not (cfg.get("file") or cfg.get("hf_hub_id") or cfg.get("url") or cfg.get("state_dict")):
        raise ValueError(f"no pretrained weights are published for {arch}; name them: timm.create_model({arch!r}, "
                         "pretrained=True, pretrained_cfg_overlay=dict(file='DIR/model.safetensors')) with a folder "
                         "written by export_model.py, or timm.create_model('local-dir:DIR', pretrained=True)")
    if cfg.get("file") and cfg.get("source") != "local-dir":
        exported = _exported_config(cfg["file"])
        if exported.get("architecture", arch) != arch:
            raise ValueError(f"{cfg['file']} holds a {exported['architecture']} backbone, not {arch}")
        kwargs = {**exported.get("model_args", {}), **kwargs}
        stored = {key: tuple(value) if isinstance(value, list) else value  # JSON lists, timm's tuples
                  for key, value in exported.get("pretrained_cfg", {}).items()}
        cfg = {**cfg, **stored, **(overlay or {})}  # the overlay still wins
    model = build_backbone(arch, **kwargs)
    load_pretrained(model, pretrained_cfg=cfg, num_classes=0, strict=True, cache_dir=cache_dir)
    model.pretrained_cfg = cfg  # what timm.data.resolve_data_config reads: input size, mean, std
    return model


def _register(arch: str) -> None:
    def create(pretrained: bool = False, pretrained_cfg: Any = None, pretrained_cfg_overlay: Any = None,
               cache_dir: Any = None, **kwargs: Any) -> DinoVisionTransformer:
        kwargs.pop("pretrained_model_args", None)  # timm's record of config.json's model_args, also in kwargs
        if pretrained:
            return _pretrained(arch, pretrained_cfg, pretrained_cfg_overlay, cache_dir, kwargs)
        return build_backbone(arch, **kwargs)

    create.__name__ = arch
    create.__qualname__ = arch
    create.__module__ = __name__
    register_model(create)


for _arch in ARCHS:
    # the cls archs too (exports of them name their arch in config.json), unless timm ever names its own so
    if readout_of(_arch) != "cls" or not is_model(_arch):
        _register(_arch)
