"""OpenAI's Responses API with server-side conversation state: POST /v1/responses, GET and DELETE
/v1/responses/{id}, GET /v1/responses/{id}/input_items.

A response is stored (unless ``store`` is false) with the exact token ids its turn saw and produced; a request with
``previous_response_id`` continues from them (``responses_prompt``), so each turn reads the whole previous turn,
answer included, from the prompt cache. Stored responses belong to the tenant that made them: another tenant's id
is a 404, as an unknown one. With a Redis tier they are kept in Redis too, and any replica continues them.

Output: a ``message`` item with the text and, with function tools, a ``function_call`` item per ``<tool_call>`` the
model wrote. ``text.format`` (JSON schema or object), ``strict`` tools and a forced ``tool_choice`` constrain the
output with grammar-masked decoding (``constraints``). Streaming sends OpenAI's typed events, each with its
``sequence_number``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import APIRouter, Query, Request

from promptcache.api import constraints
from promptcache.api.errors import APIError
from promptcache.api.openai_api import DEFAULT_MAX_TOKENS, openai_usage, parse_tool_calls, read_json, stream_response
from promptcache.api.response_store import ResponseStore, StoredResponse
from promptcache.api.responses_prompt import ResponsePrompt, response_prompt
from promptcache.api.schemas import ResponsesRequest, route_doc
from promptcache.api.service import Finished, Service
from promptcache.api.tenancy import Tenant
from promptcache.engine.request import RequestOutput, SamplingParams
from promptcache.engine.structured import StructuredOutput

CALL_OPEN = "<tool_call>"
API = "openai"  # the metrics' and request ids' API label


def not_found(response_id: str, param: str = "response_id") -> APIError:
    """OpenAI's 404 for a response id that this tenant has not stored (unknown, expired, deleted, another's)."""
    return APIError(404, f"Response with id {response_id!r} not found.", param=param, code="response_not_found")


# ---- what the output must match ---------------------------------------------------------------------------------
def _functions(tools: list[dict[str, Any]] | None) -> list[constraints.Function]:
    """The request's (flat, already checked) function tools. NOTE: ``strict`` defaults to true in the Responses
    API (unlike chat completions): a call the model opens must match the function's parameters."""
    return [
        constraints.Function(t["name"], t.get("parameters") or {"type": "object"}, t.get("strict") is not False)
        for t in tools or []
    ]


def _tool_choice(choice: Any) -> Any:
    """Responses' ``tool_choice`` in the chat terms ``constraints.tool_constraint`` takes; 400 for other kinds."""
    if choice is None or isinstance(choice, str):
        return choice
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "name": choice["name"]}
    kind = choice.get("type") if isinstance(choice, dict) else None
    raise APIError(400, f'tool_choice must be "none", "auto", "required" or {{"type": "function", "name": ...}}; '
                   f"got a {kind!r} choice", param="tool_choice")  # fmt: skip


def _text_format(body: ResponsesRequest) -> StructuredOutput | None:
    """``text.format`` (flat: ``{"type": "json_schema", "name", "schema", "strict"}``) as chat's response_format."""
    fmt = body.text.format if body.text is not None else None
    if fmt is None:
        return None
    if fmt.type == "json_schema":
        chat = {"type": "json_schema", "json_schema": {"name": fmt.name, "schema": fmt.schema_, "strict": fmt.strict}}
        return constraints.response_format_constraint(chat, "text.format")
    return constraints.response_format_constraint({"type": fmt.type}, "text.format")


def output_constraint(body: ResponsesRequest, tag_tokens: bool = False) -> tuple[StructuredOutput | None, str]:
    """The request's constraint and the parameter it comes from: a forced ``tool_choice`` (``required`` or a named
    function) wins over ``text.format``, which wins over ``strict`` tools under ``auto``. ``tag_tokens``:
    ``Service.tool_tag_tokens``."""
    choice = _tool_choice(body.tool_choice)
    functions = _functions(body.tools)
    parallel = body.parallel_tool_calls is not False
    tool_spec = (constraints.tool_constraint(functions, choice, parallel, tag_tokens=tag_tokens)
                 if functions or choice is not None else None)  # fmt: skip
    text_spec = _text_format(body)
    if choice == "required" or isinstance(choice, dict):
        return tool_spec, "tool_choice"
    if text_spec is not None:
        fmt = body.text.format if body.text is not None else None
        return text_spec, "text.format.schema" if fmt is not None and fmt.type == "json_schema" else "text.format"
    return tool_spec, "tools"


