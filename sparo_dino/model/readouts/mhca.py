"""Multi-head cross-attention with L learned queries: Tab. 6's "multi-head" ablation of SPARO."""
from __future__ import annotations

import torch
import torch.nn as nn

from sparo_dino.model.readouts.sparo import SPARO_DEFAULTS


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
