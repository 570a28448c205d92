"""SPARO read-out, the read-outs it is compared with, and the ViT backbones they sit on (paper Sec. 3.2, 3.4,
5.3, Appendix A).

The read-out is the arch name's suffix, so checkpoints, hub entry points and flags all name it the same way:
`vit_<size>` keeps all N blocks and returns the final-norm CLS token (official DINO), `_gap` the mean final-norm
patch token after N blocks; `_attpool`, `_mhca` and `_sparo` replace the N-th block. A SPARO backbone reads the
tokens with L single-head attentions with learned queries; its encoding is the concatenation of the L slot
outputs, left unnormalized because k-NN and the linear probe consume it as is. The DINO head and the multi-crop
wrapper live here too, so one file holds every module whose parameter names end up in checkpoints.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer

# The paper's DINO setting L = V = D = 64, g = 1: SPARO's signature, build_backbone and main_dino's flags all read
# this one table (read-only, so no caller can change the defaults of the others).
SPARO_DEFAULTS: Mapping[str, int] = MappingProxyType({"num_slots": 64, "slot_dim": 64, "attn_dim": 64,
                                                      "group_size": 1})
# Read-outs by arch suffix (cls has none). attpool, mhca and sparo replace the last block; mhca and sparo give
# slot-structured encodings (L slots of V dims), which the per-slot tools read.
READOUTS: tuple[str, ...] = ("cls", "gap", "attpool", "mhca", "sparo")
SLOT_READOUTS: tuple[str, ...] = ("mhca", "sparo")
# Every read-out option with its default: SPARO's sizes, and slot_norm (Tab. 6's slot-wise LayerNorm of each slot's
# attention output before the slot-wise projection; off in the paper's DINO setting).
READOUT_DEFAULTS: Mapping[str, int | bool] = MappingProxyType({**SPARO_DEFAULTS, "slot_norm": False})
READOUT_OPTIONS: tuple[str, ...] = tuple(READOUT_DEFAULTS)
# Which options each read-out takes; giving one another read-out's option is an error (it would do nothing).
OPTIONS_OF_READOUT: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "cls": (), "gap": (), "attpool": (), "mhca": ("num_slots", "slot_dim", "slot_norm"), "sparo": READOUT_OPTIONS})


class SPARO(nn.Module):
    """L single-head attentions with learned queries over all tokens (paper eq. 1).

    Slot l computes y_l = W K_g H^T softmax(H K_g^T q_l / sqrt(D)) with g = l // group_size: the key projection is
    also the value projection, and W is shared by all slots. `key` rows are group-major, so rows
    [j*attn_dim:(j+1)*attn_dim] are key group j. With slot_norm, each slot's attention output goes through one
    shared LayerNorm before W (Tab. 6's slot-wise LayerNorm); without it the module is exactly the paper's.
    """

    def __init__(self, embed_dim: int, num_slots: int = SPARO_DEFAULTS["num_slots"],
                 slot_dim: int = SPARO_DEFAULTS["slot_dim"], attn_dim: int = SPARO_DEFAULTS["attn_dim"],
                 group_size: int = SPARO_DEFAULTS["group_size"], slot_norm: bool = False) -> None:
        super().__init__()
        if embed_dim < 1:
            raise ValueError(f"SPARO needs a positive embed_dim, got {embed_dim}")
        check_readout_sizes({"num_slots": num_slots, "slot_dim": slot_dim, "attn_dim": attn_dim,
                             "group_size": group_size})
        self.num_slots, self.slot_dim, self.attn_dim, self.group_size = num_slots, slot_dim, attn_dim, group_size
        self.num_groups = num_slots // group_size
        self.query = nn.Parameter(torch.empty(num_slots, attn_dim))
        self.key = nn.Linear(embed_dim, self.num_groups * attn_dim)
        self.norm = nn.LayerNorm(attn_dim) if slot_norm else nn.Identity()
        self.proj = nn.Linear(attn_dim, slot_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Appendix A: queries ~ N(0, 1), xavier-uniform keys with zero bias, zero bias for W."""
        nn.init.normal_(self.query, mean=0.0, std=1.0)
        nn.init.xavier_uniform_(self.key.weight)
        nn.init.zeros_(self.key.bias)
        nn.init.zeros_(self.proj.bias)

    def _keys_and_queries(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (B, G, N, D) and queries (B, G, g, D): the g slots of a group attend as one query sequence, so
        the group_size-fold expansion of the keys is never built."""
        batch, num_tokens, _ = tokens.shape
        keys = self.key(tokens).view(batch, num_tokens, self.num_groups, self.attn_dim).transpose(1, 2)
        queries = self.query.to(keys.dtype).view(1, self.num_groups, self.group_size, self.attn_dim)
        return keys, queries.expand(batch, -1, -1, -1)

    def forward(self, tokens: torch.Tensor, return_attention: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """(B, N, embed_dim) -> slots (B, L, V); with return_attention also the weights (B, L, N)."""
        if tokens.dim() != 3:
            raise ValueError(f"SPARO expects tokens of shape (B, N, embed_dim), got {tuple(tokens.shape)}")
        keys, queries = self._keys_and_queries(tokens)
        batch = tokens.shape[0]
        if return_attention:
            scores = queries @ keys.transpose(-2, -1) / math.sqrt(self.attn_dim)
            attention = scores.softmax(dim=-1)
            mixed = attention @ keys
            slots = self.proj(self.norm(mixed.reshape(batch, self.num_slots, self.attn_dim)))
            return slots, attention.reshape(batch, self.num_slots, -1)
        mixed = F.scaled_dot_product_attention(queries, keys, keys)
        return self.proj(self.norm(mixed.reshape(batch, self.num_slots, self.attn_dim)))


class MultiHeadCrossAttention(nn.Module):
    """L learned queries read the tokens with standard multi-head attention: Tab. 6's "multi-head" ablation of SPARO.

    Every slot attends with all heads (torch's nn.MultiheadAttention: query, key, value and output projections of
    the full width C), so a slot is not limited to one attention pattern; a projection C -> V shared by all slots
    then gives the L x V encoding SPARO gives, optionally after a slot-wise LayerNorm. Queries start as SPARO's do,
    N(0, 1).
    """

    def __init__(self, embed_dim: int, num_heads: int, num_slots: int = SPARO_DEFAULTS["num_slots"],
                 slot_dim: int = SPARO_DEFAULTS["slot_dim"], slot_norm: bool = False) -> None:
        super().__init__()
        if min(embed_dim, num_heads, num_slots, slot_dim) < 1 or embed_dim % num_heads:
            raise ValueError(f"multi-head cross-attention needs positive sizes and embed_dim divisible by num_heads: "
                             f"embed_dim={embed_dim} num_heads={num_heads} num_slots={num_slots} slot_dim={slot_dim}")
        self.num_slots, self.slot_dim = num_slots, slot_dim
        self.query = nn.Parameter(torch.empty(num_slots, embed_dim))
        self.attention = nn.MultiheadAttention(embed_dim, num_heads, batch_first=True)
        self.norm = nn.LayerNorm(embed_dim) if slot_norm else nn.Identity()
        self.proj = nn.Linear(embed_dim, slot_dim)
        nn.init.normal_(self.query, mean=0.0, std=1.0)
        nn.init.zeros_(self.proj.bias)

    def forward(self, tokens: torch.Tensor, return_attention: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """(B, N, embed_dim) -> slots (B, L, V); with return_attention also the head-averaged weights (B, L, N)."""
        if tokens.dim() != 3:
            raise ValueError(f"multi-head cross-attention expects tokens (B, N, embed_dim), got {tuple(tokens.shape)}")
        queries = self.query.to(tokens.dtype).expand(tokens.shape[0], -1, -1)
        mixed, attention = self.attention(queries, tokens, tokens, need_weights=return_attention)
        slots = self.proj(self.norm(mixed))
        return (slots, attention) if return_attention else slots


@dataclass(frozen=True)
class _ArchSpec:
    embed_dim: int
    depth: int
    num_heads: int


_SIZES = {
    "vit_tiny": _ArchSpec(192, 12, 3),
    "vit_small": _ArchSpec(384, 12, 6),
    "vit_base": _ArchSpec(768, 12, 12),
}
ARCHS: tuple[str, ...] = tuple(list(_SIZES) + [f"{size}_{readout}" for readout in READOUTS[1:] for size in _SIZES])
# How position embeddings reach a crop whose patch grid differs from img_size's: "dino" is official DINO's
# interpolation (the default: 96 px local crops then see exactly what the official ViT gives them), "timm" is
# timm's resample_abs_pos_embed (by output size, antialiased when shrinking).
POS_EMBED_INTERPOLATIONS: tuple[str, ...] = ("dino", "timm")
# Official DINO adds this to the target grid before deriving the scale factor, so that floating-point error cannot
# round the interpolated grid down a patch (its checkpoints were trained with it).
DINO_INTERPOLATE_OFFSET = 0.1


def interpolate_pos_embed_dino(pos_embed: torch.Tensor, grid: tuple[int, int], num_prefix_tokens: int
                               ) -> torch.Tensor:
    """Official DINO's position-embedding interpolation for a (grid_h, grid_w) patch grid.

    The stored patch grid (square, side sqrt(N)) is resized by bicubic F.interpolate with
    scale_factor = ((grid_h + 0.1) / sqrt(N), (grid_w + 0.1) / sqrt(N)), no antialiasing and align_corners=False.
    Giving the scale factor rather than the size matters: torch then maps output to input coordinates with that
    factor, not with grid / sqrt(N), which is what official checkpoints were trained with. The stored grid itself is
    returned unchanged, as official DINO does.
    """
    prefix, patches = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    side = math.isqrt(patches.shape[1])
    if side * side != patches.shape[1]:
        raise ValueError(f"position embeddings of {patches.shape[1]} patches are not a square grid")
    if tuple(grid) == (side, side):
        return pos_embed
    dim = patches.shape[-1]
    scale = ((grid[0] + DINO_INTERPOLATE_OFFSET) / side, (grid[1] + DINO_INTERPOLATE_OFFSET) / side)
    resized = F.interpolate(patches.reshape(1, side, side, dim).permute(0, 3, 1, 2), scale_factor=scale,
                            mode="bicubic", align_corners=False)
    if tuple(resized.shape[-2:]) != tuple(grid):
        raise ValueError(f"DINO interpolation of a {side}x{side} grid gave {tuple(resized.shape[-2:])}, "
                         f"expected {tuple(grid)}")
    resized = resized.permute(0, 2, 3, 1).reshape(1, -1, dim)
    return torch.cat([prefix, resized], dim=1)


def split_arch(arch: str) -> tuple[str, str]:
    """(trunk size, read-out) of an arch name: "vit_small_sparo" -> ("vit_small", "sparo")."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; valid archs: {', '.join(ARCHS)}")
    parts = arch.split("_")
    return "_".join(parts[:2]), (parts[2] if len(parts) > 2 else "cls")


def readout_of(arch: str) -> str:
    return split_arch(arch)[1]


def is_sparo_arch(arch: str) -> bool:
    return readout_of(arch) == "sparo"


def has_slots(arch: str) -> bool:
    """Whether the arch's encoding is L slots of V dims (per-slot k-NN, slot maps and galleries apply)."""
    return readout_of(arch) in SLOT_READOUTS


def check_readout_sizes(sizes: Mapping[str, Any], prefix: str = "") -> None:
    """Raise ValueError unless the given read-out sizes (num_slots, slot_dim, attn_dim, group_size; None: not given)
    are >= 1 and num_slots is a multiple of group_size. The one check of these rules: the modules apply it to their
    arguments, the scripts to their flags before any model is built (`prefix` "--" names them as the user wrote
    them)."""
    for key in ("num_slots", "slot_dim", "attn_dim", "group_size"):
        value = sizes.get(key)
        if value is not None and value < 1:
            raise ValueError(f"{prefix}{key} must be >= 1, got {value}")
    num_slots, group_size = sizes.get("num_slots"), sizes.get("group_size")
    if num_slots is not None and group_size is not None and num_slots % group_size:
        raise ValueError(f"{prefix}num_slots {num_slots} must be a multiple of {prefix}group_size {group_size}")


def reject_readout_options(arch: str, given: Sequence[str]) -> None:
    """Raise ValueError when read-out options are given to an arch whose read-out does not take them, where they
    would silently do nothing.

    The one check of this rule: build_backbone applies it to its keyword arguments, main_dino's flag validation to
    the flags that differ from READOUT_DEFAULTS, the evaluations to the read-out flags given with weights. `given`
    names the options as the user wrote them ("--num_slots" or "num_slots")."""
    size, readout = split_arch(arch)
    wrong = [name for name in given if name.lstrip("-") not in OPTIONS_OF_READOUT[readout]]
    if wrong:
        takers = [r for r in READOUTS if all(name.lstrip("-") in OPTIONS_OF_READOUT[r] for name in wrong)]
        suggestion = f"; use {' or '.join(f'{size}_{r}' for r in takers)}" if takers else ""
        verb = "does" if len(wrong) == 1 else "do"
        raise ValueError(f"{', '.join(wrong)} {verb} not apply to the {readout} read-out of {arch}{suggestion}")


class DinoVisionTransformer(VisionTransformer):
    """timm's ViT (fused SDPA attention, drop-path, grad checkpointing, any input size) with a DINO read-out.

    `forward(images)` returns the encoding: for cls the final-norm CLS token, for gap the mean final-norm patch
    token, for attpool timm's attention pooling (one learned latent, the `map` head of timm's ViTs) and for mhca and
    sparo the flattened slots; attpool, mhca and sparo read all final-norm tokens of the N-1 remaining blocks, CLS
    included. Crops of another size than img_size get their position embeddings by official DINO's interpolation
    unless pos_embed_interpolation="timm".
    """

    def __init__(self, *, embed_dim: int, depth: int, num_heads: int, patch_size: int, img_size: int,
                 drop_path_rate: float, readout: str = "cls", readout_options: Mapping[str, Any] | None = None,
                 pos_embed_interpolation: str = "dino") -> None:
        if pos_embed_interpolation not in POS_EMBED_INTERPOLATIONS:
            raise ValueError(f"unknown pos_embed_interpolation {pos_embed_interpolation!r}; valid: "
                             f"{', '.join(POS_EMBED_INTERPOLATIONS)}")
        if readout not in READOUTS:
            raise ValueError(f"unknown read-out {readout!r}; valid: {', '.join(READOUTS)}")
        options = {**{key: READOUT_DEFAULTS[key] for key in OPTIONS_OF_READOUT[readout]}, **(readout_options or {})}
        replaces_block = readout in ("attpool", "mhca", "sparo")
        super().__init__(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim,
                         depth=depth - 1 if replaces_block else depth, num_heads=num_heads, mlp_ratio=4.0,
                         qkv_bias=True, num_classes=0, global_pool="map" if readout == "attpool" else "token",
                         dynamic_img_size=True, drop_path_rate=drop_path_rate)
        trunc_normal_(self.cls_token, std=0.02)  # official DINO init (timm uses 1e-6)
        self.readout = readout
        self.pos_embed_interpolation = pos_embed_interpolation
        # Registered under the read-out's name, so checkpoints say which read-out their weights belong to.
        self.sparo = SPARO(embed_dim, **options) if readout == "sparo" else None
        self.mhca = MultiHeadCrossAttention(embed_dim, num_heads, **options) if readout == "mhca" else None
        slots = self.slot_readout
        self.num_features = slots.num_slots * slots.slot_dim if slots is not None else embed_dim

    @property
    def slot_readout(self) -> SPARO | MultiHeadCrossAttention | None:
        """The slot-structured read-out (SPARO or multi-head cross-attention), None for the others."""
        return self.sparo if self.sparo is not None else self.mhca

    def readout_parameter_count(self) -> int:
        """Parameters of what follows the N-1 blocks every read-out shares: the N-th block for cls and gap, the
        read-out module for the others. The number to compare when asking whether a read-out is "the same size"."""
        if self.readout in ("cls", "gap"):
            module: nn.Module = self.blocks[-1]
        else:
            module = self.attn_pool if self.readout == "attpool" else self.slot_readout
        return sum(parameter.numel() for parameter in module.parameters())

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, h, w, C) patch embeddings -> (B, 1 + h*w, C) tokens with CLS and position embeddings added."""
        if self.pos_embed_interpolation == "timm":
            return super()._pos_embed(x)
        batch, grid_h, grid_w, dim = x.shape
        pos_embed = interpolate_pos_embed_dino(self.pos_embed, (grid_h, grid_w), self.num_prefix_tokens)
        tokens = torch.cat([self.cls_token.expand(batch, -1, -1), x.reshape(batch, -1, dim)], dim=1)
        return self.pos_drop(tokens + pos_embed)

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """All tokens after the trunk and the final LayerNorm, (B, 1 + h*w, embed_dim)."""
        patch = self.patch_embed.patch_size
        if images.shape[-2] % patch[0] or images.shape[-1] % patch[1]:
            raise ValueError(f"image size {tuple(images.shape[-2:])} is not divisible by the patch size {patch}")
        return self.forward_features(images)

    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """The encoding from the final-norm tokens of `tokens()`."""
        if self.readout == "cls":
            return tokens[:, 0]
        if self.readout == "gap":
            return tokens[:, self.num_prefix_tokens:].mean(dim=1)
        if self.readout == "attpool":
            return self.attn_pool(tokens)
        return self.slot_readout(tokens).flatten(1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode_tokens(self.tokens(images))


def build_backbone(arch: str, patch_size: int = 16, img_size: int = 224, drop_path_rate: float = 0.0,
                   grad_checkpointing: bool = False, pos_embed_interpolation: str = "dino",
                   **readout_options: int | bool) -> DinoVisionTransformer:
    """Build a backbone by name: trunk size and read-out (see the module docstring and ARCHS).

    Read-out options (num_slots, slot_dim, attn_dim, group_size, slot_norm; OPTIONS_OF_READOUT says which read-out
    takes which) default to the paper's L = V = D = 64, g = 1, no slot norm; giving one to a read-out that does not
    take it is an error, since it would silently do nothing. pos_embed_interpolation: see POS_EMBED_INTERPOLATIONS.
    """
    size, readout = split_arch(arch)
    unknown = sorted(set(readout_options) - set(READOUT_OPTIONS))
    if unknown:
        raise TypeError(f"unknown backbone option(s) {', '.join(unknown)}; read-out options: "
                        f"{', '.join(READOUT_OPTIONS)}")
    reject_readout_options(arch, sorted(readout_options))
    options = {key: (bool(value) if key == "slot_norm" else int(value)) for key, value in readout_options.items()}
    if min(patch_size, img_size) < 1:
        raise ValueError(f"patch_size and img_size must be >= 1, got {patch_size} and {img_size}")
    if img_size % patch_size:
        raise ValueError(f"img_size {img_size} is not divisible by patch_size {patch_size}")
    spec = _SIZES[size]
    model = DinoVisionTransformer(embed_dim=spec.embed_dim, depth=spec.depth, num_heads=spec.num_heads,
                                  patch_size=patch_size, img_size=img_size, drop_path_rate=drop_path_rate,
                                  readout=readout, readout_options=options,
                                  pos_embed_interpolation=pos_embed_interpolation)
    model.set_grad_checkpointing(grad_checkpointing)
    return model


def backbone_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
    """The build_backbone arguments held in a flat run config (CLI flags or a checkpoint's `config`).

    Training and evaluation both build backbones from configs; this keeps each read-out's options away from the
    other read-outs in one place.
    """
    kwargs: dict[str, Any] = {"arch": config["arch"]}
    for key in ("patch_size", "img_size", "drop_path_rate", "grad_checkpointing", "pos_embed_interpolation"):
        if config.get(key) is not None:
            kwargs[key] = config[key]
    kwargs.update({key: config[key] for key in OPTIONS_OF_READOUT[readout_of(config["arch"])]
                   if config.get(key) is not None})
    return kwargs


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


class DINOHead(nn.Module):
    """The official DINO projection head: MLP -> L2-normalize -> weight-normalized linear to out_dim.

    Uses torch's parametrization weight norm (the old nn.utils.weight_norm is deprecated); with norm_last_layer
    the magnitude is fixed at 1, which the official recipe relies on for stability.
    """

    def __init__(self, in_dim: int, out_dim: int, use_bn: bool = False, norm_last_layer: bool = True,
                 nlayers: int = 3, hidden_dim: int = 2048, bottleneck_dim: int = 256) -> None:
        super().__init__()
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp: nn.Module = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = []
            dims = [in_dim] + [hidden_dim] * (nlayers - 1)
            for d_in, d_out in zip(dims[:-1], dims[1:]):
                layers.append(nn.Linear(d_in, d_out))
                if use_bn:
                    layers.append(nn.BatchNorm1d(d_out))
                layers.append(nn.GELU())
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        for module in self.mlp.modules():
            if isinstance(module, nn.Linear):
                trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        self.last_layer = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        magnitude = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            magnitude.fill_(1.0)
        magnitude.requires_grad_(not norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The last layer's outputs are cosines in [-1, 1]: in bf16 they are rounded to ~0.004, which the teacher's
        # temperature 0.04 turns into ~0.1 nats of noise. From the normalization on, the head computes in fp32.
        x = self.mlp(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = F.normalize(x.float(), dim=-1, p=2)
            return self.last_layer(x)


class MultiCropWrapper(nn.Module):
    """Backbone once per run of same-resolution crops, head once on everything (official DINO batching)."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, crops: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        if isinstance(crops, torch.Tensor):
            crops = [crops]
        encodings, start = [], 0
        while start < len(crops):
            end = start + 1
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            encodings.append(self.backbone(torch.cat(list(crops[start:end]))))
            start = end
        return self.head(torch.cat(encodings))


@torch.no_grad()
def slot_attention_maps(backbone: DinoVisionTransformer, images: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-slot attention over patch tokens as (B, L, h, w), and the share each slot puts on CLS as (B, L).

    For mhca a slot's map is its attention averaged over heads. Maps are not renormalized after dropping CLS, so a
    slot that mostly reads CLS shows a faint map.
    """
    if getattr(backbone, "slot_readout", None) is None:
        raise ValueError("slot attention maps need a slot read-out (an arch ending in _sparo or _mhca)")
    tokens = backbone.tokens(images)
    _, attention = backbone.slot_readout(tokens, return_attention=True)
    prefix = backbone.num_prefix_tokens
    grid_h = images.shape[-2] // backbone.patch_embed.patch_size[0]
    grid_w = images.shape[-1] // backbone.patch_embed.patch_size[1]
    maps = attention[:, :, prefix:].reshape(attention.shape[0], attention.shape[1], grid_h, grid_w)
    return maps, attention[:, :, :prefix].sum(dim=-1)


@torch.no_grad()
def cls_attention_maps(backbone: DinoVisionTransformer, images: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each head's attention of the CLS query over the patch tokens in the last block, as (B, heads, h, w), and
    the share each head puts on CLS as (B, heads): what official DINO's visualize_attention.py draws.

    timm's fused attention returns no weights, so softmax(q k^T * scale) is recomputed for the CLS query from the
    last block's own norm1 and qkv on that block's input, captured during the normal forward pass (same position
    embeddings, any image size). For a SPARO backbone the last block is the trunk's last one, before the read-out.
    Maps are not renormalized after dropping CLS, as in slot_attention_maps.
    """
    block = backbone.blocks[-1]
    captured: list[torch.Tensor] = []
    hook = block.register_forward_pre_hook(lambda module, inputs: captured.append(inputs[0]))
    try:
        backbone.tokens(images)
    finally:
        hook.remove()
    x, attn = block.norm1(captured[0]), block.attn
    batch, num_tokens, _ = x.shape
    qkv = attn.qkv(x).reshape(batch, num_tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    query, keys = attn.q_norm(qkv[0][:, :, :1]), attn.k_norm(qkv[1])
    weights = ((query * attn.scale) @ keys.transpose(-2, -1)).softmax(dim=-1)[:, :, 0]  # (B, heads, N)
    prefix = backbone.num_prefix_tokens
    grid_h = images.shape[-2] // backbone.patch_embed.patch_size[0]
    grid_w = images.shape[-1] // backbone.patch_embed.patch_size[1]
    return weights[:, :, prefix:].reshape(batch, attn.num_heads, grid_h, grid_w), weights[:, :, :prefix].sum(dim=-1)
