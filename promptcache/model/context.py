"""The one object the model sees per step: where each new token sits and where every sequence's K/V lives.

Model code never sees requests, blocks or scheduling; the runner builds a ``ForwardContext`` per step.

NOTE: the flat batch puts single-token sequences (decodes) first, then multi-token chunks (prefills), so the
decode group is the slice ``[:num_decode]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PrefillSlice:
    """One multi-token chunk of one sequence inside the flat batch."""

    start: int  # first row of the chunk in the flat batch
    end: int
    kv_slots: torch.Tensor | None  # slots of the sequence's whole context; None: no cached context, attend locally
    mask: torch.Tensor | None  # [q_len, kv_len] additive (0 = attend, -inf = not); None: plain causal


@dataclass
class ForwardContext:
    """Per-step inputs to the model besides token ids."""

    positions: torch.Tensor  # [T] position of each new token in its sequence
    slot_mapping: torch.Tensor  # [T] flat KV slot (block_id * block_size + offset) each new token's K/V goes to
    num_decode: int  # rows [:num_decode] are single-token sequences
    decode_slots: torch.Tensor | None  # [num_decode, max_kv_len] slots of each decode sequence's context, padded
    decode_mask: torch.Tensor | None  # [num_decode, 1, 1, max_kv_len] bool, None when no padding is needed
    prefills: list[PrefillSlice]
    logits_indices: torch.Tensor  # [S] rows whose logits the sampler needs
