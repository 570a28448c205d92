"""The ViT backbone every read-out sits on: timm's VisionTransformer, official DINO's position embeddings, and the
read-out named by the arch's suffix (sparo_dino/model/registry.py)."""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_
from timm.models.vision_transformer import VisionTransformer

from sparo_dino.model import registry

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


class DinoVisionTransformer(VisionTransformer):
    """timm's ViT (fused SDPA attention, drop-path, grad checkpointing, any input size) with a DINO read-out.

    `forward(images)` returns the encoding: the read-out module applied to all final-norm tokens (CLS included) of
    the N blocks, or of N-1 where the read-out replaces the last block; slot read-outs' slots are flattened.
    """

    def __init__(self, *, embed_dim: int, depth: int, num_heads: int, patch_size: int, img_size: int,
                 drop_path_rate: float, readout: str = "cls", readout_options: Mapping[str, Any] | None = None,
                 pos_embed_interpolation: str = "dino") -> None:
        if pos_embed_interpolation not in POS_EMBED_INTERPOLATIONS:
            raise ValueError(f"unknown pos_embed_interpolation {pos_embed_interpolation!r}; valid: "
                             f"{', '.join(POS_EMBED_INTERPOLATIONS)}")
        spec = registry.get(readout)
        options = {**{key: registry.OPTIONS[key].default for key in spec.options}, **(readout_options or {})}
        super().__init__(img_size=img_size, patch_size=patch_size, embed_dim=embed_dim,
                         depth=depth - 1 if spec.replaces_block else depth, num_heads=num_heads, mlp_ratio=4.0,
                         qkv_bias=True, num_classes=0, dynamic_img_size=True, drop_path_rate=drop_path_rate,
                         **{"global_pool": "token", **spec.vit_kwargs})
        trunc_normal_(self.cls_token, std=0.02)  # official DINO init (timm uses 1e-6)
        self.readout = readout
        self.readout_spec = spec  # kept, so a forward reads no registry
        self.num_heads = num_heads
        self.pos_embed_interpolation = pos_embed_interpolation
        # Registered under the read-out's name, so checkpoints say which read-out their weights belong to.
        setattr(self, spec.attribute, spec.build(self, **options))
        slots = self.slot_readout
        self.num_features = slots.num_slots * slots.slot_dim if slots is not None else \
            getattr(self.readout_module, "num_features", embed_dim)

    @property
    def readout_module(self) -> nn.Module:
        """The module that turns the final-norm tokens into the encoding."""
        return getattr(self, self.readout_spec.attribute)

    @property
    def slot_readout(self) -> nn.Module | None:
        """The slot-structured read-out (SPARO or multi-head cross-attention), None for the others."""
        return self.readout_module if self.readout_spec.has_slots else None

    def readout_parameter_count(self) -> int:
        """Parameters of what follows the N-1 blocks every read-out shares: the N-th block, or the read-out module
        that replaces it. The number to compare when asking whether a read-out is "the same size"."""
        module = self.readout_module if self.readout_spec.replaces_block else self.blocks[-1]
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
        encoding = self.readout_module(tokens)
        return encoding.flatten(1) if self.readout_spec.has_slots else encoding

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode_tokens(self.tokens(images))


def build_backbone(arch: str, patch_size: int = 16, img_size: int = 224, drop_path_rate: float = 0.0,
                   grad_checkpointing: bool = False, pos_embed_interpolation: str = "dino",
                   **readout_options: int | bool) -> DinoVisionTransformer:
    """Build a backbone by arch name: trunk size and read-out (registry.archs()).

    Read-out options default to registry.OPTIONS (the paper's L = V = D = 64, g = 1, no slot norm); one given to a
    read-out that does not take it is an error, since it would silently do nothing.
    """
    size, readout = registry.split_arch(arch)
    unknown = sorted(set(readout_options) - set(registry.OPTIONS))
    if unknown:
        raise TypeError(f"unknown backbone option(s) {', '.join(unknown)}; read-out options: "
                        f"{', '.join(registry.OPTIONS)}")
    registry.reject_readout_options(arch, sorted(readout_options))
    options = {key: type(registry.OPTIONS[key].default)(value) for key, value in readout_options.items()}
    if min(patch_size, img_size) < 1:
        raise ValueError(f"patch_size and img_size must be >= 1, got {patch_size} and {img_size}")
    if img_size % patch_size:
        raise ValueError(f"img_size {img_size} is not divisible by patch_size {patch_size}")
    embed_dim, depth, num_heads = registry.SIZES[size]
    model = DinoVisionTransformer(embed_dim=embed_dim, depth=depth, num_heads=num_heads, patch_size=patch_size,
                                  img_size=img_size, drop_path_rate=drop_path_rate, readout=readout.name,
                                  readout_options=options, pos_embed_interpolation=pos_embed_interpolation)
    model.set_grad_checkpointing(grad_checkpointing)
    return model


def backbone_kwargs(config: Mapping[str, Any]) -> dict[str, Any]:
    """The build_backbone arguments held in a flat run config (CLI flags or a checkpoint's `config`): each read-out
    gets only its own options."""
    kwargs: dict[str, Any] = {"arch": config["arch"]}
    for key in ("patch_size", "img_size", "drop_path_rate", "grad_checkpointing", "pos_embed_interpolation"):
        if config.get(key) is not None:
            kwargs[key] = config[key]
    kwargs.update({key: config[key] for key in registry.split_arch(config["arch"])[1].options
                   if config.get(key) is not None})
    return kwargs
