"""The pool of KV blocks: reference counts, the content-address index, and eviction (LFU or LRU, ``eviction.py``).

This module knows nothing of tensors: a block is an index into the KV tensor that the runner owns.

Every block is in exactly one of three states (NOTE: invariant, see ``check_integrity``):
- free:     ref_count == 0, not registered; in ``_free`` (reused first, nothing is lost by taking it);
- cached:   ref_count == 0, registered under its hash; in ``_evictable``, the eviction policy's order;
- in use:   ref_count > 0 (it may also be registered, and then other requests can share it).
Pinned blocks (explicit cache breakpoints with a TTL) are cached blocks that are held out of ``_evictable`` until
their pin expires.
"""

from __future__ import annotations

import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from promptcache.cache.events import DEVICE, KVEventSink
from promptcache.cache.eviction import DEFAULT_EVICTION_POLICY, make_evictor
from promptcache.cache.hashing import BlockHash, block_hash, tail_hash


@dataclass(eq=False)
class Block:
    """One block of ``block_size`` token slots in every layer's K and V."""

    block_id: int
    ref_count: int = 0
    block_hash: BlockHash | None = None
    parent_hash: BlockHash | None = None
    token_ids: tuple[int, ...] | None = None  # kept for the integrity check and for explaining misses
    pinned_until: float = 0.0
    pin_ttl: float = 0.0  # the TTL of the latest pin: a hit on a pinned block renews it for this long
    use_key: float | None = None  # the eviction policy's record of the block's uses (LFU); None when not cached
    # A partial block (``manager.KVCacheManager`` tails): registered on this device only, never announced to the
    # fleet nor spilled to a tier (they exchange full blocks), and taken, not shared, by the request that reuses it.
    is_tail: bool = False


