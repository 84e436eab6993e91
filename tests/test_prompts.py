"""``promptcache.api.prompts``: request bodies -> prompt ids without the engine, exactly as a server replica makes them
(what a fleet router needs), and the tokenizer's description that such a router rebuilds a replica's tokenizer from."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import DEFAULT_MODEL, LiveServer

from promptcache.api import anthropic_api
from promptcache.api.errors import APIError
from promptcache.api.prompts import AnthropicPromptBody, PromptRenderer, looks_anthropic
from promptcache.api.tenancy import LOCAL_TENANT, Tenant
from promptcache.replay import ReplayStore
from promptcache.tokenizer import Tokenizer

MODEL = "promptcache-default"
EPHEMERAL = {"type": "ephemeral"}
ONE_HOUR = {"type": "ephemeral", "ttl": "1h"}
WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}

OPENAI_CHAT: dict[str, Any] = {
    "messages": [
        {"role": "system", "content": "You are a terse weather assistant. Answer in one line."},
        {"role": "user", "content": [{"type": "text", "text": "Weather in Oslo?"}]},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": json.dumps({"city": "Oslo"})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "Rain, 7 degrees."},
        {"role": "assistant", "content": "Oslo: rain, 7 degrees, bring a coat."},
        {"role": "user", "content": "And tomorrow, in Bergen?"},
    ],
    "tools": [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.",
                                                "parameters": WEATHER_SCHEMA}}],
}  # fmt: skip
ANTHROPIC_BODY: dict[str, Any] = {
    "tools": [
        {"name": "get_time", "description": "The local time in a city.", "input_schema": WEATHER_SCHEMA},
        {"name": "get_weather", "description": "The weather in a city.", "input_schema": WEATHER_SCHEMA,
         "cache_control": ONE_HOUR},
    ],
    "system": [
        {"type": "text", "text": "You are a terse weather assistant. " * 20},
        {"type": "text", "text": "Answer in one line.", "cache_control": EPHEMERAL},
    ],
    "messages": [
        {"role": "user", "content": [{"type": "text", "text": "Weather in Oslo?"}]},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Let me look."},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Oslo"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "Rain, 7 degrees."},
            {"type": "text", "text": "And tomorrow?", "cache_control": EPHEMERAL}]},
    ],
    "cache_control": EPHEMERAL,
}  # fmt: skip
COMPLETION_PROMPTS: list[Any] = [
    "Once upon a time, in a land of <|im_start|> tokens,",
    ["First prompt.", "A second, longer prompt with some more words in it."],
    [1, 2, 3, 400, 5000],
    [[7, 8, 9], [10, 11]],
]


@pytest.fixture(scope="module")
def renderer() -> PromptRenderer:
    """A renderer with no engine and no replay: only the model folder's tokenizer."""
    return PromptRenderer(Tokenizer.from_pretrained(DEFAULT_MODEL), None)


def post(server: LiveServer, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=60)


def explain(server: LiveServer, body: dict[str, Any]) -> dict[str, Any]:
    res = post(server, "/v1/cache/explain", body)
    assert res.status_code == 200, res.text
    return res.json()


def explain_api(body: dict[str, Any]) -> str:
    """The api /v1/cache/explain picks for a body."""
    return body.get("api") or ("anthropic" if "system" in body or looks_anthropic(body) else "openai")


