"""A :class:`promptcache.tokenizer.Tokenizer` built from the tokenizer a GGUF file describes in its metadata.

A GGUF carries no ``tokenizer.json``: llama.cpp's converter stores the vocabulary, merges, scores, token types and
special ids as metadata (``tokenizer.ggml.*``) and llama.cpp rebuilds the tokenizer from them at load time. This
module rebuilds the same tokenizer as a ``tokenizers.Tokenizer``, so that prompts are split into exactly the ids
llama.cpp would give the model:

* ``tokenizer.ggml.model == "gpt2"``: byte-level BPE. The split of the text before BPE is not stored in the file,
  only its name (``tokenizer.ggml.pre``); :data:`PRE_TOKENIZER_SPLITS` maps each name to llama.cpp's regexes
  (``src/llama-vocab.cpp``, the ``regex_exprs`` of each ``LLAMA_VOCAB_PRE_TYPE_*``).
* ``tokenizer.ggml.model == "llama"``: SentencePiece-style BPE with byte fallback. The file has scores but no merges;
  llama.cpp merges the adjacent pair whose concatenation is the best-scoring vocabulary entry, which is BPE with
  every such pair as a merge, ranked by that score.

Only the metadata is read (``reader.fields``); tensors are never touched.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as _RustTokenizer
from tokenizers.models import BPE

from promptcache.tokenizer import Tokenizer

if TYPE_CHECKING:  # gguf is needed only by callers that already hold a reader; no import cost here
    import gguf

__all__ = [
    "END_OF_GENERATION_TEXTS",
    "PRE_TOKENIZER_SPLITS",
    "SUPPORTED_MODELS",
    "pre_tokenizer_for",
    "sentencepiece_merges",
    "tokenizer_from_gguf",
]

log = logging.getLogger(__name__)

SUPPORTED_MODELS = ("gpt2", "llama")

# tokenizer.ggml.token_type values (gguf.TokenType)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

_SPACE_MARK = "\u2581"  # SentencePiece's "▁", which stands for a space inside pieces

# ------------------------------------------------------------------------------------------ pre-tokenizer regexes
# Each name maps to the regexes llama.cpp applies one after the other: every regex splits each piece left by the
# previous one into its matches and the text between them, which is what a chain of `Split(..., "isolated")` does.
# Where llama.cpp had to rewrite a tokenizer.json regex for its own engine (no `(?i:...)`, no `\p{Lu}`) but keeps the
# original in a comment, the original is used: `tokenizers` runs Oniguruma, which supports both, and the original is
# what the model was trained with. Contractions keep llama.cpp's explicit `[sS]` form, which is what `(?i:'s)` means
# for ASCII letters without Unicode case folding (`'ſ` is not `'s`).

_CONTRACTIONS = "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN35 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_UPPER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]"
_LOWER = r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]"
_TEKKEN = (
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O = (
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_CONTRACTIONS}?"
    rf"|[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*{_CONTRACTIONS}?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SEED_CODER = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+"
_BAILINGMOE = (
    r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]|\s+(?!\S)|\s+"
)
# CJK ideographs, U+0800..U+4E00 and Hangul, as DeepSeek's tokenizer.json writes them.
_DEEPSEEK_CJK = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"
# DeepSeek LLM's letter class: the cased letters of Unicode, written out as ranges in its tokenizer.json.
_DEEPSEEK_LETTERS = (
    "A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af\u0370-\u0373"
    "\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481"
    "\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b"
    "\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b"
    "\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb"
    "\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128"
    "\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4"
    "\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf"
    "\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3"
    "\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943"
)
_DEEPSEEK_LLM = (
    r"[\r\n]",
    r"\s?[" + _DEEPSEEK_LETTERS + "]+",
    r"\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+",
    r"\s+$",
    _DEEPSEEK_CJK,
    r"\p{N}+",
)
_DEEPSEEK_CODER = (r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _DEEPSEEK_CJK, r"\p{N}")
_FALCON = (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, "[0-9][0-9][0-9]")
# What llama.cpp runs for "default" and for files without tokenizer.ggml.pre (converted before the key existed).
_LLAMACPP_DEFAULT = (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", "[0-9][0-9][0-9]")
# Every digit on its own, then the GPT-2 regex (StarCoder, SmolLM, ...). Built with `Digits`, see _split_sequence.
_DIGITS_THEN_GPT2 = (r"\p{N}", _GPT2)

PRE_TOKENIZER_SPLITS: dict[str, tuple[str, ...]] = {
    "default": _LLAMACPP_DEFAULT,
    **dict.fromkeys(
        ("gpt-2", "phi-2", "mpt", "olmo", "jais", "trillion", "granite-docling", "exaone4", "gigachat", "mellum"),
        (_GPT2,),
    ),
    **dict.fromkeys(
        (
            "llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx", "falcon3", "falcon-h1", "pixtral", "midm-2.0",
            "lfm2", "glm4", "chatglm-bpe",
        ),
        (_LLAMA3,),
    ),
    **dict.fromkeys(
        ("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez", "kormo", "hunyuan", "solar-open", "grok-2"),
        (_QWEN2,),
    ),
    "qwen35": (_QWEN35,),
    **dict.fromkeys(
        ("smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva-7b", "mellum2"),
        _DIGITS_THEN_GPT2,
    ),
    "tekken": (_TEKKEN,),
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "minimax-m2"), (_GPT4O,)),
    "seed-coder": (_SEED_CODER,),
    **dict.fromkeys(("bailingmoe", "bailingmoe2", "llada-moe"), (_BAILINGMOE,)),
    "deepseek-llm": _DEEPSEEK_LLM,
    "deepseek-coder": _DEEPSEEK_CODER,
    "falcon": _FALCON,
}  # fmt: skip

# Pre-tokenizers for which llama.cpp takes a whole piece that is itself a vocabulary entry as one token, skipping
# the merges (HF's `ignore_merges`), and turns BOS on when the file does not say.
_IGNORE_MERGES = frozenset(
    {"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2", "tekken"}
)
_ADD_BOS_BY_DEFAULT = _IGNORE_MERGES

# Token texts that end a turn; llama.cpp stops generation at any of them (its list, llama-vocab.cpp).
END_OF_GENERATION_TEXTS = frozenset(
    {
        "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>", "<end_of_turn>",
        "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]", "<|end_of_text|>",
        "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>", "<｜end▁of▁sentence｜>",
    }
)  # fmt: skip
# gpt-oss (harmony) marks these control, yet they are part of the visible channel syntax; llama.cpp renders them.
_ALWAYS_RENDERED = frozenset({"<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"})

# tokenizer.ggml.*_token_id key -> the name the Tokenizer passes to chat templates
_NAMED_SPECIAL_IDS = {
    "bos_token": "tokenizer.ggml.bos_token_id",
    "eos_token": "tokenizer.ggml.eos_token_id",
    "unk_token": "tokenizer.ggml.unknown_token_id",
    "pad_token": "tokenizer.ggml.padding_token_id",
    "sep_token": "tokenizer.ggml.seperator_token_id",  # sic: llama.cpp's spelling
    "mask_token": "tokenizer.ggml.mask_token_id",
}


# ---------------------------------------------------------------------------------------------------- public API


def tokenizer_from_gguf(reader: gguf.GGUFReader, source: str = "") -> Tokenizer:
    """Build the tokenizer that a GGUF file's metadata describes, tokenizing as llama.cpp does.

    Args:
        reader: an open ``gguf.GGUFReader`` (only ``reader.fields`` is read).
        source: the file's name, used in error messages.

    Returns:
        A :class:`~promptcache.tokenizer.Tokenizer` whose ``encode(text, add_special_tokens=True)`` adds BOS / EOS as
        the file says (``tokenizer.ggml.add_bos_token`` / ``add_eos_token``), whose ``eos_token_ids`` are every id
        that ends generation (EOS, EOT, EOM and the end-of-turn markers llama.cpp recognises by text), and whose chat
        template is ``tokenizer.chat_template`` (none if absent).

    Raises:
        ValueError: the file has no tokenizer (``tokenizer.ggml.tokens``), names a tokenizer model other than
            ``gpt2`` / ``llama``, is a ``gpt2`` model without merges, or holds inconsistent tokenizer metadata.
    """
    meta = _Metadata(reader, source or "GGUF file")
    vocab = _read_vocab(meta)
    specials = _special_ids(meta, vocab)

    if vocab.model == "gpt2":
        rust = _byte_level_tokenizer(meta, vocab)
        pre = meta.string("tokenizer.ggml.pre")
        add_bos_default = pre in _ADD_BOS_BY_DEFAULT
    else:
        rust = _sentencepiece_tokenizer(meta, vocab, specials.get("unk_token"))
        add_bos_default = True  # llama.cpp adds BOS to a SentencePiece vocabulary that does not say otherwise

    _add_special_tokens(rust, vocab)
    add_bos = meta.boolean("tokenizer.ggml.add_bos_token", add_bos_default)
    add_eos = meta.boolean("tokenizer.ggml.add_eos_token", False)
    rust.post_processor = _bos_eos_processor(meta, vocab, specials, add_bos, add_eos)

    names = {name: vocab.tokens[i] for name, i in specials.items() if i is not None}
    return Tokenizer(
        rust,
        chat_templates=_chat_templates(meta),
        special_tokens=names,
        eos_token_ids=_end_of_generation_ids(meta, vocab, specials),
        model_max_length=_context_length(meta),
    )


def pre_tokenizer_for(pre: str | None) -> pre_tokenizers.PreTokenizer:
    """The byte-level pre-tokenizer llama.cpp uses for ``tokenizer.ggml.pre == pre``: its regex splits, then bytes.

    ``None`` (files converted before the key existed) gets llama.cpp's "default" splits. An unknown name gets the
    GPT-2 regex and a logged warning: llama.cpp refuses to load such a file, but the GPT-2 split is right for most
    byte-level vocabularies and a slightly different split only costs a few tokens, so serving it is friendlier.
    """
    if pre is None:
        log.warning("GGUF tokenizer has no tokenizer.ggml.pre; using llama.cpp's default split (as llama.cpp does)")
        regexes = _LLAMACPP_DEFAULT
    elif pre in PRE_TOKENIZER_SPLITS:
        regexes = PRE_TOKENIZER_SPLITS[pre]
    else:
        log.warning("unknown GGUF pre-tokenizer %r (tokenizer.ggml.pre); splitting text with the GPT-2 regex", pre)
        regexes = (_GPT2,)
    return pre_tokenizers.Sequence(
        [*_split_sequence(regexes), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )


# ---------------------------------------------------------------------------------------------------- metadata


class _Metadata:
    """Typed access to a reader's fields; a value of the wrong type is a ValueError naming the file and key."""

    def __init__(self, reader: gguf.GGUFReader, source: str) -> None:
        self.fields = reader.fields
        self.source = source

    def error(self, message: str) -> ValueError:
        return ValueError(f"{self.source}: {message}")

    def get(self, key: str) -> Any:
        field = self.fields.get(key)
        return None if field is None else field.contents()

    def string(self, key: str) -> str | None:
        value = self.get(key)
        if value is not None and not isinstance(value, str):
            raise self.error(f"{key} should be a string, not {type(value).__name__}")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.get(key)
        if value is None:
            return default
        if not isinstance(value, (bool, int)):
            raise self.error(f"{key} should be a boolean, not {type(value).__name__}")
        return bool(value)

    def integer(self, key: str) -> int | None:
        value = self.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise self.error(f"{key} should be an integer, not {type(value).__name__}")
        return value

    def array(self, key: str, kind: type | tuple[type, ...]) -> list[Any] | None:
        value = self.get(key)
        if value is None:
            return None
        if not isinstance(value, list) or not all(isinstance(v, kind) for v in value):
            raise self.error(f"{key} should be an array of {getattr(kind, '__name__', kind)}")
        return value


