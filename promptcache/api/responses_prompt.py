"""How a Responses API request (``POST /v1/responses``) becomes prompt ids, for the server and the fleet router alike.

``instructions`` become a system message first (never carried over from the previous response, as OpenAI
documents); ``input`` (a string, or a list of message / ``function_call`` / ``function_call_output`` items) becomes
chat-template messages; flat function tools become the chat-completions tools the template renders.

The point of the server-side state: with ``previous_response_id`` the conversation is the stored one plus the new
input, and when the chat template renders it as the previous turn's text plus a suffix, the prompt is the previous
turn's exact ids (its prompt and the answer the model generated) plus the suffix's ids. The next turn then reads the
whole previous turn from the cache, token for token. When the template renders the earlier turns otherwise (other
instructions or tools, a template that rewrites earlier turns) the prompt is rendered afresh, as chat completions
does (our own answers still replayed with their generated ids).

Torch-free: it imports only the standard library, the API's errors and prompts, the tokenizer and the response
store, so that a fleet router computes prompt ids exactly as a replica does.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from promptcache.api.errors import APIError
from promptcache.api.prompts import PromptRenderer, normalize_messages
from promptcache.api.response_store import StoredResponse
from promptcache.tokenizer import ChatTemplateError, Tokenizer

__all__ = ["ResponsePrompt", "input_items", "response_prompt", "response_tools"]

MESSAGE_ROLES = ("user", "system", "developer", "assistant")
TEXT_PARTS = ("input_text", "output_text", "text")


@dataclass
class ResponsePrompt:
    """A Responses request's prompt and what the stored response keeps of it."""

    ids: list[int]
    messages: list[dict[str, Any]]  # template messages rendered (the system message from instructions first, if any)
    conversation: list[dict[str, Any]]  # the previous conversation + this request's input messages (no system)
    tools: list[dict[str, Any]] | None  # chat-completions-shaped tools passed to the template
    input_items: list[dict[str, Any]]  # this request's input items, normalized
    continued: bool  # True when ids = previous.context_ids + the suffix's ids (the by-construction path)


def response_prompt(
    renderer: PromptRenderer, tenant_name: str, body: dict[str, Any], previous: StoredResponse | None
) -> ResponsePrompt:
    """The prompt of a Responses request body (as sent), continuing ``previous`` (the stored response its
    ``previous_response_id`` names, already looked up for this tenant) if given.

    Raises:
        APIError: 400 for malformed or unsupported ``instructions``, ``input`` or ``tools``, or a chat template
            that rejects the messages.
    """
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise APIError(400, "instructions must be a string", param="instructions")
    tools = response_tools(body.get("tools"))
    items, new_messages = input_items(body.get("input"))
    system = [{"role": "system", "content": instructions}] if instructions else []
    conversation = (list(previous.conversation) if previous is not None else []) + new_messages
    messages = system + conversation
    if previous is not None:
        ids = _continued_ids(renderer.tokenizer, messages, tools, previous.context_ids)
        if ids is not None:
            return ResponsePrompt(ids, messages, conversation, tools, items, True)
    ids = renderer.chat_ids(tenant_name, messages, tools)
    return ResponsePrompt(ids, messages, conversation, tools, items, False)


def _continued_ids(
    tokenizer: Tokenizer, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None, context_ids: list[int]
) -> list[int] | None:
    """``context_ids`` + the ids of the rest of the rendered conversation, when the rendering starts with their
    text; None otherwise.

    NOTE: the previous turn's ids are reused as they are, not re-tokenized: re-tokenizing text may merge tokens
    across the old/new boundary or inside the answer, and every block from there on would miss the cache.
    """
    try:
        text = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True)
    except (ChatTemplateError, ValueError) as err:
        raise APIError(400, f"the chat template rejected the messages: {err}", param="input") from err
    prefix = tokenizer.decode(context_ids, skip_special_tokens=False)
    if not context_ids or not text.startswith(prefix):
        return None
    return list(context_ids) + tokenizer.encode(text[len(prefix) :], add_special_tokens=False)


# ---- tools --------------------------------------------------------------------------------------------------------
def response_tools(tools: Any) -> list[dict[str, Any]] | None:
    """Responses tools (flat: ``{"type": "function", "name", "description", "parameters", "strict"}``) -> the
    chat-completions tools a chat template renders; None for none.

    Raises:
        APIError: 400 for a tool that is not a function tool with a name, or malformed fields.
    """
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise APIError(400, "tools must be a list of function tools", param="tools")
    out = []
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict):
            raise APIError(400, f"{where} must be an object", param=where)
        kind = tool.get("type")
        if kind != "function":
            raise APIError(400, f"{where}: tool type {kind!r} is not supported by this server (only function tools)",
                           param=f"{where}.type")  # fmt: skip
        name, params, description = tool.get("name"), tool.get("parameters"), tool.get("description")
        if not isinstance(name, str) or not name:
            raise APIError(400, f"{where}.name must be a non-empty string", param=f"{where}.name")
        if params is not None and not isinstance(params, dict):
            raise APIError(400, f"{where}.parameters must be a JSON schema object", param=f"{where}.parameters")
        if description is not None and not isinstance(description, str):
            raise APIError(400, f"{where}.description must be a string", param=f"{where}.description")
        if tool.get("strict") is not None and not isinstance(tool["strict"], bool):
            raise APIError(400, f"{where}.strict must be a boolean", param=f"{where}.strict")
        fn: dict[str, Any] = {"name": name}
        if description is not None:
            fn["description"] = description
        if params is not None:
            fn["parameters"] = params
        out.append({"type": "function", "function": fn})
    return out or None


