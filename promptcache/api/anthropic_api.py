"""Anthropic-compatible endpoints: POST /v1/messages (with ``cache_control`` breakpoints) and /v1/messages/count_tokens.

Prompt caching the Anthropic way: a ``cache_control: {"type": "ephemeral", "ttl": "5m" | "1h"}`` on a tool
definition, a system block or a message content block (or once on the request: the end of the last message) marks a
breakpoint. The prefix up to and including that block is pinned in the KV cache for the TTL (a hit refreshes it),
and the blocks a request writes under a breakpoint are billed as cache writes of that TTL.

How a body becomes prompt ids and breakpoints lives in ``promptcache.api.prompts`` (a fleet router computes the
same without importing the engine); this module runs requests and shapes responses.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request

from promptcache.api import constraints
from promptcache.api.errors import APIError
from promptcache.api.openai_api import TOOL_CALL, read_json, stream_response
from promptcache.api.prompts import AnthropicPromptBody, Prompt
from promptcache.api.prompts import _replayed_prefix as _replayed_prefix  # re-exported: tests use it from here
from promptcache.api.schemas import CountTokensRequest, MessagesRequest, route_doc
from promptcache.api.service import Service
from promptcache.api.tenancy import Tenant
from promptcache.engine.request import RequestOutput, SamplingParams
from promptcache.engine.structured import StructuredOutput
from promptcache.pricing import TokenUsage


def build_prompt(service: Service, tenant: Tenant, body: AnthropicPromptBody) -> Prompt:
    """The prompt ids of an Anthropic request and where its cache breakpoints fall in them (the tenant's replay)."""
    return service.prompts.anthropic(tenant.name, body)


# ---- responses -------------------------------------------------------------------------------------------------
def parse_tool_uses(text: str) -> tuple[str, list[dict[str, Any]]]:
    """Split ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` out of a reply as tool_use blocks."""
    uses = []
    for m in TOOL_CALL.finditer(text):
        use = _tool_use(m.group(1))
        if use is not None:
            uses.append(use)
    if not uses:
        return text, []
    return TOOL_CALL.sub(lambda m: "" if _tool_use(m.group(1)) else m.group(0), text).strip(), uses


def _tool_use(raw: str) -> dict[str, Any] | None:
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("input", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return {"type": "tool_use", "id": f"toolu_{uuid.uuid4().hex[:24]}", "name": obj["name"], "input": args}


def stop_reason(out: RequestOutput, num_tool_uses: int) -> tuple[str, str | None]:
    if out.finish_reason == "length":
        return "max_tokens", None
    if num_tool_uses:
        return "tool_use", None
    if isinstance(out.stop_reason, str):
        return "stop_sequence", out.stop_reason
    return "end_turn", None


def anthropic_usage(u: TokenUsage, cost: dict[str, float] | None = None) -> dict[str, Any]:
    """Anthropic's usage: input_tokens is the prompt less what was read from or written to the cache."""
    usage: dict[str, Any] = {
        "input_tokens": u.uncached_input_tokens,
        "cache_creation_input_tokens": u.cache_write_tokens,
        "cache_read_input_tokens": u.cached_tokens,
        "cache_creation": {"ephemeral_5m_input_tokens": u.cache_write_5m_tokens,
                           "ephemeral_1h_input_tokens": u.cache_write_1h_tokens},
        "output_tokens": u.output_tokens,
        "service_tier": "standard",
    }  # fmt: skip
    if cost is not None:
        usage["cost"] = {**cost, "currency": "USD"}
    usage["cached_tokens_by_tier"] = dict(u.cached_tokens_by_tier)  # ours: cache reads by source tier
    return usage


def _event(name: str, data: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()


class _ContentStream:
    """Streamed text -> content block events; with tools, each ``<tool_call>{...}</tool_call>`` is a tool_use block.

    Text that may be the start of a tool call is held back until it is known; whitespace between blocks is dropped.
    """

    OPEN, CLOSE = "<tool_call>", "</tool_call>"

    def __init__(self, parse_tools: bool):
        self.parse_tools = parse_tools
        self.pending = ""  # text not yet sent (a tool call may start in it)
        self.space = ""  # whitespace waiting for a text block to open
        self.index = -1  # the index of the last opened block
        self.open: str | None = None  # the type of the block open now
        self.num_tool_uses = 0

    def start(self) -> list[bytes]:
        return [] if self.parse_tools else self._open_text()

    def feed(self, text: str) -> list[bytes]:
        if not self.parse_tools:
            return self._text(text)
        self.pending += text
        events: list[bytes] = []
        while True:
            at = self.pending.find(self.OPEN)
            if at < 0:
                keep = next((n for n in range(len(self.OPEN) - 1, 0, -1) if self.pending.endswith(self.OPEN[:n])), 0)
                cut = len(self.pending) - keep
                events += self._text(self.pending[:cut])
                self.pending = self.pending[cut:]
                return events
            events += self._text(self.pending[:at])
            end = self.pending.find(self.CLOSE, at)
            if end < 0:
                self.pending = self.pending[at:]
                return events
            raw, self.pending = self.pending[at : end + len(self.CLOSE)], self.pending[end + len(self.CLOSE) :]
            m = TOOL_CALL.fullmatch(raw)
            use = _tool_use(m.group(1)) if m else None
            events += self._text(raw) if use is None else self._tool(use)

    def finish(self) -> list[bytes]:
        events = self._text(self.pending)  # an unfinished tool call is text
        self.pending = ""
        if self.index < 0:
            events += self._open_text()
        return events + self._close()

    def _open_text(self) -> list[bytes]:
        self.index += 1
        self.open = "text"
        return [_event("content_block_start", {"type": "content_block_start", "index": self.index,
                                               "content_block": {"type": "text", "text": ""}})]  # fmt: skip

    def _close(self) -> list[bytes]:
        if self.open is None:
            return []
        self.open = None
        return [_event("content_block_stop", {"type": "content_block_stop", "index": self.index})]

    def _text(self, text: str) -> list[bytes]:
        if not text:
            return []
        events: list[bytes] = []
        if self.open != "text":
            if self.parse_tools:
                text, self.space = self.space + text, ""
                if not text.strip():
                    self.space = text
                    return []
            events += self._close() + self._open_text()
        delta = {"type": "text_delta", "text": text}
        return [*events, _event("content_block_delta", {"type": "content_block_delta", "index": self.index,
                                                        "delta": delta})]  # fmt: skip

    def _tool(self, use: dict[str, Any]) -> list[bytes]:
        self.space = ""
        events = self._close()
        self.index += 1
        self.num_tool_uses += 1
        block = {"type": "tool_use", "id": use["id"], "name": use["name"], "input": {}}
        delta = {"type": "input_json_delta", "partial_json": json.dumps(use["input"])}
        events.append(_event("content_block_start", {"type": "content_block_start", "index": self.index,
                                                     "content_block": block}))  # fmt: skip
        events.append(_event("content_block_delta", {"type": "content_block_delta", "index": self.index,
                                                     "delta": delta}))  # fmt: skip
        events.append(_event("content_block_stop", {"type": "content_block_stop", "index": self.index}))
        return events


async def _message_events(
    service: Service, tenant: Tenant, body: MessagesRequest, prompt: Prompt, params: SamplingParams, msg_id: str
) -> AsyncIterator[bytes]:
    stream = service.stream(tenant, body.cache_salt, prompt.ids, params, "anthropic", prompt.breakpoints)
    try:
        # The first output comes once the prompt is prefilled: the cache usage is known, and an error before it
        # (a busy engine, bad input) still gets its HTTP status since no byte has been sent.
        first = await anext(stream)
        start_usage = anthropic_usage(service.usage_of(first, prompt.breakpoints))
        message = {"id": msg_id, "type": "message", "role": "assistant", "model": service.model_name, "content": [],
                   "stop_reason": None, "stop_sequence": None, "usage": start_usage}  # fmt: skip
        yield _event("message_start", {"type": "message_start", "message": message})
        content = _ContentStream(prompt.parse_tools)
        for ev in [*content.start(), _event("ping", {"type": "ping"}), *content.feed(first.new_text)]:
            yield ev
        final = first
        if not first.finished:
            try:
                async for out in stream:
                    for ev in content.feed(out.new_text):
                        yield ev
                    final = out
            except APIError as err:  # headers are sent: report it the way Anthropic does mid-stream
                yield _event("error", err.anthropic_body())
                return
        for ev in content.finish():
            yield ev
        done = service.account(final, prompt.breakpoints)
        reason, sequence = stop_reason(final, content.num_tool_uses)
        yield _event("message_delta", {"type": "message_delta",
                                       "delta": {"stop_reason": reason, "stop_sequence": sequence},
                                       "usage": anthropic_usage(done.usage, done.cost)})  # fmt: skip
        yield _event("message_stop", {"type": "message_stop"})
    finally:
        await stream.aclose()  # a client gone mid-stream: the request is aborted and its blocks freed


def output_constraint(
    body: MessagesRequest, raw: dict[str, Any], tag_tokens: bool = False
) -> tuple[StructuredOutput | None, str]:
    """The request's constraint: a forced tool choice (``any`` / ``tool``), else ``output_config.format`` /
    ``output_format``, else ``strict`` tools under ``auto``."""
    choice = body.tool_choice or {}
    if body.tools and choice.get("type") in ("any", "tool"):
        return constraints.anthropic_tool_constraint(body.tools, choice, tag_tokens), "tool_choice"
    if (spec := constraints.anthropic_output_format(raw)) is not None:
        return spec, "output_format"
    if body.tools and choice.get("type") != "none":
        return constraints.anthropic_tool_constraint(body.tools, choice, tag_tokens), "tools"
    return None, ""


# ---- the router ------------------------------------------------------------------------------------------------
def build_router(service: Service, authenticate: Any) -> APIRouter:
    router = APIRouter()

    def check_model(model: str) -> None:
        if model != service.model_name:
            raise APIError(404, f"model: {model} (this server serves {service.model_name!r})", param="model")

    @router.post("/v1/messages", **route_doc("POST", "/v1/messages"))
    async def messages(request: Request) -> Any:
        tenant = authenticate(request)
        raw = await read_json(request)
        body = MessagesRequest.model_validate(raw)
        check_model(body.model)
        service.check_messages(len(body.messages))
        prompt = build_prompt(service, tenant, body)
        params = SamplingParams(
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=-1 if body.top_k is None else body.top_k,
            max_tokens=body.max_tokens,
            stop=body.stop_sequences,
        )
        service.check(prompt.ids, params, tenant=tenant)
        spec, param = output_constraint(body, raw, service.tool_tag_tokens)
        await service.compile_constraint(tenant, body.cache_salt, spec, param)
        params.structured_output = spec
        msg_id = f"msg_{uuid.uuid4().hex[:24]}"
        if body.stream:
            return await stream_response(_message_events(service, tenant, body, prompt, params, msg_id), service)
        done = await service.complete(tenant, body.cache_salt, prompt.ids, params, "anthropic", prompt.breakpoints)
        out = done.output
        text, uses = parse_tool_uses(out.text) if prompt.parse_tools else (out.text, [])
        content = ([{"type": "text", "text": text}] if text or not uses else []) + uses
        reason, sequence = stop_reason(out, len(uses))
        return {"id": msg_id, "type": "message", "role": "assistant", "model": service.model_name,
                "content": content, "stop_reason": reason, "stop_sequence": sequence,
                "usage": anthropic_usage(done.usage, done.cost)}  # fmt: skip

    @router.post("/v1/messages/count_tokens", **route_doc("POST", "/v1/messages/count_tokens"))
    async def count_tokens(request: Request) -> dict[str, Any]:
        tenant = authenticate(request)
        body = CountTokensRequest.model_validate(await read_json(request))
        check_model(body.model)
        service.check_messages(len(body.messages))
        return {"input_tokens": len(build_prompt(service, tenant, body).ids)}

    return router
