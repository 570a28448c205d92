"""What a backbone attends to: per-slot maps of a slot read-out, per-head CLS maps of the last block."""
from __future__ import annotations

import torch

from sparo_dino.model import registry
from sparo_dino.model.backbone import DinoVisionTransformer


@torch.no_grad()
def slot_attention_maps(backbone: DinoVisionTransformer, images: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-slot attention over patch tokens as (B, L, h, w), and the share each slot puts on CLS as (B, L).

    For mhca a slot's map is its attention averaged over heads. Maps are not renormalized after dropping CLS, so a
    slot that mostly reads CLS shows a faint map.
    """
    if getattr(backbone, "slot_readout", None) is None:
        raise ValueError(f"slot attention maps need a slot read-out "
                         f"({registry.arch_patterns('has_slots')})")
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