# ---- no engine, no torch ------------------------------------------------------------------------------------------
def test_prompts_import_without_torch_or_the_engine() -> None:
    code = (
        "import sys, promptcache.api.prompts\n"
        "bad = [m for m in sys.modules if m.split('.')[0] == 'torch' or m.startswith('promptcache.engine')\n"
        "       or m in ('promptcache.api.service', 'promptcache.api.openai_api', 'fastapi')]\n"
        "print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"


# ---- the same ids as a server -------------------------------------------------------------------------------------
def test_same_tokenizer_as_the_server(live_server: LiveServer, renderer: PromptRenderer) -> None:
    assert renderer.tokenizer.digest() == live_server.app.state.service.tokenizer.digest()


def test_openai_chat_ids_match_the_server(live_server: LiveServer, renderer: PromptRenderer) -> None:
    ids = renderer.openai_chat_ids(LOCAL_TENANT, OPENAI_CHAT)
    res = post(live_server, "/v1/chat/completions", {"model": MODEL, "max_tokens": 1, **OPENAI_CHAT})
    assert res.status_code == 200, res.text
    assert res.json()["usage"]["prompt_tokens"] == len(ids)
    info = explain(live_server, OPENAI_CHAT)
    assert info["api"] == explain_api(OPENAI_CHAT) == "openai" and info["prompt_tokens"] == len(ids)
    assert renderer.explain_ids("openai", LOCAL_TENANT, {**OPENAI_CHAT, "cache_salt": "s"}) == (ids, "s")
    # token for token, what the endpoint renders in the server's process
    service = live_server.app.state.service
    from promptcache.api.prompts import normalize_messages

    assert ids == service.chat_ids(Tenant(LOCAL_TENANT), normalize_messages(OPENAI_CHAT["messages"]),
                                   OPENAI_CHAT["tools"])  # fmt: skip


def test_anthropic_ids_and_breakpoints_match_the_server(live_server: LiveServer, renderer: PromptRenderer) -> None:
    prompt = renderer.anthropic(LOCAL_TENANT, AnthropicPromptBody.model_validate(ANTHROPIC_BODY))
    assert [ttl for _, ttl in prompt.breakpoints] == ["1h", "5m", "5m", "5m"]
    assert all(0 < n < len(prompt.ids) for n, _ in prompt.breakpoints)
    assert prompt.breakpoints[2] == prompt.breakpoints[3]  # the last block's own mark, and the automatic one
    assert prompt.parse_tools
    res = post(live_server, "/v1/messages/count_tokens", {"model": MODEL, **ANTHROPIC_BODY})
    assert res.status_code == 200, res.text
    assert res.json()["input_tokens"] == len(prompt.ids)
    info = explain(live_server, ANTHROPIC_BODY)
    assert info["api"] == explain_api(ANTHROPIC_BODY) == "anthropic" and info["prompt_tokens"] == len(prompt.ids)
    assert renderer.explain_ids("anthropic", LOCAL_TENANT, {**ANTHROPIC_BODY, "cache_salt": "s"}) == (prompt.ids, "s")
    body = anthropic_api.CountTokensRequest.model_validate({"model": MODEL, **ANTHROPIC_BODY})
    served = anthropic_api.build_prompt(live_server.app.state.service, Tenant(LOCAL_TENANT), body)
    assert (served.ids, served.breakpoints, served.parse_tools) == (prompt.ids, prompt.breakpoints, True)


@pytest.mark.parametrize("prompt", COMPLETION_PROMPTS, ids=["text", "texts", "ids", "id-lists"])
def test_completion_prompts_match_the_server(live_server: LiveServer, renderer: PromptRenderer, prompt: Any) -> None:
    prompts = renderer.completion_prompts(prompt)
    res = post(live_server, "/v1/completions", {"model": MODEL, "max_tokens": 1, "prompt": prompt})
    assert res.status_code == 200, res.text
    assert res.json()["usage"]["prompt_tokens"] == sum(len(ids) for ids in prompts)
    if isinstance(prompt, str) or all(isinstance(t, int) for t in prompt):  # what explain takes as a prompt
        assert explain(live_server, {"prompt": prompt})["prompt_tokens"] == len(prompts[0])
        assert renderer.explain_ids("openai", LOCAL_TENANT, {"prompt": prompt}) == (prompts[0], None)


def test_replayed_answers_match_the_server(live_server: LiveServer) -> None:
    """With the server's replay store, a renderer splices the server's own answer ids as the server does."""
    turn1 = [{"role": "user", "content": "Say something, anything at all."}]
    res = post(live_server, "/v1/chat/completions",
               {"model": MODEL, "max_tokens": 12, "temperature": 0, "messages": turn1})  # fmt: skip
    answer = res.json()["choices"][0]["message"]["content"]
    service = live_server.app.state.service
    assert service.replay.lookup(LOCAL_TENANT, answer) is not None
    turn2 = {"messages": [*turn1, {"role": "assistant", "content": answer}, {"role": "user", "content": "More."}]}
    store = ReplayStore()
    store.remember(LOCAL_TENANT, answer, service.replay.lookup(LOCAL_TENANT, answer))
    ids = PromptRenderer(Tokenizer.from_pretrained(DEFAULT_MODEL), store).openai_chat_ids(LOCAL_TENANT, turn2)
    assert explain(live_server, turn2)["prompt_tokens"] == len(ids)
    assert ids == service.prompts.openai_chat_ids(LOCAL_TENANT, turn2)
    assert PromptRenderer(service.tokenizer, store).openai_chat_ids("someone else", turn2) == (
        PromptRenderer(service.tokenizer, None).openai_chat_ids(LOCAL_TENANT, turn2)
    )  # replay is per tenant


def test_anthropic_asks_the_replay_store_once(renderer: PromptRenderer) -> None:
    """Every assistant turn in one ``lookup_many`` (a store in Redis: one round trip), and found ids are spliced."""
    asked: list[list[str]] = []

    class Counting(ReplayStore):
        def lookup_many(self, namespace: str, texts: Any) -> list[tuple[int, ...] | None]:
            asked.append(list(texts))
            return super().lookup_many(namespace, texts)

    store = Counting()
    answer_ids = tuple(renderer.tokenizer.encode("First answer.", add_special_tokens=False))[::-1]  # not its text's
    store.remember("t", "First answer.", answer_ids)
    body = AnthropicPromptBody.model_validate({"messages": [
        {"role": "user", "content": "One?"}, {"role": "assistant", "content": "First answer."},
        {"role": "user", "content": "Two?"}, {"role": "assistant", "content": [{"type": "text", "text": "Second."}]},
        {"role": "user", "content": "Three?"}]})  # fmt: skip
    ids = PromptRenderer(renderer.tokenizer, store).anthropic("t", body).ids
    assert asked == [["First answer.", "Second."]]
    assert any(ids[i : i + len(answer_ids)] == list(answer_ids) for i in range(len(ids)))
    assert ids != renderer.anthropic("t", body).ids


def test_errors_are_the_servers(live_server: LiveServer, renderer: PromptRenderer) -> None:
    cases = [
        ("nope", {"messages": [{"role": "user", "content": "Hi"}], "api": "nope"}),
        ("openai", {"messages": []}),
        ("openai", {"prompt": ["not", "ids"]}),
        ("openai", {"messages": [{"role": "wizard", "content": "Hi"}]}),
        ("anthropic", {"system": "x", "messages": [{"role": "user", "content": [{"type": "image"}]}]}),
        ("anthropic", {"messages": [{"role": "user", "content": [
            {"type": "text", "text": f"{i}", "cache_control": EPHEMERAL} for i in range(5)]}]}),
    ]  # fmt: skip
    for api, body in cases:
        assert explain_api(body) == api
        res = post(live_server, "/v1/cache/explain", body)
        assert res.status_code == 400, res.text
        with pytest.raises(APIError) as err:
            renderer.explain_ids(api, LOCAL_TENANT, body)
        assert err.value.status == 400 and err.value.openai_body() == res.json()
    with pytest.raises(APIError, match="messages"):
        renderer.openai_chat_ids(LOCAL_TENANT, {"prompt": "no messages"})
    with pytest.raises(APIError, match="prompt must be"):
        renderer.completion_prompts([])


# ---- the tokenizer's description -----------------------------------------------------------------------------------
TEXTS = [
    "",
    "Hello, world! How are you doing today?",
    "naïve café — résumé; Ελληνικά, русский, 日本語のテキスト, 🤗🚀",
    "spaces   between\t\ttabs  \n\n\n  and trailing   ",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "x<|endoftext|>y and <|im_end|>, <tool_call>{}</tool_call> 2024 3.14159",
    "<|user|> The quick brown fox jumps over the lazy dog.",
]
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Weather?"},
]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER_SCHEMA}}]


