"""Calibration: what one prompt token, one cached prompt token and one output token cost on this machine.

    promptcache calibrate [--model MODEL] [--device auto] [--dtype auto] [--quick]
                          [--out calibrated-pricing.toml] [--json calibration.json] [--tiers [--redis-url URL]]
    python -m promptcache.bench.calibrate ...   (the same)

Every figure is wall-clock seconds measured through the real engine (``promptcache.LLM``, prefix caching on, a KV
pool sized so that nothing is evicted during the run), the median of repeats, with the measurements of a pair
interleaved so that noise from a shared machine falls on both sides alike:

- **uncached prompt token** (``prefill_s_per_token``): (TTFT of a cold ~2,048-token prompt - TTFT of a cold
  1-token prompt) / (length - 1), both with ``max_tokens=1``. Subtracting the 1-token prompt removes the fixed
  per-request cost (admission, one forward's launch overhead, sampling), which is not per token.
- **cached prompt token** (``cached_s_per_token``): the *marginal* cost of a prompt token that hits the cache.
  Two prompts share a short suffix of new tokens and differ only in how much of their prefix is cached (~2,016
  vs 64 tokens): (TTFT(hit, long prefix) - TTFT(hit, short prefix)) / (difference in cached tokens). What a
  cached token still costs is finding its block (hashing, lookup) and the new tokens attending over it. It can be
  tiny and, on a noisy machine, come out at or below zero: the measured value is kept as it is here and in the
  JSON (with its noise band); only the pricing file clamps it, at ``CACHED_FLOOR_FRACTION`` of an uncached token.
  The whole-request view, TTFT(hit) / TTFT(cold) for prompts of equal length, is reported beside it.
- **output token at batch B** (``output_s_per_token[B]``, B = 1, 8, 32): B requests of a short prompt run
  concurrently through one ``generate`` call with ``ignore_eos`` and ``max_tokens=M``; all are prefilled in one
  step and then decode in lockstep, one token per sequence per step. The step time is a request's decode time
  (first token to last) / (M - 1); the compute cost of one output token is **step time / B**, the share of a
  step that each sequence's token uses. Per-step overhead stays in: every output token needs its own step.

The ratios that pricing is about: output vs input at batch B = ``output_s_per_token[B] / prefill_s_per_token``;
cached vs uncached = ``cached_s_per_token / prefill_s_per_token``. ``measured_pricing`` turns them into a
pricing file (USD per million tokens, proportional to compute, uncached input at ``input_price``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import shlex
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from promptcache.engine.request import SamplingParams
from promptcache.pricing import Pricing, write_pricing_file

BATCH_SIZES = (1, 8, 32)
# The pricing file never prices a cached token below this fraction of an uncached one: a measured marginal cost
# at or under zero is noise around "almost free", and a zero price would hide that reading a block is not free.
CACHED_FLOOR_FRACTION = 0.001
# What providers charge, for the comparison table (the seed's "often 4-5x" and the 0.1x cached-read discount).
PROVIDER_OUTPUT_OVER_INPUT = "4-5x"
PROVIDER_CACHED_OVER_INPUT = "0.1x"
DEFAULT_MODEL_NAME = "promptcache-default"


@dataclass
class Sizes:
    """What is measured and how often; ``quick()`` keeps the lengths and cuts the repeats (5 s here; full 12 s)."""

    prompt_tokens: int = 2048  # cold prompt length; the long cached prefix plus the suffix has this length too
    suffix_tokens: int = 32  # new tokens after a cached prefix
    short_prefix_tokens: int = 64  # cached prefix of the short hit (block-aligned)
    decode_prompt_tokens: int = 64  # prompt of each decoding request: 32 x 64 = 2,048, one prefill step
    decode_tokens: int = 64  # M, output tokens per decoding request
    batch_sizes: tuple[int, ...] = BATCH_SIZES
    cold_repeats: int = 9
    hit_repeats: int = 21
    decode_repeats: int = 5
    prefill_batch: int = 4  # cold prompts in one generate call, for the throughput cross-check

    @classmethod
    def quick(cls) -> Sizes:
        return cls(decode_tokens=16, cold_repeats=3, hit_repeats=9, decode_repeats=2, prefill_batch=2)


@dataclass
class Calibration:
    """Seconds of compute per token, measured on this machine, plus every raw number (``raw``).

    ``cached_s_per_token`` is the measured marginal cost as it came out (it may be tiny or, from noise, <= 0);
    ``output_s_per_token`` maps a batch size to the compute cost of one output token at that batch size
    (decode step time / batch size). The module docstring defines each figure.
    """

    prefill_s_per_token: float  # one uncached prompt token (cold prefill of a long prompt, per-request cost removed)
    cached_s_per_token: float  # one cached prompt token: the extra cost of a prompt token that hits the cache
    output_s_per_token: dict[int, float]  # batch size -> seconds of compute per output token at that batch size
    raw: dict[str, Any] = field(default_factory=dict)

    def output_over_input(self, batch: int) -> float:
        """Cost of an output token at ``batch`` over an uncached prompt token."""
        return self.output_s_per_token[batch] / self.prefill_s_per_token

    @property
    def cached_over_uncached(self) -> float:
        """Marginal cost of a cached prompt token over an uncached one (as measured, unclamped)."""
        return self.cached_s_per_token / self.prefill_s_per_token

    def to_dict(self) -> dict[str, Any]:
        """Everything, JSON-ready (batch sizes become string keys)."""
        return {
            "prefill_s_per_token": self.prefill_s_per_token,
            "cached_s_per_token": self.cached_s_per_token,
            "output_s_per_token": {str(b): v for b, v in sorted(self.output_s_per_token.items())},
            "ratios": {
                "output_over_input": {str(b): self.output_over_input(b) for b in sorted(self.output_s_per_token)},
                "cached_over_uncached": self.cached_over_uncached,
            },
            "raw": self.raw,
        }


# ---- measuring ----------------------------------------------------------------------------------------------
class _NoBar:
    """Stands in for tqdm when it is not installed (it comes with transformers, not with promptcache itself)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def update(self, n: int = 1) -> None:
        pass

    def set_description(self, desc: str) -> None:
        pass

    def close(self) -> None:
        pass


