"""The Redis tier: KV blocks shared by every replica of a model through one Redis, or a Redis / Valkey cluster.

Each block is one key, ``pc:kv:<fingerprint[:32]>:<dtype>:bs<block size>:<address hex>``, whose value holds header
and bytes together (``format.encode``): a reader never sees a header without its bytes, and one SET makes an entry
visible whole. Keys carry no hash tag, so a cluster spreads a run's blocks (and the load of reading them) over its
nodes. Every key expires (``ttl_seconds``, longer while pinned); Redis's own maxmemory policy bounds the memory.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import redis
import torch
from redis.exceptions import ResponseError

from promptcache.cache.hashing import BlockHash
from promptcache.cache.tiers import format as kvformat
from promptcache.cache.tiers.base import BlockEntry, KVLayout, Tier
from promptcache.redis_link import RedisLink

_COUNT_CACHE_S = 2.0  # num_entries SCANs every key of ours: O(keys), so it is cached
_BATCH = 1000  # keys per SCAN step and per pipeline in clear / check_integrity


def _glob_escape(text: str) -> str:
    """``text`` matched literally by a SCAN MATCH pattern (a fingerprint may hold glob characters)."""
    return "".join("\\" + c if c in "\\*?[]" else c for c in text)


class RedisTier(Tier):
    """KV blocks in Redis (``redis://``, ``rediss://``, ``unix://``) or a cluster (``redis+cluster://seed:port``)."""

    name = "redis"
    shared = True

    def __init__(self, layout: KVLayout, url: str, ttl_seconds: float = 86400, timeout: float = 0.5):
        super().__init__(layout)
        self.url, self.ttl_seconds, self.timeout = url, ttl_seconds, timeout
        self.prefix = f"pc:kv:{layout.fingerprint[:32]}:{layout.dtype_name}:bs{layout.block_size}:"
        self._lock = threading.Lock()  # guards the counters and the count cache (the link guards its own state)
        self.link = RedisLink(url, timeout, on_error=self._count_error)
        self.cluster = self.link.cluster
        self._count = (float("-inf"), 0)  # (monotonic time, num_entries)
        self._expire_gt = True  # EXPIRE ... GT exists (Redis >= 7, Valkey); found out on first refusal
        # size_bytes estimate: the header of a block with 5-digit token ids, plus the KV bytes.
        probe = BlockEntry(bytes(32), bytes(32), (99_999,) * layout.block_size, torch.empty(0, dtype=layout.dtype))
        self._entry_bytes = len(kvformat.encode_header(probe, layout)) + layout.nbytes

    # ---- connection and down state (kept by the link) ---------------------------------------------------------
    @property
    def available(self) -> bool:
        return self.link.available

    def _count_error(self, kind: str) -> None:
        with self._lock:
            self.counters.error(kind)

    # Views of the link's backoff state, kept from when the tier held it: its tests read them and move the retry time.
    @property
    def _backoff(self) -> float:
        return self.link._backoff

    @property
    def _retry_at(self) -> float:
        return self.link._retry_at

    @_retry_at.setter
    def _retry_at(self, at: float) -> None:
        self.link._retry_at = at

    def _key(self, h: BlockHash) -> str:
        return self.prefix + h.hex()

    def _each(self, command: Callable[[Any, str], object], keys: Sequence[str]) -> list[Any] | None:
        """``command`` on every key in one round trip (``RedisLink.pipelined``); None when Redis failed."""
        return self.link.attempt(lambda: self.link.pipelined(command, keys))

    def _own_keys(self, node: redis.Redis) -> Iterator[list[bytes]]:
        """This model's keys on ``node``, a SCAN step's batch at a time (SCAN never blocks Redis like KEYS)."""
        cursor = None
        while cursor != 0:
            cursor, keys = node.scan(cursor or 0, match=_glob_escape(self.prefix) + "*", count=_BATCH)
            if keys:
                yield keys

    # ---- the Tier interface ----------------------------------------------------------------------------------
    def contains(self, hashes: Sequence[BlockHash]) -> list[bool]:
        if not hashes or not self.link.may_try():
            return [False] * len(hashes)
        found = self._each(lambda p, k: p.exists(k), [self._key(h) for h in hashes])
        return [r == 1 for r in found] if found is not None else [False] * len(hashes)

    def load(self, hashes: Sequence[BlockHash]) -> list[torch.Tensor | None]:
        out: list[torch.Tensor | None] = [None] * len(hashes)
        if not hashes or not self.link.may_try():
            with self._lock:
                self.counters.misses += len(hashes)
            return out
        start = time.perf_counter()
        values = self._each(lambda p, k: p.get(k), [self._key(h) for h in hashes])
        self.counters.read_latency.observe(time.perf_counter() - start)
        corrupt: list[str] = []
        read = 0
        for i, (h, value) in enumerate(zip(hashes, values or [])):
            if not isinstance(value, bytes):
                continue  # absent (None), or refused (an exception reply): a miss
            try:
                out[i] = kvformat.decode(value, self.layout, expected=h).kv
                read += len(value)
            except kvformat.CorruptEntry:
                corrupt.append(self._key(h))
        hits = sum(kv is not None for kv in out)
        with self._lock:
            self.counters.hits += hits
            self.counters.misses += len(hashes) - hits
            self.counters.bytes_read += read  # bytes of the entries loaded (corrupt values read are not counted)
            if corrupt:
                self.counters.error("corrupt", len(corrupt))
        if corrupt:
            # A bad value would fail every replica's reads: drop it. A replica may have rewritten it good meanwhile;
            # deleting that copy costs one recompute, never wrong KV.
            self._each(lambda p, k: p.delete(k), corrupt)
        return out

    def store(self, entries: Sequence[BlockEntry]) -> int:
        """SET every entry in one round trip. A block already present is simply overwritten with the same content
        (cheaper than asking first), so ``store_skipped`` stays 0. write_latency: the round trip's time divided by
        the blocks it carried, observed once per block."""
        if not entries:
            return 0
        if not self.link.may_try():
            with self._lock:
                self.counters.error("dropped", len(entries))
            return 0
        values = [kvformat.encode(e, self.layout) for e in entries]
        now = time.time()
        ttl_ms = [max(1, int(max(self.ttl_seconds, e.pin_until - now) * 1000)) for e in entries]
        jobs = dict(zip((self._key(e.block_hash) for e in entries), zip(values, ttl_ms)))
        start = time.perf_counter()
        results = self._each(lambda p, k: p.set(k, jobs[k][0], px=jobs[k][1]), list(jobs))
        elapsed = time.perf_counter() - start
        if results is None:
            with self._lock:
                self.counters.error("dropped", len(entries))
            return 0
        done = [v for (v, _), r in zip(jobs.values(), results) if r is True]
        with self._lock:
            self.counters.stores += len(done)
            self.counters.bytes_written += sum(len(v) for v in done)
            if len(done) < len(results):
                self.counters.error("rejected", len(results) - len(done))  # e.g. OOM under maxmemory noeviction
        for _ in results:
            self.counters.write_latency.observe(elapsed / len(results))
        return len(done)

    def pin(self, hashes: Sequence[BlockHash], until: float) -> None:
        """Extend the expiry of present blocks to ``until`` at least; never shortens one."""
        ms = int((until - time.time()) * 1000)
        if not hashes or ms <= 0 or not self.link.may_try():
            return
        keys = [self._key(h) for h in hashes]
        if self._expire_gt:
            done = self._each(lambda p, k: p.pexpire(k, ms, gt=True), keys)
            if done is None or not any(isinstance(r, ResponseError) for r in done):
                return
            self._expire_gt = False  # Redis < 7 refuses GT: read the TTLs and only lengthen them
        ttls = self._each(lambda p, k: p.pttl(k), keys) or []
        shorter = [k for k, t in zip(keys, ttls) if isinstance(t, int) and 0 <= t < ms]
        if shorter:
            self._each(lambda p, k: p.pexpire(k, ms), shorter)

    def evict(self, hashes: Sequence[BlockHash]) -> int:
        if not hashes or not self.link.may_try():
            return 0
        gone = self._each(lambda p, k: p.delete(k), [self._key(h) for h in hashes])
        return sum(r for r in gone or [] if isinstance(r, int))

    def clear(self) -> int:
        """Drop this model's keys (this fingerprint, dtype and block size) on every primary; others' stay."""
        if not self.link.may_try():
            return 0

        def run() -> int:
            n = 0
            for node in self.link.nodes():
                for keys in self._own_keys(node):
                    pipe = node.pipeline(transaction=False)
                    for key in keys:  # one DEL per key: a multi-key DEL across slots is refused by a cluster
                        pipe.delete(key)
                    n += sum(r for r in pipe.execute(raise_on_error=False) if isinstance(r, int))
            return n

        n = self.link.attempt(run) or 0
        with self._lock:
            self._count = (float("-inf"), 0)
        return n

    def num_entries(self) -> int:
        with self._lock:
            at, n = self._count
            if time.monotonic() - at < _COUNT_CACHE_S:
                return n
        if not self.link.may_try():
            return 0
        n = self.link.attempt(lambda: sum(len(keys) for node in self.link.nodes() for keys in self._own_keys(node)))
        if n is None:
            return 0
        with self._lock:
            self._count = (time.monotonic(), n)
        return n

    def size_bytes(self) -> int:
        # An estimate: entries times one entry's encoded size (headers differ by a few bytes; Redis's own
        # per-key overhead is not ours to know). MEMORY USAGE per key would be exact but O(keys) round trips.
        return self.num_entries() * self._entry_bytes

    def capacity_bytes(self) -> int | None:
        return None  # Redis's own maxmemory (and its eviction policy) governs

    def check_integrity(self, deep: bool = False) -> list[str]:
        """Every key of ours has an expiry (else it would outlive every model change); ``deep``: every value
        decodes as the block its key names."""
        if not self.link.may_try():
            return ["redis unreachable"]

        def run() -> list[str]:
            problems: list[str] = []
            for node in self.link.nodes():
                for keys in self._own_keys(node):
                    pipe = node.pipeline(transaction=False)
                    for key in keys:
                        pipe.pttl(key)
                        if deep:
                            pipe.get(key)
                    replies = iter(pipe.execute(raise_on_error=False))
                    for key in keys:
                        name, ttl, value = key.decode(errors="replace"), next(replies), next(replies) if deep else None
                        if ttl == -1:  # -2: gone since the SCAN
                            problems.append(f"{name}: no expiry")
                        if isinstance(value, bytes):
                            try:
                                kvformat.decode(value, self.layout, expected=bytes.fromhex(name[len(self.prefix) :]))
                            except (kvformat.CorruptEntry, ValueError) as err:
                                problems.append(f"{name}: {err}")
            return problems

        found = self.link.attempt(run)
        return found if found is not None else ["redis unreachable"]

    def close(self) -> None:
        self.link.close()
