"""How a request body becomes prompt ids, for the server and the fleet router alike.

A fleet router must compute the same KV block addresses as a replica, so it must render and tokenize a request
exactly as the replica does: the same chat template, the same token-exact replay splicing of our own earlier
answers, the same Anthropic ``cache_control`` breakpoints. All of that lives here, behind :class:`PromptRenderer`,
and this module imports no engine and no torch (only the standard library, pydantic, the API's errors, the
tokenizer and the replay store), so a router can import it cheaply.

Anthropic breakpoints are found without touching the prompt's tokens: the conversation is rendered once plainly and
once with a unique marker after each marked block; the marked text minus its markers must equal the plain text, and
each marker's character offset is mapped to a token count through the tokenizer's offsets of the plain text. So the
prompt ids are the same with and without ``cache_control`` (and the same as the OpenAI API's for the same chat).
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from promptcache.api.errors import APIError
from promptcache.replay import ReplayStore, render_chat_ids
from promptcache.tokenizer import ChatTemplateError, Tokenizer

__all__ = [
    "CACHE_TTLS",
    "MAX_BREAKPOINTS",
    "SKIPPED_BLOCKS",
    "UNSUPPORTED_BLOCKS",
    "AnthropicPromptBody",
    "Prompt",
    "PromptRenderer",
    "looks_anthropic",
    "normalize_messages",
]

MAX_BREAKPOINTS = 4
CACHE_TTLS = ("5m", "1h")
UNSUPPORTED_BLOCKS = ("image", "document", "search_result", "container_upload")
SKIPPED_BLOCKS = ("thinking", "redacted_thinking")  # earlier turns' reasoning is not part of the prompt


# ---- OpenAI: messages -> template messages ------------------------------------------------------------------------
def normalize_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI messages -> what chat templates expect: text content, tool calls with parsed arguments."""
    out = []
    for i, msg in enumerate(messages):
        role = msg.get("role")
        if role not in ("system", "developer", "user", "assistant", "tool"):
            raise APIError(400, f"messages[{i}].role must be system, user, assistant or tool; got {role!r}",
                           param=f"messages[{i}].role")  # fmt: skip
        content = msg.get("content")
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") not in ("text", "input_text"):
                    raise APIError(400, f"messages[{i}].content[{j}]: only text parts are supported",
                                   param=f"messages[{i}].content")  # fmt: skip
                parts.append(str(part.get("text", "")))
            content = "".join(parts)
        elif content is not None and not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string or a list of parts", param="messages")
        norm: dict[str, Any] = {"role": "system" if role == "developer" else role, "content": content or ""}
        if role == "assistant" and msg.get("tool_calls"):
            _check_tool_calls(msg["tool_calls"], i)
            norm["tool_calls"] = [
                {"type": "function", "id": c.get("id"), "function": {
                    "name": c.get("function", {}).get("name"),
                    "arguments": _parse_args(c.get("function", {}).get("arguments"))}}
                for c in msg["tool_calls"]
            ]  # fmt: skip
        if role == "tool":
            norm["tool_call_id"] = msg.get("tool_call_id")
        out.append(norm)
    return out


def _check_tool_calls(calls: Any, i: int) -> None:
    """Each tool call of an assistant message is an object with a ``function`` object that names the function."""
    where = f"messages[{i}].tool_calls"
    if not isinstance(calls, list):
        raise APIError(400, f"{where} must be a list of tool calls", param=where)
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise APIError(400, f"{where}[{j}] must be an object with a function object that has a name",
                           param=where)  # fmt: skip


def _parse_args(args: Any) -> Any:
    if isinstance(args, str):
        try:
            return json.loads(args)
        except json.JSONDecodeError:
            return args
    return args