@contextmanager
def _progress(total: int, enabled: bool) -> Iterator[Any]:
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm ships with transformers
        tqdm = _NoBar
    bar = tqdm(total=total, desc="calibrate", unit="run", disable=not enabled, file=sys.stderr, leave=False)
    try:
        yield bar
    finally:
        bar.close()


def _quartiles(xs: Sequence[float]) -> tuple[float, float]:
    if len(xs) < 2:
        return xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


class _Calibrator:
    """One engine, one random stream of prompt ids, and the three measurements."""

    def __init__(self, llm: Any, sizes: Sizes, seed: int, bar: Any):
        self.llm, self.sizes, self.bar = llm, sizes, bar
        self.rng = random.Random(seed)
        self.vocab = llm.engine.model_config.vocab_size
        self.block = llm.engine.kv.block_size
        self.first_token = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)

    def ids(self, n: int) -> list[int]:
        # Random ids: every cold prompt is new to the cache, and no id means anything special to the engine.
        return [self.rng.randrange(self.vocab) for _ in range(n)]

    def ttft(self, prompt: list[int], expect_cached: int) -> float:
        out = self.llm.generate([prompt], self.first_token)[0]
        if out.num_cached_tokens != expect_cached:
            raise RuntimeError(
                f"calibration expected {expect_cached} cached tokens and got {out.num_cached_tokens}: "
                "is prefix caching on and the KV pool large enough?"
            )
        return float(out.metrics.time_to_first_token or 0.0)

    def prefill(self) -> dict[str, Any]:
        """Cold TTFT of a long prompt vs a 1-token prompt, interleaved; per-token = difference / (length - 1)."""
        n = self.sizes.prompt_tokens
        self.bar.set_description("calibrate: cold prefill")
        self.ttft(self.ids(n), 0)  # warm-up: first use of these shapes, not measured
        self.ttft(self.ids(1), 0)
        longs, ones = [], []
        for _ in range(self.sizes.cold_repeats):
            longs.append(self.ttft(self.ids(n), 0))
            ones.append(self.ttft(self.ids(1), 0))
            self.bar.update(1)
        long_s, one_s = statistics.median(longs), statistics.median(ones)
        per_token = (long_s - one_s) / (n - 1)
        # Cross-check: several cold prompts in one generate call, wall time over all their tokens (per-request
        # costs included, so it reads a little higher).
        k = self.sizes.prefill_batch
        t = time.perf_counter()
        self.llm.generate([self.ids(n) for _ in range(k)], self.first_token)
        batch_wall = time.perf_counter() - t
        self.bar.update(1)
        return {
            "prompt_tokens": n,
            "cold_ttft_s": longs,
            "one_token_ttft_s": ones,
            "cold_ttft_median_s": long_s,
            "one_token_ttft_median_s": one_s,
            "s_per_token": per_token,
            "tokens_per_s": 1.0 / per_token if per_token > 0 else None,
            "batch_cross_check": {
                "prompts": k,
                "wall_s": batch_wall,
                "s_per_token": batch_wall / (k * n),
                "tokens_per_s": k * n / batch_wall,
            },
        }

    def cached(self, cold_ttft_s: float) -> dict[str, Any]:
        """Hits with a long vs a short cached prefix and the same number of new tokens, interleaved."""
        s = self.sizes
        self.bar.set_description("calibrate: cached prefix")
        long_prefix = (s.prompt_tokens - s.suffix_tokens) // self.block * self.block
        suffix = s.prompt_tokens - long_prefix  # the long hit has the cold prompt's length: the whole-request view
        short_prefix = min(s.short_prefix_tokens // self.block * self.block, long_prefix)
        prefix = self.ids(long_prefix)
        self.ttft(prefix + self.ids(suffix), 0)  # writes the prefix into the cache
        self.ttft(prefix[:short_prefix] + self.ids(suffix), short_prefix)  # warm-up of the short shape
        longs, shorts = [], []
        for _ in range(s.hit_repeats):
            # A fresh suffix each time, so that every request hits exactly its prefix and no more.
            longs.append(self.ttft(prefix + self.ids(suffix), long_prefix))
            shorts.append(self.ttft(prefix[:short_prefix] + self.ids(suffix), short_prefix))
            self.bar.update(1)
        long_s, short_s = statistics.median(longs), statistics.median(shorts)
        delta = long_prefix - short_prefix
        per_token = (long_s - short_s) / delta
        # Noise band: half the interquartile range of the paired differences, per cached token.
        q1, q3 = _quartiles([a - b for a, b in zip(longs, shorts)])
        noise = (q3 - q1) / 2 / delta
        return {
            "long_prefix_tokens": long_prefix,
            "short_prefix_tokens": short_prefix,
            "suffix_tokens": suffix,
            "hit_long_ttft_s": longs,
            "hit_short_ttft_s": shorts,
            "hit_long_ttft_median_s": long_s,
            "hit_short_ttft_median_s": short_s,
            "delta_cached_tokens": delta,
            "s_per_token": per_token,
            "noise_s_per_token": noise,
            "resolved": per_token > noise,
            "whole_request": {
                "prompt_tokens": long_prefix + suffix,
                "hit_ttft_s": long_s,
                "cold_ttft_s": cold_ttft_s,
                "hit_over_cold": long_s / cold_ttft_s,
            },
        }

    def decode(self) -> dict[str, Any]:
        """B concurrent requests decoding M tokens each; compute cost per output token = step time / B."""
        s = self.sizes
        self.bar.set_description("calibrate: decode")
        for b in s.batch_sizes:
            self._decode_once(b, min(4, s.decode_tokens))  # warm-up of each batch shape
        steps: dict[int, list[float]] = {b: [] for b in s.batch_sizes}
        spreads: dict[int, list[float]] = {b: [] for b in s.batch_sizes}
        # Round-robin over the batch sizes, so that a busy spell on a shared machine falls on all of them alike.
        for _ in range(s.decode_repeats):
            for b in s.batch_sizes:
                step, spread = self._decode_once(b, s.decode_tokens)
                steps[b].append(step)
                spreads[b].append(spread)
                self.bar.update(1)
        by_batch: dict[str, Any] = {}
        for b in s.batch_sizes:
            step_s = statistics.median(steps[b])
            by_batch[str(b)] = {
                "step_s": steps[b],
                "step_median_s": step_s,
                "s_per_token": step_s / b,
                "tokens_per_s": b / step_s,
                "first_token_spread_s": max(spreads[b]),
            }
        return {
            "prompt_tokens": s.decode_prompt_tokens,
            "output_tokens": s.decode_tokens,
            "by_batch": by_batch,
        }

    def _decode_once(self, batch: int, m: int) -> tuple[float, float]:
        params = SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True)
        outs = self.llm.generate([self.ids(self.sizes.decode_prompt_tokens) for _ in range(batch)], params)
        if any(len(o.token_ids) != m for o in outs):
            raise RuntimeError("a decoding request stopped early despite ignore_eos")
        step = statistics.median([(o.metrics.decode_time or 0.0) / max(m - 1, 1) for o in outs])
        firsts = [o.metrics.first_token_time or 0.0 for o in outs]
        return step, max(firsts) - min(firsts)


