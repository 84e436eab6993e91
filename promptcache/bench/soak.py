"""Soak benchmark: a fleet under mixed, concurrent load for N minutes while a chaos thread restarts Redis, fills a
replica's disk tier and kills a replica; what must hold throughout is checked and reported.

    python -m promptcache.bench.soak --minutes 60 --out docs/soak.json [--model embedded|smollm2|PATH]
        [--clients 64] [--max-requests N] [--faults redis,disk,replica] [--fault-seconds 15] [--fault-every 120]
        [--recovery-seconds 20] [--request-timeout 120] [--quick] [--seed 0] [--skip-bad NAME,...] [--max-minutes M]

The fleet (``fleet_bench.Fleet``, started here with a disk tier per replica): a fresh ``redis-server``, 2
``promptcache serve`` replicas (``--device cpu --dtype float32``, each with a disk tier and the Redis tier, KV events
on, ``--tier-load-policy always`` so the tiers are really read) and one ``promptcache router --policy cache``. The disk
tier of ``r0`` lives on a small tmpfs mounted for the run (``--tmpfs-mb``; its budget is 3/4 of the mount, so only
the chaos thread's filler makes it full). When the mount fails (not root) the directory is a plain one, the filler is
bounded to the same size instead of reaching ENOSPC, and the report says so. The device pool of each replica holds
``--kv-tokens`` tokens, below what the workloads write over a run, so blocks go down to the tiers and come back.

The load: ``--clients`` threads for ``--minutes`` (and at most ``--max-requests``), each with its own connection
pool, through the router. Each request is one of:
- a turn of a workload session (every workload of ``workloads.py`` plus ``unique``: 1-turn chats with a system
  prompt each), mixed; a session's turns go in order on one client, each resending the conversation with the
  previous answers; sessions with tools go through the OpenAI API, the others through Anthropic's /v1/messages with
  ``--anthropic-share``; streamed or not (``--stream-share``); sampled (temperature 0.8);
- ``--greedy-share``: a greedy request (temperature 0) with a fixed prompt (``greedy_cases``), OpenAI or Anthropic,
  streamed or not; its text must equal the cold reference, computed before the load on a fresh ``serve`` process
  with no tiers and no prefix caching (the same model, rendering and sampling code: only the cache differs);
- ``--disconnect-share``: a stream that the client closes after its first 2 events;
- ``--bad-share``: bad input (``BAD_INPUTS``, in turn: malformed or deeply nested JSON, wrong types, an unknown model,
  negative, zero or huge ``max_tokens``, empty messages, an out-of-range seed, ...), which must get a 4xx with an
  error body in the API's own format. Besides that share, every bad input is sent once as the load starts, so a
  short run covers each. ``--skip-bad`` leaves cases out, to look past a known finding.

Every request has a timeout (``--request-timeout``: the connection's read timeout and a cap on the whole exchange): a
request past it is a failure (a hang). A valid request fails when it gets anything but a complete, well-formed answer
(a status other than 200, a malformed body, a stream that ends with an error event or without its final event). The
exception is a stream the killed replica was serving when it was killed: the router ends it with an error event
(nothing can be retried once bytes have reached the client). Those are counted apart, identified by the replica the
router picked (``x-promptcache-replica``), the kill time and the request's own start and end.

The chaos thread spreads the faults over the run (``--faults``, in that order, cycled while the run allows at most one
every ``--fault-every`` seconds; each fault at least once): ``redis`` kills redis-server with SIGKILL, keeps it down
``--fault-seconds`` and starts it again on the same port (empty: no persistence); ``disk`` writes a filler file on
the tmpfs until ENOSPC, holds it ``--fault-seconds`` and deletes it; ``replica`` kills ``r1`` with SIGKILL and starts
it again at once with the same flags (always ``r1``: ``r0`` then lives through the run, so its RSS growth is the leak
figure); its window lasts until the router has it back in the rotation. After each fault the thread waits until the
fleet is whole again (Redis answers, every replica up and synced in the router, a probe request served): that delay
is ``recovered_s``. A fault is survived when the fleet is whole again within ``--recovery-timeout`` and no valid
request started in its window or the recovery after it failed (kill-cut streams apart). The load runs past
``--minutes`` while a fault is still under way, by at most ``--max-overrun`` seconds, so that every planned fault
happens under load.

Sampled every ``--sample-seconds``: the RSS of each replica, the router and redis-server (psutil); each replica's
blocks in use and requests running (``/health``: the pool's own counters, read without waiting for the engine
thread) and cached blocks and evictions (``/v1/cache/stats``, which answers between two engine steps; its latency is
kept). After the load stops: every replica idle, then its blocks in use (leaked blocks: target 0),
``/v1/cache/integrity?deep=1``, each tier's error counters, and the load the router still counts. Every request's
phase comes from its start time: ``redis-down``, ``disk-full``, ``replica-killed`` inside a fault's window,
``recovery`` for ``--recovery-seconds`` after one, ``steady`` otherwise.

Written: the JSON (``--out``; every figure, every fault, every request as a compact row, every sample), a PNG next to
it (TTFT over time, RSS over time, blocks in use over time, the fault windows shaded) and a markdown summary on
stdout. Exit code 0 when the run completed and every invariant held, 1 otherwise.

Never hangs: a timeout on every request and every wait, a watchdog (``--max-minutes``) that stops every process, all
processes stopped on exit, on an exception and on Ctrl-C / SIGTERM (the replicas and the router are also told to exit
if this process dies, by ``PR_SET_PDEATHSIG``), and the tmpfs unmounted.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import math
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter, defaultdict, deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from promptcache.bench.fleet_bench import (
    SERVED_MODEL,
    Aborted,
    Fleet,
    FleetSpec,
    StateWatch,
    _free_port,
    _spawn,
    _stop,
    _tail,
    _terminate,
    _Watchdog,
    dumps,
    resolve_model,
)
from promptcache.bench.runner import REPLICA_HEADER, machine_info, percentile, versions
from promptcache.bench.workloads import WORKLOADS, Session, make_workload, request_messages

FAULTS = ("redis", "disk", "replica")
STEADY, RECOVERY = "steady", "recovery"
FAULT_PHASE = {"redis": "redis-down", "disk": "disk-full", "replica": "replica-killed"}
PHASES = (STEADY, *FAULT_PHASE.values(), RECOVERY)
WORKLOAD, GREEDY, DISCONNECT, BAD = "workload", "greedy", "disconnect", "bad-input"
OPENAI, ANTHROPIC = "openai", "anthropic"
PATHS = {OPENAI: "/v1/chat/completions", ANTHROPIC: "/v1/messages"}
REPLICAS = 2
TMPFS_REPLICA = 0  # the replica whose disk tier lives on the tmpfs
# The replica the chaos thread kills, every time: the other one (with the tmpfs) then lives through the whole run, so
# its RSS over the run says whether a process leaks, and the disk fault always hits a long-lived tier.
KILLED_REPLICA = 1
# Soak workloads: workloads.py's five, plus "unique" (as fleet_bench's: 1-turn chats, a system prompt each).
SOAK_WORKLOADS: dict[str, tuple[str, dict[str, int]]] = {
    **{name: (name, {}) for name in WORKLOADS},
    "unique": ("chat", {"turns": 1}),
}
SAMPLED_TEMPERATURE = 0.8
CUT_AFTER_EVENTS = 2  # a disconnecting client closes the connection after this many stream events
DISCONNECT_MAX_TOKENS = 96  # long enough that the stream is still running when the client goes away
GREEDY_MAX_TOKENS = 16
GREEDY_SEED = 1009  # the greedy cases' texts: fixed, whatever --seed
# An earlier answer written by hand: a generated one would be replayed with its generated ids (the replay records),
# which the reference server does not have, so its prompt would differ there for a reason that is no bug.
FIXED_ANSWER = "The ledger is kept in the harbor office, on the second shelf by the window."
RETRY_AFTER_CAP_S = 5.0  # the longest a client waits when told to retry later
KILL_CUT_GRACE_S = 5.0  # a stream cut by a kill fails within this long after it (the router ends it at once)
# Columns of the compact per-request rows written into the JSON.
RECORD_COLUMNS = (
    "kind", "label", "api", "stream", "start_s", "end_s", "ttft_ms", "status", "outcome", "replica",
    "prompt_tokens", "cached_tokens", "output_tokens", "phase",
)  # fmt: skip
SAMPLE_COLUMNS = ("t_s", "process", "pid", "rss_mb", "blocks_in_use", "blocks_cached", "evictions", "requests",
                  "stats_ms")  # fmt: skip


# ---- what is sent ----------------------------------------------------------------------------------------------
_USER = [{"role": "user", "content": "Say hello."}]
_BAD_TOOL_CALL = {"role": "assistant", "content": None, "tool_calls": ["x"]}  # a tool call that is not an object
_DEEP = b"[" * 100_000 + b"]" * 100_000  # valid JSON, nested deeper than a recursive parser goes
# (name, API, body): bytes go as they are; a dict is JSON with the served model's name added unless it has one.
BAD_INPUTS: tuple[tuple[str, str, bytes | dict[str, Any]], ...] = (
    ("malformed-json", OPENAI, b'{"model": "m", "messages": [{"role": "user", "content": "hi"}'),
    ("not-an-object", OPENAI, b'[{"role": "user", "content": "hi"}]'),
    ("messages-wrong-type", OPENAI, {"messages": "hello", "max_tokens": 8}),
    ("max-tokens-wrong-type", OPENAI, {"messages": _USER, "max_tokens": "ten"}),
    ("temperature-wrong-type", OPENAI, {"messages": _USER, "max_tokens": 8, "temperature": "hot"}),
    ("unknown-model", OPENAI, {"model": "no-such-model", "messages": _USER, "max_tokens": 8}),
    ("negative-max-tokens", OPENAI, {"messages": _USER, "max_tokens": -5}),
    ("zero-max-tokens-stream", OPENAI, {"messages": _USER, "max_tokens": 0, "stream": True}),
    ("empty-messages", OPENAI, {"messages": [], "max_tokens": 8}),
    ("huge-max-tokens", OPENAI, {"messages": _USER, "max_tokens": 10**9}),
    ("huge-max-tokens-stream", OPENAI, {"messages": _USER, "max_tokens": 2**64, "stream": True}),
    ("temperature-out-of-range", OPENAI, {"messages": _USER, "max_tokens": 8, "temperature": 7.5}),
    ("unknown-role", OPENAI, {"messages": [{"role": "wizard", "content": "hi"}], "max_tokens": 8}),
    ("message-not-an-object", OPENAI, {"messages": ["hi"], "max_tokens": 8}),
    ("max-tokens-boolean", OPENAI, {"messages": _USER, "max_tokens": True}),
    ("seed-out-of-range", OPENAI, {"messages": _USER, "max_tokens": 8, "seed": 2**70}),
    ("tool-call-not-an-object", OPENAI, {"messages": [_BAD_TOOL_CALL, *_USER], "max_tokens": 8}),
    ("deeply-nested-json", OPENAI, b'{"model": "m", "max_tokens": 8, "messages": ' + _DEEP + b"}"),
    ("malformed-json", ANTHROPIC, b'{"model": "m", "max_tokens": 8, "messages": [{"role": "us'),
    ("not-an-object", ANTHROPIC, b'"hello"'),
    ("missing-max-tokens", ANTHROPIC, {"messages": _USER}),
    ("messages-wrong-type", ANTHROPIC, {"messages": 42, "max_tokens": 8}),
    ("unknown-model", ANTHROPIC, {"model": "no-such-model", "messages": _USER, "max_tokens": 8}),
    ("negative-max-tokens", ANTHROPIC, {"messages": _USER, "max_tokens": -3}),
    ("empty-messages", ANTHROPIC, {"messages": [], "max_tokens": 8}),
    ("huge-max-tokens", ANTHROPIC, {"messages": _USER, "max_tokens": 10**9}),
    ("huge-max-tokens-stream", ANTHROPIC, {"messages": _USER, "max_tokens": 10**9, "stream": True}),
    ("temperature-out-of-range", ANTHROPIC, {"messages": _USER, "max_tokens": 8, "temperature": 1.5}),
    ("content-part-not-an-object", ANTHROPIC, {"messages": [{"role": "user", "content": ["hi"]}], "max_tokens": 8}),
    ("deeply-nested-json", ANTHROPIC, b'{"model": "m", "max_tokens": 8, "messages": ' + _DEEP + b"}"),
)


def bad_inputs(skip: Sequence[str] = ()) -> tuple[tuple[str, str, bytes | dict[str, Any]], ...]:
    """``BAD_INPUTS`` but those named in ``skip`` ("name" for both APIs, or "api/name")."""
    return tuple(b for b in BAD_INPUTS if b[0] not in skip and f"{b[1]}/{b[0]}" not in skip)


def greedy_cases() -> dict[str, list[dict[str, Any]]]:
    """The greedy requests' fixed prompts (OpenAI-style messages): a short one, two sharing a system prompt, two
    sharing a document, and a second turn; the shared prefixes are cache hits (device, or a tier after an eviction)
    whenever they run after their sibling."""
    sp = make_workload("system-prompt", quick=True, seed=GREEDY_SEED, questions=2)
    docs = make_workload("documents", quick=True, seed=GREEDY_SEED, documents=1, questions=2)
    chat = make_workload("chat", quick=True, seed=GREEDY_SEED, users=1, turns=2)
    return {
        "short": [{"role": "user", "content": "Name three rivers and the cities on their banks."}],
        "system-a": request_messages(sp.sessions[0], 0, []),
        "system-b": request_messages(sp.sessions[1], 0, []),
        "document-a": request_messages(docs.sessions[0], 0, []),
        "document-b": request_messages(docs.sessions[1], 0, []),
        "second-turn": request_messages(chat.sessions[0], 1, [FIXED_ANSWER]),
    }


def request_body(api: str, messages: list[dict[str, Any]], max_tokens: int, temperature: float, stream: bool,
                 tools: list[dict[str, Any]] | None = None,
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """A chat request in ``api``'s shape (OpenAI messages in; for Anthropic the system message moves to the top)."""
    body: dict[str, Any] = {"model": SERVED_MODEL, "max_tokens": max_tokens, "temperature": temperature}
    if api == OPENAI:
        body["messages"] = messages
        if tools:
            body["tools"] = tools
        if stream:
            body["stream_options"] = {"include_usage": True}
    else:
        if messages and messages[0]["role"] == "system":
            body["system"] = messages[0]["content"]
            messages = messages[1:]
        body["messages"] = messages
    body["stream"] = stream
    body.update(extra or {})
    return body


