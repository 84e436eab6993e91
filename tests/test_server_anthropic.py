"""The Anthropic-compatible API through the official ``anthropic`` client, against a real server on loopback."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import pytest
from conftest import LiveServer, assert_varied

from promptcache.api import anthropic_api
from promptcache.api.anthropic_api import MessagesRequest, build_prompt
from promptcache.api.tenancy import LOCAL_TENANT, Tenant
from promptcache.engine.request import RequestMetrics, RequestOutput

MODEL = "promptcache-default"
BS = 16
WEATHER_TOOL = {
    "name": "get_weather",
    "description": "The current weather in a city.",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
TIME_TOOL = {
    "name": "get_time",
    "description": "The local time in a city.",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
EPHEMERAL = {"type": "ephemeral"}
ONE_HOUR = {"type": "ephemeral", "ttl": "1h"}


def long_text(tag: str, rules: int = 70) -> str:
    """A system prompt of over 1,000 tokens that shares no leading block with another tag's."""
    return f"{tag} handbook. " + " ".join(f"{tag} rule {i}: answer like a patient librarian." for i in range(rules))


def client(server: LiveServer, key: str = "none") -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key=key, max_retries=0)


def create(c: anthropic.Anthropic, messages: list | str, temperature: float = 0.0, **kw) -> anthropic.types.Message:
    """messages.create with small defaults; this SDK has no sampling arguments, so temperature goes in the body."""
    kw.setdefault("max_tokens", 4)
    kw["extra_body"] = {"temperature": temperature, **kw.get("extra_body", {})}
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    return c.messages.create(model=MODEL, messages=messages, **kw)


def prompt_of(server: LiveServer, body: dict, tenant: str = LOCAL_TENANT) -> anthropic_api.Prompt:
    """The prompt ids and breakpoints the server builds for a body (through the module, not over HTTP)."""
    full = {"model": MODEL, "max_tokens": 1, **body}
    return build_prompt(server.app.state.service, Tenant(tenant), MessagesRequest.model_validate(full))


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def expected_read(first: list[int], second: list[int]) -> int:
    """What a request for ``second`` reads after ``first`` ran: their common prefix, down to a block, and never the
    second's last token (it is always computed)."""
    return min(common_prefix(first, second), len(second) - 1) // BS * BS


