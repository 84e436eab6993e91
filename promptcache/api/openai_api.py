"""OpenAI-compatible endpoints: /v1/chat/completions, /v1/completions, /v1/models."""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from promptcache.api import constraints
from promptcache.api.errors import APIError
from promptcache.api.prompts import normalize_messages
from promptcache.api.schemas import ChatCompletionRequest, CompletionRequest, OpenAIBody, route_doc
from promptcache.api.service import MAX_CHOICES, Finished, Service
from promptcache.api.tenancy import Tenant
from promptcache.engine.request import Logprob, RequestOutput, SamplingParams

DEFAULT_MAX_TOKENS = 512
TOOL_CALL = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.DOTALL)
TOOL_OPEN = "<tool_call>"


def sampling_params(
    body: OpenAIBody, max_tokens: int | None, logprobs: int | None, prompt_len: int, limit: int, cap: int | None = None
) -> SamplingParams:
    """The engine's parameters; with no max_tokens, as many as the context leaves, up to DEFAULT_MAX_TOKENS and the
    key's ``cap``."""
    default = max(1, min(DEFAULT_MAX_TOKENS, limit - prompt_len, cap or DEFAULT_MAX_TOKENS))
    return SamplingParams(
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=body.top_k if body.top_k is not None else -1,
        max_tokens=max_tokens if max_tokens is not None else default,
        seed=body.seed,
        stop=body.stop,
        ignore_eos=body.ignore_eos,
        logprobs=logprobs,
    )


def parse_tool_calls(text: str) -> tuple[str, list[dict[str, Any]]]:
    """Split ``<tool_call>{"name":..., "arguments":...}</tool_call>`` blocks (Qwen/Hermes style) out of a reply."""
    calls = []
    for m in TOOL_CALL.finditer(text):
        try:
            obj = json.loads(m.group(1))
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict) and isinstance(obj.get("name"), str):
            calls.append({
                "id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                "function": {"name": obj["name"], "arguments": json.dumps(obj.get("arguments", {}))},
            })  # fmt: skip
    if not calls:
        return text, []
    return TOOL_CALL.sub("", text).strip(), calls


def openai_usage(done: Finished, completion_tokens: int | None = None) -> dict[str, Any]:
    u = done.usage
    completion = u.output_tokens if completion_tokens is None else completion_tokens
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": u.prompt_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
        "cost": {**done.cost, "currency": "USD", "response_cached": done.response_cached},
        # Our extension: cached_tokens split by the tier each block was read from (device, host, disk, redis).
        "cached_tokens_by_tier": dict(u.cached_tokens_by_tier),
    }


def _token_logprobs(service: Service, out: RequestOutput, top: int) -> list[dict[str, Any]]:
    entries = []
    for tok, lp in zip(out.token_ids, out.logprobs or []):
        chosen: Logprob = lp[tok]
        text = chosen.decoded_token or ""
        tops = sorted(lp.items(), key=lambda kv: kv[1].rank)[:top]
        entries.append({
            "token": text, "logprob": chosen.logprob, "bytes": list(text.encode()),
            "top_logprobs": [{"token": v.decoded_token or "", "logprob": v.logprob,
                              "bytes": list((v.decoded_token or "").encode())} for _, v in tops],
        })  # fmt: skip
    return entries


