"""Runs one scheduled step on the model: builds the flat batch and its ``ForwardContext``, returns logits."""

from __future__ import annotations

import torch

from promptcache.engine.request import Request
from promptcache.model.context import ForwardContext, PrefillSlice
from promptcache.model.llama import LlamaForCausalLM


class ModelRunner:
    """Owns the KV tensor ``[layers, 2, num_blocks * block_size, kv_heads, head_dim]`` and the model."""

    def __init__(
        self, model: LlamaForCausalLM, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
    ):
        cfg = model.cfg
        self.model = model
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

    def _window_mask(self, q_pos: torch.Tensor, kv_len: int) -> torch.Tensor:
        """[q, kv] additive mask (0 or -inf): causal, and inside the sliding window if the model has one.

        Additive float masks run faster than boolean ones in the CPU SDPA kernel, and are built once per step.
        """
        k_pos = torch.arange(kv_len, device=self.device)
        keep = k_pos[None, :] <= q_pos[:, None]
        if self.sliding_window is not None:
            keep &= k_pos[None, :] > q_pos[:, None] - self.sliding_window
        return torch.zeros(keep.shape, dtype=self.dtype, device=self.device).masked_fill_(~keep, float("-inf"))

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
        for r, n in chunks:
            start = r.num_computed
            kv_len = start + n
            windowed = self.sliding_window is not None and kv_len > self.sliding_window
            if start == 0 and not windowed:
                prefills.append(PrefillSlice(row, row + n, None, None))
            else:
                q_pos = torch.arange(start, kv_len, device=dev)
                slots = self._slots(r.seq.block_ids, 0, kv_len).to(dev, non_blocking=True)
                prefills.append(PrefillSlice(row, row + n, slots, self._window_mask(q_pos, kv_len)))
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