def wait_idle(server: LiveServer, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        stats = httpx.get(f"{server.url}/v1/cache/stats").json()
        if stats["blocks_in_use"] == 0 or time.monotonic() > deadline:
            return stats
        time.sleep(0.05)


def assert_block_end(tok, ids: list[int], n: int, block_end: str) -> None:
    """``n`` is the number of tokens wholly before the end of ``block_end`` (which occurs once in the prompt): a
    token that straddles the end of a block (BPE merges such as ``}}``) is left to what follows."""
    full = tok.decode(ids, skip_special_tokens=False)
    assert full.count(block_end) == 1
    end = full.index(block_end) + len(block_end)
    before, after = (tok.decode(ids[:k], skip_special_tokens=False) for k in (n, n + 1))
    assert len(before) <= end < len(after)


def total_input(usage) -> int:
    return usage.input_tokens + usage.cache_creation_input_tokens + usage.cache_read_input_tokens


# ---- answers with a cache hit against answers computed from scratch ---------------------------------------------
def assert_same_as_cold(server: LiveServer, hit: anthropic.types.Message, cold: anthropic.types.Message) -> None:
    """``hit`` read part of its prompt from the cache and answered what ``cold`` (the same request, computed from
    scratch) answered, an answer varied enough for that to mean something."""
    assert hit.usage.cache_read_input_tokens > 0
    assert cold.usage.cache_read_input_tokens == 0
    assert total_input(hit.usage) == total_input(cold.usage)
    assert hit.usage.output_tokens == cold.usage.output_tokens and hit.stop_reason == cold.stop_reason
    answer = cold.content[0].text
    assert_varied(server.core.tokenizer.encode(answer, add_special_tokens=False))
    assert hit.content[0].text == answer


# ---- messages ---------------------------------------------------------------------------------------------------
def test_message_has_anthropic_shape_usage_and_cost(live_server: LiveServer) -> None:
    msg = create(client(live_server), "Say something.", max_tokens=6)
    assert msg.id.startswith("msg_") and msg.type == "message" and msg.role == "assistant" and msg.model == MODEL
    assert [b.type for b in msg.content] == ["text"] and msg.content[0].text
    assert msg.stop_reason == "max_tokens" and msg.stop_sequence is None
    u = msg.usage
    assert u.output_tokens == 6 and u.cache_read_input_tokens == 0 and u.cache_creation_input_tokens == 0
    assert u.cache_creation.ephemeral_5m_input_tokens == 0 and u.cache_creation.ephemeral_1h_input_tokens == 0
    body = {"messages": [{"role": "user", "content": "Say something."}]}
    assert u.input_tokens == len(prompt_of(live_server, body).ids)
    cost = u.model_extra["cost"]
    assert cost["currency"] == "USD" and cost["total"] == pytest.approx(cost["input"] + cost["output"])


def test_streaming_with_the_stream_helper_and_raw_events(live_server: LiveServer) -> None:
    c = client(live_server)
    plain = create(c, "Stream please.", max_tokens=8)
    with c.messages.stream(model=MODEL, max_tokens=8, extra_body={"temperature": 0},
                           messages=[{"role": "user", "content": "Stream please."}]) as stream:  # fmt: skip
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == final.content[0].text == plain.content[0].text  # greedy: the same answer either way
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 8
    assert total_input(final.usage) == total_input(plain.usage)

    events = list(create(c, "Raw events.", max_tokens=5, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["message_start", "content_block_start"]
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(kinds[2:-3]) == {"content_block_delta"}
    start = events[0].message
    assert start.usage.output_tokens in (0, 1) and start.usage.cache_read_input_tokens == 0
    assert start.usage.input_tokens > 0 and start.content == []
    assert events[-2].delta.stop_reason == "max_tokens" and events[-2].usage.output_tokens == 5


def test_system_as_a_string_or_as_blocks_is_the_same_prompt(live_server: LiveServer) -> None:
    c = client(live_server)
    messages = [{"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}]
    as_string = create(c, messages, system="Be brief.\nBe kind.")
    blocks = [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Be kind."}]
    as_blocks = create(c, messages, system=blocks)
    assert total_input(as_string.usage) == total_input(as_blocks.usage)
    assert as_string.content[0].text == as_blocks.content[0].text
    # the same ids as the OpenAI API gives the same chat (text blocks of one message joined by newlines)
    service = live_server.app.state.service
    openai_ids = service.chat_ids(Tenant(LOCAL_TENANT), [
        {"role": "system", "content": "Be brief.\nBe kind."}, {"role": "user", "content": "Hi \nthere"}])  # fmt: skip
    assert prompt_of(live_server, {"system": "Be brief.\nBe kind.", "messages": messages}).ids == openai_ids


def test_tools_and_a_tool_result_turn(live_server: LiveServer) -> None:
    c = client(live_server)
    question = [{"role": "user", "content": "Weather in Paris?"}]
    without = c.messages.count_tokens(model=MODEL, messages=question)
    with_tools = c.messages.count_tokens(model=MODEL, messages=question, tools=[WEATHER_TOOL])
    assert with_tools.input_tokens > without.input_tokens + 40  # the definitions are in the prompt
    turn2 = [
        *question,
        {"role": "assistant", "content": [
            {"type": "text", "text": "Let me look."},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "18 C and sunny"},
            {"type": "text", "text": "And tomorrow?"}]},
    ]  # fmt: skip
    msg = create(c, turn2, tools=[WEATHER_TOOL], tool_choice={"type": "auto"})
    assert msg.stop_reason in ("max_tokens", "end_turn", "tool_use") and msg.content
    text = live_server.core.tokenizer.decode(prompt_of(live_server, {"messages": turn2, "tools": [WEATHER_TOOL]}).ids,
                                             skip_special_tokens=False)  # fmt: skip
    assert '"name": "get_weather"' in text and '"parameters": {"type": "object"' in text
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert "<tool_response>\n18 C and sunny\n</tool_response>" in text
    assert text.endswith("And tomorrow?<|im_end|>\n<|im_start|>assistant\n")


def test_tool_calls_in_the_output_become_tool_use_blocks() -> None:
    reply = 'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    text, uses = anthropic_api.parse_tool_uses(reply)
    assert text == "Checking." and [(u["name"], u["input"]) for u in uses] == [("get_weather", {"city": "Oslo"})]
    # streamed in small pieces, a tool call split across them still becomes one tool_use block
    content = anthropic_api._ContentStream(parse_tools=True)
    raw = content.start()
    for i in range(0, len(reply), 3):
        raw += content.feed(reply[i : i + 3])
    raw += content.finish()
    events = [json.loads(e.decode().split("data: ", 1)[1]) for e in raw]
    starts = [e["content_block"] for e in events if e["type"] == "content_block_start"]
    assert [s["type"] for s in starts] == ["text", "tool_use"] and starts[1]["name"] == "get_weather"
    deltas = [e["delta"] for e in events if e["type"] == "content_block_delta"]
    assert "".join(d["text"] for d in deltas if d["type"] == "text_delta").strip() == "Checking."
    assert [json.loads(d["partial_json"]) for d in deltas if d["type"] == "input_json_delta"] == [{"city": "Oslo"}]
    assert content.num_tool_uses == 1 and sum(e["type"] == "content_block_stop" for e in events) == 2


def test_tool_use_blocks_end_to_end_with_a_scripted_answer(live_server: LiveServer, monkeypatch) -> None:
    """The random model never calls a tool: script the engine's output and check both paths through the SDK."""
    service = live_server.app.state.service
    reply = 'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'

    async def scripted(tenant, salt, ids, params, api, cache_breakpoints=(), retention=0.0):
        service.check(ids, params)
        cuts = [0, 5, 14, 30, 61, len(reply)]
        for n, (a, b) in enumerate(itertools.pairwise(cuts)):
            last = b == len(reply)
            yield RequestOutput(
                request_id="scripted",
                prompt=None,
                prompt_token_ids=ids,
                token_ids=list(range(n + 1)) + [2] * last,
                text=reply[:b],
                finish_reason="stop" if last else None,
                stop_reason=2 if last else None,
                num_cached_tokens=0,
                metrics=RequestMetrics(0.0),
                finished=last,
                new_text=reply[a:b],
            )

    monkeypatch.setattr(service, "stream", scripted)
    c = client(live_server)
    ask = [{"role": "user", "content": "Weather in Oslo?"}]
    msg = create(c, ask, tools=[WEATHER_TOOL], max_tokens=16)
    assert [b.type for b in msg.content] == ["text", "tool_use"] and msg.content[0].text == "Checking."
    assert msg.content[1].name == "get_weather" and msg.content[1].input == {"city": "Oslo"}
    assert msg.content[1].id.startswith("toolu_") and msg.stop_reason == "tool_use"
    with c.messages.stream(model=MODEL, max_tokens=16, messages=ask, tools=[WEATHER_TOOL]) as stream:
        final = stream.get_final_message()
    assert [b.type for b in final.content] == ["text", "tool_use"] and final.stop_reason == "tool_use"
    assert final.content[0].text.strip() == "Checking." and final.content[1].input == {"city": "Oslo"}
    no_tools = create(c, ask, tools=[WEATHER_TOOL], tool_choice={"type": "none"}, max_tokens=16)
    assert [b.type for b in no_tools.content] == ["text"] and no_tools.stop_reason == "end_turn"
    monkeypatch.undo()
    # the answer goes back as the assistant turn, with the tool's result: a real request again
    turn2 = [
        *ask,
        {"role": "assistant", "content": final.content},
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": final.content[1].id,
                    "content": [{"type": "text", "text": "-3 C"}],
                }
            ],
        },
    ]
    assert create(c, turn2, tools=[WEATHER_TOOL]).usage.output_tokens == 4


def test_count_tokens_matches_the_prompt_of_a_request(live_server: LiveServer) -> None:
    c = client(live_server)
    body = {"system": "Count me.", "messages": [{"role": "user", "content": "How many tokens?"}]}
    counted = c.messages.count_tokens(model=MODEL, **body)
    msg = create(c, body["messages"], system=body["system"], max_tokens=1)
    assert counted.input_tokens == total_input(msg.usage) == len(prompt_of(live_server, body).ids)


def test_stop_sequences_and_assistant_prefill(live_server: LiveServer) -> None:
    c = client(live_server)
    greedy = create(c, "Tell me more.", max_tokens=12).content[0].text
    stop = greedy[len(greedy) // 2 :][:3]
    assert stop.strip()
    cut = create(c, "Tell me more.", max_tokens=12, stop_sequences=[stop])
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == stop
    assert cut.content[0].text == greedy[: greedy.index(stop)]
    # streamed: a stop sequence across two pieces leaves no trace in the streamed text either
    with c.messages.stream(model=MODEL, max_tokens=12, extra_body={"temperature": 0},
                           messages=[{"role": "user", "content": "Tell me more."}]) as stream:  # fmt: skip
        pieces = list(stream.text_stream)
    i = next(i for i in range(len(pieces) - 1) if len(pieces[i]) >= 2 and len(pieces[i + 1]) >= 2)
    across = pieces[i][-2:] + pieces[i + 1][:2]
    cut = create(c, "Tell me more.", max_tokens=12, stop_sequences=[across])
    with c.messages.stream(model=MODEL, max_tokens=12, extra_body={"temperature": 0}, stop_sequences=[across],
                           messages=[{"role": "user", "content": "Tell me more."}]) as stream:  # fmt: skip
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == final.content[0].text == cut.content[0].text and across not in streamed
    assert final.stop_reason == "stop_sequence" and final.stop_sequence == across
    # a last assistant message is a prefill: the prompt ends with it and the answer continues it
    body = {"messages": [{"role": "user", "content": "Go on."}, {"role": "assistant", "content": "Once upon"}]}
    text = live_server.core.tokenizer.decode(prompt_of(live_server, body).ids, skip_special_tokens=False)
    assert text.endswith("Go on.<|im_end|>\n<|im_start|>assistant\nOnce upon")
    assert create(c, body["messages"]).stop_reason in ("max_tokens", "end_turn")


def test_second_turn_hits_the_first_turn_and_its_answer(varied_servers: tuple[LiveServer, LiveServer]) -> None:
    server, cold = varied_servers
    c, reference = client(server, "key-alice"), client(cold, "key-alice")
    turn1 = [{"role": "user", "content": "A story about a lighthouse keeper, please." * 4}]
    first = create(c, turn1, max_tokens=16)
    # The caching-off server answers the same turn 1 and replays its own answer (the same ids) in turn 2.
    assert create(reference, turn1, max_tokens=16).content[0].text == first.content[0].text
    turn2 = [*turn1, {"role": "assistant", "content": first.content}, {"role": "user", "content": "Go on."}]
    second = create(c, turn2, max_tokens=16)
    # token-exact replay: the whole first turn, answer included, is read (less its last token, not computed)
    prompt1 = total_input(first.usage)
    assert second.usage.cache_read_input_tokens == prompt1 + 16 - 1
    assert_same_as_cold(server, second, create(reference, turn2, max_tokens=16))


# ---- cache_control ------------------------------------------------------------------------------------------------
def test_cache_control_does_not_change_the_prompt_ids_and_marks_the_block_end(live_server: LiveServer) -> None:
    tok = live_server.core.tokenizer
    system = long_text("Marker", rules=3)
    turns = [
        {"role": "user", "content": "Weather in Rome?"},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "toolu_9", "name": "get_weather", "input": {"city": "Rome"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_9", "content": "21 C"},
            {"type": "text", "text": "Thanks. And Milan?"}]},
    ]  # fmt: skip
    plain = prompt_of(live_server, {"system": system, "messages": turns, "tools": [WEATHER_TOOL, TIME_TOOL]})
    marked_turns = json.loads(json.dumps(turns))
    marked_turns[1]["content"][1]["cache_control"] = EPHEMERAL
    marked_turns[2]["content"][0]["cache_control"] = EPHEMERAL
    marked = prompt_of(live_server, {
        "system": [{"type": "text", "text": system, "cache_control": ONE_HOUR}], "messages": marked_turns,
        "tools": [{**WEATHER_TOOL, "cache_control": ONE_HOUR}, TIME_TOOL]})  # fmt: skip
    assert marked.ids == plain.ids
    assert plain.breakpoints == [] and [ttl for _, ttl in marked.breakpoints] == ["1h", "1h", "5m", "5m"]
    tool_json = json.dumps(
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": WEATHER_TOOL["description"],
                "parameters": WEATHER_TOOL["input_schema"],
            },
        }
    )
    ends = [tool_json, "Marker rule 2: answer like a patient librarian.", '"arguments": {"city": "Rome"}',
            "<tool_response>\n21 C"]  # fmt: skip
    for (n, _), end in zip(marked.breakpoints, ends):
        assert_block_end(tok, marked.ids, n, end)
    # the automatic (top-level) breakpoint: the end of the last block of the last message
    auto = prompt_of(live_server, {"messages": turns, "cache_control": EPHEMERAL})
    (n, ttl), = auto.breakpoints  # fmt: skip
    assert ttl == "5m"
    assert_block_end(tok, auto.ids, n, "Thanks. And Milan?")
    assert auto.ids == prompt_of(live_server, {"messages": turns}).ids


