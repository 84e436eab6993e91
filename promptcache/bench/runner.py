"""Workload benchmark: realistic, seeded workloads through the engine (prefix caching on and off), through
``transformers`` on the same weights, or through any OpenAI-compatible server; hit ratios against Belady's optimum;
the cost of every run under the providers' price shapes and under this machine's measured compute.

    promptcache bench --workload NAME|all [--quick] [--out DIR] [--endpoint URL] [--model MODEL] [--seed N]
                      [--no-transformers] [--compute-pricing FILE]
    python -m promptcache.bench.runner ...   (the same)

Targets (one request at a time, in the workload's arrival order, so TTFT is never queueing):
- ``engine-cache-on`` / ``engine-cache-off``: ``LLM.chat`` in-process, greedy, ``ignore_eos`` (every answer has
  exactly ``max_tokens`` tokens), token-exact replay of earlier answers. The two engines take turns request by request
  (alternating who goes first) so that the machine's noise falls on both alike.
- ``transformers``: ``AutoModelForCausalLM`` on the same weights with the caching-on run's prompt ids (so it sees the
  same prompts and the same answers in the history) and the same output lengths, nothing reused across requests:
  what a user has without a serving engine. One timed greedy ``generate`` per request with no EOS id (as
  ``ignore_eos``: an EOS is an ordinary token, neither a stop nor suppressed); TTFT is the time to its first new
  token, time per output token the mean gap after it.
- ``endpoint``: any OpenAI-compatible server (``--endpoint URL``), streamed with ``include_usage``; TTFT is the first
  chunk with content, cached tokens come from ``usage.prompt_tokens_details`` when the server reports them.

Then: the generated token ids of every pair of targets compared request by request (greedy decoding of the same
prompt must give the same ids with the cache on, off and in transformers; any divergence is reported with where it
starts), Belady's optimal eviction and the engine's policies (LFU, LRU) replayed offline on the caching-on run's
block trace (``belady.py``), and prices (``promptcache.pricing.PRESETS`` plus a table proportional to the compute
measured by ``calibrate.py``).
``report.py`` writes results.json, summary.md and the plots.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import itertools
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from promptcache.bench.belady import block_trace, simulate
from promptcache.bench.workloads import WORKLOADS, Workload, make_workload, request_messages
from promptcache.bench.workloads import workload_sizes as workload_parameters
from promptcache.cache.eviction import DEFAULT_EVICTION_POLICY, EVICTION_POLICIES
from promptcache.engine.request import SamplingParams
from promptcache.pricing import PRESETS, PriceTable, Pricing, TokenUsage

if TYPE_CHECKING:
    from promptcache.model.source import ModelSource

ENGINE_ON, ENGINE_OFF, TRANSFORMERS, ENDPOINT = "engine-cache-on", "engine-cache-off", "transformers", "endpoint"
NAMESPACE = "bench"  # every request of a workload in one namespace: users of one deployment share its cache
DEFAULT_MODEL_NAME = "promptcache-default"
MEASURED = "measured"  # the name of the measured-compute price table among the presets
# Capacities of the offline sweep, as fractions of the workload's working set (distinct blocks it ever writes).
SWEEP_FRACTIONS = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0)
ENGINE_POLICIES = tuple(sorted(EVICTION_POLICIES))  # replayed offline beside Belady: "lfu", "lru"
SIM_POLICIES = ("belady", *ENGINE_POLICIES)
BENCH_INSTALL = 'pip install "promptcache[bench]"'  # the optional packages promptcache bench needs
PLOT_PRESET = "default"  # the provider-shaped preset drawn beside the measured table in the cost plot
AMPLE_KV_BYTES = 2 << 30  # the most KV memory an "ample" cache may take
CAPACITY_NOTE = (
    "Capacity is matched in blocks: the simulators get the engine's num_kv_blocks. The engine's pool holds the "
    "cached blocks and the running request's blocks together, and the simulators, like the pool after a request "
    "ends, count the request's own blocks in their capacity too. The engine also needs one scratch block for the "
    "request's partial last block, so it may evict one block more per request than the simulators."
)


# ---- records and runs -----------------------------------------------------------------------------------------
@dataclass
class Record:
    """One request of one run: what was sent, what came back, and how long it took."""

    index: int  # position in the workload's arrival order
    session: int  # session index in the workload
    session_id: str
    step: int  # step index within the session
    turn: int  # 1-based turn number within the session (step + 1)
    prompt_tokens: int
    cached_tokens: int | None  # prompt tokens served from the cache; None when the target does not say
    output_tokens: int
    ttft_s: float
    tpot_s: float | None  # time per output token after the first; None for a one-token answer
    e2e_s: float
    prompt_ids: list[int] | None = None  # None when the target returns no ids (an endpoint)
    output_ids: list[int] | None = None
    # An endpoint behind `promptcache router` says which replica served the request and what the router predicted
    # it would find cached there; promptcache's usage splits the cached tokens by tier. None where not reported.
    replica: str | None = None  # the x-promptcache-replica response header
    predicted_cached_tokens: int | None = None  # the x-promptcache-predicted-cached-tokens response header
    cached_by_tier: dict[str, int] | None = None  # usage.cached_tokens_by_tier, e.g. {"device": 160, "redis": 32}
    start_s: float | None = None  # when the request was sent, seconds after the run began (endpoint runs)
    # Time to the first streamed chunk of any kind (endpoint runs). promptcache sends its first chunk (the role) once
    # the first token exists, so there this is the exact TTFT even when the first tokens' text is held back (an
    # incomplete UTF-8 sequence); other servers may send it before any token (OpenAI does), so ttft_s stays the
    # time to the first content.
    first_chunk_s: float | None = None
    retries: int | None = None  # times the client sent the request again (a 429 / 5xx / lost connection before it)

    def as_json(self) -> dict[str, Any]:
        """Every field but the id lists (they would dominate results.json)."""
        out = asdict(self)
        del out["prompt_ids"], out["output_ids"]
        return out


@dataclass
class RunResult:
    """One target's run of one workload."""

    target: str
    records: list[Record]
    wall_s: float  # the time the target spent on the requests (sum of their end-to-end times)
    info: dict[str, Any] = field(default_factory=dict)


