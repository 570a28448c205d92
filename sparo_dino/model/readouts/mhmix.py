"""Tab. 6's multi-head ablation of SPARO: its L single-head attentions, then an output projection that mixes them."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from sparo_dino.model.readouts.sparo import SPARO_DEFAULTS, check_readout_sizes


class MixedHeadCrossAttention(nn.Module):
    """Multi-head cross-attention with L heads of D dims, one learned query each, read out as L slots (paper
    sec. 5.3, Tab. 6 "multi-head").

    Head l attends as SPARO's slot l does (query q_l, the key projection K_l also the value projection), but the
    concatenated head outputs (L*D) then pass an output projection (L*D x L*D) that mixes the heads, as in standard
    multi-head attention; the result, no longer slot-structured, is split into L contiguous chunks of D. With
    slot_wise, each chunk gets one shared LayerNorm and one shared projection D -> V (Tab. 6 "Yes, Yes"); without,
    one LayerNorm over the whole L*D vector and one projection L*D -> L*V (Tab. 6 "No, No", AttPool's form). The
    only difference to SPARO with slot_norm is the mixing projection, (L*D)^2 + L*D parameters: Tab. 6's 306M
    against 172M is exactly 2 x (128 x 64)^2, one per CLIP tower.
    """

    def __init__(self, embed_dim: int, num_slots: int = SPARO_DEFAULTS["num_slots"],
                 slot_dim: int = SPARO_DEFAULTS["slot_dim"], attn_dim: int = SPARO_DEFAULTS["attn_dim"],
                 slot_wise: bool = True) -> None:
        super().__init__()
        if embed_dim < 1:
            raise ValueError(f"mixed-head cross-attention needs a positive embed_dim, got {embed_dim}")
        check_readout_sizes({"num_slots": num_slots, "slot_dim": slot_dim, "attn_dim": attn_dim})
        self.num_slots, self.slot_dim, self.attn_dim, self.slot_wise = num_slots, slot_dim, attn_dim, slot_wise
        width = num_slots * attn_dim
        self.query = nn.Parameter(torch.empty(num_slots, attn_dim))
        self.key = nn.Linear(embed_dim, width)
        self.mix = nn.Linear(width, width)
        self.norm = nn.LayerNorm(attn_dim if slot_wise else width)
        self.proj = nn.Linear(attn_dim, slot_dim) if slot_wise else nn.Linear(width, num_slots * slot_dim)
        nn.init.normal_(self.query, mean=0.0, std=1.0)  # queries, keys and W as SPARO (Appendix A)
        nn.init.xavier_uniform_(self.key.weight)
        nn.init.zeros_(self.key.bias)
        nn.init.xavier_uniform_(self.mix.weight)  # the output projection as timm's and torch's attention
        nn.init.zeros_(self.mix.bias)
        nn.init.zeros_(self.proj.bias)

    def forward(self, tokens: torch.Tensor, return_attention: bool = False
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """(B, N, embed_dim) -> slots (B, L, V); with return_attention also each head's weights (B, L, N)."""
        if tokens.dim() != 3:
            raise ValueError(f"mixed-head cross-attention expects tokens (B, N, embed_dim), got "
                             f"{tuple(tokens.shape)}")
        batch, num_tokens, _ = tokens.shape
        keys = self.key(tokens).view(batch, num_tokens, self.num_slots, self.attn_dim).transpose(1, 2)
        queries = self.query.to(keys.dtype)[None, :, None].expand(batch, -1, -1, -1)  # (B, L, 1, D)
        if return_attention:
            attention = (queries @ keys.transpose(-2, -1) / math.sqrt(self.attn_dim)).softmax(dim=-1)
            heads = attention @ keys
        else:
            heads = F.scaled_dot_product_attention(queries, keys, keys)
        mixed = self.mix(heads.reshape(batch, self.num_slots * self.attn_dim))
        if self.slot_wise:
            slots = self.proj(self.norm(mixed.view(batch, self.num_slots, self.attn_dim)))
        else:
            slots = self.proj(self.norm(mixed)).view(batch, self.num_slots, self.slot_dim)
        return (slots, attention.reshape(batch, self.num_slots, num_tokens)) if return_attention else slots