def test_breakpoint_on_a_replayed_answer_keeps_the_generated_ids(live_server: LiveServer) -> None:
    c = client(live_server)
    turn1 = [{"role": "user", "content": "Replay me."}]
    answer = create(c, turn1, max_tokens=10).content[0].text
    turn2 = [*turn1, {"role": "assistant", "content": answer}, {"role": "user", "content": "More."}]
    marked = json.loads(json.dumps(turn2))
    marked[1]["content"] = [{"type": "text", "text": answer, "cache_control": EPHEMERAL}]
    plain, pinned = prompt_of(live_server, {"messages": turn2}), prompt_of(live_server, {"messages": marked})
    service = live_server.app.state.service
    assert pinned.ids == plain.ids == service.chat_ids(Tenant(LOCAL_TENANT), turn2)
    (n, _), = pinned.breakpoints  # fmt: skip
    assert n == len(prompt_of(live_server, {"messages": turn1}).ids) + len(service.replay.lookup(LOCAL_TENANT, answer))


def test_a_breakpoint_inside_a_replayed_answer_rounds_down_to_a_token(live_server: LiveServer) -> None:
    tok = live_server.core.tokenizer
    content = "Alpha beta gamma.\nDelta epsilon."
    ids = tuple(tok.encode(content, add_special_tokens=False))
    n = anthropic_api._replayed_prefix(tok, ids, content, len("Alpha beta gamma."))
    assert "Alpha beta gamma.".startswith(tok.decode(ids[:n]))  # whole tokens only, as many as fit
    assert len(tok.decode(ids[: n + 1])) > len("Alpha beta gamma.")
    assert anthropic_api._replayed_prefix(tok, ids, content, len(content)) == len(ids)