class SessionSource:
    """Workload sessions for the clients, every soak workload's mixed in one queue (seeded shuffle); when it runs
    dry the next generation is built with the next seed, so a long run keeps writing new prefixes."""

    def __init__(self, names: Sequence[str], quick: bool, seed: int):
        self.names, self.quick, self.seed = list(names), quick, seed
        self.generation = 0
        self._queue: deque[tuple[str, Session]] = deque()
        self._lock = threading.Lock()

    def next(self) -> tuple[str, Session]:
        with self._lock:
            if not self._queue:
                self._refill()
            return self._queue.popleft()

    def _refill(self) -> None:
        seed = self.seed + 7919 * self.generation
        items: list[tuple[str, Session]] = []
        for name in self.names:
            base, overrides = SOAK_WORKLOADS[name]
            workload = make_workload(base, quick=self.quick, seed=seed, **overrides)
            items += [(name, s) for s in workload.sessions]
        random.Random(seed).shuffle(items)
        self._queue.extend(items)
        self.generation += 1


# ---- one exchange ----------------------------------------------------------------------------------------------
@dataclass
class Exchange:
    """What came back for one request."""

    status: int | None = None
    replica: str | None = None
    ttft_s: float | None = None  # streams: to the first event (promptcache sends it once the first token exists)
    e2e_s: float = 0.0
    text: str = ""
    events: int = 0
    finished: bool = False  # the answer was complete: [DONE] / message_stop, or a whole non-streamed body
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    cached_by_tier: dict[str, int] | None = None
    output_tokens: int | None = None
    error: str | None = None  # why it failed (None: it did not)
    body: Any = None  # a non-streamed answer's JSON (or its text when it is not JSON)
    retry_after: float | None = None  # a 429 / 503's Retry-After header, in seconds


def _usage(api: str, usage: dict[str, Any] | None, out: Exchange) -> None:
    if not isinstance(usage, dict):
        return
    if api == OPENAI:
        out.prompt_tokens = usage.get("prompt_tokens", out.prompt_tokens)
        out.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", out.cached_tokens)
        out.output_tokens = usage.get("completion_tokens", out.output_tokens)
    else:
        if "input_tokens" in usage:
            out.prompt_tokens = sum(usage.get(k) or 0 for k in ("input_tokens", "cache_read_input_tokens",
                                                               "cache_creation_input_tokens"))  # fmt: skip
            out.cached_tokens = usage.get("cache_read_input_tokens", out.cached_tokens)
        out.output_tokens = usage.get("output_tokens", out.output_tokens)
    tiers = usage.get("cached_tokens_by_tier")
    if isinstance(tiers, dict) and tiers:
        out.cached_by_tier = {str(k): int(v) for k, v in tiers.items()}


def _sse_events(lines: Iterator[str]) -> Iterator[tuple[str | None, str]]:
    """(event name, data) per server-sent event."""
    name: str | None = None
    data: list[str] = []
    for line in lines:
        if not line:
            if data:
                yield name, "\n".join(data)
            name, data = None, []
        elif line.startswith("event:"):
            name = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())
    if data:
        yield name, "\n".join(data)


def _read_stream(api: str, resp: Any, out: Exchange, t0: float, timeout: float, cut_after: int | None) -> None:
    """Parse a stream into ``out``; stops after ``cut_after`` events (the client goes away) or at the timeout."""
    for name, data in _sse_events(resp.iter_lines()):
        now = time.perf_counter()
        out.events += 1
        if out.ttft_s is None:
            out.ttft_s = now - t0
        if now - t0 > timeout:
            out.error = f"timed out after {timeout:g} s mid-stream ({out.events} events)"
            return
        if api == OPENAI:
            if data == "[DONE]":
                out.finished = out.finish_reason is not None
                if not out.finished:
                    out.error = "the stream ended ([DONE]) without a finish_reason"
                return
            obj = json.loads(data)
            if "error" in obj:
                out.error = f"error event: {json.dumps(obj['error'])[:300]}"
                return
            _usage(api, obj.get("usage"), out)
            for choice in obj.get("choices") or []:
                out.text += (choice.get("delta") or {}).get("content") or ""
                out.finish_reason = choice.get("finish_reason") or out.finish_reason
        else:
            obj = json.loads(data)
            kind = obj.get("type", name)
            if kind == "error" or name == "error":
                out.error = f"error event: {json.dumps(obj.get('error', obj))[:300]}"
                return
            if kind == "message_start":
                _usage(api, (obj.get("message") or {}).get("usage"), out)
            elif kind == "content_block_delta":
                out.text += (obj.get("delta") or {}).get("text") or ""
            elif kind == "message_delta":
                out.finish_reason = (obj.get("delta") or {}).get("stop_reason")
                _usage(api, obj.get("usage"), out)
            elif kind == "message_stop":
                out.finished = out.finish_reason is not None
                if not out.finished:
                    out.error = "message_stop without a stop_reason"
                return
        if cut_after is not None and out.events >= cut_after:
            return
    out.error = f"the stream ended without its final event ({out.events} events)"


def _check_answer(api: str, body: Any, out: Exchange) -> None:
    """A non-streamed 200's body: complete and well formed, or ``out.error`` says what is wrong."""
    if not isinstance(body, dict):
        out.error = f"the body is not a JSON object: {str(body)[:200]}"
        return
    _usage(api, body.get("usage"), out)
    if api == OPENAI:
        choices = body.get("choices")
        if not choices or not isinstance(choices[0].get("message"), dict):
            out.error = f"no choices[0].message: {json.dumps(body)[:300]}"
            return
        out.text = choices[0]["message"].get("content") or ""
        out.finish_reason = choices[0].get("finish_reason")
    else:
        if body.get("type") != "message" or not isinstance(body.get("content"), list):
            out.error = f"not an Anthropic message: {json.dumps(body)[:300]}"
            return
        out.text = "".join(b.get("text", "") for b in body["content"] if b.get("type") == "text")
        out.finish_reason = body.get("stop_reason")
    if out.finish_reason is None:
        out.error = "no finish / stop reason"
    out.finished = out.error is None


def exchange(http: Any, url: str, api: str, payload: bytes | dict[str, Any], timeout: float,
             cut_after: int | None = None) -> Exchange:  # fmt: skip
    """POST one request and read the whole answer (or, with ``cut_after``, that many stream events, then close the
    connection as a client that goes away does). Never raises for what the server does: ``error`` says it."""
    import httpx

    out = Exchange()
    content = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    stream = isinstance(payload, dict) and bool(payload.get("stream"))
    headers = {"content-type": "application/json"}
    if api == ANTHROPIC:
        headers["anthropic-version"] = "2023-06-01"
    t0 = time.perf_counter()
    try:
        with http.stream("POST", url + PATHS[api], content=content, headers=headers) as resp:
            out.status = resp.status_code
            out.replica = resp.headers.get(REPLICA_HEADER)
            with contextlib.suppress(TypeError, ValueError):
                out.retry_after = float(resp.headers.get("retry-after"))
            if resp.status_code == 200 and resp.headers.get("content-type", "").startswith("text/event-stream"):
                _read_stream(api, resp, out, t0, timeout, cut_after)
            else:
                raw = resp.read()
                try:
                    out.body = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    out.body = raw[:500].decode(errors="replace")
                if resp.status_code != 200:
                    out.error = f"HTTP {resp.status_code}: {str(out.body)[:300]}"
                elif stream:
                    out.error = f"a streamed request answered {resp.headers.get('content-type')!r}"
                else:
                    _check_answer(api, out.body, out)
    except httpx.TimeoutException as err:
        out.error = f"timed out ({type(err).__name__}) after {time.perf_counter() - t0:.1f} s"
    except (httpx.HTTPError, json.JSONDecodeError, UnicodeDecodeError) as err:
        out.error = f"{type(err).__name__}: {err}"[:300]
    out.e2e_s = time.perf_counter() - t0
    return out


