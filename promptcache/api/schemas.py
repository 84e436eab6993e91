"""The API's request and response models, and the OpenAPI document built from them (torch-free: routers use it).

Request bodies are validated with the request models here; the endpoints read the raw body themselves (the error
must come in the format of the API called, and the response cache keys on the body as sent), so FastAPI does not
see them. ``document`` puts them back into ``/openapi.json``: every operation gets its request body, its response
(JSON, or an event stream) and its errors in its API's own format, for client generators and fuzzers.

Messages are validated by ``promptcache.api.prompts`` (it gives errors that name the message and block at fault);
the message models below document exactly what it accepts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, ConfigDict, Field

from promptcache.api.prompts import AnthropicPromptBody

RETENTION_SECONDS = {"in_memory": 0.0, "24h": 86400.0}
REF = "#/components/schemas/{model}"


class _Open(BaseModel):
    """Extra fields are accepted (clients send fields we do not use) and kept. Strict: ``true`` is no integer and
    ``"1"`` no number (an int is still a float)."""

    model_config = ConfigDict(extra="allow", strict=True)


# ---- OpenAI: what messages look like -----------------------------------------------------------------------------
class TextPart(_Open):
    type: Literal["text", "input_text"]
    text: str


class FunctionCall(_Open):
    name: str
    arguments: str | dict[str, Any] = Field(description="JSON text of the arguments (an object is accepted too)")


class ToolCall(_Open):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Open):
    """One message. ``developer`` is read as ``system``; only text content is supported."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(default=None, description="assistant messages: the calls it made")
    tool_call_id: str | None = Field(default=None, description="tool messages: the call this answers")


class FunctionDefinition(_Open):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class ToolDefinition(_Open):
    type: Literal["function"] = "function"
    function: FunctionDefinition


# ---- OpenAI: request bodies --------------------------------------------------------------------------------------
class OpenAIBody(_Open):
    model: str
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    user: str | None = None
    prompt_cache_key: str | None = None
    # "24h" keeps the prompt's blocks in the lower tiers (disk, Redis) for a day; "in_memory" is the default.
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None
    cache_salt: str | None = Field(default=None, description="ours: a further cache partition inside the tenant")
    ignore_eos: bool = False
    structured_outputs: dict[str, Any] | None = Field(default=None, description=(
        "vLLM's extension: exactly one of json (a schema), regex, choice (a list), grammar (Lark), json_object"))

    @property
    def retention_seconds(self) -> float:
        return RETENTION_SECONDS.get(self.prompt_cache_retention or "in_memory", 0.0)


class ChatCompletionRequest(OpenAIBody):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = Field(default=None, description=(
        'text, json_object, or json_schema ({"json_schema": {"name", "schema", "strict"}}): the output is constrained '
        "to the schema (grammar-masked decoding)"))


class CompletionRequest(OpenAIBody):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False


class _ChatCompletionRequestDoc(ChatCompletionRequest):
    """The documented form: messages and tools as ``prompts.normalize_messages`` reads them."""

    model_config = ConfigDict(title="ChatCompletionRequest")
    messages: list[ChatMessage] = Field(min_length=1)  # type: ignore[assignment]
    tools: list[ToolDefinition] | None = None  # type: ignore[assignment]


# ---- Anthropic: what messages look like --------------------------------------------------------------------------
class CacheControl(_Open):
    type: Literal["ephemeral"]
    ttl: Literal["5m", "1h"] | None = None


class TextBlock(_Open):
    type: Literal["text"]
    text: str
    cache_control: CacheControl | None = None


class ToolUseBlock(_Open):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any]
    cache_control: CacheControl | None = None


class ToolResultBlock(_Open):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | list[TextBlock] | None = None
    is_error: bool | None = None
    cache_control: CacheControl | None = None


class MessageParam(_Open):
    role: Literal["user", "assistant"]
    content: str | list[TextBlock | ToolUseBlock | ToolResultBlock]


class AnthropicTool(_Open):
    name: str
    description: str | None = None
    input_schema: dict[str, Any]
    cache_control: CacheControl | None = None


# ---- Anthropic: request bodies -----------------------------------------------------------------------------------
class CountTokensRequest(AnthropicPromptBody):
    model: str


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=1.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=1)
    stop_sequences: list[str] | None = None
    stream: bool = False
    metadata: dict[str, Any] | None = None


class _AnthropicDoc(BaseModel):
    """Documented forms of the Anthropic fields that ``prompts`` validates itself."""

    messages: list[MessageParam] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[AnthropicTool] | None = None
    cache_control: CacheControl | None = None


class _CountTokensRequestDoc(_AnthropicDoc, CountTokensRequest):
    model_config = ConfigDict(title="CountTokensRequest")