def build_router(service: Service, authenticate: Any) -> APIRouter:
    router = APIRouter()

    def check_model(model: str) -> None:
        if model != service.model_name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves {service.model_name!r}",
                           param="model", code="model_not_found")  # fmt: skip

    @router.get("/v1/models", **route_doc("GET", "/v1/models"))
    async def models(request: Request) -> dict[str, Any]:
        authenticate(request)
        return {"object": "list", "data": [
            {"id": service.model_name, "object": "model", "created": 0, "owned_by": "promptcache",
             "max_model_len": service.max_model_len}]}  # fmt: skip

    @router.post("/v1/chat/completions", **route_doc("POST", "/v1/chat/completions"))
    async def chat_completions(request: Request) -> Any:
        tenant = authenticate(request)
        raw = await read_json(request)
        body = ChatCompletionRequest.model_validate(raw)
        check_model(body.model)
        service.check_messages(len(body.messages))
        check_choices(body.n)
        ids = service.chat_ids(tenant, normalize_messages(body.messages), body.tools)
        top = body.top_logprobs or 0
        params = sampling_params(body, body.max_completion_tokens or body.max_tokens, top if body.logprobs else None,
                                 len(ids), service.max_model_len, service.max_tokens_cap(tenant))  # fmt: skip
        param_name = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        service.check(ids, params, param_name, tenant)
        spec, spec_param = constraints.chat_constraint(body.tools, body.tool_choice, body.parallel_tool_calls,
                                                       body.response_format, body.structured_outputs,
                                                       service.tool_tag_tokens)  # fmt: skip
        await service.compile_constraint(tenant, body.cache_salt, spec, spec_param)
        params.structured_output = spec
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        cache_key = service.response_cache.key(tenant, "chat", raw) if service.response_cache else None
        if cache_key and not body.stream:
            hit = service.response_cache.get(cache_key)  # type: ignore[union-attr]
            if hit is not None:
                service.metrics.response_cache_hits.inc()
                return {**hit, "id": rid, "created": created, "response_cached": True,
                        "usage": {**hit["usage"], "cost": _zero_cost(hit["usage"]["cost"])}}  # fmt: skip
        if body.stream:
            return await stream_response(chat_chunks(service, tenant, body, ids, params, rid, created), service)
        results = await run_n(service, tenant, body.cache_salt, ids, params, body.n, "openai",
                              body.retention_seconds)  # fmt: skip
        choices = []
        parse_tools = bool(body.tools) and body.tool_choice != "none"
        for i, done in enumerate(results):
            out = done.output
            text, calls = parse_tool_calls(out.text) if parse_tools else (out.text, [])
            message: dict[str, Any] = {"role": "assistant", "content": text if not calls else (text or None)}
            if calls:
                message["tool_calls"] = calls
            choices.append({
                "index": i, "message": message,
                "finish_reason": "tool_calls" if calls else out.finish_reason,
                "logprobs": {"content": _token_logprobs(service, out, top)} if body.logprobs else None,
            })  # fmt: skip
        response = {
            "id": rid, "object": "chat.completion", "created": created, "model": service.model_name,
            "choices": choices, "usage": openai_usage(results[0], sum(len(d.output.token_ids) for d in results)),
            "system_fingerprint": f"promptcache-{service.engine.engine.fingerprint[:12]}",
        }  # fmt: skip
        if cache_key:
            service.response_cache.put(cache_key, response)  # type: ignore[union-attr]
        return response

    @router.post("/v1/completions", **route_doc("POST", "/v1/completions"))
    async def completions(request: Request) -> Any:
        tenant = authenticate(request)
        body = CompletionRequest.model_validate(await read_json(request))
        check_model(body.model)
        prompts = service.prompts.completion_prompts(body.prompt)
        if len(prompts) != 1 and body.stream:
            raise APIError(400, "streaming supports one prompt per request", param="prompt")
        check_choices(len(prompts) * body.n)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        all_params = []
        spec = constraints.vllm_constraint(body.structured_outputs)
        await service.compile_constraint(tenant, body.cache_salt, spec, "structured_outputs")
        for ids in prompts:
            params = sampling_params(body, body.max_tokens, body.logprobs, len(ids), service.max_model_len,
                                     service.max_tokens_cap(tenant))  # fmt: skip
            service.check(ids, params, tenant=tenant)
            params.structured_output = spec
            all_params.append(params)
        if body.stream:
            return await stream_response(
                completion_chunks(service, tenant, body, prompts[0], all_params[0], rid, created), service
            )
        results: list[Finished] = []
        for ids, params in zip(prompts, all_params):
            results.extend(
                await run_n(service, tenant, body.cache_salt, ids, params, body.n, "openai", body.retention_seconds)
            )
        choices = []
        for i, done in enumerate(results):
            out = done.output
            lp = None
            if body.logprobs is not None:
                entries = _token_logprobs(service, out, body.logprobs)
                lp = {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
                      "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
                      "text_offset": []}  # fmt: skip
            choices.append({"index": i, "text": out.text, "finish_reason": out.finish_reason, "logprobs": lp})
        usage = openai_usage(results[0], sum(len(d.output.token_ids) for d in results))
        if len(prompts) > 1:  # several prompts: add up every prompt's own accounting
            per_prompt = results[:: body.n]
            usage["prompt_tokens"] = sum(d.usage.prompt_tokens for d in per_prompt)
            usage["prompt_tokens_details"]["cached_tokens"] = sum(d.usage.cached_tokens for d in per_prompt)
            usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
            usage["cost"]["total"] = sum(d.cost["total"] for d in results)
        return {"id": rid, "object": "text_completion", "created": created, "model": service.model_name,
                "choices": choices, "usage": usage}  # fmt: skip

    return router


