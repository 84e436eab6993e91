"""The interface every tier below the device pool implements, and what tiers share (layout, entries, stats).

A tier holds KV blocks under the same content address the device pool uses (``hashing.py``), so matching,
isolation (the root hashes model fingerprint, dtype and namespace) and accounting carry over unchanged.

NOTE: invariants every tier keeps:
- an entry is visible (``contains`` / ``load`` find it) only once its bytes are completely written;
- ``load`` never returns KV it has not verified (header, size, checksum): anything wrong is a miss (None), the
  entry is dropped and the problem counted, never an exception and never wrong KV;
- a tier that cannot be reached answers "not present" and drops writes (counted); it never raises to the engine.
"""

from __future__ import annotations

import bisect
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from promptcache.cache.events import KVEventSink
from promptcache.cache.hashing import BlockHash

# Latency histogram buckets (seconds) for tier reads and writes; the API layer exports them to Prometheus.
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


@dataclass(frozen=True)
class KVLayout:
    """What one block's KV looks like: every tier entry must match it exactly to be loaded."""

    fingerprint: str  # the model's weights fingerprint (also the root of every address)
    dtype: torch.dtype
    shape: tuple[int, ...]  # [layers, 2 (K, V), block_size, kv_heads, head_dim]
    block_size: int

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.tensor([], dtype=self.dtype).element_size()

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


@dataclass
class BlockEntry:
    """One block on its way down to a tier: its address, what it was computed from, and a CPU copy of its KV."""

    block_hash: BlockHash
    parent_hash: BlockHash
    token_ids: tuple[int, ...]
    kv: torch.Tensor  # contiguous, on the CPU, shaped like ``KVLayout.shape``
    pin_until: float = 0.0  # wall-clock seconds (time.time()): keep at least until then (0: no pin)


class BlockIO(Protocol):
    """How the cache reaches a device block's KV (the model runner implements it; the cache never sees tensors
    otherwise)."""

    def read_block(self, block_id: int) -> torch.Tensor:
        """A view of the block's KV, shaped like ``KVLayout.shape`` (valid until the block is written again)."""
        ...

    def write_block(self, block_id: int, kv: torch.Tensor) -> None:
        """Copy ``kv`` (shaped like ``KVLayout.shape``, any device) into the block."""
        ...


class Histogram:
    """A fixed-bucket latency histogram (cumulative counts as Prometheus wants them); thread-safe."""

    def __init__(self, buckets: Sequence[float] = LATENCY_BUCKETS):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf
        self.sum = 0.0
        self._lock = threading.Lock()

    def observe(self, seconds: float) -> None:
        with self._lock:
            self.counts[bisect.bisect_left(self.buckets, seconds)] += 1
            self.sum += seconds

    @property
    def count(self) -> int:
        return sum(self.counts)

    def snapshot(self) -> dict[str, object]:
        """{"buckets": [[le, cumulative count], ...], "count", "sum"} (le of the last bucket is "+Inf")."""
        with self._lock:
            cum, out = 0, []
            for le, c in zip([*self.buckets, float("inf")], self.counts):
                cum += c
                out.append([le, cum])
            return {"buckets": out, "count": cum, "sum": self.sum}


@dataclass
class TierStats:
    """Counters of one tier (monotonic unless said otherwise); ``Tier.stats()`` returns a dict of them."""

    hits: int = 0  # blocks loaded and verified
    misses: int = 0  # blocks asked for (by load) and not found or not loadable
    stores: int = 0  # blocks written (visible)
    store_skipped: int = 0  # store calls for blocks already present
    evictions: int = 0  # entries dropped to stay within the budget
    bytes_read: int = 0
    bytes_written: int = 0
    errors: dict[str, int] = field(default_factory=dict)  # by kind: "corrupt", "io", "timeout", "unavailable", ...
    read_latency: Histogram = field(default_factory=Histogram)  # one observation per load call
    write_latency: Histogram = field(default_factory=Histogram)  # one observation per stored block

    def error(self, kind: str, n: int = 1) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + n