# ---- the response object ------------------------------------------------------------------------------------------
def split_output(raw: str, parse_tools: bool) -> tuple[str, list[dict[str, Any]]]:
    """The message text and the function calls (chat-shaped, from ``parse_tool_calls``) of a generated text. With
    tools the text is stripped (what is left around the calls), so that a stream can send it as it comes."""
    if not parse_tools:
        return raw, []
    text, calls = parse_tool_calls(raw)
    return text.strip(), calls


def responses_usage(done: Finished) -> dict[str, Any]:
    """The Responses API's usage, with our ``cost`` and ``cached_tokens_by_tier`` (as chat completions gives)."""
    chat = openai_usage(done)
    return {
        "input_tokens": chat["prompt_tokens"],
        # Every full block is cached for free (OpenAI style): no input token is billed as a cache write.
        "input_tokens_details": {"cached_tokens": chat["prompt_tokens_details"]["cached_tokens"],
                                 "cache_write_tokens": 0},
        "output_tokens": chat["completion_tokens"],
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": chat["total_tokens"],
        "cost": chat["cost"],
        "cached_tokens_by_tier": chat["cached_tokens_by_tier"],
    }  # fmt: skip


def message_item(msg_id: str, text: str, status: str) -> dict[str, Any]:
    """The assistant's message output item, its text as one ``output_text`` part."""
    return {"type": "message", "id": msg_id, "status": status, "role": "assistant",
            "content": [_text_part(text)]}  # fmt: skip


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def call_item(call: dict[str, Any], status: str = "completed") -> dict[str, Any]:
    """A function_call output item from a chat-shaped call (``parse_tool_calls``), with an ``fc_`` id of its own."""
    fn = call["function"]
    return {"type": "function_call", "id": call["item_id"], "call_id": call["id"], "name": fn["name"],
            "arguments": fn["arguments"] if status == "completed" else "", "status": status}  # fmt: skip


@dataclass
class Turn:
    """One request's run: its prompt and the fields of its response object."""

    body: ResponsesRequest
    prompt: ResponsePrompt
    tenant: Tenant
    parse_tools: bool
    model: str
    id: str = field(default_factory=lambda: f"resp_{uuid.uuid4().hex}")
    msg_id: str = field(default_factory=lambda: f"msg_{uuid.uuid4().hex}")
    created_at: float = field(default_factory=time.time)

    def response(
        self, status: str, output: list[dict[str, Any]], usage: dict[str, Any] | None, incomplete: bool = False
    ) -> dict[str, Any]:
        """The response object (``status`` "in_progress" while streaming, then "completed" or "incomplete")."""
        b = self.body
        fmt = b.text.format.model_dump(by_alias=True, exclude_none=True) if b.text and b.text.format else None
        return {
            "id": self.id, "object": "response", "created_at": int(self.created_at), "status": status,
            "background": False, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "instructions": b.instructions, "max_output_tokens": b.max_output_tokens, "metadata": b.metadata or {},
            "model": self.model, "output": output, "parallel_tool_calls": b.parallel_tool_calls is not False,
            "previous_response_id": b.previous_response_id, "prompt_cache_key": b.prompt_cache_key,
            "prompt_cache_retention": b.prompt_cache_retention, "reasoning": {"effort": None, "summary": None},
            "safety_identifier": b.safety_identifier, "service_tier": "default", "store": b.store is not False,
            "temperature": 1.0 if b.temperature is None else b.temperature,
            "text": {"format": fmt or {"type": "text"}}, "tool_choice": b.tool_choice or "auto",
            "tools": [{**t, "strict": t.get("strict") is not False} for t in b.tools or []],
            "top_p": 1.0 if b.top_p is None else b.top_p, "truncation": b.truncation or "disabled",
            "usage": usage, "user": b.user,
        }  # fmt: skip

    def finished(self, done: Finished) -> tuple[dict[str, Any], str, list[dict[str, Any]]]:
        """The final response object of a finished run, with its message text and calls."""
        out = done.output
        incomplete = out.finish_reason == "length"
        text, calls = split_output(out.text, self.parse_tools)
        for call in calls:
            call["item_id"] = f"fc_{uuid.uuid4().hex}"
        output = []
        if text or not calls:
            output.append(message_item(self.msg_id, text, "incomplete" if incomplete else "completed"))
        output += [call_item(c) for c in calls]
        status = "incomplete" if incomplete else "completed"
        return self.response(status, output, responses_usage(done), incomplete), text, calls

    def record(self, response: dict[str, Any], out: RequestOutput) -> StoredResponse:
        """What is stored: the conversation with this turn's raw answer, and every id the model saw and produced."""
        conversation = [*self.prompt.conversation, {"role": "assistant", "content": out.text}]
        return StoredResponse(self.id, self.tenant.name, self.created_at, response, self.prompt.input_items,
                              conversation, [*self.prompt.ids, *out.token_ids])  # fmt: skip


