"""What a request's output must match, from each API's fields: OpenAI ``response_format``, tools with ``strict``,
``tool_choice``; Anthropic ``tool_choice`` and ``output_format``; vLLM's ``structured_outputs`` extension.

Tool calls are written the way Hermes/Qwen-style chat templates write them, and the way ``parse_tool_calls`` reads
them back: ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``. A forced call (OpenAI ``required`` or
a named function, Anthropic ``any`` or ``tool``) is a grammar that admits only such calls, with the arguments
constrained by the function's parameter schema. With ``auto`` and ``strict`` tools the model may write text, but once
it opens a ``<tool_call>`` the call must be valid (llguidance's lazy trigger).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from promptcache.api.errors import APIError
from promptcache.engine.structured import COMPACT_JSON, StructuredOutput, closed_schema
from promptcache.tokenizer import Tokenizer

CALL_OPEN, CALL_CLOSE = "<tool_call>\n", "\n</tool_call>"


@dataclass(frozen=True)
class Function:
    """One callable function: its name, its arguments' JSON schema, and whether the client asked for ``strict``."""

    name: str
    parameters: dict[str, Any]
    strict: bool = False


def _call_schema(fn: Function) -> dict[str, Any]:
    """The JSON schema of one call object: the function's name and arguments valid against its parameters."""
    return {
        "type": "object",
        "properties": {"name": {"const": fn.name}, "arguments": closed_schema(fn.parameters or {"type": "object"})},
        "required": ["name", "arguments"],
        "additionalProperties": False,
        "x-guidance": COMPACT_JSON,
    }


def tags_are_tokens(tokenizer: Tokenizer) -> bool:
    """Whether the tokenizer has ``<tool_call>`` and ``</tool_call>`` as tokens of their own (Qwen's vocabularies):
    a grammar must then name them as tokens. NOTE: llguidance's mask admits such a token for the same text in quotes,
    but then refuses it when it is consumed."""
    return all(tokenizer.token_to_id(tag) is not None for tag in (CALL_OPEN.strip(), CALL_CLOSE.strip()))


def forced_calls(functions: list[Function], parallel: bool = True, tag_tokens: bool = False) -> StructuredOutput:
    """A grammar whose only outputs are tool calls of ``functions`` (one, or with ``parallel`` one or more);
    ``tag_tokens``: the tags are tokens of their own (:func:`tags_are_tokens`)."""
    rules = [f"fn_{i}: %json {json.dumps(_call_schema(fn), ensure_ascii=False)}" for i, fn in enumerate(functions)]
    if tag_tokens:
        call = f'call: {CALL_OPEN.strip()} "\\n" args "\\n" {CALL_CLOSE.strip()}'
    else:
        call = f"call: {json.dumps(CALL_OPEN)} args {json.dumps(CALL_CLOSE)}"
    lines = [
        'start: call ("\\n" call)*' if parallel else "start: call",
        call,
        "args: " + " | ".join(f"fn_{i}" for i in range(len(functions))),
        *rules,
    ]
    return StructuredOutput(grammar="\n".join(lines))


def strict_calls_in_text(functions: list[Function], tag_tokens: bool = False) -> StructuredOutput:
    """Free text, in which every ``<tool_call>`` the model opens must be a valid call of one of ``functions``."""
    import llguidance

    schema = {"anyOf": [_call_schema(fn) for fn in functions]} if len(functions) > 1 else _call_schema(functions[0])
    tag = llguidance.StructTag(trigger=CALL_OPEN.strip(), begin=CALL_OPEN, grammar=schema, end=CALL_CLOSE)
    return StructuredOutput(grammar=llguidance.StructTag.to_grammar([tag], assume_special=tag_tokens))


def openai_functions(tools: list[dict[str, Any]] | None, param: str = "tools") -> list[Function]:
    """Chat Completions tools (``{"type": "function", "function": {...}}``) -> functions; 400 if malformed."""
    out = []
    for i, tool in enumerate(tools or []):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise APIError(400, f"{param}[{i}] must be a function tool with a name", param=f"{param}[{i}]")
        out.append(_function(fn, f"{param}[{i}].function"))
    return out


def _function(fn: dict[str, Any], where: str, schema_field: str = "parameters") -> Function:
    params = fn.get(schema_field)
    if params is not None and not isinstance(params, dict):
        raise APIError(400, f"{where}.{schema_field} must be a JSON schema object", param=f"{where}.{schema_field}")
    return Function(fn["name"], params or {"type": "object"}, bool(fn.get("strict")))


def tool_constraint(
    functions: list[Function], choice: Any, parallel: bool = True, param: str = "tool_choice", tag_tokens: bool = False
) -> StructuredOutput | None:
    """The constraint of a tool choice in OpenAI's terms (Anthropic's are mapped to them): ``"required"``, a named
    function (``{"type": "function", "function": {"name": ...}}`` or ``{"type": "function", "name": ...}``),
    ``"auto"`` (constrained only where tools are ``strict``), ``"none"``. ``tag_tokens``: see
    :func:`tags_are_tokens` (``Service.tool_tag_tokens`` holds it for the served model)."""
    if choice in (None, "auto"):
        strict = [f for f in functions if f.strict]
        return strict_calls_in_text(strict, tag_tokens) if strict else None
    if choice == "none":
        return None
    if not functions:
        raise APIError(400, f"{param} is set but no tools are given", param=param)
    if choice == "required":
        return forced_calls(functions, parallel, tag_tokens)
    name = None
    if isinstance(choice, dict) and choice.get("type") == "function":
        inner = choice.get("function")
        name = inner.get("name") if isinstance(inner, dict) else choice.get("name")
    if not isinstance(name, str):
        raise APIError(400, f'{param} must be "none", "auto", "required" or a function to call by name',
                       param=param)  # fmt: skip
    named = [f for f in functions if f.name == name]
    if not named:
        raise APIError(400, f"{param} names the function {name!r}, which is not among the tools", param=param)
    return forced_calls(named, False, tag_tokens)


