"""The OpenAI-compatible API through the official ``openai`` client, against a real server on loopback."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable

import httpx
import openai
import pytest
from conftest import LiveServer, assert_varied

from promptcache.api.server import ServerConfig
from promptcache.api.tenancy import Tenancy, Tenant

MODEL = "promptcache-default"
BS = 16
LONG_SYSTEM = " ".join(f"Rule {i}: answer in the voice of a patient librarian who cites sources." for i in range(90))


def client(server: LiveServer, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)


def chat(c: openai.OpenAI, messages: list[dict], **kw) -> openai.types.chat.ChatCompletion:
    kw.setdefault("max_tokens", 8)
    kw.setdefault("temperature", 0)
    return c.chat.completions.create(model=MODEL, messages=messages, **kw)


def assert_same_as_cold(
    server: LiveServer, hit: openai.types.chat.ChatCompletion, cold: openai.types.chat.ChatCompletion
) -> None:
    """``hit`` read part of its prompt from the cache and answered what ``cold`` (the same request, computed from
    scratch) answered, an answer varied enough for that to mean something."""
    assert hit.usage.prompt_tokens_details.cached_tokens > 0
    assert cold.usage.prompt_tokens_details.cached_tokens == 0
    assert hit.usage.prompt_tokens == cold.usage.prompt_tokens
    assert hit.usage.completion_tokens == cold.usage.completion_tokens
    answer = cold.choices[0].message.content
    assert_varied(server.core.tokenizer.encode(answer, add_special_tokens=False))
    assert hit.choices[0].message.content == answer


def wait_idle(server: LiveServer, timeout: float = 10.0) -> dict:
    """The engine's cache stats once no request holds a block (aborts land on the engine thread)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = httpx.get(f"{server.url}/v1/cache/stats", headers={"x-api-key": "key-admin"}).json()
        if stats["blocks_in_use"] == 0 or time.monotonic() > deadline:
            return stats
        time.sleep(0.05)


# ---- the endpoints ---------------------------------------------------------------------------------------------
def test_models_lists_the_served_model(live_server: LiveServer) -> None:
    models = client(live_server).models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_chat_completion_reports_usage_with_cached_tokens(live_server: LiveServer) -> None:
    res = chat(client(live_server), [{"role": "user", "content": "Say something."}])
    assert res.object == "chat.completion" and res.model == MODEL
    assert res.choices[0].message.role == "assistant" and res.choices[0].finish_reason == "length"
    usage = res.usage
    assert usage.completion_tokens == 8 and usage.total_tokens == usage.prompt_tokens + 8
    assert usage.prompt_tokens_details.cached_tokens == 0  # always present, 0 when nothing was cached
    cost = res.model_extra["usage"]["cost"] if "usage" in res.model_extra else usage.model_extra["cost"]
    assert cost["total"] == pytest.approx(cost["input"] + cost["output"] + cost["cached_input"])


def test_content_parts_and_developer_role_render_like_plain_text(live_server: LiveServer) -> None:
    c = client(live_server)
    parts = chat(
        c,
        [
            {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
            {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
        ],
    )
    plain = chat(c, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}])
    assert parts.usage.prompt_tokens == plain.usage.prompt_tokens
    assert parts.choices[0].message.content == plain.choices[0].message.content


def test_streaming_chat_with_usage(live_server: LiveServer) -> None:
    stream = chat(
        client(live_server),
        [{"role": "user", "content": "Stream please."}],
        stream=True,
        stream_options={"include_usage": True},
        max_tokens=6,
    )
    chunks = list(stream)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finish == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens >= 0
    whole = chat(client(live_server), [{"role": "user", "content": "Stream please."}], max_tokens=6)
    assert text == whole.choices[0].message.content