def test_5m_breakpoint_writes_the_prefix_then_reads_it(varied_servers: tuple[LiveServer, LiveServer]) -> None:
    server, cold = varied_servers
    c = client(server, "key-alice")
    system = [{"type": "text", "text": long_text("Five"), "cache_control": EPHEMERAL}]
    first = create(c, "First question.", system=system)
    body1 = {"system": system, "messages": [{"role": "user", "content": "First question."}]}
    prompt1 = prompt_of(server, body1, "alice")
    (p, ttl), = prompt1.breakpoints  # fmt: skip
    assert ttl == "5m" and p >= 1000
    u = first.usage
    assert u.cache_creation_input_tokens == p // BS * BS == u.cache_creation.ephemeral_5m_input_tokens
    assert u.cache_creation.ephemeral_1h_input_tokens == 0 and u.cache_read_input_tokens == 0
    assert u.input_tokens == len(prompt1.ids) - p // BS * BS
    assert u.model_extra["cost"]["cache_write_5m"] > 0
    assert httpx.get(f"{server.url}/v1/cache/stats", headers={"x-api-key": "key-alice"}).status_code == 403
    stats = httpx.get(f"{server.url}/v1/cache/stats", headers={"x-api-key": "key-admin"}).json()
    assert stats["blocks_pinned"] >= p // BS

    second = create(c, "Another one.", system=system, max_tokens=16)
    body2 = {"system": system, "messages": [{"role": "user", "content": "Another one."}]}
    prompt2 = prompt_of(server, body2, "alice")
    read = second.usage.cache_read_input_tokens
    assert read == expected_read(prompt1.ids, prompt2.ids) and read >= p // BS * BS
    assert second.usage.cache_creation_input_tokens == 0 and second.usage.cache_creation.ephemeral_5m_input_tokens == 0
    assert second.usage.input_tokens == len(prompt2.ids) - read
    assert_same_as_cold(server, second, create(client(cold, "key-alice"), "Another one.", system=system, max_tokens=16))
    # streaming: message_start already carries the cache usage
    events = create(c, "A third one.", system=system, stream=True)
    start = next(iter(events))
    assert start.type == "message_start" and start.message.usage.cache_read_input_tokens >= p // BS * BS
    assert start.message.usage.cache_creation_input_tokens == 0
    events.close()


