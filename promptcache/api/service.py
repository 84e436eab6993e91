"""What both APIs share: prompts (through ``promptcache.api.prompts``), running a request, usage and cost."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from promptcache.api.constraints import tags_are_tokens
from promptcache.api.errors import APIError
from promptcache.api.metrics import Metrics
from promptcache.api.prompts import PromptRenderer
from promptcache.api.tenancy import Tenancy, Tenant
from promptcache.engine.async_engine import AsyncEngine, EngineDeadError, QueueFullError
from promptcache.engine.request import RequestOutput, SamplingParams
from promptcache.engine.structured import StructuredOutput
from promptcache.pricing import PriceTable, TokenUsage
from promptcache.replay import make_replay_store, replay_ids

TTL_SECONDS = {"5m": 300.0, "1h": 3600.0}
DEFAULT_MAX_MESSAGES = 2048  # messages in one conversation (every one is rendered by the chat template)
MAX_CHOICES = 128  # completions one request may ask for (prompts x n): each is a run of its own
# Per HTTP request: what the engine reported once the prompt was prefilled (``cached_tokens``), for the response's
# headers (``fleet_api.ReplicaHeaders`` sets a fresh dict per request; a fleet router reads the header).
RESPONSE_META: ContextVar[dict[str, Any] | None] = ContextVar("promptcache_response_meta", default=None)


@dataclass
class Finished:
    """A request's final output with its accounting."""

    output: RequestOutput
    usage: TokenUsage
    cost: dict[str, float]
    response_cached: bool = False


@dataclass
class ResponseCache:
    """Memoised answers to deterministic requests, per tenant (opt-in; bounded LRU)."""

    capacity: int = 1024
    entries: OrderedDict[str, Any] = field(default_factory=OrderedDict)

    @staticmethod
    def key(tenant: Tenant, api: str, body: dict[str, Any]) -> str | None:
        """A key for a deterministic request (temperature 0 or a fixed seed); None if it is not deterministic."""
        temperature = body.get("temperature", 1.0)
        if (body.get("n") or 1) > 1 or not (temperature == 0 or body.get("seed") is not None):
            return None
        ignored = {"stream", "stream_options", "user", "metadata"}
        canonical = json.dumps({k: v for k, v in body.items() if k not in ignored}, sort_keys=True, default=str)
        return hashlib.sha256(f"{tenant.name}\x1f{api}\x1f{canonical}".encode()).hexdigest()

    def get(self, key: str) -> Any:
        value = self.entries.get(key)
        if value is not None:
            self.entries.move_to_end(key)
        return value

    def put(self, key: str, value: Any) -> None:
        self.entries[key] = value
        self.entries.move_to_end(key)
        while len(self.entries) > self.capacity:
            self.entries.popitem(last=False)