def test_completions_with_logprobs_and_a_token_prompt(live_server: LiveServer) -> None:
    c = client(live_server)
    res = c.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=5, temperature=0, logprobs=2)
    assert res.object == "text_completion" and len(res.choices[0].logprobs.tokens) == 5
    assert all(len(top) >= 1 for top in res.choices[0].logprobs.top_logprobs)
    ids = live_server.core.tokenizer.encode("Once upon a time")
    by_ids = c.completions.create(model=MODEL, prompt=ids, max_tokens=5, temperature=0)
    assert by_ids.choices[0].text == res.choices[0].text
    stream = c.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=5, temperature=0, stream=True)
    assert "".join(ch.choices[0].text for ch in stream if ch.choices) == res.choices[0].text


def test_chat_logprobs_and_n_choices_with_seed(live_server: LiveServer) -> None:
    c = client(live_server)
    res = chat(
        c, [{"role": "user", "content": "Pick words."}], logprobs=True, top_logprobs=3, temperature=1.0, seed=11, n=2
    )
    assert len(res.choices) == 2 and res.usage.completion_tokens == 16
    lp = res.choices[0].logprobs.content
    assert len(lp) == 8 and all(len(t.top_logprobs) == 3 for t in lp)
    again = chat(c, [{"role": "user", "content": "Pick words."}], temperature=1.0, seed=11, n=2)
    assert [ch.message.content for ch in again.choices] == [ch.message.content for ch in res.choices]


def test_tools_are_rendered_into_the_prompt(live_server: LiveServer) -> None:
    c = client(live_server)
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather for a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
            },
        }
    ]
    msgs = [{"role": "user", "content": "Weather in Paris?"}]
    with_tools = chat(c, msgs, tools=tools)
    without = chat(c, msgs)
    assert with_tools.usage.prompt_tokens > without.usage.prompt_tokens + 20
    follow = msgs + [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18C, sunny"},
    ]
    assert chat(c, follow, tools=tools).usage.prompt_tokens > with_tools.usage.prompt_tokens


# ---- prompt caching as users see it ----------------------------------------------------------------------------
def test_shared_system_prompt_is_cached_per_tenant(varied_servers: tuple[LiveServer, LiveServer]) -> None:
    server, cold = varied_servers
    alice, bob = client(server, "key-alice"), client(server, "key-bob")
    system = {"role": "system", "content": LONG_SYSTEM}
    first = chat(alice, [system, {"role": "user", "content": "First question?"}])
    second = chat(alice, [system, {"role": "user", "content": "A different question?"}], max_tokens=16)
    third = chat(bob, [system, {"role": "user", "content": "A different question?"}])
    reference = chat(client(cold, "key-alice"), [system, {"role": "user", "content": "A different question?"}],
                     max_tokens=16)  # fmt: skip
    assert_same_as_cold(server, second, reference)
    assert first.usage.prompt_tokens > 1000 and first.usage.prompt_tokens_details.cached_tokens == 0
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= (first.usage.prompt_tokens - 20) // BS * BS  # all but the differing question
    assert third.usage.prompt_tokens_details.cached_tokens == 0  # another tenant never shares blocks
    salted = chat(
        alice, [system, {"role": "user", "content": "A different question?"}], extra_body={"cache_salt": "s1"}
    )
    assert salted.usage.prompt_tokens_details.cached_tokens == 0  # cache_salt partitions inside a tenant
    assert second.usage.model_extra["cost"]["cached_input"] > 0


def test_five_turn_conversation_hits_the_previous_turn_answer_included(
    varied_servers: tuple[LiveServer, LiveServer],
) -> None:
    server, cold = varied_servers
    c, reference = client(server, "key-alice"), client(cold, "key-alice")
    messages = [{"role": "system", "content": "You are a helpful assistant. " + LONG_SYSTEM}]
    prev_total = 0
    for turn in range(5):
        messages.append({"role": "user", "content": f"Question number {turn}: tell me more about caching."})
        res = chat(c, messages, max_tokens=24)
        # The caching-off server holds the same conversation (its own answers, replayed as its own ids): turn by
        # turn, the same answer computed from scratch.
        expected = chat(reference, messages, max_tokens=24)
        if turn:
            cached = res.usage.prompt_tokens_details.cached_tokens
            assert cached >= 0.95 * prev_total
            # Exactly everything whose KV exists: the previous prompt and all of its answer but the last token (the
            # last partial block too: a tail).
            assert cached == prev_total - 1
            assert_same_as_cold(server, res, expected)
        else:
            assert res.choices[0].message.content == expected.choices[0].message.content
        prev_total = res.usage.prompt_tokens + res.usage.completion_tokens
        messages.append({"role": "assistant", "content": res.choices[0].message.content})


