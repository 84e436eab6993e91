"""Tokenizer of a Hugging Face model folder, without ``transformers``: ``tokenizers`` for text <-> ids, a sandboxed
``jinja2`` environment for chat templates, and a streaming detokenizer.

The results match ``transformers.AutoTokenizer`` for the same folder (encode, decode, ``apply_chat_template(...,
tokenize=False)``); ``tests/test_tokenizer.py`` checks that.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _RustTokenizer

__all__ = ["ChatTemplateError", "IncrementalDetokenizer", "Tokenizer"]

# The named special tokens that HF passes to a chat template as variables (when set).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Names under which a message's reasoning may arrive; HF fills the first two from any of them.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_REPLACEMENT_CHAR = "\ufffd"


class ChatTemplateError(ValueError):
    """A chat template failed to render: a ``raise_exception`` in the template, or a template error."""


class Tokenizer:
    """Text <-> token ids and chat formatting for one model; immutable and safe to share between threads."""

    def __init__(
        self,
        tokenizer: _RustTokenizer,
        *,
        chat_templates: Mapping[str, str] | None = None,
        special_tokens: Mapping[str, str] | None = None,
        eos_token_ids: Sequence[int] = (),
        model_max_length: int | None = None,
    ) -> None:
        """Wrap a ``tokenizers.Tokenizer``; most callers want :meth:`from_pretrained`.

        Args:
            tokenizer: the Rust tokenizer (from ``tokenizer.json``). Truncation and padding are switched off.
            chat_templates: template name -> Jinja source; ``"default"`` is used unless tools are given and a
                ``"tool_use"`` template exists (HF's rule).
            special_tokens: named special tokens (``bos_token``, ``eos_token``, ...) -> their text; the set ones
                are passed to chat templates as variables.
            eos_token_ids: ids that end generation.
            model_max_length: the longest input the model takes, if known.
        """
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self._tok = tokenizer
        self.chat_templates: dict[str, str] = dict(chat_templates or {})
        self.special_tokens: dict[str, str] = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self.eos_token_ids: list[int] = list(dict.fromkeys(eos_token_ids))
        self.model_max_length = model_max_length
        self.vocab_size: int = tokenizer.get_vocab_size(with_added_tokens=True)
        self.special_token_ids: frozenset[int] = frozenset(
            i for i, tok in tokenizer.get_added_tokens_decoder().items() if tok.special
        )
        self.bos_token_id: int | None = self._named_id("bos_token")
        self.eos_token_id: int | None = self._named_id("eos_token")
        self.pad_token_id: int | None = self._named_id("pad_token")
        self._digest: str | None = None  # computed on first use: hashing the whole vocabulary takes a while

    # ----------------------------------------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        """Load the tokenizer of a Hugging Face model folder.

        Reads ``tokenizer.json`` (required), ``tokenizer_config.json`` (special tokens, chat template, max length),
        the chat template from ``chat_template.jinja`` / ``chat_template.json`` / ``additional_chat_templates/`` when
        present (they win over the one in ``tokenizer_config.json``, as in HF), and the end-of-sequence ids from
        ``generation_config.json`` and ``config.json``.

        Raises:
            ValueError: the folder does not exist or lacks ``tokenizer.json``, or a file is not valid JSON.
        """
        folder = Path(path)
        if not folder.is_dir():
            raise ValueError(f"tokenizer folder {folder} does not exist")
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ValueError(
                f"tokenizer folder {folder} is missing tokenizer.json (only fast, tokenizers-format tokenizers "
                "are supported; convert a slow one with transformers' AutoTokenizer(...).save_pretrained)"
            )
        try:
            rust = _RustTokenizer.from_file(str(tokenizer_file))
        except Exception as exc:  # the Rust side raises a plain Exception
            raise ValueError(f"cannot read {tokenizer_file}: {exc}") from exc
        tok_config = _read_json(folder / "tokenizer_config.json")
        special = {name: _token_text(tok_config.get(name)) for name in SPECIAL_TOKEN_NAMES}

        templates = _chat_templates(folder, tok_config)

        eos_ids: list[int] = []
        if special["eos_token"] is not None and (i := rust.token_to_id(special["eos_token"])) is not None:
            eos_ids.append(i)
        for name in ("generation_config.json", "config.json"):
            eos_ids += _as_id_list(_read_json(folder / name).get("eos_token_id"))

        max_len = tok_config.get("model_max_length")
        max_len = int(max_len) if isinstance(max_len, (int, float)) and max_len < 1e12 else None
        return cls(
            rust,
            chat_templates=templates,
            special_tokens=special,
            eos_token_ids=eos_ids,
            model_max_length=max_len,
        )

    # ----------------------------------------------------------------------------------------- serialization

    def to_dict(self) -> dict[str, Any]:
        """Everything that defines this tokenizer, as JSON-serializable data (for :meth:`from_dict`).

        A fleet router rebuilds a replica's exact tokenizer from this (sent over HTTP) to tokenize requests the
        same way. Keys: ``tokenizer`` (the Rust tokenizer's JSON, as ``tokenizer.json`` holds it),
        ``chat_templates``, ``special_tokens``, ``eos_token_ids``, ``model_max_length``.
        """
        return {
            "tokenizer": self._tok.to_str(),
            "chat_templates": dict(self.chat_templates),
            "special_tokens": dict(self.special_tokens),
            "eos_token_ids": list(self.eos_token_ids),
            "model_max_length": self.model_max_length,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Tokenizer:
        """The tokenizer that :meth:`to_dict` described (same ids, same chat text, same :meth:`digest`).

        Raises:
            ValueError: ``data`` is not such a description (a missing or mistyped field, an unreadable tokenizer).
        """
        if not isinstance(data, Mapping) or not isinstance(data.get("tokenizer"), str):
            raise ValueError("a tokenizer description needs 'tokenizer': the Rust tokenizer's JSON as a string")
        templates, special = data.get("chat_templates") or {}, data.get("special_tokens") or {}
        eos_ids, max_len = data.get("eos_token_ids") or [], data.get("model_max_length")
        # Checked here because the data may come over the network: a wrong type would fail later, far from here.
        if not isinstance(templates, Mapping) or not all(isinstance(v, str) for v in templates.values()):
            raise ValueError("a tokenizer description's 'chat_templates' must map names to template sources")
        if not isinstance(special, Mapping) or not all(isinstance(v, str) for v in special.values()):
            raise ValueError("a tokenizer description's 'special_tokens' must map names to token texts")
        if not isinstance(eos_ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in eos_ids):
            raise ValueError("a tokenizer description's 'eos_token_ids' must be a list of ids")
        if max_len is not None and (not isinstance(max_len, int) or isinstance(max_len, bool)):
            raise ValueError("a tokenizer description's 'model_max_length' must be an integer or null")
        try:
            rust = _RustTokenizer.from_str(data["tokenizer"])
        except Exception as exc:  # the Rust side raises a plain Exception
            raise ValueError(f"cannot read the tokenizer description's tokenizer: {exc}") from exc
        return cls(rust, chat_templates=templates, special_tokens=special, eos_token_ids=eos_ids,
                   model_max_length=max_len)  # fmt: skip

    def digest(self) -> str:
        """A SHA-256 (hex) of :meth:`to_dict`: two processes with equal digests tokenize and render alike.

        The Rust tokenizer's JSON is parsed and written back with sorted keys, like the rest, so the digest does
        not depend on how that JSON happens to be laid out.
        """
        if self._digest is None:  # a race computes it twice, to the same value: no lock needed
            data = self.to_dict()
            data["tokenizer"] = json.loads(data["tokenizer"])
            canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
            self._digest = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
        return self._digest

    # ------------------------------------------------------------------------------------------ text <-> ids

    def to_json(self) -> str:
        """The ``tokenizers`` JSON of this tokenizer (what grammar engines build their token tables from)."""
        return self._tok.to_str()

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; ``add_special_tokens`` applies ``tokenizer.json``'s post-processor (e.g. a BOS).

        Special tokens written in the text (``<|im_start|>``) become their ids, as in HF.
        """
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_with_offsets(self, text: str, add_special_tokens: bool = False) -> tuple[list[int], list[int]]:
        """Token ids of ``text`` and the character offset where each token ends."""
        if not text:
            return [], []
        enc = self._tok.encode(text, add_special_tokens=add_special_tokens)
        return list(enc.ids), [end for _, end in enc.offsets]

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        """:meth:`encode` of several texts at once (in parallel on the Rust side)."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """The text of ``ids``; incomplete UTF-8 sequences become U+FFFD, as in HF."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str | None]:
        """The vocabulary entry (piece) of each id; ``None`` for an id outside the vocabulary."""
        return [self._tok.id_to_token(i) for i in ids]

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary entry (piece) of one id, or ``None`` if there is none."""
        return self._tok.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        """The id of a vocabulary entry (piece) or added token, or ``None`` if there is none."""
        return self._tok.token_to_id(token)

    def get_vocab(self) -> dict[str, int]:
        """Every piece (added tokens included) -> its id."""
        return self._tok.get_vocab(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    # -------------------------------------------------------------------------------------------- chat

    def get_chat_template(self, tools: Sequence[Mapping[str, Any]] | None = None) -> str:
        """The template source used for a request: ``tool_use`` when tools are given and it exists, else ``default``.

        Raises:
            ValueError: the model has no chat template.
        """
        if tools and "tool_use" in self.chat_templates:
            return self.chat_templates["tool_use"]
        if "default" in self.chat_templates:
            return self.chat_templates["default"]
        if len(self.chat_templates) == 1:
            return next(iter(self.chat_templates.values()))
        if not self.chat_templates:
            raise ValueError(
                "this tokenizer has no chat template (looked in tokenizer_config.json, chat_template.jinja and "
                "chat_template.json); use a completion endpoint or a model with a chat template"
            )
        raise ValueError(f"no 'default' chat template among {sorted(self.chat_templates)}")

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        **extra: Any,
    ) -> str:
        """Render a conversation to the prompt text, as HF's ``apply_chat_template(..., tokenize=False)`` does.

        Like HF, keys whose value is ``None`` are dropped from each message, reasoning given as ``reasoning`` /
        ``thinking`` / ``reasoning_content`` is visible under the latter two names, and the template sees
        ``messages``, ``tools``, ``documents``, ``add_generation_prompt``, the named special tokens
        (``bos_token``, ``eos_token``, ...) and every keyword in ``extra`` (e.g. ``enable_thinking``).
        Encode the result with ``add_special_tokens=False``: the template already wrote them.

        Raises:
            ValueError: no chat template, an empty conversation, or a message that is not a mapping.
            ChatTemplateError: the template rejected the conversation (``raise_exception``) or failed.
        """
        if not messages:
            raise ValueError("cannot apply a chat template to an empty conversation")
        chat = []
        for message in messages:
            if not isinstance(message, Mapping):
                raise ValueError(f"chat messages must be mappings, got {type(message).__name__}")
            plain = {k: v for k, v in message.items() if v is not None}
            reasoning = next((plain[k] for k in _REASONING_FIELDS if k in plain), None)
            if reasoning is not None:
                plain = {"thinking": reasoning, **plain, "reasoning_content": reasoning}
            chat.append(plain)
        variables: dict[str, Any] = {**self.special_tokens, **extra}
        variables.setdefault("documents", None)
        template = _compile_template(self.get_chat_template(tools))
        try:
            return template.render(
                messages=chat,
                tools=list(tools) if tools is not None else None,
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"chat template error: {exc}") from exc

    # ------------------------------------------------------------------------------------------ internals

    def _named_id(self, name: str) -> int | None:
        text = self.special_tokens.get(name)
        return self._tok.token_to_id(text) if text is not None else None


class IncrementalDetokenizer:
    """Streams the text of a growing list of token ids, as they are generated.

    :meth:`push` (or :meth:`extend`) returns the new, complete text since the last call; text that may still change
    (a multi-byte character split across tokens, shown as a trailing U+FFFD) is held back until a later token
    completes it, and :meth:`finish` returns whatever is still held back. Joined, the returned pieces equal
    ``tokenizer.decode(token_ids, skip_special_tokens)``.

    Each step decodes only a small window of ids (``prefix_offset`` .. end, the vLLM / HF ``TextStreamer``
    technique), so a sequence of n tokens costs O(n), not O(n^2). The window starts one emitted step back so that
    decoders that depend on context (a leading-space rule of SentencePiece, say) render the new tokens as they would
    in the full sequence.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        skip_special_tokens: bool = True,
        prompt_ids: Sequence[int] = (),
        context_tokens: int = 5,
    ) -> None:
        """Start an empty stream.

        Args:
            tokenizer: the model's tokenizer.
            skip_special_tokens: leave special tokens (``<|im_end|>``) out of the text, as ``decode`` does.
            prompt_ids: the prompt, if any; its last ``context_tokens`` ids are decoding context only (never
                returned), so the first generated token renders as it would after the prompt: the text is then
                ``decode(prompt + ids)[len(decode(prompt)):]`` (if the prompt ends on a whole character).
            context_tokens: how many prompt ids to keep as context.
        """
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        context = list(prompt_ids[-context_tokens:]) if context_tokens > 0 else []
        self._ids: list[int] = context
        self._context = len(context)
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._pieces: list[str] = []

    @property
    def token_ids(self) -> list[int]:
        """The ids pushed so far (not the prompt context)."""
        return self._ids[self._context :]

    @property
    def text(self) -> str:
        """All text returned so far."""
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    def extend(self, token_ids: Iterable[int]) -> str:
        """Add several generated ids; return the new text they complete (possibly ``""``)."""
        return "".join([self.push(i) for i in token_ids])

    def push(self, token_id: int) -> str:
        """Add one generated id; return the new text it completes (possibly ``""``)."""
        self._ids.append(token_id)
        return self._advance(final=False)

    def finish(self) -> str:
        """End the stream: return the text still held back (e.g. an incomplete character, as U+FFFD)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        decode = self._tokenizer.decode
        prefix_text = decode(self._ids[self._prefix_offset : self._read_offset], self._skip)
        new_text = decode(self._ids[self._prefix_offset :], self._skip)
        if not final and (len(new_text) <= len(prefix_text) or new_text.endswith(_REPLACEMENT_CHAR)):
            return ""  # nothing yet, or the last character is not complete: wait for the next token
        delta = new_text[len(prefix_text) :]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        if delta:
            self._pieces.append(delta)
        return delta


# ---------------------------------------------------------------------------------------------- helpers


def _read_json(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``, ``{}`` if the file does not exist."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return data


def _token_text(value: Any) -> str | None:
    """A special-token entry of tokenizer_config.json: a string, or an AddedToken dict with ``content``."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _as_id_list(value: Any) -> list[int]:
    if isinstance(value, bool) or value is None:
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _chat_templates(folder: Path, tok_config: Mapping[str, Any]) -> dict[str, str]:
    """Template name -> source, from tokenizer_config.json, then the files that override it (HF's order)."""
    templates: dict[str, str] = {}
    raw = tok_config.get("chat_template")
    if isinstance(raw, str):
        templates["default"] = raw
    elif isinstance(raw, list):  # named templates: [{"name": ..., "template": ...}]
        templates.update({t["name"]: t["template"] for t in raw if isinstance(t, Mapping)})
    json_file = folder / "chat_template.json"
    if json_file.is_file():
        source = _read_json(json_file).get("chat_template")
        if isinstance(source, str):
            templates["default"] = source
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        templates["default"] = jinja_file.read_text(encoding="utf-8")
    extra_dir = folder / "additional_chat_templates"
    if extra_dir.is_dir():
        for f in sorted(extra_dir.glob("*.jinja")):
            templates[f.stem] = f.read_text(encoding="utf-8")
    return templates


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (HF marks assistant text with it); renders its body unchanged."""

    tags: ClassVar[set[str]] = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Callable[[], str]) -> str:
        return caller()


class _TemplateDict:
    """``dict(...)`` in templates, without exposing the ``dict`` type itself (as HF)."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict[Any, Any]:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """``namespace(...)`` that refuses underscore-prefixed attributes (as HF)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # Jinja's signature trick: `namespace(self=...)` works
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attributes ({name!r})")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # HF's filter: no HTML escaping (Jinja's own tojson escapes < > & '), and json.dumps' options.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=32)
def _compile_template(source: str) -> jinja2.Template:
    """Compile a chat template in a sandbox set up like HF's (same helpers, same whitespace rules)."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    try:
        return env.from_string(source)
    except jinja2.TemplateError as exc:
        raise ChatTemplateError(f"chat template does not compile: {exc}") from exc