class Tier(ABC):
    """A store of KV blocks keyed by content address, below the device pool.

    Calls come from two threads: the engine thread (``contains``, ``load``, ``touch``, ``stats``) and the tier
    writer thread (``store``); implementations lock what they share. ``evict``, ``clear`` and ``check_integrity``
    may come from either.
    """

    name: str  # "host", "disk", "redis"
    shared: bool = False  # True when other processes read and write it too (Redis)
    stores_inline: bool = False  # True when ``store`` is a memory copy, done on the engine thread (host)

    def __init__(self, layout: KVLayout):
        self.layout = layout
        self.counters = TierStats()
        # Told every address this tier starts or stops holding (local tiers only; see cache/events.py).
        self.events: KVEventSink | None = None

    def addresses(self) -> list[BlockHash] | None:
        """Every address held now, for a KV-event snapshot; None for a shared tier (it reports no events)."""
        return None

    def _stored(self, hashes: Sequence[BlockHash]) -> None:
        if self.events is not None and hashes:
            self.events.stored(self.name, hashes)

    def _removed(self, hashes: Sequence[BlockHash]) -> None:
        if self.events is not None and hashes:
            self.events.removed(self.name, hashes)

    def _cleared(self) -> None:
        if self.events is not None:
            self.events.cleared(self.name)

    @property
    def available(self) -> bool:
        """False while the tier is down (unreachable); it then finds nothing and drops writes."""
        return True

    @abstractmethod
    def contains(self, hashes: Sequence[BlockHash]) -> list[bool]:
        """Which of ``hashes`` the tier holds now (one round trip for a whole run; no data is read)."""

    @abstractmethod
    def load(self, hashes: Sequence[BlockHash]) -> list[torch.Tensor | None]:
        """The verified KV of each block (CPU tensors shaped like the layout), None where it is missing or bad.

        A returned tensor may be a view of the tier's own memory: copy it before the next call into the tier.
        """

    @abstractmethod
    def store(self, entries: Sequence[BlockEntry]) -> int:
        """Write entries (skipping those present); each becomes visible once written. Returns how many were
        written. Makes room by evicting entries, oldest use first, never one pinned past now."""

    def touch(self, hashes: Sequence[BlockHash]) -> None:  # noqa: B027 - optional
        """Mark blocks as just used (a load is coming), so making room evicts them last."""

    def hold(self, hashes: Sequence[BlockHash]) -> None:  # noqa: B027 - optional
        """Keep these entries from eviction until the next ``hold`` call: a load of them is coming, and the device
        blocks allocated for it may spill other blocks into this tier first (only tiers that store inline)."""

    def pin(self, hashes: Sequence[BlockHash], until: float) -> None:  # noqa: B027 - optional
        """Keep these blocks until ``until`` (time.time() seconds) at least, where present."""

    @abstractmethod
    def evict(self, hashes: Sequence[BlockHash]) -> int:
        """Drop these entries where present; returns how many were dropped."""

    @abstractmethod
    def clear(self) -> int:
        """Drop every entry of this model (for a shared tier: this model's keys only); returns how many."""

    @abstractmethod
    def num_entries(self) -> int:
        """Entries held now."""

    @abstractmethod
    def size_bytes(self) -> int:
        """Bytes held now (entries with their headers)."""

    @abstractmethod
    def capacity_bytes(self) -> int | None:
        """The budget in bytes (None: no budget of ours, e.g. Redis's own maxmemory)."""

    @abstractmethod
    def check_integrity(self, deep: bool = False) -> list[str]:
        """Problems found (empty: consistent). ``deep`` also reads and verifies every entry's bytes."""

    def close(self) -> None:  # noqa: B027 - optional
        """Release connections and files."""

    def stats(self) -> dict[str, object]:
        c = self.counters
        return {
            "tier": self.name,
            "available": self.available,
            "entries": self.num_entries(),
            "size_bytes": self.size_bytes(),
            "capacity_bytes": self.capacity_bytes(),
            "hits": c.hits,
            "misses": c.misses,
            "stores": c.stores,
            "store_skipped": c.store_skipped,
            "evictions": c.evictions,
            "bytes_read": c.bytes_read,
            "bytes_written": c.bytes_written,
            "errors": dict(c.errors),
            "read_latency": c.read_latency.snapshot(),
            "write_latency": c.write_latency.snapshot(),
        }