class _MessagesRequestDoc(_AnthropicDoc, MessagesRequest):
    model_config = ConfigDict(title="MessagesRequest")


# ---- OpenAI Responses: what input, tools and text formats look like ----------------------------------------------
class InputTextPart(_Open):
    type: Literal["input_text", "output_text", "text"]
    text: str


class InputMessage(_Open):
    """A message item (``type`` may be left out). ``developer`` is read as ``system``; only text content."""

    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[InputTextPart]


class FunctionCallItem(_Open):
    """A call the model made earlier (it joins the assistant message just before it)."""

    type: Literal["function_call"]
    call_id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    arguments: str = Field(description="JSON text of the arguments")


class FunctionCallOutputItem(_Open):
    """The result of a function call, for the model to read."""

    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1)
    output: str | list[InputTextPart]


class FunctionTool(_Open):
    """A function the model may call (only function tools are supported). ``strict`` defaults to true, as OpenAI's:
    a call the model opens must then match ``parameters``."""

    type: Literal["function"]
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolChoiceFunction(_Open):
    type: Literal["function"]
    name: str


class TextFormatText(_Open):
    type: Literal["text"]


class TextFormatJSONObject(_Open):
    type: Literal["json_object"]


class TextFormatJSONSchema(_Open):
    """The output must match ``schema`` (enforced by grammar-masked decoding whether or not ``strict`` is set)."""

    model_config = ConfigDict(populate_by_name=True)

    type: Literal["json_schema"]
    name: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    description: str | None = None
    strict: bool | None = None


TextFormat = Annotated[TextFormatText | TextFormatJSONObject | TextFormatJSONSchema, Field(discriminator="type")]


class TextConfig(_Open):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class ResponsesRequest(_Open):
    """``POST /v1/responses``. ``input``, ``tools`` and ``tool_choice`` are checked by
    ``promptcache.api.responses_prompt`` and the endpoint (errors that name the item at fault)."""

    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    previous_response_id: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    store: bool | None = Field(default=None, description="false: not stored (default true)")
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = Field(default=None, description="accepted and echoed")
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None
    cache_salt: str | None = Field(default=None, description="ours: a further cache partition inside the tenant")
    truncation: Literal["auto", "disabled"] | None = None
    background: bool | None = Field(default=None, description="not supported: true is refused")
    conversation: str | dict[str, Any] | None = Field(default=None, description="not supported: refused")

    @property
    def retention_seconds(self) -> float:
        return RETENTION_SECONDS.get(self.prompt_cache_retention or "in_memory", 0.0)


class _ResponsesRequestDoc(ResponsesRequest):
    """The documented form: input items and tools as ``responses_prompt`` reads them."""

    model_config = ConfigDict(title="ResponsesRequest")
    input: str | list[InputMessage | FunctionCallItem | FunctionCallOutputItem] = Field(  # type: ignore[assignment]
        min_length=1, description="a string (one user message) or input items"
    )
    tools: list[FunctionTool] | None = None  # type: ignore[assignment]
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceFunction | None = None  # type: ignore[assignment]


class ExplainRequest(_Open):
    """Either API's body (chat ``messages``, a completion ``prompt``, or an Anthropic body); nothing is run."""

    model_config = ConfigDict(strict=True)

    # A string here; ``PromptRenderer.explain_ids`` refuses other values (as a router's renderer does, alike).
    api: str | None = Field(default=None, description="default: told by the body's shape",
                            json_schema_extra={"enum": ["openai", "anthropic", None]})  # fmt: skip
    addresses: bool = Field(default=False, description="also return the block addresses looked up")
    cache_salt: str | None = None


class ResetRequest(BaseModel):
    model_config = ConfigDict(strict=True)

    tiers: bool = Field(default=False, description="also the local tiers' entries (host, disk)")
    shared: bool = Field(default=False, description="also this model's entries in Redis, which every replica reads")


# ---- responses ---------------------------------------------------------------------------------------------------
class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIError(BaseModel):
    error: OpenAIErrorDetail


class AnthropicErrorDetail(BaseModel):
    type: str
    message: str


class AnthropicError(BaseModel):
    type: Literal["error"]
    error: AnthropicErrorDetail


class Cost(_Open):
    """What the request cost, in USD, by component (uncached input, cached input, cache writes, output)."""

    total: float
    currency: Literal["USD"]


class PromptTokensDetails(_Open):
    cached_tokens: int


class Usage(_Open):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails
    cost: Cost
    cached_tokens_by_tier: dict[str, int] = Field(description="ours: cached_tokens by the tier they were read from")


class AssistantMessage(_Open):
    role: Literal["assistant"]
    content: str | None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(_Open):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: dict[str, Any] | None


