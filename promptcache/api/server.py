"""The HTTP server: FastAPI app over an ``AsyncEngine``, with auth, errors in each API's format, cache control."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from promptcache import __version__
from promptcache.api import fleet_api, openai_api, responses_api, schemas
from promptcache.api.errors import APIError, ErrorBoundary, error_body
from promptcache.api.limits import DEFAULT_BODY_TIMEOUT, DEFAULT_MAX_BODY_MB, BodyLimit
from promptcache.api.prompts import looks_anthropic
from promptcache.api.response_store import DEFAULT_MAX_PER_TENANT, DEFAULT_TTL_SECONDS, make_response_store
from promptcache.api.service import DEFAULT_MAX_MESSAGES, Service
from promptcache.api.tenancy import Tenancy, Tenant
from promptcache.engine.async_engine import AsyncEngine
from promptcache.pricing import PriceTable


@dataclass
class ServerConfig:
    served_model_name: str = "promptcache-default"
    tenancy: Tenancy = field(default_factory=Tenancy)
    prices: PriceTable = field(default_factory=lambda: PriceTable.preset("default"))
    response_cache: bool = False
    max_waiting: int = 1024
    max_body_mb: float = DEFAULT_MAX_BODY_MB  # larger request bodies get a 413 before they are read whole
    max_concurrent_per_tenant: int | None = None  # requests one tenant may run at once (a key's own limit wins)
    max_tokens_limit: int | None = None  # output tokens one request may ask for (a key's own max_tokens wins)
    max_messages: int = DEFAULT_MAX_MESSAGES  # messages one conversation may hold
    body_timeout: float = DEFAULT_BODY_TIMEOUT  # seconds a client gets to send its whole body (then 408)
    replica_name: str | None = None  # this server's name in a fleet (default: host-pid)
    kv_events: bool = True  # with a Redis tier, publish KV events for fleet routers
    max_stored_responses: int = DEFAULT_MAX_PER_TENANT  # Responses API: stored responses per tenant (oldest go)
    stored_response_ttl: float = DEFAULT_TTL_SECONDS  # Responses API: seconds a stored response is kept


def create_app(engine: AsyncEngine, config: ServerConfig | None = None) -> FastAPI:
    """The app; the engine thread starts and stops with it."""
    cfg = config or ServerConfig()
    service = Service(engine, cfg.served_model_name, cfg.tenancy, cfg.prices, cfg.response_cache,
                      cfg.max_concurrent_per_tenant, cfg.max_tokens_limit, cfg.max_messages)  # fmt: skip
    engine.max_waiting = cfg.max_waiting
    replica = fleet_api.Replica(service, cfg.replica_name or fleet_api.default_name(), cfg.kv_events)
    # Stored responses (previous_response_id): with a Redis tier, in Redis too, so that any replica of the model
    # continues a conversation another one started (scoped by the model's fingerprint, like the replay records).
    core = engine.engine
    responses = make_response_store(core.config.redis_url, core.fingerprint, cfg.max_stored_responses,
                                    cfg.stored_response_ttl)  # fmt: skip

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        replica.start()
        yield
        replica.close()
        engine.shutdown()
        responses.close()

    app = FastAPI(title="promptcache", lifespan=lifespan)
    app.state.service = service
    app.state.replica = replica
    app.state.responses = responses
    app.add_middleware(fleet_api.ReplicaHeaders, name=replica.name)
    app.add_middleware(BodyLimit, max_bytes=int(cfg.max_body_mb * (1 << 20)), timeout=cfg.body_timeout)
    app.add_middleware(ErrorBoundary)

    def error_response(request: Request, err: APIError) -> JSONResponse:
        return JSONResponse(error_body(request.url.path, err), status_code=err.status, headers=err.headers)

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, err: APIError) -> JSONResponse:
        return error_response(request, err)

    @app.exception_handler(RequestValidationError)
    @app.exception_handler(ValidationError)
    async def on_validation_error(request: Request, err: Exception) -> JSONResponse:
        errors = err.errors() if hasattr(err, "errors") else []
        parts = []
        for e in errors[:3]:
            where = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
            parts.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
        param = ".".join(str(x) for x in errors[0].get("loc", ()) if x != "body") if errors else None
        return error_response(request, APIError(400, "invalid request: " + "; ".join(parts), param=param))

    def authenticate(request: Request) -> Tenant:
        return service.tenancy.resolve(request.headers)

    app.state.authenticate = authenticate

    @app.get("/health", **schemas.route_doc("GET", "/health"))
    async def health() -> dict[str, Any]:
        """Liveness for load balancers and fleet routers. NOTE: it never waits for the engine thread (a long step
        must not make a busy replica look dead); the block count is read as it stands, between or during steps."""
        core = engine.engine
        return {"status": "ok", "model": service.model_name, "requests": engine.num_waiting_or_running,
                "blocks_in_use": core.kv.pool.num_in_use, "replica": replica.name, "epoch": replica.epoch,
                "tier_rates": core.tiers.rates() if core.tiers is not None else None}  # fmt: skip

    @app.get("/v1/cache/integrity", **schemas.route_doc("GET", "/v1/cache/integrity"))
    async def cache_integrity(request: Request) -> dict[str, Any]:
        """Admin: check the device pool's and every tier's invariants (``?deep=1`` also verifies every entry)."""
        tenant = authenticate(request)
        if not tenant.admin:
            raise APIError(403, "checking the cache's integrity needs an admin API key")
        deep = request.query_params.get("deep") in ("1", "true")
        problems = await service.engine.call_async(lambda e: e.check_integrity(deep))
        return {"ok": not any(problems.values()), "problems": problems}

    @app.get("/metrics", **schemas.route_doc("GET", "/metrics"))
    async def metrics() -> Response:
        await service.cache_stats()
        return Response(service.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/cache/stats", **schemas.route_doc("GET", "/v1/cache/stats"))
    async def cache_stats(request: Request) -> dict[str, Any]:
        """Admin: the cache's counters. NOTE: they count every tenant's traffic (prompt lengths, hits), so another
        tenant may not read them: the timing audit found a probe tenant could watch a victim's requests here."""
        if not authenticate(request).admin:
            raise APIError(403, "the cache's statistics count every tenant's requests: they need an admin API key")
        stats = await service.cache_stats()
        return {**stats, "model": service.model_name, "replay_entries": len(service.replay),
                "response_cache_entries": len(service.response_cache.entries) if service.response_cache else None,
                "pricing_per_million_tokens": service.prices.as_dict()}  # fmt: skip

    @app.post("/v1/cache/explain", **schemas.route_doc("POST", "/v1/cache/explain"))
    async def cache_explain(request: Request) -> dict[str, Any]:
        tenant = authenticate(request)
        body = await openai_api.read_json(request)
        options = schemas.ExplainRequest.model_validate(body)
        if isinstance(body.get("messages"), list):
            service.check_messages(len(body["messages"]))
        anthropic_shaped = "system" in body or looks_anthropic(body)
        api = options.api or ("anthropic" if anthropic_shaped else "openai")
        ids, salt = service.prompts.explain_ids(api, tenant.name, body)
        namespace = tenant.namespace(salt)
        info = await service.engine.call_async(lambda e: e.explain(ids, namespace))
        if options.addresses:  # the block addresses looked up (a fleet router checks its own against them)
            info["block_addresses"] = [h.hex() for h in service.engine.engine.kv.addresses(namespace, ids)]
        return {"api": api, **info}

    @app.post("/v1/cache/reset", **schemas.route_doc("POST", "/v1/cache/reset"))
    async def cache_reset(request: Request) -> dict[str, Any]:
        """Admin: forget the device pool's idle blocks; ``{"tiers": true}`` also the local tiers' entries, and
        ``{"shared": true}`` also this model's entries in Redis (which every replica reads)."""
        tenant = authenticate(request)
        if not tenant.admin:
            raise APIError(403, "resetting the cache needs an admin API key")
        body = schemas.ResetRequest.model_validate(await openai_api.read_json(request) if await request.body() else {})
        tiers, shared = body.tiers or body.shared, body.shared
        dropped = await service.engine.call_async(lambda e: e.reset_cache(tiers, shared))
        if replica.publisher is not None:
            replica.publisher.reset()  # routers rebuild their view of this replica from a snapshot
        return {"reset": True, "blocks_dropped": dropped["device"], "entries_dropped": dropped}

    app.include_router(openai_api.build_router(service, authenticate))
    app.include_router(fleet_api.build_router(service, authenticate, replica))
    app.include_router(responses_api.build_router(service, authenticate, responses))
    try:
        from promptcache.api import anthropic_api
    except ImportError:  # pragma: no cover - during development the Anthropic API may be absent
        anthropic_api = None  # type: ignore[assignment]
    if anthropic_api is not None:
        app.include_router(anthropic_api.build_router(service, authenticate))
    schemas.document(app, __version__)
    return app
