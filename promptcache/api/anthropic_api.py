"""Anthropic-compatible endpoints: POST /v1/messages (with ``cache_control`` breakpoints) and /v1/messages/count_tokens.

Prompt caching the Anthropic way: a ``cache_control: {"type": "ephemeral", "ttl": "5m" | "1h"}`` on a tool
definition, a system block or a message content block (or once on the request: the end of the last message) marks a
breakpoint. The prefix up to and including that block is pinned in the KV cache for the TTL (a hit refreshes it),
and the blocks a request writes under a breakpoint are billed as cache writes of that TTL.

Breakpoint positions are found without touching the prompt's tokens: the conversation is rendered once plainly and
once with a unique marker after each marked block; the marked text minus its markers must equal the plain text, and
each marker's character offset is mapped to a token count through the tokenizer's offsets of the plain text. So the
prompt ids are the same with and without ``cache_control`` (and the same as the OpenAI API's for the same chat).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from promptcache.api.errors import APIError
from promptcache.api.openai_api import TOOL_CALL, read_json, stream_response
from promptcache.api.service import Service
from promptcache.api.tenancy import Tenant
from promptcache.engine.request import RequestOutput, SamplingParams
from promptcache.pricing import TokenUsage
from promptcache.replay import ReplayStore
from promptcache.tokenizer import ChatTemplateError, Tokenizer

MAX_BREAKPOINTS = 4
CACHE_TTLS = ("5m", "1h")
UNSUPPORTED_BLOCKS = ("image", "document", "search_result", "container_upload")
SKIPPED_BLOCKS = ("thinking", "redacted_thinking")  # earlier turns' reasoning is not part of the prompt


# ---- request bodies --------------------------------------------------------------------------------------------
class _PromptBody(BaseModel):
    """What shapes the prompt (all of /v1/cache/explain needs)."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    messages: list[dict[str, Any]] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    cache_control: dict[str, Any] | None = None
    cache_salt: str | None = None  # our extension: a further cache partition inside the tenant


class CountTokensRequest(_PromptBody):
    model: str


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=1.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=1)
    stop_sequences: list[str] | None = None
    stream: bool = False
    metadata: dict[str, Any] | None = None


# ---- the prompt: messages -> template messages with marked blocks ----------------------------------------------
@dataclass
class _Part:
    """A text block of a message, and the breakpoints (mark indices) that end right after it."""

    text: str
    marks: list[int] = field(default_factory=list)


@dataclass
class _ToolCall:
    id: str
    name: str
    input: Any
    marks: list[int] = field(default_factory=list)


@dataclass
class _Msg:
    role: str  # system | user | assistant | tool
    parts: list[_Part] = field(default_factory=list)
    tool_calls: list[_ToolCall] = field(default_factory=list)
    tool_call_id: str | None = None

    @property
    def text(self) -> str:
        return "\n".join(p.text for p in self.parts)


@dataclass
class Prompt:
    """A request's prompt ids and its cache breakpoints ``(num_tokens, ttl)``."""

    ids: list[int]
    breakpoints: list[tuple[int, str]]
    parse_tools: bool


class _Marks:
    """The breakpoints of one request in Anthropic's order (tools, system, messages); validates each."""

    def __init__(self) -> None:
        self.ttls: list[str] = []
        self.where: list[str] = []

    def add(self, cc: Any, where: str) -> list[int]:
        if cc is None:
            return []
        if not isinstance(cc, dict) or cc.get("type") != "ephemeral":
            raise APIError(400, f'{where}.cache_control: type must be "ephemeral"', param=f"{where}.cache_control")
        ttl = cc.get("ttl", "5m")
        if ttl not in CACHE_TTLS:
            raise APIError(400, f'{where}.cache_control.ttl must be "5m" or "1h", got {ttl!r}',
                           param=f"{where}.cache_control.ttl")  # fmt: skip
        self.ttls.append(ttl)
        self.where.append(where)
        return [len(self.ttls) - 1]

    def check(self) -> None:
        if len(self.ttls) > MAX_BREAKPOINTS:
            raise APIError(400, f"A maximum of {MAX_BREAKPOINTS} blocks with cache_control may be provided. "
                                f"Found {len(self.ttls)}.")  # fmt: skip
        for i in range(1, len(self.ttls)):
            if self.ttls[i] == "1h" and "5m" in self.ttls[:i]:
                raise APIError(400, f"{self.where[i]}: a ttl='1h' cache_control block must not come after a "
                                    "ttl='5m' cache_control block. Note that blocks are processed in the following "
                                    "order: `tools`, `system`, `messages`.")  # fmt: skip


