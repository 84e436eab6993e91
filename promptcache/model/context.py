"""The one object the model sees per step: where each new token sits and where every sequence's K/V lives.

Model code never sees requests, blocks or scheduling; the runner builds a ``ForwardContext`` per step.

NOTE: the flat batch puts single-token sequences (decodes) first, then multi-token chunks (prefills), so the
decode group is the slice ``[:num_decode]``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class KVRun:
    """Part of a sequence's cached context that one attention pass reads, for the first ``rows`` queries.

    ``slots`` is either a ``slice`` of the pool (consecutive slots, read in place as a view: no copy) or a 1-D
    tensor of slots (short pieces of a fragmented block table, gathered into one dense copy, which costs less
    than one kernel call per piece).

    NOTE: the runs of one sequence are disjoint, and together they are exactly the cached keys that some query
    of the chunk may attend to (partial results are merged by their log-sum-exps, so order does not matter).
    Every one of the first ``rows`` queries sees at least one key of the run: no softmax row is empty.
    """

    slots: slice | torch.Tensor
    rows: int  # queries [0, rows) of the chunk attend to this run; later ones' sliding window has passed it
    mask: torch.Tensor | None  # [rows, num_keys] additive (0 / -inf); None: each of those rows sees every key


@dataclass
class PrefillSlice:
    """One multi-token chunk of one sequence inside the flat batch.

    Three shapes, by which fields are set:

    - ``kv_slots`` set (gather mode): attend to the whole context gathered from those slots, under ``mask``.
    - ``runs`` non-empty (in-place mode): one pass per cached run, plus one over the chunk's own new K/V under
      ``mask`` (None: plain causal), merged exactly.
    - neither: no cached context; attend to the chunk's own K/V under ``mask`` (None: plain causal).
    """

    start: int  # first row of the chunk in the flat batch
    end: int
    kv_slots: torch.Tensor | None  # slots of the sequence's whole context (gather mode only)
    mask: torch.Tensor | None  # additive (0 = attend, -inf = not) over kv_slots, or over the chunk's own keys
    runs: list[KVRun] = field(default_factory=list)  # the cached context, read in place (in-place mode only)


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
