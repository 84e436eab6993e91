"""Timing audit: can one tenant tell, from its own requests' timing, that another tenant has cached a prompt?

    python -m promptcache.bench.timing_audit --out docs/timing-audit.json [--targets device,host,disk,redis,router]
        [--samples 60] [--warmup 3] [--prompt-tokens 257] [--seed 0] [--mode process|thread] [--model PATH]

The check against the cross-tenant prompt-cache timing attack of Gu et al. 2025 ("Auditing Prompt Caching in
Language Model APIs"): a *probe* tenant sends a prompt that a *victim* tenant has just sent and times the answer.
A cache shared across tenants answers it faster (its prefix is read, not computed), and so tells the probe what the
victim asked. promptcache roots every block address in the tenant's namespace, so it must not; this module measures
that it does not, in every place a prefix can be served from:

- ``device``: one server, a device pool that holds everything the audit sends, no lower tier;
- ``host``: one server with only a host tier and a device pool of exactly one request: each request evicts every
  block cached before it into host memory (the device pool's victim cache);
- ``disk``: one server with only a disk tier; once the tier writer has stored every block, ``POST /v1/cache/reset``
  (admin, device pool only: the tiers keep their entries) empties the device pool;
- ``redis``: the same with only a Redis tier (a real redis-server);
- ``router``: two replicas (Redis tier, KV events) sharing one redis-server behind ``promptcache router``, nothing
  reset: the victim's prefix is in the device pool of the replica that served it, and in Redis, which both read.

Every server runs ``--tier-load-policy always`` and a read deadline of 30 s, so that an own hit is read from its
tier and never recomputed. Every request is real HTTP on loopback, ``/v1/completions`` with a text prompt,
``max_tokens=1``, greedy, timed by the client from sending the request to having read the whole answer (one
kept-alive connection per tenant). Sample i:

1. the victim sends the secret prompt of sample i + 1 (so in the host target, sample i's timed requests push it out
   of the one-request pool, as this request pushes out what came before it);
2. the tier writers are waited for, the disk and Redis targets' device pools reset, and ``/v1/cache/explain``
   confirms that the victim's secret V of sample i and the probe's own prompt O are both held in the target's place
   and nowhere above it, and that the probe's explain of V finds nothing;
3. three timed requests by the probe, in an order balanced over the run (each of the six orders equally often, in
   a shuffled sequence), each once no server that computed since has a tier write queued or in progress (a
   writer at work would slow the next request):
   - ``victim``: V, which the victim cached (the probe's request then caches V in the probe's namespace: every
     sample needs a fresh V);
   - ``cold``: a prompt nobody has sent, of the same token length (the control);
   - ``own``: O, the probe's own ``cold`` prompt of the previous sample, now in the target's place: the probe's own
     hit, which shows that the probe is sensitive enough to see a hit.

Prompts are words that are single tokens of the model's tokenizer, drawn at random, so every prompt has exactly
``--prompt-tokens`` tokens (checked against the tokenizer and against ``usage.prompt_tokens``) and shares no block
with any other. ``--warmup`` whole samples are run and dropped first.

Figures per target: samples per kind, the median milliseconds of each kind, two-sample Kolmogorov-Smirnov tests
(``scipy.stats.ks_2samp``, two-sided) of victim vs cold (must give p > 0.01: no leak) and own vs cold (must give
p < 0.01: hits are detectable), and the counters: the probe's answers for V must report no cached token
(``usage.prompt_tokens_details.cached_tokens``, ``usage.cached_tokens_by_tier``, the replica's
``x-promptcache-cached-tokens``, the router's ``x-promptcache-predicted-cached-tokens``), cost exactly what the
cold prompt costs, and every own hit must be read from the target's tier in full (``cached_tokens_by_tier``). A leak
through the counters is worse than one through timing: it needs no statistics.

A KS test at 0.01 calls one in a hundred leak-free batches a leak. So that a chance result does not fail a run of
five targets one time in twenty, a target whose victim vs cold p-value is <= 0.01 (while its counters are clean) is
measured once more with fresh samples, and passes only if the second p-value is above 0.01: a leak stays below it
(the own hits, a leak of the full size, give p < 1e-8 at 30 samples), chance twice in a row is 1 in 10,000. Every
batch is reported.

``--mode process`` (default) runs real ``promptcache serve`` / ``promptcache router`` processes (one intra-op thread
each); ``--mode thread`` runs the same apps under uvicorn in threads of this process (what the tests do, as
tests/conftest.py's ``LiveServer``). Both use a redis-server of their own unless given ``--redis-url``. Every process
it starts is stopped on exit.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
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
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from promptcache.bench.fleet_bench import _die_with_parent, _free_port, _tail, _terminate
from promptcache.bench.runner import percentile

TARGETS = ("device", "host", "disk", "redis", "router")
KINDS = ("victim", "cold", "own")
ALPHA = 0.01
SERVED_MODEL = "timing-audit"
BLOCK_SIZE = 16
DEFAULT_PROMPT_TOKENS = 16 * BLOCK_SIZE + 1  # 16 full blocks and the token that is always computed
# API keys -> tenants. "twin" is a second key of the victim's tenant: a probe that uses it shares the victim's cache,
# the leak the audit must find (the tests' control). The filler tenant's requests push blocks out of a small pool.
VICTIM_KEY, PROBE_KEY, TWIN_KEY = "key-victim", "key-probe", "key-twin"
FILLER_KEY, ADMIN_KEY = "key-filler", "key-admin"
KEYS: dict[str, Any] = {
    VICTIM_KEY: "victim",
    PROBE_KEY: "probe",
    TWIN_KEY: "victim",
    FILLER_KEY: "filler",
    ADMIN_KEY: {"tenant": "ops", "admin": True},
}
PREDICTED_HEADER = "x-promptcache-predicted-cached-tokens"  # the router's prediction
REPORTED_HEADER = "x-promptcache-cached-tokens"  # the replica's own count
REPLICA_HEADER = "x-promptcache-replica"
MAX_FILLERS = 2  # host: filler requests per sample at most, should a prefix still be in the device pool
SETTLE_TIMEOUT_S = 30.0
# Checks of a batch that say the probe learnt nothing from counters, headers, costs or explain; and those that say
# the audit measured what it claims.
COUNTER_CHECKS = ("victim_counters_zero", "victim_costs_as_cold", "explain_of_victim_prompt_empty_for_probe")
VALIDITY_CHECKS = ("placement_confirmed", "own_hits_full_from_tier", "cold_counters_zero", "prompt_tokens_equal",
                   "headers_present")  # fmt: skip
# The servers' read deadline for disk and Redis: long enough that an own hit is always read from its tier, even on a
# machine busy with other work (the default, 1 s + 2 ms per block, is for serving, where a late read is recomputed).
READ_TIMEOUT_S = 30.0


class AuditError(RuntimeError):
    """The audit could not run as designed (a server did not start, a prefix could not be placed)."""


# ---- prompts ---------------------------------------------------------------------------------------------------
class PromptMaker:
    """Fresh text prompts of an exact token length: words that are each one token of the model's tokenizer."""

    def __init__(self, tokenizer: Any, seed: int):
        self.tokenizer = tokenizer
        self.rng = random.Random(seed)
        self.words = single_token_words(tokenizer)
        if len(self.words) < 256:
            raise AuditError(f"the tokenizer has only {len(self.words)} single-token words; prompts would repeat")
        # Tokens the tokenizer adds to any text (a BOS): the words make up the rest.
        self.extra = len(tokenizer.encode(self.words[0])) - 1
        self.made = 0

    def new(self, tokens: int) -> str:
        """A fresh prompt of exactly ``tokens`` tokens (with the tokenizer's special tokens): random words, so no two
        prompts share a block (a thousand-odd words to the 16th power first blocks)."""
        for _ in range(10):
            text = "".join(self.rng.choice(self.words) for _ in range(tokens - self.extra))
            if len(self.tokenizer.encode(text)) == tokens:
                self.made += 1
                return text
        raise AuditError(f"could not make a prompt of exactly {tokens} tokens")


