"""Redis key names of the fleet, in one place.

Every key of one fleet (the replicas of one model: fingerprint, dtype and block size, the "scope") shares one hash
tag, so on Redis Cluster they sit in one slot and multi-key commands (XREAD over every replica's stream, MGET of the
heartbeats) work. Fleet keys are small; the KV blocks themselves (``pc:kv:...``) carry no tag and spread out.
"""

from __future__ import annotations

import hashlib


def scope(fingerprint: str, dtype: str, block_size: int) -> str:
    """The address space a fleet shares: blocks of one model, dtype and block size."""
    return f"{fingerprint[:32]}:{dtype.removeprefix('torch.')}:bs{block_size}"


def _base(scope: str) -> str:
    return f"pc:fleet:{{{scope}}}"


def events_stream(scope: str, replica: str) -> str:
    """The stream a replica appends its KV events to."""
    return f"{_base(scope)}:ev:{replica}"


def heartbeat(scope: str, replica: str) -> str:
    """A replica's heartbeat: present while it lives (it expires a few intervals after the last beat)."""
    return f"{_base(scope)}:hb:{replica}"


def router_load(scope: str, router: str) -> str:
    """A hash of the load one router has dispatched to each replica (it expires when that router stops)."""
    return f"{_base(scope)}:load:{router}"


def routers(scope: str) -> str:
    """A sorted set of the live routers, scored by their last beat (ms since the epoch)."""
    return f"{_base(scope)}:routers"


def affinity(scope: str, tenant: str, key: str) -> str:
    """Where a tenant's ``prompt_cache_key`` / ``user`` was last routed (soft affinity)."""
    h = hashlib.sha256()
    for part in (tenant, key):
        data = part.encode()
        h.update(len(data).to_bytes(8, "little"))  # length-prefixed: ("a", "bc") and ("ab", "c") differ
        h.update(data)
    return f"{_base(scope)}:aff:{h.hexdigest()}"
