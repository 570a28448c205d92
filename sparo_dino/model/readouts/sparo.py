"""SPARO: L single-head attentions with learned queries over the final-norm tokens (paper eq. 1, Appendix A)."""
from __future__ import annotations

import math
from types import MappingProxyType
from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

# The paper's DINO setting L = V = D = 64, g = 1: SPARO's signature, the registry's option defaults and main_dino's
# flags all read this one table (read-only, so no caller can change the defaults of the others).
SPARO_DEFAULTS: Mapping[str, int] = MappingProxyType({"num_slots": 64, "slot_dim": 64, "attn_dim": 64,
                                                      "group_size": 1})


def check_readout_sizes(sizes: Mapping[str, Any], prefix: str = "") -> None:
    """Raise ValueError unless the given read-out sizes (num_slots, slot_dim, attn_dim, group_size; None: not given)
    are >= 1 and num_slots is a multiple of group_size: the modules check their arguments, the scripts their flags
    before any model is built (`prefix` "--" names them as the user wrote them)."""
    for key in SPARO_DEFAULTS:
        value = sizes.get(key)
        if value is not None and value < 1:
            raise ValueError(f"{prefix}{key} must be >= 1, got {value}")
    num_slots, group_size = sizes.get("num_slots"), sizes.get("group_size")
    if num_slots is not None and group_size is not None and num_slots % group_size:
        raise ValueError(f"{prefix}num_slots {num_slots} must be a multiple of {prefix}group_size {group_size}")


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
