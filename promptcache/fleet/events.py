"""KV events between replicas and routers, through Redis streams.

A replica (``KVEventPublisher``) batches what its device pool and local tiers start and stop holding, and appends
each batch to its own stream as one message numbered ``seq`` (1, 2, 3, ... within an ``epoch``, a random id per
process start). It also beats a heartbeat key. A router (``EventFollower``) reads every replica's stream into a
``ReplicaView`` (address -> the tiers holding it).

A router trusts a view only while it can prove it whole. It starts each view from a snapshot (taken by the replica
between two engine steps, with the ``seq`` it is current to), applies messages numbered after it in order, and
takes a new snapshot when:
- a number is skipped (a message was dropped while Redis was down, or trimmed before the router read it): a gap;
- the epoch changes (the replica restarted: its device pool is new);
- the replica reset its cache.
A replica whose heartbeat has expired is forgotten (its view emptied) until it beats again. A beat also carries the
replica's epoch and last message number, so a gap with no later message to reveal it (the replica went quiet after
Redis came back) is found too.

NOTE: why snapshots are exact. ``snapshot`` first closes the pending batch (``cut``: every event reported so far is
in a message numbered <= the snapshot's seq), then reads what each cache holds. A change reported after the cut gets
a higher number and is applied on top; applying it is idempotent (add / remove an address), so a change that the
snapshot already shows is harmless. Device events come from the engine thread and the snapshot is read on it too.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from promptcache.cache.hashing import BlockHash
from promptcache.fleet import keys
from promptcache.redis_link import RedisLink

log = logging.getLogger("promptcache.fleet")

STORED, REMOVED, CLEARED, RESET = "S", "R", "C", "X"
TIER_BITS = {"device": 1, "host": 2, "disk": 4}
TIER_ORDER = tuple(TIER_BITS)  # best first: a block on the device beats the same block on disk
STREAM_MAX_LEN = 20_000  # messages kept per replica (approximately); a router further behind resyncs
STREAM_TTL_MS = 86_400_000  # a dead replica's stream goes a day after its last message


# ---- the replica's side ------------------------------------------------------------------------------------------
class KVEventPublisher:
    """A ``KVEventSink`` that sends a replica's KV events to its Redis stream, and beats its heartbeat."""

    def __init__(
        self,
        link: RedisLink,
        scope: str,
        name: str,
        flush_interval: float = 0.02,
        heartbeat_interval: float = 1.0,
    ):
        self.link, self.scope, self.name = link, scope, name
        self.epoch = uuid.uuid4().hex[:16]
        self.stream = keys.events_stream(scope, name)
        self.heartbeat_key = keys.heartbeat(scope, name)
        self.flush_interval, self.heartbeat_interval = flush_interval, heartbeat_interval
        self._lock = threading.Lock()
        self._pending: list[list[Any]] = []  # [op, tier, [address hex, ...]] in the order they happened
        self._outbox: deque[tuple[int, list[list[Any]]]] = deque()
        self._seq = 0
        self.sent = 0  # messages appended to the stream
        self.dropped = 0  # messages lost (Redis down): routers see the gap and resync
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pc-kv-events", daemon=True)

    def start(self) -> None:
        self._thread.start()

    # -- the sink (engine thread, tier writer thread) --
    def stored(self, tier: str, hashes: Sequence[BlockHash]) -> None:
        self._add(STORED, tier, hashes)

    def removed(self, tier: str, hashes: Sequence[BlockHash]) -> None:
        self._add(REMOVED, tier, hashes)

    def cleared(self, tier: str) -> None:
        self._add(CLEARED, tier, ())

    def reset(self) -> None:
        """The cache was reset: routers take a new snapshot rather than trust what they hold."""
        self._add(RESET, "", ())

    def _add(self, op: str, tier: str, hashes: Sequence[BlockHash]) -> None:
        with self._lock:
            last = self._pending[-1] if self._pending else None
            if last is not None and last[0] == op and last[1] == tier and op in (STORED, REMOVED):
                last[2].extend(h.hex() for h in hashes)
            else:
                self._pending.append([op, tier, [h.hex() for h in hashes]])

    # -- snapshots --
    def cut(self) -> int:
        """Close the pending batch as the next message; the number of the last message (0: none yet)."""
        with self._lock:
            if self._pending:
                self._seq += 1
                self._outbox.append((self._seq, self._pending))
                self._pending = []
            return self._seq

    def snapshot(self, addresses: Callable[[], dict[str, list[BlockHash]]]) -> dict[str, Any]:
        """What the caches hold now (``addresses()``, read on the engine thread) and the seq it is current to."""
        seq = self.cut()
        held = addresses()
        return {"name": self.name, "epoch": self.epoch, "seq": seq,
                "tiers": {tier: [h.hex() for h in hashes] for tier, hashes in held.items()}}  # fmt: skip

    # -- the sending thread --
    def _run(self) -> None:
        next_beat = 0.0
        while not self._stop.wait(self.flush_interval):
            self.cut()
            self._send()
            if time.monotonic() >= next_beat:
                self._beat()
                next_beat = time.monotonic() + self.heartbeat_interval
        self.cut()
        self._send()

    def _send(self) -> None:
        with self._lock:
            batch = list(self._outbox)
            self._outbox.clear()
        if not batch:
            return
        if not self.link.may_try():
            self.dropped += len(batch)
            return

        def append() -> list[Any]:
            pipe = self.link.client().pipeline(transaction=False)
            for seq, events in batch:
                fields = {"epoch": self.epoch, "seq": seq, "ev": json.dumps(events, separators=(",", ":"))}
                pipe.xadd(self.stream, fields, maxlen=STREAM_MAX_LEN, approximate=True)  # type: ignore[arg-type]
            pipe.pexpire(self.stream, STREAM_TTL_MS)
            return pipe.execute()

        if self.link.attempt(append) is None:
            self.dropped += len(batch)
        else:
            self.sent += len(batch)

    def _beat(self) -> None:
        if not self.link.may_try():
            return
        beat = json.dumps({"epoch": self.epoch, "seq": self._seq, "at": time.time()})
        ttl_ms = int(max(3.0, 3 * self.heartbeat_interval) * 1000)
        self.link.attempt(lambda: self.link.client().set(self.heartbeat_key, beat, px=ttl_ms))

    def close(self) -> None:
        """Send what is pending and stop beating: routers forget this replica at once, not when the beat expires."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        if self.link.may_try():
            self.link.attempt(lambda: self.link.client().delete(self.heartbeat_key))

    def stats(self) -> dict[str, Any]:
        return {"name": self.name, "epoch": self.epoch, "seq": self._seq, "sent": self.sent, "dropped": self.dropped,
                "stream": self.stream}  # fmt: skip


# ---- the router's side -------------------------------------------------------------------------------------------
@dataclass
class ReplicaView:
    """What a router knows one replica holds: address -> tiers (a bitmask of ``TIER_BITS``)."""

    name: str
    stream: str
    heartbeat_key: str
    blocks: dict[BlockHash, int] = field(default_factory=dict)
    epoch: str | None = None
    seq: int = 0
    last_id: bytes | str = "0-0"
    synced: bool = False  # a snapshot was applied and every message since
    alive: bool = True  # its heartbeat is present
    events_applied: int = 0
    resyncs: dict[str, int] = field(default_factory=dict)
    retry_at: float = 0.0  # monotonic time of the next snapshot attempt after a failed one
    failed: int = 0  # snapshot attempts failed in a row (the wait doubles, up to 30 s)
    why: str = "join"  # why the view is not synced (the reason the next snapshot is counted under)

    def apply(self, events: list[list[Any]]) -> bool:
        """Apply one message's events; False when it asks for a resync (a reset)."""
        for op, tier, hexes in events:
            bit = TIER_BITS.get(tier, 0)
            if op == STORED and bit:
                for x in hexes:
                    h = bytes.fromhex(x)
                    self.blocks[h] = self.blocks.get(h, 0) | bit
            elif op == REMOVED and bit:
                for x in hexes:
                    h = bytes.fromhex(x)
                    left = self.blocks.get(h, 0) & ~bit
                    if left:
                        self.blocks[h] = left
                    else:
                        self.blocks.pop(h, None)
            elif op == CLEARED and bit:
                for h in [h for h, bits in self.blocks.items() if bits & bit]:
                    left = self.blocks[h] & ~bit
                    if left:
                        self.blocks[h] = left
                    else:
                        del self.blocks[h]
            elif op == RESET:
                return False
        self.events_applied += 1
        return True

    def load_snapshot(self, snap: dict[str, Any]) -> None:
        blocks: dict[BlockHash, int] = {}
        for tier, hexes in snap.get("tiers", {}).items():
            bit = TIER_BITS.get(tier, 0)
            for x in hexes if bit else ():
                h = bytes.fromhex(x)
                blocks[h] = blocks.get(h, 0) | bit
        self.blocks, self.epoch, self.seq, self.synced = blocks, snap["epoch"], int(snap["seq"]), True

    def forget(self, why: str) -> None:
        self.blocks, self.synced, self.why = {}, False, why

    def tier_of(self, h: BlockHash) -> str | None:
        bits = self.blocks.get(h, 0)
        return next((t for t in TIER_ORDER if bits & TIER_BITS[t]), None)

    def counts(self) -> dict[str, int]:
        out = dict.fromkeys(TIER_ORDER, 0)
        for bits in list(self.blocks.values()):
            for t in TIER_ORDER:
                if bits & TIER_BITS[t]:
                    out[t] += 1
        return out


