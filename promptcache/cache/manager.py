"""Per-sequence view of the block pool: prefix matching, growing block tables, registering written blocks.

The scheduler talks to the cache only through ``KVCacheManager``; the runner only reads block ids.

Tails: a finished sequence's last, partial block is kept too, under an address of its own (the parent chain plus
its few tokens). The next turn of a conversation starts with every token of the previous turn, so it finds that
tail right after its last full-block hit and takes the block over (it writes the rest of it). Without tails the
last 1-15 tokens of every turn were recomputed: up to a block per turn.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from promptcache.cache.block_pool import Block, BlockPool
from promptcache.cache.eviction import DEFAULT_EVICTION_POLICY
from promptcache.cache.hashing import BlockHash, block_hash, root_hash, tail_hash

if TYPE_CHECKING:  # NOTE: the cache package imports without torch; only the tiers (and the engine) need it
    from promptcache.cache.tiers.stack import TierPlan, TierStack


@dataclass
class SeqBlocks:
    """The cache state of one sequence (owned by its request)."""

    root: BlockHash
    blocks: list[Block] = field(default_factory=list)
    hashes: list[BlockHash] = field(default_factory=list)  # hashes of the full blocks of its tokens so far
    num_registered: int = 0  # blocks[:num_registered] are registered (matched or written and committed)
    cached_by_tier: dict[str, int] = field(default_factory=dict)  # tokens of the last prefix hit, by source tier

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
        self.hit_tokens_by_tier: dict[str, int] = {}
        self.tiers: TierStack | None = None

    def attach_tiers(self, tiers: TierStack) -> None:
        """Put ``tiers`` below the pool: evicted blocks go down, prefix matches continue into them."""
        self.tiers = tiers

        def spill(blk: Block) -> None:
            assert blk.block_hash is not None and blk.parent_hash is not None and blk.token_ids is not None
            tiers.on_evicted(blk.block_hash, blk.parent_hash, blk.token_ids, blk.block_id)

        self.pool.on_evict = spill

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

    def match_tiers(self, seq: SeqBlocks, token_ids: Sequence[int], num_device_blocks: int) -> TierPlan | None:
        """The blocks after a device hit of ``num_device_blocks`` that lower tiers hold and that are worth loading
        (call ``match`` first: it computes the hashes). None when there is nothing to load."""
        if self.tiers is None or not self.enable_caching or len(token_ids) < 2:
            return None
        max_blocks = (len(token_ids) - 1) // self.block_size
        if num_device_blocks >= max_blocks:
            return None
        plan = self.tiers.plan(seq.hashes[num_device_blocks:max_blocks], self.block_size)
        return plan if len(plan) else None

    def allocate_prefix(
        self,
        seq: SeqBlocks,
        token_ids: Sequence[int],
        num_tokens: int,
        hit: list[Block] | None = None,
        plan: TierPlan | None = None,
    ) -> int | None:
        """Give a sequence with no blocks its cached prefix plus room for ``num_tokens`` more tokens after it.

        ``hit`` is ``match(seq, token_ids)`` when the caller already has it; ``plan`` (``match_tiers``) names
        blocks after it to load from lower tiers. A tail right after a device hit adds its tokens to the prefix.
        Returns the number of cached tokens (a block that fails to load ends the prefix: it and what follows are
        computed), or None (and changes nothing) when the pool has too few blocks.
        """
        assert not seq.blocks, "allocate_prefix is for a sequence that holds no blocks"
        if hit is None:
            hit = self.match(seq, token_ids)
        n_plan = len(plan) if plan is not None else 0
        bs = self.block_size
        tail, k = self._match_tail(seq, token_ids, len(hit)) if not n_plan else (None, 0)
        held = hit + [tail] if tail is not None else hit
        need = self._need(held, n_plan * bs + num_tokens - k)
        if need is None:
            if tail is None:
                return None
            tail, k, held = None, 0, hit  # no room for the tail's block: try without it
            need = self._need(hit, num_tokens)
            if need is None:
                return None
        self.pool.acquire(hit)
        self.pool.refresh_pins(hit)
        if tail is not None:
            self.pool.take(tail)
        seq.blocks = held + self.pool.allocate(need)
        seq.num_registered = len(hit)
        seq.cached_by_tier = {"device": len(hit) * bs + k} if hit or k else {}
        if tail is not None:
            return len(hit) * bs + k
        if plan is not None and n_plan:
            assert self.tiers is not None
            first = len(hit)
            origins = [self._origin(seq, token_ids, i) for i in range(first, first + n_plan)]
            loaded = self.tiers.load_into(plan, seq.block_ids[first : first + n_plan], origins)
            for j in range(loaded):
                self._register_block(seq, first + j, *origins[j])
                name = plan.sources[j].name
                seq.cached_by_tier[name] = seq.cached_by_tier.get(name, 0) + bs
            seq.num_registered = first + loaded
        return seq.num_registered * bs

    def _match_tail(self, seq: SeqBlocks, token_ids: Sequence[int], n: int) -> tuple[Block | None, int]:
        """The longest idle tail that continues a hit of ``n`` full blocks, and its token count (leaving the last
        token to compute)."""
        if not self.enable_caching:
            return None, 0
        bs = self.block_size
        parent = seq.hashes[n - 1] if n else seq.root
        start = n * bs
        for k in range(min(bs - 1, len(token_ids) - 1 - start), 0, -1):
            blk = self.pool.lookup(tail_hash(parent, token_ids[start : start + k]))
            if blk is not None and blk.is_tail and blk.ref_count == 0:
                return blk, k
        return None, 0

    def fits(self, hit: list[Block], num_tokens: int) -> bool:
        """Whether the pool has room for a device hit plus ``num_tokens`` more tokens (what a plan from the tiers
        adds can only need more)."""
        return self._need(hit, num_tokens) is not None

    def _need(self, hit: list[Block], num_tokens: int) -> int | None:
        """New blocks a device hit plus ``num_tokens`` more tokens take; None when the pool has fewer to give."""
        # Idle unpinned hits count as available to the pool; taking them is not taking new room. Idle pinned hits are
        # not counted there, so they must not be taken off it either (read the clock after num_available, which
        # expires pins: a pin ending in between then errs on the side of too little room, never too much).
        available = self.pool.num_available
        now = self.pool.now()
        idle_hits = sum(1 for b in hit if b.ref_count == 0 and b.pinned_until <= now)
        need = self.blocks_for(len(hit) * self.block_size + num_tokens) - len(hit)
        return need if need <= available - idle_hits else None

    def _origin(self, seq: SeqBlocks, token_ids: Sequence[int], i: int) -> tuple[BlockHash, tuple[int, ...]]:
        """Block ``i``'s parent address and tokens."""
        bs = self.block_size
        return (seq.hashes[i - 1] if i else seq.root), tuple(token_ids[i * bs : (i + 1) * bs])

    def _register_block(self, seq: SeqBlocks, i: int, parent: BlockHash, tokens: tuple[int, ...]) -> bool:
        """Register block ``i`` of a sequence (its KV is written); False if another block already held it."""
        canonical = self.pool.register(seq.blocks[i], parent, tokens, seq.hashes[i])
        if canonical is seq.blocks[i]:
            return True
        # Another block holds the same content (a running sequence computed it first, or it is cached: the last
        # block of a prompt is always computed, even on a hit): share it, free ours. NOTE: also when it is idle, else
        # the cached copy gets no use while this sequence's blocks after it do, and LFU evicts it before them (a
        # cached block whose prefix is gone can never be hit).
        self.pool.acquire([canonical])
        self.pool.release([seq.blocks[i]])
        seq.blocks[i] = canonical
        return False

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
            if self._register_block(seq, i, *self._origin(seq, token_ids, i)):
                written.append(i)
        seq.num_registered = full
        if self.tiers is not None and written:
            self.tiers.on_written(
                [(seq.hashes[i], *self._origin(seq, token_ids, i), seq.blocks[i].block_id) for i in written]
            )
        return written

    def pin_in_tiers(self, seq: SeqBlocks, num_blocks: int, until: float) -> None:
        """Keep the sequence's first ``num_blocks`` blocks in the lower tiers until ``until`` (time.time())."""
        if self.tiers is not None and num_blocks > 0:
            self.tiers.pin(seq.hashes[:num_blocks], until)

    def free(self, seq: SeqBlocks, computed: Sequence[int] | None = None) -> None:
        """Release all of a sequence's blocks, tail first (so chains are evicted from their end).

        ``computed``: the tokens whose KV the blocks hold (a finished request's); a partial last block is then kept
        as a tail. A preempted request passes nothing: its blocks are wanted back soon, by others.
        """
        bs = self.block_size
        i = len(computed) // bs if computed is not None else 0
        if computed is not None and self.enable_caching and len(computed) % bs and i < len(seq.blocks):
            blk = seq.blocks[i]
            if blk.block_hash is None and blk.ref_count == 1 and (i == 0 or i <= len(seq.hashes)):
                self._extend_hashes(seq, computed)
                parent = seq.hashes[i - 1] if i else seq.root
                tokens = tuple(computed[i * bs :])
                self.pool.register(blk, parent, tokens, tail_hash(parent, tokens), tail=True)
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
        by_tier = {"device": n * bs}
        tier_note: dict[str, object] = {}
        if self.tiers is not None and n < usable:
            found = self.tiers.lookup(seq.hashes[n:usable])
            keep, why = self.tiers.worth_loading(found, bs)
            for tier in found.sources[:keep]:
                by_tier[tier.name] = by_tier.get(tier.name, 0) + bs
            n += keep
            if why:
                tier_note["recomputed"] = why
            if n < usable:
                tier_note["tiers_at_miss"] = self.tiers.describe(seq.hashes[n])
        out["cached_tokens"] = n * bs
        out["cached_tokens_by_tier"] = by_tier
        out.update(tier_note)
        if n < usable:
            h = seq.hashes[n]
            if "recomputed" in tier_note and n < len(hit) + len(found.sources):
                why = "a lower tier holds this block, but loading it is estimated slower than recomputing it"
            elif h in self.pool.recently_evicted:
                why = f"this block was cached but has been evicted ({self.pool.eviction_policy} eviction) to make room"
                if self.tiers is not None:
                    why += ", and no lower tier holds it"
            else:
                why = (
                    "no cached block continues the prefix here: these tokens differ from everything cached in "
                    "this namespace (new content, or an earlier change upstream of this point)"
                )
            return {**out, "first_miss_token": n * bs, "first_miss_block": n, "reason": why}
        if len(token_ids) // bs > usable:
            why = "every full block is cached; the last token is always computed, so its block is too"
        else:
            why = "every full block is cached; the rest is a partial block (only full blocks are cached)"
        return {**out, "first_miss_token": n * bs, "first_miss_block": n, "reason": why}

    def addresses(self, namespace: str, token_ids: Sequence[int]) -> list[BlockHash]:
        """The addresses a lookup of ``token_ids`` walks: every full block but the one the last token needs."""
        seq = self.new_seq(namespace)
        usable = (len(token_ids) - 1) // self.block_size if len(token_ids) > 1 else 0
        self._extend_hashes(seq, token_ids[: usable * self.block_size])
        return seq.hashes

    def record_lookup(self, num_prompt_tokens: int, num_hit_tokens: int, by_tier: dict[str, int]) -> None:
        self.query_tokens += num_prompt_tokens
        self.hit_tokens += num_hit_tokens
        for name, n in by_tier.items():
            self.hit_tokens_by_tier[name] = self.hit_tokens_by_tier.get(name, 0) + n