# ---- statistics -----------------------------------------------------------------------------------------------
def percentile(values: Iterable[float], q: float) -> float | None:
    """The q-th percentile (0-100), interpolating linearly between closest ranks (numpy's default); None if empty."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    xs = sorted(values)
    if not xs:
        return None
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def run_figures(run: RunResult) -> dict[str, Any]:
    """TTFT percentiles, time per output token, throughput, prompt tokens served from cache, TTFT by turn."""
    recs = run.records
    ttft = [r.ttft_s for r in recs]
    tpot = [r.tpot_s for r in recs if r.tpot_s is not None]
    prompt = sum(r.prompt_tokens for r in recs)
    output = sum(r.output_tokens for r in recs)
    known = [r.cached_tokens for r in recs if r.cached_tokens is not None]
    cached = sum(known) if len(known) == len(recs) else None
    by_turn: dict[int, list[float]] = defaultdict(list)
    for r in recs:
        by_turn[r.turn].append(r.ttft_s)
    wall = run.wall_s
    return {
        "requests": len(recs),
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p90_s": percentile(ttft, 90),
        "ttft_p99_s": percentile(ttft, 99),
        "ttft_mean_s": sum(ttft) / len(ttft) if ttft else None,
        "tpot_p50_s": percentile(tpot, 50),
        "e2e_p50_s": percentile([r.e2e_s for r in recs], 50),
        "wall_s": wall,
        "requests_per_s": _ratio(len(recs), wall),
        "output_tokens_per_s": _ratio(output, wall),
        "prompt_tokens_per_s": _ratio(prompt, wall),
        "prompt_tokens": prompt,
        "output_tokens": output,
        "cached_tokens": cached,
        "cached_share": _ratio(cached, prompt),
        "ttft_by_turn": [
            {"turn": t, "n": len(v), "mean_s": sum(v) / len(v), "p50_s": percentile(v, 50)}
            for t, v in sorted(by_turn.items())
        ],
    }


def previous_turn_share(records: Sequence[Record], block_size: int) -> dict[str, Any] | None:
    """For every turn after the first: the share of the previous turn (its prompt + its answer) served from cache.

    A block-granular cache can serve at most the previous turn's full blocks, and never the answer's last token
    (its KV is not computed: generation stops once it is sampled); ``achievable_*`` is that ceiling, for scale.
    """
    by_session: dict[int, list[Record]] = defaultdict(list)
    for r in records:
        by_session[r.session].append(r)
    shares, ceilings = [], []
    for recs in by_session.values():
        recs.sort(key=lambda r: r.step)
        for prev, cur in itertools.pairwise(recs):
            if cur.cached_tokens is None:
                return None
            prev_len = prev.prompt_tokens + prev.output_tokens
            shares.append(min(cur.cached_tokens, prev_len) / prev_len)
            ceilings.append((prev_len - 1) // block_size * block_size / prev_len)
    if not shares:
        return None
    return {
        "turns": len(shares),
        "mean": sum(shares) / len(shares),
        "min": min(shares),
        "achievable_mean": sum(ceilings) / len(ceilings),
        "achievable_min": min(ceilings),
    }


# ---- do the targets generate the same tokens? -----------------------------------------------------------------
def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    """The first position where two id lists differ (the shorter one's length if one is a prefix of the other);
    None when they are equal."""
    for pos, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return pos
    return None if len(a) == len(b) else min(len(a), len(b))


def output_divergence(a: RunResult, b: RunResult) -> dict[str, Any]:
    """Compare two runs' generated token ids request by request (matched by arrival index).

    Requests without ids on either side (an endpoint) are not compared. ``first_divergence`` is the earliest
    request (in arrival order) whose ids differ: its index, session, turn, the token position where the ids part,
    and whether both targets had sent the same prompt ids (if not, the divergence was inherited from an earlier
    answer that went back into the history).
    """
    theirs = {r.index: r for r in b.records}
    compared, diverging = 0, 0
    first: dict[str, Any] | None = None
    for r in sorted(a.records, key=lambda r: r.index):
        other = theirs.get(r.index)
        if other is None or r.output_ids is None or other.output_ids is None:
            continue
        compared += 1
        pos = first_difference(r.output_ids, other.output_ids)
        if pos is None:
            continue
        diverging += 1
        if first is None:
            first = {
                "request": r.index,
                "session_id": r.session_id,
                "turn": r.turn,
                "token": pos,
                "same_prompt": r.prompt_ids is not None and r.prompt_ids == other.prompt_ids,
            }
    return {"a": a.target, "b": b.target, "requests_compared": compared, "requests_diverging": diverging,
            "first_divergence": first}  # fmt: skip


def output_agreement(runs: dict[str, RunResult]) -> list[dict[str, Any]]:
    """``output_divergence`` for every pair of runs that returned token ids (cache on / off, transformers)."""
    with_ids = [run for run in runs.values() if any(r.output_ids is not None for r in run.records)]
    return [output_divergence(a, b) for a, b in itertools.combinations(with_ids, 2)]


# ---- cost -----------------------------------------------------------------------------------------------------
def run_usage(records: Sequence[Record], cached_as_uncached: bool = False) -> TokenUsage:
    """The run's tokens by kind (no cache writes: the benchmark sets no breakpoints). A target that does not
    report cached tokens counts them as uncached; ``cached_as_uncached`` prices the same tokens with no cache."""
    cached = 0 if cached_as_uncached else sum(r.cached_tokens or 0 for r in records)
    return TokenUsage(
        prompt_tokens=sum(r.prompt_tokens for r in records),
        cached_tokens=cached,
        output_tokens=sum(r.output_tokens for r in records),
    )


def price_run(records: Sequence[Record], pricing: Pricing, cached_as_uncached: bool = False) -> dict[str, float]:
    """USD of a run by component (input, cached_input, output, ...) and in total; prices are linear, so the cost
    of the summed tokens is the sum of the requests' costs."""
    return pricing.cost(run_usage(records, cached_as_uncached))


def cost_comparison(
    on: Sequence[Record], off: Sequence[Record] | None, pricings: dict[str, Pricing]
) -> dict[str, dict[str, Any]]:
    """Per price table: the caching-off run's cost, the caching-on run's, and the saving.

    Without a caching-off run (an endpoint), "off" is the caching-on run's own tokens priced with no cache reads.
    """
    out: dict[str, dict[str, Any]] = {}
    for name, pricing in pricings.items():
        cost_on = price_run(on, pricing)
        cost_off = price_run(off, pricing) if off is not None else price_run(on, pricing, cached_as_uncached=True)
        saving = cost_off["total"] - cost_on["total"]
        out[name] = {
            "off": cost_off,
            "on": cost_on,
            "saving_usd": saving,
            "saving_pct": 100 * saving / cost_off["total"] if cost_off["total"] else None,
        }
    return out


# ---- Belady's bound -------------------------------------------------------------------------------------------
def belady_analysis(
    records: Sequence[Record], capacity_blocks: int, block_size: int, policy: str = DEFAULT_EVICTION_POLICY
) -> dict[str, Any]:
    """Our measured hit ratio against Belady's optimal eviction and the engine's policies (LFU, LRU) replayed on the
    same block trace, at the capacity the engine had and over a sweep of capacities around the working set.

    ``policy`` is the eviction policy the engine ran with; ``steady_state`` repeats the comparison over the second
    half of the requests only, when a policy that learns from past requests has seen some (the first requests of
    any trace miss under every policy, and Belady's bound knows the whole future from the first one on).
    """
    trace = block_trace([(r.prompt_ids or [], r.output_ids or []) for r in records], block_size)
    working_set = len({h for e in trace for h in e.writes})
    largest = max((len(e.writes) + 1 for e in trace), default=1)  # one request must fit, with its scratch block
    prompt = sum(r.prompt_tokens for r in records)

    def full_blocks(r: Any) -> int:
        # NOTE: the simulations replay full blocks; the engine also reuses a finished request's last partial block
        # (a tail, cache/manager.py), which no simulated policy can. The comparison takes its full-block hits.
        return (r.cached_tokens or 0) // block_size * block_size

    measured = sum(full_blocks(r) for r in records) / prompt if prompt else 0.0
    with_tails = sum(r.cached_tokens or 0 for r in records) / prompt if prompt else 0.0
    at = {p: simulate(trace, capacity_blocks, block_size, p) for p in SIM_POLICIES}
    capacities = {max(largest, round(working_set * f)) for f in SWEEP_FRACTIONS}
    capacities.add(capacity_blocks)  # the engine's own point, however ample, so the curves reach it
    sweep = []
    for cap in sorted(capacities):
        sims = {p: simulate(trace, cap, block_size, p) for p in SIM_POLICIES}
        sweep.append(
            {
                "capacity_blocks": cap,
                "fraction_of_working_set": cap / working_set if working_set else None,
                **{p: sims[p].hit_ratio for p in SIM_POLICIES},
            }
        )
    bel = at["belady"].hit_ratio
    half = len(records) // 2
    late_measured = sum(full_blocks(r) for r in records[half:])
    late_belady = sum(at["belady"].per_request_hit_tokens[half:])
    return {
        "capacity_blocks": capacity_blocks,
        "capacity_tokens": capacity_blocks * block_size,
        "working_set_blocks": working_set,
        "requests": len(trace),
        "engine_policy": policy,
        "measured_hit_ratio": measured,  # full blocks, as the simulations count
        "measured_hit_ratio_with_tails": with_tails,
        "belady_hit_ratio": bel,
        **{f"{p}_sim_hit_ratio": at[p].hit_ratio for p in ENGINE_POLICIES},
        "measured_over_belady": _ratio(measured, bel),
        **{f"{p}_sim_over_belady": _ratio(at[p].hit_ratio, bel) for p in ENGINE_POLICIES},
        "measured_over_policy_sim": _ratio(measured, at[policy].hit_ratio),
        "steady_state": {
            "requests": f"{half + 1}-{len(records)}",
            "measured_hit_tokens": late_measured,
            "belady_hit_tokens": late_belady,
            "measured_over_belady": _ratio(late_measured, late_belady),
            **{
                f"{p}_sim_over_belady": _ratio(sum(at[p].per_request_hit_tokens[half:]), late_belady)
                for p in ENGINE_POLICIES
            },
        },
        "sweep": sweep,
        "capacity_note": CAPACITY_NOTE,
    }


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="req", disable=not enabled, leave=False, dynamic_ncols=True)