class Service:
    def __init__(
        self,
        engine: AsyncEngine,
        model_name: str,
        tenancy: Tenancy,
        prices: PriceTable,
        response_cache: bool = False,
        max_concurrent_per_tenant: int | None = None,
        max_tokens_limit: int | None = None,
        max_messages: int = DEFAULT_MAX_MESSAGES,
    ):
        self.engine = engine
        # The most output tokens one request may ask for (a key's own ``max_tokens`` wins), and the most messages
        # one conversation may hold: what a public endpoint bounds before it queues anything.
        self.max_tokens_limit = max_tokens_limit
        self.max_messages = max_messages
        # Requests each tenant runs now, and the default cap (a key's own ``max_concurrent`` wins): one tenant
        # cannot fill the queue that every other tenant waits in.
        self.max_concurrent_per_tenant = max_concurrent_per_tenant
        self._running: dict[str, int] = {}
        self.model_name = model_name
        self.tenancy = tenancy
        self.prices = prices
        self.metrics = Metrics()
        core = engine.engine
        # With a Redis tier, the replay records live in Redis too: a conversation's next turn may reach another
        # replica (behind a router), which must render our answer as the ids we generated.
        cfg = core.config
        self.replay = make_replay_store(cfg.redis_url, core.fingerprint, cfg.redis_ttl, capacity=16384)
        self.response_cache = ResponseCache() if response_cache else None
        self.tokenizer = core.tokenizer
        self.max_model_len = core.max_model_len
        self.block_size = core.kv.block_size
        self.vocab_size = core.model_config.vocab_size
        # Whether tool-call grammars must name <tool_call> / </tool_call> as tokens (constraints.tags_are_tokens).
        self.tool_tag_tokens = tags_are_tokens(self.tokenizer)
        # Prompt building lives apart from the engine so that a fleet router renders requests exactly as we do.
        self.prompts = PromptRenderer(self.tokenizer, self.replay)

    # ---- prompts --------------------------------------------------------------------------------------------
    def chat_ids(
        self, tenant: Tenant, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
    ) -> list[int]:  # fmt: skip
        """Render a conversation with the chat template; our own earlier answers keep their generated ids.

        (:meth:`PromptRenderer.chat_ids` with the tenant's replay namespace.)
        """
        return self.prompts.chat_ids(tenant.name, messages, tools, add_generation_prompt)

    def text_ids(self, text: str) -> list[int]:
        """The ids of a completion prompt's text (:meth:`PromptRenderer.text_ids`)."""
        return self.prompts.text_ids(text)

    def max_tokens_cap(self, tenant: Tenant) -> int | None:
        """The most output tokens ``tenant`` may ask for in one request (None: only the context bounds it)."""
        return tenant.max_tokens or self.max_tokens_limit

    def check_messages(self, count: int, param: str = "messages") -> None:
        """Refuse a conversation of more than ``max_messages`` messages (400)."""
        if count > self.max_messages:
            raise APIError(400, f"{param} holds {count} messages; this server takes at most {self.max_messages}",
                           param=param, code="too_many_messages")  # fmt: skip

    def check(
        self, ids: list[int], params: SamplingParams, max_tokens_param: str = "max_tokens",
        tenant: Tenant | None = None,
    ) -> None:  # fmt: skip
        """Refuse, before queueing, a request the engine could not serve or that passes a limit (400, why)."""
        cap = None if tenant is None else self.max_tokens_cap(tenant)
        if cap is not None and params.max_tokens > cap:
            raise APIError(400, f"{max_tokens_param}={params.max_tokens} is over this API key's limit of {cap} "
                           "output tokens per request", param=max_tokens_param, code="max_tokens_exceeded")  # fmt: skip
        if not ids:
            raise APIError(400, "the prompt is empty", param="messages")
        if len(ids) >= self.max_model_len:
            raise APIError(
                400,
                f"the prompt has {len(ids)} tokens, but this model's context holds {self.max_model_len} tokens "
                "(and at least one must be generated)",
                code="context_length_exceeded",
            )
        if len(ids) + params.max_tokens > self.max_model_len:
            raise APIError(
                400,
                f"{max_tokens_param}={params.max_tokens} is too large: the prompt has {len(ids)} tokens and the "
                f"context holds {self.max_model_len}, so at most {self.max_model_len - len(ids)} can be generated",
                param=max_tokens_param,
                code="context_length_exceeded",
            )
        try:
            params.validate(self.vocab_size)
        except ValueError as err:
            raise APIError(400, str(err)) from err

    async def compile_constraint(
        self, tenant: Tenant, cache_salt: str | None, spec: StructuredOutput | None, param: str
    ) -> None:
        """Compile a request's structured output ahead of its run, off the engine thread (the engine then finds it
        cached); an invalid one is a 400 naming ``param`` and what is wrong."""
        if spec is None:
            return
        grammars = self.engine.engine.grammars
        try:
            await asyncio.to_thread(grammars.compile, spec, tenant.namespace(cache_salt))
        except ValueError as err:
            raise APIError(400, f"{param}: {err}", param=param, code="invalid_schema") from err

    # ---- running ------------------------------------------------------------------------------------------
    async def stream(
        self,
        tenant: Tenant,
        cache_salt: str | None,
        ids: list[int],
        params: SamplingParams,
        api: str,
        cache_breakpoints: Sequence[tuple[int, str]] = (),
        retention: float = 0.0,
    ) -> AsyncIterator[RequestOutput]:
        """Run one request, yielding its outputs; records latency, tokens and cost when it finishes."""
        self.check(ids, params)
        with self._tenant_slot(tenant, api):
            breakpoints = [(n, TTL_SECONDS[ttl]) for n, ttl in cache_breakpoints]
            request_id = f"{api}-{uuid.uuid4().hex}"
            start = time.perf_counter()
            last = start
            first = True
            try:
                namespace = tenant.namespace(cache_salt)
                gen = self.engine.generate(ids, params, namespace, request_id, breakpoints, retention)
                # aclosing: a client gone mid-stream closes this generator, and so at once the engine's run (which
                # aborts the request and frees its blocks), not whenever it is collected.
                async with contextlib.aclosing(gen):
                    async for out in gen:
                        now = time.perf_counter()
                        if first:
                            self.metrics.ttft.observe(now - start)
                            first = False
                            meta = RESPONSE_META.get()
                            if meta is not None:
                                meta.setdefault("cached_tokens", out.num_cached_tokens)
                        elif out.new_token_ids:
                            self.metrics.itl.observe(now - last)
                        last = now
                        if out.finished:
                            ids_for_replay = replay_ids(
                                self.tokenizer, out.token_ids, out.text, self.engine.engine.eos_token_ids
                            )
                            if ids_for_replay is not None:
                                self.replay.remember(tenant.name, out.text, ids_for_replay)
                            self.metrics.requests.labels(api, out.finish_reason or "stop").inc()
                        yield out
            except QueueFullError as err:
                self.metrics.requests.labels(api, "rejected").inc()
                raise APIError(429, f"the server is busy: {err}", headers={"Retry-After": "1"}) from err
            except ValueError as err:
                raise APIError(400, str(err)) from err
            except EngineDeadError as err:
                self.metrics.requests.labels(api, "error").inc()
                raise APIError(500, str(err)) from err

    @contextlib.contextmanager
    def _tenant_slot(self, tenant: Tenant, api: str) -> Iterator[None]:
        """One of the tenant's concurrent requests, for as long as the block runs (429 when none is free)."""
        limit = tenant.max_concurrent or self.max_concurrent_per_tenant
        running = self._running.get(tenant.name, 0)
        if limit is not None and running >= limit:
            self.metrics.requests.labels(api, "rejected").inc()
            raise APIError(429, f"this API key already runs {running} requests, its limit; retry when one ends",
                           code="rate_limit_exceeded", headers={"Retry-After": "1"})  # fmt: skip
        self._running[tenant.name] = running + 1
        try:
            yield
        finally:
            left = self._running[tenant.name] - 1
            if left:
                self._running[tenant.name] = left
            else:
                del self._running[tenant.name]

    async def complete(
        self,
        tenant: Tenant,
        cache_salt: str | None,
        ids: list[int],
        params: SamplingParams,
        api: str,
        cache_breakpoints: Sequence[tuple[int, str]] = (),
        retention: float = 0.0,
    ) -> Finished:
        """Run one request to the end."""
        final: RequestOutput | None = None
        async for out in self.stream(tenant, cache_salt, ids, params, api, cache_breakpoints, retention):
            final = out
        assert final is not None
        return self.account(final, cache_breakpoints)

    def account(self, out: RequestOutput, cache_breakpoints: Sequence[tuple[int, str]] = ()) -> Finished:
        """Usage and cost of a finished request; also adds them to the metrics."""
        usage = self.usage_of(out, cache_breakpoints)
        cost = self.prices.for_model(self.model_name).cost(usage)
        self.metrics.record_usage(usage, cost)
        return Finished(out, usage, cost)

    def usage_of(self, out: RequestOutput, cache_breakpoints: Sequence[tuple[int, str]] = ()) -> TokenUsage:
        """prompt = cached (read) + written under a breakpoint (by TTL) + the uncached rest.

        NOTE: the engine caches every full block, but a write is billed only where the client asked for caching
        (inside a breakpoint's span, Anthropic style); other blocks are cached for free, OpenAI style.
        """
        writes = {"5m": 0, "1h": 0}
        spans = sorted(cache_breakpoints)
        for b in out.written_blocks:
            end = (b + 1) * self.block_size
            for n, ttl in spans:
                if end <= n:
                    writes[ttl] += self.block_size
                    break
        return TokenUsage(
            prompt_tokens=len(out.prompt_token_ids),
            cached_tokens=out.num_cached_tokens,
            output_tokens=len(out.token_ids),
            cache_write_5m_tokens=writes["5m"],
            cache_write_1h_tokens=writes["1h"],
            cached_tokens_by_tier=dict(out.cached_tokens_by_tier),
        )

    async def cache_stats(self, tiers: bool = True) -> dict[str, Any]:
        """The device pool's state (on the engine thread) and, with ``tiers``, the tiers' (off it: a Redis key
        count can take a while, and the step loop must not wait for it)."""
        stats = await self.engine.call_async(lambda e: e.cache_stats())
        tier_stats = await asyncio.to_thread(self.engine.engine.tier_stats) if tiers else None
        self.metrics.set_cache_state(stats, tier_stats)
        return {**stats, "tiers": tier_stats}