def error_format_problem(api: str, status: int | None, body: Any) -> str | None:
    """None when a bad request got a 4xx with an error body in ``api``'s own format, else what is wrong."""
    if status is None or not 400 <= status < 500:
        return f"status {status}, not a 4xx"
    if not isinstance(body, dict):
        return f"the body is not a JSON object: {str(body)[:200]}"
    err = body.get("error")
    if not isinstance(err, dict) or not isinstance(err.get("message"), str) or not isinstance(err.get("type"), str):
        return f"no error object with message and type: {json.dumps(body)[:200]}"
    if api == ANTHROPIC and body.get("type") != "error":
        return f'an Anthropic error body has "type": "error": {json.dumps(body)[:200]}'
    if api == OPENAI and "type" in body:
        return f"an OpenAI error body is {{'error': ...}} alone: {json.dumps(body)[:200]}"
    return None


# ---- records ---------------------------------------------------------------------------------------------------
@dataclass
class Record:
    """One request of the soak (times in seconds since the load began)."""

    kind: str  # WORKLOAD, GREEDY, DISCONNECT, BAD
    label: str  # the workload, the greedy case or the bad input's name
    api: str
    stream: bool
    start_s: float
    end_s: float
    ttft_s: float | None
    status: int | None
    outcome: str  # "ok", "failed", "cut-by-kill" (set by the analysis), "bad-ok", "bad-wrong"
    error: str | None = None
    replica: str | None = None
    prompt_tokens: int | None = None
    cached_tokens: int | None = None
    cached_by_tier: dict[str, int] | None = None
    output_tokens: int | None = None
    text: str | None = None  # greedy requests only
    phase: str = STEADY

    def row(self) -> list[Any]:
        return [self.kind, self.label, self.api, self.stream, round(self.start_s, 3), round(self.end_s, 3),
                None if self.ttft_s is None else round(self.ttft_s * 1000, 1), self.status, self.outcome,
                self.replica, self.prompt_tokens, self.cached_tokens, self.output_tokens, self.phase]  # fmt: skip


class Recorder:
    """The records, appended from every client thread; ``t0`` is when the load began."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.records: list[Record] = []
        self._lock = threading.Lock()

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def add(self, record: Record) -> None:
        with self._lock:
            self.records.append(record)

    def snapshot(self) -> list[Record]:
        with self._lock:
            return list(self.records)


# ---- the fleet ---------------------------------------------------------------------------------------------------
class SoakFleet(Fleet):
    """``fleet_bench.Fleet`` with a disk tier per replica and the Redis tier's TTL, whose Redis and replicas can be
    killed and started again with the same flags, and which also stops the reference server it is given."""

    def __init__(self, spec: FleetSpec, workdir: Path, disk_dirs: Sequence[Path], disk_gb: float, redis_ttl: float,
                 redis_maxmemory_mb: int | None = None):  # fmt: skip
        super().__init__(spec, workdir)
        self.disk_dirs, self.disk_gb, self.redis_ttl = list(disk_dirs), disk_gb, redis_ttl
        self.redis_maxmemory_mb = redis_maxmemory_mb
        self.replica_args: list[list[str]] = []
        self.replica_procs: list[subprocess.Popen[bytes]] = []  # the live process of each replica, by index
        self.router_proc: subprocess.Popen[bytes] | None = None
        self.extra: list[subprocess.Popen[bytes]] = []  # the reference server
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        # NOTE: every process is started from this one thread, which lives as long as the fleet: PR_SET_PDEATHSIG
        # (``_spawn``) fires when the *thread* that forked the child ends, so a replica restarted from the chaos
        # thread would get SIGTERM the moment that thread finished its plan.
        self._spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="soak-spawner")

    def start(self) -> SoakFleet:
        """Start Redis, the replicas and the router; wait until the router has every replica up and synced."""
        import httpx

        from promptcache.bench.tier_bench import RedisProcess

        spec = self.spec
        self.workdir.mkdir(parents=True, exist_ok=True)
        with self._lock:
            if self._closed:
                raise Aborted("the fleet was stopped before it started")
            self.redis = RedisProcess(self.workdir / "redis", self.redis_maxmemory_mb).start()
        for i in range(spec.replicas):
            name, port = f"r{i}", _free_port()
            args = [sys.executable, "-m", "promptcache.cli", "serve", "--model", str(spec.model), "--port", str(port),
                    "--redis-url", self.redis.url, "--redis-ttl", repr(self.redis_ttl), "--replica-name", name,
                    "--served-model-name", SERVED_MODEL, "--device", "cpu", "--dtype", spec.dtype,
                    "--block-size", str(spec.block_size), "--kv-cache-memory-gb", repr(spec.kv_cache_memory_gb),
                    "--disk-cache", str(self.disk_dirs[i]), "--disk-cache-gb", repr(self.disk_gb),
                    "--tier-load-policy", spec.tier_load_policy, "--log-level", "warning"]  # fmt: skip
            self.names.append(name)
            self.replica_urls.append(f"http://127.0.0.1:{port}")
            self.replica_args.append(args)
            self.replica_procs.append(self._launch(i))
        port = _free_port()
        self.router_url = f"http://127.0.0.1:{port}"
        args = [sys.executable, "-m", "promptcache.cli", "router", "--redis-url", self.redis.url, "--policy",
                spec.policy, "--port", str(port), "--health-interval", "0.25", "--log-level", "warning"]  # fmt: skip
        for url in self.replica_urls:
            args += ["--replica", url]
        self.router_proc = self.spawn(args, self.workdir / "router.log")
        self._add(self.router_proc)
        deadline = time.monotonic() + spec.start_timeout
        for name, url in zip(self.names, self.replica_urls):
            self._wait(lambda u=url: httpx.get(f"{u}/health", timeout=2).status_code == 200, deadline, name)
        self._wait(lambda: len(self.in_rotation()) == spec.replicas, deadline, "router")
        return self

    def _launch(self, i: int) -> subprocess.Popen[bytes]:
        proc = self.spawn(self.replica_args[i], self.workdir / f"{self.names[i]}.log")
        self._add(proc)
        return proc

    def spawn(self, args: list[str], log: Path) -> subprocess.Popen[bytes]:
        """``_spawn`` on the spawner thread (see ``__init__``)."""
        return self._spawner.submit(_spawn, args, log, self.env).result(timeout=60)

    def in_rotation(self) -> set[str]:
        """The replicas the router has up with a synced view (raises on a router that does not answer)."""
        import httpx

        state = httpx.get(f"{self.router_url}/v1/fleet", timeout=2).json()
        return {r["name"] for r in state["replicas"] if r["state"] == "up" and (r["index"] or {}).get("synced")}

    def kill_replica(self, i: int) -> int:
        """SIGKILL replica ``i``; its pid. It leaves the process list first, so waits do not take it for a failure."""
        with self._lock:
            proc = self.replica_procs[i]
            if proc in self.procs:
                self.procs.remove(proc)
        proc.kill()
        proc.wait(timeout=10)
        return proc.pid

    def restart_replica(self, i: int, timeout: float) -> int:
        """Start replica ``i`` again with the same flags (same port, same disk directory) and wait until it answers
        /health; its new pid."""
        import httpx

        proc = self._launch(i)
        self.replica_procs[i] = proc
        url = self.replica_urls[i]
        self._wait(lambda: httpx.get(f"{url}/health", timeout=2).status_code == 200, time.monotonic() + timeout,
                   self.names[i])  # fmt: skip
        return proc.pid

    def kill_redis(self) -> int:
        """SIGKILL redis-server (kill -9); its pid."""
        proc = self.redis.proc
        proc.kill()
        proc.wait(timeout=10)
        return proc.pid

    def start_redis(self) -> int | None:
        """redis-server again on the same port (empty: no persistence); its pid (None when the fleet is closed).
        Under the lock: ``close`` cannot miss a Redis started while it runs."""
        with self._lock:
            if self._closed:
                return None
            self.redis.start()
            return self.redis.proc.pid

    def start_reference(self, port: int) -> subprocess.Popen[bytes]:
        """The cold reference: ``serve`` on the same model with no tiers, no prefix caching, no Redis."""
        args = [sys.executable, "-m", "promptcache.cli", "serve", "--model", str(self.spec.model), "--port", str(port),
                "--served-model-name", SERVED_MODEL, "--device", "cpu", "--dtype", self.spec.dtype,
                "--block-size", str(self.spec.block_size), "--no-prefix-caching", "--log-level", "warning"]  # fmt: skip
        self.workdir.mkdir(parents=True, exist_ok=True)
        proc = self.spawn(args, self.workdir / "reference.log")
        with self._lock:
            self.extra.append(proc)
            if self._closed:
                _stop(proc, 2.0)
        return proc

    def pids(self) -> dict[str, int | None]:
        """The live process of each replica, the router and Redis (None: not running)."""

        def alive(p: subprocess.Popen[bytes] | None) -> int | None:
            return p.pid if p is not None and p.poll() is None else None

        out = {name: alive(p) for name, p in zip(self.names, self.replica_procs)}
        out["router"] = alive(self.router_proc)
        out["redis"] = alive(self.redis.proc if self.redis is not None else None)
        return out

    def close(self) -> None:
        with self._lock:
            extra = list(self.extra)
        for proc in extra:
            _stop(proc, 5.0)
        super().close()
        self._spawner.shutdown(wait=False)


class DiskMount:
    """The tmpfs the chaos thread fills (a plain directory when mounting fails: then it cannot really be filled)."""

    def __init__(self, path: Path, size_mb: int):
        self.path, self.size_mb = path, size_mb
        self.mounted = False
        self.note: str | None = None

    def mount(self) -> DiskMount:
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.size_mb}m", "tmpfs", str(self.path)],
                                  capture_output=True, text=True, timeout=30)  # fmt: skip
        except (OSError, subprocess.TimeoutExpired) as err:
            self.note = f"mount failed ({type(err).__name__}: {err}); the disk tier is a plain directory"
            return self
        if done.returncode == 0:
            self.mounted = True
        else:
            self.note = f"mount failed ({(done.stderr or done.stdout).strip()}); the disk tier is a plain directory"
        return self

    def filler(self) -> Path:
        return self.path / "soak-filler.bin"

    def fill(self, append: bool = False) -> dict[str, Any]:
        """Write the filler until ENOSPC (on the tmpfs), or ``size_mb`` on a plain directory; ``append``: grow it."""
        written, hit = 0, False
        cap = None if self.mounted else self.size_mb << 20
        with open(self.filler(), "ab" if append else "wb", buffering=0) as f:
            for chunk in (1 << 20, 4096):  # big chunks, then small ones: up to the last free page
                block = b"\0" * chunk
                while cap is None or written < cap:
                    try:
                        written += f.write(block)
                    except OSError as err:
                        if err.errno != errno.ENOSPC:
                            raise
                        hit = True
                        break
        return {"filler_bytes": written, "enospc": hit}

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.path).free

    def clear(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.filler().unlink()

    def unmount(self) -> None:
        self.clear()
        if not self.mounted:
            return
        done = subprocess.run(["umount", str(self.path)], capture_output=True, text=True, timeout=30)
        if done.returncode != 0:  # something still holds a file there (a process not yet reaped): detach it lazily
            subprocess.run(["umount", "-l", str(self.path)], capture_output=True, text=True, timeout=30)
        self.mounted = False


# ---- the chaos thread -------------------------------------------------------------------------------------------
def fault_plan(faults: Sequence[str], seconds: float, every: float) -> list[tuple[float, str]]:
    """When each fault starts (seconds into the load): after a lead-in of steady load, the faults in order, cycled
    as many times as the run holds one every ``every`` seconds (at least once each), spread evenly."""
    if not faults:
        return []
    lead = max(2.0, min(60.0, 0.1 * seconds))
    usable = max(seconds - lead, 0.0)
    cycles = max(1, int(usable // (every * len(faults))))
    n = cycles * len(faults)
    slot = usable / n
    return [(lead + k * slot, faults[k % len(faults)]) for k in range(n)]


class Chaos(threading.Thread):
    """Injects the planned faults one after another, each restored in a ``finally``; waits after each until the
    fleet is whole again. Records each fault with its window (seconds since the load began)."""

    def __init__(self, fleet: SoakFleet, disk: DiskMount, recorder: Recorder, plan: list[tuple[float, str]],
                 args: argparse.Namespace, stop: threading.Event):  # fmt: skip
        super().__init__(name="soak-chaos", daemon=True)
        self.fleet, self.disk, self.rec, self.plan, self.args, self.stop = fleet, disk, recorder, plan, args, stop
        self.faults: list[dict[str, Any]] = []
        self.error: str | None = None

    def run(self) -> None:
        try:
            for at, kind in self.plan:
                if self.stop.wait(max(0.0, at - self.rec.now())):
                    return
                fault: dict[str, Any] = {"kind": kind, "phase": FAULT_PHASE[kind], "planned_s": round(at, 2)}
                self.faults.append(fault)
                try:
                    getattr(self, f"_{kind}")(fault)
                except Exception as err:  # an injection that went wrong is a result too; the next one still runs
                    fault["error"] = f"{type(err).__name__}: {err}"
                    fault.setdefault("end_s", self.rec.now())
                self._recover(fault)
        except Exception as err:  # written into the report rather than lost with the thread
            self.error = f"{type(err).__name__}: {err}"
            traceback.print_exc()

    def _hold(self) -> None:
        self.stop.wait(self.args.fault_seconds)  # shortened when the run is stopped

    def _redis(self, fault: dict[str, Any]) -> None:
        fault["start_s"] = self.rec.now()
        fault["killed_pid"] = self.fleet.kill_redis()
        try:
            self._hold()
        finally:
            fault["restarted_pid"] = self.fleet.start_redis()
            fault["end_s"] = self.rec.now()

    def _disk(self, fault: dict[str, Any]) -> None:
        name = self.fleet.names[TMPFS_REPLICA]
        before = tier_errors(self.fleet.replica_urls[TMPFS_REPLICA], "disk")
        fault["start_s"] = self.rec.now()
        fault["replica"] = name
        try:
            fault.update(self.disk.fill())
            fault["fill_s"] = round(self.rec.now() - fault["start_s"], 2)
            fault["free_bytes_while_full"] = self.disk.free_bytes()
            fault["real_enospc"] = self.disk.mounted
            # NOTE: the disk tier makes room by deleting its own oldest entries, and then its write fits in the space
            # it freed: a filler written once leaves the tier working. Topping it up every 20 ms takes that space
            # back, so the tier's writes really meet ENOSPC while the fault lasts.
            deadline = time.monotonic() + self.args.fault_seconds
            top_ups = 0
            while time.monotonic() < deadline and not self.stop.wait(0.02):
                if self.disk.mounted:
                    top_ups += self.disk.fill(append=True)["filler_bytes"] > 0
            fault["top_ups"] = top_ups
        finally:
            self.disk.clear()
            fault["end_s"] = self.rec.now()
        after = tier_errors(self.fleet.replica_urls[TMPFS_REPLICA], "disk")
        if before is not None and after is not None:  # what the disk tier saw: disk_full errors while it was full
            fault["disk_tier_errors_during"] = {k: after.get(k, 0) - before.get(k, 0)
                                                for k in after if after.get(k, 0) != before.get(k, 0)}  # fmt: skip

    def _replica(self, fault: dict[str, Any]) -> None:
        i = KILLED_REPLICA
        name = self.fleet.names[i]
        fault["replica"] = name
        fault["start_s"] = self.rec.now()
        fault["killed_pid"] = self.fleet.kill_replica(i)
        try:
            fault["restarted_pid"] = self.fleet.restart_replica(i, self.args.recovery_timeout + 120)
            fault["healthy_s"] = round(self.rec.now() - fault["start_s"], 2)
            deadline = time.monotonic() + self.args.recovery_timeout
            while name not in self._rotation() and time.monotonic() < deadline:
                time.sleep(0.1)
            fault["rejoined"] = name in self._rotation()
        finally:
            fault["end_s"] = self.rec.now()

    def _rotation(self) -> set[str]:
        try:
            return self.fleet.in_rotation()
        except Exception:  # the router did not answer this time
            return set()

    def _recover(self, fault: dict[str, Any]) -> None:
        """Wait until the fleet is whole again; ``recovered_s`` is the time that took after the fault ended."""
        deadline = time.monotonic() + self.args.recovery_timeout
        why = "not checked"
        while time.monotonic() < deadline:
            why = fleet_whole(self.fleet)
            if why is None:
                fault["recovered_s"] = round(self.rec.now() - fault["end_s"], 2)
                return
            if self.fleet._closed:
                break
            time.sleep(0.25)
        fault["recovered_s"] = None
        fault["not_recovered"] = why


def tier_errors(url: str, tier: str) -> dict[str, int] | None:
    """A replica's error counters of one tier (None when it does not answer)."""
    import httpx

    try:
        stats = httpx.get(f"{url}/v1/cache/stats", timeout=10).json()
        return next(dict(t["errors"]) for t in stats["tiers"]["tiers"] if t["tier"] == tier)
    except (httpx.HTTPError, ValueError, KeyError, TypeError, StopIteration):
        return None


