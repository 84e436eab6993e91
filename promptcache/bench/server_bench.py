"""Server benchmark: the HTTP server against itself and against the engine in-process, every figure from one run.

    python -m promptcache.bench.server_bench [--quick] [--out docs/server-bench.json]

Everything goes through HTTP with the official ``openai`` client (one client, keep-alive) against a real uvicorn
server on 127.0.0.1, started in a thread of this process, on the embedded default model (float32, CPU):

- TTFT of a streamed chat request whose ~2,000-token system prompt is cached vs one whose system prompt is new
  (each cold request gets its own seeded random text behind a unique number, so it really misses); TTFT is the
  time from sending the request to the first chunk with content. Cold and hit requests alternate; every hit must
  show its prefix in ``usage.prompt_tokens_details.cached_tokens`` (and every cold request none).
- Server overhead of one small request (short prompt, a few tokens, temperature 0): non-streaming
  ``/v1/completions`` through HTTP vs ``LLM.generate`` in-process on a second, identically configured engine, and
  ``/v1/chat/completions`` vs ``LLM.chat``; the sides take turns; medians, their difference and ratio, and the
  median of the differences within each round. For scale: the same requests with plain ``httpx`` instead of the
  ``openai`` client, and a bare round trip (``GET /v1/models``, no engine work).
- Streaming inter-token latency of one request through HTTP (the gaps between content chunks) vs the engine's own
  time per output token in-process (the gaps between the steps that produced them); medians and ratio, and the mean
  gap the server's own metrics saw.

Client, server and both engines share this machine's CPUs: the figures include what the client costs, and any other
process that runs meanwhile disturbs them (the results say how much CPU other processes took during the run).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import random
import shlex
import socket
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from promptcache import LLM, SamplingParams
from promptcache.engine.engine import EngineConfig

MODEL_NAME = "promptcache-default"
ENGINE_KWARGS: dict[str, Any] = {"device": "cpu", "dtype": "float32", "kv_cache_memory_gb": 0.25}


@dataclass
class Sizes:
    """Workload sizes; ``quick()`` shrinks them for a smoke run."""

    prefix_tokens: int = 2000  # the cached system prompt, about
    ttft_pairs: int = 10  # cold and hit requests, alternating
    ttft_max_tokens: int = 2
    overhead_requests: int = 60  # per side and per API
    overhead_max_tokens: int = 4
    itl_tokens: int = 64
    itl_repeats: int = 5  # per side

    @classmethod
    def quick(cls) -> Sizes:
        return cls(prefix_tokens=1024, ttft_pairs=3, overhead_requests=6, itl_tokens=16, itl_repeats=2)


# ---- varied text -------------------------------------------------------------------------------------------------
_NOUN_TEXT = """
    ability absolute academy account acid across action active actor adapt address adjust admire adult advice
    aerial affair afford agency agenda agent alarm album alert alien alley almond alpine amber anchor angle ankle
    answer anthem apple april arbor arch arena argue armor arrow artist aspect atlas atom auburn audit author autumn
    avenue award bacon badge balance ballad bamboo banner barley barrel basin basket beacon beetle bellow bench
    berry bicycle binary biscuit blanket blossom border bottle boulder bracket branch breeze brick bridge bronze
    bucket budget buffer bundle butter cabin cactus canal candle canvas canyon carbon cargo carpet castle catalog
    cedar cellar census cereal chalk chamber channel chapter charcoal cherry chimney circuit citizen clay cliff
    climate clock cloud cobalt coffee column comet compass concert copper coral cotton crater crystal cushion
    dagger damage dancer debate decade desert detail diamond digit dinner doctor dolphin domain donkey drama
    dragon drift eagle echo eclipse elbow ember empire engine entry equator essay estate exhibit fabric falcon
    fiber fiddle figure filter flame flavor forest fossil fountain fragment frost galaxy garden garlic gazelle
    glacier granite gravel harbor harvest hazel helmet heron horizon hunter island ivory jacket jasmine journal
    jungle kernel kettle ladder lagoon lantern lattice legend lemon library lizard lobster magnet mango marble
    meadow melody meteor mirror monsoon mosaic mountain museum needle nickel nomad oasis ocean olive orbit orchard
    oxygen paddle palace panther parcel pebble pepper pillar planet pocket poetry prairie prism pulse puzzle quartz
    quiver rabbit radar raven reactor ribbon river rocket saddle salmon satchel scarlet sensor shadow signal silver
    sketch socket spiral statue summit tablet tangent teapot temple thunder timber tunnel turbine umbrella valley
    velvet vessel violet volcano walnut weather whistle window winter wizard yellow zenith zephyr