def response_format_constraint(fmt: Any, param: str = "response_format") -> StructuredOutput | None:
    """Chat Completions ``response_format``: ``text``, ``json_object``, or ``json_schema`` with ``json_schema.schema``
    (enforced whether or not ``strict`` is set: a client that sends a schema wants output that matches it)."""
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutput(json_object=True)
    if kind == "json_schema":
        inner = fmt.get("json_schema")
        schema = inner.get("schema") if isinstance(inner, dict) else None
        return _json_schema(schema, f"{param}.json_schema.schema")
    raise APIError(400, f'{param}.type must be "text", "json_object" or "json_schema", got {kind!r}',
                   param=f"{param}.type")  # fmt: skip


def _json_schema(schema: Any, param: str) -> StructuredOutput:
    if not isinstance(schema, dict):
        raise APIError(400, f"{param} must be a JSON schema object", param=param)
    return StructuredOutput.json(schema)


def vllm_constraint(options: Any, param: str = "structured_outputs") -> StructuredOutput | None:
    """vLLM's extension: ``structured_outputs: {"json" | "regex" | "choice" | "grammar" | "json_object": ...}``."""
    if options is None:
        return None
    if not isinstance(options, dict):
        raise APIError(400, f"{param} must be an object", param=param)
    given = {k: v for k, v in options.items() if k in ("json", "regex", "choice", "grammar", "json_object") and v}
    if len(given) != 1:
        raise APIError(400, f"{param} must set exactly one of json, regex, choice, grammar, json_object",
                       param=param)  # fmt: skip
    (kind, value), = given.items()  # fmt: skip
    try:
        if kind == "json":
            return StructuredOutput.json(value)
        if kind == "choice":
            return StructuredOutput(choice=tuple(value) if isinstance(value, list) else value)
        if kind == "json_object":
            return StructuredOutput(json_object=True)
        if not isinstance(value, str):
            raise ValueError(f"{kind} must be a string")
        return StructuredOutput(**{kind: value})
    except ValueError as err:
        raise APIError(400, f"{param}.{kind}: {err}", param=f"{param}.{kind}") from err


def anthropic_tool_constraint(
    tools: list[dict[str, Any]] | None, choice: dict[str, Any] | None, tag_tokens: bool = False
) -> StructuredOutput | None:
    """Anthropic ``tool_choice`` (``auto`` / ``any`` / ``tool`` / ``none``, with ``disable_parallel_tool_use``) over
    tools with an ``input_schema`` (and optionally ``strict``)."""
    functions = [_function(t, f"tools[{i}]", "input_schema") for i, t in enumerate(tools or [])
                 if isinstance(t, dict) and isinstance(t.get("name"), str)]  # fmt: skip
    choice = choice or {"type": "auto"}
    parallel = not choice.get("disable_parallel_tool_use", False)
    kind = choice.get("type")
    mapped: Any = {"auto": "auto", "any": "required", "none": "none"}.get(kind) if isinstance(kind, str) else None
    if kind == "tool":
        mapped = {"type": "function", "name": choice.get("name")}
    if mapped is None:
        raise APIError(400, f"tool_choice.type must be auto, any, tool or none, got {kind!r}", param="tool_choice")
    return tool_constraint(functions, mapped, parallel, tag_tokens=tag_tokens)


def anthropic_output_format(body: dict[str, Any]) -> StructuredOutput | None:
    """Anthropic's structured outputs: ``output_config.format`` (GA) or ``output_format`` (the beta), each
    ``{"type": "json_schema", "schema": {...}}``."""
    config = body.get("output_config")
    if config is not None and not isinstance(config, dict):
        raise APIError(400, "output_config must be an object", param="output_config")
    fmt, where = (config.get("format"), "output_config.format") if config else (body.get("output_format"),
                                                                              "output_format")  # fmt: skip
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
        raise APIError(400, f'{where}.type must be "json_schema"', param=where)
    return _json_schema(fmt.get("schema"), f"{where}.schema")


def chat_constraint(
    tools: list[dict[str, Any]] | None, tool_choice: Any, parallel: bool | None, response_format: Any,
    structured_outputs: Any, tag_tokens: bool = False,
) -> tuple[StructuredOutput | None, str]:  # fmt: skip
    """A Chat Completions request's constraint and the parameter it comes from: a forced tool choice first, then
    ``response_format``, then vLLM's ``structured_outputs``, then ``strict`` tools under ``auto``."""
    functions = openai_functions(tools)
    forced = tool_choice not in (None, "auto", "none")
    if forced:
        return tool_constraint(functions, tool_choice, parallel is not False, tag_tokens=tag_tokens), "tool_choice"
    if (spec := response_format_constraint(response_format)) is not None:
        return spec, "response_format"
    if (spec := vllm_constraint(structured_outputs)) is not None:
        return spec, "structured_outputs"
    if tool_choice != "none" and (spec := tool_constraint(functions, "auto", tag_tokens=tag_tokens)) is not None:
        return spec, "tools"
    return None, ""
