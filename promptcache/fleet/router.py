"""``promptcache router``: one OpenAI- and Anthropic-compatible endpoint in front of N ``promptcache serve`` replicas.

For each request the router renders and tokenizes the prompt exactly as a replica would (the replicas' own tokenizer
and chat template, token-exact replay from the shared Redis records, the tenant's namespace from its API key and
``cache_salt``), computes the block addresses, and asks what each replica holds (its KV events) and what Redis
holds. Then ``policy.py`` orders the replicas by cost and the request goes to the first that answers; one that
cannot be reached, or answers busy, before the response starts is skipped for the next. Responses pass through
unchanged, with headers naming the replica and the router's predicted cached tokens beside the replica's reported
ones (``x-promptcache-replica``, ``x-promptcache-predicted-cached-tokens``, ``x-promptcache-cached-tokens``).

State that must agree between router processes lives in Redis: the replicas' events, the load each router has
dispatched (``load.py``), soft affinities, the replay records and the Responses API's stored responses.

The Responses API (``/v1/responses``) is stateful: a turn continues from ``previous_response_id``, a record the
replica that produced it stored (in its memory, and in Redis when it has one). The router reads the same record from
Redis to compute the next turn's prompt, and remembers which replica produced each response id: lookups of a stored
response, and a turn whose record it cannot read, go to that replica first.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ValidationError
from starlette.types import Receive, Scope, Send

from promptcache import __version__
from promptcache.api import schemas
from promptcache.api.errors import APIError, ErrorBoundary, error_body, is_anthropic
from promptcache.api.limits import DEFAULT_BODY_TIMEOUT, DEFAULT_MAX_BODY_MB, BodyLimit
from promptcache.api.prompts import AnthropicPromptBody, looks_anthropic
from promptcache.api.response_store import RedisResponseStore, StoredResponse
from promptcache.api.responses_prompt import response_prompt
from promptcache.api.tenancy import Tenancy, Tenant
from promptcache.cache.hashing import BlockHash
from promptcache.fleet import keys
from promptcache.fleet.events import EventFollower
from promptcache.fleet.load import LoadBook, Ticket
from promptcache.fleet.policy import Candidate, Load, Policy, make_policy, measured_weights
from promptcache.fleet.replicas import FleetModel, Replica, ReplicaSet
from promptcache.redis_link import RedisLink
from promptcache.replay import make_replay_store

log = logging.getLogger("promptcache.router")

REPLICA_HEADER = "x-promptcache-replica"
PREDICTED_HEADER = "x-promptcache-predicted-cached-tokens"
REPORTED_HEADER = "x-promptcache-cached-tokens"  # set by the replica
RETRY_STATUSES = frozenset({429, 502, 503, 504})  # busy or going away: another replica may serve it
# Request headers a replica needs (auth, content type, the Anthropic version); hop-by-hop ones are not forwarded.
FORWARDED = ("authorization", "x-api-key", "content-type", "accept", "anthropic-version", "anthropic-beta",
             "openai-organization", "openai-project", "user-agent")  # fmt: skip
PASSED_BACK = ("content-type", "retry-after", "cache-control", REPORTED_HEADER)
RESPONSES = "/v1/responses"
ROUTED = ("/v1/chat/completions", "/v1/completions", "/v1/messages", RESPONSES)
# A stored response: GET and DELETE /v1/responses/{id}, GET /v1/responses/{id}/input_items.
STORED_PATHS = (RESPONSES + "/{response_id}", RESPONSES + "/{response_id}/input_items")
SCAN_LIMIT = 1 << 20  # bytes of a streamed response searched for its id (it is in the first event)
TOKEN_BUCKETS = (0, 16, 64, 256, 1024, 4096, 16384)


@dataclass
class RouterConfig:
    replicas: list[str]
    redis_url: str
    policy: str = "cache"
    tenancy: Tenancy = field(default_factory=Tenancy)
    admin_key: str | None = None  # for the replicas' fleet endpoints (default: the first admin key of tenancy)
    router_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    decode_weight: float = 16.0
    affinity_tokens: float = 256.0
    tier_weights: dict[str, float] | None = None
    affinity_ttl: float = 3600.0
    pending_ttl: float = 30.0  # a dispatched prompt counts as held by its replica until its events say so
    health_interval: float = 1.0
    health_timeout: float = 2.0
    connect_timeout: float = 2.0
    read_timeout: float = 600.0
    max_body_mb: float = DEFAULT_MAX_BODY_MB  # larger request bodies get a 413 at the router
    body_timeout: float = DEFAULT_BODY_TIMEOUT  # seconds a client gets to send its whole body (then 408)
    response_owners: int = 65536  # response ids whose producing replica the router remembers (LRU)
    # Stored responses the router keeps from its Redis reads, per tenant: used only while Redis is down.
    response_records: int = 64


@dataclass
class Decision:
    """Where a request goes: the replicas in order, and what the router predicts for each."""

    order: list[Candidate]
    prompt_tokens: int = 0
    hashes: list[BlockHash] = field(default_factory=list)
    affinity_key: str | None = None
    forced: bool = False
    ticket: Ticket | None = None  # the load reserved on ``order[0]`` when the decision was made

    def describe(self) -> list[dict[str, Any]]:
        return [{"replica": c.name, "cost": round(c.cost, 1), "predicted_cached_tokens": c.cached_tokens,
                 "predicted_cached_tokens_by_tier": c.cached_by_tier, "load": vars(c.load)}
                for c in self.order]  # fmt: skip


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("promptcache_router_requests", "Requests by replica and outcome",
                                ["replica", "outcome"], registry=r)  # fmt: skip
        self.predicted = Counter("promptcache_router_predicted_cached_tokens", "Cached tokens the router predicted",
                                 ["replica"], registry=r)  # fmt: skip
        self.reported = Counter("promptcache_router_reported_cached_tokens", "Cached tokens the replicas reported",
                                ["replica"], registry=r)  # fmt: skip
        self.error = Histogram("promptcache_router_prediction_error_tokens", "|predicted - reported| cached tokens",
                               buckets=TOKEN_BUCKETS, registry=r)  # fmt: skip
        self.retries = Counter("promptcache_router_retries", "Requests sent to another replica, by reason",
                               ["reason"], registry=r)  # fmt: skip
        self.decision_seconds = Histogram("promptcache_router_decision_seconds", "Time to decide a request's replica",
                                          registry=r)  # fmt: skip
        self.up = Gauge("promptcache_router_replica_up", "1 while in the rotation", ["replica"], registry=r)
        self.load = Gauge("promptcache_router_load", "Load per replica (all routers)", ["replica", "kind"], registry=r)
        self.index = Gauge("promptcache_router_index_blocks", "Blocks a replica holds, as the router knows",
                           ["replica", "tier"], registry=r)  # fmt: skip
        self.resyncs = Gauge("promptcache_router_resyncs", "Snapshots taken per replica, by reason",
                             ["replica", "reason"], registry=r)  # fmt: skip


class _Relay(StreamingResponse):
    """A streamed answer whose ``on_close`` runs however the stream ends: finished, failed or the client gone."""

    def __init__(self, content: AsyncIterator[bytes], status_code: int, headers: dict[str, str],
                 on_close: Callable[[], Awaitable[None]]):  # fmt: skip
        super().__init__(content, status_code=status_code, headers=headers)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._on_close()


def error_event(path: str, message: str) -> bytes:
    """A failed stream's last event, in the format of the API being streamed."""
    if is_anthropic(path):
        body = {"type": "error", "error": {"type": "api_error", "message": message}}
        return f"event: error\ndata: {json.dumps(body)}\n\n".encode()
    body = {"error": {"message": message, "type": "server_error", "param": None, "code": "replica_failed"}}
    return f"data: {json.dumps(body)}\n\n".encode()