@functools.lru_cache(maxsize=4)
def _model_source(model: str | None) -> ModelSource:
    """``--model`` resolved once per run: every workload sizes its pool with the same tokenizer and config (a GGUF
    is parsed once, not per workload)."""
    from promptcache.model.source import resolve_model

    return resolve_model(model, quiet=True)


def _content_text(content: Any) -> str:
    return content if isinstance(content, str) else json.dumps(content)


def ample_blocks(workload: Workload, model: str | None, block_size: int, dtype: str) -> int:
    """A pool that holds the whole workload with room to spare: every session's text, answers and template
    overhead counted as if nothing were shared (an over-estimate), capped at ``AMPLE_KV_BYTES`` of KV."""
    from promptcache.engine.engine import DTYPES

    source = _model_source(model)
    tok = source.tokenizer()
    total_blocks = 0
    for s in workload.sessions:
        tokens = len(tok.encode(s.system or "", add_special_tokens=False)) + 16
        if s.tools:
            tokens += len(tok.encode(json.dumps(s.tools), add_special_tokens=False)) + 128  # the template's tool prose
        for st in s.steps:
            tokens += sum(len(tok.encode(_content_text(m.get("content")), add_special_tokens=False)) + 16
                          for m in st.messages)  # fmt: skip
            tokens += st.max_tokens + 16
        total_blocks += tokens // block_size + 2
    elem = DTYPES[dtype].itemsize if dtype in DTYPES else 4
    per_block = source.config().kv_bytes_per_token * elem * block_size
    return max(64, min(int(total_blocks * 1.25) + 64, AMPLE_KV_BYTES // per_block))


@dataclass
class EngineArgs:
    """Engine settings shared by every in-process target."""

    device: str = "cpu"
    dtype: str = "float32"
    block_size: int = 16
    seed: int = 0
    eviction_policy: str = DEFAULT_EVICTION_POLICY


class _EngineSide:
    """One in-process engine with its own conversation histories (its own answers go back into its prompts)."""

    def __init__(self, model: str | None, enable_caching: bool, num_kv_blocks: int, args: EngineArgs):
        from promptcache import LLM

        self.llm = LLM(
            model=model,
            device=args.device,
            dtype=args.dtype,
            block_size=args.block_size,
            num_kv_blocks=num_kv_blocks,
            enable_prefix_caching=enable_caching,
            eviction_policy=args.eviction_policy,
            seed=args.seed,
        )
        # Warm the kernels on a prompt shorter than a block: nothing is cached, so the measured runs start cold.
        warm = list(range(10, 10 + max(1, min(8, args.block_size - 5))))
        self.llm.generate([warm], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), namespace="warmup")
        self.answers: dict[int, list[str]] = defaultdict(list)  # per session: this engine's answers so far
        self.records: list[Record] = []

    def run(self, workload: Workload, index: int, s: int, k: int) -> None:
        session = workload.sessions[s]
        step = session.steps[k]
        messages = request_messages(session, k, self.answers[s])
        params = SamplingParams(temperature=0.0, max_tokens=step.max_tokens, ignore_eos=True)
        t0 = time.perf_counter()
        out = self.llm.chat(messages, params, tools=session.tools, namespace=NAMESPACE)[0]
        e2e = time.perf_counter() - t0
        self.answers[s].append(out.text)
        n_out = len(out.token_ids)
        decode = out.metrics.decode_time
        self.records.append(
            Record(
                index=index,
                session=s,
                session_id=session.session_id,
                step=k,
                turn=k + 1,
                prompt_tokens=len(out.prompt_token_ids),
                cached_tokens=out.num_cached_tokens,
                output_tokens=n_out,
                ttft_s=out.metrics.time_to_first_token or 0.0,
                tpot_s=decode / (n_out - 1) if decode is not None and n_out > 1 else None,
                e2e_s=e2e,
                prompt_ids=list(out.prompt_token_ids),
                output_ids=list(out.token_ids),
            )
        )


def run_engine_pair(
    workload: Workload, model: str | None, args: EngineArgs, progress: bool = True
) -> tuple[RunResult, RunResult]:
    """Run the workload on two engines, prefix caching on and off, taking turns request by request.

    Capacity: ``workload.cache_tokens // block_size`` blocks when the workload sets it, else an ample pool.
    """
    if workload.cache_tokens is not None:
        blocks, how = workload.cache_tokens // args.block_size, "workload.cache_tokens // block_size"
    else:
        blocks, how = ample_blocks(workload, model, args.block_size, args.dtype), "ample (estimated, x1.25)"
    sides = {True: _EngineSide(model, True, blocks, args), False: _EngineSide(model, False, blocks, args)}
    bar = _progress(workload.num_requests(), f"{workload.name}: engine on+off", progress)
    for i, (s, k) in enumerate(workload.order):
        # Alternate who goes first so neither side always runs right after the other's (warm CPU caches, noise).
        for on in (True, False) if i % 2 == 0 else (False, True):
            sides[on].run(workload, i, s, k)
        bar.update(1)
    bar.close()
    runs = []
    for on, name in ((True, ENGINE_ON), (False, ENGINE_OFF)):
        side = sides[on]
        stats = side.llm.cache_stats()
        info = {
            "num_kv_blocks": blocks,
            "capacity_tokens": blocks * args.block_size,
            "capacity": how,
            "prefix_caching": on,
            "evictions": stats["evictions"],
            "preemptions": stats["preemptions"],
            "engine_hit_tokens": stats["hit_tokens"],
            "engine_query_tokens": stats["query_tokens"],
        }
        runs.append(RunResult(name, side.records, sum(r.e2e_s for r in side.records), info))
    return runs[0], runs[1]


class _TokenClock:
    """A ``generate`` streamer that notes when each new token arrives (``put`` gets the prompt first, then tokens)."""

    def __init__(self) -> None:
        self.prompt_seen = False
        self.times: list[float] = []

    def put(self, value: Any) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def run_transformers(
    workload: Workload, source: Sequence[Record], model: str | None, args: EngineArgs, progress: bool = True
) -> RunResult:
    """``transformers`` on the same weights, the same prompt ids and output lengths as ``source`` (an engine run),
    one request at a time with nothing reused across requests.

    One greedy ``generate`` per request: TTFT is the time to its first new token (a streamer notes when each token
    arrives), time per output token the mean gap after it.
    """
    import torch
    import transformers
    from transformers.generation.streamers import BaseStreamer

    if not progress:
        transformers.utils.logging.disable_progress_bar()
    weights = _model_source(model)
    torch_dtype = getattr(torch, args.dtype)
    # transformers renamed torch_dtype to dtype in 4.56; older versions only know the first.
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    # A GGUF is read by transformers' own GGUF loader: the same dequantized weights as the engine's.
    where = {"pretrained_model_name_or_path": weights.path}
    if weights.kind == "gguf":
        where = {"pretrained_model_name_or_path": weights.path.parent, "gguf_file": weights.path.name}
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        **where, **{dtype_kw: torch_dtype}, attn_implementation="sdpa"
    )
    hf = hf.to(args.device).eval()
    eos = hf.generation_config.eos_token_id
    pad = eos if isinstance(eos, int) else (eos[0] if eos else 0)
    clock_type = type("TokenClock", (_TokenClock, BaseStreamer), {})

    def generate(ids: torch.Tensor, n: int, clock: Any = None) -> torch.Tensor:
        # No EOS id, as the engine's ignore_eos: an EOS is an ordinary token. (min_new_tokens would instead mask the
        # EOS logits, and greedy would then pick another token than the engine where EOS is the most likely one.)
        return hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=pad,
            streamer=clock,
        )

    records: list[Record] = []
    with torch.inference_mode():
        generate(torch.tensor([list(range(10, 18))], device=args.device), 2)  # warm-up
        bar = _progress(len(source), f"{workload.name}: transformers", progress)
        for r in source:
            assert r.prompt_ids is not None, "the transformers target needs the engine run's prompt ids"
            ids = torch.tensor([r.prompt_ids], device=args.device)
            n = r.output_tokens
            clock = clock_type()
            t0 = time.perf_counter()
            gen = generate(ids, n, clock)
            e2e = time.perf_counter() - t0
            out_ids = gen[0, ids.shape[1] :].tolist()
            first, last = clock.times[0], clock.times[-1]
            records.append(
                Record(
                    index=r.index,
                    session=r.session,
                    session_id=r.session_id,
                    step=r.step,
                    turn=r.turn,
                    prompt_tokens=len(r.prompt_ids),
                    cached_tokens=0,
                    output_tokens=len(out_ids),
                    ttft_s=first - t0,
                    tpot_s=(last - first) / (len(out_ids) - 1) if len(out_ids) > 1 else None,
                    e2e_s=e2e,
                    prompt_ids=list(r.prompt_ids),
                    output_ids=out_ids,
                )
            )
            bar.update(1)
        bar.close()
    info = {"transformers": transformers.__version__, "prompts_from": ENGINE_ON, "attn_implementation": "sdpa"}
    return RunResult(TRANSFORMERS, records, sum(r.e2e_s for r in records), info)


