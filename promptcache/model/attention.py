"""Paged attention in plain torch: write new K/V into the block pool, gather each context, run SDPA.

Works on CPU and CUDA. Decodes are batched into one padded SDPA call; each prefill chunk gets its own call
(so a long chunk never pads short ones), and a chunk with no cached context attends to its own K/V directly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from promptcache.model.context import ForwardContext

# enable_gqa (torch >= 2.5) lets SDPA broadcast KV heads without materializing copies.
_HAS_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
    """q [B, H, Lq, D], k/v [B, KVH, Lk, D] -> [B, H, Lq, D]."""
    if q.shape[1] != k.shape[1]:
        if _HAS_GQA:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    ctx: ForwardContext,
) -> torch.Tensor:
    """q [T, H, D], k/v [T, KVH, D] of the new tokens; caches [slots, KVH, D]. Returns [T, H * D]."""
    _, num_heads, head_dim = q.shape
    k_cache.index_copy_(0, ctx.slot_mapping, k)
    v_cache.index_copy_(0, ctx.slot_mapping, v)
    outs: list[torch.Tensor] = []
    nd = ctx.num_decode
    if nd:
        slots = ctx.decode_slots
        assert slots is not None
        shape = (nd, slots.shape[1], k_cache.shape[1], head_dim)
        kd = k_cache.index_select(0, slots.view(-1)).view(shape).transpose(1, 2)
        vd = v_cache.index_select(0, slots.view(-1)).view(shape).transpose(1, 2)
        # One query per sequence: fold the query heads that share a KV head into its "query length" dimension,
        # which makes GQA a plain batched SDPA over KV heads (no broadcast, about 2x faster on CPU).
        kv_heads = k_cache.shape[1]
        qd = q[:nd].reshape(nd, kv_heads, num_heads // kv_heads, head_dim)
        o = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=ctx.decode_mask)
        outs.append(o.reshape(nd, num_heads * head_dim))
    for p in ctx.prefills:
        qs = q[p.start : p.end].transpose(0, 1).unsqueeze(0)
        if p.kv_slots is None:
            # Dense copies: k and v are views into the fused projection (row stride of every head), and the
            # CPU flash kernel streams dense K/V noticeably faster; the copy is small next to the attention.
            ks, vs = k[p.start : p.end].contiguous(), v[p.start : p.end].contiguous()
        else:
            ks, vs = k_cache.index_select(0, p.kv_slots), v_cache.index_select(0, p.kv_slots)
        ks, vs = ks.transpose(0, 1).unsqueeze(0), vs.transpose(0, 1).unsqueeze(0)
        o = _sdpa(qs, ks, vs, p.mask, causal=p.mask is None)
        outs.append(o.squeeze(0).transpose(0, 1).reshape(p.end - p.start, num_heads * head_dim))
    return outs[0] if len(outs) == 1 else torch.cat(outs)
