"""Hostile input, generated: schemathesis fuzzes every operation of the OpenAPI document (bodies that fit the schema,
and bodies that break it), and hand-written hypothesis strategies fuzz the chat and messages bodies where the schema
stays loose (conversations, tool calls, cache breakpoints, stop strings, odd unicode). Against a real server on
loopback, and a real router in front of a replica sharing a real redis-server.

Every answer must be a success or a 4xx in the API's own error format (never a 5xx), match the document, and leave
the server up; afterwards no KV block is in use and every integrity check passes (deep: every stored entry too).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any

import httpx
import pytest
import schemathesis
from conftest import LiveServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis_servers import RedisServer
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from promptcache.api.schemas import AnthropicError, OpenAIError

MODEL = "promptcache-default"
MAX_TOKENS = 6  # the servers' --max-tokens-limit: every generated request stays cheap
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
SETTINGS = settings(deadline=None, database=None, suppress_health_check=list(HealthCheck), derandomize=True)
CASES: Counter[str] = Counter()  # cases run, by fuzzer (the count goes into docs/reliability.md)


def error_format(path: str, response: httpx.Response | Any) -> None:
    """A 4xx body is in the format of the API called: Anthropic's for /v1/messages*, OpenAI's otherwise."""
    if response.status_code < 400:
        return
    body = response.json()
    model = AnthropicError if path.startswith("/v1/messages") else OpenAIError
    model.model_validate(body)  # raises, naming the field, when the format is wrong
    message = body["error"]["message"]
    assert message and "Traceback" not in message, body


def drained(server: LiveServer) -> None:
    """No request left running, no block left in use, every invariant of the pool and tiers holds."""
    deadline = time.monotonic() + 20
    while server.engine.num_waiting_or_running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.engine.num_waiting_or_running == 0
    assert server.core.kv.pool.num_in_use == 0, "blocks leaked"
    report = httpx.get(f"{server.url}/v1/cache/integrity?deep=1", timeout=30).json()
    assert report["ok"], report["problems"]


def fuzz_schema(url: str, mode: GenerationMode, examples: int, name: str) -> None:
    """Run ``examples`` cases of schemathesis in ``mode`` over every operation of ``url``'s document."""
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    checks = [*CHECKS, negative_data_rejection] if mode is GenerationMode.NEGATIVE else CHECKS
    strategy = schema.as_strategy(generation_mode=mode)
    seen: set[str] = set()

    @settings(SETTINGS, max_examples=examples)
    @given(case=strategy)
    def run(case: schemathesis.Case) -> None:
        CASES[name] += 1
        seen.add(f"{case.method} {case.path}")
        if mode is GenerationMode.POSITIVE and isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = MODEL  # a valid body names the served model, or it never reaches the engine
        response = case.call(base_url=url, timeout=30)
        statuses[response.status_code] += 1
        case.validate_response(response, checks=checks)
        error_format(case.path, response)

    statuses: Counter[int] = Counter()
    run()
    if mode is GenerationMode.POSITIVE:
        assert statuses[200] >= examples // 5, f"too few valid bodies were served: {statuses}"
    # Negative cases break a body, so only the operations that take one get them.
    assert len(seen) >= (6 if mode is GenerationMode.NEGATIVE else 11), f"only {sorted(seen)} were fuzzed"


# ---- hand-written strategies for the loose parts --------------------------------------------------------------
text = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=40) | st.sampled_from(
    ["", " ", "\x00", "<tool_call>", "</tool_call>", "<|im_end|>", "{{ raise }}", "\u202e", "🙂" * 8, "\n" * 5])
cache_control = st.none() | st.fixed_dictionaries(
    {"type": st.sampled_from(["ephemeral", "persistent"])}, optional={"ttl": st.sampled_from(["5m", "1h", "2h", 3])})
tool_call = st.fixed_dictionaries({
    "id": st.text(max_size=8), "type": st.just("function"),
    "function": st.fixed_dictionaries({"name": text, "arguments": text | st.just('{"a": 1}') | st.just("{")})})
openai_message = st.one_of(
    st.fixed_dictionaries({"role": st.sampled_from(["system", "developer", "user", "assistant"]),
                           "content": text | st.lists(st.fixed_dictionaries(
                               {"type": st.sampled_from(["text", "input_text", "image_url"]), "text": text}),
                               max_size=3) | st.none()}),
    st.fixed_dictionaries({"role": st.just("assistant"), "content": st.none() | text,
                           "tool_calls": st.lists(tool_call | text | st.just({"function": "f"}), max_size=2)}),
    st.fixed_dictionaries({"role": st.just("tool"), "content": text, "tool_call_id": st.text(max_size=8)}),
    st.dictionaries(st.sampled_from(["role", "content", "name"]), text | st.integers() | st.none(), max_size=3),
)  # fmt: skip
function_tool = st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries(
    {"name": text}, optional={"description": text, "parameters": st.just({"type": "object", "properties": {}})})})
