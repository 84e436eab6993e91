"""Host memory tier: a preallocated pool of block slots (pinned memory when the device is CUDA), LRU by use.

Blocks the device pool evicts are copied here instead of dropped (write-back), and copied back on a hit.
NOTE: on a CPU-only server this tier is the same memory as the device pool, so it adds nothing that a larger
``--kv-cache-memory-gb`` would not (and costs a copy each way); it earns its keep when the device is a GPU.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Sequence

import torch

from promptcache.cache.hashing import BlockHash, block_hash
from promptcache.cache.tiers.base import BlockEntry, KVLayout, Tier


class HostTier(Tier):
    name = "host"
    stores_inline = True  # a memory copy: done on the engine thread, before the device block is reused

    def __init__(self, layout: KVLayout, capacity_bytes: int, pin_memory: bool = False):
        super().__init__(layout)
        self.num_slots = capacity_bytes // layout.nbytes
        if self.num_slots < 1:
            raise ValueError(f"host cache of {capacity_bytes} bytes holds no block of {layout.nbytes} bytes")
        # NOTE: allocated once, up front: the host tier's memory is bounded and reported from the start.
        self.slots = torch.empty((self.num_slots, *layout.shape), dtype=layout.dtype, pin_memory=pin_memory)
        self._index: OrderedDict[BlockHash, int] = OrderedDict()  # address -> slot, least recently used first
        self._origin: dict[BlockHash, tuple[BlockHash, tuple[int, ...]]] = {}  # address -> (parent, tokens)
        self._free = list(range(self.num_slots - 1, -1, -1))
        self._pins: dict[BlockHash, float] = {}
        self._held: frozenset[BlockHash] = frozenset()  # the planned load's entries (see ``hold``)
        self._lock = threading.Lock()

    def contains(self, hashes: Sequence[BlockHash]) -> list[bool]:
        with self._lock:
            return [h in self._index for h in hashes]

    def touch(self, hashes: Sequence[BlockHash]) -> None:
        with self._lock:
            for h in hashes:
                if h in self._index:
                    self._index.move_to_end(h)

    def hold(self, hashes: Sequence[BlockHash]) -> None:
        self._held = frozenset(hashes)

    def pin(self, hashes: Sequence[BlockHash], until: float) -> None:
        with self._lock:
            for h in hashes:
                self._pins[h] = max(self._pins.get(h, 0.0), until)

    def load(self, hashes: Sequence[BlockHash]) -> list[torch.Tensor | None]:
        start = time.perf_counter()
        out: list[torch.Tensor | None] = []
        with self._lock:
            for h in hashes:
                slot = self._index.get(h)
                if slot is None:
                    self.counters.misses += 1
                    out.append(None)
                    continue
                self._index.move_to_end(h)
                self.counters.hits += 1
                self.counters.bytes_read += self.layout.nbytes
                out.append(self.slots[slot])
        self.counters.read_latency.observe(time.perf_counter() - start)
        return out

    def store(self, entries: Sequence[BlockEntry]) -> int:
        done = 0
        with self._lock:
            for e in entries:
                if e.block_hash in self._index:
                    self._index.move_to_end(e.block_hash)
                    self.counters.store_skipped += 1
                    continue
                if e.pin_until:
                    self._pins[e.block_hash] = max(self._pins.get(e.block_hash, 0.0), e.pin_until)
                slot = self._take_slot()
                if slot is None:
                    self.counters.error("full")
                    continue
                start = time.perf_counter()
                self.slots[slot].copy_(e.kv)
                self._index[e.block_hash] = slot
                self._origin[e.block_hash] = (e.parent_hash, e.token_ids)
                self._stored((e.block_hash,))
                self.counters.stores += 1
                self.counters.bytes_written += self.layout.nbytes
                self.counters.write_latency.observe(time.perf_counter() - start)
                done += 1
        return done

    def _take_slot(self) -> int | None:
        """A free slot, else the least recently used entry's that is neither pinned nor held (evicted); None if
        there is none."""
        if self._free:
            return self._free.pop()
        now = time.time()
        for h in self._index:
            if self._pins.get(h, 0.0) <= now and h not in self._held:
                self._pins.pop(h, None)
                self.counters.evictions += 1
                return self._drop(h)
        return None

    def _drop(self, h: BlockHash) -> int:
        slot = self._index.pop(h)
        self._origin.pop(h, None)
        self._removed((h,))
        return slot

    def evict(self, hashes: Sequence[BlockHash]) -> int:
        with self._lock:
            dropped = [self._drop(h) for h in hashes if h in self._index]
            self._free.extend(dropped)
            return len(dropped)

    def clear(self) -> int:
        with self._lock:
            n = len(self._index)
            self._index.clear()
            self._origin.clear()
            self._pins.clear()
            self._free = list(range(self.num_slots - 1, -1, -1))
            self._cleared()
            return n

    def addresses(self) -> list[BlockHash]:
        with self._lock:
            return list(self._index)

    def num_entries(self) -> int:
        return len(self._index)

    def size_bytes(self) -> int:
        return len(self._index) * self.layout.nbytes

    def capacity_bytes(self) -> int:
        return self.num_slots * self.layout.nbytes

    def check_integrity(self, deep: bool = False) -> list[str]:
        problems: list[str] = []
        with self._lock:
            used = list(self._index.values())
            if len(set(used)) != len(used):
                problems.append("two host entries share a slot")
            if set(used) & set(self._free) or len(used) + len(self._free) != self.num_slots:
                problems.append("host slots are lost or both free and used")
            if set(self._origin) != set(self._index):
                problems.append("host entries and their origins disagree")
            if deep:
                for h, (parent, tokens) in self._origin.items():
                    if block_hash(parent, tokens) != h:
                        problems.append(f"host entry {h.hex()[:16]} is not the hash of its parent and tokens")
        return problems
