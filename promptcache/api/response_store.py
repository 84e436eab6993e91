"""Server-side state of the Responses API: each stored response, so that a later request can continue from it
(``previous_response_id``) and a client can retrieve, list the input of, or delete it.

A record keeps what the next turn needs to read the whole previous turn from the prompt cache: the conversation's
chat-template messages (the answer as the raw text the model generated) and the exact token ids the model saw and
produced (``context_ids``). The next turn's prompt is those ids plus the new suffix (``responses_prompt``).

``ResponseStore`` holds records in this process, per tenant, bounded in number (the oldest go first) and in age.
``RedisResponseStore`` also keeps them in Redis, so that every replica of a fleet (and its router) continues a
conversation that another replica started; while Redis is down it carries on with its own records. Torch-free: a
fleet router imports it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
import sys
import threading
import time
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from promptcache.redis_link import RedisLink

__all__ = ["RedisResponseStore", "ResponseStore", "StoredResponse", "make_response_store"]

DEFAULT_MAX_PER_TENANT = 1000
DEFAULT_TTL_SECONDS = 30 * 86400.0  # OpenAI keeps stored responses for 30 days
_RECORD_VERSION = 1  # "v" in a Redis value; a reader of another version sees a miss
_U32 = next(code for code in "IL" if array(code).itemsize == 4)  # "I" on every mainstream platform


@dataclass
class StoredResponse:
    """One stored response: what GET returns, and what the next turn continues from."""

    id: str  # "resp_..."
    tenant: str  # the tenant's name (Tenant.name): another tenant never sees the record
    created_at: float  # time.time() when it was created
    response: dict[str, Any]  # the Response object as returned to the client
    input_items: list[dict[str, Any]]  # this request's input items, normalized (GET .../input_items)
    # The conversation's chat-template messages so far, without the system (instructions) message, this turn's
    # answer included as an assistant message whose content is the raw generated text (tool-call markup included).
    conversation: list[dict[str, Any]]
    context_ids: list[int]  # this turn's prompt ids + output ids: what the model saw and produced

    def to_json(self) -> bytes:
        """The record as compact JSON, ``context_ids`` as base64 of little-endian uint32 (a quarter of the text)."""
        return json.dumps({
            "v": _RECORD_VERSION, "id": self.id, "tenant": self.tenant, "created_at": self.created_at,
            "response": self.response, "input_items": self.input_items, "conversation": self.conversation,
            "context_ids": _encode_ids(self.context_ids),
        }, separators=(",", ":"), ensure_ascii=False).encode()  # fmt: skip

    @classmethod
    def from_json(cls, value: bytes) -> StoredResponse | None:
        """The record in ``value``, or None when it is not one (another version, damaged, a tombstone)."""
        try:
            obj = json.loads(value)
            if not isinstance(obj, dict) or obj.get("v") != _RECORD_VERSION or obj.get("deleted"):
                return None
            ids = _decode_ids(obj["context_ids"])
            if ids is None:
                return None
            record = cls(str(obj["id"]), str(obj["tenant"]), float(obj["created_at"]), obj["response"],
                         obj["input_items"], obj["conversation"], ids)  # fmt: skip
        except (ValueError, KeyError, TypeError):
            return None
        ok = isinstance(record.response, dict) and isinstance(record.input_items, list)
        return record if ok and isinstance(record.conversation, list) else None


class ResponseStore:
    """Stored responses in this process, per tenant: at most ``max_per_tenant`` each (the oldest are dropped) and
    none older than ``ttl_seconds``. Thread-safe.

    NOTE: a lookup names the tenant, and a record is found only under the tenant that stored it: another tenant's
    id is simply not found (the API answers 404, as for an id that never existed).
    """

    def __init__(self, max_per_tenant: int = DEFAULT_MAX_PER_TENANT, ttl_seconds: float = DEFAULT_TTL_SECONDS):
        if max_per_tenant < 1:
            raise ValueError(f"max_per_tenant must be at least 1, got {max_per_tenant}")
        if ttl_seconds <= 0:
            raise ValueError(f"ttl_seconds must be positive, got {ttl_seconds}")
        self.max_per_tenant = max_per_tenant
        self.ttl_seconds = ttl_seconds
        # tenant -> id -> record, in the order they were put (the oldest first: what a bound drops)
        self._records: dict[str, OrderedDict[str, StoredResponse]] = {}
        self._lock = threading.Lock()

    def put(self, record: StoredResponse) -> None:
        """Keep ``record`` (replacing one with its id); drops the tenant's expired records and, past the bound, its
        oldest."""
        self._put_local(record)

    def get(self, tenant: str, response_id: str) -> StoredResponse | None:
        """The tenant's record ``response_id``, or None (unknown, expired, deleted, or another tenant's)."""
        return self._get_local(tenant, response_id)

    def delete(self, tenant: str, response_id: str) -> bool:
        """Forget the tenant's record ``response_id``; whether there was one."""
        return self._delete_local(tenant, response_id)

    def stats(self) -> dict[str, Any]:
        """{"responses": records held in this process, "tenants": tenants with one}."""
        with self._lock:
            return {"responses": sum(len(r) for r in self._records.values()), "tenants": len(self._records)}

    def close(self) -> None:
        """Release what the store holds outside this process (nothing here)."""

    def __len__(self) -> int:
        with self._lock:
            return sum(len(r) for r in self._records.values())

    # ---- the local records (subclasses share them) -------------------------------------------------------------
    def _expired(self, record: StoredResponse, now: float) -> bool:
        return now - record.created_at >= self.ttl_seconds

    def _put_local(self, record: StoredResponse) -> list[str]:
        """Keep ``record``; the ids dropped to make room (past ``max_per_tenant``)."""
        now = time.time()
        with self._lock:
            records = self._records.setdefault(record.tenant, OrderedDict())
            records[record.id] = record  # a record already here keeps its place (the order is by creation)
            # Records go in roughly by creation time, so the expired ones are at the front.
            while records and self._expired(next(iter(records.values())), now):
                records.popitem(last=False)
            dropped = []
            while len(records) > self.max_per_tenant:
                dropped.append(records.popitem(last=False)[0])
            if not records:
                del self._records[record.tenant]
            return dropped

    def _get_local(self, tenant: str, response_id: str) -> StoredResponse | None:
        with self._lock:
            records = self._records.get(tenant)
            record = records.get(response_id) if records is not None else None
            if record is None:
                return None
            if self._expired(record, time.time()):
                self._drop(tenant, response_id)
                return None
            return record

    def _delete_local(self, tenant: str, response_id: str) -> bool:
        with self._lock:
            records = self._records.get(tenant)
            if records is None or response_id not in records:
                return False
            expired = self._expired(records[response_id], time.time())
            self._drop(tenant, response_id)
            return not expired

    def _drop(self, tenant: str, response_id: str) -> None:
        """Remove a record; the caller holds the lock."""
        records = self._records.get(tenant)
        if records is not None:
            records.pop(response_id, None)
            if not records:
                del self._records[tenant]


