"""Tier benchmark: what the tiers below the device pool (host, disk, Redis) buy, every figure a ratio from one run.

    python -m promptcache.bench.tier_bench [--models default,smollm2] [--quick] [--dir DIR] [--out FILE.json]

The benchmark starts its own ``redis-server`` on a free loopback port (no persistence) and works in its own
temporary directory (``--dir``; default: the system temp dir when it is on the repository's disk, else a hidden
folder in the repository), and removes both at the end. Sections (each a table and an object of the JSON):

1. **TTFT by tier** (``ttft_by_tier``): a cached prefix (2,048 tokens) + 32 new tokens, 4 greedy output tokens,
   served from exactly one place - the device pool, the host tier, the disk tier (from the page cache, and with the
   page cache dropped), Redis, and Redis from a second engine that never computed the prefix (a replica) - each
   against cold (the same tokens in a fresh namespace, which nothing has cached), cold and served requests
   interleaved, medians. Tier rows run with ``tier_load_policy="always"`` so they measure the tier, and a read
   deadline of ``READ_TIMEOUT_S`` (the engine's default, 1 s + 2 ms per block, can be too short for a 94 MB
   SmolLM2 prefix on a slow machine). Every timed request's ``cached_tokens_by_tier`` is recorded and checked
   against the row's claim.
2. **Tier bandwidth** (``bandwidth``): store / load of a few hundred SmolLM2-sized blocks (16 tokens x 45 KiB)
   through ``HostTier``, ``DiskTier`` and ``RedisTier`` directly, beside the machine's limits measured in the same
   run: a torch copy of the same bytes, ``dd`` to and from the same directory, ``redis-benchmark`` SET / GET of
   values of one entry's size.
3. **Workloads at 1/10 of the working set** (``workloads``): each workload's requests in order through
   ``LLM.chat`` (greedy, answers replayed token-exactly) under (a) an unbounded device pool, (b) the device pool at
   1/10 of the working set, (c) the same + a host tier of 1/10 + an unbounded disk tier, (d) the same device pool +
   Redis, and (e) (c) without its host tier, a diagnostic; tokens served from cache, per-tier split, and greedy
   outputs compared with (a)'s. Every configuration runs in a fresh process, so that its memory figures are its own.
   The embedded model's greedy answers repeat one token, so the output comparison means little there: SmolLM2,
   whose answers vary, runs the quick chat workload for it.
4. **Restart** (``restart``): the chat workload twice on one engine with a disk tier, against once, a restart
   (``close()``, a new ``LLM`` on the same directory), and once more.
5. **Memory** (``memory``): peak RSS over the run of (c) against device pool + host budget (sampled every 50 ms,
   (b) beside it as the control); the disk directory's size, sampled during (c) with a disk budget of half the
   working set, and measured exactly after every store of a tier alone; Redis ``used_memory`` per cached token
   against the KV bytes per token.
6. **Worth loading** (``worth_loading``): per tier and model, seconds to load a block against seconds to
   recompute it, from section 1's medians, beside the engine's own estimates (what ``tier_load_policy="auto"``
   compares).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import random
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch

from promptcache.cache.tiers.stack import READ_SECONDS_PER_BLOCK
from promptcache.engine.engine import EngineConfig
from promptcache.engine.request import RequestOutput, SamplingParams

REPO_ROOT = Path(__file__).resolve().parents[2]
SECTIONS = ("ttft", "bandwidth", "workloads", "restart")
# Targets from the issue: TTFT served from the tier at least this many times faster than cold.
TTFT_TARGETS = {"host": 15.0, "disk": 8.0, "redis": 5.0}
CACHE_SHARE_TARGET = 0.99  # tokens from cache with tiers / with an unbounded device pool; restart the same
RSS_TARGET = 1.10  # peak RSS growth within +10% of device pool + host budget
# The tier rows' read deadline: long enough that a timed request is always served by its tier (the row measures the
# tier); section 1 reports how the measured loads compare with the engine's default deadline.
READ_TIMEOUT_S = 30.0


def default_deadline(blocks: int) -> float:
    """The engine's default read deadline for a run of ``blocks`` blocks."""
    return EngineConfig.tier_read_timeout + READ_SECONDS_PER_BLOCK * blocks
SAMPLE_INTERVAL_S = 0.05
GB = 1e9  # bandwidths are decimal GB/s
# SmolLM2-135M's KV block: 30 layers x (K, V) x 16 tokens x 3 KV heads x 64 (the bandwidth section's block; section
# 1 checks it against the loaded model when SmolLM2 runs).
SMOLLM2_BLOCK_SHAPE = (30, 2, 16, 3, 64)
WorkloadSpec = tuple[str, bool, dict[str, int]]  # (workload name, quick sizes, size overrides)
# Dropping the page cache tries /proc/sys/vm/drop_caches first (the whole machine's: tests turn it off).
MACHINE_WIDE_DROP = True
_MAX_FILLERS = 3  # unrelated requests that push the prefix out of a one-request device pool (two suffice)


@dataclass
class Sizes:
    """What is run; ``quick()`` shrinks it to a run of about two minutes."""

    prefix: int = 2048  # cached prefix tokens (a multiple of the block size)
    suffix: int = 32  # new tokens after it
    output_tokens: int = 4
    repeats: int = 5  # timed tier-served requests per row
    cold_repeats: int = 3  # cold requests per engine (interleaved with the timed ones), besides its first request
    smollm2_cold_repeats: int = 1  # a SmolLM2 cold request takes seconds: 5 engines x (1 + 1) samples
    bandwidth_blocks: int = 256  # SmolLM2-sized blocks stored and loaded per tier (189 MB)
    bandwidth_rounds: int = 3
    # Section 3 per model: pressure at full size; chat at full size but 16-token answers (its 64-token answers are
    # 8,192 sequential decode steps per configuration); SmolLM2 (whose greedy answers vary, unlike the embedded
    # random model's) on the quick chat.
    workloads: dict[str, list[WorkloadSpec]] = field(
        default_factory=lambda: {
            "default": [("pressure", False, {}), ("chat", False, {"max_tokens": 16})],
            "smollm2": [("chat", True, {})],
        }
    )
    restart: WorkloadSpec | None = ("chat", False, {"max_tokens": 16})  # on the embedded model

    @classmethod
    def quick(cls) -> Sizes:
        return cls(
            prefix=512,
            repeats=3,
            cold_repeats=2,
            smollm2_cold_repeats=1,
            bandwidth_blocks=64,
            bandwidth_rounds=2,
            workloads={"default": [("pressure", True, {}), ("chat", True, {})]},
            restart=("chat", True, {}),
        )


# ---- the machine, Redis, the page cache -------------------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    """CPU model, cores, memory and the versions that the numbers depend on."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(psutil.virtual_memory().total / (1 << 30), 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "redis_server": _redis_version(),
        "loadavg_at_start": os.getloadavg(),
    }