def test_explain_shows_where_and_why_the_first_miss_is(live_server: LiveServer) -> None:
    c = client(live_server)
    system = {"role": "system", "content": LONG_SYSTEM}
    chat(c, [system, {"role": "user", "content": "Cache me."}])
    changed = LONG_SYSTEM.replace("Rule 40:", "RULE FORTY:")
    body = {"model": MODEL, "messages": [{"role": "system", "content": changed}, {"role": "user", "content": "x"}]}
    info = httpx.post(f"{live_server.url}/v1/cache/explain", json=body).json()
    assert 0 < info["cached_tokens"] == info["first_miss_token"] < info["prompt_tokens"]
    assert "RULE" in info["text_at_miss"] or "RULE" in info["text_before_miss"] + info["text_at_miss"]
    assert "differ" in info["reason"]


def test_metrics_expose_cache_blocks_latency_tokens_and_cost(live_server: LiveServer) -> None:
    chat(client(live_server), [{"role": "user", "content": "Count me."}])
    text = httpx.get(f"{live_server.url}/metrics").text
    for name in (
        "promptcache_prefix_cache_queries_tokens_total",
        "promptcache_prefix_cache_hits_tokens_total",
        'promptcache_kv_blocks{state="free"}',
        'promptcache_kv_blocks{state="pinned"}',
        "promptcache_time_to_first_token_seconds_bucket",
        "promptcache_inter_token_latency_seconds_bucket",
        'promptcache_tokens_total{kind="output"}',
        'promptcache_cost_usd_total{kind="input"}',
    ):
        assert name in text, name
    health = httpx.get(f"{live_server.url}/health").json()
    assert health["status"] == "ok"


def test_cache_reset_is_admin_only(keyed_server: LiveServer) -> None:
    chat(
        client(keyed_server, "key-alice"),
        [{"role": "system", "content": LONG_SYSTEM}, {"role": "user", "content": "q"}],
    )
    denied = httpx.post(f"{keyed_server.url}/v1/cache/reset", headers={"Authorization": "Bearer key-alice"})
    assert denied.status_code == 403 and "admin" in denied.json()["error"]["message"]
    done = httpx.post(f"{keyed_server.url}/v1/cache/reset", headers={"Authorization": "Bearer key-admin"})
    assert done.status_code == 200 and done.json()["blocks_dropped"] > 0
    assert wait_idle(keyed_server)["blocks_cached"] == 0


def test_response_cache_answers_repeats_per_tenant() -> None:
    tenancy = Tenancy({"a": Tenant("a"), "b": Tenant("b")})
    server = LiveServer(ServerConfig(tenancy=tenancy, response_cache=True))
    try:
        msgs = [{"role": "user", "content": "Deterministic?"}]
        first = chat(client(server, "a"), msgs)
        again = chat(client(server, "a"), msgs)
        other = chat(client(server, "b"), msgs)
        sampled = chat(client(server, "a"), msgs, temperature=0.8)
        assert not first.model_extra.get("response_cached")
        assert again.model_extra["response_cached"] is True
        assert again.choices[0].message.content == first.choices[0].message.content
        assert again.usage.model_extra["cost"]["total"] == 0.0
        assert not other.model_extra.get("response_cached")  # never shared across tenants
        assert not sampled.model_extra.get("response_cached")  # not deterministic: never memoised
    finally:
        server.stop()


# ---- errors: each with its status and an OpenAI error body, and the server keeps serving ---------------------
def post_raw(server: LiveServer, body: bytes | dict, headers: dict | None = None) -> httpx.Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(
        f"{server.url}/v1/chat/completions",
        content=data,
        headers={"content-type": "application/json", **(headers or {})},
    )


