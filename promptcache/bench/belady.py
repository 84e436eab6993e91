"""The limit for hit rates: replay a workload's block trace through an offline cache simulator.

``block_trace`` turns the requests a benchmark ran (prompt ids, output ids, in arrival order) into the content
addresses the engine would look up and write; ``simulate`` replays that trace through a cache of a given capacity
under Belady's optimal eviction (``"belady"``, which knows the future) or under one of the engine's own policies,
``"lfu"`` and ``"lru"`` (``promptcache.cache.eviction``, replayed exactly as the engine's ``BlockPool`` applies them).
The engine's measured hit ratio divided by Belady's, at the same capacity, says how much of the reachable hit rate
the engine's policy gets.

Semantics, shared by both policies (those of the engine's prefix cache):

- A request hits the longest run of its ``reads`` present in the cache from the first block on: a missing block
  ends the hit even if later blocks are cached (their KV depends on the missing one's). ``block_trace`` caps
  ``reads`` as the engine caps a hit: at most ``(len(prompt) - 1) // block_size`` blocks, because the last prompt
  token is always computed to get its logits.
- After the hit, every block in ``writes`` (the hit blocks, the prompt blocks computed, and the output blocks) is
  in the cache, touched if it was already there. While the cache is over capacity, blocks are evicted by the
  policy, but never one the request itself holds (hit or written: it was in use while the request ran). If the
  request's blocks alone exceed the capacity, the first ``capacity`` of its chain are kept: those touched last,
  since the engine releases a chain tail first, and the only ones a prefix hit can reach.
- ``"lru"`` evicts the least recently touched block. Within one request, blocks are touched in chain order and
  released tail first, so the request's head block ends most recent and its tail block least recent, as in the
  engine, which evicts a chain from its end.
- ``"lfu"`` evicts the block with the smallest aged use count: each request that holds a block is one use of it,
  recorded in release order (tail first), with the engine's half-life (``LFU_HALF_LIFE_POOLS`` x capacity uses)
  and key (``decayed_use``); a block's count starts afresh when it is evicted, as in the engine.
- ``"belady"`` evicts the cached block whose next occurrence in a later entry's ``reads`` is farthest away (never
  read again: infinitely far); ties go to the block deeper in its chain, then to the least recently touched, then
  to the smaller address, so results are deterministic.

Belady's rule is the classic optimal replacement (MIN) applied to block reads: optimal for a cache of independent
blocks that must take in every block a request writes. It stays optimal under prefix semantics on traces from
``block_trace``: a block is never read without its ancestors, so its parent's next read is never later than its
own and the tie-break evicts the deeper one first; the cache stays closed under prefixes, a prefix hit counts
exactly the cached blocks among the reads, and MIN's exchange argument holds. So on such traces ``belady`` bounds
the hits of every eviction policy that takes in each block a request writes, at the same capacity, ``lru`` (the
engine's) included; tests/test_belady.py checks this on random traces.

The simulator replays requests one at a time: it does not model the blocks that concurrently running requests
hold, nor the partial last block a running request occupies, so the engine under load has slightly less room than
``capacity_blocks`` full blocks.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from promptcache.cache.eviction import LFU_HALF_LIFE_POOLS, decayed_use
from promptcache.cache.hashing import BlockHash, chain_hashes, root_hash

POLICIES = ("belady", "lfu", "lru")
# Not policies the engine could run: references for studying eviction (``policy_study.py``). "perfect-lfu" counts
# every request that used a block since the trace began, evicted or not (the full-history frequency estimate, the
# best a policy can learn of popularity from the past when requests are independent draws); "popularity-oracle"
# knows how many requests in the whole trace read each block (hindsight popularity, no timing).
REFERENCE_POLICIES = ("perfect-lfu", "popularity-oracle")

_NEVER = float("inf")


@dataclass
class TraceEntry:
    """The cache's view of one request."""

    # Content addresses of the request's full prompt blocks usable for a hit, in order (capped like the engine: at
    # most (len(prompt) - 1) // block_size blocks).
    reads: list[bytes]
    # Addresses of every full block whose KV the request computed or reused (prompt + output but its last token), in
    # order; all of them are cached after the request.
    writes: list[bytes]
    prompt_tokens: int


def block_trace(
    requests: Sequence[tuple[Sequence[int], Sequence[int]]], block_size: int, namespace: str = "bench"
) -> list[TraceEntry]:
    """The block trace of ``requests``: (prompt ids, output ids) per request, in arrival order.

    Addresses are chained as the engine chains them (``chain_hashes`` from one root per namespace), so two prompts
    with an equal prefix get equal leading addresses. The last output token's KV is never computed (it is sampled,
    not fed back), so the written chain covers the prompt and every output token but the last.
    """
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    root = root_hash("bench", "sim", namespace)
    trace: list[TraceEntry] = []
    for prompt, output in requests:
        prompt, output = list(prompt), list(output)
        computed = prompt + output[:-1]
        writes = chain_hashes(root, computed, block_size)
        usable = (len(prompt) - 1) // block_size if len(prompt) > 1 else 0
        trace.append(TraceEntry(reads=writes[:usable], writes=writes, prompt_tokens=len(prompt)))
    return trace


