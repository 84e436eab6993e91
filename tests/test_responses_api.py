"""The Responses API (/v1/responses) with server-side state, through the official ``openai`` client against real
servers on loopback: continuation that reads the whole previous turn from the cache, tenant isolation, streaming,
structured outputs and tools, the store's bounds (in memory and in a real redis-server), and two `promptcache
serve` replicas sharing one Redis."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal

import httpx
import openai
import pytest
import redis
import torch
from conftest import DEFAULT_MODEL, TOKENIZER_FILES, LiveServer, assert_varied, keyed
from pydantic import BaseModel, Field
from redis_servers import RedisServer
from safetensors.torch import save_file
from serve_processes import start_serve, wait_healthy

from promptcache.api.prompts import PromptRenderer
from promptcache.api.response_store import RedisResponseStore, ResponseStore, StoredResponse, make_response_store
from promptcache.api.responses_prompt import response_prompt
from promptcache.tokenizer import Tokenizer

MODEL = "promptcache-default"
BS = 16
INSTRUCTIONS = "You are a patient librarian. Answer briefly."
ALICE, BOB, ADMIN = "key-alice", "key-bob", "key-admin"


def varied_model(out: Path) -> Path:
    """A small random llama (HF folder, the embedded tokenizer and template) whose greedy answers vary from token
    to token (the embedded model repeats one token, so two of its answers agree whatever the KV behind them).
    Written with safetensors directly: importing transformers would cost this file 10 s."""
    gen = torch.Generator().manual_seed(0)
    vocab, hidden, inter, layers, heads, kv_heads = 8192, 64, 128, 2, 4, 2
    kv = kv_heads * hidden // heads

    def w(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * 0.05

    tensors = {"model.embed_tokens.weight": w(vocab, hidden), "model.norm.weight": torch.ones(hidden),
               "lm_head.weight": w(vocab, hidden)}  # fmt: skip
    for i in range(layers):
        p = f"model.layers.{i}."
        tensors |= {p + "self_attn.q_proj.weight": w(hidden, hidden), p + "self_attn.k_proj.weight": w(kv, hidden),
                    p + "self_attn.v_proj.weight": w(kv, hidden), p + "self_attn.o_proj.weight": w(hidden, hidden),
                    p + "mlp.gate_proj.weight": w(inter, hidden), p + "mlp.up_proj.weight": w(inter, hidden),
                    p + "mlp.down_proj.weight": w(hidden, inter), p + "input_layernorm.weight": torch.ones(hidden),
                    p + "post_attention_layernorm.weight": torch.ones(hidden)}  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
              "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
              "num_attention_heads": heads, "num_key_value_heads": kv_heads, "max_position_embeddings": 4096,
              "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "torch_dtype": "float32"}  # fmt: skip
    (out / "config.json").write_text(json.dumps(config))
    for name in TOKENIZER_FILES:
        (out / name).write_bytes((DEFAULT_MODEL / name).read_bytes())
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    """A keyed server (alice, bob, admin) on a model whose answers vary."""
    live = LiveServer(keyed(), model=str(varied_model(tmp_path_factory.mktemp("varied"))))
    yield live
    live.stop()


def client(server: LiveServer, key: str = ALICE) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)


def create(c: openai.OpenAI, text: str, **kw: Any) -> Any:
    kw.setdefault("max_output_tokens", 24)
    kw.setdefault("temperature", 0)
    return c.responses.create(model=MODEL, input=text, **kw)


def reset(server: LiveServer) -> None:
    done = httpx.post(f"{server.url}/v1/cache/reset", headers={"Authorization": f"Bearer {ADMIN}"})
    assert done.status_code == 200, done.text


# ---- continuation: the whole previous turn from the cache --------------------------------------------------------
def test_each_turn_reads_the_whole_previous_turn_from_the_cache_and_answers_as_cold(server: LiveServer) -> None:
    c = client(server)
    first = create(c, "Which books would you suggest about the sea?", instructions=INSTRUCTIONS)
    assert first.object == "response" and first.id.startswith("resp_") and first.model == MODEL
    assert first.status == "incomplete" and first.incomplete_details.reason == "max_output_tokens"
    assert first.usage.output_tokens == 24 and first.output[0].type == "message"
    assert_varied(server.core.tokenizer.encode(first.output_text, add_special_tokens=False))
    turns, prev = [], first
    for i, question in enumerate(["And about mountains?", "Which one is the shortest?", "Thank you."]):
        nxt = create(c, question, instructions=INSTRUCTIONS, previous_response_id=prev.id)
        whole_previous = prev.usage.input_tokens + prev.usage.output_tokens
        assert nxt.previous_response_id == prev.id
        assert nxt.usage.input_tokens > whole_previous, f"turn {i + 1}: the prompt lacks the previous turn"
        cached = nxt.usage.input_tokens_details.cached_tokens
        # Everything of the previous turn, its answer included: all but the last token the model produced, whose KV
        # is never computed (the last partial block is taken over as a tail).
        assert cached == whole_previous - 1, (i, cached, whole_previous)
        turns.append((prev.id, question, nxt))
        prev = nxt
    for prev_id, question, hit in turns:  # each continuation again, computed from scratch
        reset(server)
        cold = create(c, question, instructions=INSTRUCTIONS, previous_response_id=prev_id)
        assert cold.usage.input_tokens_details.cached_tokens == 0
        assert cold.usage.input_tokens == hit.usage.input_tokens
        assert cold.output_text == hit.output_text


def test_the_prompt_is_the_previous_context_plus_the_suffix_unless_the_rendering_changed() -> None:
    tok = Tokenizer.from_pretrained(DEFAULT_MODEL)
    renderer = PromptRenderer(tok)
    body = {"input": "Hello", "instructions": "Be terse."}
    one = response_prompt(renderer, "alice", body, None)
    assert not one.continued and one.messages[0] == {"role": "system", "content": "Be terse."}
    answer = tok.encode(" Hi there friend", add_special_tokens=False) + [tok.eos_token_id]
    record = StoredResponse("resp_1", "alice", time.time(), {}, one.input_items,
                            [*one.conversation, {"role": "assistant", "content": " Hi there friend"}],
                            one.ids + answer)  # fmt: skip
    two = response_prompt(renderer, "alice", {**body, "input": "More"}, record)
    assert two.continued and two.ids[: len(record.context_ids)] == record.context_ids
    assert [m["role"] for m in two.conversation] == ["user", "assistant", "user"]
    other = response_prompt(renderer, "alice", {"input": "More", "instructions": "Be verbose."}, record)
    assert not other.continued and other.messages[0]["content"] == "Be verbose."  # instructions are not carried


# ---- tenants, store: false, errors -------------------------------------------------------------------------------
def test_another_tenant_cannot_read_delete_list_or_continue_a_response(server: LiveServer) -> None:
    mine = create(client(server, ALICE), "A private question.", max_output_tokens=4)
    bob = client(server, BOB)
    for attempt in (lambda: bob.responses.retrieve(mine.id), lambda: bob.responses.delete(mine.id),
                    lambda: bob.responses.input_items.list(mine.id),
                    lambda: create(bob, "Go on.", previous_response_id=mine.id, max_output_tokens=4)):  # fmt: skip
        with pytest.raises(openai.NotFoundError) as err:
            attempt()
        assert err.value.body["type"] == "invalid_request_error" and mine.id in err.value.body["message"]
    alice = client(server, ALICE)
    assert alice.responses.retrieve(mine.id).output_text == mine.output_text
    items = alice.responses.input_items.list(mine.id)
    assert [(i.type, i.role, i.content[0].text) for i in items.data] == [("message", "user", "A private question.")]
    alice.responses.delete(mine.id)
    with pytest.raises(openai.NotFoundError):
        alice.responses.retrieve(mine.id)


def test_store_false_is_not_stored_and_bad_requests_are_400s_naming_the_field(server: LiveServer) -> None:
    c = client(server)
    unstored = create(c, "Forget this.", store=False, max_output_tokens=4)
    assert unstored.store is False
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(unstored.id)
    image = [
        {"role": "user", "content": "Look."},
        {"role": "user", "content": [{"type": "input_image", "image_url": "https://example.com/x.png"}]},
    ]
    bad = {"input[1].content[0]": {"input": image}, "tools[0].type": {"tools": [{"type": "web_search"}]},
           "input[0]": {"input": [{"type": "reasoning", "summary": []}]}, "background": {"background": True},
           "text.format.schema": {"text": {"format": {"type": "json_schema", "name": "x",
                                                      "schema": {"type": "object", "required": 5}}}}}  # fmt: skip
    for param, fields in bad.items():
        with pytest.raises(openai.BadRequestError) as err:
            c.responses.create(model=MODEL, **{"input": "Hi", **fields})
        assert err.value.body["param"] == param, err.value.body
    with pytest.raises(openai.NotFoundError) as err:
        create(c, "Hi", previous_response_id="resp_nope")
    assert err.value.body["param"] == "previous_response_id"


# ---- streaming -------------------------------------------------------------------------------------------------
def test_streamed_events_add_up_to_the_stored_response_a_plain_run_gives(server: LiveServer) -> None:
    c = client(server)
    events = list(create(c, "Tell me a story about a lighthouse.", stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]  # fmt: skip
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.incomplete"]  # fmt: skip
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response
    plain = create(c, "Tell me a story about a lighthouse.")
    assert deltas == final.output_text == plain.output_text and final.usage.output_tokens == 24
    assert c.responses.retrieve(final.id).output_text == plain.output_text


class Pet(BaseModel):
    name: str = Field(max_length=12)
    age: int = Field(ge=0, le=30)
    kind: Literal["cat", "dog", "fish"]


def test_structured_output_parses_and_streams_to_a_completed_response(server: LiveServer) -> None:
    c = client(server)
    parsed = c.responses.parse(model=MODEL, input="Describe a pet.", text_format=Pet, temperature=0,
                               max_output_tokens=128)  # fmt: skip
    assert parsed.status == "completed" and isinstance(parsed.output_parsed, Pet)
    with c.responses.stream(model=MODEL, input="Describe a pet.", text_format=Pet, temperature=0,
                            max_output_tokens=128) as stream:  # fmt: skip
        final = stream.get_final_response()  # needs response.completed: the grammar ended the answer
    assert final.output_parsed == parsed.output_parsed


WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                          "required": ["city", "days"], "additionalProperties": False}, "strict": True}  # fmt: skip


class WeatherArgs(BaseModel):
    city: str = Field(max_length=10)
    days: int = Field(ge=1, le=7)


def test_a_named_tool_choice_calls_the_function_and_its_output_continues_the_turn(server: LiveServer) -> None:
    c = client(server)
    choice = {"type": "function", "name": "get_weather"}
    called = create(c, "Weather in Paris?", tools=[WEATHER], tool_choice=choice, max_output_tokens=64)
    calls = [o for o in called.output if o.type == "function_call"]
    assert called.status == "completed" and len(calls) == 1 and calls[0].name == "get_weather"
    WeatherArgs.model_validate_json(calls[0].arguments)
    assert calls[0].call_id.startswith("call_") and calls[0].id.startswith("fc_")
    streamed = list(create(c, "Weather in Paris?", tools=[WEATHER], tool_choice=choice, max_output_tokens=64,
                           stream=True))  # fmt: skip
    assert "response.output_text.delta" not in [e.type for e in streamed]  # the call is never streamed as text
    done = [e for e in streamed if e.type == "response.function_call_arguments.done"]
    assert [d.arguments for d in done] == [calls[0].arguments] and streamed[-1].type == "response.completed"
    result = [{"type": "function_call_output", "call_id": calls[0].call_id, "output": '{"sky": "clear"}'}]
    answer = c.responses.create(model=MODEL, input=result, previous_response_id=called.id, tools=[WEATHER],
                                tool_choice="none", temperature=0, max_output_tokens=8)  # fmt: skip
    whole = called.usage.input_tokens + called.usage.output_tokens
    # All of the call but its last two tokens: the one that completed the grammar and the EOS appended after it
    # (the request ends there, without the step that would have computed the former's KV).
    assert answer.usage.input_tokens_details.cached_tokens == whole - 2
    items = c.responses.input_items.list(answer.id)
    assert [i.type for i in items.data] == ["function_call_output"]


# ---- the store ---------------------------------------------------------------------------------------------------
def record(rid: str, tenant: str = "alice", created_at: float | None = None) -> StoredResponse:
    return StoredResponse(rid, tenant, time.time() if created_at is None else created_at, {"id": rid},
                          [{"type": "message", "id": f"msg_{rid}"}], [{"role": "user", "content": rid}],
                          [1, 2, 70_000, 2**32 - 1])  # fmt: skip


def test_the_store_keeps_each_tenants_newest_records_until_they_expire() -> None:
    store = ResponseStore(max_per_tenant=3, ttl_seconds=0.3)
    for i in range(5):
        store.put(record(f"r{i}"))
    store.put(record("b0", "bob"))
    assert [store.get("alice", f"r{i}") is not None for i in range(5)] == [False, False, True, True, True]
    assert store.get("bob", "r4") is None and store.get("bob", "b0").context_ids == [1, 2, 70_000, 2**32 - 1]
    assert store.delete("alice", "r4") and not store.delete("alice", "r4") and not store.delete("bob", "r3")
    assert store.stats() == {"responses": 3, "tenants": 2}
    time.sleep(0.35)
    assert store.get("alice", "r3") is None and store.get("bob", "b0") is None


def test_replicas_share_records_through_redis_and_drops_reach_every_replica(redis_url: str) -> None:
    one, two = RedisResponseStore(redis_url, "fp-a", max_per_tenant=3), RedisResponseStore(redis_url, "fp-a")
    other_model = make_response_store(redis_url, "fp-b", 3, 60.0)
    base = time.time()
    for i in range(4):
        one.put(record(f"r{i}", created_at=base + i))
    got = two.get("alice", "r3")
    assert got is not None and got.context_ids == [1, 2, 70_000, 2**32 - 1] and got.response == {"id": "r3"}
    assert two.get("alice", "r0") is None, "the oldest beyond max_per_tenant stays in Redis"
    assert two.get("bob", "r3") is None and other_model.get("alice", "r3") is None
    assert two.delete("alice", "r3") and one.get("alice", "r3") is None  # one's local copy is forgotten too
    with redis.Redis.from_url(redis_url) as raw:
        keys = [k.decode() for k in raw.keys("*")]
    assert keys and all(k.startswith("pc:resp:fp-a:") for k in keys) and not any("alice" in k for k in keys)
    assert two.stats()["redis_hits"] >= 1 and two.stats()["redis_available"]
    for store in (one, two, other_model):
        store.close()


def test_with_redis_down_the_store_carries_on_with_its_own_records(own_redis: RedisServer) -> None:
    store = RedisResponseStore(own_redis.url, "fp-a", timeout=0.2)
    store.put(record("before"))
    own_redis.kill()
    start = time.monotonic()
    store.put(record("during"))
    assert store.get("alice", "during") is not None and store.get("alice", "before") is not None
    assert store.delete("alice", "before") and store.get("alice", "before") is None
    assert time.monotonic() - start < 2.0
    assert not store.stats()["redis_available"]
    store.close()


# ---- two replicas sharing one Redis ------------------------------------------------------------------------------
def test_a_conversation_started_on_one_replica_continues_on_another(redis_url: str) -> None:
    procs = [start_serve(["--redis-url", redis_url, "--kv-cache-memory-gb", "0.05"]) for _ in range(2)]
    try:
        for proc, url in procs:
            wait_healthy(proc, url)
        first_client, second_client = (openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
                                       for _, url in procs)  # fmt: skip
        first = create(first_client, "Hello from replica one.", instructions=INSTRUCTIONS, max_output_tokens=8)
        second = create(second_client, "And hello from two.", instructions=INSTRUCTIONS, max_output_tokens=8,
                         previous_response_id=first.id)  # fmt: skip
        assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
        assert second_client.responses.retrieve(first.id).output_text == first.output_text
    finally:
        for proc, _ in procs:
            proc.terminate()
        for proc, _ in procs:
            proc.wait(timeout=30)


# ---- the document ------------------------------------------------------------------------------------------------
def test_the_document_lists_the_four_operations(server: LiveServer) -> None:
    spec = httpx.get(f"{server.url}/openapi.json").json()
    paths = spec["paths"]
    create_op = paths["/v1/responses"]["post"]
    assert create_op["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ResponsesRequest"}  # fmt: skip
    assert {"200", "400", "404"} <= set(create_op["responses"])
    assert set(paths["/v1/responses/{response_id}"]) == {"get", "delete"}
    assert "get" in paths["/v1/responses/{response_id}/input_items"]
    assert "404" in paths["/v1/responses/{response_id}"]["delete"]["responses"]
    request = spec["components"]["schemas"]["ResponsesRequest"]
    assert {"input", "instructions", "previous_response_id", "store", "tools", "text"} <= set(request["properties"])