@dataclass(frozen=True)
class _Vocab:
    model: str
    tokens: list[str]
    types: list[int]
    scores: list[float]


def _read_vocab(meta: _Metadata) -> _Vocab:
    tokens = meta.array("tokenizer.ggml.tokens", str)
    if not tokens:
        raise meta.error("has no tokenizer data (tokenizer.ggml.tokens)")
    model = meta.string("tokenizer.ggml.model")
    if model not in SUPPORTED_MODELS:
        supported = ", ".join(SUPPORTED_MODELS)
        raise meta.error(f"tokenizer model {model!r} (tokenizer.ggml.model) is not supported; supported: {supported}")
    n = len(tokens)
    types = meta.array("tokenizer.ggml.token_type", int) or [_NORMAL] * n
    scores = meta.array("tokenizer.ggml.scores", (float, int)) or [0.0] * n
    if len(types) < n or len(scores) < n:
        raise meta.error(f"tokenizer.ggml.token_type / scores are shorter than the {n} tokens")
    tokens = list(tokens)
    seen: dict[str, int] = {}
    for i, text in enumerate(tokens):
        if not text:  # llama.cpp's stand-in, so that every id keeps a distinct, non-empty entry
            text = tokens[i] = f"[EMPTY_{i}]"
        if text in seen:  # a vocabulary maps text -> one id; llama.cpp refuses such files too
            raise meta.error(f"duplicate token {text!r} in tokenizer.ggml.tokens (ids {seen[text]} and {i})")
        seen[text] = i
    return _Vocab(model, tokens, list(types[:n]), [float(s) for s in scores[:n]])