def fleet_whole(fleet: SoakFleet) -> str | None:
    """None when Redis answers, the router has every replica up and synced and serves a probe; else what is not."""
    import httpx

    try:
        with fleet.redis.client() as c:
            c.ping()
    except Exception as err:  # redis' own exceptions: not imported here
        return f"redis: {type(err).__name__}"
    try:
        up = fleet.in_rotation()
        if len(up) < len(fleet.names):
            return f"in rotation: {sorted(up)}"
        body = request_body(OPENAI, [{"role": "user", "content": "Are you there?"}], 2, 0.0, False)
        resp = httpx.post(f"{fleet.router_url}/v1/chat/completions", json=body, timeout=30)
        return None if resp.status_code == 200 else f"probe: HTTP {resp.status_code}"
    except (httpx.HTTPError, ValueError, KeyError) as err:
        return f"router: {type(err).__name__}: {err}"


# ---- sampling ----------------------------------------------------------------------------------------------------
class Sampler(threading.Thread):
    """Every ``interval`` seconds: each process's RSS (psutil), and each replica's blocks in use and requests
    (``/health``: the pool's own counters, read without waiting for the engine thread, so the sample's time is exact)
    and cached blocks and evictions (``/v1/cache/stats``, which runs on the engine thread: it answers between two
    steps, and is left out of a sample when that takes longer than the interval; its latency is recorded)."""

    def __init__(self, fleet: SoakFleet, recorder: Recorder, interval: float, stop: threading.Event):
        super().__init__(name="soak-sampler", daemon=True)
        self.fleet, self.rec, self.interval, self.stop = fleet, recorder, interval, stop
        self.rows: list[list[Any]] = []
        self.errors: Counter[str] = Counter()

    def _get(self, url: str, timeout: float) -> tuple[dict[str, Any], float]:
        import httpx

        t = time.perf_counter()
        return httpx.get(url, timeout=timeout).json(), time.perf_counter() - t

    def run(self) -> None:
        import concurrent.futures as cf

        import httpx
        import psutil

        pool = ThreadPoolExecutor(max_workers=2 * REPLICAS, thread_name_prefix="soak-sampler-http")
        try:
            while True:
                t = round(self.rec.now(), 2)
                pids = self.fleet.pids()
                asks: dict[str, tuple[cf.Future[Any], cf.Future[Any]]] = {}
                for name, url in zip(self.fleet.names, self.fleet.replica_urls):
                    if pids.get(name) is not None:
                        asks[name] = (pool.submit(self._get, f"{url}/health", 2.0),
                                      pool.submit(self._get, f"{url}/v1/cache/stats", 30.0))  # fmt: skip
                rss: dict[str, float | None] = {}
                for name, pid in pids.items():
                    rss[name] = None
                    if pid is not None:
                        with contextlib.suppress(psutil.Error):
                            rss[name] = round(psutil.Process(pid).memory_info().rss / (1 << 20), 1)
                cf.wait([f for pair in asks.values() for f in pair], timeout=self.interval)
                for name, pid in pids.items():
                    health: dict[str, Any] = {}
                    stats: dict[str, Any] = {}
                    stats_ms = None
                    if name in asks:
                        for future, into in zip(asks[name], (health, stats)):
                            if not future.done():
                                self.errors[f"{name}: {'health' if into is health else 'stats'} slower than "
                                            f"{self.interval:g} s"] += 1  # fmt: skip
                                continue
                            try:
                                answer, seconds = future.result()
                            except (httpx.HTTPError, ValueError) as err:
                                self.errors[f"{name}: {type(err).__name__}"] += 1
                                continue
                            into.update(answer)
                            if into is stats:
                                stats_ms = round(seconds * 1000, 1)
                    self.rows.append([t, name, pid, rss[name], health.get("blocks_in_use"), stats.get("blocks_cached"),
                                      stats.get("evictions"), health.get("requests"), stats_ms])  # fmt: skip
                if self.stop.wait(max(0.0, self.interval - (self.rec.now() - t))):
                    return
        finally:
            pool.shutdown(wait=False, cancel_futures=True)


# ---- the clients -------------------------------------------------------------------------------------------------
@dataclass
class LoadConfig:
    """What the clients send, and how much."""

    router_url: str
    clients: int
    max_requests: int | None
    request_timeout: float
    greedy_share: float
    disconnect_share: float
    bad_share: float
    anthropic_share: float
    stream_share: float
    seed: int
    cases: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    bad_inputs: tuple[tuple[str, str, bytes | dict[str, Any]], ...] = BAD_INPUTS