@dataclass
class SimResult:
    """Hits of one replay."""

    policy: str
    capacity_blocks: int
    hit_tokens: int
    prompt_tokens: int
    per_request_hit_tokens: list[int] = field(default_factory=list)

    @property
    def hit_ratio(self) -> float:
        """Prompt tokens served from the cache / prompt tokens (0.0 for an empty trace)."""
        return self.hit_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


def simulate(
    trace: Sequence[TraceEntry],
    capacity_blocks: int,
    block_size: int,
    policy: str,
    lfu_half_life_pools: float = LFU_HALF_LIFE_POOLS,
) -> SimResult:
    """Replay ``trace`` through a prefix cache of ``capacity_blocks`` blocks evicting by ``policy``.

    ``policy`` is ``"belady"`` (offline optimal eviction: the block read again farthest in the future goes first),
    or ``"lfu"`` or ``"lru"`` (the engine's policies), or one of ``REFERENCE_POLICIES``; see the module docstring
    for the exact semantics.
    ``block_size`` converts hit blocks to tokens. ``lfu_half_life_pools`` sets ``"lfu"``'s half-life in uses per
    block of capacity (the engine's is ``LFU_HALF_LIFE_POOLS``); other values are for studying the policy.

    Raises:
        ValueError: an unknown policy, a negative capacity, or a block size below 1.
    """
    if policy not in POLICIES + REFERENCE_POLICIES:
        raise ValueError(
            f"unknown eviction policy {policy!r}; choose one of {', '.join(POLICIES + REFERENCE_POLICIES)}"
        )
    if capacity_blocks < 0:
        raise ValueError(f"capacity_blocks must be >= 0, got {capacity_blocks}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    caches: dict[str, Callable[[], _Cache]] = {
        "belady": lambda: _Belady(trace),
        "lfu": lambda: _Lfu(capacity_blocks, lfu_half_life_pools),
        "lru": _Lru,
        "perfect-lfu": _PerfectLfu,
        "popularity-oracle": lambda: _PopularityOracle(trace),
    }
    cache = caches[policy]()
    per_request: list[int] = []
    for t, entry in enumerate(trace):
        hit = 0
        for address in entry.reads:
            if address not in cache:
                break
            hit += 1
        per_request.append(hit * block_size)
        # The blocks the request holds while it runs, in chain order: its hit, then everything it wrote.
        held = list(dict.fromkeys([*entry.reads[:hit], *entry.writes]))[:capacity_blocks]
        cache.admit(t, held, entry.reads)
        cache.shrink(capacity_blocks, set(held))
    return SimResult(
        policy=policy,
        capacity_blocks=capacity_blocks,
        hit_tokens=sum(per_request),
        prompt_tokens=sum(e.prompt_tokens for e in trace),
        per_request_hit_tokens=per_request,
    )


class _Cache:
    """A set of cached addresses with an eviction order."""

    def __contains__(self, address: BlockHash) -> bool:
        raise NotImplementedError

    def admit(self, t: int, held: Sequence[BlockHash], reads: Sequence[BlockHash]) -> None:
        """Entry ``t`` read ``reads`` and held ``held`` (chain order): bring them in and update their ranks."""
        raise NotImplementedError

    def shrink(self, capacity: int, protected: set[BlockHash]) -> None:
        """Evict unprotected blocks until at most ``capacity`` remain."""
        raise NotImplementedError


class _Lru(_Cache):
    def __init__(self) -> None:
        self._order: OrderedDict[BlockHash, None] = OrderedDict()  # least recently touched first

    def __contains__(self, address: BlockHash) -> bool:
        return address in self._order

    def admit(self, t: int, held: Sequence[BlockHash], reads: Sequence[BlockHash]) -> None:
        # Released tail first: the tail becomes least recent among the request's blocks, the head most recent.
        for address in reversed(held):
            self._order[address] = None
            self._order.move_to_end(address)

    def shrink(self, capacity: int, protected: set[BlockHash]) -> None:
        if len(self._order) <= capacity:
            return
        # ``held`` is at most ``capacity`` blocks, so enough unprotected ones exist; they are the oldest, as the
        # request's own blocks were just touched.
        for address in [a for a in self._order if a not in protected][: len(self._order) - capacity]:
            del self._order[address]