def _redis_version() -> str | None:
    binary = shutil.which("redis-server")
    if binary is None:
        return None
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    match = re.search(r"v=(\S+)", out)
    return match.group(1) if match else out.strip()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisProcess:
    """A private ``redis-server`` on a free loopback port, without persistence, for the length of the benchmark."""

    def __init__(self, workdir: Path, maxmemory_mb: int | None = None):
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("tier_bench: redis-server is not installed (Debian: apt-get install redis-server)")
        self.binary = binary
        self.dir = workdir
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.maxmemory_mb = maxmemory_mb  # None: unbounded; else evict any key, least recently used first

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self) -> Any:
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=30)

    def start(self) -> RedisProcess:
        self.dir.mkdir(parents=True, exist_ok=True)
        args = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        if self.maxmemory_mb is not None:
            args += ["--maxmemory", f"{self.maxmemory_mb}mb", "--maxmemory-policy", "allkeys-lru"]
        with open(self.dir / "redis.log", "ab") as log:
            self.proc = subprocess.Popen(
                [self.binary, *args, "--dir", str(self.dir)], stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 10
        while True:
            try:
                with self.client() as c:
                    if c.ping():
                        return self
            except Exception:  # not up yet (connection refused); any other failure shows in the deadline below
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    log = (self.dir / "redis.log").read_text()[-500:]
                    raise RuntimeError(f"redis-server did not start: {log}") from None
            time.sleep(0.05)

    def flushall(self) -> None:
        with self.client() as c:
            c.flushall()

    def used_memory(self) -> int:
        with self.client() as c:
            return int(c.info("memory")["used_memory"])

    def dbsize(self) -> int:
        with self.client() as c:
            return int(c.dbsize())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def __enter__(self) -> RedisProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def drop_page_cache(directory: Path) -> str:
    """Evict ``directory``'s files from the page cache; returns how: "drop_caches" (the whole machine's, needs
    root; only when ``MACHINE_WIDE_DROP``), else "fadvise" (POSIX_FADV_DONTNEED on each file), else "none" (reads
    then come from the page cache)."""
    os.sync()  # dirty pages cannot be dropped
    if MACHINE_WIDE_DROP:
        with contextlib.suppress(OSError):
            Path("/proc/sys/vm/drop_caches").write_text("1\n")
            return "drop_caches"
    if not hasattr(os, "posix_fadvise"):
        return "none"
    for root, _, files in os.walk(directory):
        for name in files:
            with contextlib.suppress(OSError):
                fd = os.open(os.path.join(root, name), os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)
    return "fadvise"


def default_workdir() -> Path:
    """A fresh temporary directory on the repository's disk: the system temp dir if it is on that filesystem
    (so disk figures are the repository disk's), else a hidden folder inside the repository."""
    tmp = Path(tempfile.gettempdir())
    if tmp.stat().st_dev == REPO_ROOT.stat().st_dev:
        return Path(tempfile.mkdtemp(prefix="tier-bench-", dir=tmp))
    return Path(tempfile.mkdtemp(prefix=".tier-bench-", dir=REPO_ROOT))


def dir_listing(directory: Path) -> dict[str, int]:
    """Path -> apparent size of every file under ``directory`` (temporary files of writes in flight included)."""
    out: dict[str, int] = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with contextlib.suppress(OSError):
                out[path] = os.stat(path).st_size
    return out


def dir_bytes(directory: Path) -> int:
    return sum(dir_listing(directory).values())


class Sampler:
    """Samples RSS (and optionally a directory's size) every ``SAMPLE_INTERVAL_S`` in a thread; keeps the peaks.

    NOTE: a walk of a directory is not a snapshot: a file deleted after it was counted and one written before its
    folder is reached are both counted, though they never existed together. A directory sample therefore counts
    only when two walks in a row list the same files with the same sizes (up to 4 tries; ``max_dir_raw`` keeps the
    peak of every walk, consistent or not).
    """

    def __init__(self, directory: Path | None = None):
        self.directory = directory
        self.proc = psutil.Process()
        self.max_rss = self.proc.memory_info().rss
        self.max_dir = 0
        self.max_dir_raw = 0
        self.samples = 0
        self.dir_samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tier-bench-sampler", daemon=True)

    def _sample_dir(self, directory: Path) -> None:
        for _ in range(4):
            first, second = dir_listing(directory), dir_listing(directory)
            self.max_dir_raw = max(self.max_dir_raw, sum(first.values()), sum(second.values()))
            if first == second:
                self.max_dir = max(self.max_dir, sum(first.values()))
                self.dir_samples += 1
                return

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.max_rss = max(self.max_rss, self.proc.memory_info().rss)
            if self.directory is not None:
                self._sample_dir(self.directory)
            self.samples += 1
            self._stop.wait(SAMPLE_INTERVAL_S)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.max_rss = max(self.max_rss, self.proc.memory_info().rss)


# ---- models ------------------------------------------------------------------------------------------------------
def model_path(name: str) -> tuple[Path, int]:
    """The weights a ``--models`` name stands for, and the token-id range random prompts are drawn from (the
    engine benchmark's resolution; this benchmark runs the embedded model and SmolLM2 only)."""
    from promptcache.bench.engine_bench import model_path as engine_bench_model

    if name not in ("default", "smollm2"):
        raise SystemExit(f"tier_bench: unknown model {name!r} (default, smollm2)")
    return engine_bench_model(name, Path(tempfile.gettempdir()))


def make_llm(path: Path, **kwargs: Any) -> Any:
    """An LLM on the CPU in float32 (what every figure here is measured with)."""
    from promptcache import LLM

    return LLM(model=str(path), device="cpu", dtype="float32", seed=0, **kwargs)


def block_bytes(llm: Any) -> int:
    return int(llm.engine.kv_bytes_per_token * llm.engine.kv.block_size)


def _median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


# ---- section 1: TTFT by tier ------------------------------------------------------------------------------------
class _TTFTModel:
    """One model's TTFT rows: each engine holds the prefix in exactly one place, times requests served from there
    and cold requests of the same tokens in fresh namespaces, interleaved."""

    def __init__(self, name: str, sizes: Sizes, redis: RedisProcess, workdir: Path):
        self.name, self.sizes, self.redis, self.workdir = name, sizes, redis, workdir
        self.path, self.vocab = model_path(name)
        self.rng = random.Random(0)
        self.prefix = self.ids(sizes.prefix)
        self.params = SamplingParams(temperature=0.0, max_tokens=sizes.output_tokens, ignore_eos=True)
        self.cold_repeats = sizes.smollm2_cold_repeats if name == "smollm2" else sizes.cold_repeats
        self.block_size = 16
        self.per_request = math.ceil((sizes.prefix + sizes.suffix + sizes.output_tokens) / self.block_size)
        self.drop_method = "none"
        self.kv_bytes_per_token = 0  # set by the first engine
        self.engines: dict[str, dict[str, Any]] = {}

    def ids(self, n: int) -> list[int]:
        return [self.rng.randrange(self.vocab) for _ in range(n)]

    def request(self, llm: Any, namespace: str = "default") -> tuple[float, RequestOutput]:
        """The prefix + a fresh suffix (so that exactly the prefix can hit); its TTFT and output."""
        out = llm.generate([self.prefix + self.ids(self.sizes.suffix)], self.params, namespace=namespace)[0]
        return float(out.metrics.time_to_first_token or 0.0), out

    def engine(self, label: str, **kwargs: Any) -> Any:
        started = time.perf_counter()
        llm = make_llm(self.path, tier_load_policy="always", tier_read_timeout=READ_TIMEOUT_S, **kwargs)
        self.engines[label] = {"load_s": time.perf_counter() - started, "num_kv_blocks": kwargs.get("num_kv_blocks")}
        self.kv_bytes_per_token = int(llm.engine.kv_bytes_per_token)
        # Warm-up: the first forward of a process pays for allocations and kernel selection; not measured. Under
        # 4 blocks, so that the engine's recompute estimate (steps of >= 64 tokens) does not learn from it.
        llm.generate([self.ids(48)], self.params, namespace="warm-up")
        self._settle(llm)
        return llm

    @staticmethod
    def _settle(llm: Any, reset: bool = True) -> None:
        """Wait for queued tier writes (so no writer competes with the next timed request) and, with ``reset``,
        drop the device pool's idle blocks (not spilled to the tiers: the tiers keep what they hold)."""
        if llm.engine.tiers is not None:
            llm.engine.tiers.flush()
        if reset:
            llm.engine.reset_cache()

    def run(self) -> dict[str, Any]:
        rows: list[dict[str, Any]] = []
        rows += self._device()
        rows += self._host()
        rows += self._disk()
        rows += self._redis()
        # Cold is the same computation in every engine (nothing is cached, the tiers only write): the headline ratio
        # uses the median of every cold request of this model, each engine's first request included, which is
        # robust to a noisy spell on a shared machine; each row also keeps its own engine's interleaved ratio.
        pooled = [x for e in self.engines.values() for x in [*e.get("setup_s", []), *e["cold_s"]]]
        cold = _median(pooled)
        for r in rows:
            r["cold_s_same_engine"], r["cold_over_tier_same_engine"] = r["cold_s"], r["cold_over_tier"]
            r["cold_s"], r["cold_over_tier"] = cold, cold / r["tier_s"]
            r["met"] = None if r["target"] is None else r["cold_over_tier"] >= r["target"]
        return {
            "prefix_tokens": self.sizes.prefix,
            "suffix_tokens": self.sizes.suffix,
            "output_tokens": self.sizes.output_tokens,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "block_bytes": self.kv_bytes_per_token * self.block_size,
            "page_cache_drop": self.drop_method,
            "cold_s": cold,
            "cold_samples_s": pooled,
            "rows": rows,
            "engines": self.engines,
        }

    def _interleaved(
        self, llm: Any, label: str, timed: list[tuple[str, str, Callable[[], None]]], reset_cold: bool
    ) -> list[dict[str, Any]]:
        """Cold requests and each timed row's requests in turn; ``timed`` is (row, tier that must serve, prepare).

        After each request served by a lower tier, one more request is timed while the prefix is back in the device
        pool: the same engine's device hit, the reference that the tier's load time is measured against.
        """
        cold_s: list[float] = []
        cold_ok: list[bool] = []
        samples: dict[str, list[float]] = {row: [] for row, _, _ in timed}
        device_s: dict[str, list[float]] = {row: [] for row, _, _ in timed}
        served: dict[str, list[dict[str, int]]] = {row: [] for row, _, _ in timed}
        device_ok: list[bool] = []
        for i in range(max(self.sizes.repeats, self.cold_repeats)):
            if i < self.cold_repeats:
                if reset_cold:
                    self._settle(llm)
                # A namespace no engine has used (Redis is shared by two engines): the same tokens, nothing cached.
                t, out = self.request(llm, namespace=f"cold-{label}-{i}")
                cold_s.append(t)
                cold_ok.append(out.num_cached_tokens == 0)
                self._settle(llm, reset=False)
            if i < self.sizes.repeats:
                for row, tier, prepare in timed:
                    prepare()
                    t, out = self.request(llm)
                    samples[row].append(t)
                    served[row].append(dict(out.cached_tokens_by_tier))
                    self._settle(llm, reset=False)
                    if tier != "device":
                        t, out = self.request(llm)
                        device_s[row].append(t)
                        device_ok.append(out.cached_tokens_by_tier == {"device": self.sizes.prefix})
                        self._settle(llm, reset=False)
        stats = llm.engine.tier_stats()
        self.engines[label].update(
            cold_s=cold_s,
            cold_served_nothing=all(cold_ok),
            device_reference_served_by_device=all(device_ok),
            tier_stats=_compact_tier_stats(stats),
            cache_stats={k: v for k, v in llm.cache_stats().items() if k != "hit_tokens_by_tier"},
        )
        cold = _median(cold_s)
        rows = []
        for row, tier, _ in timed:
            tier_s = _median(samples[row])
            claim = {tier: self.sizes.prefix}
            target = TTFT_TARGETS.get(tier)
            ratio = cold / tier_s
            device = _median(device_s[row]) if device_s[row] else tier_s
            rows.append(
                {
                    "row": row,
                    "tier": tier,
                    "engine": label,
                    "cold_s": cold,
                    "tier_s": tier_s,
                    "device_s": device,
                    "cold_over_tier": ratio,
                    "target": target,
                    "met": None if target is None else ratio >= target,
                    "served_by": served[row],
                    "served_as_claimed": all(s == claim for s in served[row]) and all(cold_ok) and all(device_ok),
                    "cold_samples_s": cold_s,
                    "tier_samples_s": samples[row],
                    "device_samples_s": device_s[row],
                    # Loads alone (served - device hit, paired) over the engine's default read deadline: each of
                    # these requests would have been recomputed at the default.
                    "over_default_deadline": sum(
                        t - d > default_deadline(self.sizes.prefix // self.block_size)
                        for t, d in zip(samples[row], device_s[row])
                    ),
                }
            )
        return rows

    def _device(self) -> list[dict[str, Any]]:
        # Room for the prefix and every cold request: nothing the device row needs is ever evicted.
        llm = self.engine("device", num_kv_blocks=(2 + self.cold_repeats) * self.per_request + 64)
        if self.name == "smollm2":
            block = math.prod(SMOLLM2_BLOCK_SHAPE) * 4
            assert block == block_bytes(llm), f"SmolLM2's block is {block_bytes(llm)} bytes, not {block}"
        t, _ = self.request(llm)  # computes the prefix: from now on it is in the device pool
        self.engines["device"]["setup_s"] = [t]
        rows = self._interleaved(llm, "device", [("device", "device", lambda: None)], reset_cold=False)
        llm.engine.close()
        return rows

    def _host(self) -> list[dict[str, Any]]:
        # A device pool of one request: the prefix leaves it when unrelated requests come, and is copied to host.
        # Host room for the prefix and the fillers' blocks (spilled too): LRU never reaches the prefix.
        host_blocks = (_MAX_FILLERS + 2) * self.per_request
        llm = self.engine(
            "host",
            num_kv_blocks=self.per_request + 8,
            host_cache_gb=host_blocks * self.per_block_bytes() / (1 << 30),
        )
        t, _ = self.request(llm)
        self.engines["host"]["setup_s"] = [t]
        probe = self.prefix + self.ids(self.sizes.suffix)
        fillers = 0
        while llm.engine.explain(probe)["cached_tokens_by_tier"].get("device", 0) and fillers < _MAX_FILLERS:
            llm.generate([self.ids(len(probe))], self.params, namespace=f"filler-{fillers}")
            fillers += 1
        self.engines["host"]["fillers"] = fillers
        self.engines["host"]["explain_after_fillers"] = llm.engine.explain(probe)["cached_tokens_by_tier"]
        rows = self._interleaved(llm, "host", [("host", "host", lambda: self._settle(llm))], reset_cold=True)
        llm.engine.close()
        return rows

    def per_block_bytes(self) -> int:
        return self.kv_bytes_per_token * self.block_size

    def _disk(self) -> list[dict[str, Any]]:
        directory = self.workdir / f"ttft-disk-{self.name}"
        llm = self.engine("disk", num_kv_blocks=2 * self.per_request + 16, disk_cache_dir=str(directory))
        t, _ = self.request(llm)
        self.engines["disk"]["setup_s"] = [t]

        def dropped() -> None:
            self._settle(llm)
            self.drop_method = drop_page_cache(directory)

        rows = self._interleaved(
            llm,
            "disk",
            [("disk (page cache)", "disk", lambda: self._settle(llm)), ("disk (page cache dropped)", "disk", dropped)],
            reset_cold=True,
        )
        for row in rows:
            row["page_cache_drop"] = self.drop_method if "dropped" in row["row"] else None
        llm.engine.close()
        shutil.rmtree(directory, ignore_errors=True)
        return rows

    def _redis(self) -> list[dict[str, Any]]:
        self.redis.flushall()
        llm = self.engine("redis", num_kv_blocks=2 * self.per_request + 16, redis_url=self.redis.url)
        t, _ = self.request(llm)
        self.engines["redis"]["setup_s"] = [t]
        rows = self._interleaved(llm, "redis", [("redis", "redis", lambda: self._settle(llm))], reset_cold=True)
        # The replica case: a second engine on the same Redis, which never computed the prefix.
        other = self.engine("redis (other engine)", num_kv_blocks=2 * self.per_request + 16, redis_url=self.redis.url)
        rows += self._interleaved(
            other,
            "redis (other engine)",
            [("redis from another engine", "redis", lambda: self._settle(other))],
            reset_cold=True,
        )
        other.engine.close()
        llm.engine.close()
        self.redis.flushall()
        return rows


def _compact_tier_stats(stats: dict[str, Any] | None) -> dict[str, Any] | None:
    """The tier counters without the latency histograms (they are long; the medians are what the tables use)."""
    if stats is None:
        return None
    tiers = [{k: v for k, v in t.items() if not k.endswith("_latency")} for t in stats["tiers"]]
    return {**{k: v for k, v in stats.items() if k != "tiers"}, "tiers": tiers}


def ttft_section(models: Sequence[str], sizes: Sizes, redis: RedisProcess, workdir: Path) -> dict[str, Any]:
    out: dict[str, Any] = {
        "targets": TTFT_TARGETS,
        "load_policy": "always",
        "read_timeout_s": READ_TIMEOUT_S,
        "models": {},
    }
    for name in models:
        started = time.perf_counter()
        result = _TTFTModel(name, sizes, redis, workdir).run()
        result["wall_s"] = time.perf_counter() - started
        out["models"][name] = result
        print(f"[tier_bench] ttft {name}: {result['wall_s']:.0f} s", file=sys.stderr, flush=True)
    return out


# ---- section 2: bandwidth -----------------------------------------------------------------------------------------
def _entries(layout: Any, n: int, seed: int, kv: torch.Tensor) -> list[Any]:
    """``n`` chained blocks (real addresses) sharing one KV tensor per position of ``kv`` (content is irrelevant to
    the byte counts; the hashes differ per ``seed``, so every round writes new entries)."""
    from promptcache.cache.hashing import block_hash, root_hash
    from promptcache.cache.tiers.base import BlockEntry

    parent = root_hash(layout.fingerprint, layout.dtype_name, f"bandwidth-{seed}")
    out = []
    for i in range(n):
        tokens = tuple(range(i * layout.block_size, (i + 1) * layout.block_size))
        h = block_hash(parent, tokens)
        out.append(BlockEntry(h, parent, tokens, kv[i]))
        parent = h
    return out


def _tier_rounds(
    tier: Any, layout: Any, kv: torch.Tensor, rounds: int, before_read: Callable[[], None] | None = None
) -> dict[str, Any]:
    """Write then read ``len(kv)`` blocks through a tier, ``rounds`` times; reads copy each block into a
    device-pool-shaped buffer, as ``TierStack.load_into`` does (a host load alone returns views)."""
    n = kv.shape[0]
    nbytes = n * layout.nbytes
    dst = torch.empty_like(kv)
    writes, reads, cold_reads = [], [], []
    for r in range(rounds):
        entries = _entries(layout, n, r, kv)
        start = time.perf_counter()
        for i in range(0, n, 32):  # the writer thread's batches: one step's blocks
            assert tier.store(entries[i : i + 32]) == len(entries[i : i + 32])
        writes.append(time.perf_counter() - start)
        hashes = [e.block_hash for e in entries]

        def read(hashes: list[bytes] = hashes) -> float:
            start = time.perf_counter()
            for i in range(0, n, 128):  # one load per 2,048-token run, as an admission does
                for j, got in enumerate(tier.load(hashes[i : i + 128])):
                    assert got is not None, "a block just stored did not load"
                    dst[i + j].copy_(got)
            return time.perf_counter() - start

        reads.append(read())
        if before_read is not None:
            before_read()
            cold_reads.append(read())
        tier.clear()
    out = {
        "blocks": n,
        "bytes": nbytes,
        "write_s": writes,
        "read_s": reads,
        "write_gb_s": nbytes / _median(writes) / GB,
        "read_gb_s": nbytes / _median(reads) / GB,
    }
    if cold_reads:
        out["read_cold_s"] = cold_reads
        out["read_cold_gb_s"] = nbytes / _median(cold_reads) / GB
    return out


def _dd(directory: Path, bs: int, count: int) -> dict[str, Any]:
    """dd of the same bytes to and from ``directory``: page-cache write, fdatasync write, warm and cold reads."""
    target = directory / "dd.bin"
    nbytes = bs * count

    def timed(cmd: list[str]) -> float:
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, timeout=300)
        return time.perf_counter() - start

    out: dict[str, Any] = {"bs": bs, "count": count}
    base = ["dd", "if=/dev/zero", f"of={target}", f"bs={bs}", f"count={count}"]
    out["write_s"] = timed(base)
    out["write_fdatasync_s"] = timed([*base, "conv=fdatasync"])
    read = ["dd", f"if={target}", "of=/dev/null", f"bs={bs}"]
    out["read_warm_s"] = timed(read)
    out["page_cache_drop"] = drop_page_cache(directory)
    out["read_cold_s"] = timed(read)
    for key in ("write", "write_fdatasync", "read_warm", "read_cold"):
        out[f"{key}_gb_s"] = nbytes / out[f"{key}_s"] / GB
    target.unlink(missing_ok=True)
    return out


def _redis_benchmark(port: int, entry_bytes: int, n: int) -> dict[str, Any]:
    """``redis-benchmark`` SET / GET of values of one entry's size, pipelined 16 deep; rps x bytes = GB/s."""
    binary = shutil.which("redis-benchmark")
    if binary is None:
        return {"error": "redis-benchmark is not installed"}
    # -c 4, not the default 50: 50 clients x 16 pipelined 737 KB values keep ~1 GB in flight (client and server
    # buffers), and 4 x 16 already keep the single-threaded server busy (50 clients measured slower here).
    cmd = [binary, "-p", str(port), "-t", "set,get", "-d", str(entry_bytes), "-n", str(n), "-P", "16", "-c", "4", "-q"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    found = dict(re.findall(r"(SET|GET): ([\d.]+) requests per second", done.stdout))
    out: dict[str, Any] = {"command": shlex.join(["redis-benchmark", *cmd[1:]])}
    for op in ("SET", "GET"):
        if op in found:
            rps = float(found[op])
            out[f"{op.lower()}_rps"] = rps
            out[f"{op.lower()}_gb_s"] = rps * entry_bytes / GB
    return out


def bandwidth_section(sizes: Sizes, redis: RedisProcess, workdir: Path) -> dict[str, Any]:
    from promptcache.cache.tiers import format as kvformat
    from promptcache.cache.tiers.base import KVLayout
    from promptcache.cache.tiers.disk import DiskTier
    from promptcache.cache.tiers.host import HostTier
    from promptcache.cache.tiers.redis_tier import RedisTier

    layout = KVLayout("tier-bench-smollm2-shaped", torch.float32, SMOLLM2_BLOCK_SHAPE, SMOLLM2_BLOCK_SHAPE[2])
    n, rounds = sizes.bandwidth_blocks, sizes.bandwidth_rounds
    gen = torch.Generator().manual_seed(0)
    kv = torch.randn((n, *layout.shape), generator=gen)
    nbytes = n * layout.nbytes
    entry_bytes = len(kvformat.encode(_entries(layout, 1, 0, kv)[0], layout))
    out: dict[str, Any] = {
        "block_shape": list(layout.shape),
        "block_bytes": layout.nbytes,
        "entry_bytes": entry_bytes,
        "blocks": n,
        "bytes": nbytes,
        "gb": "1e9 bytes",
    }
    # The machine: a torch copy of the same bytes (read + write of each byte, as a tier load's copy is).
    dst = torch.empty_like(kv)
    dst.copy_(kv)  # first touch of the destination's pages, not measured
    copies = []
    for _ in range(5):
        start = time.perf_counter()
        dst.copy_(kv)
        copies.append(time.perf_counter() - start)
    out["torch_copy"] = {"s": copies, "gb_s": nbytes / _median(copies) / GB}
    del dst
    host = HostTier(layout, nbytes)
    out["host"] = _tier_rounds(host, layout, kv, rounds)
    host.close()
    del host
    directory = workdir / "bandwidth-disk"
    disk = DiskTier(layout, directory, 4 * nbytes)
    drops: list[str] = []
    out["disk"] = _tier_rounds(disk, layout, kv, rounds, before_read=lambda: drops.append(drop_page_cache(directory)))
    out["disk"]["page_cache_drop"] = drops[-1]
    out["dd"] = _dd(directory, layout.nbytes, n)
    shutil.rmtree(directory, ignore_errors=True)
    redis.flushall()
    tier = RedisTier(layout, redis.url, timeout=READ_TIMEOUT_S)
    # Redis memory per cached token: used_memory before and after one round's entries are stored.
    before = redis.used_memory()
    entries = _entries(layout, n, 99, kv)
    for i in range(0, n, 32):
        tier.store(entries[i : i + 32])
    stored = redis.dbsize()
    after = redis.used_memory()
    tier.clear()
    out["redis_memory"] = {
        "entries": stored,
        "used_memory_delta": after - before,
        "bytes_per_token": (after - before) / (stored * layout.block_size) if stored else None,
        "kv_bytes_per_token": layout.nbytes // layout.block_size,
        "entry_bytes_per_token": entry_bytes / layout.block_size,
    }
    out["redis"] = _tier_rounds(tier, layout, kv, rounds)
    tier.close()
    redis.flushall()
    out["redis_benchmark"] = _redis_benchmark(redis.port, entry_bytes, max(n, 256))
    redis.flushall()
    return out


# ---- sections 3-5: workloads, restart, memory (each configuration in a fresh process) ------------------------------
def replay_workload(llm: Any, spec: WorkloadSpec) -> tuple[list[RequestOutput], list[int]]:
    """Every request of the workload in arrival order through ``LLM.chat`` (greedy); each answer goes into the
    session's next request, and ``LLM`` replays its token ids exactly. Returns the outputs and each request's
    ``max_tokens``."""
    from promptcache.bench.workloads import make_workload, request_messages

    name, quick, overrides = spec
    workload = make_workload(name, quick=quick, seed=0, **overrides)
    answers: dict[int, list[str]] = {}
    outs, max_tokens = [], []
    for s, k in workload.order:
        session = workload.sessions[s]
        messages = request_messages(session, k, answers.get(s, []))
        params = SamplingParams(temperature=0.0, max_tokens=session.steps[k].max_tokens)
        out = llm.chat(messages, params, tools=session.tools)[0]
        answers.setdefault(s, []).append(out.text)
        outs.append(out)
        max_tokens.append(params.max_tokens)
    return outs, max_tokens


def _summary(replayed: tuple[list[RequestOutput], list[int]], block_size: int) -> dict[str, Any]:
    outs, max_tokens = replayed
    by_tier: dict[str, int] = {}
    for o in outs:
        for tier, n in o.cached_tokens_by_tier.items():
            by_tier[tier] = by_tier.get(tier, 0) + n
    return {
        "requests": len(outs),
        "prompt_tokens": sum(len(o.prompt_token_ids) for o in outs),
        "cached_tokens": sum(o.num_cached_tokens for o in outs),
        "cached_tokens_by_tier": by_tier,
        "outputs": [list(o.token_ids) for o in outs],
        "cached_per_request": [o.num_cached_tokens for o in outs],
        # What the engine reserves for the largest request: its prompt plus max_tokens.
        "largest_request_blocks": max(
            -(-(len(o.prompt_token_ids) + m) // block_size) for o, m in zip(outs, max_tokens)
        ),
    }


def run_config(spec: dict[str, Any]) -> dict[str, Any]:
    """One workload under one engine configuration (run in a fresh process: its RSS figures are its own).

    ``spec``: ``model`` (path), ``workload`` (a WorkloadSpec), ``engine`` (LLM keyword arguments), optionally
    ``sample_dir`` (a directory whose size is sampled with RSS) and ``restart`` ("none", "replay kept", "replay
    lost": after the pass, close the engine, open a new one with the same arguments, run the workload again).
    """
    torch.manual_seed(0)
    name, quick, overrides = spec["workload"]  # a list once it has been through JSON
    spec = {**spec, "workload": (name, quick, overrides)}
    proc = psutil.Process()
    started = time.perf_counter()
    llm = make_llm(Path(spec["model"]), **spec["engine"])
    load_s = time.perf_counter() - started
    rss_after_load = proc.memory_info().rss
    sample_dir = Path(spec["sample_dir"]) if spec.get("sample_dir") else None
    with Sampler(sample_dir) as sampler:
        started = time.perf_counter()
        replayed = replay_workload(llm, spec["workload"])
        wall = time.perf_counter() - started
    engine = llm.engine
    result: dict[str, Any] = {
        "load_s": load_s,
        "wall_s": wall,
        **_summary(replayed, engine.kv.block_size),
        "cache_stats": {k: v for k, v in engine.cache_stats().items() if k != "hit_tokens_by_tier"},
        "kv_pool_bytes": engine.runner.kv_cache_bytes,
        "block_bytes": block_bytes(llm),
        "rss_after_load": rss_after_load,
        "max_rss": sampler.max_rss,
        "rss_samples": sampler.samples,
        "loadavg_after": os.getloadavg(),
    }
    if sample_dir is not None:
        result["max_dir_bytes"] = sampler.max_dir
        result["max_dir_bytes_raw"] = sampler.max_dir_raw
        result["dir_samples"] = sampler.dir_samples
    if engine.tiers is not None:
        engine.tiers.flush()
        result["tier_stats"] = _compact_tier_stats(engine.tier_stats())
        result["integrity"] = engine.check_integrity(deep=True)
        result["host_budget_bytes"] = sum(
            int(t["capacity_bytes"]) for t in result["tier_stats"]["tiers"] if t["tier"] == "host"
        )  # fmt: skip
    if sample_dir is not None:
        result["final_dir_bytes"] = dir_bytes(sample_dir)
    restart = spec.get("restart")
    if restart:
        # Pass 2 without a restart (same engine), then pass 2 after one (a new engine on the same directory).
        result["second_pass_same_engine"] = _summary(replay_workload(llm, spec["workload"]), engine.kv.block_size)
        replay = llm.replay
        engine.close()
        del llm, engine
        for mode in ("replay kept", "replay lost"):
            again = make_llm(Path(spec["model"]), **spec["engine"])
            if mode == "replay kept":
                # The answers' token ids as the first engine generated them: isolates what the disk tier kept.
                again.replay = replay
            key = f"second_pass_after_restart_{mode.replace(' ', '_')}"
            result[key] = _summary(replay_workload(again, spec["workload"]), again.engine.kv.block_size)
            result[key]["integrity"] = again.engine.check_integrity(deep=True)
            again.engine.close()
            del again
    else:
        engine.close()
    return result


def _in_fresh_process(spec: dict[str, Any]) -> dict[str, Any]:
    """``run_config(spec)`` in a new interpreter (``--run-config``): nothing of this process's memory is in its
    RSS, and no caller's ``__main__`` is re-run (as multiprocessing's spawn would)."""
    with tempfile.TemporaryDirectory(prefix="tier-bench-config-") as tmp:
        spec_file, out_file = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_file.write_text(json.dumps(spec))
        cmd = [sys.executable, "-m", "promptcache.bench.tier_bench", "--run-config", str(spec_file), str(out_file)]
        subprocess.run(cmd, check=True, cwd=REPO_ROOT)
        return json.loads(out_file.read_text())


def _workload_label(spec: WorkloadSpec) -> str:
    name, quick, overrides = spec
    extra = ", ".join(f"{k}={v}" for k, v in overrides.items())
    return f"{name} ({'quick' if quick else 'full'} sizes{', ' + extra if extra else ''})"


def workloads_section(
    models: Sequence[str], sizes: Sizes, redis: RedisProcess, workdir: Path
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Section 3 (and the workload parts of section 5): returns (workloads, memory) objects."""
    results: dict[str, Any] = {"target_share": CACHE_SHARE_TARGET, "load_policy": "always", "runs": []}
    memory: dict[str, Any] = {}
    for model in models:
        path, _ = model_path(model)
        for wl in sizes.workloads.get(model, []):
            started = time.perf_counter()
            base = {"model": str(path), "workload": wl}
            # (a) unbounded: room for every block the workload writes (checked: no eviction).
            a = _in_fresh_process({**base, "engine": {"num_kv_blocks": 16384 if model == "default" else 4096}})
            if a["cache_stats"]["evictions"]:
                raise RuntimeError(f"the unbounded run of {wl} evicted {a['cache_stats']['evictions']} blocks")
            working_set = int(a["cache_stats"]["registered_blocks"])
            # The device pool must hold the largest request (the engine refuses a request it cannot hold).
            device = max(math.ceil(working_set / 10), a["largest_request_blocks"] + 2)
            host_gb = device * a["block_bytes"] / (1 << 30)
            always = {"tier_load_policy": "always", "tier_read_timeout": READ_TIMEOUT_S}
            disk_dir = workdir / f"workload-disk-{model}-{wl[0]}"
            configs: list[tuple[str, dict[str, Any]]] = [
                ("(b) device 1/10", {"engine": {"num_kv_blocks": device}}),
                (
                    "(c) device 1/10 + host 1/10 + disk",
                    {
                        "engine": {
                            "num_kv_blocks": device,
                            "host_cache_gb": host_gb,
                            "disk_cache_dir": str(disk_dir),
                            "disk_cache_gb": 64.0,
                            **always,
                        }
                    },
                ),
                ("(d) device 1/10 + Redis", {"engine": {"num_kv_blocks": device, "redis_url": redis.url, **always}}),
                # Diagnostic: (c) without its host tier, to tell the disk's share from the host's.
                (
                    "(e) device 1/10 + disk (no host)",
                    {
                        "engine": {
                            "num_kv_blocks": device,
                            "disk_cache_dir": str(disk_dir),
                            "disk_cache_gb": 64.0,
                            **always,
                        }
                    },
                ),
            ]
            runs: dict[str, Any] = {"(a) unbounded device": a}
            for label, cfg in configs:
                if "Redis" in label:
                    redis.flushall()
                    before = redis.used_memory()
                runs[label] = _in_fresh_process({**base, **cfg})
                if "Redis" in label:
                    entries = redis.dbsize()
                    delta = redis.used_memory() - before
                    runs[label]["redis_memory"] = {
                        "entries": entries,
                        "used_memory_delta": delta,
                        "bytes_per_token": delta / (entries * 16) if entries else None,
                        "kv_bytes_per_token": a["block_bytes"] // 16,
                    }
                    redis.flushall()
                shutil.rmtree(disk_dir, ignore_errors=True)
            if model == "default" and wl[0] == "pressure":
                # Section 5: (c) again with a disk budget of half the working set, the directory's size sampled.
                disk_gb = working_set * a["block_bytes"] / 2 / (1 << 30)
                budget = int(disk_gb * (1 << 30))  # as the engine computes it
                cfg = configs[1][1]["engine"]
                runs["(c) with disk budget 1/2"] = _in_fresh_process(
                    {
                        **base,
                        "engine": {**cfg, "disk_cache_gb": disk_gb},
                        "sample_dir": str(disk_dir),
                    }
                )
                shutil.rmtree(disk_dir, ignore_errors=True)
                memory["workload"] = _label_run(model, wl)
                memory["device_blocks"] = device
                control = _rss(runs["(b) device 1/10"])
                memory["rss"] = {"(b) device 1/10": control}
                for label in ("(c) device 1/10 + host 1/10 + disk", "(c) with disk budget 1/2"):
                    memory["rss"][label] = _rss(runs[label], control)
                budgeted = runs["(c) with disk budget 1/2"]
                memory["disk"] = {
                    "budget_bytes": budget,
                    "working_set_bytes": working_set * a["block_bytes"],
                    "max_dir_bytes": budgeted["max_dir_bytes"],
                    "max_dir_bytes_raw": budgeted["max_dir_bytes_raw"],
                    "final_dir_bytes": budgeted["final_dir_bytes"],
                    "samples": budgeted["dir_samples"],
                    "sampler_ticks": budgeted["rss_samples"],
                    "evictions": next(t["evictions"] for t in budgeted["tier_stats"]["tiers"] if t["tier"] == "disk"),
                    "never_above_budget": budgeted["max_dir_bytes"] <= budget,
                }
                memory["redis_embedded"] = runs["(d) device 1/10 + Redis"]["redis_memory"]
            results["runs"].append(_workload_rows(model, wl, working_set, device, runs))
            wall = time.perf_counter() - started
            results["runs"][-1]["wall_s"] = wall
            print(f"[tier_bench] workload {model} {wl[0]}: {wall:.0f} s", file=sys.stderr, flush=True)
    return results, memory


def _label_run(model: str, wl: WorkloadSpec) -> str:
    return f"{_workload_label(wl)} on {model}"


def _rss(run: dict[str, Any], control: dict[str, Any] | None = None) -> dict[str, Any]:
    """Peak RSS growth over the run (peak - RSS right after the model loaded) against device pool + host budget;
    with ``control`` (the same workload without tiers) also the growth beyond the control's against the host
    budget: what the tiers themselves added."""
    growth = run["max_rss"] - run["rss_after_load"]
    budget = run["kv_pool_bytes"] + run.get("host_budget_bytes", 0)
    out = {
        "rss_after_load": run["rss_after_load"],
        "max_rss": run["max_rss"],
        "growth": growth,
        "device_pool_bytes": run["kv_pool_bytes"],
        "host_budget_bytes": run.get("host_budget_bytes", 0),
        "device_pool_plus_host_bytes": budget,
        "growth_over_budget": growth / budget,
        "samples": run["rss_samples"],
    }
    if control is not None:
        out["growth_beyond_control"] = growth - control["growth"]
        out["beyond_control_over_host_budget"] = (growth - control["growth"]) / max(1, out["host_budget_bytes"])
    return out


# The configurations that the >= 0.99 target is for (not the one whose disk budget is below the working set).
_TARGET_CONFIGS = ("(c) device 1/10 + host 1/10 + disk", "(d) device 1/10 + Redis", "(e) device 1/10 + disk (no host)")


def _workload_rows(model: str, wl: WorkloadSpec, working_set: int, device: int, runs: dict[str, Any]) -> dict[str, Any]:
    a = runs["(a) unbounded device"]
    rows = []
    for label, run in runs.items():
        mismatches = sum(x != y for x, y in zip(run["outputs"], a["outputs"]))
        share = run["cached_tokens"] / a["cached_tokens"] if a["cached_tokens"] else 1.0
        with_tiers = label in _TARGET_CONFIGS
        rows.append(
            {
                "config": label,
                "cached_tokens": run["cached_tokens"],
                "over_unbounded": share,
                "cached_tokens_by_tier": run["cached_tokens_by_tier"],
                "output_mismatches": mismatches,
                "distinct_output_tokens": len({t for o in run["outputs"] for t in o}),
                "target": CACHE_SHARE_TARGET if with_tiers else None,
                "met": (share >= CACHE_SHARE_TARGET and mismatches == 0) if with_tiers else None,
                "integrity": run.get("integrity"),
                "wall_s": run["wall_s"],
                "dropped_writes": (run.get("tier_stats") or {}).get("dropped_writes"),
                "tier_errors": {t["tier"]: t["errors"] for t in (run.get("tier_stats") or {}).get("tiers", [])},
                "prompt_tokens": run["prompt_tokens"],
            }
        )
    return {
        "model": model,
        "workload": _workload_label(wl),
        "requests": a["requests"],
        "working_set_blocks": working_set,
        "device_blocks": device,
        "device_floor_applied": device != math.ceil(working_set / 10),
        "host_blocks": device,
        "rows": rows,
        "raw": {label: {k: v for k, v in run.items() if k != "outputs"} for label, run in runs.items()},
    }


def restart_section(sizes: Sizes, workdir: Path) -> dict[str, Any]:
    """Section 4: the chat workload with a disk tier, second pass on the same engine vs after a restart."""
    assert sizes.restart is not None
    path, _ = model_path("default")
    directory = workdir / "restart-disk"
    spec = {
        "model": str(path),
        "workload": sizes.restart,
        # An unbounded device pool: the second pass on the same engine is served by the device alone, so after a
        # restart it shows exactly what the disk kept.
        "engine": {"num_kv_blocks": 16384, "disk_cache_dir": str(directory), "tier_load_policy": "always"},
        "restart": True,
    }
    started = time.perf_counter()
    run = _in_fresh_process(spec)
    shutil.rmtree(directory, ignore_errors=True)
    same = run["second_pass_same_engine"]
    out: dict[str, Any] = {
        "workload": _label_run("default", sizes.restart),
        "target": CACHE_SHARE_TARGET,
        "first_pass_cached_tokens": run["cached_tokens"],
        "second_pass_same_engine": {k: v for k, v in same.items() if k != "outputs"},
    }
    for mode in ("replay_kept", "replay_lost"):
        after = run[f"second_pass_after_restart_{mode}"]
        ratio = after["cached_tokens"] / same["cached_tokens"] if same["cached_tokens"] else 1.0
        out[f"after_restart_{mode}"] = {
            **{k: v for k, v in after.items() if k != "outputs"},
            "over_same_engine": ratio,
            "output_mismatches": sum(x != y for x, y in zip(after["outputs"], same["outputs"])),
            "met": ratio >= CACHE_SHARE_TARGET,
        }
    out["wall_s"] = time.perf_counter() - started
    return out


# ---- section 6: worth loading -------------------------------------------------------------------------------------
def worth_loading(ttft: dict[str, Any]) -> dict[str, Any]:
    """Per model and tier row: seconds to load a block vs to recompute it, from section 1's medians.

    load = (TTFT served from the tier - TTFT of the same engine's device hit) / prefix blocks: lookup, read, verify
    and copy into the pool. recompute = (TTFT cold - that device hit) / prefix blocks: the prefill of the same tokens.
    Loading wins when load < recompute; the break-even bandwidth is block bytes / recompute seconds.
    """
    out: dict[str, Any] = {"models": {}}
    for name, m in ttft["models"].items():
        blocks = m["prefix_tokens"] // 16
        rows = []
        for r in m["rows"]:
            if r["tier"] == "device":
                continue
            engine = m["engines"][r["engine"]]
            est = engine.get("tier_stats") or {}
            tier_est = next((t for t in est.get("tiers", []) if t["tier"] == r["tier"]), {})
            load = (r["tier_s"] - r["device_s"]) / blocks
            recompute = (r["cold_s"] - r["device_s"]) / blocks
            per_token = est.get("recompute_seconds_per_token")
            est_load = tier_est.get("load_seconds_per_block")
            est_recompute = per_token * 16 if per_token else None
            rows.append(
                {
                    "row": r["row"],
                    "tier": r["tier"],
                    "load_s_per_block": load,
                    "recompute_s_per_block": recompute,
                    "recompute_over_load": recompute / load if load > 0 else float("inf"),
                    "break_even_gb_s": m["block_bytes"] / recompute / GB,
                    "tier_effective_gb_s": m["block_bytes"] / load / GB if load > 0 else float("inf"),
                    "engine_load_s_per_block": est_load,
                    "engine_recompute_s_per_block": est_recompute,
                    "auto_would_load": None if est_load is None or est_recompute is None else est_load < est_recompute,
                }
            )
        out["models"][name] = {"block_bytes": m["block_bytes"], "rows": rows}
    return out


def tier_load_costs(layout: Any, blocks: int = 64, redis_url: str | None = None) -> dict[str, float]:
    """Seconds to load one block (read, verify, copy into a pool-shaped buffer) from each tier, through the tier
    classes, ``blocks`` blocks per load call; a temporary directory for disk, Redis only when ``redis_url``."""
    from promptcache.cache.tiers.disk import DiskTier
    from promptcache.cache.tiers.host import HostTier
    from promptcache.cache.tiers.redis_tier import RedisTier

    kv = torch.randn((blocks, *layout.shape), generator=torch.Generator().manual_seed(0)).to(layout.dtype)
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="pc-tier-costs-") as tmp:
        makers: dict[str, Callable[[], Any]] = {
            "host": lambda: HostTier(layout, blocks * layout.nbytes),
            "disk": lambda: DiskTier(layout, tmp, 2 * blocks * layout.nbytes),
        }
        if redis_url:
            makers["redis"] = lambda: RedisTier(layout, redis_url, timeout=READ_TIMEOUT_S)
        for name, make in makers.items():
            tier = make()
            got = _tier_rounds(tier, layout, kv, 3)
            out[name] = _median(got["read_s"]) / blocks
            tier.close()
    return out


def disk_budget_exact(workdir: Path, entries: int = 300, budget_entries: int = 100) -> dict[str, Any]:
    """The disk tier's directory measured after every store, with nothing else writing (exact, unlike a walk during
    a run): ``entries`` blocks of the embedded model's shape stored one by one under a budget of
    ``budget_entries``."""
    from promptcache.cache.tiers.base import KVLayout
    from promptcache.cache.tiers.disk import DiskTier

    layout = KVLayout("tier-bench-budget", torch.float32, (4, 2, 16, 2, 32), 16)
    kv = torch.randn((entries, *layout.shape), generator=torch.Generator().manual_seed(0))
    directory = workdir / "disk-budget"
    budget = budget_entries * (layout.nbytes + 512)
    tier = DiskTier(layout, directory, budget)
    worst = 0
    for e in _entries(layout, entries, 0, kv):
        tier.store([e])
        worst = max(worst, dir_bytes(directory))
    problems = tier.check_integrity(deep=True)
    shutil.rmtree(directory, ignore_errors=True)
    return {
        "entries_stored": entries,
        "budget_bytes": budget,
        "max_dir_bytes": worst,
        "never_above_budget": worst <= budget,
        "integrity": problems,
    }


def calibrate_tiers(
    model: str | None, dtype: str, prefill_s_per_token: float, redis_url: str | None = None, blocks: int = 64
) -> dict[str, Any]:
    """``promptcache calibrate --tiers``: per tier, seconds to load one block of this model (through the tier
    classes) against seconds to recompute it (``prefill_s_per_token`` x block size), and whether loading wins."""
    from promptcache.cache.tiers.base import KVLayout
    from promptcache.engine.engine import DTYPES
    from promptcache.model.source import resolve_model

    cfg = resolve_model(model, quiet=True).config()
    block_size = 16
    layout = KVLayout("calibrate", DTYPES[dtype], (cfg.num_layers, 2, block_size, cfg.num_kv_heads, cfg.head_dim), 16)
    recompute = prefill_s_per_token * block_size
    rows = {}
    for tier, load in tier_load_costs(layout, blocks, redis_url).items():
        rows[tier] = {
            "load_s_per_block": load,
            "recompute_s_per_block": recompute,
            "recompute_over_load": recompute / load if load > 0 else float("inf"),
            "worth_loading": load < recompute,
        }
    return {"block_bytes": layout.nbytes, "blocks_per_load": blocks, "tiers": rows}


def tiers_table(result: dict[str, Any]) -> str:
    """``calibrate_tiers``'s result as a Markdown table."""
    lines = [
        f"Loading a block ({result['block_bytes']:,} bytes) from a tier vs recomputing it",
        "",
        "| tier | load | recompute | recompute / load | worth loading |",
        "|---|---|---|---|---|",
    ]
    for tier, r in result["tiers"].items():
        lines.append(
            f"| {tier} | {_ms(r['load_s_per_block'])} | {_ms(r['recompute_s_per_block'])} | "
            f"{r['recompute_over_load']:.1f}x | {'yes' if r['worth_loading'] else 'no'} |"
        )
    return "\n".join(lines)


# ---- the run and its tables ---------------------------------------------------------------------------------------
def run(
    models: Sequence[str],
    sizes: Sizes,
    workdir: Path | None = None,
    sections: Sequence[str] = SECTIONS,
    command: str | None = None,
) -> dict[str, Any]:
    """Every requested section; the temporary directory and the redis-server are removed at the end."""
    started = time.perf_counter()
    own = workdir is None
    base = workdir or default_workdir()
    work = base if own else Path(tempfile.mkdtemp(prefix="tier-bench-", dir=base))
    results: dict[str, Any] = {
        "command": command or shlex.join(["python", "-m", "promptcache.bench.tier_bench", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "machine": machine_info(),
        "workdir": str(base),
        "models": list(models),
        "sizes": asdict(sizes),
        "sections": list(sections),
    }
    try:
        with RedisProcess(work / "redis") as redis:
            results["redis_port"] = redis.port
            if "ttft" in sections:
                results["ttft_by_tier"] = ttft_section(models, sizes, redis, work)
                results["worth_loading"] = worth_loading(results["ttft_by_tier"])
            if "bandwidth" in sections:
                t = time.perf_counter()
                results["bandwidth"] = bandwidth_section(sizes, redis, work)
                print(f"[tier_bench] bandwidth: {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
            memory: dict[str, Any] = {}
            if "workloads" in sections:
                results["workloads"], memory = workloads_section(models, sizes, redis, work)
            if "restart" in sections and sizes.restart is not None:
                t = time.perf_counter()
                results["restart"] = restart_section(sizes, work)
                print(f"[tier_bench] restart: {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
            if "workloads" in sections:
                memory["disk_exact"] = disk_budget_exact(work)
            if "bandwidth" in sections:
                memory["redis_smollm2_shaped"] = results["bandwidth"]["redis_memory"]
            if memory:
                results["memory"] = memory
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results["machine"]["loadavg_at_end"] = os.getloadavg()
    results["wall_s"] = time.perf_counter() - started
    return results


def _ms(s: float) -> str:
    """Seconds as people read them: 0.42 s, 12.3 ms, 85 µs."""
    if abs(s) >= 1:
        return f"{s:,.2f} s"
    return f"{s * 1e3:.3g} ms" if abs(s) >= 1e-3 else f"{s * 1e6:.3g} µs"


def _met(met: bool | None) -> str:
    return "-" if met is None else ("**met**" if met else "missed")


def markdown(results: dict[str, Any]) -> str:
    """Every section present in ``results`` as Markdown tables."""
    out: list[str] = []
    if "ttft_by_tier" in results:
        t = results["ttft_by_tier"]
        out += [f"### 1. TTFT by tier (load policy {t['load_policy']!r}, read deadline {t['read_timeout_s']:g} s)", ""]
        out += ["| model | served from | cold TTFT | served TTFT | cold / served | same engine only | target | met | "
                "served as claimed | loads over the default deadline |"]  # fmt: skip
        out += ["|---|---|---|---|---|---|---|---|---|---|"]
        for name, m in t["models"].items():
            for r in m["rows"]:
                target = f">= {r['target']:g}x" if r["target"] else "-"
                late = "-" if r["tier"] == "device" else f"{r['over_default_deadline']} / {len(r['tier_samples_s'])}"
                out.append(
                    f"| {name} | {r['row']} | {_ms(r['cold_s'])} | {_ms(r['tier_s'])} | {r['cold_over_tier']:.1f}x | "
                    f"{r['cold_over_tier_same_engine']:.1f}x | {target} | {_met(r['met'])} | "
                    f"{'yes' if r['served_as_claimed'] else 'NO'} | {late} |"
                )
        out.append("")
    if "bandwidth" in results:
        b = results["bandwidth"]
        dd, rb = b["dd"], b["redis_benchmark"]
        out += [f"### 2. Tier bandwidth ({b['blocks']} blocks of {b['block_bytes']:,} bytes, GB/s)", ""]
        out += ["| path | write | read | the machine, same bytes | write | read |", "|---|---|---|---|---|---|"]
        h, d, r = b["host"], b["disk"], b["redis"]
        out.append(
            f"| host tier | {h['write_gb_s']:.2f} | {h['read_gb_s']:.2f} | torch copy | "
            f"{b['torch_copy']['gb_s']:.2f} | {b['torch_copy']['gb_s']:.2f} |"
        )
        out.append(
            f"| disk tier (page cache) | {d['write_gb_s']:.2f} | {d['read_gb_s']:.2f} | dd (page cache) | "
            f"{dd['write_gb_s']:.2f} | {dd['read_warm_gb_s']:.2f} |"
        )
        out.append(
            f"| disk tier (cache dropped: {d.get('page_cache_drop', '-')}) | - | {d.get('read_cold_gb_s', 0):.2f} | "
            f"dd (fdatasync / cache dropped) | {dd['write_fdatasync_gb_s']:.2f} | {dd['read_cold_gb_s']:.2f} |"
        )
        out.append(
            f"| Redis tier | {r['write_gb_s']:.2f} | {r['read_gb_s']:.2f} | redis-benchmark SET / GET | "
            f"{rb.get('set_gb_s', float('nan')):.2f} | {rb.get('get_gb_s', float('nan')):.2f} |"
        )
        out.append("")
    if "workloads" in results:
        out += ["### 3. Workloads, device pool at 1/10 of the working set", ""]
        out += ["| model | workload | config | tokens from cache | / unbounded | device | host | disk | redis | "
                "output mismatches | met |"]  # fmt: skip
        out += ["|---|---|---|---|---|---|---|---|---|---|---|"]
        for w in results["workloads"]["runs"]:
            for r in w["rows"]:
                t = r["cached_tokens_by_tier"]
                cells = [t.get(k, 0) for k in ("device", "host", "disk", "redis")]
                out.append(
                    f"| {w['model']} | {w['workload']} | {r['config']} | {r['cached_tokens']:,} | "
                    f"{r['over_unbounded']:.3f} | " + " | ".join(f"{c:,}" for c in cells) + f" | "
                    f"{r['output_mismatches']} / {w['requests']} | {_met(r['met'])} |"
                )
        out.append("")
    if "restart" in results:
        r = results["restart"]
        out += ["### 4. Restart (disk tier)", ""]
        out += [
            "| second pass | tokens from cache | / same engine | output mismatches | met |",
            "|---|---|---|---|---|",
        ]
        out.append(f"| same engine (no restart) | {r['second_pass_same_engine']['cached_tokens']:,} | 1.000 | - | - |")
        for mode, label in (("replay_kept", "after restart, answers' ids kept"),
                            ("replay_lost", "after restart, replay store lost")):  # fmt: skip
            x = r[f"after_restart_{mode}"]
            out.append(
                f"| {label} | {x['cached_tokens']:,} | {x['over_same_engine']:.3f} | {x['output_mismatches']} | "
                f"{_met(x['met'])} |"
            )
        out.append("")
    if "memory" in results:
        mem = results["memory"]
        out += ["### 5. Memory", ""]
        out += ["| figure | measured | reference | ratio | target | met |", "|---|---|---|---|---|---|"]
        for label, x in mem.get("rss", {}).items():
            ok = None if "growth_beyond_control" not in x else x["growth_over_budget"] <= RSS_TARGET
            out.append(
                f"| peak RSS - RSS after load, {label} | {x['growth'] / 2**20:,.1f} MiB | device pool + host "
                f"{x['device_pool_plus_host_bytes'] / 2**20:,.1f} MiB | {x['growth_over_budget']:.2f}x | "
                f"{'<= 1.10x' if ok is not None else 'control'} | {_met(ok)} |"
            )
            if "growth_beyond_control" in x:
                out.append(
                    f"| the same, beyond the control (b) | {x['growth_beyond_control'] / 2**20:,.1f} MiB | host budget "
                    f"{x['host_budget_bytes'] / 2**20:,.1f} MiB | {x['beyond_control_over_host_budget']:.2f}x | - | - |"
                )
        if "disk" in mem:
            d = mem["disk"]
            out.append(
                f"| disk directory during (c) with budget 1/2, max of {d['samples']} consistent samples | "
                f"{d['max_dir_bytes'] / 2**20:,.2f} MiB | budget {d['budget_bytes'] / 2**20:,.2f} MiB | "
                f"{d['max_dir_bytes'] / d['budget_bytes']:.3f}x | <= 1.0x | {_met(d['never_above_budget'])} |"
            )
            out.append(
                f"| the same, max of every walk (not snapshots) | {d['max_dir_bytes_raw'] / 2**20:,.2f} MiB | budget "
                f"{d['budget_bytes'] / 2**20:,.2f} MiB | {d['max_dir_bytes_raw'] / d['budget_bytes']:.3f}x | - | - |"
            )
        if "disk_exact" in mem:
            d = mem["disk_exact"]
            out.append(
                f"| disk directory after each of {d['entries_stored']} stores, nothing else writing | "
                f"{d['max_dir_bytes'] / 2**20:,.2f} MiB | budget {d['budget_bytes'] / 2**20:,.2f} MiB | "
                f"{d['max_dir_bytes'] / d['budget_bytes']:.3f}x | <= 1.0x | {_met(d['never_above_budget'])} |"
            )
        for label, key in (("embedded", "redis_embedded"), ("SmolLM2-shaped", "redis_smollm2_shaped")):
            if key in mem and mem[key]["bytes_per_token"]:
                x = mem[key]
                out.append(
                    f"| Redis used_memory per cached token, {label} ({x['entries']:,} entries) | "
                    f"{x['bytes_per_token']:,.0f} B | KV {x['kv_bytes_per_token']:,} B | "
                    f"{x['bytes_per_token'] / x['kv_bytes_per_token']:.3f}x | KV + small header | - |"
                )
        out.append("")
    if "worth_loading" in results:
        out += ["### 6. Worth loading: load vs recompute, per block", ""]
        out += ["| model | tier | load | recompute | recompute / load | break-even GB/s | tier GB/s (effective) | "
                "engine's estimates: load / recompute | auto loads |"]  # fmt: skip
        out += ["|---|---|---|---|---|---|---|---|---|"]
        for name, m in results["worth_loading"]["models"].items():
            for r in m["rows"]:
                est = (
                    f"{_ms(r['engine_load_s_per_block'])} / {_ms(r['engine_recompute_s_per_block'])}"
                    if r["engine_load_s_per_block"] is not None and r["engine_recompute_s_per_block"] is not None
                    else "-"
                )
                auto = "-" if r["auto_would_load"] is None else ("yes" if r["auto_would_load"] else "no")
                out.append(
                    f"| {name} | {r['row']} | {_ms(r['load_s_per_block'])} | {_ms(r['recompute_s_per_block'])} | "
                    f"{r['recompute_over_load']:.1f}x | {r['break_even_gb_s']:.3f} | {r['tier_effective_gb_s']:.2f} | "
                    f"{est} | {auto} |"
                )
        out.append("")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m promptcache.bench.tier_bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--models", default="default,smollm2", help="comma list of: default, smollm2")
    parser.add_argument("--quick", action="store_true", help="smaller sizes: about two minutes")
    parser.add_argument("--dir", default=None, help="where the disk tiers and Redis work (a temp dir made in it)")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of: {', '.join(SECTIONS)}")
    parser.add_argument("--out", default=None, help="write every number as JSON here")
    # Internal: one workload configuration in this fresh process (SPEC.json in, RESULT.json out).
    parser.add_argument("--run-config", nargs=2, metavar=("SPEC", "RESULT"), help=argparse.SUPPRESS)
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.run_config:
        spec_file, out_file = args.run_config
        Path(out_file).write_text(json.dumps(run_config(json.loads(Path(spec_file).read_text()))))
        return 0
    sections = [s for s in args.sections.split(",") if s]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections: {', '.join(sorted(unknown))}")
    command = shlex.join(["python", "-m", "promptcache.bench.tier_bench", *(sys.argv[1:] if argv is None else argv)])
    # A SIGTERM unwinds like Ctrl-C does, so that redis-server is stopped and the temporary directory removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    results = run(
        [m for m in args.models.split(",") if m],
        Sizes.quick() if args.quick else Sizes(),
        Path(args.dir) if args.dir else None,
        sections,
        command,
    )
    results["quick"] = args.quick
    print(markdown(results))
    print(f"wall time {results['wall_s']:.0f} s", file=sys.stderr)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