def _special_ids(meta: _Metadata, vocab: _Vocab) -> dict[str, int | None]:
    """Named special token -> id; out-of-range ids are dropped with a warning, as llama.cpp does."""
    n = len(vocab.tokens)
    # llama.cpp's defaults for a SentencePiece vocabulary that names none: <unk> 0, <s> 1, </s> 2.
    defaults = {"unk_token": 0, "bos_token": 1, "eos_token": 2} if vocab.model == "llama" else {}
    ids: dict[str, int | None] = {}
    for name, key in _NAMED_SPECIAL_IDS.items():
        value = meta.integer(key)
        if value is None:
            value = defaults.get(name)
        elif not 0 <= value < n:
            log.warning("%s: %s = %d is outside the vocabulary of %d tokens; ignored", meta.source, key, value, n)
            value = defaults.get(name)
        ids[name] = value if value is not None and value < n else None
    return ids


def _context_length(meta: _Metadata) -> int | None:
    arch = meta.string("general.architecture")
    value = meta.get(f"{arch}.context_length") if arch else None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _chat_templates(meta: _Metadata) -> dict[str, str]:
    """``tokenizer.chat_template`` as "default", plus named ones (``tokenizer.chat_template.<name>``)."""
    templates: dict[str, str] = {}
    prefix = "tokenizer.chat_template."
    for key in meta.fields:
        if key.startswith(prefix) and (source := meta.string(key)):
            templates[key[len(prefix) :]] = source
    if default := meta.string("tokenizer.chat_template"):
        templates["default"] = default
    return templates