class _Ranked(_Cache):
    """Evicts the cached block of lowest rank; a request's blocks are touched in release order (tail first)."""

    def __init__(self) -> None:
        self._seq = 0
        self._rank: dict[BlockHash, tuple[float, int]] = {}  # cached address -> (score, touch order)

    def __contains__(self, address: BlockHash) -> bool:
        return address in self._rank

    def score(self, address: BlockHash, old: float | None) -> float:
        """The address's score after one more use (``old``: its score if cached, else None)."""
        raise NotImplementedError

    def admit(self, t: int, held: Sequence[BlockHash], reads: Sequence[BlockHash]) -> None:
        for address in reversed(held):
            self._seq += 1
            old = self._rank.get(address)
            self._rank[address] = (self.score(address, old[0] if old else None), self._seq)

    def shrink(self, capacity: int, protected: set[BlockHash]) -> None:
        excess = len(self._rank) - capacity
        if excess <= 0:
            return
        for _, address in sorted((r, a) for a, r in self._rank.items() if a not in protected)[:excess]:
            del self._rank[address]


class _Lfu(_Ranked):
    def __init__(self, capacity: int, half_life_pools: float) -> None:
        super().__init__()
        self._half_life = half_life_pools * max(capacity, 1)  # the engine's pool has ``capacity`` blocks
        self._uses = 0

    def score(self, address: BlockHash, old: float | None) -> float:
        self._uses += 1
        return decayed_use(old, self._uses / self._half_life)


class _PerfectLfu(_Ranked):
    def __init__(self) -> None:
        super().__init__()
        self._uses: dict[BlockHash, int] = {}

    def score(self, address: BlockHash, old: float | None) -> float:
        self._uses[address] = self._uses.get(address, 0) + 1
        return self._uses[address]


class _PopularityOracle(_Ranked):
    def __init__(self, trace: Sequence[TraceEntry]) -> None:
        super().__init__()
        self._reads: dict[BlockHash, int] = {}
        for entry in trace:
            for address in dict.fromkeys(entry.reads):
                self._reads[address] = self._reads.get(address, 0) + 1

    def score(self, address: BlockHash, old: float | None) -> float:
        return self._reads.get(address, 0)


class _Belady(_Cache):
    """Evicts the block whose next read is farthest in the future, using a max-heap with lazy invalidation."""

    def __init__(self, trace: Sequence[TraceEntry]):
        # For each address, the entries that read it, in order; ``_cursor`` walks each list as time passes.
        self._reads: dict[BlockHash, list[int]] = {}
        for t, entry in enumerate(trace):
            for address in dict.fromkeys(entry.reads):
                self._reads.setdefault(address, []).append(t)
        self._cursor: dict[BlockHash, int] = {}
        self._key: dict[BlockHash, tuple[float, int, int, bytes]] = {}  # cached address -> its current heap key
        self._heap: list[tuple[float, int, int, bytes]] = []
        self._clock = 0  # touch stamps: smaller is less recent

    def __contains__(self, address: BlockHash) -> bool:
        return address in self._key

    def _next_read(self, address: BlockHash, t: int) -> float:
        times = self._reads.get(address)
        if not times:
            return _NEVER
        i = self._cursor.get(address, 0)
        while i < len(times) and times[i] <= t:
            i += 1
        self._cursor[address] = i
        return times[i] if i < len(times) else _NEVER

    def _touch(self, address: BlockHash, t: int, depth: int) -> None:
        self._clock += 1
        # heapq is a min-heap: negate what should pop first (farthest next read, deepest block), keep the oldest
        # touch first as is, and negate nothing on the address so the smaller one goes first on a full tie.
        key = (-self._next_read(address, t), -depth, self._clock, address)
        self._key[address] = key
        heapq.heappush(self._heap, key)

    def admit(self, t: int, held: Sequence[BlockHash], reads: Sequence[BlockHash]) -> None:
        for depth, address in enumerate(held):
            self._touch(address, t, depth)
        # Blocks read but not held (cached past the first miss) are not touched, but their next read moved on.
        held_set = set(held)
        for depth, address in enumerate(reads):
            if address in self._key and address not in held_set:
                old = self._key[address]
                key = (-self._next_read(address, t), -depth, old[2], address)
                self._key[address] = key
                heapq.heappush(self._heap, key)

    def shrink(self, capacity: int, protected: set[BlockHash]) -> None:
        skipped: list[tuple[float, int, int, bytes]] = []
        while len(self._key) > capacity:
            key = heapq.heappop(self._heap)
            address = key[3]
            if self._key.get(address) != key:
                continue  # stale: the block was touched since, or evicted
            if address in protected:
                skipped.append(key)
                continue
            del self._key[address]
        for key in skipped:
            heapq.heappush(self._heap, key)
        self._compact()

    def _compact(self) -> None:
        # Stale keys pile up as blocks are touched; rebuild the heap when they outnumber the live ones.
        if len(self._heap) > 4 * len(self._key) + 64:
            self._heap = list(self._key.values())
            heapq.heapify(self._heap)