class ResponseOwners:
    """Which replica produced each response id, for the ``capacity`` most recently used ids: where its record surely
    is, even with no shared Redis. Thread-safe (decisions read it on worker threads).

    NOTE: not per tenant: ids are random, and the replica checks the tenant of every record it serves."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self._owners: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, response_id: Any) -> str | None:
        """The replica that produced ``response_id`` (None: unknown, or not an id)."""
        if not isinstance(response_id, str):
            return None
        with self._lock:
            owner = self._owners.get(response_id)
            if owner is not None:
                self._owners.move_to_end(response_id)
            return owner

    def set(self, response_id: str, replica: str) -> None:
        """``replica`` produced (or holds) ``response_id``; the least recently used id beyond the bound is dropped."""
        with self._lock:
            self._owners[response_id] = replica
            self._owners.move_to_end(response_id)
            while len(self._owners) > self.capacity:
                self._owners.popitem(last=False)

    def forget(self, response_id: str) -> None:
        """``response_id`` was deleted."""
        with self._lock:
            self._owners.pop(response_id, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._owners)


_EVENT_END = re.compile(rb"\r?\n\r?\n")


class _IdScanner:
    """Finds a streamed response's id as its bytes pass by: the first event (``response.created``) carries
    ``response.id``. Gives up after ``SCAN_LIMIT`` bytes, so a stream without one costs no more than that."""

    def __init__(self, found: Callable[[str], None]) -> None:
        self._found = found
        self._buf = b""
        self._seen = 0
        self.done = False

    def feed(self, chunk: bytes) -> None:
        if self.done:
            return
        self._seen += len(chunk)
        self._buf += chunk
        # NOTE: the transport's chunks need not align with events: only a complete event (ended by a blank line) is
        # parsed, and the rest waits for the next chunk.
        while (end := _EVENT_END.search(self._buf)) is not None:
            event, self._buf = self._buf[: end.start()], self._buf[end.end() :]
            response_id = _event_response_id(event)
            if response_id is not None:
                self.done, self._buf = True, b""
                self._found(response_id)
                return
        if self._seen > SCAN_LIMIT:
            self.done, self._buf = True, b""


def _event_response_id(event: bytes) -> str | None:
    """``response.id`` in one SSE event's JSON data, or None."""
    data = b"\n".join(line[5:].strip() for line in event.splitlines() if line.startswith(b"data:"))
    response = _json_object(data).get("response")
    rid = response.get("id") if isinstance(response, dict) else None
    return rid if isinstance(rid, str) and rid else None


