"""The tiers below the device pool as one object: lookups across tiers, loads with a deadline, the writer thread.

The cache manager talks only to ``TierStack``; which tiers exist is decided by ``build_tier_stack`` from options.

Write policy (decided by the offline replay in ``bench/tier_study.py``, see docs/tier-policy.md):
- host: write-back. A block the device pool evicts is copied into a host slot on the engine thread (a memory copy,
  before the device block is reused).
- disk and Redis: write-through+back. Every block a request computes is copied out once and queued for the writer
  thread right after its step (durable at once, and shared with other replicas at once); and when the device
  evicts a block that the disk has dropped meanwhile (or whose write was dropped), it is written again, as
  write-back would, so a disk smaller than the working set keeps what just left memory.

NOTE: the step loop never waits for a write: the queue is bounded in bytes and a write that does not fit is
dropped (counted). An entry is visible in a tier only once its write completed (the tiers guarantee it).
Reads happen at admission with a deadline; a late, failed or corrupt read is a miss and the rest is recomputed.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field

import torch

from promptcache.cache.hashing import BlockHash
from promptcache.cache.tiers.base import BlockEntry, BlockIO, KVLayout, Tier

log = logging.getLogger("promptcache.tiers")
LOAD_POLICIES = ("auto", "always")
_EWMA = 0.2  # weight of the newest observation in the load / recompute rate estimates
_WARMUP = 2  # first observations ignored: a fresh engine's first passes are slow (allocation, lazy init)
READ_SECONDS_PER_BLOCK = 0.002  # the deadline grows with the run: 128 blocks (2,048 tokens) get 0.26 s more


@dataclass
class TierOptions:
    """Which tiers to build and how they behave (``EngineConfig`` / ``promptcache serve`` flags)."""

    host_cache_gb: float | None = None  # host memory for evicted blocks (None or 0: no host tier)
    disk_cache_dir: str | None = None  # persistent block files (None: no disk tier)
    disk_cache_gb: float = 10.0
    redis_url: str | None = None  # redis://host:port/db, rediss://..., unix://..., redis+cluster://host:port
    redis_ttl: float = 86400.0  # seconds an entry lives in Redis after its last write (pins extend it)
    read_timeout: float = 1.0  # the read deadline of a lower tier, plus READ_SECONDS_PER_BLOCK per block read
    write_queue_gb: float = 0.25  # KV bytes waiting for the writer thread, at most
    load_policy: str = "auto"  # "auto": load a run only when measured faster than recomputing it; "always"

    def __post_init__(self) -> None:
        if self.load_policy not in LOAD_POLICIES:
            raise ValueError(f"tier load policy must be one of {LOAD_POLICIES}, got {self.load_policy!r}")
        for name in ("disk_cache_gb", "redis_ttl", "read_timeout", "write_queue_gb"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.host_cache_gb is not None and self.host_cache_gb < 0:
            raise ValueError(f"host_cache_gb must be >= 0, got {self.host_cache_gb}")

    @property
    def enabled(self) -> bool:
        return bool(self.host_cache_gb) or bool(self.disk_cache_dir) or bool(self.redis_url)


@dataclass
class TierPlan:
    """Blocks after the device hit found in lower tiers: ``sources[i]`` holds ``hashes[i]``."""

    hashes: list[BlockHash]
    sources: list[Tier]
    skipped: str | None = None  # why a run found below is recomputed instead of loaded (for explain)
    missing: list[BlockHash] = field(default_factory=list)  # looked-up addresses that no tier holds

    def __len__(self) -> int:
        return len(self.hashes)


@dataclass
class _Write:
    entries: list[BlockEntry]
    targets: list[Tier]
    nbytes: int


@dataclass
class _Rate:
    """An exponentially weighted estimate of seconds per unit (None until the first observation)."""

    value: float | None = None
    skipped_in_a_row: int = 0
    observed: int = 0

    def observe(self, seconds: float, units: int) -> None:
        self.observed += 1
        if units > 0 and self.observed > _WARMUP:
            rate = seconds / units
            self.value = rate if self.value is None else (1 - _EWMA) * self.value + _EWMA * rate


@dataclass
class _Recent:
    """A bounded set of addresses (oldest forgotten first)."""

    capacity: int = 1 << 18
    items: OrderedDict[BlockHash, None] = field(default_factory=OrderedDict)

    def add(self, h: BlockHash) -> None:
        self.items[h] = None
        self.items.move_to_end(h)
        if len(self.items) > self.capacity:
            self.items.popitem(last=False)

    def __contains__(self, h: BlockHash) -> bool:
        return h in self.items

    def discard(self, h: BlockHash) -> None:
        self.items.pop(h, None)


class TierStack:
    """Tiers in lookup order (host, disk, Redis), the writer thread, and the read pool."""

    def __init__(self, tiers: Sequence[Tier], io: BlockIO, options: TierOptions):
        self.tiers = list(tiers)
        self.io = io
        self.options = options
        self.layout = tiers[0].layout if tiers else None
        self._inline = [t for t in self.tiers if t.stores_inline]
        self._queued = [t for t in self.tiers if not t.stores_inline]
        self._load_rate = {t.name: _Rate() for t in self.tiers}
        self.recompute_rate = _Rate()  # seconds per prefill token, measured by the engine
        self._pins: dict[BlockHash, float] = {}
        self._sent_below: _Recent = _Recent()  # addresses this process queued for the queued tiers
        self._queue: deque[_Write | tuple[list[BlockHash], float]] = deque()
        self._queue_bytes = 0
        self._max_queue_bytes = int(options.write_queue_gb * (1 << 30))
        self._cv = threading.Condition()
        self._busy = False
        self._closed = False
        self.dropped_writes = 0  # blocks not queued because the queue was full
        self._reader = ThreadPoolExecutor(max_workers=max(1, len(self._queued)), thread_name_prefix="pc-tier-read")
        self._writer = threading.Thread(target=self._write_loop, name="pc-tier-write", daemon=True)
        if self._queued:
            self._writer.start()
            # NOTE: a process that exits without close() must not kill the writer inside a write (torch aborts):
            # finish the queue (bounded) and stop the thread first.
            atexit.register(self._close_at_exit)

    def _close_at_exit(self) -> None:
        self.flush(timeout=10.0)
        self._stop_writer()

    # ---- reads (engine thread) -----------------------------------------------------------------------------
    def lookup(self, hashes: Sequence[BlockHash]) -> TierPlan:
        """The longest run of ``hashes`` that the tiers hold, block by block from the first tier that has it."""
        sources: list[Tier | None] = [None] * len(hashes)
        for tier in self.tiers:
            todo = [i for i, s in enumerate(sources) if s is None]
            if not todo:
                continue  # NOTE: a down tier is still asked: it answers "absent" without I/O, and probes when due
            for i, present in zip(todo, tier.contains([hashes[i] for i in todo])):
                if present:
                    sources[i] = tier
        run = next((i for i, s in enumerate(sources) if s is None), len(sources))
        return TierPlan(list(hashes[:run]), [s for s in sources[:run] if s is not None], missing=[
            h for h, s in zip(hashes, sources) if s is None
        ])  # fmt: skip

    def plan(self, hashes: Sequence[BlockHash], block_size: int) -> TierPlan:
        """``lookup``, cut to the prefix worth loading: measured load time against measured recompute time."""
        found = self.lookup(hashes)
        for h in found.missing:  # no tier has it (dropped write, eviction, a Redis restart): write it when computed
            self._sent_below.discard(h)
        if not found:
            return found
        keep, why = self.worth_loading(found, block_size)
        if keep < len(found):
            # NOTE: estimates learn only from loads; after a run of skips, load once anyway to measure again.
            rate = self._load_rate[found.sources[keep].name]
            rate.skipped_in_a_row += 1
            if rate.skipped_in_a_row < 16:
                found = TierPlan(found.hashes[:keep], found.sources[:keep], why)
        for tier in self.tiers:
            mine = [h for h, s in zip(found.hashes, found.sources) if s is tier]
            tier.touch(mine)
            if tier.stores_inline:
                # NOTE: allocating the device blocks for this load spills evicted blocks into this tier; they must
                # not push out the very entries about to be loaded.
                tier.hold(mine)
        return found

    def worth_loading(self, found: TierPlan, block_size: int) -> tuple[int, str | None]:
        """How many leading blocks of ``found`` to load, and why the rest is recomputed: the prefix (cut where
        the source tier changes) whose measured recompute time exceeds its estimated load time by the most."""
        per_token = self.recompute_rate.value
        if per_token is None or self.options.load_policy == "always":
            return len(found), None
        best, best_gain, cost, cut_cost = 0, 0.0, 0.0, 0.0
        for i, tier in enumerate(found.sources):
            cost += self._load_rate[tier.name].value or 0.0
            at_boundary = i + 1 == len(found) or found.sources[i + 1] is not tier
            gain = (i + 1) * block_size * per_token - cost
            if at_boundary and gain > best_gain:
                best, best_gain, cut_cost = i + 1, gain, cost
        if best == len(found):
            return best, None
        recompute_ms = (len(found) - best) * block_size * per_token * 1000
        load_ms = (cost - cut_cost) * 1000
        return best, (
            f"{len(found) - best} blocks found in the {found.sources[best].name} tier are recomputed: loading them "
            f"is estimated at {load_ms:.2f} ms, recomputing them at {recompute_ms:.2f} ms (measured on this server)"
        )

    def describe(self, h: BlockHash) -> dict[str, str]:
        """Why no tier could serve block ``h``: each tier's state (for explain)."""
        out = {}
        for tier in self.tiers:
            if not tier.available:
                out[tier.name] = "unavailable: the tier is down (retrying with backoff); its blocks count as misses"
            elif tier.contains([h])[0]:
                out[tier.name] = "holds this block"
            else:
                out[tier.name] = f"does not hold this block ({tier.num_entries()} entries held)"
        return out

    def load_into(
        self, plan: TierPlan, block_ids: Sequence[int], origins: Sequence[tuple[BlockHash, tuple[int, ...]]]
    ) -> int:
        """Load the plan's blocks into ``block_ids`` (device blocks, same order; ``origins`` their parents and
        tokens); returns how many leading blocks were loaded and verified (the rest must be computed)."""
        if not plan:
            return 0
        groups: dict[str, tuple[Tier, list[int]]] = {}
        for i, tier in enumerate(plan.sources):
            groups.setdefault(tier.name, (tier, []))[1].append(i)
        loaded: list[torch.Tensor | None] = [None] * len(plan)
        futures = {}
        for name, (tier, idx) in groups.items():
            if not tier.stores_inline:  # I/O: in the read pool, under the deadline
                futures[name] = (self._reader.submit(tier.load, [plan.hashes[i] for i in idx]), time.perf_counter())
        n_ok = len(plan)
        deadline = self.options.read_timeout + READ_SECONDS_PER_BLOCK * len(plan)
        for name, (tier, idx) in groups.items():
            if tier.stores_inline:
                start = time.perf_counter()
                got = tier.load([plan.hashes[i] for i in idx])
                self._load_rate[name].observe(time.perf_counter() - start, len(idx))
            else:
                fut, start = futures[name]
                try:
                    got = fut.result(timeout=max(0.0, deadline - (time.perf_counter() - start)))
                    self._load_rate[name].observe(time.perf_counter() - start, len(idx))
                except FutureTimeout:
                    tier.counters.error("timeout")
                    self._load_rate[name].observe(deadline, len(idx))
                    got = [None] * len(idx)
                except Exception:  # a tier must not fail a request: whatever went wrong is a miss
                    log.exception("reading the %s tier failed", name)
                    tier.counters.error("io")
                    got = [None] * len(idx)
            for i, kv in zip(idx, got):
                loaded[i] = kv
                if kv is None:
                    n_ok = min(n_ok, i)
            self._load_rate[name].skipped_in_a_row = 0
        for tier in self._inline:
            tier.hold(())
        for i, kv in enumerate(loaded):
            if kv is None:  # lost below (corrupt, late, gone): when recomputed, it is written down again
                self._sent_below.discard(plan.hashes[i])
        for i in range(n_ok):
            kv = loaded[i]
            assert kv is not None
            self.io.write_block(block_ids[i], kv)
        # Blocks found only in the shared tier go to the local disk too, so they survive a restart of this server.
        shared = [i for i in range(n_ok) if plan.sources[i].shared]
        local = [t for t in self._queued if not t.shared]
        if shared and local:
            self._enqueue([(plan.hashes[i], *origins[i], block_ids[i]) for i in shared], local)
        return n_ok

    # ---- writes (engine thread side) ------------------------------------------------------------------------
    def on_written(self, blocks: Sequence[tuple[BlockHash, BlockHash, tuple[int, ...], int]]) -> None:
        """Blocks a step computed and registered: (address, parent, tokens, device block id); write-through."""
        fresh = [b for b in blocks if b[0] not in self._sent_below]
        if self._queued and fresh:
            self._enqueue(fresh, self._queued)

    def on_evicted(self, h: BlockHash, parent: BlockHash, tokens: tuple[int, ...], block_id: int) -> None:
        """The device pool is about to reuse this block: copy it into the host tier, and write it again to a lower
        tier that no longer holds it (write-through+back)."""
        if self._inline:
            view = self.io.read_block(block_id)
            entry = BlockEntry(h, parent, tokens, view, self._pins.get(h, 0.0))
            for tier in self._inline:
                tier.store([entry])
        # Write-through+back: a local tier that dropped the block meanwhile gets it again now that it leaves the
        # device (as write-back would write it); for Redis, asking would cost a round trip on the step loop, so only
        # a block this process never sent down (a dropped write) is written again.
        targets = []
        for t in self._queued:
            if t.shared:
                if h not in self._sent_below:
                    targets.append(t)
            elif t.contains([h])[0]:
                t.touch([h])  # leaving memory is a use: the disk keeps it longer (measured: better than not)
            else:
                targets.append(t)
        if targets:
            self._enqueue([(h, parent, tokens, block_id)], targets)

    def _enqueue(
        self,
        blocks: Sequence[tuple[BlockHash, BlockHash, tuple[int, ...], int]],
        targets: list[Tier],
    ) -> None:
        assert self.layout is not None
        fresh = list(blocks)
        nbytes = len(fresh) * self.layout.nbytes
        with self._cv:
            if self._closed or self._queue_bytes + nbytes > self._max_queue_bytes:
                self.dropped_writes += len(fresh)
                return
        # The copy out of the device pool happens now, on the engine thread: the block may be reused next step.
        entries = []
        for h, parent, tokens, bid in fresh:
            entries.append(BlockEntry(h, parent, tokens, self.io.read_block(bid).to("cpu", copy=True).contiguous()))
            self._sent_below.add(h)
        with self._cv:
            self._queue.append(_Write(entries, targets, nbytes))
            self._queue_bytes += nbytes
            self._cv.notify()

    def pin(self, hashes: Sequence[BlockHash], until: float) -> None:
        """Keep these blocks in every tier until ``until`` (time.time() seconds), including writes still queued."""
        if not hashes:
            return
        now = time.time()
        for h in hashes:
            self._pins[h] = max(self._pins.get(h, 0.0), until)
        if len(self._pins) > 1 << 16:
            self._pins = {h: t for h, t in self._pins.items() if t > now}
        for tier in self._inline:
            tier.pin(hashes, until)
        if self._queued:
            with self._cv:
                self._queue.append((list(hashes), until))
                self._cv.notify()

    # ---- the writer thread ----------------------------------------------------------------------------------
    def _write_loop(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._closed:
                    self._cv.wait()
                if not self._queue:
                    return
                item = self._queue.popleft()
                self._busy = True
            try:
                self._write(item)
            except Exception:  # the writer must outlive any tier failure
                log.exception("tier write failed")
            finally:
                with self._cv:
                    if isinstance(item, _Write):
                        self._queue_bytes -= item.nbytes
                    self._busy = False
                    self._cv.notify_all()

    def _write(self, item: _Write | tuple[list[BlockHash], float]) -> None:
        if isinstance(item, tuple):
            hashes, until = item
            for tier in self._queued:
                tier.pin(hashes, until)
            return
        for e in item.entries:
            e.pin_until = max(e.pin_until, self._pins.get(e.block_hash, 0.0))
        for tier in item.targets:
            tier.store(item.entries)  # a down tier drops them (counted) and decides itself when to try again

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every queued write is done; False if ``timeout`` passed first."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while self._queue or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(left)
        return True

    # ---- housekeeping ---------------------------------------------------------------------------------------
    def clear(self, shared: bool = False) -> dict[str, int]:
        """Drop every entry of this model from each tier (a shared tier only when ``shared``)."""
        self.flush()
        # NOTE: what was sent below is gone: a block computed from now on is written through again, not skipped as
        # sent (a block no lookup walks, such as the one holding a prompt's last token, would never go down again).
        self._sent_below = _Recent()
        return {t.name: t.clear() for t in self.tiers if shared or not t.shared}

    def check_integrity(self, deep: bool = False) -> dict[str, list[str]]:
        return {t.name: t.check_integrity(deep) for t in self.tiers}

    def rates(self) -> dict[str, object]:
        """The measured costs (seconds per prefill token; per block loaded, by tier), None where not yet measured.
        Reads two floats per tier: safe from any thread, no I/O (``/health`` reports them to fleet routers)."""
        return {"recompute_seconds_per_token": self.recompute_rate.value,
                "load_seconds_per_block": {t.name: self._load_rate[t.name].value for t in self.tiers}}  # fmt: skip

    def stats(self) -> dict[str, object]:
        with self._cv:
            queued = sum(len(w.entries) for w in self._queue if isinstance(w, _Write))
        return {
            "tiers": [{**t.stats(), "load_seconds_per_block": self._load_rate[t.name].value} for t in self.tiers],
            "write_queue_blocks": queued,
            "write_queue_bytes": self._queue_bytes,
            "dropped_writes": self.dropped_writes,
            "pinned_blocks": sum(1 for t in self._pins.copy().values() if t > time.time()),  # copy: other threads
            "recompute_seconds_per_token": self.recompute_rate.value,
        }

    def _stop_writer(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        if self._writer.is_alive():
            self._writer.join(timeout=10)

    def close(self) -> None:
        """Finish queued writes, stop the threads, close every tier."""
        self.flush()
        self._stop_writer()
        atexit.unregister(self._close_at_exit)
        self._reader.shutdown(wait=False, cancel_futures=True)
        for t in self.tiers:
            t.close()


def build_tier_stack(options: TierOptions, layout: KVLayout, io: BlockIO, device: torch.device) -> TierStack | None:
    """The tiers ``options`` ask for, in lookup order; None when there are none."""
    if not options.enabled:
        return None
    tiers: list[Tier] = []
    if options.host_cache_gb:
        from promptcache.cache.tiers.host import HostTier

        tiers.append(HostTier(layout, int(options.host_cache_gb * (1 << 30)), pin_memory=device.type == "cuda"))
    if options.disk_cache_dir:
        from promptcache.cache.tiers.disk import DiskTier

        tiers.append(DiskTier(layout, options.disk_cache_dir, int(options.disk_cache_gb * (1 << 30))))
    if options.redis_url:
        from promptcache.cache.tiers.redis_tier import RedisTier

        tiers.append(RedisTier(layout, options.redis_url, ttl_seconds=options.redis_ttl, timeout=options.read_timeout))
    return TierStack(tiers, io, options)