def _num_runs(sizes: Sizes) -> int:
    return sizes.cold_repeats + 1 + sizes.hit_repeats + len(sizes.batch_sizes) * sizes.decode_repeats


def _pool_blocks(sizes: Sizes, block: int) -> int:
    """KV blocks for every token the calibration writes, so that nothing is evicted mid-run ("ample")."""
    per = math.ceil
    cold = (sizes.cold_repeats + 1 + sizes.prefill_batch) * (per((sizes.prompt_tokens + 1) / block) + 1)
    ones = (sizes.cold_repeats + 1) * 1
    hits = sizes.prompt_tokens // block + 2 * (sizes.hit_repeats + 2) * (per((sizes.suffix_tokens + 1) / block) + 2)
    decode = sum(
        (sizes.decode_repeats + 1) * b * (per((sizes.decode_prompt_tokens + sizes.decode_tokens) / block) + 1)
        for b in sizes.batch_sizes
    )
    return int((cold + ones + hits + decode) * 1.1) + 64


def calibrate(
    model: str | None = None,
    quick: bool = False,
    device: str = "cpu",
    dtype: str = "float32",
    seed: int = 0,
    progress: bool = True,
    sizes: Sizes | None = None,
) -> Calibration:
    """Measure the compute cost of an uncached prompt token, a cached one and an output token (batch 1, 8, 32).

    ``model`` is anything ``--model`` takes (default: the default model). ``sizes`` overrides what ``quick`` picks.
    """
    import torch

    from promptcache import LLM
    from promptcache.model.source import resolve_model

    sizes = sizes or (Sizes.quick() if quick else Sizes())
    source = resolve_model(model)
    path = source.path
    block_size = 16
    # Keep the long prompt inside the model's context (a small model may not have 2,048 tokens).
    context = source.config().max_position_embeddings
    if sizes.prompt_tokens + 2 > context:
        sizes = replace(sizes, prompt_tokens=max(2 * block_size + sizes.suffix_tokens, context - 2))
    started = time.perf_counter()
    llm = LLM(
        model=str(path),
        device=device,
        dtype=dtype,
        block_size=block_size,
        num_kv_blocks=_pool_blocks(sizes, block_size),
        enable_prefix_caching=True,
        seed=seed,
    )
    load_s = time.perf_counter() - started
    with _progress(_num_runs(sizes), progress) as bar:
        cal = _Calibrator(llm, sizes, seed, bar)
        prefill = cal.prefill()
        cached = cal.cached(prefill["cold_ttft_median_s"])
        decode = cal.decode()
    engine = llm.engine
    stats = llm.cache_stats()
    prefill_cost = prefill["s_per_token"]
    output = {int(b): v["s_per_token"] for b, v in decode["by_batch"].items()}
    raw: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "argv": shlex.join(sys.argv),
        "machine": _machine(engine.device),
        "versions": _versions(),
        "config": {
            "model": str(path),
            "model_name": _model_name(model),
            "device": str(engine.device),
            "dtype": str(engine.dtype).removeprefix("torch."),
            "seed": seed,
            "quick": quick,
            "block_size": block_size,
            "max_num_batched_tokens": engine.config.max_num_batched_tokens,
            "kv_blocks": stats["num_blocks"],
            "sizes": asdict(sizes),
            "torch_threads": torch.get_num_threads(),
        },
        "definitions": {
            "prefill_s_per_token": "(median cold TTFT of the long prompt - median cold TTFT of a 1-token prompt)"
            " / (length - 1); the subtraction removes the fixed per-request cost",
            "cached_s_per_token": "(median TTFT, long cached prefix - median TTFT, short cached prefix) / (difference"
            " in cached tokens), same new suffix length; may be <= 0 from noise, kept as measured",
            "output_s_per_token": "decode step time (a request's first-to-last-token time / (M - 1), median) / batch"
            " size: the compute cost of one output token at that batch size",
            "output_over_input": "output_s_per_token[B] / prefill_s_per_token",
            "cached_over_uncached": "cached_s_per_token / prefill_s_per_token",
        },
        "load_s": load_s,
        "prefill": prefill,
        "cached": cached,
        "decode": decode,
        "ratios": {
            "output_over_input": {str(b): c / prefill_cost for b, c in sorted(output.items())},
            "cached_over_uncached": cached["s_per_token"] / prefill_cost,
            "hit_over_cold_ttft": cached["whole_request"]["hit_over_cold"],
        },
        "cache_stats": stats,
        "wall_s": time.perf_counter() - started,
    }
    return Calibration(
        prefill_s_per_token=prefill_cost,
        cached_s_per_token=cached["s_per_token"],
        output_s_per_token=output,
        raw=raw,
    )


