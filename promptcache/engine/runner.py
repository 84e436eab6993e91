"""Runs one scheduled step on the model: builds the flat batch and its ``ForwardContext``, returns logits."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from promptcache.engine.request import Request
from promptcache.model.context import ForwardContext, KVRun, PrefillSlice
from promptcache.model.llama import LlamaForCausalLM

ATTENTION_MODES = ("paged", "gather")
# A contiguous piece of cached context shorter than this is gathered (with the chunk's other short pieces, into one
# dense pass) instead of getting a flash pass of its own: each pass costs a fixed ~25-40 us on CPU (call, views,
# merge), so one per 16-token block of a fragmented table made a 2,048-token hit's attention ~5x slower (the
# whole step ~2.6x) than the old gather.
# Measured (SmolLM2-135M shape, 2 threads, 2,048 cached + 32 new, attention over 30 layers, context in pieces of
# L tokens), each piece in place vs all gathered together: 1.9x slower at L=64, 1.3-1.5x at 128, 1.1-1.2x at
# 256, even (0.93-1.06x) at 512.
# NOTE: decodes stay on the batched gather. Read in place one by one they were slower (SmolLM2-135M shape, batch 1
# x 2,048 context, 2 threads: attention 12.5 -> 18.1 ms per step, step 48 -> 56 ms). Likely cause: a single query
# does too little work per key to hide the flash kernel's per-KV-head strided reads of the pool, where the gather
# streams whole rows with both threads and SDPA then reads them from cache.
MIN_IN_PLACE_RUN = 512


def contiguous_runs(block_ids: Sequence[int], block_size: int, start: int, end: int) -> list[tuple[int, int]]:
    """Pool slot ranges ``[a, b)`` that hold positions ``[start, end)`` of a sequence, in position order.

    Blocks with consecutive ids form one range; the first and last blocks may be partial.
    """
    runs: list[tuple[int, int]] = []
    bs = block_size
    for i in range(start // bs, -(-end // bs)) if start < end else ():
        lo, hi = max(start, i * bs), min(end, (i + 1) * bs)
        a = block_ids[i] * bs + lo - i * bs
        if runs and runs[-1][1] == a:
            runs[-1] = (runs[-1][0], a + hi - lo)
        else:
            runs.append((a, a + hi - lo))
    return runs


class ModelRunner:
    """Owns the KV tensor ``[layers, 2, num_blocks * block_size, kv_heads, head_dim]`` and the model."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
        attention: str = "paged",
    ):
        """``attention``: "paged" reads cached context in place; "gather" copies each chunk's whole context out of
        the pool first (the old path, kept for benchmarks and tests)."""
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION_MODES)}, got {attention!r}")
        cfg = model.cfg
        self.model = model
        self.attention = attention
        # NOTE: in-place passes need a fused kernel that takes a mask and returns each row's log-sum-exp; only CPU's
        # is wired in (CUDA's flash kernel takes no mask, and no GPU was at hand to check or time another), so other
        # devices keep the gather path. attention.py still handles runs on any device (a float32 math fallback).
        self.in_place = attention == "paged" and device.type == "cpu"
        self.min_in_place_run = MIN_IN_PLACE_RUN  # tokens; shorter contiguous pieces are gathered together
        self.block_size = block_size
        self.device = device
        self.sliding_window = cfg.sliding_window
        self.dtype = dtype
        # NOTE: allocated uninitialised (pages are only touched when written); attention therefore never reads a
        # slot that was not written in the same or an earlier step (decode padding repeats a valid slot).
        self.kv_cache = torch.empty(
            cfg.num_layers, 2, num_blocks * block_size, cfg.num_kv_heads, cfg.head_dim, dtype=dtype, device=device
        )

    # ---- BlockIO (the cache tiers reach device blocks through these) ------------------------------------------
    def read_block(self, block_id: int) -> torch.Tensor:
        """A view [layers, 2, block_size, kv_heads, head_dim] of one block's KV."""
        bs = self.block_size
        return self.kv_cache[:, :, block_id * bs : (block_id + 1) * bs]

    def write_block(self, block_id: int, kv: torch.Tensor) -> None:
        """Copy a block's KV (any device, same shape) into the pool."""
        # NOTE: a blocking copy: the source may be a host slot that the next eviction overwrites.
        self.read_block(block_id).copy_(kv)

    @property
    def kv_cache_bytes(self) -> int:
        return self.kv_cache.numel() * self.kv_cache.element_size()

    def _slots(self, block_ids: list[int], start: int, end: int) -> torch.Tensor:
        """KV slots of positions [start, end) of a sequence (on the CPU)."""
        bs = self.block_size
        first = start // bs
        blocks = torch.tensor(block_ids[first : -(-end // bs)], dtype=torch.long)
        offset = start - first * bs
        return (blocks[:, None] * bs + torch.arange(bs)).view(-1)[offset : offset + end - start]

    def _window_mask(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """[q, k] additive mask (0 or -inf): causal, and inside the sliding window if the model has one.

        Additive float masks run faster than boolean ones in the CPU SDPA kernel, and are built once per step.
        """
        keep = k_pos[None, :] <= q_pos[:, None]
        if self.sliding_window is not None:
            keep &= k_pos[None, :] > q_pos[:, None] - self.sliding_window
        return self._additive(keep)

    def _additive(self, keep: torch.Tensor) -> torch.Tensor:
        """A boolean keep-mask as an additive one (0 where kept, -inf elsewhere) in the model's dtype."""
        return torch.zeros(keep.shape, dtype=self.dtype, device=self.device).masked_fill_(~keep, float("-inf"))

    def _pieces(
        self, block_ids: list[int], a: int, b: int, make: Callable[[slice | torch.Tensor, torch.Tensor], KVRun]
    ) -> list[KVRun]:
        """Runs over positions ``[a, b)``: contiguous pieces of at least ``min_in_place_run`` tokens read in place,
        the shorter ones gathered together into one run. ``make(slots, key_positions)`` builds each run."""
        runs: list[KVRun] = []
        pos, short = a, []
        for sa, sb in contiguous_runs(block_ids, self.block_size, a, b):
            if sb - sa >= self.min_in_place_run:
                runs.append(make(slice(sa, sb), torch.arange(pos, pos + sb - sa)))
            else:
                short.append((pos - a, pos - a + sb - sa))
            pos += sb - sa
        if short:
            # One vectorised slot list for the region, then only the short pieces' part of it.
            keep = torch.zeros(b - a, dtype=torch.bool)
            for pa, pb in short:
                keep[pa:pb] = True
            slots = self._slots(block_ids, a, b)[keep].to(self.device, non_blocking=True)
            runs.append(make(slots, torch.arange(a, b)[keep]))
        return runs

    def _cached_runs(self, block_ids: list[int], start: int, n: int) -> list[KVRun]:
        """The cached context that queries at positions ``[start, start + n)`` attend to, as ``KVRun``s.

        Without a sliding window every query sees every cached key, so no run has a mask. With one, keys before
        ``lo`` are seen by no query (skipped), keys from ``full`` on by every query (unmasked), and the ones
        between by some (masked, and only the queries that see any of a run's keys attend to it).
        """
        w = self.sliding_window
        lo = 0 if w is None else max(0, start - w + 1)
        full = lo if w is None else min(max(start + n - w, lo), start)
        q_pos = torch.arange(start, start + n)

        def masked(slots: slice | torch.Tensor, k_pos: torch.Tensor) -> KVRun:
            assert w is not None
            keep = k_pos[None, :] > q_pos[:, None] - w
            # NOTE: a query's window only moves forward, so the queries that see some key of the run are a prefix.
            rows = int(keep.any(1).sum())
            keep = keep[:rows]
            return KVRun(slots, rows, None if bool(keep.all()) else self._additive(keep.to(self.device)))

        def unmasked(slots: slice | torch.Tensor, k_pos: torch.Tensor) -> KVRun:
            return KVRun(slots, n, None)

        return self._pieces(block_ids, lo, full, masked) + self._pieces(block_ids, full, start, unmasked)

    def build(self, work: list[tuple[Request, int]]) -> tuple[torch.Tensor, ForwardContext, list[Request]]:
        """Flat input ids, the context, and the requests (in logits row order) whose last token gets logits."""
        decodes = [(r, n) for r, n in work if n == 1]
        chunks = [(r, n) for r, n in work if n > 1]
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        decode_slots_list: list[int] = []
        chunk_slots: list[torch.Tensor] = []
        logits_rows: list[int] = []
        sampled: list[Request] = []
        for r, n in decodes + chunks:
            start = r.num_computed
            if start + n == len(r.token_ids):
                logits_rows.append(len(ids) + n - 1)
                sampled.append(r)
            ids.extend(r.token_ids[start : start + n])
            positions.extend(range(start, start + n))
            if n == 1:
                decode_slots_list.append(r.seq.blocks[start // bs].block_id * bs + start % bs)
            else:
                chunk_slots.append(self._slots(r.seq.block_ids, start, start + n))
        slot_mapping = torch.cat([torch.tensor(decode_slots_list, dtype=torch.long), *chunk_slots])
        dev = self.device
        decode_slots = decode_mask = None
        if decodes:
            # NOTE: decodes keep the batched gather, in both modes: see MIN_IN_PLACE_RUN for why.
            lens = [r.num_computed + 1 for r, _ in decodes]
            max_len = max(lens)
            max_blocks = -(-max_len // bs)
            table = torch.tensor([(r.seq.block_ids + [0] * max_blocks)[:max_blocks] for r, _ in decodes])
            pos = torch.arange(max_len)
            lens_t = torch.tensor(lens)
            # Padding positions repeat the sequence's last written slot: masked out, but never uninitialised memory.
            pos_c = torch.minimum(pos[None, :], lens_t[:, None] - 1)
            decode_slots = (table.gather(1, pos_c // bs) * bs + pos_c % bs).to(dev)
            if min(lens) != max_len or (self.sliding_window is not None and max_len > self.sliding_window):
                keep = pos[None, :] < lens_t[:, None]
                if self.sliding_window is not None:
                    keep &= pos[None, :] > (lens_t[:, None] - 1 - self.sliding_window)
                decode_mask = keep[:, None, None, :].to(dev)
        prefills: list[PrefillSlice] = []
        row = len(decodes)
        w = self.sliding_window
        for r, n in chunks:
            start = r.num_computed
            kv_len = start + n
            windowed = w is not None and kv_len > w
            if start == 0 and not windowed:
                prefills.append(PrefillSlice(row, row + n, None, None))
            elif self.in_place:
                # The chunk's own keys: causal, plus the window's edge when the chunk is longer than the window.
                local = torch.arange(n, device=dev)
                own_mask = None if w is None or n <= w else self._window_mask(local, local)
                runs = self._cached_runs(r.seq.block_ids, start, n)
                prefills.append(PrefillSlice(row, row + n, None, own_mask, runs))
            else:
                q_pos = torch.arange(start, kv_len, device=dev)
                slots = self._slots(r.seq.block_ids, 0, kv_len).to(dev, non_blocking=True)
                k_pos = torch.arange(kv_len, device=dev)
                prefills.append(PrefillSlice(row, row + n, slots, self._window_mask(q_pos, k_pos)))
            row += n
        ctx = ForwardContext(
            positions=torch.tensor(positions, device=dev),
            slot_mapping=slot_mapping.to(dev, non_blocking=True),
            num_decode=len(decodes),
            decode_slots=decode_slots,
            decode_mask=decode_mask,
            prefills=prefills,
            logits_indices=torch.tensor(logits_rows, device=dev),
        )
        return torch.tensor(ids, device=dev), ctx, sampled

    @torch.inference_mode()
    def execute(self, work: list[tuple[Request, int]]) -> tuple[torch.Tensor | None, list[Request]]:
        """Run the model on one step's work; logits [S, vocab] (float32) for the requests that sample."""
        input_ids, ctx, sampled = self.build(work)
        hidden = self.model(input_ids, ctx, self.kv_cache)
        if not sampled:
            return None, sampled
        return self.model.compute_logits(hidden.index_select(0, ctx.logits_indices)), sampled