class Router:
    """The router's state: replicas, what they hold, their load, the policy; ``decide`` then ``forward`` serve one
    request."""

    def __init__(self, cfg: RouterConfig):
        if not cfg.replicas:
            raise ValueError("the router needs at least one --replica URL")
        self.cfg = cfg
        self.link = RedisLink(cfg.redis_url, timeout=0.5)
        admin = cfg.admin_key or next((k for k, t in cfg.tenancy.keys.items() if t.admin), None)
        if not cfg.tenancy.open and admin is None:
            raise ValueError("the router needs an admin key (--admin-key, or an admin in --api-keys-file) to read "
                             "the replicas' fleet endpoints")  # fmt: skip
        self.admin_headers = {"authorization": f"Bearer {admin}"} if admin else {}
        check_tenant = cfg.tenancy.resolve(self.admin_headers) if admin else Tenant("local", admin=True)
        self.replicas = ReplicaSet(cfg.replicas, self.admin_headers, check_tenant,
                                   lambda fp: make_replay_store(cfg.redis_url, fp), cfg.health_interval,
                                   cfg.health_timeout)  # fmt: skip
        self.replicas.on_join = self._joined
        self.follower = EventFollower(self.link, self.replicas.snapshot)
        self.loads: LoadBook | None = None
        self.policy: Policy = make_policy(cfg.policy, cfg.decode_weight, cfg.tier_weights, cfg.affinity_tokens)
        self.pending: dict[str, OrderedDict[BlockHash, float]] = {}
        self.owners = ResponseOwners(cfg.response_owners)
        # The replicas' stored responses, read to compute the prompt of a turn that continues one (made when the
        # fleet's model is known: its fingerprint scopes the records).
        self.responses: RedisResponseStore | None = None
        # NOTE: reading the loads, ranking and reserving the winner's load happen under one lock: decisions run on
        # worker threads, and two that overlapped would otherwise both see an idle replica and herd onto it.
        self._deciding = threading.Lock()
        self.metrics = RouterMetrics()
        timeout = httpx.Timeout(cfg.read_timeout, connect=cfg.connect_timeout)
        self.client = httpx.AsyncClient(timeout=timeout, limits=httpx.Limits(max_connections=1024,
                                                                            max_keepalive_connections=64))  # fmt: skip

    @property
    def model(self) -> FleetModel | None:
        return self.replicas.model

    async def start(self) -> None:
        self.follower.start()
        await self.replicas.start()

    async def close(self) -> None:
        await self.replicas.close()
        self.follower.close()
        if self.loads is not None:
            self.loads.close()
        if self.responses is not None:
            self.responses.close()
        await self.client.aclose()
        self.link.close()

    def _joined(self, replica: Replica) -> None:
        assert self.model is not None and replica.name is not None
        if self.loads is None:
            self.loads = LoadBook(self.link, self.model.scope, self.cfg.router_id)
            self.loads.start()
        if self.responses is None and self.cfg.redis_url:
            # The replicas scope their stored responses by the model's fingerprint, as their replay records.
            self.responses = RedisResponseStore(self.cfg.redis_url, self.model.fingerprint,
                                                max_per_tenant=self.cfg.response_records)  # fmt: skip
        self.follower.follow(replica.name, self.model.scope)
        self.pending.setdefault(replica.name, OrderedDict())

    # ---- the decision ----------------------------------------------------------------------------------------
    def prompt_of(self, tenant: Tenant, path: str, body: dict[str, Any]) -> tuple[list[int], str | None] | None:
        """The prompt ids a replica will run for this body, and its cache salt (None: the replica will refuse it,
        or nothing to route on)."""
        model = self.model
        if model is None:
            return None
        r = model.renderer
        try:
            if path == "/v1/chat/completions":
                return r.openai_chat_ids(tenant.name, body), body.get("cache_salt")
            if path == "/v1/completions":
                return r.completion_prompts(body["prompt"])[0], body.get("cache_salt")
            if path == "/v1/messages":
                return r.anthropic(tenant.name, AnthropicPromptBody.model_validate(body)).ids, body.get("cache_salt")
            if path == RESPONSES:
                previous = None
                if body.get("previous_response_id") is not None:
                    previous = self.previous_response(tenant, body["previous_response_id"])
                    if previous is None:  # unreadable here: the replica that produced it is asked first (``decide``)
                        return None
                return response_prompt(r, tenant.name, body, previous).ids, body.get("cache_salt")
            if path == "/v1/cache/explain":
                api = body.get("api") or ("anthropic" if "system" in body or looks_anthropic(body) else "openai")
                return r.explain_ids(api, tenant.name, body)
        except Exception:  # bad input: the replica answers it with the right error; route it by load alone
            return None
        return None

    def previous_response(self, tenant: Tenant, response_id: Any) -> StoredResponse | None:
        """The tenant's stored response ``response_id`` from the shared Redis (None: no Redis, Redis down and not
        read before, unknown, or another tenant's); blocking."""
        if self.responses is None or not isinstance(response_id, str):
            return None
        return self.responses.get(tenant.name, response_id)

    def decide(
        self,
        tenant: Tenant,
        path: str,
        body: dict[str, Any],
        forced: str | None = None,
        runs: bool = False,
        prefer: str | None = None,
    ) -> Decision:
        """Order the replicas for a request (blocking: Redis round trips; run it off the event loop). ``runs``: it
        will run there, so the winner's load is reserved and its prompt's blocks are expected there at once.
        ``prefer``: the replica holding the state the request reads (the producer of a stored response): first when
        there is no prompt to route on, else the affinity replica."""
        start = time.perf_counter()
        up = [r for r in self.replicas.up() if r.name is not None]
        if forced is not None:
            up = [r for r in up if forced in (r.name, r.url)]
            if not up:
                raise APIError(503, f"the replica {forced!r} is not in the rotation")
        prompt = self.prompt_of(tenant, path, body) if self.model is not None else None
        hashes: list[BlockHash] = []
        n_prompt = 0
        if prompt is not None:
            assert self.model is not None
            ids, salt = prompt
            try:
                hashes = self.model.addresses(tenant.namespace(salt), ids)
                n_prompt = len(ids)
            except (TypeError, ValueError, OverflowError):  # ids or a salt the replica will refuse: route by load
                hashes = []
        in_redis = self._in_redis(hashes)
        aff_key = self._affinity_key(body)
        aff_replica = prefer or (self._affinity(tenant, aff_key) if aff_key else None)
        block_size = self.model.block_size if self.model else 16
        with self._deciding:
            now = time.monotonic()
            candidates = []
            for r in up:
                assert r.name is not None
                held = self.follower.tiers_of(r.name, hashes)
                pending = self.pending.get(r.name, {})
                tiers = [t if t is not None else ("pending" if pending.get(h, 0) > now else ("redis" if red else None))
                         for h, t, red in zip(hashes, held, in_redis)]  # fmt: skip
                load = self.loads.of(r.name) if self.loads is not None else Load()
                candidates.append(Candidate(r.name, tiers, load, affinity=r.name == aff_replica,
                                            weights=measured_weights(r.rates, block_size)))  # fmt: skip
            order = self.policy.rank(candidates, n_prompt, block_size)
            if prompt is None and prefer is not None:
                # NOTE: nothing to weigh, and the request reads state that surely lives on ``prefer`` (without a
                # shared Redis, only there): it goes first, the rest in load order in case it is down.
                order.sort(key=lambda c: c.name != prefer)
            ticket = None
            if runs and order:
                ticket = self._dispatch(order[0], n_prompt)
                self._expect(order[0].name, hashes)
        self.metrics.decision_seconds.observe(time.perf_counter() - start)
        return Decision(order, n_prompt, hashes, aff_key, forced is not None, ticket)

    def _dispatch(self, cand: Candidate, prompt_tokens: int) -> Ticket | None:
        if self.loads is None:
            return None
        return self.loads.dispatch(cand.name, max(prompt_tokens - cand.cached_tokens, 0))

    def _expect(self, replica: str, hashes: list[BlockHash]) -> None:
        """The prompt's blocks will be on ``replica`` in a moment (until its events say what it really holds)."""
        if not hashes:
            return
        pending = self.pending.setdefault(replica, OrderedDict())
        now = time.monotonic()
        until = now + self.cfg.pending_ttl
        for h in hashes:
            pending[h] = until
            pending.move_to_end(h)
        # NOTE: a mark lasts pending_ttl and moves its entry to the end, so the map is in expiry order: expired marks
        # are dropped from the front (it holds the last pending_ttl seconds' marks, not up to 65,536 stale ones).
        while pending and (len(pending) > 65536 or next(iter(pending.values())) <= now):
            pending.popitem(last=False)

    def _in_redis(self, hashes: list[BlockHash]) -> list[bool]:
        model = self.model
        if not hashes or model is None or model.kv_prefix is None or not self.link.may_try():
            return [False] * len(hashes)
        prefix = model.kv_prefix
        found = self.link.attempt(lambda: self.link.pipelined(lambda p, k: p.exists(k), [prefix + h.hex()
                                                                                      for h in hashes]))  # fmt: skip
        return [r == 1 for r in found] if found is not None else [False] * len(hashes)

    @staticmethod
    def _affinity_key(body: dict[str, Any]) -> str | None:
        meta = body.get("metadata")
        key = body.get("prompt_cache_key") or body.get("user") or (meta.get("user_id") if isinstance(meta, dict)
                                                                   else None)  # fmt: skip
        return key if isinstance(key, str) and key else None

    def _affinity(self, tenant: Tenant, key: str) -> str | None:
        if self.model is None or not self.link.may_try():
            return None
        raw = self.link.attempt(lambda: self.link.client().get(keys.affinity(self.model.scope, tenant.name, key)))  # type: ignore[union-attr]
        return raw.decode() if isinstance(raw, bytes) else None

    def _remember(self, tenant: Tenant, decision: Decision, replica: str) -> None:
        """After a replica took the request: its blocks are expected there, and the affinity key points there."""
        if replica != decision.order[0].name:  # a fallback: the winner's expectation was marked at the decision
            self._expect(replica, decision.hashes)
        if decision.affinity_key and self.model is not None and self.link.may_try():
            key = keys.affinity(self.model.scope, tenant.name, decision.affinity_key)
            ttl_ms = int(self.cfg.affinity_ttl * 1000)
            self.link.attempt(lambda: self.link.client().set(key, replica, px=ttl_ms))

    # ---- forwarding ------------------------------------------------------------------------------------------
    async def forward(
        self,
        request: Request,
        path: str,
        body: bytes,
        tenant: Tenant,
        decision: Decision,
        runs: bool = True,
        produces: bool = False,
        retry_missing: bool = False,
    ) -> Response:
        """Send the request to the first replica in ``decision.order`` that takes it; nothing reaches the client
        before a replica has answered its first bytes, so any earlier failure is retried on the next one. ``runs``: the
        replica computes the prompt (not an explain or a token count): its load is counted, and its blocks are
        expected there next. ``produces``: a successful answer is a new stored response, whose id (from the JSON
        body or the first streamed event) is remembered as that replica's. ``retry_missing``: a 404 is retried on
        the next replica too (a stored response that only some replica may hold); the last one's answer stands."""
        headers = {k: v for k, v in request.headers.items() if k.lower() in FORWARDED}
        retry_statuses = RETRY_STATUSES | {404} if retry_missing else RETRY_STATUSES
        last = "no replica is up"
        for n, cand in enumerate(decision.order):
            replica = self.replicas.by_name(cand.name)
            if replica is None or not replica.up:
                if n == 0:
                    self._release(decision.ticket)  # it left the rotation since the decision
                continue
            if n:
                self.metrics.retries.labels("next_replica").inc()
            if not runs:
                ticket = None
            elif n == 0 and decision.ticket is not None:
                ticket = decision.ticket  # reserved when the decision was made
            else:
                ticket = self._dispatch(cand, decision.prompt_tokens)
            ours = {REPLICA_HEADER: cand.name, PREDICTED_HEADER: str(cand.cached_tokens)}
            try:
                upstream = await self.client.send(
                    self.client.build_request(request.method, replica.url + path, content=body, headers=headers,
                                              params=request.query_params),
                    stream=True,
                )  # fmt: skip
            except httpx.TransportError as err:
                self._release(ticket)
                self.replicas.failed(replica, f"unreachable: {type(err).__name__}")
                self.metrics.requests.labels(cand.name, "unreachable").inc()
                last = f"{replica.name}: {type(err).__name__}: {err}"
                continue
            if upstream.status_code in retry_statuses and n + 1 < len(decision.order) and not decision.forced:
                await upstream.aclose()
                self._release(ticket)
                self.metrics.requests.labels(cand.name, f"retried_{upstream.status_code}").inc()
                last = f"{replica.name}: HTTP {upstream.status_code}"
                continue
            try:
                if upstream.headers.get("content-type", "").startswith("text/event-stream"):
                    chunks = upstream.aiter_raw()
                    first = await anext(chunks, b"")
                else:
                    first, chunks = await upstream.aread(), None
            except httpx.TransportError as err:  # it died before the client saw a byte: the next one serves
                await upstream.aclose()
                self._release(ticket)
                self.replicas.failed(replica, f"failed mid-request: {type(err).__name__}")
                self.metrics.requests.labels(cand.name, "failed_before_start").inc()
                last = f"{replica.name}: {type(err).__name__}"
                continue
            if runs and upstream.status_code < 400:
                self._remember(tenant, decision, cand.name)
            scanner = None
            if produces and upstream.status_code < 400:
                if chunks is None:
                    self._produced(_json_object(first).get("id"), cand.name)
                else:
                    scanner = _IdScanner(lambda rid, name=cand.name: self._produced(rid, name))  # type: ignore[misc]
                    scanner.feed(first)
            self._observe(cand, upstream)
            out_headers = {k: v for k, v in upstream.headers.items() if k.lower() in PASSED_BACK}
            out_headers.update(ours)
            if chunks is None:
                await upstream.aclose()
                self._release(ticket)
                self.metrics.requests.labels(cand.name, str(upstream.status_code)).inc()
                return Response(first, status_code=upstream.status_code, headers=out_headers)
            if ticket is not None and self.loads is not None:
                self.loads.prefilled(ticket)
            self.metrics.requests.labels(cand.name, str(upstream.status_code)).inc()
            relay = self._relay(path, replica, first, chunks, scanner)
            return _Relay(relay, upstream.status_code, out_headers,
                          lambda up=upstream, t=ticket: self._close_stream(up, t))  # type: ignore[misc]  # fmt: skip
        raise APIError(503, f"no replica could serve the request: {last}", headers={"Retry-After": "1"})

    async def _relay(
        self, path: str, replica: Replica, first: bytes, chunks: AsyncIterator[bytes], scanner: _IdScanner | None
    ) -> AsyncIterator[bytes]:
        yield first
        try:
            async for chunk in chunks:
                if scanner is not None and not scanner.done:
                    scanner.feed(chunk)
                yield chunk
        except httpx.TransportError as err:  # the stream had started: end it with an error event, as the API does
            self.replicas.failed(replica, f"failed mid-stream: {type(err).__name__}")
            self.metrics.requests.labels(replica.name or replica.url, "failed_mid_stream").inc()
            yield error_event(path, f"the replica serving this stream failed ({type(err).__name__}); retry the "
                                    "request")  # fmt: skip

    def _produced(self, response_id: Any, replica: str) -> None:
        if isinstance(response_id, str) and response_id:
            self.owners.set(response_id, replica)

    async def _close_stream(self, upstream: httpx.Response, ticket: Ticket | None) -> None:
        self._release(ticket)  # first: nothing below may keep the load counted
        try:
            await upstream.aclose()  # a client gone: closing the upstream makes the replica abort the request
        except Exception:  # closing a dead connection may fail any way; the load is released
            log.debug("closing an upstream stream failed", exc_info=True)

    def _release(self, ticket: Ticket | None) -> None:
        if ticket is not None and self.loads is not None:
            self.loads.finish(ticket)

    def _observe(self, cand: Candidate, upstream: httpx.Response) -> None:
        self.metrics.predicted.labels(cand.name).inc(cand.cached_tokens)
        reported = upstream.headers.get(REPORTED_HEADER)
        if reported is not None and reported.isdigit():
            self.metrics.reported.labels(cand.name).inc(int(reported))
            self.metrics.error.observe(abs(int(reported) - cand.cached_tokens))

    # ---- fan-out to every replica ----------------------------------------------------------------------------
    async def each(self, method: str, path: str, headers: dict[str, str], body: bytes | None = None) -> dict[str, Any]:
        """The same call on every replica in the rotation: name -> its JSON answer (or an error)."""

        async def one(r: Replica) -> tuple[str, Any]:
            try:
                resp = await self.client.request(method, r.url + path, headers=headers, content=body)
                return r.name or r.url, resp.json()
            except (httpx.HTTPError, ValueError) as err:
                return r.name or r.url, {"error": f"{type(err).__name__}: {err}"}

        return dict(await asyncio.gather(*(one(r) for r in self.replicas.up())))

    def state(self) -> dict[str, Any]:
        views = self.follower.views()
        replicas = []
        for r in self.replicas.describe():
            view = views.get(r["name"] or "")
            r["index"] = None if view is None else {
                "blocks": view.counts(), "synced": view.synced, "alive": view.alive, "epoch": view.epoch,
                "seq": view.seq, "events_applied": view.events_applied, "resyncs": dict(view.resyncs)}  # fmt: skip
            r["load"] = vars(self.loads.of(r["name"])) if self.loads is not None and r["name"] else None
            r["load_own"] = vars(self.loads.own(r["name"])) if self.loads is not None and r["name"] else None
            replica = self.replicas.by_name(r["name"] or "")
            r["measured_tier_weights"] = measured_weights(replica.rates, self.model.block_size) if (
                replica is not None and self.model is not None) else {}  # fmt: skip
            replicas.append(r)
        model = self.model
        return {"router": self.cfg.router_id, "policy": self.policy.name, "replicas": replicas,
                "model": None if model is None else {"name": model.served_name, "fingerprint": model.fingerprint,
                                                     "dtype": model.dtype, "block_size": model.block_size,
                                                     "scope": model.scope},
                "redis": {"available": self.link.available}, "response_owners": len(self.owners)}  # fmt: skip

    def refresh_gauges(self) -> None:
        views = self.follower.views()
        for r in self.replicas.replicas:
            name = r.name or r.url
            self.metrics.up.labels(name).set(1 if r.up else 0)
            if self.loads is not None and r.name:
                load = self.loads.of(r.name)
                self.metrics.load.labels(name, "prefill_tokens").set(load.prefill_tokens)
                self.metrics.load.labels(name, "decodes").set(load.decodes)
            view = views.get(r.name or "")
            if view is not None:
                for tier, n in view.counts().items():
                    self.metrics.index.labels(name, tier).set(n)
                for why, n in view.resyncs.items():
                    self.metrics.resyncs.labels(name, why).set(n)