def single_token_words(tokenizer: Any) -> list[str]:
    """`` word`` strings (a space, then lowercase letters) that the tokenizer encodes as exactly one token."""
    out = []
    for i in range(tokenizer.vocab_size):
        text = tokenizer.decode([i])
        word = text[1:]
        plain = text.startswith(" ") and len(word) >= 2 and word.isascii() and word.isalpha() and word.islower()
        if plain and tokenizer.encode(text, add_special_tokens=False) == [i]:
            out.append(text)
    return sorted(set(out))


# ---- servers ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ServerSpec:
    """One ``promptcache serve``: its device pool (in blocks) and the one lower tier it has, if any."""

    kv_blocks: int
    host_cache_gb: float | None = None
    disk_cache_dir: str | None = None
    redis_url: str | None = None
    replica_name: str | None = None

    def argv(self, model: Path, port: int, keys_file: Path, block_bytes: int) -> list[str]:
        """The ``promptcache serve`` command line."""
        # Half a block over: the server floors GB x 2^30 / block bytes, and the decimal must not round below.
        gb = (self.kv_blocks + 0.5) * block_bytes / (1 << 30)
        args = [sys.executable, "-m", "promptcache.cli", "serve", "--model", str(model), "--port", str(port),
                "--api-keys-file", str(keys_file), "--served-model-name", SERVED_MODEL, "--device", "cpu",
                "--dtype", "float32", "--block-size", str(BLOCK_SIZE), "--kv-cache-memory-gb", repr(gb),
                "--tier-load-policy", "always", "--tier-read-timeout", repr(READ_TIMEOUT_S),
                "--log-level", "warning"]  # fmt: skip
        if self.host_cache_gb:
            args += ["--host-cache-gb", repr(self.host_cache_gb)]
        if self.disk_cache_dir:
            args += ["--disk-cache", self.disk_cache_dir]
        if self.redis_url:
            args += ["--redis-url", self.redis_url]
        if self.replica_name:
            args += ["--replica-name", self.replica_name]
        return args

    def app(self, model: Path, keys_file: Path) -> Any:
        """The same server as an app of this process (what ``promptcache serve`` builds from ``argv``)."""
        from promptcache.api.server import ServerConfig, create_app
        from promptcache.api.tenancy import Tenancy
        from promptcache.engine.async_engine import AsyncEngine
        from promptcache.engine.engine import EngineConfig, LLMEngine

        engine = LLMEngine(EngineConfig(
            model=str(model), device="cpu", dtype="float32", block_size=BLOCK_SIZE, num_kv_blocks=self.kv_blocks,
            host_cache_gb=self.host_cache_gb, disk_cache_dir=self.disk_cache_dir, redis_url=self.redis_url,
            tier_load_policy="always", tier_read_timeout=READ_TIMEOUT_S,
        ))  # fmt: skip
        tenancy = Tenancy.from_options(api_keys_file=str(keys_file))
        config = ServerConfig(served_model_name=SERVED_MODEL, tenancy=tenancy, replica_name=self.replica_name)
        return create_app(AsyncEngine(engine), config)


