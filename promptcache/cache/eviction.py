"""Eviction orders for cached blocks: which idle cached block the pool reuses first when it runs out of free ones.

Two policies, chosen per engine (``EngineConfig.eviction_policy``, ``promptcache serve --eviction-policy``):

- ``"lfu"`` (the default): least *frequently* used first, with aging. Every time a request finishes with a block
  (releases it) counts as one use. A use's weight halves every ``LFU_HALF_LIFE_POOLS`` x ``num_blocks`` uses of any
  block, so the score of a block is roughly the number of requests that used it lately, and content that was
  popular once but is no longer used fades out instead of holding its room forever (plain LFU's failure in a
  long-running server). Among blocks with equal history the least recently used goes first.
- ``"lru"``: least recently used first (vLLM's and SGLang's default).

Why LFU by default: a prompt cache's blocks are reused by *later requests that share a prefix*, and how many
requests shared a prefix so far is the best online predictor of how many will share it next: a popular document, a
system prompt, the head of a conversation still going on. LRU keeps whatever ran last, so a burst of one-off
prompts flushes the popular ones, and interleaved conversations that outgrow the cache evict each other in a cycle
(every turn misses). Replayed against Belady's optimal eviction on this project's benchmark workloads
(``promptcache.bench.belady``), the aged LFU reached a higher share of the optimum than LRU on every workload and
cache size tried, never a lower one; docs/benchmarks.md has the figures.

Both policies keep a chain's tail ahead of its head in the eviction order: a request releases its blocks tail first,
so within one request the tail gets the older use, and a block's uses never outnumber its parent's (any request that
reads a block reads its parent too). So a chain is evicted from its end, and a cached block's prefix stays cached.

NOTE: scores are kept as time-invariant keys, ``log2(sum over uses of 2 ** (use_time / half_life))``: the decay of
every idle block by the same factor changes no order, so a key is only updated when its block is used, and a heap
ordered by key stays valid as time passes. ``promptcache.bench.belady`` replays the same rule (``decayed_use``) so
that its ``"lfu"`` simulation equals the engine's pool exactly.
"""

from __future__ import annotations

import heapq
import math
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Iterator
from typing import Protocol

EVICTION_POLICIES = ("lfu", "lru")
DEFAULT_EVICTION_POLICY = "lfu"

# A use's weight halves every LFU_HALF_LIFE_POOLS x num_blocks block uses: long enough that a document or
# conversation used a few times per cache turnover keeps its rank, short enough that content nobody uses any more
# drops below fresh content within a few turnovers. Replays of the benchmark workloads are insensitive between
# 8 and 32 (see docs/benchmarks.md); shorter half-lives drift towards LRU.
LFU_HALF_LIFE_POOLS = 8.0


def decayed_use(key: float | None, now: float) -> float:
    """A block's LFU key after one more use at time ``now`` (measured in half-lives).

    ``key`` is ``log2(sum of 2 ** t)`` over the block's earlier use times ``t`` (None: never used); the result adds
    ``2 ** now`` to the sum, computed without overflow.
    """
    if key is None:
        return now
    hi, lo = (key, now) if key >= now else (now, key)
    return hi + math.log2(1.0 + 2.0 ** (lo - hi))


class Evictable(Protocol):
    """What an evictor needs of a block."""

    block_id: int
    use_key: float | None


class Evictor(ABC):
    """The set of idle cached blocks, in the order the pool should reuse them."""

    @abstractmethod
    def record_use(self, blk: Evictable) -> None:
        """A request has finished using ``blk`` (called once per request per block, tail first)."""

    @abstractmethod
    def add(self, blk: Evictable) -> None:
        """``blk`` became idle and may be evicted."""

    @abstractmethod
    def discard(self, blk: Evictable) -> bool:
        """``blk`` is no longer evictable (acquired or pinned); False if it was not here."""

    @abstractmethod
    def pop(self) -> Evictable:
        """Remove and return the block to evict next. Raises IndexError when empty."""

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def __iter__(self) -> Iterator[Evictable]:
        """The evictable blocks, in no particular order."""

    @abstractmethod
    def clear(self) -> None: ...

    def forget(self, blk: Evictable) -> None:
        """``blk`` left the cache (evicted or dropped): its history goes with it."""
        blk.use_key = None