# ---------------------------------------------------------------------------------------------------- models


def _byte_level_tokenizer(meta: _Metadata, vocab: _Vocab) -> _RustTokenizer:
    raw_merges = meta.array("tokenizer.ggml.merges", str)
    if not raw_merges:
        raise meta.error("is a byte-level BPE (gpt2) tokenizer without merges (tokenizer.ggml.merges)")
    ids = {t: i for i, t in enumerate(vocab.tokens)}
    merges: list[tuple[str, str]] = []
    dropped = 0
    for line in raw_merges:
        # Split at the first space after the first character, as llama.cpp does: a leading space belongs to the
        # left piece (never the case in byte-level spelling, where a space is "Ġ", but harmless to honour).
        cut = line.find(" ", 1)
        left, right = (line[:cut], line[cut + 1 :]) if cut > 0 else ("", "")
        # `tokenizers` refuses a merge whose pieces or result are not in the vocabulary; llama.cpp merely never
        # uses it, so leaving it out tokenizes the same.
        if left in ids and right in ids and left + right in ids:
            merges.append((left, right))
        else:
            dropped += 1
    if dropped:
        log.warning("%s: %d merges name tokens outside the vocabulary; ignored", meta.source, dropped)
    pre = meta.string("tokenizer.ggml.pre")
    model = BPE(vocab=ids, merges=merges, fuse_unk=False, byte_fallback=False, ignore_merges=pre in _IGNORE_MERGES)
    rust = _RustTokenizer(model)
    rust.pre_tokenizer = pre_tokenizer_for(pre)
    rust.decoder = decoders.ByteLevel()
    return rust