# ---- the app -----------------------------------------------------------------------------------------------------
def create_router_app(cfg: RouterConfig) -> FastAPI:
    router = Router(cfg)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await router.start()
        yield
        await router.close()

    app = FastAPI(title="promptcache router", lifespan=lifespan)
    app.state.router = router
    app.add_middleware(BodyLimit, max_bytes=int(cfg.max_body_mb * (1 << 20)), timeout=cfg.body_timeout)
    app.add_middleware(ErrorBoundary)

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, err: APIError) -> JSONResponse:
        return JSONResponse(error_body(request.url.path, err), status_code=err.status, headers=err.headers)

    def authenticate(request: Request) -> Tenant:
        return cfg.tenancy.resolve(request.headers)

    def admin(request: Request) -> Tenant:
        tenant = authenticate(request)
        if not tenant.admin:
            raise APIError(403, "this needs an admin API key")
        return tenant

    async def routed(request: Request) -> Response:
        path = request.url.path
        tenant = authenticate(request)
        raw = await request.body()
        body = _json_object(raw)  # not JSON, or not an object: the replica answers it with the right error
        forced = request.headers.get(REPLICA_HEADER)
        if forced is not None and not tenant.admin:
            raise APIError(403, f"choosing the replica ({REPLICA_HEADER}) needs an admin API key")
        previous = body.get("previous_response_id") if path == RESPONSES else None
        owner = router.owners.get(previous)
        decision = await asyncio.to_thread(router.decide, tenant, path, body, forced, True, owner)
        if not decision.order:
            raise APIError(503, "no replica is up", headers={"Retry-After": "1"})
        # NOTE: a turn that continues a response of unknown origin which the router could not read: a replica that
        # does not hold it answers 404 before running anything, and another may (without a shared Redis, each
        # replica holds only its own), so each is asked in turn.
        missing = previous is not None and owner is None and decision.prompt_tokens == 0
        stores = path == RESPONSES and body.get("store") is not False  # an unstored response cannot be continued
        return await router.forward(request, path, raw, tenant, decision, produces=stores,
                                    retry_missing=missing)  # fmt: skip

    for route in ROUTED:
        app.add_api_route(route, routed, methods=["POST"], **schemas.route_doc("POST", route))

    async def stored(request: Request, response_id: str) -> Response:
        """A stored response (GET, DELETE) or its input items: the replica that produced it first, then the others
        (they read the shared Redis). Of unknown origin, each replica is asked until one has it."""
        authenticate(request)  # the replica checks that the record is this tenant's
        # NOTE: forwarded as the client sent it: the decoded path of an id holding "?" or "%20" names another URL.
        raw_path = request.scope.get("raw_path")
        path = raw_path.decode("ascii", "replace") if isinstance(raw_path, bytes) else request.url.path
        owner = router.owners.get(response_id)
        decision = await asyncio.to_thread(router.decide, Tenant("-"), path, {}, None, False, owner)
        if not decision.order:
            raise APIError(503, "no replica is up", headers={"Retry-After": "1"})
        resp = await router.forward(request, path, await request.body(), Tenant("-"), decision, runs=False,
                                    retry_missing=owner is None)  # fmt: skip
        if resp.status_code < 400:
            if request.method == "DELETE":
                router.owners.forget(response_id)
            elif owner is None and router.model is not None and router.model.kv_prefix is None:
                # NOTE: replicas without Redis share no records: the one that answered holds it, asked first next
                # time. With Redis any replica answers, and that one is not where the conversation's blocks are.
                router.owners.set(response_id, resp.headers[REPLICA_HEADER])
        return resp

    app.add_api_route(STORED_PATHS[0], stored, methods=["GET"], **schemas.route_doc("GET", STORED_PATHS[0]))
    app.add_api_route(STORED_PATHS[0], stored, methods=["DELETE"], **schemas.route_doc("DELETE", STORED_PATHS[0]))
    app.add_api_route(STORED_PATHS[1], stored, methods=["GET"], **schemas.route_doc("GET", STORED_PATHS[1]))

    async def anywhere(request: Request) -> Response:
        """Endpoints any replica answers alike: the least loaded one that is up."""
        authenticate(request)
        decision = await asyncio.to_thread(router.decide, Tenant("-"), request.url.path, {})
        if not decision.order:
            raise APIError(503, "no replica is up", headers={"Retry-After": "1"})
        body = await request.body()
        return await router.forward(request, request.url.path, body, Tenant("-"), decision, runs=False)

    app.add_api_route("/v1/models", anywhere, methods=["GET"], **schemas.route_doc("GET", "/v1/models"))
    app.add_api_route("/v1/messages/count_tokens", anywhere, methods=["POST"],
                      **schemas.route_doc("POST", "/v1/messages/count_tokens"))  # fmt: skip

    @app.post("/v1/cache/explain", **schemas.route_doc("POST", "/v1/cache/explain"))
    async def explain(request: Request) -> Response:
        """The replica the router would choose explains the prompt; the router adds its prediction for each."""
        tenant = authenticate(request)
        raw = await request.body()
        body = _json_object(raw)  # not JSON, or not an object: the replica answers it with the right error
        decision = await asyncio.to_thread(router.decide, tenant, "/v1/cache/explain", body)
        resp = await router.forward(request, "/v1/cache/explain", raw, tenant, decision, runs=False)
        if resp.status_code != 200:
            return resp
        answer = json.loads(bytes(resp.body))
        answer["router"] = {"policy": router.policy.name, "replica": decision.order[0].name,
                            "candidates": decision.describe()}  # fmt: skip
        return JSONResponse(answer, headers={k: v for k, v in resp.headers.items() if k.startswith("x-promptcache")})

    def forward_headers(request: Request) -> dict[str, str]:
        return {k: v for k, v in request.headers.items() if k.lower() in FORWARDED}

    @app.get("/v1/cache/stats", **schemas.route_doc("GET", "/v1/cache/stats"))
    async def stats(request: Request) -> dict[str, Any]:
        admin(request)  # every tenant's traffic is counted there
        return {"replicas": await router.each("GET", "/v1/cache/stats", forward_headers(request)),
                "router": router.state()}  # fmt: skip

    @app.post("/v1/cache/reset", **schemas.route_doc("POST", "/v1/cache/reset"))
    async def reset(request: Request) -> dict[str, Any]:
        admin(request)
        raw = await request.body()
        _validated(schemas.ResetRequest, raw)  # refused here, not once per replica
        answers = await router.each("POST", "/v1/cache/reset", forward_headers(request), raw)
        return {"reset": all(a.get("reset") for a in answers.values()), "replicas": answers}

    @app.get("/v1/cache/integrity", **schemas.route_doc("GET", "/v1/cache/integrity"))
    async def integrity(request: Request) -> dict[str, Any]:
        admin(request)
        query = f"?{request.url.query}" if request.url.query else ""
        answers = await router.each("GET", "/v1/cache/integrity" + query, forward_headers(request))
        return {"ok": all(a.get("ok") for a in answers.values()), "replicas": answers}

    @app.get("/v1/fleet", **schemas.route_doc("GET", "/v1/fleet"))
    async def fleet(request: Request) -> dict[str, Any]:
        admin(request)
        return router.state()

    @app.get("/health", **schemas.route_doc("GET", "/health"))
    async def health() -> JSONResponse:
        up = len(router.replicas.up())
        return JSONResponse({"status": "ok" if up else "unavailable", "replicas_up": up,
                             "replicas": len(router.replicas.replicas)}, status_code=200 if up else 503)  # fmt: skip

    @app.get("/metrics", **schemas.route_doc("GET", "/metrics"))
    async def metrics() -> Response:
        router.refresh_gauges()
        return Response(generate_latest(router.metrics.registry), media_type="text/plain; version=0.0.4")

    schemas.document(app, __version__)
    return app


def _validated(model: type[BaseModel], raw: bytes) -> BaseModel:
    """``raw`` (empty: {}) validated as ``model``; a 400 that says what is wrong otherwise."""
    try:
        body = json.loads(raw) if raw.strip() else {}
    except (ValueError, RecursionError) as err:  # not JSON, not UTF-8, or nested deeper than the parser goes
        raise APIError(400, f"the request body is not valid JSON: {type(err).__name__}: {err}") from err
    try:
        return model.model_validate(body)
    except ValidationError as err:
        where = ".".join(str(x) for x in err.errors()[0]["loc"])
        raise APIError(400, f"invalid request: {where}: {err.errors()[0]['msg']}", param=where or None) from err


def _json_object(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object, or {} when it is not one."""
    try:
        body = json.loads(raw) if raw else {}
    except (ValueError, RecursionError):
        return {}
    return body if isinstance(body, dict) else {}