# ---- input --------------------------------------------------------------------------------------------------------
def input_items(value: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A request's ``input`` -> its normalized input items (as GET .../input_items lists them) and the
    chat-template messages they make.

    A string is one user message. In a list: messages (``type`` "message" or absent; role user, system, developer
    or assistant; content a string or text parts), ``function_call`` items (an assistant's tool call: it joins the
    assistant message just before it, as a model writes text then calls) and ``function_call_output`` items (tool
    messages).

    Raises:
        APIError: 400 naming the item (``input[3].content[0]``) that is malformed or of a type this text-only
            server does not support (images, files, reasoning, item references, ...).
    """
    if isinstance(value, str):
        value = [{"type": "message", "role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise APIError(400, "input must be a string or a non-empty list of input items", param="input")
    items: list[dict[str, Any]] = []
    chat: list[dict[str, Any]] = []  # OpenAI chat messages, normalized below
    for i, item in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise APIError(400, f"{where} must be an object", param=where)
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            role, texts, parts = _message(item, where)
            items.append({"type": "message", "id": _id(item, "msg"), "role": role, "status": "completed",
                          "content": parts})  # fmt: skip
            chat.append({"role": role, "content": "".join(texts)})
        elif kind == "function_call":
            call_id, name = _string(item, "call_id", where, True), _string(item, "name", where, True)
            arguments = _string(item, "arguments", where, False)
            items.append({"type": "function_call", "id": _id(item, "fc"), "call_id": call_id, "name": name,
                          "arguments": arguments, "status": "completed"})  # fmt: skip
            call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
            if chat and chat[-1]["role"] == "assistant":
                chat[-1].setdefault("tool_calls", []).append(call)
            else:
                chat.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            call_id = _string(item, "call_id", where, True)
            output = _output_text(item.get("output"), f"{where}.output")
            items.append({"type": "function_call_output", "id": _id(item, "fco"), "call_id": call_id,
                          "output": output, "status": "completed"})  # fmt: skip
            chat.append({"role": "tool", "content": output, "tool_call_id": call_id})
        else:
            raise APIError(400, f"{where}: input item type {kind!r} is not supported by this server (messages, "
                           "function_call and function_call_output items only)", param=where)  # fmt: skip
    return items, normalize_messages(chat)


def _message(item: dict[str, Any], where: str) -> tuple[str, list[str], list[dict[str, Any]]]:
    """A message item's role, its texts, and its content as normalized parts."""
    role = item.get("role")
    if role not in MESSAGE_ROLES:
        raise APIError(400, f"{where}.role must be one of {', '.join(MESSAGE_ROLES)}; got {role!r}",
                       param=f"{where}.role")  # fmt: skip
    content = item.get("content")
    if isinstance(content, str):
        texts = [content]
    elif isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            at = f"{where}.content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in TEXT_PARTS:
                raise APIError(400, f"{at}: content type {kind!r} is not supported by this server (text-only "
                               f"model: {', '.join(TEXT_PARTS)} parts)", param=at)  # fmt: skip
            if not isinstance(part.get("text"), str):
                raise APIError(400, f"{at}.text must be a string", param=f"{at}.text")
            texts.append(part["text"])
    else:
        raise APIError(400, f"{where}.content must be a string or a list of text parts", param=f"{where}.content")
    if role == "assistant":
        parts = [{"type": "output_text", "text": t, "annotations": []} for t in texts]
    else:
        parts = [{"type": "input_text", "text": t} for t in texts]
    return role, texts, parts


def _string(item: dict[str, Any], field: str, where: str, non_empty: bool) -> str:
    value = item.get(field)
    if not isinstance(value, str) or (non_empty and not value):
        raise APIError(400, f"{where}.{field} must be a {'non-empty ' if non_empty else ''}string",
                       param=f"{where}.{field}")  # fmt: skip
    return value


def _output_text(output: Any, where: str) -> str:
    """A function_call_output's output: a string, or text parts (joined)."""
    if isinstance(output, str):
        return output
    if isinstance(output, list):
        texts = []
        for j, part in enumerate(output):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in TEXT_PARTS or not isinstance(part.get("text"), str):
                raise APIError(400, f"{where}[{j}]: only text parts are supported by this server, got {kind!r}",
                               param=f"{where}[{j}]")  # fmt: skip
            texts.append(part["text"])
        return "".join(texts)
    raise APIError(400, f"{where} must be a string or a list of text parts", param=where)


def _id(item: dict[str, Any], prefix: str) -> str:
    """The item's own id (a client may send back items it got from us), else a new one."""
    given = item.get("id")
    return given if isinstance(given, str) and given else f"{prefix}_{uuid.uuid4().hex}"