def check_choices(count: int) -> None:
    """Refuse a request for more completions (prompts x n) than MAX_CHOICES: each is a run of its own."""
    if count > MAX_CHOICES:
        raise APIError(400, f"the request asks for {count} completions (prompts x n); at most {MAX_CHOICES} are "
                       "served per request", param="prompt")  # fmt: skip


def _zero_cost(cost: dict[str, Any]) -> dict[str, Any]:
    return {**{k: 0.0 for k, v in cost.items() if isinstance(v, float)}, "currency": "USD", "response_cached": True}


async def read_json(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (ValueError, RecursionError) as err:  # not JSON, not UTF-8, or nested deeper than the parser goes
        raise APIError(400, f"the request body is not valid JSON: {type(err).__name__}: {err}") from err
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    return body


async def run_n(
    service: Service, tenant: Tenant, salt: str | None, ids: list[int], params: SamplingParams, n: int, api: str,
    retention: float = 0.0,
) -> list[Finished]:  # fmt: skip
    """n choices: the first runs alone until its prompt is cached, then the others start and hit that cache."""
    if n == 1:
        return [await service.complete(tenant, salt, ids, params, api, retention=retention)]
    first_stream = service.stream(tenant, salt, ids, params, api, retention=retention)
    first_out = await anext(first_stream)

    async def finish_first() -> Finished:
        out = first_out
        async for out in first_stream:  # noqa: B007 - the last one is the final output
            pass
        return service.account(out)

    rest = [service.complete(tenant, salt, ids, _seeded(params, i), api, retention=retention) for i in range(1, n)]
    return list(await asyncio.gather(finish_first(), *rest))


def _sse(obj: Any) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()


async def stream_response(chunks: AsyncIterator[bytes], service: Service) -> StreamingResponse:
    """Start the stream only once the first chunk exists, so that errors before it get a proper status."""
    try:
        first = await anext(chunks)
    except StopAsyncIteration:
        first = b""

    async def body() -> AsyncIterator[bytes]:
        yield first
        try:
            async for chunk in chunks:
                yield chunk
        except APIError as err:  # the status is sent: say it in the stream, as OpenAI does, and end it cleanly
            yield _sse(err.openai_body())

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def chat_chunks(
    service: Service, tenant: Tenant, body: ChatCompletionRequest, ids: list[int], params: SamplingParams,
    rid: str, created: int,
) -> AsyncIterator[bytes]:  # fmt: skip
    base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": service.model_name}
    include_usage = bool((body.stream_options or {}).get("include_usage"))
    outs: list[RequestOutput] = []
    streams = [
        service.stream(tenant, body.cache_salt, ids, _seeded(params, i), "openai", retention=body.retention_seconds)
        for i in range(body.n)
    ]
    # The first output arrives before any byte is sent: a busy engine or bad input still gets its HTTP status.
    first_out = await anext(streams[0])
    for i in range(body.n):
        yield _sse({**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                         "logprobs": None, "finish_reason": None}]})  # fmt: skip
    top = body.top_logprobs or 0
    parse_tools = bool(body.tools) and body.tool_choice != "none"
    for i, stream in enumerate(streams):  # choices one after another: each later one hits the first's prompt
        held = _HeldToolCalls() if parse_tools else None
        async for out in _prepend(first_out, stream) if i == 0 else stream:
            text = out.new_text if held is None else held.feed(out.new_text)
            delta: dict[str, Any] = {"content": text} if text else {}
            if held is not None and out.finished:
                delta, calls = held.finish(delta)
                if calls:
                    out = RequestOutput(**{**out.__dict__, "finish_reason": "tool_calls"})
            lp = None
            if body.logprobs and out.new_token_ids:
                view = RequestOutput(**{**out.__dict__, "token_ids": out.new_token_ids,
                                        "logprobs": (out.logprobs or [])[-len(out.new_token_ids):]})  # fmt: skip
                lp = {"content": _token_logprobs(service, view, top)}
            if delta or lp or out.finished:
                reason = out.finish_reason if out.finished else None
                choice = {"index": i, "delta": delta, "logprobs": lp, "finish_reason": reason}
                yield _sse({**base, "choices": [choice]})
            if out.finished:
                outs.append(out)
    if include_usage:
        done = [service.account(o) for o in outs]
        yield _sse({**base, "choices": [], "usage": openai_usage(done[0], sum(len(o.token_ids) for o in outs))})
    else:
        for o in outs:
            service.account(o)
    yield b"data: [DONE]\n\n"