class BlockPool:
    """Owns the blocks of one KV cache; hands them out, shares registered ones, evicts by ``eviction_policy``."""

    def __init__(
        self,
        num_blocks: int,
        enable_caching: bool = True,
        clock: Callable[[], float] = time.monotonic,
        max_pinned_fraction: float = 0.5,
        eviction_policy: str = DEFAULT_EVICTION_POLICY,
    ):
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: deque[Block] = deque(self.blocks)
        self.eviction_policy = eviction_policy
        self._evictable = make_evictor(eviction_policy, num_blocks)
        self._pinned: dict[int, Block] = {}  # cached (ref 0) blocks held by an unexpired pin
        self._pins: dict[int, Block] = {}  # every block with a pin (expired ones are purged lazily)
        self._index: dict[BlockHash, Block] = {}
        self._clock = clock
        self.num_evictions = 0
        # NOTE: pins never hold more than this many blocks, so they cannot starve running requests.
        self.max_pinned = int(num_blocks * max_pinned_fraction)
        # Addresses evicted lately, to tell "evicted" from "never cached" when explaining a miss.
        self.recently_evicted: OrderedDict[BlockHash, None] = OrderedDict()
        # Called with a cached block just before eviction reuses it (its KV is still intact): tiers copy it down.
        self.on_evict: Callable[[Block], None] | None = None
        # Told every address the pool starts or stops holding (the fleet's KV events); None: nobody listens.
        self.events: KVEventSink | None = None

    def now(self) -> float:
        """The pool's clock (pins are set and expire on it)."""
        return self._clock()

    # ---- counts -------------------------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks holding nothing worth keeping."""
        return len(self._free)

    @property
    def num_cached(self) -> int:
        """Registered blocks no request uses: kept for future hits, evicted when the pool needs room."""
        return len(self._evictable) + len(self._pinned)

    @property
    def num_pinned(self) -> int:
        """Blocks under an unexpired pin, in use or not."""
        now = self._clock()
        for bid in [bid for bid, blk in self._pins.items() if blk.pinned_until <= now]:
            del self._pins[bid]
        return len(self._pins)

    @property
    def num_in_use(self) -> int:
        return self.num_blocks - self.num_free - self.num_cached

    @property
    def num_available(self) -> int:
        """Blocks an allocation may take now: free ones, then cached unpinned ones (by eviction)."""
        self._expire_pins()
        return len(self._free) + len(self._evictable)

    @property
    def num_registered(self) -> int:
        return len(self._index)

    # ---- lookup -------------------------------------------------------------------------------------------
    def lookup(self, h: BlockHash) -> Block | None:
        return self._index.get(h)

    def match(self, hashes: Iterable[BlockHash]) -> list[Block]:
        """The longest run of registered blocks for a chain of hashes, from its root on (not acquired)."""
        out: list[Block] = []
        if not self.enable_caching:
            return out
        for h in hashes:
            blk = self._index.get(h)
            if blk is None:
                break
            out.append(blk)
        return out

    def addresses(self) -> list[BlockHash]:
        """Every full block's address registered now (in use or cached): what a KV-event snapshot reports."""
        return [h for h, blk in self._index.items() if not blk.is_tail]

    # ---- reference counting -------------------------------------------------------------------------------
    def acquire(self, blocks: Iterable[Block]) -> None:
        """Take a reference on blocks found by ``match`` (a cached block leaves the eviction list)."""
        for blk in blocks:
            if blk.ref_count == 0:
                self._evictable.discard(blk)
                self._pinned.pop(blk.block_id, None)
            blk.ref_count += 1

    def allocate(self, n: int) -> list[Block]:
        """``n`` blocks with ref_count 1; free blocks first, then cached ones in the eviction policy's order.

        Raises MemoryError when fewer than ``n`` are available; callers check ``num_available`` first.
        """
        if n > self.num_available:
            raise MemoryError(f"asked for {n} KV blocks, {self.num_available} available")
        out: list[Block] = []
        for _ in range(n):
            if self._free:
                blk = self._free.popleft()
            else:
                blk = self._evictable.pop()
                if self.on_evict is not None and not blk.is_tail:
                    self.on_evict(blk)
                self._unregister(blk, evicted=True)
                self.num_evictions += 1
            blk.ref_count = 1
            out.append(blk)
        return out

    def release(self, blocks: Iterable[Block]) -> None:
        """Drop a reference on each block, in the order given.

        Each release of a registered block is one use of it for the eviction policy. Callers release a sequence's
        blocks tail first, so that the end of a chain is evicted before its head (a head block is shared by more
        futures than its tail).
        """
        now = self._clock()
        for blk in blocks:
            if blk.ref_count <= 0:
                raise RuntimeError(f"block {blk.block_id} released more often than acquired")
            blk.ref_count -= 1
            if blk.block_hash is not None:
                self._evictable.record_use(blk)
            if blk.ref_count == 0:
                if blk.block_hash is None:
                    self._free.append(blk)
                elif blk.pinned_until > now:
                    self._pinned[blk.block_id] = blk
                else:
                    self._evictable.add(blk)

    # ---- registration ---------------------------------------------------------------------------------------
    def register(
        self, blk: Block, parent: BlockHash, token_ids: tuple[int, ...], h: BlockHash, tail: bool = False
    ) -> Block:
        """Give an in-use block whose KV is written its content address; returns the block now under ``h``.

        NOTE: only call after the block's KV is written. If another block already holds the same content
        (two requests computed one prefix at once), the index keeps the first; this block stays private and
        returns to the free list when released. ``tail``: a partial block (see ``Block.is_tail``).
        """
        if not self.enable_caching or blk.block_hash is not None:
            return blk
        existing = self._index.get(h)
        if existing is not None:
            return existing
        blk.block_hash, blk.parent_hash, blk.token_ids, blk.is_tail = h, parent, token_ids, tail
        self._index[h] = blk
        if self.events is not None and not tail:
            self.events.stored(DEVICE, (h,))
        return blk

    def take(self, blk: Block) -> None:
        """Take a cached tail for one sequence: in use by it alone and unregistered, since that sequence writes
        the rest of the block (NOTE: a registered block's content never changes; this one's will)."""
        assert blk.is_tail and blk.ref_count == 0, "only an idle tail can be taken"
        self.acquire([blk])
        self._unregister(blk)

    def _unregister(self, blk: Block, evicted: bool = False) -> None:
        if blk.block_hash is not None:
            del self._index[blk.block_hash]
            if self.events is not None and not blk.is_tail:
                self.events.removed(DEVICE, (blk.block_hash,))
            if evicted:
                self.recently_evicted[blk.block_hash] = None
                if len(self.recently_evicted) > 65536:
                    self.recently_evicted.popitem(last=False)
        blk.block_hash = blk.parent_hash = blk.token_ids = None
        blk.is_tail = False
        blk.pinned_until = blk.pin_ttl = 0.0
        self._evictable.forget(blk)
        self._pins.pop(blk.block_id, None)

    # ---- pins (explicit cache breakpoints with a TTL) -------------------------------------------------------
    def refresh_pins(self, blocks: Iterable[Block]) -> None:
        """A hit renews the pins of the blocks it read (Anthropic refreshes a cache entry's TTL on every read)."""
        now = self._clock()
        for blk in blocks:
            if blk.pinned_until > now:
                blk.pinned_until = max(blk.pinned_until, now + blk.pin_ttl)

    def pin(self, blocks: Iterable[Block], until: float) -> int:
        """Protect registered blocks from eviction until ``until`` (clock seconds); extends, never shortens.

        Blocks are pinned in the order given (a chain's head first) until ``max_pinned`` blocks are pinned;
        returns how many of the given blocks are now pinned.
        """
        now = self._clock()
        pinned_now = self.num_pinned
        done = 0
        for blk in blocks:
            if blk.block_hash is None:
                break
            if blk.pinned_until <= now:
                if pinned_now >= self.max_pinned:
                    break
                pinned_now += 1
                blk.pin_ttl = 0.0  # an expired pin is over: its TTL must not make hits renew this one for longer
            blk.pinned_until = max(blk.pinned_until, until)
            blk.pin_ttl = max(blk.pin_ttl, until - now)
            self._pins[blk.block_id] = blk
            if blk.ref_count == 0 and self._evictable.discard(blk):
                self._pinned[blk.block_id] = blk
            done += 1
        return done

    def _expire_pins(self) -> None:
        if not self._pinned:
            return
        now = self._clock()
        for bid in [bid for bid, blk in self._pinned.items() if blk.pinned_until <= now]:
            self._evictable.add(self._pinned.pop(bid))

    def reset(self) -> int:
        """Forget every cached block no request uses (pins included); returns how many were dropped."""
        dropped = list(self._evictable) + list(self._pinned.values())
        self._evictable.clear()
        self._pinned.clear()
        for blk in dropped:
            self._unregister(blk)
            self._free.append(blk)
        for blk in self._pins.values():  # in-use blocks stay registered: a running request still reads them
            blk.pinned_until = 0.0
        self._pins.clear()
        return len(dropped)

    # ---- integrity ------------------------------------------------------------------------------------------
    def check_integrity(self) -> None:
        """Raise AssertionError if any invariant of the pool is broken (used by tests and debug runs)."""
        free_ids = {b.block_id for b in self._free}
        evict_ids = {b.block_id for b in self._evictable}
        assert len(evict_ids) == len(self._evictable), "the eviction order lost count of its blocks"
        pinned_ids = set(self._pinned)
        assert len(free_ids) == len(self._free), "a block is twice in the free list"
        assert not (free_ids & evict_ids) and not (free_ids & pinned_ids) and not (evict_ids & pinned_ids)
        in_use = 0
        for blk in self.blocks:
            bid = blk.block_id
            if blk.ref_count > 0:
                in_use += 1
                assert bid not in free_ids | evict_ids | pinned_ids, f"in-use block {bid} is on a free list"
            elif blk.block_hash is None:
                assert bid in free_ids, f"unregistered idle block {bid} is not free"
            else:
                assert bid in evict_ids | pinned_ids, f"cached block {bid} is not evictable nor pinned"
            if blk.block_hash is not None:
                assert self._index.get(blk.block_hash) is blk, f"block {bid} is not indexed under its hash"
                assert blk.token_ids is not None and blk.parent_hash is not None
                address = tail_hash if blk.is_tail else block_hash
                assert address(blk.parent_hash, blk.token_ids) == blk.block_hash, f"block {bid} hash mismatch"
                assert not blk.is_tail or blk.ref_count == 0, f"tail {bid} is in use yet registered"
        assert len(free_ids) + len(evict_ids) + len(pinned_ids) + in_use == self.num_blocks
        assert all(b.block_hash == h for h, b in self._index.items())