Snapshotter = Callable[[str], "dict[str, Any] | None"]


class EventFollower:
    """Follows every replica's event stream into its ``ReplicaView`` (a thread).

    ``snapshot(name)`` asks the replica for a snapshot (over HTTP) and returns it, or None when it cannot.
    """

    def __init__(self, link: RedisLink, snapshot: Snapshotter, block_ms: int = 100, heartbeat_check: float = 0.5):
        self.link, self._snapshot = link, snapshot
        self.block_ms, self.heartbeat_check = block_ms, heartbeat_check
        self._views: dict[str, ReplicaView] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pc-kv-follower", daemon=True)
        self._next_check = 0.0

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    # -- replicas --
    def follow(self, name: str, scope: str) -> None:
        """Start following a replica (again: a rejoin takes a fresh snapshot)."""
        view = ReplicaView(name, keys.events_stream(scope, name), keys.heartbeat(scope, name))
        with self._lock:
            self._views[name] = view

    def unfollow(self, name: str) -> None:
        with self._lock:
            self._views.pop(name, None)

    def views(self) -> dict[str, ReplicaView]:
        with self._lock:
            return dict(self._views)

    def tiers_of(self, name: str, hashes: Sequence[BlockHash]) -> list[str | None]:
        """The best tier of ``name`` holding each address (None: not held, or the view is not synced)."""
        with self._lock:
            view = self._views.get(name)
            if view is None or not view.synced:
                return [None] * len(hashes)
            return [view.tier_of(h) for h in hashes]

    # -- the thread --
    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._round()
            except Exception:  # the follower must outlive anything a replica or Redis does
                log.exception("following KV events failed")
                self._stop.wait(0.5)

    def _round(self) -> None:
        if not self.link.may_try():
            self._stop.wait(0.2)
            return
        now = time.monotonic()
        if now >= self._next_check:
            self._check_heartbeats()
            self._next_check = now + self.heartbeat_check
        for view in self.views().values():
            if not view.synced and view.alive and time.monotonic() >= view.retry_at:
                self._resync(view, view.why)
        synced = {v.stream: v for v in self.views().values() if v.synced}
        if not synced:
            self._stop.wait(self.block_ms / 1000)
            return
        streams = {s: v.last_id for s, v in synced.items()}
        replies = self.link.attempt(lambda: self.link.client().xread(streams, count=500, block=self.block_ms))
        for stream, messages in replies or []:
            view = synced[stream.decode() if isinstance(stream, bytes) else stream]
            for msg_id, fields in messages:
                self._handle(view, msg_id, fields)

    def _handle(self, view: ReplicaView, msg_id: bytes, fields: dict[bytes, bytes]) -> None:
        view.last_id = msg_id
        if not view.synced:
            return  # a resync was asked while reading this batch: the snapshot covers it
        epoch, seq = fields[b"epoch"].decode(), int(fields[b"seq"])
        if epoch != view.epoch:
            # NOTE: the stream is read from its tail at the snapshot on, so another epoch here is a newer process.
            self._resync(view, "restart")
            return
        if seq <= view.seq:
            return  # already in the snapshot
        if seq != view.seq + 1:
            self._resync(view, "gap")
            return
        with self._lock:
            ok = view.apply(json.loads(fields[b"ev"]))
            view.seq = seq
        if not ok:
            self._resync(view, "reset")

    def _resync(self, view: ReplicaView, reason: str) -> None:
        """Empty the view and rebuild it from a snapshot, reading the stream from just before it."""
        with self._lock:
            view.forget(reason)
            view.resyncs[reason] = view.resyncs.get(reason, 0) + 1
        tail = self.link.attempt(lambda: self.link.client().xrevrange(view.stream, count=1))
        snap = self._snapshot(view.name) if tail is not None else None
        if tail is None or snap is None:
            view.failed += 1
            view.retry_at = time.monotonic() + min(30.0, 0.5 * 2**view.failed)
            return
        view.failed = 0
        with self._lock:
            view.last_id = tail[0][0] if tail else "0-0"
            view.load_snapshot(snap)
            view.alive = True
        log.info("replica %s: synced from a snapshot (%s) at seq %d", view.name, reason, view.seq)

    def _check_heartbeats(self) -> None:
        views = list(self.views().values())
        if not views:
            return
        beats = self.link.attempt(lambda: self.link.client().mget([v.heartbeat_key for v in views]))
        if beats is None:
            return
        for view, beat in zip(views, beats):
            if beat is None and view.alive:
                log.warning("replica %s: heartbeat lost; forgetting what it holds", view.name)
                with self._lock:
                    view.alive = False
                    view.forget("heartbeat")
            elif beat is not None and not view.alive:
                with self._lock:
                    view.alive = True  # back: the next round takes a snapshot
            elif beat is not None and view.synced:
                self._check_beat(view, beat)

    def _check_beat(self, view: ReplicaView, raw: bytes) -> None:
        """A beat names the replica's epoch and last message number. A newer epoch is a restart. A higher number
        with nothing newer in the stream means messages were lost (Redis was down when they were sent) and no later
        one has come to show the gap: without this check the view would stay stale until the replica's next event.
        """
        try:
            beat = json.loads(raw)
            epoch, seq = beat["epoch"], int(beat["seq"])
        except (ValueError, KeyError, TypeError):
            return
        if epoch != view.epoch:
            self._resync(view, "restart")
            return
        if seq <= view.seq:
            return
        last = view.last_id.decode() if isinstance(view.last_id, bytes) else view.last_id
        newer = self.link.attempt(lambda: self.link.client().xrange(view.stream, min=f"({last}", count=1))
        if newer == []:  # (None: Redis failed; ask again next time)
            self._resync(view, "gap")