BAD_BODIES = [
    ("malformed-json", b'{"model": "promptcache-default", "messages": [', 400, "not valid JSON"),
    ("not-an-object", b"[1, 2]", 400, "JSON object"),
    (
        "wrong-type",
        {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": "hot"},
        400,
        "temperature",
    ),
    ("missing-messages", {"model": MODEL}, 400, "messages"),
    ("bad-role", {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400, "role"),
    ("unknown-model", {"model": "gpt-17", "messages": [{"role": "user", "content": "x"}]}, 404, "does not exist"),
    ("over-context", {"model": MODEL, "messages": [{"role": "user", "content": "word " * 9000}]}, 400, "context"),
    (
        "max-tokens-too-large",
        {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 10**6},
        400,
        "max_tokens",
    ),
    ("top-p-zero", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_p": 0}, 400, "top_p"),
]


@pytest.mark.parametrize(("name", "body", "status", "words"), BAD_BODIES, ids=[b[0] for b in BAD_BODIES])
def test_bad_requests_get_status_and_openai_error_body(live_server: LiveServer, name, body, status, words) -> None:
    res = post_raw(live_server, body)
    assert res.status_code == status
    err = res.json()["error"]
    assert words in err["message"] and err["type"]
    ok = chat(client(live_server), [{"role": "user", "content": "still there?"}], max_tokens=2)
    assert ok.choices[0].finish_reason == "length"


def test_missing_or_bad_api_key_is_401(keyed_server: LiveServer) -> None:
    missing = post_raw(keyed_server, {"model": MODEL, "messages": [{"role": "user", "content": "x"}]})
    assert missing.status_code == 401 and "missing API key" in missing.json()["error"]["message"]
    with pytest.raises(openai.AuthenticationError) as bad:
        chat(client(keyed_server, "wrong"), [{"role": "user", "content": "x"}])
    assert bad.value.body["code"] == "invalid_api_key"
    assert chat(client(keyed_server, "key-bob"), [{"role": "user", "content": "x"}], max_tokens=2).choices


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 15.0) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        time.sleep(0.01)


def test_full_queue_is_429_with_retry_after() -> None:
    server = LiveServer(ServerConfig(max_waiting=1))
    try:
        c = client(server)
        # Long enough that it is still running when the second request comes, however slow the machine.
        stream = chat(c, [{"role": "user", "content": "long answer"}], max_tokens=4000, stream=True)
        next(iter(stream))
        wait_until(lambda: server.engine.num_waiting_or_running == 1, "the first request holds the only place")
        res = post_raw(server, {"model": MODEL, "messages": [{"role": "user", "content": "me too"}], "max_tokens": 2})
        assert res.status_code == 429 and res.headers["retry-after"] == "1"
        assert res.json()["error"]["type"] == "rate_limit_error"
        stream.close()  # the server aborts the request once it sees the client gone
        wait_until(lambda: server.engine.num_waiting_or_running == 0, "the closed stream's request has left")
        assert chat(c, [{"role": "user", "content": "now?"}], max_tokens=2).choices
    finally:
        server.stop()


# ---- concurrency and disconnects --------------------------------------------------------------------------------
def test_32_concurrent_streams_with_disconnects_leave_no_block_in_use(live_server: LiveServer) -> None:
    async def one(i: int, c: openai.AsyncOpenAI) -> int:
        stream = await c.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": f"Client {i} says hello."}],
            max_tokens=24,
            temperature=0.7,
            seed=i,
            stream=True,
        )
        n = 0
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                n += 1
            if i % 8 == 0 and n >= 3:  # a few clients go away mid-stream
                await stream.close()
                return -1
        return n

    async def main() -> list[int]:
        async with openai.AsyncOpenAI(base_url=f"{live_server.url}/v1", api_key="x", max_retries=0) as c:
            return await asyncio.gather(*(one(i, c) for i in range(32)))

    results = asyncio.run(main())
    assert results.count(-1) == 4
    assert all(n > 0 for n in results if n != -1)
    stats = wait_idle(live_server)
    assert stats["blocks_in_use"] == 0
    assert stats["blocks_free"] + stats["blocks_cached"] == stats["num_blocks"]
