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

Tiers below the device pool (``simulate_tiers``): the device pool replays exactly as ``simulate(..., "lfu")`` does,
and under it sit LRU tiers (``host`` memory, local ``disk``, a shared ``redis``) that hold blocks by address, each
ordered by last use (a store, skipped or not, or a load). A request hits the longest run of its ``reads`` of which
every block is in some tier (device first, then the tiers in order: each block counts for the first that has it);
blocks loaded from below become device blocks held by the request, and stay in the tier they came from. ``host`` is
the device's victim cache under every write policy: each block the device evicts is stored there. Below it, the
write policy says when a block is stored to the persistent tiers (those after ``host``): ``"write-back"`` when the
block leaves the replica's volatile tiers (evicted from ``host`` while not in the device, or from the device when
there is no ``host``), each persistent tier passing its own evictions down to the next; ``"write-through"`` as soon
as a request computes it; ``"write-through-after-hit"`` when a request first hits it since it entered the volatile
tiers, or when it leaves them if it was hit (a block never hit is dropped); ``"write-through+back"`` both as soon
as a request computes it (as ``"write-through"``) and when it leaves the volatile tiers (as ``"write-back"``), so
a persistent tier that dropped it meanwhile is written it again. A store of a block already present is skipped (not
a write) but counts as a use; ``"write-through+back (no touch)"``, a variant, skips the stores of a block leaving
the volatile tiers where it is present, so they are no use. A restart empties the device and ``host``, not the
persistent tiers. With several replicas, requests go round-robin to them (no session affinity: the worst case for
locality) and only ``redis`` is shared.
``redis`` is shared.
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


# ---- tiers below the device pool ----------------------------------------------------------------------------------
DEVICE = "device"
HOST_TIER = "host"  # volatile (lost on a restart), the device's victim cache; only ever the first tier
SHARED_TIER = "redis"  # one store shared by every replica; every other tier is the replica's own
WRITE_POLICIES = ("write-back", "write-through", "write-through-after-hit", "write-through+back")
# Not a policy the engine runs: the hybrid without its refresh of a persistent copy when the block leaves memory.
WRITE_POLICY_VARIANTS = ("write-through+back (no touch)",)
_WRITES_THROUGH = ("write-through", "write-through+back", "write-through+back (no touch)")  # on computing a block


@dataclass
class TierSpan:
    """Hits and writes of a run of consecutive requests of a tier replay."""

    requests: int
    prompt_tokens: int
    hit_tokens_by_tier: dict[str, int]  # "device", then each tier, in order
    blocks_written_by_tier: dict[str, int]  # each tier below the device: blocks actually written (not skipped)

    @property
    def hit_tokens(self) -> int:
        """Prompt tokens served from any tier."""
        return sum(self.hit_tokens_by_tier.values())

    @property
    def hit_ratio(self) -> float:
        """Prompt tokens served from any tier / prompt tokens (0.0 for no requests)."""
        return self.hit_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


@dataclass
class TierSimResult:
    """Hits and writes of one tier replay, request by request."""

    write_policy: str
    device_blocks: int
    tiers: list[tuple[str, int | None]]
    replicas: int
    restart_after: int | None
    prompt_tokens_per_request: list[int]
    hit_tokens_per_request: list[list[int]]  # per request, aligned with ``levels``
    blocks_written_per_request: list[list[int]]  # per request, aligned with ``tiers``: writes made while it ran

    @property
    def levels(self) -> list[str]:
        """Where a hit can come from: "device", then each tier's name."""
        return [DEVICE, *(name for name, _ in self.tiers)]

    def span(self, start: int = 0, stop: int | None = None) -> TierSpan:
        """Hits and writes of requests ``start`` to ``stop`` (exclusive; None: to the end)."""
        stop = len(self.prompt_tokens_per_request) if stop is None else stop
        hits = self.hit_tokens_per_request[start:stop]
        writes = self.blocks_written_per_request[start:stop]
        return TierSpan(
            requests=len(hits),
            prompt_tokens=sum(self.prompt_tokens_per_request[start:stop]),
            hit_tokens_by_tier={level: sum(h[i] for h in hits) for i, level in enumerate(self.levels)},
            blocks_written_by_tier={name: sum(w[i] for w in writes) for i, (name, _) in enumerate(self.tiers)},
        )

    @property
    def total(self) -> TierSpan:
        """The whole replay."""
        return self.span()

    @property
    def before_restart(self) -> TierSpan:
        """The requests before the restart (all of them if there was none)."""
        return self.span(0, self.restart_after)

    @property
    def after_restart(self) -> TierSpan | None:
        """The requests after the restart (None if there was none)."""
        return None if self.restart_after is None else self.span(self.restart_after)

    @property
    def hit_tokens(self) -> int:
        """Prompt tokens served from any tier, over the whole replay."""
        return self.total.hit_tokens

    @property
    def prompt_tokens(self) -> int:
        """Prompt tokens of the whole replay."""
        return sum(self.prompt_tokens_per_request)