class ChatCompletion(_Open):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class CompletionChoice(_Open):
    index: int
    text: str
    finish_reason: str | None
    logprobs: dict[str, Any] | None


class Completion(_Open):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class ModelCard(_Open):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class AnthropicUsage(_Open):
    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int
    cache_read_input_tokens: int


class Message(_Open):
    id: str
    type: Literal["message"]
    role: Literal["assistant"]
    model: str
    content: list[TextBlock | ToolUseBlock]
    stop_reason: str | None
    stop_sequence: str | None
    usage: AnthropicUsage


class TokenCount(BaseModel):
    input_tokens: int


class Explanation(_Open):
    api: str
    prompt_tokens: int
    cached_tokens: int


class Integrity(_Open):
    ok: bool


class ResetResult(_Open):
    reset: bool


class Health(_Open):
    status: str


class CacheStats(_Open):
    """The cache's counters: the device pool's blocks and hits, each tier's entries and traffic."""


class FleetState(_Open):
    """A replica's fleet facts (info, tokenizer, snapshot), or a router's view of its replicas."""


class OutputText(_Open):
    type: Literal["output_text"]
    text: str
    annotations: list[Any]


class OutputMessage(_Open):
    type: Literal["message"]
    id: str
    role: Literal["assistant"]
    status: Literal["in_progress", "completed", "incomplete"]
    content: list[OutputText]


class OutputFunctionCall(_Open):
    type: Literal["function_call"]
    id: str
    call_id: str
    name: str
    arguments: str
    status: Literal["in_progress", "completed", "incomplete"]


class ResponseUsage(_Open):
    input_tokens: int
    input_tokens_details: PromptTokensDetails
    output_tokens: int
    output_tokens_details: dict[str, int]
    total_tokens: int
    cost: Cost
    cached_tokens_by_tier: dict[str, int] = Field(description="ours: cached_tokens by the tier they were read from")


class ResponseObject(_Open):
    """A response (OpenAI Responses API), as created, retrieved, and in the stream's lifecycle events."""

    model_config = ConfigDict(title="Response")

    id: str
    object: Literal["response"]
    created_at: int
    status: Literal["completed", "incomplete", "in_progress"]
    model: str
    output: list[OutputMessage | OutputFunctionCall]
    usage: ResponseUsage | None
    previous_response_id: str | None
    incomplete_details: dict[str, Any] | None


class ResponseDeleted(_Open):
    id: str
    object: Literal["response.deleted"]
    deleted: bool


class InputItemList(_Open):
    object: Literal["list"]
    data: list[dict[str, Any]]
    first_id: str | None
    last_id: str | None
    has_more: bool


# ---- the document ------------------------------------------------------------------------------------------------
def _errors(anthropic: bool, *statuses: int) -> dict[int | str, dict[str, Any]]:
    model = AnthropicError if anthropic else OpenAIError
    return {s: {"model": model} for s in statuses}


RUN_ERRORS = (400, 401, 404, 408, 413, 429, 503)
READ_ERRORS = (401, 408, 413)
ADMIN_ERRORS = (401, 403, 408, 413)
# With "stream": true, server-sent events: each event's data is one JSON chunk (OpenAI's end with "[DONE]").
STREAM = {"text/event-stream": {"schema": {"type": "object", "required": ["data"], "properties": {
    "event": {"type": "string"}, "data": {"type": "string", "description": "a JSON chunk, or [DONE]"}}}}}

