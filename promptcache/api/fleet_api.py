"""A replica's side of the fleet: KV events to Redis, the endpoints a router reads, and the headers it relies on.

- With a Redis tier, the server publishes what its device pool and local tiers hold (``fleet/events.py``) under its
  replica name, and beats a heartbeat.
- ``GET /v1/fleet/info``, ``/v1/fleet/tokenizer`` and ``/v1/fleet/snapshot`` (admin): the model identity a router
  checks, the exact tokenizer it rebuilds, and a snapshot of what the caches hold with the event number it is
  current to.
- Every response carries ``x-promptcache-replica`` and, once a prompt was prefilled, ``x-promptcache-cached-tokens``
  (known before a stream's first byte, so a router can compare it with its prediction without reading bodies).
"""

from __future__ import annotations

import os
import socket
import uuid
from typing import Any

from fastapi import APIRouter, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from promptcache.api.errors import APIError
from promptcache.api.schemas import route_doc
from promptcache.api.service import RESPONSE_META, Service
from promptcache.fleet import keys
from promptcache.fleet.events import KVEventPublisher
from promptcache.redis_link import RedisLink

REPLICA_HEADER = b"x-promptcache-replica"
CACHED_HEADER = b"x-promptcache-cached-tokens"


def default_name(port: int | None = None) -> str:
    """``host:port`` when the port is known (the CLI), else ``host-pid-random`` (several servers may share a
    process): unique among the replicas of a fleet."""
    if port:
        return f"{socket.gethostname()}:{port}"
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


class ReplicaHeaders:
    """ASGI middleware: a fresh ``RESPONSE_META`` per request, turned into response headers when they are sent."""

    def __init__(self, app: ASGIApp, name: str):
        self.app, self.name = app, name.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        meta: dict[str, Any] = {}
        token = RESPONSE_META.set(meta)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [*message.get("headers", []), (REPLICA_HEADER, self.name)]
                if "cached_tokens" in meta:
                    headers.append((CACHED_HEADER, str(meta["cached_tokens"]).encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        finally:
            RESPONSE_META.reset(token)


class Replica:
    """This server as a member of a fleet: its name, and its KV event publisher (None without Redis)."""

    def __init__(self, service: Service, name: str, kv_events: bool = True):
        self.service, self.name = service, name
        core = service.engine.engine
        self.scope = keys.scope(core.fingerprint, str(core.dtype), core.kv.block_size)
        redis_url = core.config.redis_url
        self.publisher: KVEventPublisher | None = None
        if redis_url and kv_events:
            self.publisher = KVEventPublisher(RedisLink(redis_url), self.scope, name)
            core.attach_kv_events(self.publisher)  # before the engine thread starts: no event is missed

    @property
    def epoch(self) -> str | None:
        return self.publisher.epoch if self.publisher is not None else None

    def start(self) -> None:
        if self.publisher is not None:
            self.publisher.start()

    def close(self) -> None:
        if self.publisher is not None:
            self.publisher.close()

    def info(self) -> dict[str, Any]:
        core = self.service.engine.engine
        redis_tier = next((t for t in core.tiers.tiers if t.name == "redis"), None) if core.tiers else None
        return {
            "name": self.name, "epoch": self.epoch, "model": self.service.model_name,
            "fingerprint": core.fingerprint, "dtype": str(core.dtype), "block_size": core.kv.block_size,
            "max_model_len": core.max_model_len, "tokenizer_digest": self.service.tokenizer.digest(),
            "scope": self.scope, "kv_prefix": getattr(redis_tier, "prefix", None),
            "kv_events": None if self.publisher is None else self.publisher.stats(),
            "execution": core.execution_info(),
        }  # fmt: skip


def build_router(service: Service, authenticate: Any, replica: Replica) -> APIRouter:
    router = APIRouter()

    def admin(request: Request) -> None:
        if not authenticate(request).admin:
            raise APIError(403, "the fleet endpoints need an admin API key")

    @router.get("/v1/fleet/info", **route_doc("GET", "/v1/fleet/info"))
    async def info(request: Request) -> dict[str, Any]:
        admin(request)
        return replica.info()

    @router.get("/v1/fleet/tokenizer", **route_doc("GET", "/v1/fleet/tokenizer"))
    async def tokenizer(request: Request) -> dict[str, Any]:
        admin(request)
        return service.tokenizer.to_dict()

    @router.get("/v1/fleet/snapshot", **route_doc("GET", "/v1/fleet/snapshot"))
    async def snapshot(request: Request) -> dict[str, Any]:
        admin(request)
        publisher = replica.publisher
        if publisher is None:
            raise APIError(404, "this replica publishes no KV events (it has no --redis-url, or --no-kv-events)")
        # On the engine thread: the device pool is read between two steps, consistent with its event numbers.
        seq, held = await service.engine.call_async(lambda e: (publisher.cut(), e.kv_addresses()))
        return {"name": replica.name, "epoch": publisher.epoch, "seq": seq,
                "tiers": {tier: [h.hex() for h in hashes] for tier, hashes in held.items()}}  # fmt: skip

    return router
