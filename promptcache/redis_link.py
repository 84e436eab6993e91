"""One link to a Redis, or a Redis / Valkey cluster, that fails fast and backs off while the server is down.

Shared by everything that keeps state in Redis (the KV tier, the replay records, the fleet router). A caller that
finds Redis down must carry on without it: every call here is bounded by ``timeout``, and while the link is down
(after a connection error or a timeout) it does not touch the network at all until its retry time, which backs off
exponentially (0.5 s doubling to 30 s). The first call past the retry time probes with a PING.

URLs: ``redis://``, ``rediss://`` and ``unix://`` give a ``redis.Redis``; ``redis+cluster://seed:port`` (any scheme
with ``+cluster``) gives a ``RedisCluster`` seeded from that node.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.exceptions import ClusterError, RedisClusterException, RedisError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

# Errors meaning Redis (or enough of the cluster) cannot be reached: the link goes down until its retry time.
DOWN_ERRORS: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    ClusterError,
    RedisClusterException,
    OSError,
)
_BACKOFF_FIRST_S, _BACKOFF_MAX_S = 0.5, 30.0
T = TypeVar("T")


class RedisLink:
    """A lazily made Redis client plus the up / down state of the server behind it; thread-safe.

    ``on_error`` is called (outside the link's lock) with ``"timeout"`` or ``"unavailable"`` when the link goes
    down, and with ``"io"`` when Redis refused a command but stays reachable, so an owner can count its errors.
    """

    def __init__(self, url: str, timeout: float = 0.5, on_error: Callable[[str], None] | None = None):
        self.url, self.timeout = url, timeout
        scheme, _, rest = url.partition("://")
        self.cluster: bool = scheme.endswith("+cluster")
        self._plain_url = f"{scheme.removesuffix('+cluster')}://{rest}"
        self._on_error = on_error
        self._lock = threading.Lock()  # guards the client and the down state
        self._client: redis.Redis | RedisCluster | None = None
        self._retry_at = 0.0  # monotonic time of the next attempt while down; 0.0 while up
        self._backoff = 0.0

    def client(self) -> redis.Redis | RedisCluster:
        """The client, made on first use. Raises what connecting raises (a cluster reads its slot map here)."""
        with self._lock:
            if self._client is None:
                # No redis-py retries (its default sleeps up to 1 s between ten of them): a late or failed command is
                # a miss now, and the link's own backoff decides when Redis is tried again.
                opts: dict[str, Any] = dict(
                    socket_timeout=self.timeout, socket_connect_timeout=self.timeout, retry=Retry(NoBackoff(), 0)
                )
                # RedisCluster reads the slot map as it is made, so it is made here on first use, not in __init__.
                cls = RedisCluster if self.cluster else redis.Redis
                self._client = cls.from_url(self._plain_url, **opts)
            return self._client

    @property
    def available(self) -> bool:
        """False while down (between a failure and the next successful probe)."""
        return self._retry_at == 0.0

    def may_try(self) -> bool:
        """Whether to use the network now: yes while up; while down, only past the retry time, after a PING."""
        with self._lock:
            if self._retry_at == 0.0:
                return True
            if time.monotonic() < self._retry_at:
                return False
            self._retry_at = time.monotonic() + self._backoff  # other threads keep skipping while this one probes
        try:
            self.client().ping()  # redis-py reconnects a pooled connection whose server went away (a restart)
        except (*DOWN_ERRORS, RedisError) as err:
            self.down(err)
            return False
        with self._lock:
            self._retry_at, self._backoff = 0.0, 0.0
        return True

    def down(self, err: BaseException) -> None:
        """Mark the link down after ``err``: the next try waits out a backoff twice the last one (0.5 s to 30 s)."""
        with self._lock:
            self._backoff = min(self._backoff * 2, _BACKOFF_MAX_S) if self._backoff else _BACKOFF_FIRST_S
            self._retry_at = time.monotonic() + self._backoff
            # A cluster client is rebuilt from its seed when next needed: the nodes may have moved meanwhile.
            if self.cluster and self._client is not None:
                self._client.close()
                self._client = None
        self._report("timeout" if isinstance(err, (RedisTimeoutError, TimeoutError)) else "unavailable")

    def attempt(self, op: Callable[[], T]) -> T | None:
        """``op()``, or None when Redis failed (an unreachable Redis marks the link down); never raises a Redis
        or socket error."""
        try:
            return op()
        except DOWN_ERRORS as err:
            self.down(err)
        except RedisError:  # refused, not unreachable (e.g. a read-only replica): this call fails, the link stays up
            self._report("io")
        return None

    def pipelined(self, command: Callable[[Any, str], object], keys: Sequence[str]) -> list[Any]:
        """``command(pipe, key)`` for every key, in one round trip; the replies in key order. A refused command
        answers its own exception in the list. Raises when a node could not be reached (use it inside
        ``attempt``). On a cluster, redis-py's pipeline groups the commands per node and writes every node's batch
        before reading any reply: still one round trip, spread over the nodes."""
        pipe = self.client().pipeline(transaction=False)
        for key in keys:
            command(pipe, key)
        results = pipe.execute(raise_on_error=False)
        unreachable = next((r for r in results if isinstance(r, DOWN_ERRORS)), None)
        if unreachable is not None:
            raise unreachable  # an unreachable node answered for its commands: Redis is down, not one command refused
        return results

    def nodes(self) -> list[redis.Redis]:
        """A client per primary (SCAN walks one node's keys only); the one client when not a cluster."""
        client = self.client()
        if isinstance(client, RedisCluster):
            return [client.get_redis_connection(node) for node in client.get_primaries()]
        return [client]

    def close(self) -> None:
        """Close the client's connections; a later call makes a new client."""
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    def _report(self, kind: str) -> None:
        if self._on_error is not None:
            self._on_error(kind)