def _v1(url: str) -> str:
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


# Response headers of `promptcache router` (promptcache.fleet.router), named here so that benchmarking an endpoint
# needs no server-side imports.
REPLICA_HEADER = "x-promptcache-replica"
PREDICTED_HEADER = "x-promptcache-predicted-cached-tokens"


def _int_header(value: str | None) -> int | None:
    return int(value) if value is not None and value.strip().isdigit() else None


def _endpoint_request(
    client: Any,
    model: str,
    workload: Workload,
    index: int,
    s: int,
    k: int,
    answers: Sequence[str],
    extra: dict[str, Any] | None,
    t_run: float,
) -> tuple[Record, str]:
    """Send step ``k`` of session ``s`` (its history holding ``answers``, the session's earlier answers), streamed
    with usage; returns its record and the answer's text (which goes into the session's next request)."""
    session = workload.sessions[s]
    step = session.steps[k]
    kwargs: dict[str, Any] = {"tools": session.tools} if session.tools else {}
    t0 = time.perf_counter()
    # with_raw_response: the same streamed call, plus the response headers (a router's replica and prediction).
    raw = client.chat.completions.with_raw_response.create(
        model=model,
        messages=request_messages(session, k, answers),  # type: ignore[arg-type]
        max_tokens=step.max_tokens,
        temperature=0.0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=extra,
        **kwargs,
    )
    headers = raw.headers
    first = last = first_chunk = None
    parts: list[str] = []
    usage = None
    with raw.parse() as stream:
        for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            if chunk.choices and first_chunk is None:
                first_chunk = time.perf_counter()
            for choice in chunk.choices:
                delta = choice.delta
                if delta.content or delta.tool_calls:
                    last = time.perf_counter()
                    first = first or last
                    parts.append(delta.content or "")
    end = time.perf_counter()
    n_out = usage.completion_tokens if usage else len(parts)
    details = getattr(usage, "prompt_tokens_details", None) if usage else None
    cached = getattr(details, "cached_tokens", None) if details is not None else None
    by_tier = (getattr(usage, "model_extra", None) or {}).get("cached_tokens_by_tier") if usage else None
    record = Record(
        index=index,
        session=s,
        session_id=session.session_id,
        step=k,
        turn=k + 1,
        prompt_tokens=usage.prompt_tokens if usage else 0,
        cached_tokens=cached,
        output_tokens=n_out,
        ttft_s=(first or end) - t0,
        tpot_s=(last - first) / (n_out - 1) if first is not None and last is not None and n_out > 1 else None,
        e2e_s=end - t0,
        replica=headers.get(REPLICA_HEADER),
        predicted_cached_tokens=_int_header(headers.get(PREDICTED_HEADER)),
        cached_by_tier={str(t): int(n) for t, n in by_tier.items()} if isinstance(by_tier, dict) else None,
        start_s=t0 - t_run,
        first_chunk_s=None if first_chunk is None else first_chunk - t0,
        retries=getattr(raw, "retries_taken", None),
    )
    return record, "".join(parts)