class _LruTier:
    """A tier below the device: addresses ordered by last use (store or load), evicted least recent first."""

    def __init__(self, capacity: int | None) -> None:
        self.capacity = capacity  # None: unbounded
        self._order: OrderedDict[BlockHash, None] = OrderedDict()  # least recently used first

    def __contains__(self, address: BlockHash) -> bool:
        return address in self._order

    def load(self, address: BlockHash) -> None:
        self._order.move_to_end(address)

    def store(self, address: BlockHash) -> tuple[bool, list[BlockHash]]:
        """Store ``address`` (a use if present): whether it was written, and the addresses evicted to make room."""
        if address in self._order:
            self._order.move_to_end(address)
            return False, []
        if self.capacity == 0:
            return False, [address]  # no room at all: it passes straight through, nothing is written
        self._order[address] = None
        evicted: list[BlockHash] = []
        while self.capacity is not None and len(self._order) > self.capacity:
            evicted.append(self._order.popitem(last=False)[0])
        return True, evicted


class _Replica:
    """One engine process: its device pool, its ``host`` tier, and its persistent tiers (a shared one is the same
    object in every replica)."""

    def __init__(
        self, write_policy: str, device_blocks: int, half_life_pools: float, host_blocks: int | None,
        persistent: list[_LruTier], *, has_host: bool,
    ) -> None:  # fmt: skip
        self.write_policy = write_policy
        self.device_blocks = device_blocks
        self.half_life_pools = half_life_pools
        self.has_host = has_host
        self.host_blocks = host_blocks
        self.persistent = persistent
        self.restart()

    def restart(self) -> None:
        """Lose what the process held in memory: the device pool, ``host``, and which blocks were hit."""
        self.device = _Lfu(self.device_blocks, self.half_life_pools)
        self.host = _LruTier(self.host_blocks) if self.has_host else None
        self.hit_seen: set[BlockHash] = set()  # blocks hit since they last entered the device or host

    @property
    def tiers(self) -> list[_LruTier]:
        """The tiers below the device, in order."""
        return [self.host, *self.persistent] if self.host is not None else list(self.persistent)

    def admit(self, t: int, held: Sequence[BlockHash], reads: Sequence[BlockHash]) -> list[BlockHash]:
        """``simulate``'s device step (admit, then shrink to capacity); returns the evicted blocks, first evicted
        first."""
        device = self.device
        device.admit(t, held, reads)
        if len(device._rank) <= self.device_blocks:
            return []
        before = dict(device._rank)
        device.shrink(self.device_blocks, set(held))
        return sorted(before.keys() - device._rank.keys(), key=before.__getitem__)

    # ``written`` counts the blocks written to each tier below the device (host first, if there is one).
    def demote(self, address: BlockHash, written: list[int]) -> None:
        """The device let ``address`` go: host takes it, else it leaves the process's memory."""
        if self.host is None:
            self.leave_volatile(address, written)
            return
        stored, evicted = self.host.store(address)
        written[0] += stored
        for victim in evicted:
            if victim not in self.device:  # else its copy in the device lives on, and comes back here when evicted
                self.leave_volatile(victim, written)

    def leave_volatile(self, address: BlockHash, written: list[int]) -> None:
        """``address`` is neither in the device nor in host any more: its last copy in this process is gone."""
        was_hit = address in self.hit_seen
        self.hit_seen.discard(address)
        if self.write_policy == "write-back":
            self.store_down(0, address, written)
        elif self.write_policy == "write-through-after-hit" and was_hit:
            self.store_through(address, written)
        elif self.write_policy == "write-through+back":
            self.store_through(address, written)  # rewritten where dropped, a use where still present
        elif self.write_policy == "write-through+back (no touch)":
            self.store_through(address, written, touch=False)

    def store_down(self, i: int, address: BlockHash, written: list[int]) -> None:
        """Write-back: persistent tier ``i`` takes the block, and passes what it evicts on to the next one."""
        if i == len(self.persistent):
            return
        stored, evicted = self.persistent[i].store(address)
        written[self.has_host + i] += stored
        for victim in evicted:
            self.store_down(i + 1, victim, written)

    def store_through(self, address: BlockHash, written: list[int], *, touch: bool = True) -> None:
        """Write-through: every persistent tier takes the block; what they evict is dropped, not passed down (the
        tiers below had it written through to them when it was stored). ``touch=False``: a tier that has the block
        is left as it is (no use)."""
        for i, tier in enumerate(self.persistent):
            if touch or address not in tier:
                written[self.has_host + i] += tier.store(address)[0]


