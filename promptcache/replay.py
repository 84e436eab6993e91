"""Token-exact replay: chat turns render our own earlier answers with the ids we generated, not re-tokenized text.

Re-tokenizing an answer's text can give other ids than the model produced (BPE merges differ at boundaries);
then the next turn misses the cache from the answer on. We remember, per namespace, the ids behind each answer
text we returned, and splice them into the rendered prompt in place of the text.

Replicas behind a router share these records through Redis (``RedisReplayStore``): the next turn of a conversation
may land on another replica than the one that wrote the answer.
"""

from __future__ import annotations

import hashlib
import struct
import sys
import threading
import uuid
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from promptcache.tokenizer import Tokenizer

if TYPE_CHECKING:
    from promptcache.redis_link import RedisLink

_RECORD_VERSION = 1  # the first byte of a Redis value; a reader of another version sees a miss
_U32 = next(code for code in "IL" if array(code).itemsize == 4)  # "I" on every mainstream platform


class ReplayStore:
    """A bounded LRU map (namespace, answer text) -> the token ids that produced it."""

    def __init__(self, capacity: int = 4096):
        self.capacity = capacity
        self._entries: OrderedDict[tuple[str, str], tuple[int, ...]] = OrderedDict()
        self._lock = threading.Lock()

    def remember(self, namespace: str, text: str, token_ids: Sequence[int]) -> None:
        """Keep ``token_ids`` as the ids behind ``text`` in ``namespace`` (nothing for an empty text or ids)."""
        if not text or not token_ids:
            return
        self._put(namespace, text, tuple(token_ids))

    def lookup(self, namespace: str, text: str) -> tuple[int, ...] | None:
        """The ids remembered for ``text`` in ``namespace``, or None."""
        return self._get(namespace, text)

    def lookup_many(self, namespace: str, texts: Sequence[str]) -> list[tuple[int, ...] | None]:
        """``lookup`` of every text, in order (a shared store answers them all in one round trip)."""
        return [self.lookup(namespace, text) for text in texts]

    def _get(self, namespace: str, text: str) -> tuple[int, ...] | None:
        with self._lock:
            ids = self._entries.get((namespace, text))
            if ids is not None:
                self._entries.move_to_end((namespace, text))
            return ids

    def _put(self, namespace: str, text: str, ids: tuple[int, ...]) -> None:
        with self._lock:
            self._entries[(namespace, text)] = ids
            self._entries.move_to_end((namespace, text))
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def stats(self) -> dict[str, Any]:
        """{"entries": records held in this process}."""
        with self._lock:
            return {"entries": len(self._entries)}

    def close(self) -> None:
        """Release what the store holds outside this process (nothing here)."""

    def __len__(self) -> int:
        return len(self._entries)