class LRUEvictor(Evictor):
    """Least recently used first: the order in which blocks became idle."""

    def __init__(self) -> None:
        self._order: OrderedDict[int, Evictable] = OrderedDict()

    def record_use(self, blk: Evictable) -> None:
        pass  # the order of ``add`` calls is the order of last use

    def add(self, blk: Evictable) -> None:
        self._order[blk.block_id] = blk
        self._order.move_to_end(blk.block_id)

    def discard(self, blk: Evictable) -> bool:
        return self._order.pop(blk.block_id, None) is not None

    def pop(self) -> Evictable:
        if not self._order:
            raise IndexError("no evictable block")
        return self._order.popitem(last=False)[1]

    def __len__(self) -> int:
        return len(self._order)

    def __iter__(self) -> Iterator[Evictable]:
        return iter(list(self._order.values()))

    def clear(self) -> None:
        self._order.clear()


class LFUEvictor(Evictor):
    """Least frequently used first, uses aged by a half-life; see the module docstring.

    A min-heap of ``(key, sequence number, block id)`` with lazy deletion: ``_live`` maps each evictable block to
    its current entry, and entries that no longer match are skipped when they reach the top.
    """

    def __init__(self, num_blocks: int, half_life_pools: float = LFU_HALF_LIFE_POOLS):
        if half_life_pools <= 0:
            raise ValueError(f"the LFU half-life must be > 0, got {half_life_pools}")
        self.half_life = half_life_pools * num_blocks  # in block uses
        self._uses = 0
        self._seq = 0
        self._heap: list[tuple[float, int, int]] = []
        self._live: dict[int, tuple[float, int, int]] = {}
        self._blocks: dict[int, Evictable] = {}

    def record_use(self, blk: Evictable) -> None:
        self._uses += 1
        blk.use_key = decayed_use(blk.use_key, self._uses / self.half_life)

    def add(self, blk: Evictable) -> None:
        # NOTE: a block that becomes idle without a recorded use (a pin expiring) keeps the key it has.
        key = blk.use_key if blk.use_key is not None else self._uses / self.half_life
        self._seq += 1  # ties (equal keys) go to the block that became idle first
        entry = (key, self._seq, blk.block_id)
        self._live[blk.block_id] = entry
        self._blocks[blk.block_id] = blk
        heapq.heappush(self._heap, entry)
        if len(self._heap) > 4 * len(self._live) + 64:
            self._heap = list(self._live.values())
            heapq.heapify(self._heap)

    def discard(self, blk: Evictable) -> bool:
        self._blocks.pop(blk.block_id, None)
        return self._live.pop(blk.block_id, None) is not None

    def pop(self) -> Evictable:
        while self._heap:
            entry = heapq.heappop(self._heap)
            if self._live.get(entry[2]) == entry:
                del self._live[entry[2]]
                return self._blocks.pop(entry[2])
        raise IndexError("no evictable block")

    def __len__(self) -> int:
        return len(self._live)

    def __iter__(self) -> Iterator[Evictable]:
        return iter(list(self._blocks.values()))

    def clear(self) -> None:
        self._heap.clear()
        self._live.clear()
        self._blocks.clear()


def make_evictor(policy: str, num_blocks: int) -> Evictor:
    """The evictor for ``policy`` ("lfu" or "lru"). Raises ValueError for another name."""
    if policy == "lfu":
        return LFUEvictor(num_blocks)
    if policy == "lru":
        return LRUEvictor()
    raise ValueError(f"unknown eviction policy {policy!r}; choose one of {', '.join(EVICTION_POLICIES)}")