def _machine(device: Any) -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    if getattr(device, "type", "cpu") == "cuda":
        import torch

        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _versions() -> dict[str, str]:
    import torch

    import promptcache

    return {"promptcache": promptcache.__version__, "torch": torch.__version__, "python": platform.python_version()}


def _model_name(model: str | None) -> str:
    """The name the server serves ``model`` under (so that a pricing file written for it applies there)."""
    from promptcache.model.source import resolve_model

    return resolve_model(model, quiet=True).name


# ---- pricing and the table ----------------------------------------------------------------------------------
def cached_cost_for_pricing(cal: Calibration) -> float:
    """The cached-token cost the pricing file uses: the measured one, at least ``CACHED_FLOOR_FRACTION`` of an
    uncached token."""
    return max(cal.cached_s_per_token, CACHED_FLOOR_FRACTION * cal.prefill_s_per_token)


def measured_pricing(cal: Calibration, input_price: float = 1.0, batch: int = 32) -> Pricing:
    """Prices proportional to the measured costs, scaled so that an uncached prompt token costs ``input_price``
    (USD per million tokens).

    Cache writes are priced as uncached input: writing a block is the prefill that produced it, nothing more.
    Output is priced at the cost per output token at ``batch``; a cached token at ``cached_cost_for_pricing``.
    """
    if not cal.prefill_s_per_token > 0:
        raise ValueError(f"the measured prefill cost must be > 0 to scale prices, got {cal.prefill_s_per_token}")
    if input_price < 0:
        raise ValueError(f"input_price must be >= 0, got {input_price}")
    if batch not in cal.output_s_per_token:
        measured = ", ".join(str(b) for b in sorted(cal.output_s_per_token))
        raise ValueError(f"no output cost measured at batch {batch}; measured at: {measured}")
    usd_per_second = input_price / cal.prefill_s_per_token  # per million tokens of a given kind
    return Pricing(
        input=input_price,
        cached_input=cached_cost_for_pricing(cal) * usd_per_second,
        cache_write_5m=input_price,
        cache_write_1h=input_price,
        output=cal.output_s_per_token[batch] * usd_per_second,
    )