class RedisReplayStore(ReplayStore):
    """A ``ReplayStore`` whose records are shared through Redis by every replica serving the same model.

    NOTE: Redis answers first, the local LRU only what Redis lacks or while it is down. Records are keyed by
    answer text, and two answers may share a text with other ids (a model that emits the same string two ways):
    the last one written wins, and every replica and router must read that same one, or a router predicts hits
    the replica will not have. (A local-first read kept a stale record forever.)

    ``scope`` identifies the model (records hold token ids of one tokenizer). Each record is one key
    ``pc:replay:<scope[:32]>:<sha256 hex>`` that expires ``ttl_seconds`` after it was written; Redis's own maxmemory
    policy bounds the memory.
    """

    def __init__(self, url: str, scope: str, ttl_seconds: float = 86400.0, capacity: int = 16384, timeout: float = 0.5):
        from promptcache.redis_link import RedisLink  # here: a store without Redis does not import redis-py

        super().__init__(capacity)
        self.scope, self.ttl_seconds = scope, ttl_seconds
        self.prefix = f"pc:replay:{scope[:32]}:"
        self._hits = self._misses = 0  # records found / not found in Redis (lookups it answered)
        self._errors: dict[str, int] = {}  # by kind: "unavailable", "timeout", "io", "corrupt"
        self.link: RedisLink = RedisLink(url, timeout, on_error=self._count_error)

    def key(self, namespace: str, text: str) -> str:
        """The Redis key of a record: distinct (namespace, text) pairs, and scopes, never share a key."""
        digest = hashlib.sha256()
        for field in (self.scope, namespace, text):  # the full scope too: the prefix holds only its start
            data = field.encode("utf-8", "surrogatepass")
            digest.update(struct.pack("<Q", len(data)))  # length-prefixed: ("a", "bc") and ("ab", "c") differ
            digest.update(data)
        return self.prefix + digest.hexdigest()

    def remember(self, namespace: str, text: str, token_ids: Sequence[int]) -> None:
        """Keep the record locally and SET it in Redis (skipped while Redis is down; never raises)."""
        if not text or not token_ids:
            return
        ids = tuple(token_ids)
        self._put(namespace, text, ids)
        value = _encode_ids(ids)
        if value is None or not self.link.may_try():
            return
        key, ttl_ms = self.key(namespace, text), max(1, int(self.ttl_seconds * 1000))
        self.link.attempt(lambda: self.link.client().set(key, value, px=ttl_ms))

    def lookup(self, namespace: str, text: str) -> tuple[int, ...] | None:
        """The ids remembered for ``text`` here or by another replica, or None."""
        return self.lookup_many(namespace, [text])[0]

    def lookup_many(self, namespace: str, texts: Sequence[str]) -> list[tuple[int, ...] | None]:
        """Every text's ids: one pipeline of GETs to Redis, then the local LRU for what Redis lacks."""
        wanted = list(dict.fromkeys(t for t in texts if t))
        fetched = self._fetch(namespace, wanted) if wanted and self.link.may_try() else {}
        return [fetched[t] if t in fetched else self._get(namespace, t) for t in texts]

    def _fetch(self, namespace: str, texts: list[str]) -> dict[str, tuple[int, ...]]:
        """The records Redis holds for ``texts`` (one GET per key: an MGET across a cluster's slots is refused),
        also kept in the local LRU."""
        keys = [self.key(namespace, t) for t in texts]
        values = self.link.attempt(lambda: self.link.pipelined(lambda p, k: p.get(k), keys))
        if values is None:
            return {}
        out: dict[str, tuple[int, ...]] = {}
        for text, value in zip(texts, values):
            ids = _decode_ids(value) if isinstance(value, bytes) else None
            if ids is not None:
                out[text] = ids
                self._put(namespace, text, ids)
        refused = sum(isinstance(v, Exception) for v in values)
        # An undecodable value is left in place: it may be a newer replica's format, and it expires anyway.
        corrupt = sum(isinstance(v, bytes) for v in values) - len(out)
        with self._lock:
            self._hits += len(out)
            self._misses += len(texts) - len(out)
            self._add_errors(io=refused, corrupt=corrupt)
        return out

    def stats(self) -> dict[str, Any]:
        """Local entries, records found / not found in Redis, errors by kind, and whether Redis is up now."""
        local = super().stats()
        with self._lock:
            return {
                **local,
                "redis_hits": self._hits,
                "redis_misses": self._misses,
                "redis_errors": dict(self._errors),
                "redis_available": self.link.available,
            }

    def close(self) -> None:
        """Close the Redis connections (the local records stay usable)."""
        self.link.close()

    def _count_error(self, kind: str) -> None:
        with self._lock:
            self._add_errors(**{kind: 1})

    def _add_errors(self, **counts: int) -> None:
        """Add to the error counts; the caller holds the lock."""
        for kind, n in counts.items():
            if n:
                self._errors[kind] = self._errors.get(kind, 0) + n


