"""The read-outs without slots: the CLS token (official DINO), the mean patch token, and timm's attention pooling."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn

if TYPE_CHECKING:
    from sparo_dino.model.backbone import DinoVisionTransformer


class ClsToken(nn.Module):
    """The final-norm CLS token; no parameters, so the state dict is official DINO's ViT."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens[:, 0]


class MeanPatchTokens(nn.Module):
    """The mean final-norm patch token (prefix tokens such as CLS left out)."""

    def __init__(self, num_prefix_tokens: int) -> None:
        super().__init__()
        self.num_prefix_tokens = num_prefix_tokens

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens[:, self.num_prefix_tokens:].mean(dim=1)


def cls_token(backbone: DinoVisionTransformer) -> nn.Module:
    return ClsToken()


def mean_patch_tokens(backbone: DinoVisionTransformer) -> nn.Module:
    return MeanPatchTokens(backbone.num_prefix_tokens)


def timm_attention_pool(backbone: DinoVisionTransformer) -> nn.Module:
    """timm's `map` pooling (one learned latent, all heads, then an MLP). timm builds and initializes it inside its
    ViT (the registry entry's vit_kwargs ask for global_pool="map"); building it here would draw other weights."""
    return backbone.attn_pool