def run_endpoint(
    workload: Workload,
    url: str,
    model: str | None = None,
    api_key: str | None = None,
    ignore_eos: bool = False,
    progress: bool = True,
    *,
    concurrency: int = 1,
    request_timeout: float | None = None,
) -> RunResult:
    """Any OpenAI-compatible server through the ``openai`` client: streamed chat completions with usage.

    ``concurrency``: at most that many requests in flight, so at most that many sessions at once. Each session's
    requests still go in order, each after the previous one has finished (its answer is in the next one's history);
    a free slot takes the earliest request in the workload's arrival order whose session is ready. With 1, the
    requests go one at a time in arrival order and ``wall_s`` is the sum of their end-to-end times (TTFT is never
    queueing); above 1, ``wall_s`` is the wall-clock time of the whole run. ``request_timeout``: seconds per request
    (None: the client's default).

    Raises:
        ValueError: ``concurrency`` below 1.
        openai.APIError: a request failed (after the client's retries); the requests in flight are not awaited.
    """
    import openai

    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    key = api_key or os.environ.get("OPENAI_API_KEY") or "none"
    timeout: dict[str, Any] = {} if request_timeout is None else {"timeout": request_timeout}

    def new_client() -> openai.OpenAI:
        return openai.OpenAI(base_url=_v1(url), api_key=key, **timeout)

    client = new_client()
    if model is None:
        models = client.models.list().data
        if not models:
            raise RuntimeError(f"{url} lists no models; pass --model")
        model = models[0].id
    # ignore_eos is a vLLM / promptcache extension (fixed output lengths); OpenAI itself rejects unknown fields.
    extra = {"ignore_eos": True} if ignore_eos else None
    answers: dict[int, list[str]] = defaultdict(list)
    records: list[Record] = []
    bar = _progress(workload.num_requests(), f"{workload.name}: endpoint", progress)
    t_run = time.perf_counter()
    if concurrency == 1:
        for i, (s, k) in enumerate(workload.order):
            record, text = _endpoint_request(client, model, workload, i, s, k, answers[s], extra, t_run)
            answers[s].append(text)
            records.append(record)
            bar.update(1)
    else:
        records = _run_concurrently(workload, concurrency, new_client, model, extra, t_run, bar)
    wall_clock = time.perf_counter() - t_run
    bar.close()
    info = {"url": url, "model": model, "ignore_eos": ignore_eos, "usage": all(r.prompt_tokens for r in records),
            "concurrency": concurrency, "wall_clock_s": wall_clock}  # fmt: skip
    wall = sum(r.e2e_s for r in records) if concurrency == 1 else wall_clock
    return RunResult(ENDPOINT, records, wall, info)


