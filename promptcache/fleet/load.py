"""Load per replica, counted by the routers at dispatch and released at the end, an error or a cancel.

Each router counts its own dispatches exactly (``Ticket``), and publishes its counts in a Redis hash that expires a
few seconds after its last beat; it reads every other live router's hash. So routers agree on the load, and a
router that dies takes its counts with it instead of leaving them behind forever (the drift that sent every
request to one replica in other routers).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

from promptcache.fleet import keys
from promptcache.fleet.policy import Load
from promptcache.redis_link import RedisLink

log = logging.getLogger("promptcache.fleet")
ROUTER_TTL_MS = 3000  # a router's counts vanish this long after its last beat


@dataclass
class Ticket:
    """One dispatched request's share of a replica's load; released at most once."""

    replica: str
    prefill_tokens: int
    prefilled: bool = False
    finished: bool = False


class LoadBook:
    """Every replica's load: this router's own counts plus those other live routers published."""

    def __init__(self, link: RedisLink | None, scope: str, router_id: str, sync_interval: float = 0.25):
        self.link, self.scope, self.router_id, self.sync_interval = link, scope, router_id, sync_interval
        self._own: dict[str, Load] = {}
        self._others: dict[str, Load] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="pc-router-load", daemon=True)

    def start(self) -> None:
        if self.link is not None:
            self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        if self.link is not None and self.link.may_try():  # leave at once rather than when the hash expires
            self.link.attempt(lambda: self.link.client().delete(keys.router_load(self.scope, self.router_id)))  # type: ignore[union-attr]

    # -- counting --
    def dispatch(self, replica: str, prefill_tokens: int) -> Ticket:
        with self._lock:
            own = self._own.setdefault(replica, Load())
            own.prefill_tokens += prefill_tokens
            own.decodes += 1
            own.requests += 1
        return Ticket(replica, prefill_tokens)

    def prefilled(self, ticket: Ticket) -> None:
        """The replica answered its first bytes: the prompt is computed, only the decode remains."""
        with self._lock:
            if not ticket.prefilled and not ticket.finished:
                ticket.prefilled = True
                self._own[ticket.replica].prefill_tokens -= ticket.prefill_tokens

    def finish(self, ticket: Ticket) -> None:
        """The request ended (done, failed or cancelled)."""
        with self._lock:
            if ticket.finished:
                return
            own = self._own[ticket.replica]
            if not ticket.prefilled:
                own.prefill_tokens -= ticket.prefill_tokens
            own.decodes -= 1
            ticket.finished = True

    def own(self, replica: str) -> Load:
        with self._lock:
            o = self._own.get(replica, Load())
            return Load(o.prefill_tokens, o.decodes, o.requests)

    def of(self, replica: str) -> Load:
        """What every live router has dispatched to ``replica`` and is still running."""
        with self._lock:
            return self._own.get(replica, Load()) + self._others.get(replica, Load())

    def snapshot(self) -> dict[str, dict[str, int]]:
        with self._lock:
            names = set(self._own) | set(self._others)
            return {n: vars(self._own.get(n, Load()) + self._others.get(n, Load())) for n in sorted(names)}

    # -- sharing through Redis --
    def _run(self) -> None:
        while not self._stop.wait(self.sync_interval):
            try:
                self.sync()
            except Exception:  # the load loop must outlive Redis trouble: counts go stale, never wrong locally
                log.exception("sharing the router load failed")

    def sync(self) -> None:
        """Publish this router's counts, and read the other live routers'."""
        assert self.link is not None
        link = self.link
        if not link.may_try():
            return
        with self._lock:
            mine = {n: f"{o.prefill_tokens},{o.decodes},{o.requests}" for n, o in self._own.items()}
        now_ms = int(time.time() * 1000)
        own_key, routers = keys.router_load(self.scope, self.router_id), keys.routers(self.scope)

        def publish() -> list[bytes]:
            pipe = link.client().pipeline(transaction=False)
            if mine:
                pipe.hset(own_key, mapping=mine)
                pipe.pexpire(own_key, ROUTER_TTL_MS)
            pipe.zadd(routers, {self.router_id: now_ms})
            pipe.zremrangebyscore(routers, "-inf", now_ms - ROUTER_TTL_MS)
            pipe.zrange(routers, 0, -1)
            return pipe.execute()[-1]

        live = link.attempt(publish)
        if live is None:
            return
        others = [r.decode() for r in live if r.decode() != self.router_id]

        def read() -> list[dict[bytes, bytes]]:
            pipe = link.client().pipeline(transaction=False)
            for r in others:
                pipe.hgetall(keys.router_load(self.scope, r))
            return pipe.execute()

        tables = link.attempt(read) if others else []
        if tables is None:
            return
        total: dict[str, Load] = {}
        for table in tables:
            for name, value in table.items():
                try:
                    p, d, r = (int(x) for x in value.decode().split(","))
                except ValueError:
                    continue
                total[name.decode()] = total.get(name.decode(), Load()) + Load(p, d, r)
        with self._lock:
            self._others = total