chat_body = st.fixed_dictionaries(
    {"model": st.just(MODEL), "messages": st.lists(openai_message, min_size=1, max_size=6)},
    optional={
        "max_tokens": st.integers(-1, MAX_TOKENS + 2), "temperature": st.sampled_from([0.0, 0.7, 2.0, 2.5, -1]),
        "top_p": st.sampled_from([0.0, 0.5, 1.0]), "top_k": st.sampled_from([-1, 0, 1, 50]),
        "stop": text | st.lists(text, max_size=3), "n": st.integers(0, 3), "seed": st.integers(-(2**70), 2**70),
        "stream": st.booleans(), "stream_options": st.just({"include_usage": True}),
        "logprobs": st.booleans(), "top_logprobs": st.integers(-1, 21), "tools": st.lists(function_tool, max_size=2),
        "cache_salt": text, "prompt_cache_key": text, "prompt_cache_retention": st.sampled_from(["in_memory", "24h"]),
        "ignore_eos": st.booleans(), "user": text,
    },
)  # fmt: skip
block = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": text}, optional={"cache_control": cache_control}),
    st.fixed_dictionaries({"type": st.just("tool_use"), "id": st.text(max_size=6), "name": text,
                           "input": st.dictionaries(st.text(max_size=4), st.integers(), max_size=2) | st.just("x")},
                          optional={"cache_control": cache_control}),
    st.fixed_dictionaries({"type": st.just("tool_result"), "tool_use_id": st.text(max_size=6),
                           "content": text | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": text}),
                                                      max_size=2)}, optional={"cache_control": cache_control}),
    st.fixed_dictionaries({"type": st.sampled_from(["image", "document", "thinking"])}),
)  # fmt: skip
anthropic_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system"]), "content": text | st.lists(block, max_size=3)})
messages_body = st.fixed_dictionaries(
    {"model": st.just(MODEL), "max_tokens": st.integers(0, MAX_TOKENS + 2),
     "messages": st.lists(anthropic_message, min_size=1, max_size=5)},
    optional={
        "system": text | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": text},
                                                        optional={"cache_control": cache_control}), max_size=3),
        "tools": st.lists(st.fixed_dictionaries({"name": text, "input_schema": st.just({"type": "object"})},
                                                optional={"cache_control": cache_control}), max_size=2),
        "cache_control": cache_control, "stream": st.booleans(), "temperature": st.sampled_from([0.0, 1.0, 1.5]),
        "top_k": st.integers(-1, 3), "stop_sequences": st.lists(text, max_size=2), "cache_salt": text,
        "tool_choice": st.sampled_from([{"type": "auto"}, {"type": "any"}, {"type": "none"}]),
    },
)  # fmt: skip


def post_and_check(url: str, path: str, body: dict[str, Any]) -> int:
    """POST ``body``; a 2xx is read to its end (a stream to its last event), a 4xx is in the API's format."""
    with httpx.stream("POST", f"{url}{path}", json=body, timeout=30) as response:
        raw = response.read()
    assert response.status_code < 500, (response.status_code, raw[:500], body)
    if response.status_code >= 400:
        error_format(path, httpx.Response(response.status_code, content=raw))
    elif body.get("stream"):
        events = [line[6:] for line in raw.decode().splitlines() if line.startswith("data: ")]
        assert events, raw[:500]
        if path == "/v1/messages":
            assert json.loads(events[-1])["type"] == "message_stop", events[-1]
        else:
            assert events[-1] == "[DONE]", events[-3:]
    else:
        json.loads(raw)
    return response.status_code


def fuzz_bodies(url: str, examples: int) -> Counter[int]:
    statuses: Counter[int] = Counter()

    @settings(SETTINGS, max_examples=examples)
    @given(body=chat_body)
    def chat(body: dict[str, Any]) -> None:
        CASES["chat bodies"] += 1
        statuses[post_and_check(url, "/v1/chat/completions", body)] += 1

    @settings(SETTINGS, max_examples=examples)
    @given(body=messages_body)
    def messages(body: dict[str, Any]) -> None:
        CASES["messages bodies"] += 1
        statuses[post_and_check(url, "/v1/messages", body)] += 1

    chat()
    messages()
    return statuses


# ---- the server --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server():
    from promptcache.api.server import ServerConfig

    live = LiveServer(ServerConfig(max_tokens_limit=MAX_TOKENS, max_messages=32, body_timeout=5.0))
    yield live
    live.stop()