def _run_concurrently(
    workload: Workload,
    concurrency: int,
    new_client: Callable[[], Any],
    model: str,
    extra: dict[str, Any] | None,
    t_run: float,
    bar: Any,
) -> list[Record]:
    """``run_endpoint``'s requests on ``concurrency`` threads, each with its own client; the records in arrival
    order. Only this (the calling) thread touches the schedule and the answers, so they need no lock."""
    import concurrent.futures as cf
    import heapq

    position = {sk: i for i, sk in enumerate(workload.order)}
    # Sessions ready to send their next request, by that request's place in the arrival order.
    ready = [(position[(s, 0)], s) for s, session in enumerate(workload.sessions) if session.steps]
    heapq.heapify(ready)
    next_step = [0] * len(workload.sessions)
    answers: dict[int, list[str]] = defaultdict(list)
    records: list[Record] = []
    local = threading.local()

    def send(index: int, s: int, k: int, history: list[str]) -> tuple[Record, str]:
        if not hasattr(local, "client"):
            local.client = new_client()  # one client (one connection pool) per worker thread
        return _endpoint_request(local.client, model, workload, index, s, k, history, extra, t_run)

    pool = cf.ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="bench-endpoint")
    running: dict[cf.Future[tuple[Record, str]], int] = {}
    try:
        while ready or running:
            while ready and len(running) < concurrency:
                index, s = heapq.heappop(ready)
                k = next_step[s]
                running[pool.submit(send, index, s, k, list(answers[s]))] = s
            done, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
            for future in done:
                s = running.pop(future)
                record, text = future.result()  # a failed request ends the run with its error
                answers[s].append(text)
                records.append(record)
                bar.update(1)
                next_step[s] += 1
                if next_step[s] < len(workload.sessions[s].steps):
                    heapq.heappush(ready, (position[(s, next_step[s])], s))
    finally:
        # On an error (or Ctrl-C) do not wait for the requests in flight: their own timeouts end them.
        pool.shutdown(wait=not running, cancel_futures=True)
    records.sort(key=lambda r: r.index)
    return records