class ThreadServer:
    """An app under uvicorn in a background thread of this process, on a free loopback port."""

    def __init__(self, app: Any, name: str):
        import uvicorn

        self.name = name
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, name=f"timing-audit-{name}", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise AuditError(f"the in-process server {name} did not start")
            time.sleep(0.01)

    def wait(self, deadline: float) -> None:
        """Started already (the constructor waits)."""

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


class ProcessServer:
    """A ``promptcache`` process (serve or router) on a free loopback port, its output in a log file."""

    def __init__(self, argv: list[str], port: int, name: str, log: Path):
        self.name, self.port, self.log = name, port, log
        self.url = f"http://127.0.0.1:{port}"
        # One intra-op thread: the servers and this client share the machine's cores, and only one server computes
        # at a time (requests are sequential), so more threads would only add scheduling noise.
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        with open(log, "ab") as out:
            pre = _die_with_parent if sys.platform.startswith("linux") else None
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                         preexec_fn=pre)  # fmt: skip

    def wait(self, deadline: float) -> None:
        """Until ``/health`` answers 200 (the router: once a replica is up)."""
        while True:
            if self.proc.poll() is not None:
                raise AuditError(f"{self.name} exited ({self.proc.returncode}): {_tail(self.log)}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise AuditError(f"{self.name} did not start in time: {_tail(self.log)}")
            time.sleep(0.1)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


@dataclass
class Target:
    """A place under audit: where requests go, how a prefix is put there, and the servers behind it."""

    name: str
    url: str  # where the tenants send requests (the server, or the router)
    servers: list[Any]  # ThreadServer / ProcessServer, the router last
    replica_urls: list[str]  # the servers that compute (their tier writers are waited for)
    tier: str | None  # the tier the own hit must be read from (None: any, through the router)
    reset_device: bool = False  # disk, Redis: empty the device pool (the tiers keep their entries)
    has_writer: bool = False  # a disk or Redis tier: wait for its writer before every timed request
    replica_by_name: dict[str, str] = field(default_factory=dict)  # replica name -> its URL
    setup: dict[str, Any] = field(default_factory=dict)  # how it was set up, for the results

    def close(self) -> None:
        """Stop every server, the router first (idempotent)."""
        for server in reversed(self.servers):
            with contextlib.suppress(Exception):
                server.close()
        self.servers = []


@dataclass
class Launcher:
    """Starts targets: ``promptcache`` processes (``mode="process"``) or the same apps in threads (``"thread"``)."""

    model: Path
    workdir: Path
    redis_url: str | None
    mode: str = "process"
    samples: int = 60
    warmup: int = 3
    prompt_tokens: int = DEFAULT_PROMPT_TOKENS
    block_bytes: int = 0  # KV bytes of one block (set from the model)
    start_timeout: float = 180.0

    def __post_init__(self) -> None:
        if self.mode not in ("process", "thread"):
            raise ValueError(f"mode must be process or thread, got {self.mode!r}")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.keys_file = self.workdir / "keys.json"
        self.keys_file.write_text(json.dumps(KEYS))
        if not self.block_bytes:
            self.block_bytes = block_bytes_of(self.model)

    @property
    def prompt_blocks(self) -> int:
        """Blocks one request takes (its full blocks and the partial one)."""
        return -(-self.prompt_tokens // BLOCK_SIZE)

    def room(self, batches: int = 2) -> int:
        """Device blocks for everything a run sends, so that nothing the audit reads is ever evicted: per sample
        four prompts (V twice: victim and probe; cold; the own hit reloaded), warm-up included, ``batches`` times."""
        return (self.samples + self.warmup + 2) * batches * 4 * self.prompt_blocks + 64

    def start(self, name: str) -> Target:
        """Start the servers of target ``name`` (one of ``TARGETS``) and wait until they serve."""
        if name not in TARGETS:
            raise ValueError(f"unknown target {name!r}; choose from {', '.join(TARGETS)}")
        if name in ("redis", "router") and not self.redis_url:
            raise AuditError(f"the {name} target needs a Redis URL")
        big = self.room()
        small = 8 * self.prompt_blocks + 64  # emptied by a reset every sample
        if name == "device":
            specs = [ServerSpec(big)]
            target = dict(tier="device")
        elif name == "host":
            # A pool of exactly one request: each request evicts every block cached before it into host memory
            # (the device pool's victim cache), which has room for everything the run evicts.
            host_gb = self.room() * self.block_bytes / (1 << 30)
            specs = [ServerSpec(self.prompt_blocks, host_cache_gb=host_gb)]
            target = dict(tier="host")
        elif name == "disk":
            directory = self.workdir / "disk"
            shutil.rmtree(directory, ignore_errors=True)
            specs = [ServerSpec(small, disk_cache_dir=str(directory))]
            target = dict(tier="disk", reset_device=True, has_writer=True)
        elif name == "redis":
            specs = [ServerSpec(small, redis_url=self.redis_url)]
            target = dict(tier="redis", reset_device=True, has_writer=True)
        else:
            specs = [ServerSpec(big, redis_url=self.redis_url, replica_name=f"r{i}") for i in range(2)]
            target = dict(tier=None, has_writer=True)
        servers = [self._serve(spec, f"{name}-{i}") for i, spec in enumerate(specs)]
        try:
            deadline = time.monotonic() + self.start_timeout
            for server in servers:
                server.wait(deadline)
            url = servers[0].url
            if name == "router":
                router = self._router([s.url for s in servers], f"{name}-router")
                servers.append(router)
                router.wait(deadline)
                wait_joined(router.url, len(specs), deadline)
                url = router.url
        except BaseException:
            for server in reversed(servers):
                with contextlib.suppress(Exception):
                    server.close()
            raise
        setup = {"mode": self.mode, "servers": [vars(spec) for spec in specs], "tier_load_policy": "always",
                 "tier_read_timeout_s": READ_TIMEOUT_S, "router": name == "router"}  # fmt: skip
        names = {spec.replica_name: s.url for spec, s in zip(specs, servers) if spec.replica_name}
        return Target(name, url, servers, [s.url for s in servers[: len(specs)]], replica_by_name=names, setup=setup,
                      **target)  # type: ignore[arg-type]  # fmt: skip

    def _serve(self, spec: ServerSpec, name: str) -> Any:
        if self.mode == "thread":
            return ThreadServer(spec.app(self.model, self.keys_file), name)
        port = _free_port()
        return ProcessServer(spec.argv(self.model, port, self.keys_file, self.block_bytes), port, name,
                             self.workdir / f"{name}.log")  # fmt: skip

    def _router(self, replicas: list[str], name: str) -> Any:
        assert self.redis_url is not None
        if self.mode == "thread":
            from promptcache.api.tenancy import Tenancy
            from promptcache.fleet.router import RouterConfig, create_router_app

            tenancy = Tenancy.from_options(api_keys_file=str(self.keys_file))
            cfg = RouterConfig(replicas, self.redis_url, tenancy=tenancy, health_interval=0.25)
            return ThreadServer(create_router_app(cfg), name)
        port = _free_port()
        argv = [sys.executable, "-m", "promptcache.cli", "router", "--redis-url", self.redis_url, "--port",
                str(port), "--api-keys-file", str(self.keys_file), "--health-interval", "0.25",
                "--log-level", "warning"]  # fmt: skip
        for url in replicas:
            argv += ["--replica", url]
        return ProcessServer(argv, port, name, self.workdir / f"{name}.log")


def wait_joined(router_url: str, replicas: int, deadline: float) -> None:
    """Until the router has every replica in the rotation with its view of the replica synced."""
    while True:
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
            state = httpx.get(f"{router_url}/v1/fleet", headers=_auth(ADMIN_KEY), timeout=2).json()
            synced = [r for r in state["replicas"] if r["state"] == "up" and (r["index"] or {}).get("synced")]
            if len(synced) == replicas:
                return
        if time.monotonic() > deadline:
            raise AuditError("the router did not admit every replica in time")
        time.sleep(0.05)


def block_bytes_of(model: Path) -> int:
    """KV bytes of one block of ``model`` in float32 (what the servers run)."""
    from promptcache.model.source import resolve_model

    return int(resolve_model(str(model), quiet=True).config().kv_bytes_per_token) * 4 * BLOCK_SIZE


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# ---- the audit -------------------------------------------------------------------------------------------------
@dataclass
class Answer:
    """One timed request of the probe: what it took and what it reported."""

    kind: str
    ms: float
    prompt_tokens: int
    cached_tokens: int
    by_tier: dict[str, int]
    reported: str | None  # x-promptcache-cached-tokens
    predicted: str | None  # x-promptcache-predicted-cached-tokens (router only)
    replica: str | None
    cost: dict[str, Any]
    position: int  # 0, 1, 2: where in the sample's three timed requests it came
    secret_on: str | None  # the replica that served the victim's request of this sample's secret


class Client:
    """One tenant's HTTP client (one kept-alive connection, so no request pays for a connect)."""

    def __init__(self, base_url: str, key: str):
        self.http = httpx.Client(base_url=base_url, headers=_auth(key), timeout=120)

    def complete(self, prompt: str) -> tuple[float, httpx.Response]:
        """A greedy one-token completion; its time in ms, from sending to having read the whole answer."""
        body = {"model": SERVED_MODEL, "prompt": prompt, "max_tokens": 1, "temperature": 0.0}
        start = time.perf_counter()
        resp = self.http.post("/v1/completions", json=body)
        ms = (time.perf_counter() - start) * 1000
        if resp.status_code != 200:
            raise AuditError(f"HTTP {resp.status_code} from /v1/completions: {resp.text[:500]}")
        return ms, resp

    def explain(self, prompt: str) -> dict[str, Any]:
        resp = self.http.post("/v1/cache/explain", json={"prompt": prompt})
        if resp.status_code != 200:
            raise AuditError(f"HTTP {resp.status_code} from /v1/cache/explain: {resp.text[:500]}")
        return dict(resp.json())

    def close(self) -> None:
        self.http.close()


def answer_of(kind: str, ms: float, resp: httpx.Response, position: int, secret_on: str | None) -> Answer:
    """The probe's timed answer, as recorded."""
    usage = resp.json()["usage"]
    details = usage.get("prompt_tokens_details") or {}
    cost = {k: v for k, v in (usage.get("cost") or {}).items() if k != "response_cached"}
    return Answer(kind, ms, int(usage["prompt_tokens"]), int(details.get("cached_tokens") or 0),
                  dict(usage.get("cached_tokens_by_tier") or {}), resp.headers.get(REPORTED_HEADER),
                  resp.headers.get(PREDICTED_HEADER), resp.headers.get(REPLICA_HEADER), cost, position,
                  secret_on)  # fmt: skip


class Settler:
    """Waits for the tier writers of the target's servers: a writer at work would slow whichever timed request came
    next. Only a server that computed something since the last wait can have a write pending."""

    def __init__(self, target: Target):
        self.target = target
        self.admin = {url: httpx.Client(base_url=url, headers=_auth(ADMIN_KEY), timeout=60)
                      for url in target.replica_urls}  # fmt: skip
        self.dirty: set[str] = set()

    def computed(self, resp: httpx.Response) -> None:
        """``resp``'s server may have tier writes queued (the router names the replica that served it)."""
        url = self.target.replica_by_name.get(resp.headers.get(REPLICA_HEADER, ""))
        self.dirty.update([url] if url else self.target.replica_urls)

    def wait(self) -> None:
        """Until no dirty server has a tier write queued or in progress (``write_queue_bytes`` drops only once a
        write is done)."""
        if not self.target.has_writer:
            return
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        for url in sorted(self.dirty):
            while True:
                tiers = self.admin[url].get("/v1/cache/stats").json().get("tiers")
                if tiers is None or (tiers["write_queue_bytes"] == 0 and tiers["write_queue_blocks"] == 0):
                    break
                if time.monotonic() > deadline:
                    raise AuditError(f"the tier writes of {url} did not finish in {SETTLE_TIMEOUT_S:.0f} s")
                time.sleep(0.005)  # a write of one prompt's blocks takes a few ms
        self.dirty.clear()

    def reset_device(self) -> None:
        """Every server forgets its device pool's idle blocks (its tiers keep their entries)."""
        for client in self.admin.values():
            resp = client.post("/v1/cache/reset", json={})
            if resp.status_code != 200:
                raise AuditError(f"HTTP {resp.status_code} from /v1/cache/reset: {resp.text[:500]}")

    def close(self) -> None:
        for client in self.admin.values():
            client.close()


def held(explained: dict[str, Any], routed: bool) -> dict[str, int]:
    """Cached tokens by tier in an explain answer; through the router, the most any replica would serve."""
    if routed:
        candidates = explained.get("router", {}).get("candidates", [])
        return {"any": max((int(c["predicted_cached_tokens"]) for c in candidates), default=0)}
    return {t: n for t, n in (explained.get("cached_tokens_by_tier") or {}).items() if n}


def ks(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Two-sample Kolmogorov-Smirnov test, two-sided: (statistic D, p-value)."""
    from scipy.stats import ks_2samp

    res = ks_2samp(a, b)
    return float(res.statistic), float(res.pvalue)


def run_batch(target: Target, prompts: PromptMaker, samples: int, warmup: int, prompt_tokens: int,
              probe_key: str, seed: int) -> dict[str, Any]:  # fmt: skip
    """``warmup`` + ``samples`` samples on ``target`` (see the module docstring); the answers, the checks, the
    statistics."""
    expected = (prompt_tokens - 1) // BLOCK_SIZE * BLOCK_SIZE  # every full block but the last token's
    routed = target.tier is None
    want = {"any": expected} if routed else {target.tier: expected}
    nothing = {"any": 0} if routed else {}
    victim, probe = Client(target.url, VICTIM_KEY), Client(target.url, probe_key)
    filler = Client(target.url, FILLER_KEY)
    settler = Settler(target)
    rng = random.Random(seed)
    orders = list(itertools.permutations(KINDS))
    schedule = [orders[i % len(orders)] for i in range(samples)]
    rng.shuffle(schedule)  # balanced: every order equally often (up to the remainder), in a random sequence
    answers: list[Answer] = []
    problems: list[str] = []
    placement_ok = fillers = explain_leaks = 0
    t0 = time.perf_counter()

    def send(client: Client, prompt: str) -> tuple[float, httpx.Response]:
        ms, resp = client.complete(prompt)
        settler.computed(resp)
        return ms, resp

    try:
        own, upcoming = prompts.new(prompt_tokens), prompts.new(prompt_tokens)
        send(probe, own)  # the probe's first own prompt
        served_victim = send(victim, upcoming)[1].headers.get(REPLICA_HEADER)
        for i in range(-warmup, samples):
            order = schedule[i] if i >= 0 else orders[i % len(orders)]
            secret, cold, upcoming = upcoming, prompts.new(prompt_tokens), prompts.new(prompt_tokens)
            secret_on = served_victim  # the replica whose device pool took the secret
            # The victim caches the next sample's secret now: this sample's timed requests then push it out of a
            # host target's one-request pool, as the victim's request just before this one pushed out the
            # probe's own prompt (so no filler request is needed).
            served_victim = send(victim, upcoming)[1].headers.get(REPLICA_HEADER)
            # The victim's secret and the probe's own prompt must be in the target's place and nowhere above.
            settler.wait()
            if target.reset_device:
                settler.reset_device()
            seen = held(victim.explain(secret), routed), held(probe.explain(own), routed)
            for _ in range(MAX_FILLERS if target.tier == "host" else 0):
                if seen == (want, want):
                    break
                # Not expected (each request evicts the whole one-request pool), but should a block stay in the
                # device pool, another tenant's request of the same length pushes it down.
                send(filler, prompts.new(prompt_tokens))
                fillers += i >= 0
                seen = held(victim.explain(secret), routed), held(probe.explain(own), routed)
            leaked = held(probe.explain(secret), routed)
            if i >= 0:
                placement_ok += seen == (want, want)
                if seen != (want, want) and len(problems) < 10:
                    problems.append(f"sample {i}: expected {want} for the victim's prompt and the probe's own, "
                                    f"explain found {seen[0]} and {seen[1]}")  # fmt: skip
                if leaked != nothing:
                    explain_leaks += 1
                    if explain_leaks <= 5:
                        problems.append(f"sample {i}: the probe's explain of the victim's prompt found {leaked}")
            prompt_of = {"victim": secret, "cold": cold, "own": own}
            for position, kind in enumerate(order):
                settler.wait()
                ms, resp = send(probe, prompt_of[kind])
                if i >= 0:
                    answers.append(answer_of(kind, ms, resp, position, secret_on))
            own = cold  # cached in the probe's namespace just now: the next sample's own hit
    finally:
        for c in (victim, probe, filler, settler):
            c.close()
    counts = {"placement_confirmed": placement_ok, "explain_leaks": explain_leaks, "fillers": fillers}
    return summarise(answers, samples, prompt_tokens, want, target.tier, counts, problems, time.perf_counter() - t0)


def summarise(answers: list[Answer], samples: int, prompt_tokens: int, want: dict[str, int], tier: str | None,
              counts: dict[str, int], problems: list[str], wall_s: float) -> dict[str, Any]:  # fmt: skip
    """A batch's figures and checks from its answers (``want``: where the own hits must come from, ``{"any": n}``
    through the router; ``counts``: samples whose placement was confirmed, explains that leaked, fillers sent)."""
    expected = next(iter(want.values()))
    routed = tier is None
    by_kind = {k: [a for a in answers if a.kind == k] for k in KINDS}
    ms = {k: [a.ms for a in v] for k, v in by_kind.items()}
    d_victim, p_victim = ks(ms["victim"], ms["cold"])
    d_own, p_own = ks(ms["own"], ms["cold"])

    def zero(a: Answer) -> bool:
        return a.cached_tokens == 0 and not any(a.by_tier.values()) and a.reported in (None, "0") and (
            a.predicted in (None, "0"))  # fmt: skip

    def full_hit(a: Answer) -> bool:
        if routed:
            return a.cached_tokens == expected and sum(a.by_tier.values()) == expected
        return a.cached_tokens == expected and {t: n for t, n in a.by_tier.items() if n} == want

    pairs = list(zip(by_kind["victim"], by_kind["cold"]))
    checks = {
        "victim_counters_zero": all(zero(a) for a in by_kind["victim"]),
        "cold_counters_zero": all(zero(a) for a in by_kind["cold"]),
        "victim_costs_as_cold": all(v.cost == c.cost for v, c in pairs),
        "own_hits_full_from_tier": all(full_hit(a) for a in by_kind["own"]),
        "prompt_tokens_equal": {a.prompt_tokens for a in answers} == {prompt_tokens},
        # The header checks above are not vacuous: every answer carries the replica's count, and through the
        # router the router's prediction.
        "headers_present": all(a.reported is not None and (a.predicted is not None or not routed) for a in answers),
        "placement_confirmed": counts["placement_confirmed"] == samples,
        "explain_of_victim_prompt_empty_for_probe": counts["explain_leaks"] == 0,
    }
    leaks = [a for a in by_kind["victim"] if not zero(a)]
    for a in leaks[:5]:
        problems.append(f"the probe's answer for the victim's prompt reported cached_tokens={a.cached_tokens}, "
                        f"by tier {a.by_tier}, header {REPORTED_HEADER}={a.reported}, {PREDICTED_HEADER}="
                        f"{a.predicted}")  # fmt: skip
    on_victims_replica = sum(1 for a in by_kind["victim"] if a.replica == a.secret_on) if routed else None
    predicted_exact = sum(1 for a in by_kind["own"] if a.predicted == str(a.cached_tokens)) if routed else None
    own_tiers = Counter(",".join(sorted(t for t, n in a.by_tier.items() if n)) or "none" for a in by_kind["own"])
    return {
        "samples": {k: len(v) for k, v in ms.items()},
        "median_ms": {k: percentile(v, 50) for k, v in ms.items()},
        "p25_ms": {k: percentile(v, 25) for k, v in ms.items()},
        "p75_ms": {k: percentile(v, 75) for k, v in ms.items()},
        "ks_victim_vs_cold": {"statistic": d_victim, "p": p_victim},
        "ks_own_vs_cold": {"statistic": d_own, "p": p_own},
        "no_timing_leak": p_victim > ALPHA,
        "hits_detectable": p_own < ALPHA,
        "checks": checks,
        "own_hits_by_tier": dict(own_tiers),
        "own_hit_tier_expected": tier or "any (routed)",
        "expected_cached_tokens": expected,
        "prompt_tokens": prompt_tokens,
        "own_hits_predicted_exactly_by_router": predicted_exact,
        "fillers": counts["fillers"],
        "replicas_of_victim_prompt": dict(Counter(str(a.replica) for a in by_kind["victim"])),
        # Through the router: how often the probe's request for the secret went where the victim's had gone (a
        # router that matched the secret across tenants would send it there every time, as it does the own hits).
        "victim_prompt_on_victims_replica": on_victims_replica,
        "problems": problems,
        "wall_s": wall_s,
        "ms": {k: [round(x, 3) for x in v] for k, v in ms.items()},
        "position": {k: [a.position for a in v] for k, v in by_kind.items()},
    }


def audit(target: Target, prompts: PromptMaker, samples: int = 60, warmup: int = 3,
          prompt_tokens: int = DEFAULT_PROMPT_TOKENS, probe_key: str = PROBE_KEY, seed: int = 0,
          recheck: bool = True) -> dict[str, Any]:  # fmt: skip
    """Audit one target: a batch of samples, and with ``recheck`` a second batch of fresh samples when the first's
    victim vs cold p-value is <= ALPHA while its counters are clean (one leak-free batch in a hundred gets such a
    p-value by chance; a real leak gets it again). The timing verdict is the last batch's; every batch is kept."""
    batches = [run_batch(target, prompts, samples, warmup, prompt_tokens, probe_key, seed)]
    if recheck and not batches[0]["no_timing_leak"] and all(batches[0]["checks"][c] for c in COUNTER_CHECKS):
        batches.append(run_batch(target, prompts, samples, warmup, prompt_tokens, probe_key, seed + 1))
    last = batches[-1]
    checks = {name: all(b["checks"][name] for b in batches) for name in last["checks"]}
    verdict = {
        "no_timing_leak": last["no_timing_leak"],
        "no_counter_leak": all(checks[c] for c in COUNTER_CHECKS),
        "hits_detectable": all(b["hits_detectable"] for b in batches),
        # The audit measured what it claims: the prefixes were where they should be, the own hits came from there
        # in full, the cold prompts were cold, every prompt had the same length.
        "valid": all(checks[c] for c in VALIDITY_CHECKS),
    }
    return {
        "target": target.name,
        "setup": target.setup,
        "samples_per_kind": samples,
        "median_ms": last["median_ms"],
        "p_victim_vs_cold": last["ks_victim_vs_cold"]["p"],
        "p_own_vs_cold": last["ks_own_vs_cold"]["p"],
        "p_victim_vs_cold_by_batch": [b["ks_victim_vs_cold"]["p"] for b in batches],
        "checks": checks,
        "verdict": verdict,
        "passed": all(verdict.values()),
        "rechecked": len(batches) > 1,
        "batches": batches,
    }


# ---- the whole run ---------------------------------------------------------------------------------------------
def resolve_model(name: str | None) -> Path:
    """``None`` / ``embedded``: the embedded test model (what the tests serve); else a path."""
    if name in (None, "embedded", "default"):
        from promptcache.model.source import EMBEDDED_MODEL

        return Path(EMBEDDED_MODEL)
    return Path(name)


def run(args: argparse.Namespace, argv: Sequence[str]) -> dict[str, Any]:
    """Every selected target, each on servers of its own; the results, JSON-ready."""
    from promptcache.bench.runner import machine_info, versions
    from promptcache.model.source import resolve_model as resolve_source

    t_start = time.perf_counter()
    model = resolve_model(args.model)
    tokenizer = resolve_source(str(model), quiet=True).tokenizer()
    prompts = PromptMaker(tokenizer, args.seed)
    workdir = Path(tempfile.mkdtemp(prefix="pc-timing-audit-"))
    redis = None
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": shlex.join(["python", "-m", "promptcache.bench.timing_audit", *argv]),
        "model": str(model),
        "mode": args.mode,
        "alpha": ALPHA,
        "samples_per_kind": args.samples,
        "warmup_samples": args.warmup,
        "prompt_tokens": args.prompt_tokens,
        "seed": args.seed,
        "single_token_words": len(prompts.words),
        "machine": machine_info(),
        "load_average_at_start": list(os.getloadavg()),
        "versions": versions(),
        "targets": {},
        "complete": False,
        "notes": [],
    }
    try:
        redis_url = args.redis_url
        if redis_url is None and any(t in ("redis", "router") for t in args.targets):
            from promptcache.bench.tier_bench import RedisProcess

            redis = RedisProcess(workdir / "redis").start()
            redis_url = redis.url
        if args.mode == "thread":
            import torch

            # One intra-op thread, as the process mode's servers: client and servers share this process, and a second
            # OpenMP thread spinning after each matmul would only take the client's core.
            torch.set_num_threads(1)
        launcher = Launcher(model, workdir, redis_url, args.mode, args.samples, args.warmup, args.prompt_tokens)
        for i, name in enumerate(args.targets):
            print(f"timing_audit: {name}: starting", file=sys.stderr)
            target = launcher.start(name)
            try:
                result = audit(target, prompts, args.samples, args.warmup, args.prompt_tokens, seed=args.seed + 10 * i)
            finally:
                target.close()
            results["targets"][name] = result
            print(f"timing_audit: {name}: {_line(result)}", file=sys.stderr)
        results["complete"] = True
    except Exception as err:  # written down with the targets audited before it, rather than losing the whole run
        traceback.print_exc()
        results["notes"].append(f"failed: {type(err).__name__}: {err}")
    finally:
        if redis is not None:
            redis.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    results["passed"] = results["complete"] and all(r["passed"] for r in results["targets"].values())
    results["load_average_at_end"] = list(os.getloadavg())
    results["wall_s"] = time.perf_counter() - t_start
    return results


def _line(r: dict[str, Any]) -> str:
    m = r["median_ms"]
    return (f"victim {m['victim']:.1f} ms, cold {m['cold']:.1f} ms, own {m['own']:.1f} ms; p(victim vs cold) "
            f"{r['p_victim_vs_cold']:.3g}, p(own vs cold) {r['p_own_vs_cold']:.3g}; "
            f"{'PASS' if r['passed'] else 'FAIL'}")  # fmt: skip


def table(results: dict[str, Any]) -> str:
    """The results as a markdown table, one row per target."""
    lines = [
        "| target | own hit read from | samples / kind | victim ms | cold ms | own ms | p(victim vs cold) | "
        "p(own vs cold) | counters / headers | result |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results["targets"].items():
        m, last = r["median_ms"], r["batches"][-1]
        tiers = ", ".join(f"{t} {n}/{r['samples_per_kind']}" for t, n in last["own_hits_by_tier"].items())
        p_victim = " then ".join(f"{p:.3g}" for p in r["p_victim_vs_cold_by_batch"])
        counters = "0 (clean)" if r["verdict"]["no_counter_leak"] else "LEAK"
        lines.append(f"| {name} | {tiers} | {r['samples_per_kind']} | {m['victim']:.1f} | {m['cold']:.1f} | "
                     f"{m['own']:.1f} | {p_victim} | {r['p_own_vs_cold']:.2g} | {counters} | "
                     f"{'pass' if r['passed'] else 'FAIL'} |")  # fmt: skip
    return "\n".join(lines)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m promptcache.bench.timing_audit", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--out", required=True, help="the JSON file to write")
    parser.add_argument("--targets", default=",".join(TARGETS), help="comma-separated: " + ", ".join(TARGETS))
    parser.add_argument("--samples", type=int, default=60, help="timed samples per kind and target")
    parser.add_argument("--warmup", type=int, default=3, help="samples run and dropped first")
    parser.add_argument("--prompt-tokens", type=int, default=DEFAULT_PROMPT_TOKENS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mode", default="process", choices=["process", "thread"],
                        help="promptcache processes, or the same apps in threads of this process")  # fmt: skip
    parser.add_argument("--model", default=None, help="a model path (default: the embedded test model)")
    parser.add_argument("--redis-url", default=None, help="a Redis to use (default: a redis-server of its own)")
    args = parser.parse_args(list(argv))
    args.targets = [t for t in args.targets.split(",") if t]
    if not args.targets or any(t not in TARGETS for t in args.targets):
        parser.error(f"--targets: choose from {', '.join(TARGETS)}")
    if args.samples < 5 or args.warmup < 0:
        parser.error("--samples must be >= 5 and --warmup >= 0")
    if args.prompt_tokens < 2 * BLOCK_SIZE + 1:
        parser.error(f"--prompt-tokens must be at least {2 * BLOCK_SIZE + 1}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run, write the JSON, print the table; 0 when every target passed, 1 when one did not or the run failed."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    results = run(args, argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print(table(results))
    print(f"wrote {out} in {results['wall_s']:.0f} s", file=sys.stderr)
    return 0 if results["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
