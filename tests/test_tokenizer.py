"""The tokenizer layer against transformers, and the embedded default model's files."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import pytest

import promptcache.tokenizer as tokenizer_module
from promptcache.tokenizer import ChatTemplateError, IncrementalDetokenizer, Tokenizer

DEFAULT_MODEL = Path(tokenizer_module.__file__).resolve().parent / "data" / "default_model"
_REPLACEMENT = "\ufffd"

TEXTS = [
    "",
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog. It's 3.14159 o'clock; we'll see, they've gone.",
    "  leading and trailing spaces   ",
    "tabs\tand\nnewlines\r\nand\n\n\nblank lines\n",
    "    four-space indent\n\tone tab\n \t mixed",
    "def fib(n: int) -> int:\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    'for (int i = 0; i < n; ++i) { printf("%d\\n", a[i]); }',
    '{"key": [1, 2.5, null, true], "nested": {"emoji": "\\ud83d\\ude00"}}',
    "naïve café résumé — “quotes” and ‘apostrophes’ … ½ × ÷ ≠ ≤ ∞",
    "日本語のテキストと中文文本，한국어 텍스트",
    "Привет, мир! Ελληνικά. العربية. עברית. हिन्दी. ไทย",
    "emoji: 😀 👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️ 🧑🏿‍🚀",
    "combining: e\u0301 a\u0308 n\u0303 and zero\u200bwidth\u200djoiner",
    "numbers 1234567890 0.001 -42 1e-9 ١٢٣",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text<tool_call>{}</tool_call>",
    "<|im_start without end, <| im_end |>, <tool_call",
    "\x00\x01\x7f control characters \u2028 line separator",
    "a" * 300 + " " + "ab" * 200,
    "https://example.com/path?query=1&x=%20#frag user@example.org",
]


def _random_unicode(rng: random.Random, n: int) -> str:
    ranges = [(0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x3FF), (0x400, 0x4FF), (0x4E00, 0x4FFF), (0x1F300, 0x1F64F)]
    out = []
    for _ in range(n):
        lo, hi = rng.choice(ranges)
        out.append(chr(rng.randint(lo, hi)) if rng.random() > 0.15 else rng.choice(" \n\t"))
    return "".join(out)


RANDOM_TEXTS = [_random_unicode(random.Random(seed), 200) for seed in range(10)]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_pretrained(DEFAULT_MODEL)


@pytest.fixture(scope="module")
def hf() -> Any:
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(DEFAULT_MODEL))


# ----------------------------------------------------------------------------------------- default model


def test_default_model_folder_is_small_and_long_context() -> None:
    files = {f.name: f.stat().st_size for f in DEFAULT_MODEL.iterdir() if f.is_file()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= set(files)
    assert {"tokenizer_config.json"} <= set(files)
    assert sum(files.values()) <= 30 * 1024 * 1024
    config = json.loads((DEFAULT_MODEL / "config.json").read_text())
    assert config["max_position_embeddings"] >= 8192
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["vocab_size"] == 8192
    assert config["tie_word_embeddings"] is True


def test_default_model_weights_match_config() -> None:
    from safetensors import safe_open

    config = json.loads((DEFAULT_MODEL / "config.json").read_text())
    with safe_open(str(DEFAULT_MODEL / "model.safetensors"), framework="pt") as st:
        names = set(st.keys())
        embed = st.get_slice("model.embed_tokens.weight").get_shape()
    assert "lm_head.weight" not in names  # tied
    assert embed == [config["vocab_size"], config["hidden_size"]]
    for layer in range(config["num_hidden_layers"]):
        assert f"model.layers.{layer}.self_attn.k_proj.weight" in names
    assert "model.norm.weight" in names


def test_default_vocab_and_special_tokens(tok: Tokenizer) -> None:
    assert tok.vocab_size == len(tok) == 8192
    assert tok.token_to_id("<|endoftext|>") == 0
    assert tok.token_to_id("<|im_start|>") == 1
    assert tok.token_to_id("<|im_end|>") == 2
    assert tok.bos_token_id is None
    assert tok.eos_token_id == 2
    assert tok.pad_token_id == 0
    assert tok.special_token_ids == frozenset({0, 1, 2})
    # tool-call markers are single, non-special tokens: they survive decode(skip_special_tokens=True)
    ids = tok.encode("<tool_call>x</tool_call>")
    assert ids[0] == tok.token_to_id("<tool_call>") and ids[-1] == tok.token_to_id("</tool_call>")
    assert tok.decode(ids) == "<tool_call>x</tool_call>"
    assert tok.model_max_length == 8192


def test_eos_ids_are_union_of_tokenizer_and_generation_config(tok: Tokenizer) -> None:
    assert tok.eos_token_ids == [2, 0]


# ------------------------------------------------------------------------------------ parity with HF


@pytest.mark.parametrize("text", TEXTS + RANDOM_TEXTS)
def test_encode_matches_transformers(tok: Tokenizer, hf: Any, text: str) -> None:
    for add_special in (True, False):
        ids = tok.encode(text, add_special_tokens=add_special)
        assert ids == hf.encode(text, add_special_tokens=add_special)
    ids = tok.encode(text)
    assert tok.decode(ids, skip_special_tokens=False) == text  # byte-level BPE is lossless
    assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    assert tok.convert_ids_to_tokens(ids) == hf.convert_ids_to_tokens(ids)


def test_encode_batch(tok: Tokenizer) -> None:
    assert tok.encode_batch(TEXTS) == [tok.encode(t) for t in TEXTS]


def test_decode_random_ids_matches_transformers(tok: Tokenizer, hf: Any) -> None:
    rng = random.Random(1)
    for _ in range(50):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 60))]
        for skip in (True, False):
            assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city — “quoted” and <b>html</b>",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["C", "F"]}},
                "required": ["city"],
            },
        },
    },
    {"type": "function", "function": {"name": "now", "description": "The time", "parameters": {"type": "object"}}},
]

CONVERSATIONS: dict[str, tuple[list[dict[str, Any]], list[dict[str, Any]] | None]] = {
    "plain": ([{"role": "user", "content": "Hello!"}], None),
    "multi_turn": (
        [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "Tell me a joke 😀\n\nwith two paragraphs"},
        ],
        None,
    ),
    "system": (
        [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3+3?"},
        ],
        None,
    ),
    "list_content": (
        [
            {"role": "system", "content": [{"type": "text", "text": "System as parts."}]},
            {
                "role": "user",
                "content": [{"type": "text", "text": "first part"}, {"type": "text", "text": "second part"}],
            },
            {"role": "assistant", "content": [{"type": "text", "text": "ok"}]},
        ],
        None,
    ),
    "tools": (
        [
            {"role": "system", "content": "Use tools when useful."},
            {"role": "user", "content": "Weather in Paris?"},
        ],
        TOOLS,
    ),
    "tools_no_system": ([{"role": "user", "content": "What time is it?"}], TOOLS),
    "tool_calls": (
        [
            {"role": "user", "content": "Weather in Paris and Tokyo?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    },
                    {
                        "id": "call_2",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": {"city": "Tokyo", "unit": "C"}},
                    },
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 18}'},
            {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": '{"temp": 25}'}]},
            {"role": "assistant", "content": "Paris 18°C, Tokyo 25°C."},
            {"role": "user", "content": "Thanks"},
        ],
        TOOLS,
    ),
    "tool_call_with_text": (
        [
            {"role": "user", "content": "time?"},
            {
                "role": "assistant",
                "content": "Let me check.",
                "tool_calls": [{"type": "function", "function": {"name": "now", "arguments": "{}"}}],
            },
            {"role": "tool", "content": "12:00"},
        ],
        TOOLS,
    ),
}


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(tok: Tokenizer, hf: Any, name: str, add_generation_prompt: bool) -> None:
    messages, tools = CONVERSATIONS[name]
    ours = tok.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt)
    theirs = hf.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt, tokenize=False)
    assert ours == theirs
    assert tok.encode(ours, add_special_tokens=False) == hf.encode(theirs, add_special_tokens=False)
    assert ours.endswith("<|im_start|>assistant\n") == add_generation_prompt


def test_chat_template_shape(tok: Tokenizer) -> None:
    text = tok.apply_chat_template(
        [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}], add_generation_prompt=True
    )
    assert text == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
    messages, tools = CONVERSATIONS["tool_calls"]
    text = tok.apply_chat_template(messages, tools=tools)
    assert "<tools>\n" + json.dumps(TOOLS[0], ensure_ascii=False) in text
    # a JSON-string argument is copied verbatim, an object is serialised
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert '{"name": "get_weather", "arguments": {"city": "Tokyo", "unit": "C"}}' in text
    assert '<|im_start|>user\n<tool_response>\n{"temp": 18}\n</tool_response>\n<tool_response>\n' in text
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]).endswith("<|im_start|>assistant\n")


def test_chat_template_errors(tok: Tokenizer, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="empty"):
        tok.apply_chat_template([])
    folder = _copy_tokenizer(tmp_path)
    (folder / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if m.role == 'bad' %}{{ raise_exception('no bad roles') }}{% endif %}"
        "{{ bos_token }}[{{ m.role }}:{{ m.content }}|{{ flag }}]{% endfor %}{{ eos_token }}"
    )
    custom = Tokenizer.from_pretrained(folder)  # chat_template.jinja wins over tokenizer_config.json
    assert custom.apply_chat_template([{"role": "user", "content": "x"}], flag=7) == "[user:x|7]<|im_end|>"
    with pytest.raises(ChatTemplateError, match="no bad roles"):
        custom.apply_chat_template([{"role": "bad", "content": "x"}])


def test_no_chat_template(tmp_path: Path) -> None:
    folder = tmp_path / "bare"
    folder.mkdir()
    shutil.copy(DEFAULT_MODEL / "tokenizer.json", folder)
    bare = Tokenizer.from_pretrained(folder)
    assert bare.eos_token_ids == [] and bare.bos_token_id is None
    with pytest.raises(ValueError, match="no chat template"):
        bare.apply_chat_template([{"role": "user", "content": "x"}])


# -------------------------------------------------------------------------------------- loading errors


def _copy_tokenizer(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEFAULT_MODEL / name, folder)
    return folder


def test_missing_tokenizer_json_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        Tokenizer.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"missing tokenizer\.json"):
        Tokenizer.from_pretrained(tmp_path)


def test_invalid_json_is_named(tmp_path: Path) -> None:
    folder = _copy_tokenizer(tmp_path)
    (folder / "generation_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"generation_config\.json"):
        Tokenizer.from_pretrained(folder)


def test_eos_ids_from_every_source(tmp_path: Path) -> None:
    folder = _copy_tokenizer(tmp_path)
    (folder / "config.json").write_text(json.dumps({"eos_token_id": 5, "bos_token_id": 7}))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0, 9]}))
    loaded = Tokenizer.from_pretrained(folder)
    assert loaded.eos_token_ids == [2, 0, 9, 5]  # tokenizer's eos first, no duplicates
    assert loaded.bos_token_id is None  # the tokenizer's bos_token decides, not config.json


# ------------------------------------------------------------------------------ incremental detokenizer


def _stream(tok: Tokenizer, ids: list[int], skip: bool = True, prompt: list[int] | None = None) -> str:
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip, prompt_ids=prompt or [])
    pieces = [detok.push(i) for i in ids]
    pieces.append(detok.finish())
    assert not any(p.endswith(_REPLACEMENT) for p in pieces[:-1])  # incomplete characters are held back
    assert "".join(pieces) == detok.text
    assert detok.token_ids == ids
    return detok.text


@pytest.mark.parametrize("text", TEXTS + RANDOM_TEXTS)
def test_incremental_detokenizer_on_real_text(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    for skip in (True, False):
        assert _stream(tok, ids, skip) == tok.decode(ids, skip_special_tokens=skip)


def test_incremental_detokenizer_on_random_ids(tok: Tokenizer) -> None:
    rng = random.Random(0)
    byte_tokens = [i for i in range(tok.vocab_size) if len(tok.id_to_token(i) or "") == 1]  # single bytes
    for trial in range(200):
        pool = byte_tokens if trial % 2 else range(tok.vocab_size)
        ids = [rng.choice(pool) for _ in range(rng.randint(1, 80))]
        skip = trial % 3 != 0
        assert _stream(tok, ids, skip) == tok.decode(ids, skip_special_tokens=skip)


def test_incremental_detokenizer_holds_back_split_characters(tok: Tokenizer) -> None:
    ids = tok.encode("😀")
    assert len(ids) > 1  # a rare 4-byte character is split across byte tokens
    detok = IncrementalDetokenizer(tok)
    assert [detok.push(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.push(ids[-1]) == "😀"
    assert detok.finish() == ""
    # an incomplete character at the end comes out of finish() as U+FFFD, as decode() gives it
    detok = IncrementalDetokenizer(tok)
    assert detok.extend(tok.encode("ok ") + ids[:-1]) == "ok "
    assert detok.finish() == tok.decode(tok.encode("ok ") + ids[:-1])[3:] == _REPLACEMENT
    assert detok.text == "ok " + _REPLACEMENT


def test_incremental_detokenizer_with_prompt_context(tok: Tokenizer) -> None:
    prompt = tok.encode("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    gen = tok.encode("Sure — here it is: 日本 😀<|im_end|>")
    assert _stream(tok, gen, prompt=prompt) == tok.decode(prompt + gen)[len(tok.decode(prompt)) :]


def test_incremental_detokenizer_decodes_a_bounded_window(tok: Tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    ids = tok.encode(" ".join(RANDOM_TEXTS) * 3)
    assert len(ids) > 2000
    widths: list[int] = []
    real_decode = tok.decode

    def spy(window: Any, skip_special_tokens: bool = True) -> str:
        widths.append(len(window))
        return real_decode(window, skip_special_tokens)

    detok = IncrementalDetokenizer(tok)
    monkeypatch.setattr(tok, "decode", spy)
    for i in ids:
        detok.push(i)
    detok.finish()
    monkeypatch.undo()
    assert detok.text == tok.decode(ids)
    assert max(widths) <= 8  # O(1) per token, not the whole sequence