# ---- the whole benchmark --------------------------------------------------------------------------------------
def machine_info() -> dict[str, Any]:
    import psutil
    import torch

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(psutil.virtual_memory().total / (1 << 30), 1),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def versions() -> dict[str, str | None]:
    from importlib import metadata

    import promptcache

    out: dict[str, str | None] = {"python": platform.python_version(), "promptcache": promptcache.__version__}
    for dist in ("torch", "transformers", "matplotlib", "openai", "tqdm"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    try:
        out["git_commit"] = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"],
                cwd=Path(__file__).resolve().parent,
                capture_output=True,
                text=True,
                timeout=5,
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        out["git_commit"] = None
    return out


def workload_facts(workload: Workload, quick: bool, overrides: dict[str, int] | None = None) -> dict[str, Any]:
    """The sizes the workload was built with, and what came out: sessions, requests, capacity."""
    steps = [len(s.steps) for s in workload.sessions]
    return {
        "parameters": workload_parameters(workload.name, quick, **(overrides or {})),
        "overrides": dict(overrides or {}),
        "sessions": len(workload.sessions),
        "requests": workload.num_requests(),
        "max_steps_per_session": max(steps, default=0),
        "cache_tokens": workload.cache_tokens,
    }


def measured_prices(args: argparse.Namespace, notes: list[str]) -> tuple[Pricing | None, dict[str, Any] | None]:
    """The measured-compute price table: from --compute-pricing, or a calibration run now (with its figures)."""
    if args.compute_pricing:
        table = PriceTable.from_file(args.compute_pricing)
        name = _model_source(args.model).name if not args.endpoint else (args.model or DEFAULT_MODEL_NAME)
        if name in table.by_model:
            return table.for_model(name), {"source": f"pricing file {args.compute_pricing} ({name})"}
        if len(table.by_model) == 1:  # a calibration file written for one model: take it, but say which
            ((other, pricing),) = table.by_model.items()
            notes.append(f"--compute-pricing: {args.compute_pricing} prices {other!r}, not {name!r}; used anyway")
            return pricing, {"source": f"pricing file {args.compute_pricing} ({other})"}
        if table.fallback is PRESETS["default"]:  # no flat table either: from_file fell back to the preset
            raise ValueError(f"{args.compute_pricing} has no prices for {name!r} nor a top-level table")
        return table.fallback, {"source": f"pricing file {args.compute_pricing} (top-level table)"}
    if args.no_calibrate:
        notes.append("measured-compute pricing skipped (--no-calibrate)")
        return None, None
    from promptcache.bench.calibrate import calibrate, measured_pricing, tldr_table

    t0 = time.perf_counter()
    cal = calibrate(model=None if args.endpoint else args.model, quick=args.quick, device=args.device,
                    dtype=args.dtype, seed=args.seed, progress=args.progress)  # fmt: skip
    info = {
        "source": f"calibrate(quick={args.quick}) on this machine, {time.perf_counter() - t0:.0f} s",
        **cal.to_dict(),
        "tldr_table": tldr_table(cal),
    }
    if args.endpoint:
        notes.append("measured-compute prices are this machine's, with the local model, not the endpoint's")
    return measured_pricing(cal), info


def run_bench(args: argparse.Namespace, argv: Sequence[str]) -> dict[str, Any]:
    """Run every selected workload on every selected target; returns the results (JSON-ready)."""
    t_start = time.perf_counter()
    names = list(WORKLOADS) if args.workload == "all" else [args.workload]
    notes: list[str] = []
    engine_args = EngineArgs(device=args.device, dtype=args.dtype, block_size=args.block_size, seed=args.seed,
                             eviction_policy=args.eviction_policy)  # fmt: skip
    measured, calibration = measured_prices(args, notes)
    pricings: dict[str, Pricing] = dict(PRESETS)
    if measured is not None:
        pricings[MEASURED] = measured
    if args.endpoint:
        targets = [ENDPOINT]
        notes.append(
            "--endpoint: only the endpoint runs. It returns no token ids and its cache capacity is unknown, so the "
            "Belady / LFU / LRU simulation and the hit-ratio plot are skipped; its 'caching off' cost is its own "
            "tokens priced with no cache reads."
        )
    else:
        targets = [ENGINE_ON, ENGINE_OFF] + ([] if args.no_transformers else [TRANSFORMERS])
        if args.no_transformers:
            notes.append("transformers target skipped (--no-transformers)")
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": shlex.join(["promptcache", "bench", *argv]),
        "argv": list(argv),
        "seed": args.seed,
        "quick": args.quick,
        "model": (args.model or DEFAULT_MODEL_NAME) if args.endpoint else _model_source(args.model).name,
        "engine": asdict(engine_args),
        "targets": targets,
        "machine": machine_info(),
        "versions": versions(),
        "pricing": {name: asdict(p) for name, p in pricings.items()},
        "calibration": calibration,
        "capacity_note": CAPACITY_NOTE,
        "workloads": {},
        "notes": notes,
    }
    for name in names:
        overrides = args.sizes.get(name, {})
        workload = make_workload(name, quick=args.quick, seed=args.seed, **overrides)
        entry: dict[str, Any] = {
            "description": workload.description,
            "sizes": workload_facts(workload, args.quick, overrides),
        }
        runs: dict[str, RunResult] = {}
        t0 = time.perf_counter()
        if args.endpoint:
            runs[ENDPOINT] = run_endpoint(workload, args.endpoint, args.model, args.api_key, args.ignore_eos,
                                          args.progress, concurrency=args.concurrency)  # fmt: skip
        else:
            runs[ENGINE_ON], runs[ENGINE_OFF] = run_engine_pair(workload, args.model, engine_args, args.progress)
            if not args.no_transformers:
                runs[TRANSFORMERS] = run_transformers(workload, runs[ENGINE_ON].records, args.model, engine_args,
                                                      args.progress)  # fmt: skip
        entry["runs"] = {
            t: {"info": run.info, "figures": run_figures(run), "records": [r.as_json() for r in run.records]}
            for t, run in runs.items()
        }
        primary = runs.get(ENGINE_ON) or runs[ENDPOINT]
        # Only where a cache is in play: the caching-off engine and transformers serve nothing from cache by design.
        share = {t: previous_turn_share(runs[t].records, args.block_size) for t in (ENGINE_ON, ENDPOINT) if t in runs}
        entry["previous_turn_share"] = {t: v for t, v in share.items() if v is not None}
        if ENGINE_ON in runs:
            entry["ttft_p50_off_over_on"] = _ratio(
                entry["runs"][ENGINE_OFF]["figures"]["ttft_p50_s"], entry["runs"][ENGINE_ON]["figures"]["ttft_p50_s"]
            )
            if TRANSFORMERS in runs:
                entry["ttft_p50_transformers_over_on"] = _ratio(
                    entry["runs"][TRANSFORMERS]["figures"]["ttft_p50_s"],
                    entry["runs"][ENGINE_ON]["figures"]["ttft_p50_s"],
                )
            entry["belady"] = belady_analysis(
                runs[ENGINE_ON].records, runs[ENGINE_ON].info["num_kv_blocks"], args.block_size, args.eviction_policy
            )
        # Greedy decoding of the same prompt gives the same ids on every target, cache or not: say where it did not.
        entry["output_agreement"] = output_agreement(runs)
        off = runs[ENGINE_OFF].records if ENGINE_OFF in runs else None
        entry["cost"] = cost_comparison(primary.records, off, pricings)
        entry["cost_basis"] = (
            "off: the caching-off engine run; on: the caching-on engine run"
            if off is not None
            else "off: the endpoint run's tokens with no cache reads; on: as the endpoint reported them"
        )
        entry["wall_s"] = time.perf_counter() - t0
        results["workloads"][name] = entry
    results["wall_s"] = time.perf_counter() - t_start
    return results


