"""SPARO read-out and the ViT backbones it sits on (paper Sec. 3.2, 3.4, Appendix A).

A SPARO backbone is a timm VisionTransformer whose last block is replaced by L single-head attentions with
learned queries; its encoding is the concatenation of the L slot outputs, left unnormalized because k-NN and the
linear probe consume it as is. Baselines (`vit_tiny|small|base`) keep all blocks and return the final-norm CLS
token, as official DINO does. The DINO head and the multi-crop wrapper live here too, so one file holds every
module whose parameter names end up in checkpoints.
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
SPARO_OPTIONS: tuple[str, ...] = tuple(SPARO_DEFAULTS)


class SPARO(nn.Module):
    """L single-head attentions with learned queries over all tokens (paper eq. 1).

    Slot l computes y_l = W K_g H^T softmax(H K_g^T q_l / sqrt(D)) with g = l // group_size: the key projection is
    also the value projection, and W is shared by all slots. `key` rows are group-major, so rows
    [j*attn_dim:(j+1)*attn_dim] are key group j.
    """

    def __init__(self, embed_dim: int, num_slots: int = SPARO_DEFAULTS["num_slots"],
                 slot_dim: int = SPARO_DEFAULTS["slot_dim"], attn_dim: int = SPARO_DEFAULTS["attn_dim"],
                 group_size: int = SPARO_DEFAULTS["group_size"]) -> None:
        super().__init__()
        if min(embed_dim, num_slots, slot_dim, attn_dim, group_size) < 1:
            raise ValueError("SPARO sizes must be positive: "
                             f"embed_dim={embed_dim} num_slots={num_slots} slot_dim={slot_dim} "
                             f"attn_dim={attn_dim} group_size={group_size}")
        if num_slots % group_size:
            raise ValueError(f"num_slots ({num_slots}) must be a multiple of group_size ({group_size})")
        self.num_slots, self.slot_dim, self.attn_dim, self.group_size = num_slots, slot_dim, attn_dim, group_size
        self.num_groups = num_slots // group_size
        self.query = nn.Parameter(torch.empty(num_slots, attn_dim))
        self.key = nn.Linear(embed_dim, self.num_groups * attn_dim)
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
            slots = self.proj(mixed.reshape(batch, self.num_slots, self.attn_dim))
            return slots, attention.reshape(batch, self.num_slots, -1)
        mixed = F.scaled_dot_product_attention(queries, keys, keys)
        return self.proj(mixed.reshape(batch, self.num_slots, self.attn_dim))


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
ARCHS: tuple[str, ...] = tuple(list(_SIZES) + [f"{name}_sparo" for name in _SIZES])
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


def is_sparo_arch(arch: str) -> bool:
    return arch.endswith("_sparo")


def reject_sparo_options(arch: str, given: Sequence[str]) -> None:
    """Raise ValueError when SPARO options are given to a baseline arch, where they would silently do nothing.

    The one check of this rule: build_backbone applies it to its keyword arguments, main_dino's flag validation to
    the flags that differ from SPARO_DEFAULTS, the evaluations to the SPARO flags given with a baseline's weights.
    `given` names the options as the user wrote them."""
    if given and not is_sparo_arch(arch):
        raise ValueError(f"{', '.join(given)} need a SPARO arch, not baseline arch {arch!r}; use {arch}_sparo")


class DinoVisionTransformer(VisionTransformer):
    """timm's ViT (fused SDPA attention, drop-path, grad checkpointing, any input size) with a DINO read-out.

    `forward(images)` returns the encoding: the final-norm CLS token for baselines, the flattened SPARO slots
    (computed on all final-norm tokens, CLS included) when `sparo` is set. Crops of another size than img_size get
    their position embeddings by official DINO's interpolation unless pos_embed_interpolation="timm".
    """

    def __init__(self, *, embed_dim: int, depth: int, num_heads: int, patch_size: int, img_size: int,
                 drop_path_rate: float, sparo: dict[str, int] | None, pos_embed_interpolation: str = "dino") -> None:
        if pos_embed_interpolation not in POS_EMBED_INTERPOLATIONS:
            raise ValueError(f"unknown pos_embed_interpolation {pos_embed_interpolation!r}; valid: "
                             f"{', '.join(POS_EMBED_INTERPOLATIONS)}")
        super().__init__(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim,
                         depth=depth - 1 if sparo else depth, num_heads=num_heads, mlp_ratio=4.0,
                         qkv_bias=True, num_classes=0, global_pool="token", dynamic_img_size=True,
                         drop_path_rate=drop_path_rate)
        trunc_normal_(self.cls_token, std=0.02)  # official DINO init (timm uses 1e-6)
        self.pos_embed_interpolation = pos_embed_interpolation
        self.sparo = SPARO(embed_dim, **sparo) if sparo else None
        self.num_features = (sparo["num_slots"] * sparo["slot_dim"] if sparo else embed_dim)

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

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.tokens(images)
        if self.sparo is None:
            return tokens[:, 0]
        return self.sparo(tokens).flatten(1)


def build_backbone(arch: str, patch_size: int = 16, img_size: int = 224, drop_path_rate: float = 0.0,
                   grad_checkpointing: bool = False, pos_embed_interpolation: str = "dino",
                   **sparo_options: int) -> DinoVisionTransformer:
    """Build a baseline or SPARO backbone by name.

    SPARO options (num_slots, slot_dim, attn_dim, group_size) default to L = V = D = 64, g = 1; giving them to a
    baseline arch is an error, since they would silently do nothing. pos_embed_interpolation: see
    POS_EMBED_INTERPOLATIONS.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; valid archs: {', '.join(ARCHS)}")
    unknown = sorted(set(sparo_options) - set(SPARO_OPTIONS))
    if unknown:
        raise TypeError(f"unknown backbone option(s) {', '.join(unknown)}; SPARO options: {', '.join(SPARO_OPTIONS)}")
    reject_sparo_options(arch, sorted(sparo_options))
    sparo = {**SPARO_DEFAULTS, **{k: int(v) for k, v in sparo_options.items()}} if is_sparo_arch(arch) else None
    if img_size % patch_size:
        raise ValueError(f"img_size {img_size} is not divisible by patch_size {patch_size}")
    spec = _SIZES[arch.removesuffix("_sparo")]
    model = DinoVisionTransformer(embed_dim=spec.embed_dim, depth=spec.depth, num_heads=spec.num_heads,
                                  patch_size=patch_size, img_size=img_size, drop_path_rate=drop_path_rate,
                                  sparo=sparo, pos_embed_interpolation=pos_embed_interpolation)
    model.set_grad_checkpointing(grad_checkpointing)
    return model