# ---- streaming ----------------------------------------------------------------------------------------------------
class _Held:
    """Which of the generated text may be streamed now. Without tools, all of it. With tools, the text before a
    possible ``<tool_call>`` (complete calls are sent once the run ends), less leading and trailing whitespace.

    NOTE: what is streamed is always a prefix of the final message text (``split_output``'s, stripped): text once
    sent is never taken back, so the deltas add up to the text of the finished response.
    """

    def __init__(self, parse_tools: bool):
        self.parse_tools = parse_tools
        self.raw = ""
        self.sent = ""
        self.closed = False  # a tool call began: nothing more is streamed before the end

    def feed(self, new: str) -> str:
        """The text to stream now, after ``new`` was generated."""
        self.raw += new
        if not self.parse_tools:
            self.sent += new
            return new
        if self.closed:
            return ""
        at = self.raw.find(CALL_OPEN)
        if at >= 0:
            self.closed = True
        else:  # hold back what may be the start of "<tool_call>"
            keep = next((n for n in range(len(CALL_OPEN) - 1, 0, -1) if self.raw.endswith(CALL_OPEN[:n])), 0)
            at = len(self.raw) - keep
        target = self.raw[:at].strip()
        delta = target[len(self.sent) :] if target.startswith(self.sent) else ""
        self.sent += delta
        return delta


class _Events:
    """Server-sent events in OpenAI's shape (``event:`` line, JSON data), numbered in order."""

    def __init__(self) -> None:
        self._seq = itertools.count()

    def __call__(self, kind: str, **data: Any) -> bytes:
        payload = {"type": kind, "sequence_number": next(self._seq), **data}
        return f"event: {kind}\ndata: {json.dumps(payload)}\n\n".encode()