class _HeldToolCalls:
    """A streamed reply that may hold ``<tool_call>`` blocks: text is streamed until a call may begin; the rest is
    held, and at the end its calls go out as one ``tool_calls`` delta (the text around them as content)."""

    def __init__(self) -> None:
        self.held = ""
        self.holding = False

    def feed(self, text: str) -> str:
        """What of ``text`` can be streamed now."""
        if self.holding:
            self.held += text
            return ""
        pending = self.held + text
        at = pending.find(TOOL_OPEN)
        if at >= 0:
            self.holding, self.held = True, pending[at:]
            return pending[:at]
        # a suffix that may be the start of "<tool_call>" waits for the next piece
        keep = next((n for n in range(len(TOOL_OPEN) - 1, 0, -1) if pending.endswith(TOOL_OPEN[:n])), 0)
        self.held = pending[len(pending) - keep :]
        return pending[: len(pending) - keep]

    def finish(self, delta: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The final delta: held text with its calls parsed out (``tool_calls`` with their indices)."""
        rest, calls = parse_tool_calls(self.held)
        content = delta.get("content", "") + rest
        out: dict[str, Any] = {"content": content} if content else {}
        if calls:
            out["tool_calls"] = [{"index": k, **call} for k, call in enumerate(calls)]
        return out, calls


async def completion_chunks(
    service: Service, tenant: Tenant, body: CompletionRequest, ids: list[int], params: SamplingParams,
    rid: str, created: int,
) -> AsyncIterator[bytes]:  # fmt: skip
    base = {"id": rid, "object": "text_completion", "created": created, "model": service.model_name}
    include_usage = bool((body.stream_options or {}).get("include_usage"))
    final: RequestOutput | None = None
    async for out in service.stream(tenant, body.cache_salt, ids, params, "openai", retention=body.retention_seconds):
        if out.new_text or out.finished:
            reason = out.finish_reason if out.finished else None
            yield _sse(
                {**base, "choices": [{"index": 0, "text": out.new_text, "logprobs": None, "finish_reason": reason}]}
            )
        final = out
    assert final is not None
    done = service.account(final)
    if include_usage:
        yield _sse({**base, "choices": [], "usage": openai_usage(done)})
    yield b"data: [DONE]\n\n"


async def _prepend(first: RequestOutput, rest: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
    yield first
    async for item in rest:
        yield item


def _seeded(params: SamplingParams, i: int) -> SamplingParams:
    if i == 0:
        return params
    p = SamplingParams(**{**params.__dict__})
    p.seed = None if params.seed is None else params.seed + i
    return p
