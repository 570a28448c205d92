"""The official DINO projection head and the multi-crop wrapper that runs backbone and head on a list of crops."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_


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
