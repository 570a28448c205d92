"""Every read-out in one place, and the arch names they make (`vit_<size>` + `_<read-out>`, none for cls).

The backbone builder, the feature kinds, weight loading, option checks, flags and every message that lists read-outs
read this registry; adding a read-out is one module under readouts/ plus its `register` call below
(docs/architecture.md walks through it).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import torch.nn as nn

from sparo_dino.model.readouts import pooling
from sparo_dino.model.readouts.mhca import MultiHeadCrossAttention
from sparo_dino.model.readouts.mhmix import MixedHeadCrossAttention
from sparo_dino.model.readouts.sparo import SPARO, SPARO_DEFAULTS
from sparo_dino.model.readouts.sparo import check_readout_sizes as check_readout_sizes  # the options' size rules

if TYPE_CHECKING:
    from sparo_dino.model.backbone import DinoVisionTransformer


@dataclass(frozen=True)
class Option:
    """A read-out option: its default and the help of its flag (main_dino.py and the evaluations get `--<name>`)."""
    default: int | bool
    help: str


# Every read-out option. Flags, checkpoint configs and the evaluations' option keys are made from this table when
# they are imported, so a new option is declared here, not by a read-out registered later.
OPTIONS: Mapping[str, Option] = MappingProxyType({
    "num_slots": Option(SPARO_DEFAULTS["num_slots"], "L, number of slots"),
    "slot_dim": Option(SPARO_DEFAULTS["slot_dim"], "V, output size per slot"),
    "attn_dim": Option(SPARO_DEFAULTS["attn_dim"], "D, key/query size"),
    "group_size": Option(SPARO_DEFAULTS["group_size"], "g, consecutive slots sharing one key projection"),
    "slot_norm": Option(False, "slot-wise LayerNorm of each slot's attention output before the slot-wise "
                               "projection (paper Tab. 6)"),
    "slot_wise": Option(True, "LayerNorm and projection per slot (L chunks of D, shared weights); false: over the "
                              "whole L*D output, projected to L*V at once (paper Tab. 6)"),
})


@dataclass(frozen=True)
class Readout:
    """How a backbone reads its final-norm tokens (B, N, C) into the encoding.

    `build(backbone, **options)` returns the module, called on the tokens: it gives the encoding (B, F), or for a slot
    read-out the slots (B, L, V) (with `return_attention`, also (B, L, N) weights; attributes num_slots, slot_dim),
    flattened into the encoding. The backbone holds it as `attribute` (default: the name), the prefix of its weights
    in checkpoints. `replaces_block`: it takes the place of the last ViT block. `vit_kwargs`: what it asks of
    timm's VisionTransformer (attpool: timm builds it).
    """
    name: str
    build: Callable[..., nn.Module]
    options: tuple[str, ...] = ()
    replaces_block: bool = False
    has_slots: bool = False
    attribute: str = ""
    vit_kwargs: Mapping[str, Any] = field(default_factory=dict)


_READOUTS: dict[str, Readout] = {}
# Trunk sizes (embed_dim, depth, num_heads) by arch prefix.
SIZES: Mapping[str, tuple[int, int, int]] = MappingProxyType({
    "vit_tiny": (192, 12, 3), "vit_small": (384, 12, 6), "vit_base": (768, 12, 12)})


def register(readout: Readout) -> Readout:
    """Add a read-out (its archs are `<size>_<name>`); the name must be new and its options declared in OPTIONS."""
    if readout.name in _READOUTS:
        raise ValueError(f"a read-out named {readout.name!r} is registered already")
    if not readout.name.isidentifier() or "_" in readout.name:
        raise ValueError(f"read-out name {readout.name!r} must be one word (it is the arch's last part)")
    undeclared = [name for name in readout.options if name not in OPTIONS]
    if undeclared:
        raise ValueError(f"read-out {readout.name} takes undeclared option(s) {', '.join(undeclared)}; declare them "
                         "in sparo_dino.model.registry.OPTIONS")
    readout = replace(readout, attribute=readout.attribute or readout.name)
    _READOUTS[readout.name] = readout
    return readout


def unregister(name: str) -> None:
    """Remove a read-out registered by a plug-in (tests register theirs for one run)."""
    del _READOUTS[name]


def names() -> tuple[str, ...]:
    return tuple(_READOUTS)


def get(name: str) -> Readout:
    if name not in _READOUTS:
        raise ValueError(f"unknown read-out {name!r}; valid: {', '.join(_READOUTS)}")
    return _READOUTS[name]


def archs() -> tuple[str, ...]:
    """Every arch name: the sizes alone (cls), then each other read-out on every size."""
    return tuple(f"{size}_{name}" if name != "cls" else size for name in _READOUTS for size in SIZES)


def split_arch(arch: str) -> tuple[str, Readout]:
    """(trunk size, read-out) of an arch name: "vit_small_sparo" -> ("vit_small", the sparo entry)."""
    if arch not in archs():
        raise ValueError(f"unknown arch {arch!r}; valid archs: {', '.join(archs())}")
    parts = arch.split("_")
    return "_".join(parts[:2]), _READOUTS[parts[2] if len(parts) > 2 else "cls"]


def readout_of(arch: str) -> str:
    return split_arch(arch)[1].name


def has_slots(arch: str) -> bool:
    """Whether the arch's encoding is L slots of V dims (per-slot k-NN, slot maps and galleries apply)."""
    return split_arch(arch)[1].has_slots