class RedisResponseStore(ResponseStore):
    """A ``ResponseStore`` whose records are shared through Redis by every replica serving the same model (and read
    by fleet routers), modelled on ``replay.RedisReplayStore``.

    ``scope`` identifies the model (records hold token ids of one tokenizer). A record is one key
    ``pc:resp:<scope[:32]>:<sha256 of (scope, tenant, id)>`` holding its JSON, which expires ``ttl_seconds`` after
    it was created; each tenant has a sorted set of its records' digests by creation time, trimmed to
    ``max_per_tenant``. Records are also kept locally (the same bounds).

    NOTE: Redis answers first, the local records only what Redis lacks or while it is down: a record put while Redis
    was down is still found here. A deleted or trimmed record leaves a small tombstone (until it would have expired),
    so that a replica holding a local copy forgets it too rather than serve it from memory. Redis down is never an
    error: every call is bounded by ``timeout`` and the link backs off (``RedisLink``). What is written or deleted
    while Redis is down is known to this replica only (a record deleted then may come back from Redis later).
    """

    _TOMBSTONE = json.dumps({"v": _RECORD_VERSION, "deleted": True}).encode()

    def __init__(
        self,
        url: str,
        scope: str,
        max_per_tenant: int = DEFAULT_MAX_PER_TENANT,
        ttl_seconds: float = DEFAULT_TTL_SECONDS,
        timeout: float = 0.5,
    ):
        from promptcache.redis_link import RedisLink  # here: a store without Redis does not import redis-py

        super().__init__(max_per_tenant, ttl_seconds)
        self.scope = scope
        self.prefix = f"pc:resp:{scope[:32]}:"
        self._hits = self._misses = 0  # records found / not found in Redis (lookups it answered)
        self._errors: dict[str, int] = {}  # by kind: "unavailable", "timeout", "io", "corrupt"
        self.link: RedisLink = RedisLink(url, timeout, on_error=self._count_error)

    def _digest(self, *fields: str) -> str:
        digest = hashlib.sha256()
        for field in (self.scope, *fields):  # the full scope too: the prefix holds only its start
            data = field.encode("utf-8", "surrogatepass")
            digest.update(struct.pack("<Q", len(data)))  # length-prefixed: ("a", "bc") and ("ab", "c") differ
            digest.update(data)
        return digest.hexdigest()

    def key(self, tenant: str, response_id: str) -> str:
        """The Redis key of a record: distinct (tenant, id) pairs, and scopes, never share a key."""
        return self.prefix + self._digest(tenant, response_id)

    def index_key(self, tenant: str) -> str:
        """The tenant's sorted set: its records' digests, scored by creation time."""
        return self.prefix + "idx:" + self._digest("\x00index", tenant)

    def put(self, record: StoredResponse) -> None:
        """Keep the record locally and in Redis, trimming the tenant's oldest past the bound (skipped while Redis
        is down; never raises)."""
        self._put_local(record)  # the local bound drops locally; Redis's sorted set trims Redis
        if not self.link.may_try():
            return
        remaining_ms = int((record.created_at + self.ttl_seconds - time.time()) * 1000)
        if remaining_ms <= 0:
            return
        key, index = self.key(record.tenant, record.id), self.index_key(record.tenant)
        member = key[len(self.prefix) :]
        horizon = time.time() - self.ttl_seconds

        def write() -> list[Any]:
            pipe = self.link.client().pipeline(transaction=False)
            pipe.set(key, record.to_json(), px=remaining_ms)
            pipe.zadd(index, {member: record.created_at})
            pipe.zremrangebyscore(index, "-inf", horizon)  # records that expired on their own
            pipe.pexpire(index, max(1, int(self.ttl_seconds * 1000)))
            pipe.zcard(index)
            return pipe.execute()

        results = self.link.attempt(write)
        if results is None:
            return
        over = int(results[-1]) - self.max_per_tenant
        if over <= 0:
            return
        popped = self.link.attempt(lambda: self.link.client().zpopmin(index, over))
        if popped:
            self._tombstone([self.prefix + (m.decode() if isinstance(m, bytes) else str(m)) for m, _ in popped])

    def get(self, tenant: str, response_id: str) -> StoredResponse | None:
        """The tenant's record from Redis (another replica's too), else the local one; None if neither has it."""
        key = self.key(tenant, response_id)
        # A 1-tuple, so that a missing key (None) is told apart from a failed call (attempt's None).
        answer = self.link.attempt(lambda: (self.link.client().get(key),)) if self.link.may_try() else None
        if answer is not None:
            value = answer[0]
            if value == self._TOMBSTONE:  # deleted or trimmed elsewhere: forget the local copy too
                self._count(hit=False)
                self._delete_local(tenant, response_id)
                return None
            record = StoredResponse.from_json(value) if isinstance(value, bytes) else None
            if record is not None and (record.tenant, record.id) == (tenant, response_id):
                self._count(hit=True)
                if self._expired(record, time.time()):
                    return None
                self._put_local(record)  # kept here too: found while Redis is down later
                return record
            # Not there (another replica's local-only record is none of ours), or undecodable (left in place: it
            # may be a newer replica's format, and it expires anyway): the local record, if any.
            self._count(hit=False, corrupt=value is not None)
        return self._get_local(tenant, response_id)

    def delete(self, tenant: str, response_id: str) -> bool:
        """Forget the record here and in Redis (a tombstone tells other replicas); whether it existed."""
        found = self.get(tenant, response_id) is not None
        self._delete_local(tenant, response_id)
        if found and self.link.may_try():
            key = self.key(tenant, response_id)
            member = key[len(self.prefix) :]
            self._tombstone([key])
            self.link.attempt(lambda: self.link.client().zrem(self.index_key(tenant), member))
        return found

    def stats(self) -> dict[str, Any]:
        """Local records, records found / not found in Redis, errors by kind, and whether Redis is up now."""
        local = super().stats()
        with self._lock:
            return {**local, "redis_hits": self._hits, "redis_misses": self._misses,
                    "redis_errors": dict(self._errors), "redis_available": self.link.available}  # fmt: skip

    def close(self) -> None:
        """Close the Redis connections (the local records stay usable)."""
        self.link.close()

    # ---- helpers -------------------------------------------------------------------------------------------
    def _tombstone(self, keys: Sequence[str]) -> None:
        """Replace records by tombstones that live as long as a record could (one round trip; never raises)."""
        ttl_ms = max(1, int(self.ttl_seconds * 1000))

        def write() -> None:
            pipe = self.link.client().pipeline(transaction=False)
            for key in keys:
                pipe.set(key, self._TOMBSTONE, px=ttl_ms)
            pipe.execute()

        if keys:
            self.link.attempt(write)

    def _count(self, hit: bool, corrupt: bool = False) -> None:
        with self._lock:
            if hit:
                self._hits += 1
            else:
                self._misses += 1
            if corrupt:
                self._errors["corrupt"] = self._errors.get("corrupt", 0) + 1

    def _count_error(self, kind: str) -> None:
        with self._lock:
            self._errors[kind] = self._errors.get(kind, 0) + 1


def make_response_store(
    redis_url: str | None, scope: str, max_per_tenant: int = DEFAULT_MAX_PER_TENANT,
    ttl_seconds: float = DEFAULT_TTL_SECONDS,
) -> ResponseStore:  # fmt: skip
    """A store shared through Redis at ``redis_url`` (``scope``: the model's fingerprint), or a local one."""
    if redis_url is None:
        return ResponseStore(max_per_tenant, ttl_seconds)
    return RedisResponseStore(redis_url, scope, max_per_tenant, ttl_seconds)


def _encode_ids(ids: Sequence[int]) -> str:
    """Token ids as base64 of little-endian uint32."""
    packed = array(_U32, ids)
    if sys.byteorder == "big":
        packed.byteswap()
    return base64.b64encode(packed.tobytes()).decode("ascii")


def _decode_ids(text: Any) -> list[int] | None:
    """The ids in ``_encode_ids``' text, or None when it is not that."""
    if not isinstance(text, str):
        return None
    try:
        raw = base64.b64decode(text, validate=True)
    except ValueError:
        return None
    if len(raw) % 4:
        return None
    ids = array(_U32)
    ids.frombytes(raw)
    if sys.byteorder == "big":
        ids.byteswap()
    return ids.tolist()
