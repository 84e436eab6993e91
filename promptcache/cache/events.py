"""KV events: the addresses a replica's caches start and stop holding, told to whoever listens.

The block pool reports its device blocks and each local tier (host, disk) its entries; the fleet's publisher
(``fleet/events.py``) batches them into the replica's Redis stream, from which routers learn where each prefix is hot.
A shared tier (Redis) reports nothing: every replica reads it alike, so it tells replicas apart in no way.

NOTE: invariants of a sink, which callers rely on:
- it is called after the change it reports, possibly under the reporting cache's own lock, from the engine thread or
  the tier writer thread: it must be quick, must not block and must never call back into a cache;
- it never raises (a listener's trouble must not fail a request).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from promptcache.cache.hashing import BlockHash

DEVICE = "device"


class KVEventSink(Protocol):
    """Receives what a replica's caches now hold, tier by tier ("device", "host", "disk")."""

    def stored(self, tier: str, hashes: Sequence[BlockHash]) -> None:
        """These addresses are now held by ``tier``."""
        ...

    def removed(self, tier: str, hashes: Sequence[BlockHash]) -> None:
        """These addresses are no longer held by ``tier``."""
        ...

    def cleared(self, tier: str) -> None:
        """``tier`` holds nothing any more."""
        ...