"""
_VERB_TEXT = """
    builds carries checks collects covers draws drives finds follows gathers guides holds keeps leads lifts marks
    measures moves opens paints places pulls reaches records sends shapes sorts stores studies tracks turns watches
"""
_LINK_TEXT = "and but while because although so yet whereas"
_WORDS, _VERBS, _LINKS = _NOUN_TEXT.split(), _VERB_TEXT.split(), _LINK_TEXT.split()


def sentence(rng: random.Random) -> str:
    """One random sentence: ``The <noun> <verb> the <noun> ...``, sometimes two clauses, sometimes a number."""

    def clause() -> str:
        adj = f"{rng.choice(_WORDS)} " if rng.random() < 0.5 else ""
        obj = f"{rng.randrange(2, 9999)} {rng.choice(_WORDS)}s" if rng.random() < 0.2 else f"the {rng.choice(_WORDS)}"
        tail = f" near the {rng.choice(_WORDS)}" if rng.random() < 0.3 else ""
        return f"the {adj}{rng.choice(_WORDS)} {rng.choice(_VERBS)} {obj}{tail}"

    text = clause()
    if rng.random() < 0.4:
        text += f", {rng.choice(_LINKS)} {clause()}"
    return text[0].upper() + text[1:] + rng.choice(".....!?;")


def system_prompt(tokenizer: Any, seed: int, tokens: int) -> str:
    """About ``tokens`` tokens of varied text behind a unique number (seed); the same seed gives the same text."""
    rng = random.Random(seed)
    parts = [f"Deployment {seed}. You are assistant number {seed}; follow the notes below."]
    count = len(tokenizer.encode(parts[0], add_special_tokens=False))
    while count < tokens:
        s = sentence(rng)
        parts.append(("\n\n" if rng.random() < 0.1 else " ") + s)
        count += len(tokenizer.encode(parts[-1], add_special_tokens=False))
    return "".join(parts)


# ---- the server ------------------------------------------------------------------------------------------------
class ServerThread:
    """promptcache's app under uvicorn in a background thread of this process, on a free loopback port."""

    def __init__(self, engine_kwargs: dict[str, Any]) -> None:
        import uvicorn

        from promptcache.api.server import ServerConfig, create_app
        from promptcache.engine.async_engine import AsyncEngine
        from promptcache.engine.engine import LLMEngine

        self.engine = AsyncEngine(LLMEngine(EngineConfig(**engine_kwargs)))
        self.app = create_app(self.engine, ServerConfig(served_model_name=MODEL_NAME))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="bench-uvicorn", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the benchmark server did not start")
            time.sleep(0.01)

    @property
    def stack(self) -> dict[str, str]:
        """What uvicorn serves with: the HTTP parser (h11 or httptools) and the event loop (asyncio or uvloop)."""
        import importlib.util

        proto = getattr(self.server.config, "http_protocol_class", None)
        return {
            "http": getattr(proto, "__module__", str(self.server.config.http)),
            "loop": "uvloop" if importlib.util.find_spec("uvloop") is not None else "asyncio",
        }

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


