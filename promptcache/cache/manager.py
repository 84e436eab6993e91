"""Per-sequence view of the block pool: prefix matching, growing block tables, registering written blocks.

The scheduler talks to the cache only through ``KVCacheManager``; the runner only reads block ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from promptcache.cache.block_pool import Block, BlockPool
from promptcache.cache.eviction import DEFAULT_EVICTION_POLICY
from promptcache.cache.hashing import BlockHash, block_hash, root_hash


@dataclass
class SeqBlocks:
    """The cache state of one sequence (owned by its request)."""

    root: BlockHash
    blocks: list[Block] = field(default_factory=list)
    hashes: list[BlockHash] = field(default_factory=list)  # hashes of the full blocks of its tokens so far
    num_registered: int = 0  # blocks[:num_registered] are registered (matched or written and committed)

    @property
    def block_ids(self) -> list[int]:
        return [b.block_id for b in self.blocks]


class KVCacheManager:
    """Owns a ``BlockPool`` and applies it to sequences of token ids."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        model_fingerprint: str,
        dtype: str,
        enable_caching: bool,
        eviction_policy: str = DEFAULT_EVICTION_POLICY,
    ):
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, enable_caching=enable_caching, eviction_policy=eviction_policy)
        self._fingerprint = model_fingerprint
        self._dtype = dtype
        # Counters for metrics: prompt tokens looked up, and those found.
        self.query_tokens = 0
        self.hit_tokens = 0

    @property
    def enable_caching(self) -> bool:
        return self.pool.enable_caching

    def new_seq(self, namespace: str) -> SeqBlocks:
        return SeqBlocks(root=root_hash(self._fingerprint, self._dtype, namespace))

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _extend_hashes(self, seq: SeqBlocks, token_ids: Sequence[int]) -> None:
        bs = self.block_size
        for i in range(len(seq.hashes), len(token_ids) // bs):
            parent = seq.hashes[i - 1] if i else seq.root
            seq.hashes.append(block_hash(parent, token_ids[i * bs : (i + 1) * bs]))

    def match(self, seq: SeqBlocks, token_ids: Sequence[int]) -> list[Block]:
        """Cached blocks for the longest prefix of ``token_ids``, leaving at least one token to compute.

        NOTE: the cap at ``len - 1`` tokens is what guarantees logits for the last token: a full hit still runs
        the model on one token.
        """
        if not self.enable_caching or len(token_ids) < 2:
            return []
        self._extend_hashes(seq, token_ids)
        max_blocks = (len(token_ids) - 1) // self.block_size
        return self.pool.match(seq.hashes[:max_blocks])

    def allocate_prefix(
        self, seq: SeqBlocks, token_ids: Sequence[int], num_tokens: int, hit: list[Block] | None = None
    ) -> int | None:
        """Give a sequence with no blocks its cached prefix plus room for ``num_tokens`` more tokens after it.

        ``hit`` is ``match(seq, token_ids)`` when the caller already has it. Returns the number of cached tokens,
        or None (and changes nothing) when the pool has too few blocks.
        """
        assert not seq.blocks, "allocate_prefix is for a sequence that holds no blocks"
        if hit is None:
            hit = self.match(seq, token_ids)
        num_cached = len(hit) * self.block_size
        # Cached blocks with ref 0 count as available to the pool; taking them is not taking new room.
        idle_hits = sum(1 for b in hit if b.ref_count == 0)
        need = self.blocks_for(num_cached + num_tokens) - len(hit)
        if need > self.pool.num_available - idle_hits:
            return None
        self.pool.acquire(hit)
        self.pool.refresh_pins(hit)
        seq.blocks = hit + self.pool.allocate(need)
        seq.num_registered = len(hit)
        return num_cached

    def grow(self, seq: SeqBlocks, num_tokens: int) -> bool:
        """Make the sequence's blocks hold ``num_tokens`` tokens; False (and no change) if the pool is short."""
        need = self.blocks_for(num_tokens) - len(seq.blocks)
        if need <= 0:
            return True
        if need > self.pool.num_available:
            return False
        seq.blocks.extend(self.pool.allocate(need))
        return True

    def can_grow(self, seq: SeqBlocks, num_tokens: int) -> bool:
        return self.blocks_for(num_tokens) - len(seq.blocks) <= self.pool.num_available

    def commit(self, seq: SeqBlocks, token_ids: Sequence[int], num_computed: int) -> list[int]:
        """Register the sequence's full blocks whose KV is now written (the first ``num_computed`` tokens).

        Returns the indices of the blocks this call wrote into the cache (not those another sequence had
        already registered with the same content): the request's "cache writes".
        """
        if not self.enable_caching:
            return []
        full = min(num_computed // self.block_size, len(seq.blocks))
        if full <= seq.num_registered:
            return []
        written: list[int] = []
        self._extend_hashes(seq, token_ids[: full * self.block_size])
        for i in range(seq.num_registered, full):
            bs = self.block_size
            parent = seq.hashes[i - 1] if i else seq.root
            canonical = self.pool.register(
                seq.blocks[i], parent, tuple(token_ids[i * bs : (i + 1) * bs]), seq.hashes[i]
            )
            if canonical is seq.blocks[i]:
                written.append(i)
            elif canonical.ref_count > 0:
                # Another running sequence registered the same content first: share its block, free ours.
                self.pool.acquire([canonical])
                self.pool.release([seq.blocks[i]])
                seq.blocks[i] = canonical
        seq.num_registered = full
        return written

    def free(self, seq: SeqBlocks) -> None:
        """Release all of a sequence's blocks, tail first (so chains are evicted from their end)."""
        self.pool.release(reversed(seq.blocks))
        seq.blocks = []
        seq.num_registered = 0

    def explain(self, namespace: str, token_ids: Sequence[int]) -> dict[str, object]:
        """How much of ``token_ids`` would hit, and where and why the first miss is (no state changes)."""
        bs = self.block_size
        seq = self.new_seq(namespace)
        usable = (len(token_ids) - 1) // bs if len(token_ids) > 1 else 0
        out: dict[str, object] = {"prompt_tokens": len(token_ids), "block_size": bs}
        if not self.enable_caching:
            return {**out, "cached_tokens": 0, "first_miss_token": 0, "reason": "prefix caching is disabled"}
        self._extend_hashes(seq, token_ids)
        hit = self.pool.match(seq.hashes[:usable])
        n = len(hit)
        out["cached_tokens"] = n * bs
        if n < usable:
            h = seq.hashes[n]
            why = (
                f"this block was cached but has been evicted ({self.pool.eviction_policy} eviction) to make room"
                if h in self.pool.recently_evicted
                else "no cached block continues the prefix here: these tokens differ from everything cached in "
                "this namespace (new content, or an earlier change upstream of this point)"
            )
            return {**out, "first_miss_token": n * bs, "first_miss_block": n, "reason": why}
        if len(token_ids) // bs > usable:
            why = "every full block is cached; the last token is always computed, so its block is too"
        else:
            why = "every full block is cached; the rest is a partial block (only full blocks are cached)"
        return {**out, "first_miss_token": n * bs, "first_miss_block": n, "reason": why}

    def record_lookup(self, num_prompt_tokens: int, num_hit_tokens: int) -> None:
        self.query_tokens += num_prompt_tokens
        self.hit_tokens += num_hit_tokens