def _blocks(content: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if isinstance(content, list) and all(isinstance(b, dict) for b in content):
        return content
    raise APIError(400, f"{where} must be a string or a list of content blocks", param=where)


def _unsupported(kind: Any, where: str) -> APIError:
    if kind in UNSUPPORTED_BLOCKS:
        return APIError(400, f"{where}: {kind} blocks are not supported by this server (text-only model)", param=where)
    return APIError(400, f"{where}: content block type {kind!r} is not supported here", param=where)


def _text_part(block: dict[str, Any], where: str, marks: _Marks) -> _Part:
    text = block.get("text")
    if not isinstance(text, str):
        raise APIError(400, f"{where}.text must be a string", param=f"{where}.text")
    return _Part(text, marks.add(block.get("cache_control"), where))


def _parse_tools(tools: list[dict[str, Any]], marks: _Marks) -> tuple[list[dict[str, Any]], dict[int, list[int]]]:
    """Anthropic tool definitions -> OpenAI-style function tools (what chat templates render)."""
    out: list[dict[str, Any]] = []
    tool_marks: dict[int, list[int]] = {}
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        kind = tool.get("type")
        if kind not in (None, "custom"):
            raise APIError(400, f"{where}: tool type {kind!r} is not supported (only custom tools with an "
                                "input_schema)", param=where)  # fmt: skip
        name, schema = tool.get("name"), tool.get("input_schema")
        if not isinstance(name, str) or not name:
            raise APIError(400, f"{where}.name must be a non-empty string", param=f"{where}.name")
        if not isinstance(schema, dict):
            raise APIError(400, f"{where}.input_schema must be a JSON schema object", param=f"{where}.input_schema")
        fn: dict[str, Any] = {"name": name}
        if tool.get("description") is not None:
            fn["description"] = str(tool["description"])
        fn["parameters"] = schema
        out.append({"type": "function", "function": fn})
        if m := marks.add(tool.get("cache_control"), where):
            tool_marks[i] = m
    return out, tool_marks


def _parse_system(system: str | list[dict[str, Any]] | None, marks: _Marks) -> _Msg | None:
    if system is None or system == "":
        return None
    parts = []
    for j, block in enumerate(_blocks(system, "system")):
        if block.get("type") != "text":
            raise _unsupported(block.get("type"), f"system[{j}]")
        parts.append(_text_part(block, f"system[{j}]", marks))
    return _Msg("system", parts) if parts else None


def _tool_result(block: dict[str, Any], where: str, marks: _Marks) -> _Msg:
    content = block.get("content")
    parts: list[_Part] = []
    if content is not None:
        for k, inner in enumerate(_blocks(content, f"{where}.content")):
            if inner.get("type") != "text":
                raise _unsupported(inner.get("type"), f"{where}.content[{k}]")
            parts.append(_text_part(inner, f"{where}.content[{k}]", marks))
    own = marks.add(block.get("cache_control"), where)
    if own:
        if not parts:
            parts.append(_Part(""))
        parts[-1].marks.extend(own)
    return _Msg("tool", parts or [_Part("")], tool_call_id=str(block.get("tool_use_id") or ""))


def _parse_messages(messages: list[dict[str, Any]], marks: _Marks) -> list[_Msg]:
    out: list[_Msg] = []
    for i, msg in enumerate(messages):
        role = msg.get("role")
        if role not in ("user", "assistant"):
            raise APIError(400, f"messages[{i}].role must be 'user' or 'assistant'; got {role!r}",
                           param=f"messages[{i}].role")  # fmt: skip
        blocks = _blocks(msg.get("content"), f"messages[{i}].content")
        if role == "assistant":
            turn = _Msg("assistant")
            for j, block in enumerate(blocks):
                where, kind = f"messages[{i}].content[{j}]", block.get("type")
                if kind == "text":
                    turn.parts.append(_text_part(block, where, marks))
                elif kind == "tool_use":
                    name = block.get("name")
                    if not isinstance(name, str) or not name:
                        raise APIError(400, f"{where}.name must be a non-empty string", param=f"{where}.name")
                    call = _ToolCall(str(block.get("id") or ""), name, block.get("input") or {})
                    call.marks = marks.add(block.get("cache_control"), where)
                    turn.tool_calls.append(call)
                elif kind not in SKIPPED_BLOCKS:
                    raise _unsupported(kind, where)
            out.append(turn)
            continue
        turn = _Msg("user")
        for j, block in enumerate(blocks):
            where, kind = f"messages[{i}].content[{j}]", block.get("type")
            if kind == "text":
                turn.parts.append(_text_part(block, where, marks))
            elif kind == "tool_result":  # a tool message of its own, in the order given
                if turn.parts:
                    out.append(turn)
                    turn = _Msg("user")
                out.append(_tool_result(block, where, marks))
            else:
                raise _unsupported(kind, where)
        if turn.parts or not blocks:
            out.append(turn)
    return out


def build_prompt(service: Service, tenant: Tenant, body: _PromptBody) -> Prompt:
    """The prompt ids of an Anthropic request and where its cache breakpoints fall in them."""
    marks = _Marks()
    tools, tool_marks = _parse_tools(body.tools or [], marks)
    system = _parse_system(body.system, marks)
    msgs = ([system] if system else []) + _parse_messages(body.messages, marks)
    auto = marks.add(body.cache_control, "cache_control")  # the automatic breakpoint: the end of the last block
    if auto:
        last = msgs[-1]
        if last.tool_calls:
            last.tool_calls[-1].marks.extend(auto)
        else:
            if not last.parts:
                last.parts.append(_Part(""))
            last.parts[-1].marks.extend(auto)
    marks.check()
    prefill: list[_Part] = []
    if msgs[-1].role == "assistant" and not msgs[-1].tool_calls:  # a prefilled answer: the model continues it
        prefill = msgs.pop().parts
    if not msgs:
        raise APIError(400, "messages: the conversation needs a user message", param="messages")
    parse_tools = bool(tools) and (body.tool_choice or {}).get("type") != "none"
    ids, positions = _render(service.tokenizer, service.replay, tenant.name, msgs, tools, tool_marks, prefill,
                             len(marks.ttls))  # fmt: skip
    breakpoints = [(pos, marks.ttls[i]) for i, pos in enumerate(positions) if pos]
    return Prompt(ids, breakpoints, parse_tools)


# ---- rendering with breakpoint markers ---------------------------------------------------------------------------
def _render(
    tokenizer: Tokenizer, store: ReplayStore | None, namespace: str, msgs: list[_Msg], tools: list[dict[str, Any]],
    tool_marks: dict[int, list[int]], prefill: list[_Part], num_marks: int,
) -> tuple[list[int], list[int | None]]:  # fmt: skip
    """Prompt ids (as ``replay.render_chat_ids`` makes them) and, per mark, the tokens up to the end of its block.

    A mark that cannot be placed (a template that rewrites the marked text) gets None: no breakpoint there.
    """
    nonce = uuid.uuid4().hex[:16]

    def marker(tag: str) -> str:
        return f"\x00{nonce}{tag}\x00"

    replayed: dict[int, tuple[int, ...]] = {}  # our own earlier answers keep the ids we generated
    if store is not None:
        for k, m in enumerate(msgs):
            if m.role == "assistant" and (ids := store.lookup(namespace, m.text)) is not None:
                replayed[k] = ids

    def with_marks(parts: list[_Part], marked: bool) -> str:
        if not marked:
            return "\n".join(p.text for p in parts)
        return "\n".join(p.text + "".join(marker(f"m{x}") for x in p.marks) for p in parts)

    def template_messages(marked: bool) -> list[dict[str, Any]]:
        out = []
        for k, m in enumerate(msgs):
            d: dict[str, Any] = {"role": m.role}
            d["content"] = marker(f"r{k}") if k in replayed else with_marks(m.parts, marked)
            if m.tool_calls:
                d["tool_calls"] = [
                    {"type": "function", "id": c.id, "function": {"name": c.name, "arguments": (
                        json.dumps(c.input, ensure_ascii=False) + "".join(marker(f"m{x}") for x in c.marks)
                        if marked and c.marks else c.input)}}
                    for c in m.tool_calls
                ]  # fmt: skip
            if m.role == "tool":
                d["tool_call_id"] = m.tool_call_id
            out.append(d)
        return out

    def render(marked: bool) -> str:
        try:
            text = tokenizer.apply_chat_template(template_messages(marked), tools=tools or None,
                                                 add_generation_prompt=True)  # fmt: skip
        except (ChatTemplateError, ValueError) as err:
            raise APIError(400, f"the chat template rejected the messages: {err}", param="messages") from err
        return text + with_marks(prefill, marked)

    plain = render(False)
    offsets: dict[int, int] = {}  # mark -> character offset in the plain text
    if num_marks:
        marked, clean, pos = render(True), [], 0
        mark_re = re.compile(f"\x00{nonce}m(\\d+)\x00")
        at = 0
        for m in mark_re.finditer(marked):
            clean.append(marked[at : m.start()])
            pos += m.start() - at
            offsets[int(m.group(1))] = pos
            at = m.end()
        clean.append(marked[at:])
        if "".join(clean) != plain:
            offsets = {}  # the template changed around the markers: give up placing them rather than guess
        start = 0
        for i, tool in enumerate(tools):  # tool definitions: find each one's JSON, in order
            needle = json.dumps(tool, ensure_ascii=False)
            found = plain.find(needle, start)
            if found < 0:
                break
            start = found + len(needle)
            for x in tool_marks.get(i, ()):
                offsets[x] = start
    # marks on a replayed answer's text: a token count within the ids we generated (tool calls are rendered text)
    inner: dict[int, dict[int, int]] = {}
    for k in replayed:
        rel = 0
        for p in msgs[k].parts:
            rel += len(p.text)
            for x in p.marks:
                inner.setdefault(k, {})[x] = rel
            rel += 1

    pieces = re.split(f"\x00{nonce}r(\\d+)\x00", plain)
    if len(pieces) != 2 * len(replayed) + 1:  # the template dropped or repeated an answer: plain text for all
        return _render(tokenizer, None, namespace, msgs, tools, tool_marks, prefill, num_marks)
    ids: list[int] = []
    positions: list[int | None] = [None] * num_marks
    pos = 0
    for n, piece in enumerate(pieces):
        if n % 2 == 1:
            k = int(piece)
            content, answer = msgs[k].text, replayed[k]
            for x, rel in inner.get(k, {}).items():
                positions[x] = len(ids) + _replayed_prefix(tokenizer, answer, content, rel)
            ids.extend(answer)
            pos += len(marker(f"r{k}"))
            continue
        piece_ids, ends = _encode_with_offsets(tokenizer, piece)
        for x, off in offsets.items():
            if positions[x] is None and pos <= off <= pos + len(piece):
                positions[x] = len(ids) + _tokens_before(ends, off - pos)
        ids.extend(piece_ids)
        pos += len(piece)
    return ids, positions


def _encode_with_offsets(tokenizer: Tokenizer, text: str) -> tuple[list[int], list[int]]:
    """Token ids of ``text`` (as ``tokenizer.encode(text, add_special_tokens=False)``) and each token's end offset."""
    return tokenizer.encode_with_offsets(text)


def _tokens_before(ends: list[int], offset: int) -> int:
    """How many leading tokens lie wholly before ``offset`` (a token across it belongs to what follows)."""
    n = 0
    for end in ends:
        if end > offset:
            break
        n += 1
    return n


def _replayed_prefix(tokenizer: Tokenizer, ids: tuple[int, ...], content: str, rel: int) -> int:
    """The most leading ids of a replayed answer whose text fits in ``content[:rel]``."""
    if rel >= len(content):
        return len(ids)
    lo, hi = 0, len(ids)
    while lo < hi:  # the longest prefix whose decoded text is not longer than rel characters
        mid = (lo + hi + 1) // 2
        if len(tokenizer.decode(ids[:mid], skip_special_tokens=False)) <= rel:
            lo = mid
        else:
            hi = mid - 1
    while lo and not content.startswith(tokenizer.decode(ids[:lo], skip_special_tokens=False)):
        lo -= 1
    return lo


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


# ---- the router ------------------------------------------------------------------------------------------------
def build_router(service: Service, authenticate: Any) -> APIRouter:
    router = APIRouter()

    def check_model(model: str) -> None:
        if model != service.model_name:
            raise APIError(404, f"model: {model} (this server serves {service.model_name!r})", param="model")

    @router.post("/v1/messages")
    async def messages(request: Request) -> Any:
        tenant = authenticate(request)
        body = MessagesRequest.model_validate(await read_json(request))
        check_model(body.model)
        prompt = build_prompt(service, tenant, body)
        params = SamplingParams(
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=-1 if body.top_k is None else body.top_k,
            max_tokens=body.max_tokens,
            stop=body.stop_sequences,
        )
        service.check(prompt.ids, params)
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

    @router.post("/v1/messages/count_tokens")
    async def count_tokens(request: Request) -> dict[str, Any]:
        tenant = authenticate(request)
        body = CountTokensRequest.model_validate(await read_json(request))
        check_model(body.model)
        return {"input_tokens": len(build_prompt(service, tenant, body).ids)}

    return router


def explain_prompt(service: Service, tenant: Tenant, body: dict[str, Any]) -> tuple[list[int], str | None]:
    """The prompt ids of an Anthropic-shaped body (for POST /v1/cache/explain) and its cache salt."""
    parsed = _PromptBody.model_validate(body)
    return build_prompt(service, tenant, parsed).ids, parsed.cache_salt