class Load:
    """``clients`` threads, each sending one request after another until ``stop`` (or the request cap)."""

    def __init__(self, cfg: LoadConfig, sessions: SessionSource, recorder: Recorder, stop: threading.Event):
        self.cfg, self.sessions, self.rec, self.stop = cfg, sessions, recorder, stop
        self.sent = 0
        self._bad_next = 0  # bad inputs go round-robin: a short run covers every case
        self._local = threading.local()  # .pause: the seconds this client's last Retry-After asked for
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._client, args=(i,), name=f"soak-client-{i}", daemon=True)
                        for i in range(cfg.clients)]  # fmt: skip

    def start(self) -> None:
        self.threads.append(threading.Thread(target=self._sweep, name="soak-bad-input-sweep", daemon=True))
        for t in self.threads:
            t.start()

    def _sweep(self) -> None:
        """Every bad input once as the load starts (besides the share the clients send): each case is covered
        however short the run."""
        import httpx

        with httpx.Client(base_url=self.cfg.router_url, timeout=self.cfg.request_timeout) as http:
            for name, api, payload in self.cfg.bad_inputs:
                if self.stop.is_set():
                    return
                self._send_bad(http, name, api, payload)

    def join(self, timeout: float) -> list[str]:
        """Wait for every client (they stop after their request in flight); the names of those still running."""
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(timeout=max(0.0, deadline - time.monotonic()))
        return [t.name for t in self.threads if t.is_alive()]

    def _take(self) -> bool:
        with self._lock:
            if self.stop.is_set() or (self.cfg.max_requests is not None and self.sent >= self.cfg.max_requests):
                return False
            self.sent += 1
            return True

    def _client(self, i: int) -> None:
        import httpx

        cfg = self.cfg
        rng = random.Random(cfg.seed * 100003 + i)
        session: list[Any] | None = None  # [workload name, Session, api, answers]
        timeout = httpx.Timeout(cfg.request_timeout, connect=10.0)
        with httpx.Client(base_url=cfg.router_url, timeout=timeout) as http:
            self.stop.wait(rng.uniform(0, 1.0))  # the clients start over a second, not in one burst
            while self._take():
                r = rng.random()
                try:
                    if r < cfg.bad_share and cfg.bad_inputs:
                        self._bad(http, rng)
                    elif r < cfg.bad_share + cfg.disconnect_share:
                        self._disconnect(http, rng)
                    elif r < cfg.bad_share + cfg.disconnect_share + cfg.greedy_share:
                        self._greedy(http, rng)
                    else:
                        session = self._turn(http, rng, session)
                    pause, self._local.pause = getattr(self._local, "pause", 0.0), 0.0
                    if pause:  # told to retry later (429 / 503): wait as a client would, rather than spin on it
                        self.stop.wait(min(pause, RETRY_AFTER_CAP_S))
                except Exception as err:  # a bug of the soak itself: a failed request, with what it was
                    now = self.rec.now()
                    self.rec.add(Record("client-error", type(err).__name__, "-", False, now, now, None, None, "failed",
                                        error=f"{type(err).__name__}: {err}"[:300]))  # fmt: skip
                    session = None

    def _api(self, rng: random.Random) -> str:
        return ANTHROPIC if rng.random() < self.cfg.anthropic_share else OPENAI

    def _send(self, http: Any, kind: str, label: str, api: str, body: dict[str, Any],
              cut_after: int | None = None, keep_text: bool = False) -> tuple[Record, Exchange]:  # fmt: skip
        start = self.rec.now()
        out = exchange(http, "", api, body, self.cfg.request_timeout, cut_after)
        if out.retry_after is not None and out.status in (429, 503):
            self._local.pause = out.retry_after
        if cut_after is not None and out.error is None and out.status == 200:
            outcome = "ok"  # cut by the client as planned (or finished before it could be cut)
        else:
            outcome = "ok" if out.error is None else "failed"
        record = Record(kind, label, api, bool(body.get("stream")), start, self.rec.now(), out.ttft_s, out.status,
                        outcome, out.error, out.replica, out.prompt_tokens, out.cached_tokens, out.cached_by_tier,
                        out.output_tokens, out.text if keep_text else None)  # fmt: skip
        self.rec.add(record)
        return record, out

    def _turn(self, http: Any, rng: random.Random, session: list[Any] | None) -> list[Any] | None:
        """The next turn of this client's session (a new session when it has none or its last one is done)."""
        if session is None or len(session[3]) >= len(session[1].steps):
            name, sess = self.sessions.next()
            api = OPENAI if sess.tools or rng.random() >= self.cfg.anthropic_share else ANTHROPIC
            session = [name, sess, api, []]
        name, sess, api, answers = session
        k = len(answers)
        extra: dict[str, Any] = {}
        if rng.random() < 0.5:  # soft affinity for half the sessions, as clients that send a key do
            key = sess.session_id
            extra = {"prompt_cache_key": key} if api == OPENAI else {"metadata": {"user_id": key}}
        body = request_body(api, request_messages(sess, k, answers), sess.steps[k].max_tokens, SAMPLED_TEMPERATURE,
                            rng.random() < self.cfg.stream_share, sess.tools, extra)  # fmt: skip
        record, out = self._send(http, WORKLOAD, name, api, body)
        if record.outcome != "ok":
            return None  # the conversation cannot go on without this answer
        answers.append(out.text)
        return session

    def _greedy(self, http: Any, rng: random.Random) -> None:
        case = rng.choice(sorted(self.cfg.cases))
        api = self._api(rng)
        body = request_body(api, self.cfg.cases[case], GREEDY_MAX_TOKENS, 0.0, rng.random() < self.cfg.stream_share)
        self._send(http, GREEDY, case, api, body, keep_text=True)

    def _disconnect(self, http: Any, rng: random.Random) -> None:
        name, sess = self.sessions.next()
        api = OPENAI if sess.tools else self._api(rng)
        body = request_body(api, request_messages(sess, 0, []), DISCONNECT_MAX_TOKENS, SAMPLED_TEMPERATURE, True,
                            sess.tools)  # fmt: skip
        self._send(http, DISCONNECT, name, api, body, cut_after=CUT_AFTER_EVENTS)

    def _bad(self, http: Any, rng: random.Random) -> None:
        with self._lock:
            name, api, payload = self.cfg.bad_inputs[self._bad_next % len(self.cfg.bad_inputs)]
            self._bad_next += 1
        self._send_bad(http, name, api, payload)

    def _send_bad(self, http: Any, name: str, api: str, payload: bytes | dict[str, Any]) -> None:
        if isinstance(payload, dict):
            payload = {"model": SERVED_MODEL, **payload}
        start = self.rec.now()
        out = exchange(http, "", api, payload, self.cfg.request_timeout)
        problem = error_format_problem(api, out.status, out.body)
        if out.status == 200 and out.body is None:
            problem = f"accepted: status 200 ({out.events} stream events)"
        self.rec.add(Record(BAD, name, api, isinstance(payload, dict) and bool(payload.get("stream")), start,
                            self.rec.now(), None, out.status, "bad-ok" if problem is None else "bad-wrong",
                            problem, out.replica))  # fmt: skip


# ---- the reference ---------------------------------------------------------------------------------------------
def references(url: str, cases: dict[str, list[dict[str, Any]]], timeout: float) -> dict[str, dict[str, Any]]:
    """Each greedy case's cold answer per API ("case/api" -> text and token count), from the reference server."""
    import httpx

    out: dict[str, dict[str, Any]] = {}
    with httpx.Client(base_url=url, timeout=timeout) as http:
        for case, messages in cases.items():
            for api in (OPENAI, ANTHROPIC):
                ex = exchange(http, "", api, request_body(api, messages, GREEDY_MAX_TOKENS, 0.0, False), timeout)
                if ex.error is not None:
                    raise RuntimeError(f"the reference server failed {case} ({api}): {ex.error}")
                out[f"{case}/{api}"] = {"text": ex.text, "output_tokens": ex.output_tokens,
                                        "prompt_tokens": ex.prompt_tokens}  # fmt: skip
    return out


def _wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float, log: Path) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the reference server exited: {_tail(log)}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the reference server was not up in {timeout:.0f} s: {_tail(log)}")
        time.sleep(0.1)


# ---- after the load ----------------------------------------------------------------------------------------------
def final_checks(fleet: SoakFleet, settle_timeout: float) -> dict[str, Any]:
    """Once the load has stopped: per replica, wait until idle, then its blocks in use (a block in use with no
    request running is leaked), its deep integrity check and its tiers' error counters; and the load the router
    still counts for each replica (what it dispatched and never released)."""
    import httpx

    out: dict[str, Any] = {"replicas": {}, "router_load": {}}
    for name, url in zip(fleet.names, fleet.replica_urls):
        entry: dict[str, Any] = {}
        deadline = time.monotonic() + settle_timeout
        health: dict[str, Any] = {}
        while time.monotonic() < deadline:  # idle, and (blocks of aborted requests are freed on the engine thread)
            with contextlib.suppress(httpx.HTTPError, ValueError):
                health = httpx.get(f"{url}/health", timeout=5).json()
                if health.get("requests") == 0 and health.get("blocks_in_use") == 0:
                    break
            time.sleep(0.25)
        entry["requests_running"] = health.get("requests")
        try:
            stats = httpx.get(f"{url}/v1/cache/stats", timeout=30).json()
            entry.update({k: stats.get(k) for k in ("num_blocks", "blocks_in_use", "blocks_cached", "blocks_pinned",
                                                    "evictions", "preemptions", "hit_tokens", "query_tokens",
                                                    "hit_tokens_by_tier")})  # fmt: skip
            entry["leaked_blocks"] = stats.get("blocks_in_use") if health.get("requests") == 0 else None
            tiers = stats.get("tiers") or {}
            entry["tiers"] = {t["tier"]: {k: t.get(k) for k in ("available", "entries", "hits", "misses", "stores",
                                                                "evictions", "errors")}
                              for t in tiers.get("tiers", [])}  # fmt: skip
            entry["dropped_writes"] = tiers.get("dropped_writes")
        except (httpx.HTTPError, ValueError) as err:
            entry["stats_error"] = f"{type(err).__name__}: {err}"
        try:
            integrity = httpx.get(f"{url}/v1/cache/integrity", params={"deep": "1"}, timeout=300).json()
            entry["integrity"] = integrity
        except (httpx.HTTPError, ValueError) as err:
            entry["integrity"] = {"ok": False, "problems": {"check": [f"{type(err).__name__}: {err}"]}}
        out["replicas"][name] = entry
    try:
        state = httpx.get(f"{fleet.router_url}/v1/fleet", timeout=10).json()
        out["router_load"] = {r["name"]: r.get("load_own") for r in state["replicas"]}
        out["router_states"] = {r["name"]: r["state"] for r in state["replicas"]}
    except (httpx.HTTPError, ValueError, KeyError) as err:
        out["router_load_error"] = f"{type(err).__name__}: {err}"
    out["router_requests"] = router_outcomes(fleet.router_url)
    return out