def arch_patterns(trait: str) -> str:
    """The read-outs with `trait` ("has_slots", "replaces_block") as arch patterns for messages: "*_mhca, *_sparo"."""
    return ", ".join(f"*_{readout.name}" for readout in _READOUTS.values() if getattr(readout, trait))


def option_defaults() -> dict[str, int | bool]:
    return {name: option.default for name, option in OPTIONS.items()}



def takers(option: str) -> str:
    """The read-outs taking `option`, for its flag's help: "_mhca, _sparo"."""
    return ", ".join(f"_{readout.name}" for readout in _READOUTS.values() if option in readout.options)


def reject_readout_options(arch: str, given: Sequence[str]) -> None:
    """Raise ValueError when read-out options are given to an arch whose read-out does not take them (they would
    silently do nothing); `given` names them as the user wrote them ("--num_slots" or "num_slots")."""
    size, readout = split_arch(arch)
    wrong = [name for name in given if name.lstrip("-") not in readout.options]
    if wrong:
        able = [r.name for r in _READOUTS.values() if all(name.lstrip("-") in r.options for name in wrong)]
        archs = [f"{size}_{r}" for r in able]
        suggestion = f"; use {', '.join(archs[:-1])} or {archs[-1]}" if len(archs) > 1 else \
            (f"; use {archs[0]}" if archs else "")
        verb = "does" if len(wrong) == 1 else "do"
        raise ValueError(f"{', '.join(wrong)} {verb} not apply to the {readout.name} read-out of {arch}{suggestion}")


def _mhca(backbone: DinoVisionTransformer, **options: Any) -> nn.Module:
    return MultiHeadCrossAttention(backbone.embed_dim, backbone.num_heads, **options)


def _sparo(backbone: DinoVisionTransformer, **options: Any) -> nn.Module:
    return SPARO(backbone.embed_dim, **options)


def _mhmix(backbone: DinoVisionTransformer, **options: Any) -> nn.Module:
    return MixedHeadCrossAttention(backbone.embed_dim, **options)


# The built-in read-outs, in the order of the arch list. attpool, mhca, sparo and mhmix replace the N-th block.
register(Readout("cls", pooling.cls_token))
register(Readout("gap", pooling.mean_patch_tokens))
register(Readout("attpool", pooling.timm_attention_pool, replaces_block=True, attribute="attn_pool",
                 vit_kwargs={"global_pool": "map"}))
register(Readout("mhca", _mhca, ("num_slots", "slot_dim", "slot_norm"), replaces_block=True, has_slots=True))
register(Readout("sparo", _sparo, ("num_slots", "slot_dim", "attn_dim", "group_size", "slot_norm"),
                 replaces_block=True, has_slots=True))
register(Readout("mhmix", _mhmix, ("num_slots", "slot_dim", "attn_dim", "slot_wise"), replaces_block=True,
                 has_slots=True))