def _x(ratio: float) -> str:
    """A ratio as people read it: 27x, 4.6x, 0.028x."""
    if ratio >= 10:
        return f"{ratio:.0f}x"
    if ratio >= 1:
        return f"{ratio:.1f}x"
    return f"{ratio:.2g}x"


def _us(seconds: float) -> str:
    """Seconds as µs, or as ms from a millisecond up."""
    return f"{seconds * 1e3:.3g} ms" if abs(seconds) >= 1e-3 else f"{seconds * 1e6:.3g} µs"


def tldr_table(cal: Calibration) -> str:
    """The seed's TL;DR table with this machine's measurements beside what providers charge (Markdown)."""
    cfg = cal.raw.get("config", {})
    batches = sorted(cal.output_s_per_token)
    out_costs = ", ".join(f"batch {b}: {_us(cal.output_s_per_token[b])}" for b in batches)
    out_ratios = ", ".join(f"{_x(cal.output_over_input(b))} at batch {b}" for b in batches)
    cached_ratio = cal.cached_over_uncached
    hit_over_cold = cal.raw.get("ratios", {}).get("hit_over_cold_ttft")
    where = " on ".join(
        x for x in (cfg.get("model_name"), " ".join(str(cfg[k]) for k in ("device", "dtype") if k in cfg)) if x
    )
    lines = [
        f"TL;DR, measured{' (' + where + ')' if where else ''}",
        "",
        "| | Input | Output |",
        "|---|---|---|",
        "| Computation | Parallel prefill | Sequential decode |",
        "| Determinism | Deterministic given input | Stochastic (sampling) |",
        "| Reuse pattern | Same prompts sent repeatedly | Generated once, rarely resent |",
        "| Cacheable across requests? | Yes | Not until it becomes input on the next turn |",
        f"| Measured compute per token | uncached: {_us(cal.prefill_s_per_token)}; cached: "
        f"{_us(cal.cached_s_per_token)} | {out_costs} |",
        f"| Measured cost vs an uncached input token | cached: {_x(cached_ratio)} (providers charge "
        f"{PROVIDER_CACHED_OVER_INPUT}) | {out_ratios} (providers charge {PROVIDER_OUTPUT_OVER_INPUT}) |",
        "",
        "| ratio | measured here | providers charge |",
        "|---|---|---|",
    ]
    lines += [
        f"| output / uncached input, batch {b} | {_x(cal.output_over_input(b))} | {PROVIDER_OUTPUT_OVER_INPUT} |"
        for b in batches
    ]
    lines.append(f"| cached / uncached input (marginal) | {_x(cached_ratio)} | {PROVIDER_CACHED_OVER_INPUT} |")
    if hit_over_cold is not None:
        lines.append(f"| TTFT of a cache hit / a cold prompt, same length (whole request) | {_x(hit_over_cold)} | - |")
    lines += [
        "",
        "Output cost = decode step time / batch size; uncached input = cold prefill minus the fixed per-request "
        "cost; cached = the marginal cost of one more cached prefix token. Wall-clock, medians of repeats.",
    ]
    if cached_ratio <= CACHED_FLOOR_FRACTION:
        lines.append(
            f"The cached cost is within noise of zero; the pricing file floors it at {CACHED_FLOOR_FRACTION:g}x input."
        )
    return "\n".join(lines)