def assert_same_tokenizer(a: Tokenizer, b: Tokenizer) -> None:
    for text in TEXTS:
        for special in (True, False):
            assert a.encode(text, add_special_tokens=special) == b.encode(text, add_special_tokens=special)
        ids = a.encode(text)
        assert a.decode(ids, skip_special_tokens=False) == b.decode(ids, skip_special_tokens=False)
        assert a.decode(ids) == b.decode(ids)
    for tools in (None, TOOLS):
        for gen in (True, False):
            assert a.apply_chat_template(CHAT, tools=tools, add_generation_prompt=gen) == b.apply_chat_template(
                CHAT, tools=tools, add_generation_prompt=gen
            )
    assert (a.eos_token_ids, a.special_token_ids, a.vocab_size, a.model_max_length) == (
        b.eos_token_ids, b.special_token_ids, b.vocab_size, b.model_max_length
    )  # fmt: skip
    assert (a.bos_token_id, a.eos_token_id, a.pad_token_id) == (b.bos_token_id, b.eos_token_id, b.pad_token_id)
    assert a.digest() == b.digest()
    assert len(a.digest()) == 64 and int(a.digest(), 16) >= 0


def round_trip(tok: Tokenizer) -> Tokenizer:
    """Through JSON text, as over HTTP."""
    return Tokenizer.from_dict(json.loads(json.dumps(tok.to_dict())))