def router_outcomes(url: str) -> dict[str, float]:
    """The router's ``promptcache_router_requests_total`` and ``_retries_total`` samples, by their labels."""
    import httpx

    out: dict[str, float] = {}
    try:
        text = httpx.get(f"{url}/metrics", timeout=10).text
    except httpx.HTTPError:
        return out
    for line in text.splitlines():
        if line.startswith(("promptcache_router_requests_total{", "promptcache_router_retries_total{")):
            key, _, value = line.rpartition(" ")
            out[key.replace("promptcache_router_", "")] = float(value)
    return out


# ---- the analysis ----------------------------------------------------------------------------------------------
def windows(faults: Sequence[dict[str, Any]], recovery_s: float) -> list[tuple[float, float, str]]:
    """(start, end, phase) of every fault window, then of every recovery after one."""
    done = [f for f in faults if "start_s" in f and "end_s" in f]
    out = [(f["start_s"], f["end_s"], f["phase"]) for f in done]
    return out + [(f["end_s"], f["end_s"] + recovery_s, RECOVERY) for f in done]


def phase_at(t: float, spans: Sequence[tuple[float, float, str]]) -> str:
    return next((phase for a, b, phase in spans if a <= t <= b), STEADY)


def cut_by_kill(r: Record, faults: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The replica fault that cut this failed stream: it was served by the victim, had started before the kill
    and ended (with the router's error event) within ``KILL_CUT_GRACE_S`` after it."""
    if not r.stream or r.replica is None:
        return None
    for f in faults:
        if f["kind"] == "replica" and r.replica == f.get("replica") and "start_s" in f:
            kill = f["start_s"]
            if r.start_s <= kill and kill <= r.end_s <= kill + KILL_CUT_GRACE_S:
                return f
    return None


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


def _detail(r: Record) -> dict[str, Any]:
    return {"kind": r.kind, "label": r.label, "api": r.api, "stream": r.stream, "start_s": round(r.start_s, 2),
            "end_s": round(r.end_s, 2), "status": r.status, "replica": r.replica, "phase": r.phase,
            "error": r.error}  # fmt: skip


def analyze(records: list[Record], faults: list[dict[str, Any]], refs: dict[str, dict[str, Any]],
            args: argparse.Namespace, load_s: float) -> dict[str, Any]:  # fmt: skip
    """Every figure of the report from the records, the faults and the references."""
    spans = windows(faults, args.recovery_seconds)
    for r in records:
        r.phase = phase_at(r.start_s, spans)
        if r.outcome == "failed" and r.kind in (WORKLOAD, GREEDY, DISCONNECT) and cut_by_kill(r, faults):
            r.outcome = "cut-by-kill"
    valid = [r for r in records if r.kind != BAD]
    failed = [r for r in valid if r.outcome == "failed"]
    cut = [r for r in valid if r.outcome == "cut-by-kill"]
    bad = [r for r in records if r.kind == BAD]
    disconnects = [r for r in records if r.kind == DISCONNECT]
    by_kind = Counter(r.kind for r in records)
    by_label: dict[str, Counter[str]] = defaultdict(Counter)
    for r in records:
        by_label[r.kind][r.label] += 1

    # Greedy: every answer equal to the cold reference of its case and API.
    greedy = [r for r in records if r.kind == GREEDY and r.outcome == "ok"]
    mismatches = []
    for r in greedy:
        ref = refs.get(f"{r.label}/{r.api}")
        if ref is None or r.text == ref["text"]:
            continue
        at = next((i for i, (a, b) in enumerate(zip(r.text or "", ref["text"])) if a != b),
                  min(len(r.text or ""), len(ref["text"])))  # fmt: skip
        mismatches.append({**_detail(r), "cached_tokens": r.cached_tokens, "cached_by_tier": r.cached_by_tier,
                           "output_tokens": r.output_tokens, "reference_output_tokens": ref["output_tokens"],
                           "first_difference_at_char": at, "got": r.text, "expected": ref["text"]})  # fmt: skip

    # TTFT per phase: the streamed valid requests that succeeded (time to the first event).
    ttft: dict[str, Any] = {}
    for phase in PHASES:
        xs = [r.ttft_s for r in valid if r.phase == phase and r.outcome == "ok" and r.ttft_s is not None
              and r.kind != DISCONNECT]  # fmt: skip
        ttft[phase] = {"streams": len(xs), "p50_ms": _ms(percentile(xs, 50)), "p99_ms": _ms(percentile(xs, 99)),
                       "requests": sum(1 for r in valid if r.phase == phase)}  # fmt: skip

    # Each fault survived: the fleet was whole again in time, and nothing started in its window or recovery failed.
    for f in faults:
        if "start_s" not in f:
            continue
        lo, hi = f["start_s"], f["end_s"] + args.recovery_seconds
        in_window = [r for r in failed if lo <= r.start_s <= hi]
        f["failed_requests_in_window"] = len(in_window)
        f["cut_by_kill"] = sum(1 for r in cut if cut_by_kill(r, [f]) is not None)
        f["requests_in_window"] = sum(1 for r in valid if lo <= r.start_s <= hi)
        f["survived"] = f.get("recovered_s") is not None and not in_window and "error" not in f
        for key in ("start_s", "end_s"):
            f[key] = round(f[key], 2)

    failure_reasons = Counter(_reason(r.error) for r in failed)
    by_case: dict[str, dict[str, int]] = defaultdict(dict)  # "api/case" -> status -> requests
    for r in bad:
        key = f"{r.api}/{r.label}"
        by_case[key][str(r.status)] = by_case[key].get(str(r.status), 0) + 1
    return {
        "load_s": round(load_s, 1),
        "minutes": round(load_s / 60, 2),
        "requests": {
            "total": len(records),
            "by_kind": dict(by_kind),
            "by_label": {k: dict(v) for k, v in by_label.items()},
            "by_api": dict(Counter(r.api for r in records)),
            "streamed": sum(1 for r in records if r.stream),
            "by_phase": dict(Counter(r.phase for r in records)),
            "per_second": round(len(records) / load_s, 2) if load_s else None,
            "by_replica": dict(Counter(r.replica or "-" for r in valid)),
        },
        "failures": {
            "valid_requests": len(valid),
            "failed": len(failed),
            "failed_by_reason": dict(failure_reasons.most_common()),
            "failed_by_phase": dict(Counter(r.phase for r in failed)),
            "details": [_detail(r) for r in failed[:200]],
            "cut_by_kill": len(cut),
            "cut_by_kill_details": [_detail(r) for r in cut[:50]],
        },
        "bad_input": {
            "sent": len(bad),
            "right_format": sum(1 for r in bad if r.outcome == "bad-ok"),
            "wrong": sum(1 for r in bad if r.outcome == "bad-wrong"),
            "by_case": by_case,
            "details": [_detail(r) for r in bad if r.outcome == "bad-wrong"][:100],
        },
        "disconnects": {
            "sent": len(disconnects),
            "ok": sum(1 for r in disconnects if r.outcome == "ok"),
            "failed": sum(1 for r in disconnects if r.outcome == "failed"),
            "cut_by_kill": sum(1 for r in disconnects if r.outcome == "cut-by-kill"),
        },
        "greedy": {
            "checks": len(greedy),
            "equal": len(greedy) - len(mismatches),
            "mismatches": len(mismatches),
            "by_case": dict(Counter(f"{r.label}/{r.api}" for r in greedy)),
            "mismatch_details": mismatches[:50],
            "cached_checks": sum(1 for r in greedy if r.cached_tokens),
            "by_tier": dict(sum((Counter(r.cached_by_tier or {}) for r in greedy), Counter())),
        },
        "ttft": ttft,
    }


def _reason(error: str | None) -> str:
    """An error's kind, for counting: its text up to the first detail."""
    if not error:
        return "-"
    head = error.split(":")[0] if not error.startswith("HTTP") else error[:8]
    return head[:80]


def rss_summary(rows: list[list[Any]], replicas: Sequence[str]) -> dict[str, Any]:
    """Per process name: RSS at the first and the last sample, the largest, and the growth; a restarted replica is
    several processes, so also each process's own figures, counted from its first sample serving (answering
    /health: before that it is still loading), and the growth of the one that served longest."""
    out: dict[str, Any] = {}
    by_name: dict[str, list[list[Any]]] = defaultdict(list)
    for row in rows:
        if row[3] is not None and (row[1] not in replicas or row[4] is not None):
            by_name[row[1]].append(row)
    for name, xs in by_name.items():
        procs = {}
        for pid in dict.fromkeys(x[2] for x in xs):
            ys = [x for x in xs if x[2] == pid]
            procs[str(pid)] = {"start_mb": ys[0][3], "end_mb": ys[-1][3], "max_mb": max(y[3] for y in ys),
                               "growth_mb": round(ys[-1][3] - ys[0][3], 1), "seconds": round(ys[-1][0] - ys[0][0], 1),
                               "first_s": ys[0][0]}  # fmt: skip
        longest = max(procs.values(), key=lambda p: p["seconds"])
        out[name] = {"start_mb": xs[0][3], "end_mb": xs[-1][3], "max_mb": max(x[3] for x in xs),
                     "growth_mb": round(xs[-1][3] - xs[0][3], 1), "processes": procs,
                     "longest_process_growth_mb": longest["growth_mb"],
                     "longest_process_seconds": longest["seconds"]}  # fmt: skip
    return out


def invariants(report: dict[str, Any], requested: Sequence[str]) -> dict[str, dict[str, Any]]:
    """What must hold, each with its value and whether it did."""
    f, b, g = report["failures"], report["bad_input"], report["greedy"]
    final = report.get("final", {}).get("replicas", {})
    leaked = {n: e.get("leaked_blocks") for n, e in final.items()}
    integrity = {n: (e.get("integrity") or {}).get("ok") for n, e in final.items()}
    injected = Counter(x["kind"] for x in report["faults"] if "start_s" in x and "error" not in x)
    router_load = report.get("final", {}).get("router_load", {})
    load_left = {n: {k: v for k, v in (x or {}).items() if k in ("prefill_tokens", "decodes") and v}
                 for n, x in router_load.items()}  # fmt: skip

    survived = [x.get("survived") for x in report["faults"]]

    def check(ok: bool, value: Any) -> dict[str, Any]:
        return {"ok": bool(ok), "value": value}

    return {
        "no_failed_valid_requests": check(f["failed"] == 0, f["failed"]),
        "greedy_all_equal": check(g["mismatches"] == 0 and g["checks"] > 0, f"{g['equal']}/{g['checks']}"),
        "no_leaked_blocks": check(bool(leaked) and all(v == 0 for v in leaked.values()), leaked),
        "integrity_ok": check(bool(integrity) and all(integrity.values()), integrity),
        "bad_input_all_4xx_in_format": check(b["wrong"] == 0 and b["sent"] > 0, f"{b['right_format']}/{b['sent']}"),
        "every_fault_injected": check(all(injected[k] >= 1 for k in requested), dict(injected)),
        "every_fault_survived": check(all(survived), survived),
        "router_load_released": check(bool(router_load) and not any(load_left.values()), load_left),
    }


# ---- output ----------------------------------------------------------------------------------------------------
def _f(value: Any, spec: str = "{:.0f}") -> str:
    return "-" if value is None else spec.format(value)


def markdown(report: dict[str, Any]) -> str:
    """The summary: invariants, requests, faults, TTFT per phase, RSS, and every finding in a line each."""
    lines = [f"## Soak: {report.get('minutes', 0):.1f} minutes, {report['config']['clients']} clients"
             f"{'' if report['complete'] else ' (INCOMPLETE)'}", "", report["setup"], ""]  # fmt: skip
    lines += ["| invariant | ok | value |", "|---|---|---|"]
    for name, inv in report.get("invariants", {}).items():
        lines.append(f"| {name} | {'yes' if inv['ok'] else '**NO**'} | {json.dumps(inv['value'])[:120]} |")
    req = report.get("requests", {})
    if req:
        fl, bad, disc, gr = report["failures"], report["bad_input"], report["disconnects"], report["greedy"]
        lines += ["", f"Requests: {req['total']} ({_f(req['per_second'], '{:.1f}')}/s): "
                  + ", ".join(f"{k} {v}" for k, v in req["by_kind"].items())
                  + f"; by API {req['by_api']}; streamed {req['streamed']}; by replica {req['by_replica']}.",
                  f"Valid requests failed: **{fl['failed']}** of {fl['valid_requests']} "
                  f"({fl['failed_by_reason'] or 'none'}); streams cut by a killed replica: {fl['cut_by_kill']}.",
                  f"Bad input answered 4xx in the API's format: {bad['right_format']}/{bad['sent']}; "
                  f"disconnects {disc['ok']}/{disc['sent']} ok.",
                  f"Greedy checks equal to the cold reference: {gr['equal']}/{gr['checks']} "
                  f"({gr['cached_checks']} with cache hits, tokens by tier {gr['by_tier']})."]  # fmt: skip
        lines += ["", "| phase | requests | streams | TTFT p50 ms | TTFT p99 ms |", "|---|---|---|---|---|"]
        for phase, t in report["ttft"].items():
            lines.append(f"| {phase} | {t['requests']} | {t['streams']} | {_f(t['p50_ms'])} | {_f(t['p99_ms'])} |")
    lines += ["", "| fault | target | window s | recovered after s | failed / requests in window | cut by kill | "
              "survived | notes |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for x in report.get("faults", []):
        notes = []
        if x["kind"] == "disk":
            notes.append(f"filler {x.get('filler_bytes', 0) >> 20} MiB, ENOSPC {x.get('enospc')}, tier errors "
                         f"{x.get('disk_tier_errors_during')}")  # fmt: skip
        if x["kind"] == "replica":
            notes.append(f"healthy after {x.get('healthy_s')} s, rejoined {x.get('rejoined')}")
        if x.get("error") or x.get("not_recovered"):
            notes.append(str(x.get("error") or x.get("not_recovered")))
        lines.append(f"| {x['kind']} | {x.get('replica', 'redis' if x['kind'] == 'redis' else '-')} | "
                     f"{_f(x.get('start_s'), '{:.1f}')}-{_f(x.get('end_s'), '{:.1f}')} | "
                     f"{_f(x.get('recovered_s'), '{:.1f}')} | {x.get('failed_requests_in_window', '-')} / "
                     f"{x.get('requests_in_window', '-')} | {x.get('cut_by_kill', '-')} | "
                     f"{'yes' if x.get('survived') else '**no**'} | {'; '.join(notes)} |")  # fmt: skip
    if report.get("rss"):
        lines += ["", "| process | RSS start MB | end MB | max MB | growth MB | longest-lived process growth MB | "
                  "processes |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for name, x in report["rss"].items():
            last = f"{x['longest_process_growth_mb']} (over {x['longest_process_seconds']} s)"
            lines.append(f"| {name} | {x['start_mb']} | {x['end_mb']} | {x['max_mb']} | {x['growth_mb']} | {last} | "
                         f"{len(x['processes'])} |")  # fmt: skip
    rotation = report.get("rotation")
    if rotation:
        changes = rotation["changes"]
        shown = "; ".join(f"{c['t_s']:.1f} s {c['replica']} {c['state']} ({c['reason']})" for c in changes[:8])
        lines += ["", f"Router rotation changes: {len(changes)}{': ' + shown if shown else ''}"
                  f"{' ...' if len(changes) > 8 else ''}."]  # fmt: skip
    final = report.get("final", {}).get("replicas", {})
    if final:
        lines.append("")
    for n, e in final.items():
        errors = {t: v.get("errors") for t, v in (e.get("tiers") or {}).items()}
        lines.append(
            f"{n}: leaked blocks {e.get('leaked_blocks')}, integrity {(e.get('integrity') or {}).get('ok')}, "
            f"evictions {e.get('evictions')}, preemptions {e.get('preemptions')}, tier errors {errors}"
        )
    for detail in report.get("failures", {}).get("details", [])[:10]:
        lines.append(f"- failed: {json.dumps(detail)[:300]}")
    for detail in report.get("greedy", {}).get("mismatch_details", [])[:5]:
        lines.append(f"- greedy mismatch: {json.dumps(detail)[:400]}")
    for detail in report.get("bad_input", {}).get("details", [])[:10]:
        lines.append(f"- bad input answered wrongly: {json.dumps(detail)[:300]}")
    lines += [f"- note: {n}" for n in report.get("notes", [])]
    return "\n".join(lines)


FAULT_COLORS = {"redis-down": "tab:red", "disk-full": "tab:orange", "replica-killed": "tab:purple"}


def plot(report: dict[str, Any], records: list[Record], samples: list[list[Any]], path: Path) -> None:
    """TTFT over time (each streamed request, failures marked at their end), RSS and blocks in use over time; the
    fault windows shaded on every panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(12, 10), sharex=True)
    ax = axes[0]
    colors = {WORKLOAD: "tab:blue", GREEDY: "tab:green", DISCONNECT: "tab:gray"}
    for kind, color in colors.items():
        xs = [(r.start_s + r.ttft_s, r.ttft_s * 1000) for r in records
              if r.kind == kind and r.ttft_s is not None and r.outcome == "ok"]  # fmt: skip
        if xs:
            ax.scatter(*zip(*xs), s=4, alpha=0.5, color=color, label=f"{kind} ({len(xs)})")
    for outcome, marker, color in (("failed", "x", "red"), ("cut-by-kill", "+", "black")):
        xs = [r.end_s for r in records if r.outcome == outcome]
        if xs:
            top = max([r.ttft_s * 1000 for r in records if r.ttft_s is not None] or [1.0])
            ax.scatter(xs, [top] * len(xs), marker=marker, color=color, s=30, label=f"{outcome} ({len(xs)})")
    ax.set_yscale("log")
    ax.set_ylabel("TTFT ms (streams)")
    ax.legend(loc="upper left", fontsize=7, ncol=3)
    for name, i, label in (("rss_mb", 3, "RSS MB"), ("blocks_in_use", 4, "KV blocks in use")):
        ax = axes[1 if name == "rss_mb" else 2]
        series: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for row in samples:  # a missing sample (the process down) is a gap in its line, not a straight bridge
            series[row[1]].append((row[0], float("nan") if row[i] is None else row[i]))
        for proc, xs in sorted(series.items()):
            if not all(math.isnan(y) for _, y in xs):  # a process this panel has figures for
                ax.plot(*zip(*xs), label=proc, lw=1)
        ax.set_ylabel(label)
        ax.legend(loc="upper left", fontsize=7)
    for f in report.get("faults", []):
        if "start_s" in f:
            for ax in axes:
                ax.axvspan(f["start_s"], max(f["end_s"], f["start_s"] + 0.2), color=FAULT_COLORS[f["phase"]],
                           alpha=0.15, lw=0)  # fmt: skip
            axes[0].text(f["start_s"], 1.01, f["phase"], transform=axes[0].get_xaxis_transform(), fontsize=7,
                         color=FAULT_COLORS[f["phase"]])  # fmt: skip
    axes[2].set_xlabel("seconds since the load began")
    fig.suptitle(f"promptcache soak: {report['config']['clients']} clients, {report.get('minutes', 0):.1f} min")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- the run ---------------------------------------------------------------------------------------------------
def run(args: argparse.Namespace, argv: Sequence[str]) -> tuple[dict[str, Any], list[Record], list[list[Any]]]:
    """The whole soak; the report (JSON-ready), the records and the samples."""
    from promptcache.api.prompts import PromptRenderer
    from promptcache.model.source import resolve_model as resolve_source

    t_begin = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="pc-soak-"))
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": shlex.join(["python", "-m", "promptcache.bench.soak", *argv]),
        "complete": False,
        "config": {k: v for k, v in vars(args).items() if k not in ("out",)},
        "machine": machine_info(),
        "versions": versions(),
        "load_average_at_start": list(os.getloadavg()),
        "faults": [],
        "notes": [],
    }
    recorder = Recorder()
    samples: list[list[Any]] = []
    stop = threading.Event()
    watchdog = _Watchdog(args.max_minutes * 60)
    fleet: SoakFleet | None = None
    disk = DiskMount(tmp / "disk-r0", args.tmpfs_mb)
    chaos: Chaos | None = None
    sampler: Sampler | None = None
    load: Load | None = None
    refs: dict[str, dict[str, Any]] = {}
    load_s = 0.0
    try:
        model = resolve_model(args.model, tmp)
        source = resolve_source(str(model), quiet=True)
        config = source.config()
        kv_gb = (args.kv_tokens + 8) * config.kv_bytes_per_token * 4 / (1 << 30)  # float32; a few tokens over
        disk_gb = 0.75 * args.tmpfs_mb / 1024
        disk.mount()
        if args.skip_bad:
            report["notes"].append(f"bad inputs left out (--skip-bad): {', '.join(args.skip_bad)}")
        if disk.note:
            report["notes"].append(disk.note)
            print(f"soak: {disk.note}", file=sys.stderr)
        report["model"] = {"name": args.model, "path": str(model), "kv_bytes_per_token": config.kv_bytes_per_token * 4}
        report["disk"] = {"tmpfs": disk.mounted, "tmpfs_mb": args.tmpfs_mb, "replica": f"r{TMPFS_REPLICA}",
                          "disk_cache_gb": disk_gb}  # fmt: skip
        report["setup"] = (
            f"redis-server, {REPLICAS} `promptcache serve` replicas (--device cpu --dtype float32, OMP_NUM_THREADS=1, "
            f"device pool {args.kv_tokens} tokens, disk tier {disk_gb * 1024:.0f} MB "
            f"({'r0 on a ' + str(args.tmpfs_mb) + ' MB tmpfs' if disk.mounted else 'plain directories: NO tmpfs'}),"
            f" Redis tier, --tier-load-policy {args.tier_load_policy}) behind `promptcache router --policy cache`; "
            f"{args.clients} client threads (httpx) through the router; model {args.model}"
        )
        spec = FleetSpec(model, REPLICAS, "cache", kv_gb, tier_load_policy=args.tier_load_policy)
        fleet = SoakFleet(spec, tmp / "fleet", [disk.path, tmp / "disk-r1"], disk_gb, args.redis_ttl,
                          args.redis_maxmemory_mb or None)  # fmt: skip
        watchdog.fleet = fleet
        # The cold reference starts beside the fleet (its start-up overlaps the fleet's) and is gone before the load.
        ref_port = _free_port()
        ref_url = f"http://127.0.0.1:{ref_port}"
        ref_proc = fleet.start_reference(ref_port)
        print(f"soak: starting redis, {REPLICAS} replicas, the router and the reference server", file=sys.stderr)
        t = time.perf_counter()
        fleet.start()
        report["fleet_start_s"] = round(time.perf_counter() - t, 1)
        cases = greedy_cases()
        _wait_http(ref_url, ref_proc, spec.start_timeout, fleet.workdir / "reference.log")
        refs = references(ref_url, cases, args.request_timeout)
        _stop(ref_proc, 10)
        report["greedy_reference"] = {"how": "a fresh `promptcache serve` (no tiers, --no-prefix-caching), the same "
                                      "model, before the load", "answers": refs}  # fmt: skip
        fleet.warm_up(PromptRenderer(source.tokenizer()), 1024)
        if watchdog.fired:
            raise Aborted("the watchdog fired during start-up")

        seconds = args.minutes * 60
        plan = fault_plan(args.faults, seconds, args.fault_every)
        report["fault_plan"] = [{"at_s": round(a, 1), "kind": k} for a, k in plan]
        cfg = LoadConfig(fleet.router_url, args.clients, args.max_requests, args.request_timeout, args.greedy_share,
                         args.disconnect_share, args.bad_share, args.anthropic_share, args.stream_share, args.seed,
                         cases, bad_inputs(args.skip_bad))  # fmt: skip
        sessions = SessionSource(list(SOAK_WORKLOADS), args.quick, args.seed)
        print(f"soak: {args.clients} clients for {args.minutes:g} min; faults at "
              f"{', '.join(f'{k} {a:.0f}s' for a, k in plan) or 'none'}", file=sys.stderr)  # fmt: skip
        recorder.t0 = time.perf_counter()
        load = Load(cfg, sessions, recorder, stop)
        chaos = Chaos(fleet, disk, recorder, plan, args, stop=threading.Event())
        sampler = Sampler(fleet, recorder, args.sample_seconds, stop)
        with StateWatch(fleet.router_url) as watch:
            sampler.start()
            load.start()
            chaos.start()
            # The load runs --minutes, and on while a planned fault is still under way (at most --max-overrun).
            while not watchdog.fired:
                now = recorder.now()
                if now >= seconds and (not chaos.is_alive() or now >= seconds + args.max_overrun):
                    break
                if args.max_requests is not None and load.sent >= args.max_requests and not chaos.is_alive():
                    break
                time.sleep(0.2)
            stop.set()
            chaos.stop.set()  # no new fault; the one under way is restored
            load_s = recorder.now()
            print(f"soak: load stopped after {load_s:.0f} s; waiting for the requests in flight", file=sys.stderr)
            hung = load.join(args.request_timeout + 30)
            if hung:
                report["notes"].append(f"{len(hung)} clients still running {args.request_timeout + 30:.0f} s after "
                                       f"the load stopped (a request past its timeout): {hung[:8]}")  # fmt: skip
            chaos.join(args.recovery_timeout + 180)
            if chaos.is_alive():
                report["notes"].append("the chaos thread did not finish in time")
            if chaos.error:
                report["notes"].append(f"the chaos thread failed: {chaos.error}")
        report["rotation"] = watch.summary()
        if watchdog.fired:
            raise Aborted(f"the watchdog ({args.max_minutes:g} min) fired during the load")
        report["faults"] = chaos.faults
        missed = len(plan) - len([f for f in chaos.faults if "start_s" in f])
        if missed:
            report["notes"].append(f"{missed} planned faults were not injected (the run ended first)")
        why = fleet_whole(fleet)
        if why is not None:  # the last fault may have ended with the load: give the fleet its recovery time
            deadline = time.monotonic() + args.recovery_timeout
            while why is not None and time.monotonic() < deadline:
                time.sleep(0.5)
                why = fleet_whole(fleet)
            if why is not None:
                report["notes"].append(f"the fleet was not whole after the load: {why}")
        print("soak: final checks (leaked blocks, integrity)", file=sys.stderr)
        report["final"] = final_checks(fleet, args.settle_timeout)
        if watchdog.fired:
            raise Aborted(f"the watchdog ({args.max_minutes:g} min) fired during the final checks")
        report["complete"] = True
    except (Aborted, KeyboardInterrupt, SystemExit) as err:  # SystemExit: SIGTERM (_terminate); the report is written
        report["notes"].append(f"stopped early: {type(err).__name__}: {err}")
    except Exception as err:  # written down with what ran before it, rather than losing the whole run
        traceback.print_exc()
        report["notes"].append(f"failed: {type(err).__name__}: {err}")
    finally:
        stop.set()
        if chaos is not None:
            chaos.stop.set()
            chaos.join(30)
        if sampler is not None:
            sampler.join(15)
            samples = sampler.rows
            report["sampler_errors"] = dict(sampler.errors)
        watchdog.cancel()
        if fleet is not None:
            if not report["complete"]:
                for name in [*fleet.names, "router"]:
                    print(f"--- {name} log ---\n{_tail(fleet.workdir / f'{name}.log')}", file=sys.stderr)
            fleet.close()
        disk.unmount()
        if report["complete"] and not args.keep_logs:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"soak: the processes' logs are in {tmp}", file=sys.stderr)
    if chaos is not None and not report["faults"]:
        report["faults"] = chaos.faults
    records = recorder.snapshot()
    report.update(analyze(records, report["faults"], refs, args, load_s or recorder.now()))
    report["rss"] = rss_summary(samples, [f"r{i}" for i in range(REPLICAS)])
    report["invariants"] = invariants(report, args.faults)
    report["load_average_at_end"] = list(os.getloadavg())
    report["wall_s"] = round(time.perf_counter() - t_begin, 1)
    report["record_columns"] = list(RECORD_COLUMNS)
    report["records"] = [r.row() for r in records]
    report["sample_columns"] = list(SAMPLE_COLUMNS)
    report["samples"] = samples
    return report, records, samples


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m promptcache.bench.soak", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--minutes", type=float, required=True, help="how long the load runs")
    parser.add_argument("--out", default="docs/soak.json", help="the JSON file to write (the PNG goes next to it)")
    parser.add_argument("--model", default="embedded", help="embedded (default), smollm2, or a model path")
    parser.add_argument("--clients", type=int, default=64, help="concurrent clients")
    parser.add_argument("--max-requests", type=int, default=None, help="stop the load after this many requests")
    parser.add_argument("--faults", default=",".join(FAULTS), help="comma-separated faults, in order; 'none': none")
    parser.add_argument("--fault-seconds", type=float, default=15.0,
                        help="how long Redis stays down and the disk stays full")  # fmt: skip
    parser.add_argument(
        "--fault-every",
        type=float,
        default=120.0,
        help="at most one fault every this many seconds (the faults cycle while the run allows)",
    )
    parser.add_argument(
        "--recovery-seconds",
        type=float,
        default=20.0,
        help="the 'recovery' phase after each fault, in the TTFT figures and the survival check",
    )
    parser.add_argument("--recovery-timeout", type=float, default=90.0,
                        help="how long the fleet may take to be whole again after a fault")  # fmt: skip
    parser.add_argument("--max-overrun", type=float, default=180.0,
                        help="seconds the load may run past --minutes while a fault is under way")  # fmt: skip
    parser.add_argument("--request-timeout", type=float, default=120.0, help="seconds per request")
    parser.add_argument("--greedy-share", type=float, default=0.10, help="share of greedy, checked requests")
    parser.add_argument("--disconnect-share", type=float, default=0.10, help="share of streams cut by the client")
    parser.add_argument("--bad-share", type=float, default=0.05, help="share of bad-input requests")
    parser.add_argument("--anthropic-share", type=float, default=0.25, help="share sent to /v1/messages")
    parser.add_argument("--stream-share", type=float, default=0.5, help="share of streamed requests")
    parser.add_argument(
        "--skip-bad",
        default="",
        metavar="NAME,...",
        help="bad inputs to leave out, by name (both APIs) or api/name: to look past a known finding",
    )
    parser.add_argument("--quick", action="store_true", help="the workloads' quick sizes (shorter prompts)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kv-tokens", type=int, default=32768, help="each replica's device pool, in tokens")
    parser.add_argument("--tmpfs-mb", type=int, default=64, help="the tmpfs of r0's disk tier")
    parser.add_argument("--redis-ttl", type=float, default=600.0,
                        help="the replicas' --redis-ttl (bounds Redis's memory over a long run)")  # fmt: skip
    parser.add_argument("--redis-maxmemory-mb", type=int, default=256,
                        help="redis-server's maxmemory, evicting any key least recently used first, as a Redis tier "
                             "should be run (0: unbounded)")  # fmt: skip
    parser.add_argument("--tier-load-policy", default="always", choices=["always", "auto"])
    parser.add_argument("--sample-seconds", type=float, default=2.0, help="RSS / blocks sampling interval")
    parser.add_argument(
        "--settle-timeout",
        type=float,
        default=30.0,
        help="after the load, how long each replica may take to be idle with no block in use",
    )
    parser.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="the watchdog: every process is stopped after this long (default: --minutes + 15)",
    )
    parser.add_argument("--keep-logs", action="store_true", help="keep the processes' logs even when all went well")
    args = parser.parse_args(list(argv))
    args.faults = [] if args.faults in ("", "none") else [f for f in args.faults.split(",") if f]
    args.skip_bad = [b for b in args.skip_bad.split(",") if b]
    known = {n for n, _, _ in BAD_INPUTS} | {f"{a}/{n}" for n, a, _ in BAD_INPUTS}
    if any(b not in known for b in args.skip_bad):
        parser.error(f"--skip-bad: unknown bad inputs {sorted(set(args.skip_bad) - known)}")
    if any(f not in FAULTS for f in args.faults):
        parser.error(f"--faults: choose from {', '.join(FAULTS)} (or none)")
    shares = (args.greedy_share, args.disconnect_share, args.bad_share)
    if any(not 0 <= s <= 1 for s in (*shares, args.anthropic_share, args.stream_share)) or sum(shares) > 1:
        parser.error("the shares are between 0 and 1, and greedy + disconnect + bad is at most 1")
    if args.minutes <= 0 or args.clients < 1:
        parser.error("--minutes must be > 0 and --clients >= 1")
    args.max_minutes = args.max_minutes or args.minutes + 15 + args.max_overrun / 60
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run, write the JSON and the PNG, print the summary; 0 when complete with every invariant held, else 1."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    report, records, samples = run(args, argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(dumps(report))
    png = out.with_suffix(".png")
    try:
        plot(report, records, samples, png)
    except Exception as err:  # the JSON is what matters; a plot that fails says why
        print(f"soak: the plot failed: {type(err).__name__}: {err}", file=sys.stderr)
    print(markdown(report))
    print(f"wrote {out} and {png} in {report['wall_s']:.0f} s", file=sys.stderr)
    return 0 if report["complete"] and all(v["ok"] for v in report["invariants"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
