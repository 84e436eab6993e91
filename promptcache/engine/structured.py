"""Structured outputs: keep a request's tokens inside a JSON schema, a regex, a list of choices or a grammar.

At every step the grammar engine says which tokens can continue the output; the sampler sets every other token's
logit to -inf before it samples (greedy or not), so only valid text can come out. The engine is llguidance
(guidance-ai's Rust library, also a vLLM backend and in llama.cpp): chosen over xgrammar because it installs with no
dependencies (xgrammar pulls in transformers and triton, which the serving path must not need), it compiles a schema
lazily in about a millisecond on CPU instead of precomputing token tables, it gives a readable error for a bad
schema, and its per-token mask cost on SmolLM2's 49k vocabulary is tens of microseconds, like xgrammar's
(docs/structured-outputs.md has the measurements).

Compiling a grammar (building its lexer and parser) costs ~0.3-3 ms, a hundred times more than copying a compiled one,
so compiled grammars are cached per (scope, grammar) and each request gets a copy. The scope is the request's cache
namespace (tenant + salt): a tenant cannot learn from compile latency which schemas another tenant uses.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from promptcache.tokenizer import Tokenizer

# JSON written by a constrained request: one space after ":" and "," (json.dumps' default style) and no other
# whitespace. NOTE: with free whitespace a weak model can emit newlines forever and never close the object.
COMPACT_JSON = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True)
class StructuredOutput:
    """What a request's output must match: exactly one of a JSON schema (as canonical JSON text), any JSON object,
    a regex, a list of choices, or a Lark grammar (llguidance's dialect, which may embed ``%json {schema}``).

    ``StructuredOutput.json(schema)`` builds the first from a dict or JSON text.
    """

    json_schema: str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        given = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError(f"a structured output needs exactly one of {', '.join(KINDS)}; got {given or 'none'}")
        if self.choice is not None and (not self.choice or not all(isinstance(c, str) and c for c in self.choice)):
            raise ValueError("choice must be a non-empty list of non-empty strings")

    @classmethod
    def json(cls, schema: dict[str, Any] | str, closed: bool = True) -> StructuredOutput:
        """A JSON-schema constraint, stored as compact JSON text (equal schemas share one compiled grammar). Key order
        is kept: the output's properties come in the schema's order. Raises ValueError if ``schema`` is not a JSON
        object.

        ``closed``: an object schema that lists ``properties`` and says nothing of ``additionalProperties`` admits no
        other keys (xgrammar's strict mode, OpenAI's strict semantics). Every output is still valid against the
        schema as given; without this a model may invent keys (a weak one, forever).
        """
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as err:
                raise ValueError(f"the JSON schema is not valid JSON: {err}") from err
        if not isinstance(schema, dict):
            raise ValueError("a JSON schema must be a JSON object")
        if closed:
            schema = closed_schema(schema)
        return cls(json_schema=json.dumps(schema, separators=(",", ":"), ensure_ascii=False))

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    def key(self) -> str:
        """A canonical text that identifies this constraint (the compile cache's key)."""
        value = getattr(self, self.kind)
        return f"{self.kind}\x1f{json.dumps(value) if self.kind == 'choice' else value}"

    def llguidance_grammar(self) -> str:
        """The llguidance grammar text of this constraint (not yet validated)."""
        import llguidance

        if self.json_schema is not None:
            return llguidance.LLMatcher.grammar_from_json_schema(self.json_schema, defaults=COMPACT_JSON)
        if self.json_object:
            return llguidance.LLMatcher.grammar_from_json_schema('{"type": "object"}', defaults=COMPACT_JSON)
        if self.regex is not None:
            return llguidance.LLMatcher.grammar_from_regex(self.regex)
        if self.choice is not None:
            return llguidance.grammar_from("choice", json.dumps(list(self.choice)))
        return llguidance.LLMatcher.grammar_from_lark(self.grammar or "")


_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_ONE = ("items", "additionalProperties", "not", "if", "then", "else", "contains", "propertyNames",
               "unevaluatedProperties", "additionalItems")  # fmt: skip


def closed_schema(schema: Any) -> Any:
    """A copy of ``schema`` where each object schema with ``properties`` and no word on other keys admits none."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: closed_schema(sub) for name, sub in out[key].items()}
    for key in _SCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [closed_schema(sub) for sub in out[key]]
    for key in _SCHEMA_ONE:
        if isinstance(out.get(key), dict):
            out[key] = closed_schema(out[key])
    open_words = ("additionalProperties", "patternProperties", "unevaluatedProperties")
    if isinstance(out.get("properties"), dict) and not any(w in out for w in open_words):
        out["additionalProperties"] = False
    return out


class GrammarCache:
    """Compiled grammars for one tokenizer, per (scope, constraint); thread-safe (the API compiles off the engine
    thread, the engine copies on admission).

    ``matcher(spec, scope)`` returns a fresh matcher (the grammar's start state) for one request, compiling on a miss.
    """

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_token_ids: list[int], capacity: int = 512):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size  # the model's: logits rows are this wide (it may exceed the tokenizer's)
        self.eos_token_ids = list(eos_token_ids)
        self.capacity = capacity
        self._compiled: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._lock = threading.Lock()
        self._lltok: Any = None
        self.hits = self.misses = 0
        self.compile_seconds = 0.0

    def warm(self) -> float:
        """Build the grammar engine's token tables now rather than on the first constrained request; seconds taken."""
        start = time.perf_counter()
        with self._lock:
            self._ll_tokenizer()
        return time.perf_counter() - start

    def _ll_tokenizer(self) -> Any:
        # Built on first use (about half a second for a 49k vocabulary): servers that never constrain never pay it.
        if self._lltok is None:
            import llguidance

            self._lltok = llguidance.LLTokenizer(
                self.tokenizer.to_json(), n_vocab=self.vocab_size, eos_token=self.eos_token_ids
            )
        return self._lltok

    def compile(self, spec: StructuredOutput, scope: str = "") -> Any:
        """The compiled grammar of ``spec`` in ``scope`` (cached). Raises ValueError saying what is wrong with it."""
        key = (scope, spec.key())
        with self._lock:
            proto = self._compiled.get(key)
            if proto is not None:
                self._compiled.move_to_end(key)
                self.hits += 1
                return proto
        import llguidance

        start = time.perf_counter()
        try:
            grammar = spec.llguidance_grammar()
        except ValueError as err:
            raise ValueError(f"the {spec.kind} is invalid: {err}") from err
        with self._lock:
            lltok = self._ll_tokenizer()
        proto = llguidance.LLMatcher(lltok, grammar, log_level=0)  # drops the GIL while it builds
        if proto.is_error():
            raise ValueError(f"the {spec.kind} is invalid: {proto.get_error()}")
        with self._lock:
            self.misses += 1
            self.compile_seconds += time.perf_counter() - start
            self._compiled[key] = proto
            while len(self._compiled) > self.capacity:
                self._compiled.popitem(last=False)
        return proto

    def matcher(self, spec: StructuredOutput, scope: str = "") -> Any:
        """A fresh matcher for one request (a copy of the cached compiled grammar)."""
        return self.compile(spec, scope).deep_copy()

    def stats(self) -> dict[str, float | int]:
        with self._lock:
            return {"entries": len(self._compiled), "hits": self.hits, "misses": self.misses,
                    "compile_seconds": round(self.compile_seconds, 6)}  # fmt: skip


class TokenMasks:
    """The grammar side of a sampling step.

    One llguidance call fills every constrained row's bitmask (in parallel threads for several rows). A greedy row
    then takes the model's argmax if the grammar allows it, and only otherwise the argmax over the allowed tokens:
    the same token either way, and a real model writing valid output mostly needs no masking at all (llama.cpp's
    sampler checks its pick first the same way). A sampled row is masked before sampling, so that temperature,
    top-k and top-p act on the allowed tokens only.
    """

    def __init__(self) -> None:
        self._executor: Any = None
        self.calls = self.rows = self.masked_rows = 0  # steps with constraints, rows constrained, rows masked
        self.seconds = 0.0  # spent here (the benchmark reports it as a share of decode time)

    def fill(self, matchers: list[Any], vocab: int) -> torch.Tensor:
        """Each matcher's bitmask of allowed tokens, [rows, ceil(vocab / 32)] int32 (bit t % 32 of word t // 32)."""
        start = time.perf_counter()
        words = (vocab + 31) // 32
        bitmask = torch.empty((len(matchers), words), dtype=torch.int32)
        if len(matchers) == 1:
            matchers[0].unsafe_compute_mask_ptr(bitmask.data_ptr(), words * 4)
        else:
            if self._executor is None:
                import llguidance

                self._executor = llguidance.LLExecutor()
            pairs = [(m, i) for i, m in enumerate(matchers)]
            self._executor.unsafe_compute_mask_ptr(pairs, bitmask.data_ptr(), words * 4, len(matchers))
        self.calls += 1
        self.rows += len(matchers)
        self.seconds += time.perf_counter() - start
        return bitmask

    @staticmethod
    def allows(bitmask_row: torch.Tensor, token: int) -> bool:
        """Whether one row's bitmask allows ``token``."""
        return bool((int(bitmask_row[token >> 5]) >> (token & 31)) & 1)

    def masked(self, logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
        """``logits`` [R, V] with every token its row's bitmask [R, W] disallows at -inf (a new tensor)."""
        start = time.perf_counter()
        bits = np.unpackbits(bitmask.numpy().view(np.uint8), axis=1, bitorder="little")[:, : logits.shape[1]]
        allowed = torch.from_numpy(bits).view(torch.bool).to(logits.device)
        # NOTE: a row that allows nothing (a grammar in an error state) is left unmasked: all -inf would make the
        # softmax NaN and fail the whole batch's step. The engine ends such a request when its token is refused.
        empty = ~allowed.any(dim=1)
        if bool(empty.any()):
            allowed = allowed | empty[:, None]
        out = torch.where(allowed, logits, float("-inf"))
        self.masked_rows += logits.shape[0]
        self.seconds += time.perf_counter() - start
        return out