async def _stream_events(
    service: Service, turn: Turn, params: SamplingParams, save: Callable[[StoredResponse], Any]
) -> AsyncIterator[bytes]:
    body = turn.body
    ev = _Events()
    stream = service.stream(
        turn.tenant, body.cache_salt, turn.prompt.ids, params, API, retention=body.retention_seconds
    )
    try:
        # The first output comes once the prompt is prefilled: an error before it (a busy engine, bad input) still
        # gets its HTTP status, since no byte has been sent.
        first = await anext(stream)
        yield ev("response.created", response=turn.response("in_progress", [], None))
        yield ev("response.in_progress", response=turn.response("in_progress", [], None))
        held = _Held(turn.parse_tools)
        opened = False

        def open_message() -> list[bytes]:
            nonlocal opened
            opened = True
            item = {"type": "message", "id": turn.msg_id, "status": "in_progress", "role": "assistant", "content": []}
            return [ev("response.output_item.added", output_index=0, item=item),
                    ev("response.content_part.added", item_id=turn.msg_id, output_index=0, content_index=0,
                       part=_text_part(""))]  # fmt: skip

        def text_delta(delta: str) -> list[bytes]:
            if not delta:
                return []
            events = [] if opened else open_message()
            return [*events, ev("response.output_text.delta", item_id=turn.msg_id, output_index=0, content_index=0,
                                delta=delta, logprobs=[])]  # fmt: skip

        if not turn.parse_tools:
            for chunk in open_message():
                yield chunk
        final = first
        for chunk in text_delta(held.feed(first.new_text)):
            yield chunk
        if not first.finished:
            try:
                async for out in stream:
                    for chunk in text_delta(held.feed(out.new_text)):
                        yield chunk
                    final = out
            except APIError as err:  # the status is sent: say it in the stream, as OpenAI does
                yield ev("error", code=err.code, message=err.message, param=err.param)
                return
        done = service.account(final)
        response, text, calls = turn.finished(done)
        if text or not calls:
            for chunk in text_delta(text[len(held.sent) :] if text.startswith(held.sent) else ""):
                yield chunk
            if not opened:
                for chunk in open_message():
                    yield chunk
            item = response["output"][0]
            yield ev("response.output_text.done", item_id=turn.msg_id, output_index=0, content_index=0, text=text,
                     logprobs=[])  # fmt: skip
            yield ev("response.content_part.done", item_id=turn.msg_id, output_index=0, content_index=0,
                     part=item["content"][0])  # fmt: skip
            yield ev("response.output_item.done", output_index=0, item=item)
        first_call = len(response["output"]) - len(calls)
        for index, call in enumerate(calls, start=first_call):
            item = response["output"][index]
            yield ev("response.output_item.added", output_index=index, item=call_item(call, "in_progress"))
            yield ev("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                     delta=item["arguments"])  # fmt: skip
            yield ev("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                     name=item["name"], arguments=item["arguments"])  # fmt: skip
            yield ev("response.output_item.done", output_index=index, item=item)
        if body.store is not False:
            await save(turn.record(response, final))  # stored before the client hears it is done
        terminal = "response.incomplete" if response["status"] == "incomplete" else "response.completed"
        yield ev(terminal, response=response)
    finally:
        await stream.aclose()  # a client gone mid-stream: the request is aborted and its blocks freed


# ---- the endpoints ----------------------------------------------------------------------------------------------
def build_router(service: Service, authenticate: Any, store: ResponseStore) -> APIRouter:
    """The Responses API's routes over ``service``, keeping responses in ``store``."""
    router = APIRouter()

    async def lookup(tenant: Tenant, response_id: str, param: str = "response_id") -> StoredResponse:
        # Off the event loop: a Redis store may wait up to its timeout.
        record = await asyncio.to_thread(store.get, tenant.name, response_id)
        if record is None:
            raise not_found(response_id, param)
        return record

    async def save(record: StoredResponse) -> None:
        await asyncio.to_thread(store.put, record)

    @router.post("/v1/responses", **route_doc("POST", "/v1/responses"))
    async def create(request: Request) -> Any:
        tenant = authenticate(request)
        raw = await read_json(request)
        body = ResponsesRequest.model_validate(raw)
        if body.model != service.model_name:
            raise APIError(404, f"the model {body.model!r} does not exist; this server serves {service.model_name!r}",
                           param="model", code="model_not_found")  # fmt: skip
        if body.background:
            raise APIError(400, "background responses are not supported by this server", param="background")
        if body.conversation is not None:
            raise APIError(400, "conversation is not supported by this server; use previous_response_id",
                           param="conversation")  # fmt: skip
        previous = None
        if body.previous_response_id is not None:
            previous = await lookup(tenant, body.previous_response_id, "previous_response_id")
        prompt = response_prompt(service.prompts, tenant.name, raw, previous)
        service.check_messages(len(prompt.messages), "input")
        spec, spec_param = output_constraint(body, service.tool_tag_tokens)
        params = sampling_params(service, tenant, body, len(prompt.ids))
        service.check(prompt.ids, params, "max_output_tokens", tenant)
        await service.compile_constraint(tenant, body.cache_salt, spec, spec_param)
        params.structured_output = spec
        parse_tools = bool(prompt.tools) and body.tool_choice != "none"
        turn = Turn(body, prompt, tenant, parse_tools, service.model_name)
        if body.stream:
            return await stream_response(_stream_events(service, turn, params, save), service)
        done = await service.complete(tenant, body.cache_salt, prompt.ids, params, API,
                                      retention=body.retention_seconds)  # fmt: skip
        response, _, _ = turn.finished(done)
        if body.store is not False:
            await save(turn.record(response, done.output))
        return response

    @router.get("/v1/responses/{response_id}", **route_doc("GET", "/v1/responses/{response_id}"))
    async def retrieve(request: Request, response_id: str) -> dict[str, Any]:
        return (await lookup(authenticate(request), response_id)).response

    @router.delete("/v1/responses/{response_id}", **route_doc("DELETE", "/v1/responses/{response_id}"))
    async def delete(request: Request, response_id: str) -> dict[str, Any]:
        tenant = authenticate(request)
        if not await asyncio.to_thread(store.delete, tenant.name, response_id):
            raise not_found(response_id)
        return {"id": response_id, "object": "response.deleted", "deleted": True}

    @router.get("/v1/responses/{response_id}/input_items",
                **route_doc("GET", "/v1/responses/{response_id}/input_items"))  # fmt: skip
    async def input_items(
        request: Request, response_id: str, limit: int = Query(20, ge=1, le=100),
        order: Literal["asc", "desc"] = "desc", after: str | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        items = list((await lookup(authenticate(request), response_id)).input_items)
        if order == "desc":
            items.reverse()
        if after is not None:
            at = next((i for i, item in enumerate(items) if item.get("id") == after), None)
            if at is None:
                raise APIError(400, f"after: the response has no input item {after!r}", param="after")
            items = items[at + 1 :]
        page = items[:limit]
        return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None, "has_more": len(items) > limit}  # fmt: skip

    return router


def sampling_params(service: Service, tenant: Tenant, body: ResponsesRequest, prompt_len: int) -> SamplingParams:
    """The engine's parameters; with no max_output_tokens, as many as the context leaves, up to DEFAULT_MAX_TOKENS
    and the key's cap (as chat completions)."""
    cap = service.max_tokens_cap(tenant)
    default = max(1, min(DEFAULT_MAX_TOKENS, service.max_model_len - prompt_len, cap or DEFAULT_MAX_TOKENS))
    return SamplingParams(
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        max_tokens=body.max_output_tokens if body.max_output_tokens is not None else default,
    )