def backbone_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
    """The build_backbone arguments held in a flat run config (CLI flags or a checkpoint's `config`).

    Training and evaluation both build backbones from configs; this keeps the SPARO-only options away from
    baseline archs in one place.
    """
    kwargs: dict[str, Any] = {"arch": config["arch"]}
    for key in ("patch_size", "img_size", "drop_path_rate", "grad_checkpointing", "pos_embed_interpolation"):
        if config.get(key) is not None:
            kwargs[key] = config[key]
    if is_sparo_arch(config["arch"]):
        kwargs.update({key: config[key] for key in SPARO_OPTIONS if config.get(key) is not None})
    return kwargs


def _register(arch: str) -> None:
    def create(pretrained: bool = False, **kwargs: Any) -> DinoVisionTransformer:
        if pretrained:
            raise ValueError(f"no pretrained weights are published for {arch}; "
                             "load a file with sparo_dino.weights.load_pretrained_trunk")
        kwargs.pop("pretrained_cfg", None)
        kwargs.pop("pretrained_cfg_overlay", None)
        kwargs.pop("cache_dir", None)
        return build_backbone(arch, **kwargs)

    create.__name__ = arch
    create.__qualname__ = arch
    create.__module__ = __name__
    register_model(create)


for _arch in ARCHS:
    if is_sparo_arch(_arch):
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

    Maps are not renormalized after dropping CLS, so a slot that mostly reads CLS shows a faint map.
    """
    if getattr(backbone, "sparo", None) is None:
        raise ValueError("slot attention maps need a SPARO backbone (an arch ending in _sparo)")
    tokens = backbone.tokens(images)
    _, attention = backbone.sparo(tokens, return_attention=True)
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