# path -> (request body model or None, the route's documentation: responses, summary)
OPERATIONS: dict[tuple[str, str], tuple[type[BaseModel] | None, dict[str, Any]]] = {
    ("POST", "/v1/chat/completions"): (_ChatCompletionRequestDoc, {
        "summary": "Create a chat completion (OpenAI)",
        "responses": {200: {"model": ChatCompletion, "content": STREAM}, **_errors(False, *RUN_ERRORS)}}),
    ("POST", "/v1/completions"): (CompletionRequest, {
        "summary": "Create a completion (OpenAI)",
        "responses": {200: {"model": Completion, "content": STREAM}, **_errors(False, *RUN_ERRORS)}}),
    ("GET", "/v1/models"): (None, {
        "summary": "List the served model", "responses": {200: {"model": ModelList}, **_errors(False, 401)}}),
    ("POST", "/v1/messages"): (_MessagesRequestDoc, {
        "summary": "Create a message (Anthropic)",
        "responses": {200: {"model": Message, "content": STREAM}, **_errors(True, *RUN_ERRORS)}}),
    ("POST", "/v1/messages/count_tokens"): (_CountTokensRequestDoc, {
        "summary": "Count a message's input tokens (Anthropic)",
        "responses": {200: {"model": TokenCount}, **_errors(True, 400, 401, 404, 408, 413, 503)}}),
    ("POST", "/v1/cache/explain"): (ExplainRequest, {
        "summary": "Explain which of a prompt's tokens are cached, and where",
        "responses": {200: {"model": Explanation}, **_errors(False, 400, *READ_ERRORS, 503)}}),
    ("POST", "/v1/cache/reset"): (ResetRequest, {
        "summary": "Admin: forget cached blocks", "responses": {200: {"model": ResetResult},
                                                                **_errors(False, 400, *ADMIN_ERRORS)}}),
    ("GET", "/v1/cache/integrity"): (None, {
        "summary": "Admin: check the cache's invariants", "responses": {200: {"model": Integrity},
                                                                        **_errors(False, *ADMIN_ERRORS)}}),
    ("GET", "/v1/cache/stats"): (None, {
        "summary": "Admin: cache statistics", "responses": {200: {"model": CacheStats},
                                                            **_errors(False, *ADMIN_ERRORS)}}),
    ("GET", "/health"): (None, {"summary": "Liveness", "responses": {200: {"model": Health},
                                                                     503: {"model": Health}}}),
    ("GET", "/metrics"): (None, {"summary": "Prometheus metrics",
                                 "responses": {200: {"content": {"text/plain": {"schema": {"type": "string"}}}}}}),
}  # fmt: skip
for _path, _summary in (("/v1/fleet/info", "Fleet: this replica's model, tokenizer digest and KV key prefix"),
                        ("/v1/fleet/tokenizer", "Fleet: this replica's exact tokenizer"),
                        ("/v1/fleet/snapshot", "Fleet: the block addresses each cache holds, with their event number"),
                        ("/v1/fleet", "Router: its replicas, their health and load")):  # fmt: skip
    OPERATIONS[("GET", _path)] = (None, {"summary": _summary, "responses": {
        200: {"model": FleetState}, **_errors(False, *ADMIN_ERRORS, 404)}})  # fmt: skip
OPERATIONS.update({
    ("POST", "/v1/responses"): (_ResponsesRequestDoc, {
        "summary": "Create a response (OpenAI Responses API; stored for previous_response_id unless store is false)",
        "responses": {200: {"model": ResponseObject, "content": STREAM}, **_errors(False, *RUN_ERRORS)}}),
    ("GET", "/v1/responses/{response_id}"): (None, {
        "summary": "Retrieve a stored response",
        "responses": {200: {"model": ResponseObject}, **_errors(False, *READ_ERRORS, 404)}}),
    ("DELETE", "/v1/responses/{response_id}"): (None, {
        "summary": "Delete a stored response",
        "responses": {200: {"model": ResponseDeleted}, **_errors(False, *READ_ERRORS, 404)}}),
    ("GET", "/v1/responses/{response_id}/input_items"): (None, {
        "summary": "List a stored response's input items",
        "responses": {200: {"model": InputItemList}, **_errors(False, 400, *READ_ERRORS, 404)}}),
})  # fmt: skip
SECURITY = {
    "bearer": {"type": "http", "scheme": "bearer", "description": "an API key, as OpenAI clients send it"},
    "x-api-key": {"type": "apiKey", "in": "header", "name": "x-api-key", "description": "an API key, Anthropic's way"},
}


def route_doc(method: str, path: str) -> dict[str, Any]:
    """Keyword arguments for the route of ``method path``: its summary and documented responses."""
    return OPERATIONS[(method, path)][1]


def document(app: FastAPI, version: str, extra_bodies: Mapping[tuple[str, str], type[BaseModel]] | None = None) -> None:
    """Make ``app.openapi()`` describe the request body of every operation in ``OPERATIONS`` it serves (and of
    ``extra_bodies``), with the models' definitions as shared components."""
    bodies = {op: model for op, (model, _) in OPERATIONS.items() if model is not None} | dict(extra_bodies or {})

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = get_openapi(title=app.title, version=version, routes=app.routes,
                               description=(app.description or None))  # fmt: skip
            spec.setdefault("components", {})["securitySchemes"] = SECURITY
            # Keys are optional: a server with none configured serves everyone as its one local tenant.
            spec["security"] = [{"bearer": []}, {"x-api-key": []}, {}]
            components = spec["components"].setdefault("schemas", {})
            for (method, path), model in bodies.items():
                operation = spec.get("paths", {}).get(path, {}).get(method.lower())
                if operation is None:
                    continue
                schema = model.model_json_schema(ref_template=REF)
                components.update(schema.pop("$defs", {}))
                name = schema.get("title", model.__name__)
                components[name] = schema
                operation["requestBody"] = {
                    "required": method == "POST" and path != "/v1/cache/reset",
                    "content": {"application/json": {"schema": {"$ref": REF.format(model=name)}}},
                }
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