# ---- Anthropic: the request body ----------------------------------------------------------------------------------
class AnthropicPromptBody(BaseModel):
    """What shapes the prompt of an Anthropic request (all of /v1/cache/explain needs)."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str | None = None
    messages: list[dict[str, Any]] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    cache_control: dict[str, Any] | None = None
    cache_salt: str | None = None  # our extension: a further cache partition inside the tenant


# ---- Anthropic: messages -> template messages with marked blocks --------------------------------------------------
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


# ---- rendering with breakpoint markers ----------------------------------------------------------------------------
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
    # One lookup_many for every answer: a store shared through Redis answers a whole conversation in one round trip.
    # ``is not None``, not truthiness: an empty local store may still find records in Redis.
    asked = [k for k, m in enumerate(msgs) if m.role == "assistant"] if store is not None else []
    if store is not None and asked:
        for k, ids in zip(asked, store.lookup_many(namespace, [msgs[k].text for k in asked])):
            if ids is not None:
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


# ---- the renderer -------------------------------------------------------------------------------------------------
class PromptRenderer:
    """Request bodies -> prompt ids, exactly as a server replica makes them.

    Holds a tokenizer and (optionally) the replay store of our own earlier answers, keyed by tenant name; without a
    store, nothing is spliced and every answer is re-tokenized from its text. Stateless otherwise, so one renderer
    may be shared between threads (the tokenizer and the store are thread-safe).
    """

    def __init__(self, tokenizer: Tokenizer, replay: ReplayStore | None = None) -> None:
        self.tokenizer = tokenizer
        self.replay = replay

    # ---- OpenAI ---------------------------------------------------------------------------------------------
    def chat_ids(
        self, tenant_name: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
    ) -> list[int]:  # fmt: skip
        """Render a conversation (template messages) with the chat template; our own earlier answers keep their
        generated ids.

        Raises:
            APIError: 400 when the chat template rejects the messages.
        """
        try:
            return render_chat_ids(self.tokenizer, messages, self.replay, tenant_name, tools, add_generation_prompt)
        except ChatTemplateError as err:
            raise APIError(400, f"the chat template rejected the messages: {err}", param="messages") from err

    def openai_chat_ids(self, tenant_name: str, body: dict[str, Any]) -> list[int]:
        """The prompt ids of an OpenAI chat body (``messages`` and ``tools``, as /v1/chat/completions renders them).

        Raises:
            APIError: 400 when ``messages`` is missing, not a list or empty, a message is malformed, or the chat
                template rejects the messages.
        """
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise APIError(400, "messages must be a non-empty list of messages", param="messages")
        return self.chat_ids(tenant_name, normalize_messages(messages), body.get("tools"))

    def text_ids(self, text: str) -> list[int]:
        """The ids of a completion prompt's text (with the tokenizer's special tokens, e.g. a BOS)."""
        return self.tokenizer.encode(text)

    def completion_prompts(self, prompt: Any) -> list[list[int]]:
        """A /v1/completions ``prompt`` (a string, a list of strings, token ids, or a list of token-id lists) ->
        one id list per prompt.

        Raises:
            APIError: 400 when ``prompt`` is none of those.
        """
        if isinstance(prompt, str):
            return [self.text_ids(prompt)]
        if prompt and all(isinstance(p, int) for p in prompt):
            return [list(prompt)]
        if prompt and all(isinstance(p, str) for p in prompt):
            return [self.text_ids(p) for p in prompt]
        if prompt and all(isinstance(p, list) for p in prompt):
            return [list(p) for p in prompt]
        raise APIError(400, "prompt must be a string, a list of strings, or token ids", param="prompt")

    # ---- Anthropic ------------------------------------------------------------------------------------------
    def anthropic(self, tenant_name: str, body: AnthropicPromptBody) -> Prompt:
        """The prompt ids of an Anthropic request and where its cache breakpoints fall in them.

        Raises:
            APIError: 400 for a malformed or unsupported block, a bad ``cache_control``, too many breakpoints, or
                a chat template that rejects the messages.
        """
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
        ids, positions = _render(self.tokenizer, self.replay, tenant_name, msgs, tools, tool_marks, prefill,
                                 len(marks.ttls))  # fmt: skip
        breakpoints = [(pos, marks.ttls[i]) for i, pos in enumerate(positions) if pos]
        return Prompt(ids, breakpoints, parse_tools)

    # ---- /v1/cache/explain ------------------------------------------------------------------------------------
    def explain_ids(self, api: str, tenant_name: str, body: dict[str, Any]) -> tuple[list[int], str | None]:
        """The prompt ids and ``cache_salt`` of a /v1/cache/explain body shaped like ``api``'s requests.

        ``"openai"``: a ``prompt`` (text, or token ids as for completions) or else chat ``messages`` (and
        ``tools``); ``"anthropic"``: a Messages body (``system``, ``messages``, ``tools``, ``cache_control``).

        Raises:
            APIError: 400 for an unknown ``api`` or a body that gives no prompt.
            pydantic.ValidationError: an Anthropic body that does not validate.
        """
        builders: dict[str, Callable[[str, dict[str, Any]], tuple[list[int], str | None]]] = {
            "openai": self._explain_openai, "anthropic": self._explain_anthropic,
        }  # fmt: skip
        if api not in builders:
            raise APIError(400, f"api must be one of {', '.join(builders)}")
        return builders[api](tenant_name, body)

    def _explain_openai(self, tenant_name: str, body: dict[str, Any]) -> tuple[list[int], str | None]:
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            return self.text_ids(prompt), body.get("cache_salt")
        if isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):  # token ids, as completions
            return prompt, body.get("cache_salt")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise APIError(400, "explain needs a request body with 'messages' (or a 'prompt': text or token ids)")
        return self.openai_chat_ids(tenant_name, body), body.get("cache_salt")

    def _explain_anthropic(self, tenant_name: str, body: dict[str, Any]) -> tuple[list[int], str | None]:
        parsed = AnthropicPromptBody.model_validate(body)
        return self.anthropic(tenant_name, parsed).ids, parsed.cache_salt


def looks_anthropic(body: dict[str, Any]) -> bool:
    """Anthropic bodies: cache_control anywhere, tools with an input_schema, or tool_use / tool_result blocks."""
    if "cache_control" in body:
        return True
    if any(isinstance(t, dict) and "input_schema" in t for t in body.get("tools") or []):
        return True
    for msg in body.get("messages", []):
        content = msg.get("content") if isinstance(msg, dict) else None
        for b in content if isinstance(content, list) else []:
            if isinstance(b, dict) and ("cache_control" in b or b.get("type") in ("tool_use", "tool_result")):
                return True
    return False