def test_the_document_describes_every_operation_with_its_bodies(server) -> None:
    spec = httpx.get(f"{server.url}/openapi.json").json()
    ops = {(m.upper(), p): op for p, item in spec["paths"].items() for m, op in item.items()}
    for op in [("POST", "/v1/chat/completions"), ("POST", "/v1/completions"), ("POST", "/v1/messages"),
               ("POST", "/v1/messages/count_tokens"), ("POST", "/v1/cache/explain")]:  # fmt: skip
        assert "$ref" in ops[op]["requestBody"]["content"]["application/json"]["schema"], op
        assert {"200", "400", "413"} <= set(ops[op]["responses"]), op
    chat = spec["components"]["schemas"]["ChatCompletionRequest"]
    assert chat["properties"]["messages"]["items"] == {"$ref": "#/components/schemas/ChatMessage"}
    assert set(spec["components"]["schemas"]["ChatMessage"]["properties"]["role"]["enum"]) >= {"user", "tool"}
    error = ops[("POST", "/v1/messages")]["responses"]["400"]["content"]["application/json"]["schema"]
    assert error == {"$ref": "#/components/schemas/AnthropicError"}


def test_schema_fuzzing_valid_bodies_never_fail_the_server(server) -> None:
    fuzz_schema(server.url, GenerationMode.POSITIVE, 500, "server, schema-valid")
    drained(server)


def test_schema_fuzzing_invalid_bodies_are_refused_in_the_apis_format(server) -> None:
    fuzz_schema(server.url, GenerationMode.NEGATIVE, 500, "server, schema-breaking")
    drained(server)


def test_generated_conversations_are_served_or_refused_never_crash(server) -> None:
    statuses = fuzz_bodies(server.url, 250)
    assert statuses[200] >= 50, f"too few were served to exercise the engine: {statuses}"
    assert statuses[400] >= 50, f"too few were refused to exercise the checks: {statuses}"
    drained(server)
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"


def test_a_body_nested_past_the_parser_is_400_and_the_connection_serves_on(server) -> None:
    deep = "[" * 100_000 + "]" * 100_000
    with httpx.Client(base_url=server.url, timeout=30) as client:  # one keep-alive connection for all three
        for path in ("/v1/chat/completions", "/v1/messages", "/v1/cache/explain"):
            resp = client.post(path, content=deep, headers={"content-type": "application/json"})
            assert resp.status_code == 400 and "RecursionError" in resp.text, resp.text[:300]
            error_format(path, resp)
        ok = client.post("/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 2})
        assert ok.status_code == 200


def test_a_seed_past_64_bits_is_refused_alone(server) -> None:
    resp = httpx.post(f"{server.url}/v1/completions", json={"model": MODEL, "prompt": "Hi", "seed": 2**64})
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "seed"


# ---- the router --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def routed(tmp_path_factory):
    from promptcache.api.server import ServerConfig
    from promptcache.fleet.router import RouterConfig, create_router_app

    with RedisServer(workdir=tmp_path_factory.mktemp("redis")) as redis:
        replica = LiveServer(ServerConfig(max_tokens_limit=MAX_TOKENS, max_messages=32), redis_url=redis.url)
        router = LiveServer.__new__(LiveServer)
        router.serve(create_router_app(RouterConfig([replica.url], redis.url, health_interval=0.3)))
        deadline = time.monotonic() + 60
        while httpx.get(f"{router.url}/health").status_code != 200:
            assert time.monotonic() < deadline, "the replica did not join"
            time.sleep(0.1)
        yield router, replica
        router.stop()
        replica.stop()


def test_the_router_survives_schema_fuzzing_and_generated_bodies(routed) -> None:
    router, replica = routed
    fuzz_schema(router.url, GenerationMode.POSITIVE, 250, "router, schema-valid")
    fuzz_schema(router.url, GenerationMode.NEGATIVE, 250, "router, schema-breaking")
    statuses = fuzz_bodies(router.url, 100)
    assert statuses[200] >= 20, statuses
    drained(replica)
    assert httpx.get(f"{router.url}/health").json()["replicas_up"] == 1
    load = router.app.state.router.loads.of(router.app.state.router.replicas.replicas[0].name)
    assert (load.prefill_tokens, load.decodes) == (0, 0), "the router still counts load on an idle replica"


def test_zz_cases_run(capsys) -> None:
    """Report the number of cases run (visible with -s; the figure in docs/reliability.md)."""
    with capsys.disabled():
        print(f"\nfuzz cases run: {sum(CASES.values())} {dict(CASES)}")
    assert sum(CASES.values()) > 0