# ---- measurements ----------------------------------------------------------------------------------------------
def stream_chat(client: Any, messages: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
    """One streamed chat request: seconds from sending to each content chunk, and the usage chunk."""
    t0 = time.perf_counter()
    stream = client.chat.completions.create(
        model=MODEL_NAME,
        messages=messages,
        max_tokens=max_tokens,
        temperature=0.0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    first_chunk: float | None = None
    content_times: list[float] = []
    usage = None
    for chunk in stream:
        now = time.perf_counter() - t0
        if first_chunk is None:
            first_chunk = now
        if chunk.usage is not None:
            usage = chunk.usage
        if any(c.delta.content for c in chunk.choices):
            content_times.append(now)
    if usage is None:
        raise RuntimeError("the stream ended without a usage chunk (stream_options.include_usage)")
    details = usage.prompt_tokens_details
    return {
        "ttft_s": content_times[0] if content_times else first_chunk,  # no text at all: the first chunk
        "first_chunk_s": first_chunk,
        "content_times_s": content_times,
        "content_chunks": len(content_times),
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "cached_tokens": details.cached_tokens if details is not None else None,
    }


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


class Bench:
    def __init__(self, sizes: Sizes, seed: int = 0) -> None:
        import httpx
        from openai import OpenAI

        self.sizes, self.seed = sizes, seed
        t = time.perf_counter()
        self.llm = LLM(**ENGINE_KWARGS)  # the in-process side: same configuration as the server's engine
        self.server = ServerThread(ENGINE_KWARGS)
        self.startup_s = time.perf_counter() - t
        self.client = OpenAI(base_url=self.server.url + "/v1", api_key="local", max_retries=0, timeout=300)
        self.http = httpx.Client(base_url=self.server.url, timeout=300)
        self.tokenizer = self.llm.tokenizer
        self.block_size = self.llm.engine.kv.block_size

    def close(self) -> None:
        self.client.close()
        self.http.close()
        self.server.stop()

    # -- 1. TTFT, cached prefix vs cold ---------------------------------------------------------------------------
    def ttft(self) -> dict[str, Any]:
        sz = self.sizes
        shared = system_prompt(self.tokenizer, self.seed, sz.prefix_tokens)

        def messages(system: str, i: int) -> list[dict[str, str]]:
            return [{"role": "system", "content": system}, {"role": "user", "content": f"Question {i}: go on."}]

        # The tokens that every hit shares with the prefix already in the cache, in whole blocks.
        a, b = (self.tokenizer.encode(self.tokenizer.apply_chat_template(messages(shared, i)), False) for i in (1, 2))
        common = next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        expected_cached = common // self.block_size * self.block_size

        cold_seed = iter(range(self.seed + 1_000_000, self.seed + 2_000_000))
        # Warm-up: the kernels for long prompts (a throw-away cold request), then the shared prefix itself.
        stream_chat(self.client, messages(system_prompt(self.tokenizer, next(cold_seed), sz.prefix_tokens), 0), 1)
        warm = stream_chat(self.client, messages(shared, 0), sz.ttft_max_tokens)
        hits: list[dict[str, Any]] = []
        colds: list[dict[str, Any]] = []
        for i in range(1, sz.ttft_pairs + 1):
            hit_msgs = messages(shared, i)
            cold_msgs = messages(system_prompt(self.tokenizer, next(cold_seed), sz.prefix_tokens), i)
            order = [(hits, hit_msgs), (colds, cold_msgs)]
            for sink, msgs in order if i % 2 else order[::-1]:  # alternate which goes first
                sink.append(stream_chat(self.client, msgs, sz.ttft_max_tokens))
        for r in hits + colds:
            del r["content_times_s"]
        hit_ttft = [r["ttft_s"] for r in hits]
        cold_ttft = [r["ttft_s"] for r in colds]
        proved = all(r["cached_tokens"] >= expected_cached > 0 for r in hits) and all(
            r["cached_tokens"] == 0 for r in colds
        )
        hit_s, cold_s = _median(hit_ttft), _median(cold_ttft)
        return {
            "hit_median_s": hit_s,
            "cold_median_s": cold_s,
            "cold_over_hit": cold_s / hit_s,
            "hit_ttft_s": hit_ttft,
            "cold_ttft_s": cold_ttft,
            "prompt_tokens_median": _median([r["prompt_tokens"] for r in hits + colds]),
            "shared_prefix_tokens": common,
            "expected_cached_tokens": expected_cached,
            "hit_cached_tokens": [r["cached_tokens"] for r in hits],
            "cold_cached_tokens": [r["cached_tokens"] for r in colds],
            "warm_request": warm,
            "cache_hit_proved": proved,
            "hits": hits,
            "colds": colds,
        }

    # -- 2. server overhead per small request ---------------------------------------------------------------------
    def overhead(self) -> dict[str, Any]:
        sz = self.sizes
        n_tok = sz.overhead_max_tokens
        prompt = "Summarise the plan for the next release in one line."
        chat = [{"role": "user", "content": prompt}]
        params = SamplingParams(temperature=0.0, max_tokens=n_tok, ignore_eos=True)

        def inproc_generate() -> tuple[float, str]:
            t = time.perf_counter()
            out = self.llm.generate(prompt, params)[0]
            dt = time.perf_counter() - t
            assert len(out.token_ids) == n_tok, out.token_ids
            return dt, out.text

        def http_completion() -> tuple[float, str]:
            t = time.perf_counter()
            r = self.client.completions.create(
                model=MODEL_NAME, prompt=prompt, max_tokens=n_tok, temperature=0.0, extra_body={"ignore_eos": True}
            )
            dt = time.perf_counter() - t
            assert r.usage is not None and r.usage.completion_tokens == n_tok, r.usage
            return dt, r.choices[0].text

        def inproc_chat() -> tuple[float, str]:
            t = time.perf_counter()
            out = self.llm.chat(chat, params)[0]
            dt = time.perf_counter() - t
            assert len(out.token_ids) == n_tok, out.token_ids
            return dt, out.text

        def http_chat() -> tuple[float, str]:
            t = time.perf_counter()
            r = self.client.chat.completions.create(
                model=MODEL_NAME, messages=chat, max_tokens=n_tok, temperature=0.0, extra_body={"ignore_eos": True}
            )
            dt = time.perf_counter() - t
            assert r.usage is not None and r.usage.completion_tokens == n_tok, r.usage
            return dt, r.choices[0].message.content or ""

        def raw(path: str, body: dict[str, Any], text: Any) -> Any:
            def call() -> tuple[float, str]:  # the same request without the openai client: plain httpx, keep-alive
                t = time.perf_counter()
                r = self.http.post(path, json=body)
                r.raise_for_status()
                reply = r.json()
                dt = time.perf_counter() - t
                assert reply["usage"]["completion_tokens"] == n_tok, reply["usage"]
                return dt, text(reply["choices"][0])

            return call

        def http_models() -> tuple[float, str]:  # no engine work: the floor of a request through HTTP
            t = time.perf_counter()
            models = self.client.models.list()
            return time.perf_counter() - t, models.data[0].id

        common = {"model": MODEL_NAME, "max_tokens": n_tok, "temperature": 0.0, "ignore_eos": True}
        raw_completion = raw("/v1/completions", {**common, "prompt": prompt}, lambda c: c["text"])
        raw_chat = raw("/v1/chat/completions", {**common, "messages": chat}, lambda c: c["message"]["content"] or "")
        result: dict[str, Any] = {"prompt": prompt, "max_tokens": n_tok}
        rtts: list[float] = []
        apis = (("completions", inproc_generate, http_completion, raw_completion),
                ("chat", inproc_chat, http_chat, raw_chat))  # fmt: skip
        for name, *fns in apis:
            for _ in range(3):  # warm-up; after it both engines serve the prompt from their cache alike
                for fn in fns:
                    fn()
            times: list[list[float]] = [[] for _ in fns]
            texts: set[str] = set()
            for i in range(sz.overhead_requests):
                k = i % len(fns)  # rotate which side goes first
                for j in (*range(k, len(fns)), *range(k)):
                    dt, text = fns[j]()
                    times[j].append(dt)
                    texts.add(text)
                rtts.append(http_models()[0])
            ins, outs, raws = times
            in_s, http_s, raw_s = _median(ins), _median(outs), _median(raws)
            result[name] = {
                "inprocess_median_s": in_s,
                "http_median_s": http_s,
                "overhead_ms": (http_s - in_s) * 1e3,
                # The median of the differences within each round: steadier where the machine's speed drifts.
                "overhead_paired_ms": _median([h - i for h, i in zip(outs, ins)]) * 1e3,
                "ratio": http_s / in_s,
                "http_raw_median_s": raw_s,
                "overhead_raw_ms": (raw_s - in_s) * 1e3,
                "inprocess_s": ins,
                "http_s": outs,
                "http_raw_s": raws,
                "same_output": len(texts) == 1,  # identical engines, greedy: the same text every time, both sides
            }
        result["bare_http_median_s"] = _median(rtts)
        result["bare_http_s"] = rtts
        return result

    # -- 3. streaming inter-token latency -------------------------------------------------------------------------
    def itl(self) -> dict[str, Any]:
        sz = self.sizes
        prompt = "Write a long story about a lighthouse keeper."
        chat = [{"role": "user", "content": prompt}]
        ids = self.tokenizer.encode(self.tokenizer.apply_chat_template(chat), add_special_tokens=False)
        params = SamplingParams(temperature=0.0, max_tokens=sz.itl_tokens, ignore_eos=True)
        engine = self.llm.engine

        def inproc() -> dict[str, Any]:
            req = engine.add_request(ids, params)
            times: list[float] = []
            try:
                while not req.finished:
                    outs = engine.step()
                    now = time.perf_counter()
                    times.extend(now for o in outs if o.request_id == req.request_id and o.new_token_ids)
            finally:
                engine.abort(req.request_id)
            out = engine.output_of(req.request_id)
            engine.release(req.request_id)
            assert len(out.token_ids) == sz.itl_tokens
            decode = out.metrics.decode_time or 0.0
            return {"gaps_s": _gaps(times), "decode_s_per_token": decode / (sz.itl_tokens - 1)}

        def http() -> dict[str, Any]:
            r = stream_chat(self.client, chat, sz.itl_tokens)
            assert r["completion_tokens"] == sz.itl_tokens, r
            times = r["content_times_s"]
            return {"gaps_s": _gaps(times), "content_chunks": len(times), "tokens": r["completion_tokens"],
                    "mean_s_per_token": (times[-1] - times[0]) / (len(times) - 1)}  # fmt: skip

        def server_itl() -> tuple[float, float]:  # the server's own histogram of the gaps, as its event loop sees them
            registry = self.server.app.state.service.metrics.registry
            name = "promptcache_inter_token_latency_seconds"
            return (registry.get_sample_value(f"{name}_sum") or 0.0, registry.get_sample_value(f"{name}_count") or 0.0)

        inproc()
        http()  # warm-up
        ins: list[dict[str, Any]] = []
        outs: list[dict[str, Any]] = []
        server_sum = server_count = 0.0
        for i in range(sz.itl_repeats):
            if i % 2 == 0:
                ins.append(inproc())
            before = server_itl()
            outs.append(http())
            after = server_itl()
            server_sum, server_count = server_sum + after[0] - before[0], server_count + after[1] - before[1]
            if i % 2:
                ins.append(inproc())
        in_gaps = [g for r in ins for g in r["gaps_s"]]
        http_gaps = [g for r in outs for g in r["gaps_s"]]
        in_s, http_s = _median(in_gaps), _median(http_gaps)
        return {
            "tokens_per_request": sz.itl_tokens,
            "inprocess_median_s": in_s,
            "http_median_s": http_s,
            "ratio": http_s / in_s,
            "inprocess_decode_s_per_token": [r["decode_s_per_token"] for r in ins],
            "http_mean_s_per_token": [r["mean_s_per_token"] for r in outs],
            # Between the engine thread and the event loop, before SSE, the network and the client: where time goes.
            "server_side_mean_s_per_token": server_sum / server_count if server_count else None,
            # A token whose text is still an incomplete UTF-8 sequence sends no chunk: the next gap spans two.
            "http_tokens_without_chunk": sum(r["tokens"] - r["content_chunks"] for r in outs),
            "inprocess_gaps_s": in_gaps,
            "http_gaps_s": http_gaps,
        }


def _cpu_seconds() -> tuple[float, float] | None:
    """(CPU seconds the whole machine has been busy, CPU seconds of this process): their deltas over a run say how
    much of the machine other processes took meanwhile. None where /proc/stat does not exist."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    busy = sum(fields[:8]) - fields[3] - fields[4]  # user nice system idle iowait irq softirq steal: all but idle
    own = os.times()
    return busy / os.sysconf("SC_CLK_TCK"), own.user + own.system


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def run(sizes: Sizes | None = None, seed: int = 0, command: str | None = None) -> dict[str, Any]:
    sizes = sizes or Sizes()
    started, cpu_before = time.perf_counter(), _cpu_seconds()
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "command": command or f"promptcache.bench.server_bench.run({sizes!r}, seed={seed}) (in-process call)",
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            # Other processes on the machine (a test run) slow every figure: the load says whether there were any.
            "load_average_before": os.getloadavg(),
        },
        "versions": {
            "python": platform.python_version(),
            "promptcache": _version("promptcache"),
            "torch": torch.__version__,
            **{name: _version(name) for name in ("fastapi", "starlette", "uvicorn", "openai", "httpx", "pydantic")},
        },
        "engine": {**ENGINE_KWARGS, "model": "embedded default"},
        "sizes": asdict(sizes),
        "seed": seed,
    }
    bench = Bench(sizes, seed)
    try:
        results["startup_s"] = bench.startup_s
        results["server"] = {"url": bench.server.url, **bench.server.stack, "client": "openai, one client (keep-alive)"}
        results["ttft"] = bench.ttft()
        results["overhead"] = bench.overhead()
        results["itl"] = bench.itl()
    finally:
        bench.close()
    results["wall_s"] = time.perf_counter() - started
    results["machine"]["load_average_after"] = os.getloadavg()
    cpu_after = _cpu_seconds()
    if cpu_before is not None and cpu_after is not None:
        own = cpu_after[1] - cpu_before[1]
        results["machine"]["this_process_cpu_s"] = own
        results["machine"]["other_processes_cpu_s"] = max(0.0, cpu_after[0] - cpu_before[0] - own)
    return results


def markdown(results: dict[str, Any]) -> str:
    t, o, i = results["ttft"], results["overhead"], results["itl"]
    ms = 1e3
    n_over = results["sizes"]["overhead_requests"]
    rows = [
        (
            f"TTFT, streamed chat, {t['prompt_tokens_median']:,.0f}-token prompt: cold / cached prefix",
            f"{t['cold_median_s'] * ms:.1f} ms / {t['hit_median_s'] * ms:.1f} ms = **{t['cold_over_hit']:.1f}x**",
            ">= 10x (at ~2,000)",
        ),
        (
            "cached_tokens on every hit / on every cold request",
            f"{min(t['hit_cached_tokens']):,} (expected >= {t['expected_cached_tokens']:,}) / "
            f"{max(t['cold_cached_tokens'])} -> {'proved' if t['cache_hit_proved'] else 'NOT proved'}",
            "hit proved",
        ),
    ]
    apis = (("completions", "/v1/completions vs LLM.generate"), ("chat", "/v1/chat/completions vs LLM.chat"))
    for name, label in apis:
        f = o[name]
        rows.append((
            f"server overhead, {o['max_tokens']} tokens, {label} (median of {n_over})",
            f"{f['http_median_s'] * ms:.2f} ms vs {f['inprocess_median_s'] * ms:.2f} ms: "
            f"**{f['overhead_ms']:+.2f} ms** ({f['ratio']:.2f}x); paired: {f['overhead_paired_ms']:+.2f} ms; "
            f"plain httpx instead of openai: {f['overhead_raw_ms']:+.2f} ms",
            "< 5 ms",
        ))  # fmt: skip
    rows.append((
        f"bare HTTP round trip, GET /v1/models, openai client (median of {len(o['bare_http_s'])})",
        f"{o['bare_http_median_s'] * ms:.2f} ms ({results['server']['http']}, {results['server']['loop']})",
        "",
    ))  # fmt: skip
    rows.append((
        f"inter-token latency, {i['tokens_per_request']}-token stream: HTTP / in-process (median)",
        f"{i['http_median_s'] * ms:.2f} ms / {i['inprocess_median_s'] * ms:.2f} ms = **{i['ratio']:.2f}x**",
        "",
    ))  # fmt: skip
    lines = ["| figure | measured | target |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    m = results["machine"]
    if "other_processes_cpu_s" in m:
        lines.append(
            f"\n{results['wall_s']:.1f} s wall on {m['cpu_count']} CPUs; other processes used "
            f"{m['other_processes_cpu_s']:.1f} CPU-s meanwhile (more than ~1 means the figures are disturbed)."
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run in seconds")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random system prompts")
    parser.add_argument("--out", default=None, help="write the raw results as JSON here")
    args = parser.parse_args()
    command = shlex.join(["python", "-m", "promptcache.bench.server_bench", *sys.argv[1:]])
    results = run(Sizes.quick() if args.quick else Sizes(), args.seed, command)
    print(markdown(results))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
