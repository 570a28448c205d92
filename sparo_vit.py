"""SPARO read-out, the read-outs it is compared with, and the ViT backbones they sit on (paper Sec. 3.2, 3.4,
5.3, Appendix A): the names checkpoints, torch.hub and users rely on, and the archs registered in timm.

The read-out is the arch name's suffix: `vit_<size>` returns the final-norm CLS token (official DINO), `_gap` the
mean final-norm patch token; `_attpool`, `_mhca` and `_sparo` replace the N-th block. The code lives in
sparo_dino/model/ (read-outs: its registry.py); this module re-exports it.
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Any, Mapping

from timm.models import register_model

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


def _register(arch: str) -> None:
    def create(pretrained: bool = False, **kwargs: Any) -> DinoVisionTransformer:
        if pretrained:
            raise ValueError(f"no pretrained weights are published for {arch}; "
                             "load a file with sparo_dino.io.weights.load_pretrained_trunk")
        kwargs.pop("pretrained_cfg", None)
        kwargs.pop("pretrained_cfg_overlay", None)
        kwargs.pop("cache_dir", None)
        return build_backbone(arch, **kwargs)

    create.__name__ = arch
    create.__qualname__ = arch
    create.__module__ = __name__
    register_model(create)


for _arch in ARCHS:
    if readout_of(_arch) != "cls":  # timm's registry has its own vit_tiny|small|base-like names
        _register(_arch)
