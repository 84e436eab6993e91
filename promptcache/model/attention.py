"""Paged attention in plain torch: write new K/V into the block pool, then attend to each sequence's context.

Works on CPU and CUDA. Decodes are batched into one padded SDPA call over their gathered contexts (read in place
one by one they were slower: see ``runner.MIN_IN_PLACE_RUN``). Each prefill chunk gets its own call(s), so a long
chunk never pads short ones:

- no cached context: one causal SDPA over the chunk's own K/V (fresh from the projection, dense);
- in-place (``PrefillSlice.runs``): one flash pass per cached run, reading the pool through slice views, plus
  one causal pass over the chunk's own K/V; the partial results are merged exactly by their log-sum-exps;
- gather (``PrefillSlice.kv_slots``, the old path, kept for comparison): copy the whole context out of the
  pool and run one masked SDPA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from promptcache.model.context import ForwardContext, KVRun, PrefillSlice

# enable_gqa (torch >= 2.5) lets SDPA broadcast KV heads without materializing copies.
_HAS_GQA = tuple(int(x) for x in torch.__version__.split(".")[:2]) >= (2, 5)
_CPU_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def _cpu_flash_maps_kv_heads() -> bool:
    """Whether the CPU flash kernel reads KV head h // group for query head h itself (checked once, on tiny
    inputs): then pool views go in as they are, else K/V would have to be repeated (copied) per query head."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, 3, 8, generator=gen) for heads in (4, 2, 2))
    try:
        out = _CPU_FLASH(q, k, v, 0.0, False)[0]
    except RuntimeError:
        return False
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1))
    return bool(torch.allclose(out, ref, atol=1e-5))


_CPU_FLASH_GQA = _cpu_flash_maps_kv_heads()


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
    """q [B, H, Lq, D], k/v [B, KVH, Lk, D] -> [B, H, Lq, D]."""
    if q.shape[1] != k.shape[1]:
        if _HAS_GQA:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)


def attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention that also returns each row's log-sum-exp, so passes over disjoint keys can be merged.

    q [1, H, Lq, D], k/v [1, KVH, Lk, D] (any strides with a dense last dim; KVH divides H, query head h reads KV
    head h // (H / KVH)); mask additive [Lq, Lk] or None; ``causal`` needs Lq == Lk. Returns out [Lq, H, D] in
    q's dtype and lse [H, Lq] in float32: the natural log of sum_j exp(q.k_j * scale + mask_j), scale 1/sqrt(D).
    """
    if q.device.type != "cpu":
        return math_attention_with_lse(q, k, v, mask, causal)
    if q.shape[1] != k.shape[1] and not _CPU_FLASH_GQA:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    # NOTE: the CPU flash kernel's output is laid out [B, Lq, H, D] in memory, so out[0].transpose(0, 1) is
    # dense; its logsumexp is [B, H, Lq] float32 (natural log, the scale applied), whatever q's dtype.
    out, lse = _CPU_FLASH(q, k, v, 0.0, causal, attn_mask=mask)
    return out[0].transpose(0, 1), lse[0].float()


def math_attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``attention_with_lse`` in plain float32 math, on any device (materializes the [H, Lq, Lk] scores).

    The runner builds in-place contexts only for CPU; this keeps other devices correct if one gets them, and is
    the reference the CPU kernel is checked against.
    """
    if q.shape[1] != k.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = torch.matmul(q[0].float(), k[0].float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores + mask.float()
    if causal:
        scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu_(1), float("-inf"))
    lse = scores.logsumexp(-1)
    out = torch.matmul((scores - lse[..., None]).exp_(), v[0].float())
    return out.transpose(0, 1).to(q.dtype), lse


def merge_partials(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Exact softmax attention over the union of disjoint key sets, from each set's (out, lse).

    ``parts``: (out [r_i, H, D], lse [H, r_i]) where the first covers all rows, each with at least one key it
    attends to, and every r_i is a prefix of them (rows past r_i did not attend to that set). Returns [rows, H, D]
    in the first part's dtype. The flash-decoding merge: out = sum_i w_i * out_i / sum_i w_i with
    w_i = exp(lse_i - max_i lse_i), computed in float32.
    """
    first_out, first_lse = parts[0]
    heads, rows = first_lse.shape
    if len(parts) == 2 and parts[1][1].shape[1] == rows:
        # The common case (one cached run and the chunk's own keys), in 3 ops instead of ~10: with two parts the
        # normalised weight of the first is exp(l1 - m) / (exp(l1 - m) + exp(l2 - m)) = sigmoid(l1 - l2).
        (out1, lse1), (out2, lse2) = parts
        w1 = torch.sigmoid(lse1 - lse2).t().unsqueeze(-1)  # [rows, H, 1]
        return torch.lerp(out2.float(), out1.float(), w1).to(first_out.dtype)
    lses = first_lse.new_full((len(parts), heads, rows), float("-inf"))
    for i, (_, lse) in enumerate(parts):
        lses[i, :, : lse.shape[1]] = lse
    # NOTE: finite because the first part gives every row at least one key (a chunk's own causal pass: its own).
    top = lses.amax(0)
    weights = (lses - top).exp_()
    weights = (weights / weights.sum(0)).transpose(1, 2).unsqueeze(-1)  # [parts, rows, H, 1], normalised
    acc = first_out.float() * weights[0]
    for i, (out, _) in enumerate(parts[1:], start=1):
        r = out.shape[0]
        acc[:r].addcmul_(out.float(), weights[i, :r])
    return acc.to(first_out.dtype)


def _run_kv(cache: torch.Tensor, run: KVRun) -> torch.Tensor:
    """[1, KVH, L, D] keys or values of one run: a view into the pool, or a dense gather of scattered slots."""
    kv = cache[run.slots] if isinstance(run.slots, slice) else cache.index_select(0, run.slots)
    return kv.transpose(0, 1).unsqueeze(0)


def _prefill_in_place(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, p: PrefillSlice
) -> torch.Tensor:
    """One chunk over its cached runs (read in place) and its own new K/V; q [n, H, D], k/v [n, KVH, D] -> [n, H, D]."""
    qs = q.transpose(0, 1).unsqueeze(0)
    # Dense copies of the new K/V (views into the fused projection otherwise): the flash kernel streams dense
    # K/V faster, and the copy is only the chunk's own tokens.
    ks, vs = k.contiguous().transpose(0, 1).unsqueeze(0), v.contiguous().transpose(0, 1).unsqueeze(0)
    parts = [attention_with_lse(qs, ks, vs, p.mask, causal=p.mask is None)]
    for run in p.runs:
        # A run's keys all precede the chunk, so no causal mask: only a sliding window may hide some of them,
        # and then only from the later queries (those past ``run.rows`` skip the run altogether).
        qr = qs if run.rows == qs.shape[2] else qs[:, :, : run.rows]
        parts.append(attention_with_lse(qr, _run_kv(k_cache, run), _run_kv(v_cache, run), run.mask, causal=False))
    return merge_partials(parts)


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
        n = p.end - p.start
        if p.runs:
            o = _prefill_in_place(q[p.start : p.end], k[p.start : p.end], v[p.start : p.end], k_cache, v_cache, p)
            outs.append(o.reshape(n, num_heads * head_dim))
            continue
        qs = q[p.start : p.end].transpose(0, 1).unsqueeze(0)
        if p.kv_slots is None:
            # Dense copies: k and v are views into the fused projection (row stride of every head), and the
            # CPU flash kernel streams dense K/V noticeably faster; the copy is small next to the attention.
            ks, vs = k[p.start : p.end].contiguous(), v[p.start : p.end].contiguous()
        else:
            ks, vs = k_cache.index_select(0, p.kv_slots), v_cache.index_select(0, p.kv_slots)
        ks, vs = ks.transpose(0, 1).unsqueeze(0), vs.transpose(0, 1).unsqueeze(0)
        o = _sdpa(qs, ks, vs, p.mask, causal=p.mask is None)
        outs.append(o.squeeze(0).transpose(0, 1).reshape(n, num_heads * head_dim))
    return outs[0] if len(outs) == 1 else torch.cat(outs)