def _sentencepiece_tokenizer(meta: _Metadata, vocab: _Vocab, unk_id: int | None) -> _RustTokenizer:
    ids = {t: i for i, t in enumerate(vocab.tokens)}
    unk = vocab.tokens[unk_id] if unk_id is not None else None
    model = BPE(
        vocab=ids,
        merges=sentencepiece_merges(vocab.tokens, vocab.scores),
        unk_token=unk,
        fuse_unk=True,  # SentencePiece emits one <unk> for a run of unknown characters
        byte_fallback=True,  # characters outside the vocabulary become their UTF-8 bytes, <0x..> tokens
    )
    rust = _RustTokenizer(model)
    add_prefix = meta.boolean("tokenizer.ggml.add_space_prefix", True)
    # A normalizer, not a pre-tokenizer, so that the space is prepended to every stretch of text between added
    # tokens: llama.cpp prefixes a space to each text fragment that follows a special token, not only the first.
    steps: list[normalizers.Normalizer] = [normalizers.Prepend(_SPACE_MARK)] if add_prefix else []
    rust.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", _SPACE_MARK)])
    rust.pre_tokenizer = None
    parts: list[decoders.Decoder] = [decoders.Replace(_SPACE_MARK, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix:  # take back the space the normalizer added (llama.cpp drops it from the first piece)
        parts.append(decoders.Strip(" ", 1, 0))
    rust.decoder = decoders.Sequence(parts)
    return rust


def sentencepiece_merges(tokens: Sequence[str], scores: Sequence[float]) -> list[tuple[str, str]]:
    """BPE merges equivalent to llama.cpp's SentencePiece merging, from the vocabulary and scores.

    llama.cpp repeatedly joins the adjacent pair whose concatenation is the highest-scoring vocabulary entry. Every
    split of an entry into two entries is therefore a merge, ranked by the entry's score (highest first); equal
    scores go to the lower id, which is the earlier-learned piece in a SentencePiece vocabulary.
    """
    index = {t: i for i, t in enumerate(tokens)}
    ranked: list[tuple[float, int, int, str, str]] = []
    for i, text in enumerate(tokens):
        for cut in range(1, len(text)):
            left, right = text[:cut], text[cut:]
            if left in index and right in index:
                ranked.append((-scores[i], i, cut, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _split_sequence(regexes: Sequence[str]) -> list[pre_tokenizers.PreTokenizer]:
    steps: list[pre_tokenizers.PreTokenizer] = []
    for regex in regexes:
        if regex == r"\p{N}":  # every digit on its own; `Digits` does it without a regex (same \p{N} set)
            steps.append(pre_tokenizers.Digits(individual_digits=True))
        else:
            steps.append(pre_tokenizers.Split(Regex(regex), behavior="isolated"))
    return steps


# ---------------------------------------------------------------------------------------------------- special tokens


def _byte_alphabet() -> frozenset[str]:
    """The 256 characters byte-level BPE spells bytes with: printable Latin-1 as itself, the rest from U+0100 up."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    return frozenset(chr(c) for c in printable) | frozenset(chr(256 + k) for k in range(256 - len(printable)))


def _add_special_tokens(rust: _RustTokenizer, vocab: _Vocab) -> None:
    """Control (and unknown) tokens become special added tokens, user-defined ones plain added tokens.

    Added tokens are matched whole in the text before the model splits it, as llama.cpp's special-token partition
    does, and special ones are dropped by ``decode(skip_special_tokens=True)``. They are never normalized: llama.cpp
    matches the raw text.
    """
    alphabet = _byte_alphabet() if vocab.model == "gpt2" else None
    special: list[AddedToken] = []
    plain: list[AddedToken] = []
    for text, kind in zip(vocab.tokens, vocab.types):
        if text in _ALWAYS_RENDERED and kind in (_CONTROL, _USER_DEFINED):
            plain.append(AddedToken(text, special=False, normalized=False))
        elif kind in (_CONTROL, _UNKNOWN):
            # In a byte-level vocabulary every real token is spelled in the byte alphabet; a "control" token that is
            # not is a conversion mislabel (llama.cpp's converter marks some), and matching it would be wrong.
            if alphabet is not None and not set(text) <= alphabet:
                continue
            special.append(AddedToken(text, special=True, normalized=False))
        elif kind == _USER_DEFINED:
            plain.append(AddedToken(text, special=False, normalized=False))
    if special:
        rust.add_special_tokens(special)
    if plain:
        rust.add_tokens(plain)


def _bos_eos_processor(
    meta: _Metadata, vocab: _Vocab, specials: dict[str, int | None], add_bos: bool, add_eos: bool
) -> processors.PostProcessor | None:
    """A TemplateProcessing that adds BOS / EOS when ``add_special_tokens=True``, or None if neither is added."""
    pieces: dict[str, tuple[str, int]] = {}
    for flag, name in ((add_bos, "bos_token"), (add_eos, "eos_token")):
        if not flag:
            continue
        token_id = specials.get(name)
        if token_id is None:  # llama.cpp refuses such a file as well
            raise meta.error(f"tokenizer.ggml.add_{name} is true, but the file has no valid {name} id")
        text = vocab.tokens[token_id]
        # The template syntax reads "name:type_id"; a token text with a colon gets a stand-in name (ids are kept).
        pieces[name] = (text if ":" not in text else f"<{name}>", token_id)
    if not pieces:
        return None
    head = [pieces["bos_token"][0]] if "bos_token" in pieces else []
    tail = [pieces["eos_token"][0]] if "eos_token" in pieces else []
    return processors.TemplateProcessing(
        single=[*head, "$A", *tail],
        pair=[*head, "$A", *tail, *head, "$B:1", *tail],
        special_tokens=list(dict.fromkeys(pieces.values())),
    )


def _end_of_generation_ids(meta: _Metadata, vocab: _Vocab, specials: dict[str, int | None]) -> list[int]:
    """EOS, EOT and EOM ids, then every control / user-defined token whose text marks the end of a turn."""
    n = len(vocab.tokens)
    named = [specials.get("eos_token"), meta.integer("tokenizer.ggml.eot_token_id")]
    named.append(meta.integer("tokenizer.ggml.eom_token_id"))
    by_text = {
        i
        for i, (text, kind) in enumerate(zip(vocab.tokens, vocab.types))
        if text in END_OF_GENERATION_TEXTS and kind in (_CONTROL, _USER_DEFINED)
    }
    texts = {vocab.tokens[i]: i for i in by_text}
    # llama.cpp's two exceptions: in gpt-oss (harmony, with <|return|> and <|call|>) and solar-open <|end|> closes a
    # message, not the generation; with Gemma 4's <|tool_response>, </s> is an ordinary token.
    if "<|end|>" in texts and (
        ("<|return|>" in texts and "<|call|>" in texts) or ("<|calls|>" in texts and "<|flush|>" in texts)
    ):
        by_text.discard(texts["<|end|>"])
    if "</s>" in texts and "<|tool_response>" in texts:
        by_text.discard(texts["</s>"])
    ids = [i for i in named if i is not None and 0 <= i < n]
    return list(dict.fromkeys([*ids, *sorted(by_text)]))