def simulate_tiers(
    trace: Sequence[TraceEntry],
    block_size: int,
    device_blocks: int,
    tiers: Sequence[tuple[str, int | None]],
    write_policy: str,
    restart_after: int | None = None,
    *,
    replicas: int = 1,
    lfu_half_life_pools: float = LFU_HALF_LIFE_POOLS,
) -> TierSimResult:
    """Replay ``trace`` through a device pool of ``device_blocks`` blocks (the engine's LFU) and ``tiers`` below it.

    ``tiers`` are (name, capacity in blocks or None for unbounded), in lookup order, e.g.
    ``[("host", 200), ("disk", 2000), ("redis", None)]``: ``"host"`` (only first) is volatile and takes the
    device's evictions; the others are persistent and filled by ``write_policy`` (one of ``WRITE_POLICIES``, or
    ``WRITE_POLICY_VARIANTS``); ``"redis"`` is shared when ``replicas`` > 1 (requests go round-robin to the
    replicas). ``restart_after=k`` restarts every replica after the first ``k`` requests: their device pools and
    ``host`` tiers are emptied. See the module docstring for the exact semantics. With no tiers, the hits equal
    ``simulate(trace, device_blocks, block_size, "lfu")``'s request by request.

    Raises:
        ValueError: an unknown write policy, a negative capacity, a block size below 1, a misplaced or repeated tier
            name, a restart outside the trace, or fewer than one replica.
    """
    if write_policy not in (*WRITE_POLICIES, *WRITE_POLICY_VARIANTS):
        choices = ", ".join((*WRITE_POLICIES, *WRITE_POLICY_VARIANTS))
        raise ValueError(f"unknown write policy {write_policy!r}; choose one of {choices}")
    if device_blocks < 0:
        raise ValueError(f"device_blocks must be >= 0, got {device_blocks}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    names = [name for name, _ in tiers]
    if len(set(names)) != len(names) or DEVICE in names:
        raise ValueError(f"tier names must be distinct and not {DEVICE!r}, got {names}")
    if HOST_TIER in names[1:]:
        raise ValueError(f"{HOST_TIER!r} can only be the first tier, got {names}")
    for name, capacity in tiers:
        if capacity is not None and capacity < 0:
            raise ValueError(f"tier {name!r}: capacity must be >= 0 or None, got {capacity}")
    if restart_after is not None and not 0 <= restart_after <= len(trace):
        raise ValueError(f"restart_after must be within 0..{len(trace)}, got {restart_after}")
    if replicas < 1:
        raise ValueError(f"replicas must be >= 1, got {replicas}")

    has_host = bool(names) and names[0] == HOST_TIER
    persistent_specs = list(tiers[1:] if has_host else tiers)
    shared = {name: _LruTier(cap) for name, cap in persistent_specs if name == SHARED_TIER}
    fleet = [
        _Replica(
            write_policy, device_blocks, lfu_half_life_pools, tiers[0][1] if has_host else None,
            [shared.get(name) or _LruTier(cap) for name, cap in persistent_specs], has_host=has_host,
        )
        for _ in range(replicas)
    ]  # fmt: skip
    hits_per_request: list[list[int]] = []
    writes_per_request: list[list[int]] = []
    for t, entry in enumerate(trace):
        if t == restart_after:
            for replica in fleet:
                replica.restart()
        r = fleet[t % replicas]
        written = [0] * len(tiers)  # blocks written to each tier while this request ran

        # The read path: each block from the first level that has it; the hit ends at the first block none has.
        levels = r.tiers
        served: list[int] = []  # level per hit block: 0 the device, i the i-th tier
        for address in entry.reads:
            if address in r.device:
                served.append(0)
                continue
            level = next((i for i, tier in enumerate(levels, 1) if address in tier), None)
            if level is None:
                break
            levels[level - 1].load(address)
            served.append(level)
        hit = len(served)
        hit_blocks = [0] * (len(tiers) + 1)
        for level in served:
            hit_blocks[level] += 1
        hits_per_request.append([n * block_size for n in hit_blocks])

        if write_policy == "write-through-after-hit":
            for address in entry.reads[:hit]:
                if address not in r.hit_seen:
                    r.hit_seen.add(address)
                    r.store_through(address, written)

        # The device step, exactly as ``simulate``'s; what it evicts, and what never fitted (computed, then released
        # at once), goes down.
        held_all = list(dict.fromkeys([*entry.reads[:hit], *entry.writes]))
        held = held_all[:device_blocks]
        evicted = r.admit(t, held, entry.reads)
        for address in [*evicted, *(a for a in held_all[device_blocks:] if a not in r.device)]:
            r.demote(address, written)

        # Write-through stores what the request computed (the engine does it asynchronously, once computed).
        if write_policy in _WRITES_THROUGH:
            for address in entry.writes[hit:]:
                r.store_through(address, written)
        writes_per_request.append(written)

    return TierSimResult(
        write_policy=write_policy,
        device_blocks=device_blocks,
        tiers=[(name, cap) for name, cap in tiers],
        replicas=replicas,
        restart_after=restart_after,
        prompt_tokens_per_request=[e.prompt_tokens for e in trace],
        hit_tokens_per_request=hits_per_request,
        blocks_written_per_request=writes_per_request,
    )


@dataclass
class SecondPass:
    """A trace replayed twice through the same tiers, with or without a restart in between."""

    first: TierSpan
    second: TierSpan
    result: TierSimResult

    @property
    def ratio(self) -> float:
        """Second pass hit tokens / first pass hit tokens (0.0 if the first pass hit nothing)."""
        return self.second.hit_tokens / self.first.hit_tokens if self.first.hit_tokens else 0.0


def second_pass(
    trace: Sequence[TraceEntry],
    block_size: int,
    device_blocks: int,
    tiers: Sequence[tuple[str, int | None]],
    write_policy: str,
    *,
    restart: bool = True,
    replicas: int = 1,
    lfu_half_life_pools: float = LFU_HALF_LIFE_POOLS,
) -> SecondPass:
    """Replay ``trace`` twice through ``simulate_tiers``, restarting between the passes if ``restart``: how much
    of what the first pass cached the persistent tiers bring back. The first pass is exactly a single replay."""
    n = len(trace)
    result = simulate_tiers(
        [*trace, *trace], block_size, device_blocks, tiers, write_policy, n if restart else None,
        replicas=replicas, lfu_half_life_pools=lfu_half_life_pools,
    )  # fmt: skip
    return SecondPass(first=result.span(0, n), second=result.span(n), result=result)