def make_replay_store(
    redis_url: str | None, scope: str, ttl_seconds: float = 86400.0, capacity: int = 16384
) -> ReplayStore:
    """A store shared through Redis at ``redis_url``, or a local one when there is no URL."""
    if redis_url is None:
        return ReplayStore(capacity)
    return RedisReplayStore(redis_url, scope, ttl_seconds=ttl_seconds, capacity=capacity)


def _encode_ids(ids: Sequence[int]) -> bytes | None:
    """A record's value: the version byte, then the ids as little-endian uint32; None if an id does not fit."""
    try:
        packed = array(_U32, ids)
    except OverflowError:
        return None
    if sys.byteorder == "big":
        packed.byteswap()
    return bytes([_RECORD_VERSION]) + packed.tobytes()


def _decode_ids(value: bytes) -> tuple[int, ...] | None:
    """The ids in a record's value, or None when it is not one (another version, truncated, empty)."""
    body = value[1:]
    if not body or value[0] != _RECORD_VERSION or len(body) % 4:
        return None
    ids = array(_U32)
    ids.frombytes(body)
    if sys.byteorder == "big":
        ids.byteswap()
    return tuple(ids)


def replay_ids(tokenizer: Tokenizer, output_ids: Sequence[int], text: str, eos_ids: frozenset[int]) -> list[int] | None:
    """The ids to remember for an answer: its tokens without the stop token the template writes itself.

    None when the ids do not decode to exactly ``text`` (e.g. a stop string cut the text mid-token).
    """
    ids = list(output_ids)
    while ids and ids[-1] in eos_ids:
        ids.pop()
    return ids if tokenizer.decode(ids) == text else None


def render_chat_ids(
    tokenizer: Tokenizer,
    messages: list[dict[str, Any]],
    store: ReplayStore | None,
    namespace: str,
    tools: list[dict[str, Any]] | None = None,
    add_generation_prompt: bool = True,
    **template_kwargs: Any,
) -> list[int]:
    """Render messages with the chat template and tokenize, splicing remembered ids for our own answers."""
    remembered = _remembered(store, namespace, messages)
    spliced: dict[str, tuple[int, ...]] = {}
    patched: list[dict[str, Any]] = []
    for msg, ids in zip(messages, remembered):
        if ids is None:
            patched.append(msg)
            continue
        marker = f"\x00replay-{uuid.uuid4().hex}\x00"
        spliced[marker] = ids
        patched.append({**msg, "content": marker})
    text = tokenizer.apply_chat_template(
        patched, tools=tools, add_generation_prompt=add_generation_prompt, **template_kwargs
    )
    if not spliced:
        return tokenizer.encode(text, add_special_tokens=False)
    out: list[int] = []
    rest = text
    for marker, ids in spliced.items():
        before, found, rest = rest.partition(marker)
        if not found:  # the template dropped or rewrote the content: fall back to plain text for everything
            return render_chat_ids(
                tokenizer, messages, None, namespace, tools, add_generation_prompt, **template_kwargs
            )
        out.extend(tokenizer.encode(before, add_special_tokens=False))
        out.extend(ids)
    out.extend(tokenizer.encode(rest, add_special_tokens=False))
    return out


def _remembered(
    store: ReplayStore | None, namespace: str, messages: list[dict[str, Any]]
) -> list[tuple[int, ...] | None]:
    """Per message, the ids remembered for it (assistant messages with string content only), asked of the store
    in one ``lookup_many``: a store in Redis answers a whole conversation in one round trip."""
    asked = [
        i for i, msg in enumerate(messages) if msg.get("role") == "assistant" and isinstance(msg.get("content"), str)
    ]
    out: list[tuple[int, ...] | None] = [None] * len(messages)
    # ``is None``, not truthiness: a store's len is its local entries, and an empty one may still find in Redis.
    if store is None or not asked:
        return out
    for i, ids in zip(asked, store.lookup_many(namespace, [messages[i]["content"] for i in asked])):
        out[i] = ids
    return out