def test_default_model_tokenizer_round_trips() -> None:
    tok = Tokenizer.from_pretrained(DEFAULT_MODEL)
    again = round_trip(tok)
    assert_same_tokenizer(tok, again)
    assert again.to_dict() == tok.to_dict()
    assert round_trip(again).digest() == tok.digest()


def test_digest_tells_tokenizers_apart() -> None:
    tok = Tokenizer.from_pretrained(DEFAULT_MODEL)
    d = tok.to_dict()
    for change in ({"chat_templates": {"default": "{{ messages }}"}}, {"eos_token_ids": [0]},
                   {"special_tokens": {}}, {"model_max_length": 4096}):  # fmt: skip
        assert Tokenizer.from_dict({**d, **change}).digest() != tok.digest()


@pytest.mark.parametrize(
    "bad",
    [None, {}, {"tokenizer": 3}, {"tokenizer": "{not json"}, {"tokenizer": "{}", "eos_token_ids": ["2"]},
     {"tokenizer": "{}", "chat_templates": ["x"]}, {"tokenizer": "{}", "model_max_length": "8k"}],
)  # fmt: skip
def test_from_dict_refuses_what_is_not_a_description(bad: Any) -> None:
    with pytest.raises(ValueError):
        Tokenizer.from_dict(bad)


TEMPLATE = (
    "{% for m in messages %}<s>[{{ m.role }}] {{ m.content }}</s>{% endfor %}"
    "{% if tools %}{{ tools | tojson }}{% endif %}{% if add_generation_prompt %}[assistant]{% endif %}"
)


def test_gguf_tokenizer_round_trips(tmp_path: Path) -> None:
    """A SentencePiece-style GGUF tokenizer (byte fallback, a space prefix, BOS added): another tokenizers pipeline."""
    gguf = pytest.importorskip("gguf")
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers.models import BPE
    from tokenizers.pre_tokenizers import Metaspace
    from tokenizers.trainers import BpeTrainer

    from promptcache.model.gguf_tokenizer import tokenizer_from_gguf

    learner = RustTokenizer(BPE())
    learner.pre_tokenizer = Metaspace()
    corpus = [*TEXTS, *(m["content"] for m in CHAT)] * 3
    learner.train_from_iterator(corpus, BpeTrainer(vocab_size=200, show_progress=False))
    learned = [t for t, _ in sorted(learner.get_vocab().items(), key=lambda item: item[1])]
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *learned, "<|user|>"]
    types = [2, 3, 3] + [6] * 256 + [1] * len(learned) + [4]  # unknown, control, byte, normal, user-defined
    fields = {
        "tokenizer_model": "llama", "token_list": tokens, "token_types": types,
        "token_scores": [0.0] * 259 + [-float(i) for i in range(len(learned))] + [0.0],
        "bos_token_id": 1, "eos_token_id": 2, "unk_token_id": 0, "add_bos_token": True, "add_eos_token": False,
        "chat_template": TEMPLATE,
    }  # fmt: skip
    path = tmp_path / "spm.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    for name, value in fields.items():
        getattr(writer, f"add_{name}")(value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tok = tokenizer_from_gguf(gguf.GGUFReader(str(path)), path.name)
    assert tok.encode("Hi")[0] == 1  # BOS: the post-processor travels in the description
    again = round_trip(tok)
    assert_same_tokenizer(tok, again)
    assert tok.digest() != Tokenizer.from_pretrained(DEFAULT_MODEL).digest()