def test_1h_breakpoint_is_billed_as_a_1h_write(live_server: LiveServer) -> None:
    c = client(live_server)
    system = [{"type": "text", "text": long_text("Hour"), "cache_control": ONE_HOUR}]
    u = create(c, "Question.", system=system).usage
    ((p, ttl),) = prompt_of(live_server, {"system": system, "messages": [{"role": "user", "content": "Q"}]}).breakpoints
    assert ttl == "1h"
    assert u.cache_creation.ephemeral_1h_input_tokens == u.cache_creation_input_tokens == p // BS * BS
    assert u.cache_creation.ephemeral_5m_input_tokens == 0
    cost = u.model_extra["cost"]
    assert cost["cache_write_1h"] == pytest.approx(p // BS * BS * 2.0e-6) and cost["cache_write_5m"] == 0


def test_mixed_ttls_split_the_writes(live_server: LiveServer) -> None:
    c = client(live_server)
    # Anthropic's order is tools -> system -> messages: a 1h tool breakpoint, then a 5m one on the system prompt
    tools = [{**WEATHER_TOOL, "cache_control": ONE_HOUR}]
    system = [{"type": "text", "text": long_text("Mixed"), "cache_control": EPHEMERAL}]
    u = create(c, "Question.", system=system, tools=tools).usage
    assert u.cache_creation.ephemeral_5m_input_tokens > 1000 and u.cache_creation.ephemeral_1h_input_tokens > 0
    assert u.cache_creation_input_tokens == sum(dict(u.cache_creation).values())


def test_tenants_and_salts_never_read_each_others_prefix(varied_servers: tuple[LiveServer, LiveServer]) -> None:
    server, cold = varied_servers
    system = [{"type": "text", "text": long_text("Tenant"), "cache_control": EPHEMERAL}]
    alice, bob = client(server, "key-alice"), client(server, "key-bob")
    assert create(alice, "One.", system=system).usage.cache_creation_input_tokens > 1000
    hit = create(alice, "Two.", system=system, max_tokens=16)
    assert hit.usage.cache_read_input_tokens > 1000
    assert_same_as_cold(server, hit, create(client(cold, "key-alice"), "Two.", system=system, max_tokens=16))
    other = create(bob, "Two.", system=system).usage
    assert other.cache_read_input_tokens == 0 and other.cache_creation_input_tokens > 1000
    salted = create(alice, "Two.", system=system, extra_body={"cache_salt": "project-x"}).usage
    assert salted.cache_read_input_tokens == 0


def test_explain_takes_an_anthropic_body(live_server: LiveServer) -> None:
    body = {"system": [{"type": "text", "text": long_text("Explain", 5), "cache_control": EPHEMERAL}],
            "messages": [{"role": "user", "content": "Why?"}]}  # fmt: skip
    create(client(live_server), body["messages"], system=body["system"])
    info = httpx.post(f"{live_server.url}/v1/cache/explain", json=body).json()
    ids = prompt_of(live_server, body).ids
    assert info["api"] == "anthropic" and info["prompt_tokens"] == len(ids)
    assert info["cached_tokens"] == (len(ids) - 1) // BS * BS


# ---- pins under pressure ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_server(varied_model: Path) -> Iterator[LiveServer]:
    """A pool of 240 blocks (3,840 tokens): four prompts of ~1,100 tokens evict everything that is not pinned. On
    the model whose answers vary: a prefix that survived the pressure must still give the answer from scratch."""
    server = LiveServer(model=str(varied_model), num_kv_blocks=240)
    yield server
    server.stop()


def flood(c: anthropic.Anthropic, tag: str) -> None:
    for i in range(4):
        create(c, "Flood.", system=long_text(f"{tag}{i}"), max_tokens=1)


def explain(server: LiveServer, system: str, question: str) -> dict:
    body = {"system": system, "messages": [{"role": "user", "content": question}]}
    return httpx.post(f"{server.url}/v1/cache/explain", json={"api": "anthropic", **body}).json()


def test_pinned_prefix_survives_lru_pressure(
    small_server: LiveServer, varied_servers: tuple[LiveServer, LiveServer]
) -> None:
    c = client(small_server)
    pinned = [{"type": "text", "text": long_text("Pinned"), "cache_control": EPHEMERAL}]
    unpinned = long_text("Loose")
    create(c, "Q1", system=pinned, max_tokens=1)
    create(c, "Q1", system=unpinned, max_tokens=1)
    assert explain(small_server, unpinned, "Q2")["cached_tokens"] > 1000  # cached, for now
    flood(c, "Flood")
    assert small_server.core.kv.pool.num_evictions > 0
    ((p, _),) = prompt_of(small_server, {"system": pinned, "messages": [{"role": "user", "content": "Q2"}]}).breakpoints
    hit = create(c, "Q2", system=pinned, max_tokens=16)
    assert hit.usage.cache_read_input_tokens == p // BS * BS
    cold = client(varied_servers[1], "key-alice")
    assert_same_as_cold(small_server, hit, create(cold, "Q2", system=pinned, max_tokens=16))
    loose = create(c, "Q2", system=unpinned, max_tokens=1).usage
    assert loose.cache_read_input_tokens == 0
    small_server.core.kv.pool.check_integrity()


def test_an_expired_pin_no_longer_protects(small_server: LiveServer, monkeypatch: pytest.MonkeyPatch) -> None:
    c = client(small_server)
    pinned = [{"type": "text", "text": long_text("Expiring"), "cache_control": EPHEMERAL}]
    create(c, "Q1", system=pinned, max_tokens=1)
    pool = small_server.core.kv.pool
    assert pool.num_pinned > 0
    now = time.monotonic
    monkeypatch.setattr(pool, "_clock", lambda: now() + 301.0)  # five minutes and a second later
    assert pool.num_pinned == 0
    flood(c, "Later")
    info = explain(small_server, long_text("Expiring"), "Q2")
    assert info["cached_tokens"] == 0 and "evicted" in info["reason"]
    assert create(c, "Q2", system=pinned, max_tokens=1).usage.cache_read_input_tokens == 0


# ---- errors -------------------------------------------------------------------------------------------------------
def post(server: LiveServer, body: dict | str, path: str = "/v1/messages", key: str | None = None) -> httpx.Response:
    headers = {"x-api-key": key} if key else {}
    if isinstance(body, str):
        return httpx.post(server.url + path, content=body, headers={**headers, "content-type": "application/json"})
    return httpx.post(server.url + path, json=body, headers=headers)


def test_more_than_four_breakpoints_is_a_400_then_a_valid_request_succeeds(live_server: LiveServer) -> None:
    c = client(live_server)
    blocks = [{"type": "text", "text": f"Part {i}.", "cache_control": EPHEMERAL} for i in range(5)]
    with pytest.raises(anthropic.BadRequestError) as err:
        create(c, [{"role": "user", "content": blocks}])
    assert err.value.status_code == 400 and err.value.body["type"] == "error"
    assert err.value.body["error"]["type"] == "invalid_request_error"
    assert "maximum of 4" in err.value.body["error"]["message"]
    assert create(c, [{"role": "user", "content": blocks[:4]}]).usage.output_tokens == 4


BAD_BODIES = [
    ("1h after 5m", {"system": [{"type": "text", "text": "a", "cache_control": EPHEMERAL}],
                     "messages": [{"role": "user", "content": [
                         {"type": "text", "text": "b", "cache_control": ONE_HOUR}]}]}, "must not come after"),
    ("bad ttl", {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "b", "cache_control": {"type": "ephemeral", "ttl": "10m"}}]}]}, "ttl"),
    ("bad cache type", {"messages": [{"role": "user", "content": "x"}], "cache_control": {"type": "forever"}},
     "ephemeral"),
    ("image", {"messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}]}]},
     "not supported"),
    ("image in a tool result", {"messages": [{"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "t", "content": [{"type": "image", "source": {}}]}]}]},
     "not supported"),
    ("system role", {"messages": [{"role": "system", "content": "x"}]}, "role"),
    ("no messages", {"messages": []}, "messages"),
    ("no max_tokens", {"max_tokens": None, "messages": [{"role": "user", "content": "x"}]}, "max_tokens"),
    ("zero max_tokens", {"max_tokens": 0, "messages": [{"role": "user", "content": "x"}]}, "max_tokens"),
    ("temperature above 1", {"temperature": 1.5, "messages": [{"role": "user", "content": "x"}]}, "temperature"),
    ("content of a wrong type", {"messages": [{"role": "user", "content": 7}]}, "content"),
    ("server tool", {"tools": [{"type": "web_search_20250305", "name": "web_search"}],
                     "messages": [{"role": "user", "content": "x"}]}, "not supported"),
    ("too long", {"max_tokens": 9000, "messages": [{"role": "user", "content": "x"}]}, "max_tokens"),
]  # fmt: skip


@pytest.mark.parametrize(("name", "body", "words"), BAD_BODIES, ids=[b[0] for b in BAD_BODIES])
def test_bad_requests_get_400_with_anthropic_error_body(live_server: LiveServer, name, body, words) -> None:
    full = {"model": MODEL, "max_tokens": 4, **body}
    res = post(live_server, {k: v for k, v in full.items() if v is not None})
    assert res.status_code == 400, res.text
    err = res.json()
    assert err["type"] == "error" and err["error"]["type"] == "invalid_request_error"
    assert words in err["error"]["message"]
    assert create(client(live_server), "still there?", max_tokens=2).stop_reason == "max_tokens"


def test_malformed_json_and_unknown_model(live_server: LiveServer) -> None:
    res = post(live_server, "{not json")
    assert res.status_code == 400 and res.json()["error"]["type"] == "invalid_request_error"
    c = client(live_server)
    with pytest.raises(anthropic.NotFoundError) as err:
        c.messages.create(model="claude-nonexistent", max_tokens=4, messages=[{"role": "user", "content": "x"}])
    assert err.value.body == {"type": "error", "error": {"type": "not_found_error",
                                                         "message": err.value.body["error"]["message"]}}  # fmt: skip
    assert "claude-nonexistent" in err.value.body["error"]["message"]
    with pytest.raises(anthropic.NotFoundError):
        c.messages.count_tokens(model="claude-nonexistent", messages=[{"role": "user", "content": "x"}])
    assert create(c, "fine now?", max_tokens=2).usage.output_tokens == 2


def test_bad_api_key_is_401_authentication_error(keyed_server: LiveServer) -> None:
    with pytest.raises(anthropic.AuthenticationError) as err:
        create(client(keyed_server, "wrong"), "x")
    assert err.value.status_code == 401 and err.value.body["error"]["type"] == "authentication_error"
    missing = post(keyed_server, {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "x"}]})
    assert missing.status_code == 401 and missing.json()["error"]["type"] == "authentication_error"
    assert create(client(keyed_server, "key-bob"), "x", max_tokens=2).usage.output_tokens == 2


def test_client_gone_mid_stream_aborts_the_request(live_server: LiveServer) -> None:
    service = live_server.app.state.service
    outcomes = [service.metrics.requests.labels("anthropic", o) for o in ("length", "stop")]
    before = [o._value.get() for o in outcomes]
    stream = create(client(live_server), "A very long answer, please.", max_tokens=2000, temperature=1.0, stream=True)
    it = iter(stream)
    kinds = [next(it).type for _ in range(4)]
    assert kinds[0] == "message_start"
    stream.close()
    stats = wait_idle(live_server)
    assert stats["blocks_in_use"] == 0 and live_server.engine.num_waiting_or_running == 0
    assert [o._value.get() for o in outcomes] == before  # aborted: it neither ran to max_tokens nor stopped