def parse_sizes(items: Sequence[str], names: Sequence[str], quick: bool) -> dict[str, dict[str, int]]:
    """``--size`` items as per-workload overrides: ``KEY=N`` sets size KEY of every selected workload that has it,
    ``WORKLOAD.KEY=N`` only that workload's.

    Raises:
        ValueError: malformed items, a size no selected workload has, or a value ``workload_sizes`` refuses.
    """
    sizes: dict[str, dict[str, int]] = {name: {} for name in names}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--size takes KEY=N or WORKLOAD.KEY=N, got {item!r}")
        try:
            number = int(value)
        except ValueError:
            raise ValueError(f"--size {key}: {value!r} is not an integer") from None
        workload, dot, size = key.rpartition(".")
        if dot and workload not in names:
            raise ValueError(f"--size {item}: workload {workload!r} is not selected (selected: {', '.join(names)})")
        targets = [workload] if dot else [n for n in names if size in {*workload_parameters(n, quick), "cache_tokens"}]
        if not targets:
            raise ValueError(f"--size {item}: no selected workload has a size {size!r}")
        for name in targets:
            sizes[name][size] = number
    for name, overrides in sizes.items():
        workload_parameters(name, quick, **overrides)  # raises on an unknown size or a value out of range
    return sizes


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="promptcache bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workload", default="all", choices=[*WORKLOADS, "all"], help="a workload or all of them")
    parser.add_argument("--quick", action="store_true", help="small sizes: everything in about a minute on 2 cores")
    parser.add_argument("--size", action="append", default=[], metavar="[WORKLOAD.]KEY=N",
                        help="override a workload size, e.g. requests=768 or chat.users=32 (repeatable; the sizes "
                        "are listed in promptcache.bench.workloads.make_workload)")  # fmt: skip
    parser.add_argument("--out", default=None, help="report folder (default bench-out/<timestamp>)")
    parser.add_argument("--endpoint", default=None, help="an OpenAI-compatible server's URL; only it is benchmarked")
    parser.add_argument("--api-key", default=None, help="for --endpoint (default $OPENAI_API_KEY)")
    parser.add_argument("--ignore-eos", action="store_true",
                        help="for --endpoint: send ignore_eos (vLLM, promptcache): fixed output lengths")  # fmt: skip
    parser.add_argument("--concurrency", type=int, default=1, metavar="N",
                        help="for --endpoint: up to N requests (so N sessions) in flight at once, each session's "
                        "turns still in order (default 1: one request at a time, TTFT is never queueing)")  # fmt: skip
    parser.add_argument("--model", default=None,
                        help="a GGUF file, HF folder or hub id (default: the default model); with --endpoint, "
                        "the served model name (default: the first of GET /v1/models)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="workload seed (the same seed gives the same workloads)")
    parser.add_argument("--no-transformers", action="store_true", help="skip the transformers baseline")
    parser.add_argument("--compute-pricing", default=None,
                        help="a pricing file proportional to measured compute (from `promptcache calibrate`); "
                        "default: calibrate now")  # fmt: skip
    parser.add_argument("--no-calibrate", action="store_true", help="no measured-compute pricing, presets only")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--eviction-policy", default=DEFAULT_EVICTION_POLICY, choices=list(EVICTION_POLICIES),
                        help="the engine's eviction policy (both are replayed offline beside Belady's)")  # fmt: skip
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    args = parser.parse_args(list(argv))
    if args.concurrency < 1:
        parser.error(f"--concurrency must be >= 1, got {args.concurrency}")
    if args.concurrency > 1 and not args.endpoint:
        parser.error("--concurrency applies to --endpoint only (the in-process targets run one request at a time)")
    try:
        args.sizes = parse_sizes(args.size, list(WORKLOADS) if args.workload == "all" else [args.workload], args.quick)
    except ValueError as e:
        parser.error(str(e))
    return args


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a parent package missing, or a module set to None in sys.modules
        return False


def missing_dependencies(args: argparse.Namespace) -> list[str]:
    """The optional packages that the chosen options need and that cannot be imported, each with what needs it."""
    needed = {"matplotlib": "for the plots"}
    if args.endpoint:
        needed |= {"openai": "for --endpoint", "httpx": "for --endpoint"}
    elif not args.no_transformers:
        needed["transformers"] = "for the transformers baseline; --no-transformers skips it"
    return [f"{name} ({why})" for name, why in needed.items() if not _importable(name)]


def main(argv: Sequence[str] | None = None) -> int:
    """``promptcache bench``: run, then write results.json, summary.md and the plots into --out."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    # Before any work: a missing package would otherwise surface only after every workload has run.
    missing = missing_dependencies(args)
    if missing:
        print(f"promptcache bench: error: missing {', '.join(missing)}; install the benchmark extras with: "
              f"{BENCH_INSTALL}", file=sys.stderr)  # fmt: skip
        return 2
    from promptcache.bench.report import write_report

    out = Path(args.out or Path("bench-out") / time.strftime("%Y%m%d-%H%M%S"))
    results = run_bench(args, argv)
    paths = write_report(results, out)
    print((out / "summary.md").read_text())
    print(f"wrote {', '.join(str(p) for p in paths.values())} in {results['wall_s']:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