# ---- command line -------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="promptcache calibrate",
        description="Measure the compute cost of prompt, cached and output tokens here and write a pricing file "
        "proportional to them.",
    )
    parser.add_argument("--model", default=None, help="a GGUF file, HF folder or hub id (default: the default model)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto, as the server)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and output tokens (seconds)")
    parser.add_argument("--out", default="calibrated-pricing.toml", help="the pricing file to write (TOML)")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write every raw number as JSON here")
    parser.add_argument("--batch", type=int, default=32, choices=BATCH_SIZES, help="price output at this batch size")
    parser.add_argument("--input-price", type=float, default=1.0, help="USD per million uncached prompt tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--tiers", action="store_true", help="also weigh loading a block from the host and disk tiers "
                        "(and Redis with --redis-url) against recomputing it")  # fmt: skip
    parser.add_argument("--redis-url", default=None, help="the Redis that --tiers measures (default: none)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``promptcache calibrate``: measure, print the TL;DR table, write the pricing file (and the JSON)."""
    args = build_parser().parse_args(argv)
    try:
        cal = calibrate(args.model, args.quick, args.device, args.dtype, args.seed, progress=not args.no_progress)
        pricing = measured_pricing(cal, args.input_price, args.batch)
    except ValueError as err:
        print(f"promptcache calibrate: error: {err}", file=sys.stderr)
        return 2
    # The command as a user would retype it, whichever way it was started (promptcache calibrate or python -m).
    cal.raw["command"] = shlex.join(["promptcache", "calibrate", *(sys.argv[1:] if argv is None else argv)])
    name = _model_name(args.model)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_pricing_file(args.out, name, pricing)
    print(tldr_table(cal))
    if args.tiers:
        from promptcache.bench.tier_bench import calibrate_tiers, tiers_table

        dtype = cal.raw["config"]["dtype"]
        cal.raw["tiers"] = calibrate_tiers(args.model, dtype, cal.prefill_s_per_token, args.redis_url)
        print("\n" + tiers_table(cal.raw["tiers"]))
    print(f"\npricing file for model {name!r} (output at batch {args.batch}): {args.out}")
    if args.json:
        doc = {
            **cal.to_dict(),
            "pricing": {
                "file": args.out,
                "model": name,
                "batch": args.batch,
                "usd_per_million": asdict(pricing),
                "cached_s_per_token_priced": cached_cost_for_pricing(cal),
                "cached_floor_fraction": CACHED_FLOOR_FRACTION,
            },
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
        print(f"raw numbers: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
