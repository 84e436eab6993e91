"""Engine benchmark: promptcache against transformers on the same weights, every figure a ratio from one run.

    python -m promptcache.bench.engine_bench [--models default,qwen0.5b] [--out docs/engine-bench.json]

Figures per model (float32 unless --dtype says otherwise):
- cold prefill throughput of a 2,048-token prompt, ours / transformers (one forward, logits of the last token);
- TTFT of a 2,048-token cached prefix + 32 new tokens: ours cold / ours hit, and the best a transformers user
  can do (a DynamicCache of the prefix, deep-copied per request) / ours hit;
- decode throughput of 16 concurrent requests vs transformers generating them one by one;
- time per output token of one request, ours / transformers;
- KV bytes per token (checked against 2 x layers x kv_heads x head_dim x dtype bytes) and peak RSS.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import random
import resource
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from promptcache import LLM, SamplingParams
from promptcache.engine.engine import DEFAULT_MODEL


@dataclass
class Sizes:
    """Workload sizes; ``quick()`` shrinks them for a smoke run."""

    prefix: int = 2048
    suffix: int = 32
    batch: int = 16
    decode_tokens: int = 64

    @classmethod
    def quick(cls) -> Sizes:
        return cls(prefix=256, suffix=16, batch=4, decode_tokens=8)


QWEN_05B = dict(
    vocab_size=151936,
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    max_position_embeddings=32768,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    tie_word_embeddings=True,
    eos_token_id=None,
    bos_token_id=None,
)


def synthetic_qwen(folder: Path) -> Path:
    """A random-weight model with Qwen2.5-0.5B's shapes (the tokenizer is the embedded model's)."""
    import shutil

    import transformers

    torch.manual_seed(0)
    config = transformers.Qwen2Config(**QWEN_05B)
    model = transformers.Qwen2ForCausalLM(config).eval()
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEFAULT_MODEL / name, folder / name)
    return folder


def median_time(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


class Bench:
    def __init__(self, path: Path, dtype: str, repeats: int, vocab_cap: int, sizes: Sizes):
        import transformers

        self.path, self.repeats, self.sizes = path, repeats, sizes
        self.rng = random.Random(0)
        self.vocab = vocab_cap
        torch_dtype = getattr(torch, dtype)
        self.hf = transformers.AutoModelForCausalLM.from_pretrained(
            path, torch_dtype=torch_dtype, attn_implementation="sdpa"
        ).eval()
        self.llm = LLM(model=str(path), dtype=dtype, device="cpu", kv_cache_memory_gb=1.0)

    def ids(self, n: int) -> list[int]:
        return [self.rng.randrange(self.vocab) for _ in range(n)]

    def ours_ttft(self, prompt: list[int]) -> float:
        out = self.llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True))[0]
        return out.metrics.time_to_first_token or 0.0

    @torch.inference_mode()
    def hf_forward(self, ids: list[int], past: Any = None) -> Any:
        return self.hf(input_ids=torch.tensor([ids]), past_key_values=past, use_cache=True, logits_to_keep=1)

    def prefill(self) -> dict[str, float]:
        n_prefix = self.sizes.prefix
        # Interleaved, so that noise from the shared machine falls on both sides alike.
        ours_t, hf_t = [], []
        for _ in range(self.repeats):
            ours_t.append(self.ours_ttft(self.ids(n_prefix)))
            hf_t.append(median_time(lambda: self.hf_forward(self.ids(n_prefix)), 1))
        ours, hf = statistics.median(ours_t), statistics.median(hf_t)
        return {
            "ours_s": ours,
            "transformers_s": hf,
            "ours_tok_s": n_prefix / ours,
            "transformers_tok_s": n_prefix / hf,
            "ratio": hf / ours,
        }

    def cached_ttft(self) -> dict[str, float]:
        n_prefix, n_suffix = self.sizes.prefix, self.sizes.suffix
        prefix = self.ids(n_prefix)
        self.ours_ttft(prefix + self.ids(n_suffix))  # warm the prefix into the cache
        past = self.hf_forward(prefix).past_key_values
        hits, colds, reuses = [], [], []
        for _ in range(max(self.repeats, 5)):
            out = self.llm.generate([prefix + self.ids(n_suffix)], SamplingParams(temperature=0.0, max_tokens=1))[0]
            assert out.num_cached_tokens == n_prefix, out.num_cached_tokens
            hits.append(out.metrics.time_to_first_token or 0.0)
            reuses.append(median_time(lambda: self.hf_forward(self.ids(n_suffix), copy.deepcopy(past)), 1))
        for _ in range(self.repeats):
            colds.append(self.ours_ttft(self.ids(n_prefix + n_suffix)))
        hit, cold, hf_reuse = statistics.median(hits), statistics.median(colds), statistics.median(reuses)
        return {
            "ours_hit_s": hit,
            "ours_cold_s": cold,
            "transformers_reuse_s": hf_reuse,
            "cold_over_hit": cold / hit,
            "transformers_reuse_over_hit": hf_reuse / hit,
        }

    def decode(self) -> dict[str, float]:
        n = self.sizes.decode_tokens
        prompts = [self.ids(64) for _ in range(self.sizes.batch)]
        params = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
        t = time.perf_counter()
        outs = self.llm.generate(prompts, params)
        ours_batch = time.perf_counter() - t
        assert all(len(o.token_ids) == n for o in outs)

        def hf_generate(p: list[int], n: int) -> None:
            with torch.inference_mode():
                self.hf.generate(torch.tensor([p]), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

        t = time.perf_counter()
        for p in prompts:
            hf_generate(p, n)
        hf_serial = time.perf_counter() - t
        # Time per output token of a single request: decode time over the tokens after the first.
        single = [self.llm.generate([p], params)[0] for p in prompts[:3]]
        ours_tpot = statistics.median((o.metrics.decode_time or 0.0) / (n - 1) for o in single)
        hf_one = median_time(lambda: hf_generate(prompts[0], 1), 3)
        hf_full = median_time(lambda: hf_generate(prompts[0], n), 3)
        hf_tpot = (hf_full - hf_one) / (n - 1)
        total = self.sizes.batch * n
        return {
            "ours_batch_tok_s": total / ours_batch,
            "transformers_serial_tok_s": total / hf_serial,
            "throughput_ratio": hf_serial / ours_batch,
            "ours_tpot_s": ours_tpot,
            "transformers_tpot_s": hf_tpot,
            "tpot_ratio": ours_tpot / hf_tpot,
        }

    def memory(self) -> dict[str, float]:
        cfg = self.llm.engine.model_config
        elem = torch.tensor([], dtype=self.llm.engine.dtype).element_size()
        formula = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * elem
        return {
            "kv_bytes_per_token": self.llm.engine.kv_bytes_per_token,
            "formula_bytes_per_token": formula,
            "kv_pool_bytes": self.llm.engine.runner.kv_cache_bytes,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }


def run(models: list[str], dtype: str, repeats: int, sizes: Sizes | None = None) -> dict[str, Any]:
    sizes = sizes or Sizes()
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "threads": torch.get_num_threads(),
        },
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "dtype": dtype,
        "sizes": sizes.__dict__,
        "models": {},
    }
    import transformers

    results["versions"]["transformers"] = transformers.__version__
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            path = DEFAULT_MODEL if name == "default" else synthetic_qwen(Path(tmp) / "qwen")
            vocab = 8192  # prompt ids drawn from the embedded tokenizer's range, valid for both models
            # The 0.5B model decodes ~10x slower here: fewer tokens keep transformers' serial run in minutes.
            model_sizes = sizes if name == "default" else replace(sizes, decode_tokens=min(sizes.decode_tokens, 16))
            bench = Bench(path, dtype, repeats, vocab, model_sizes)
            entry = {"prefill": bench.prefill(), "cached_ttft": bench.cached_ttft(), "decode": bench.decode()}
            entry["memory"] = bench.memory()
            results["models"][name] = entry
            print(json.dumps({name: entry}, indent=2), flush=True)
            del bench
    return results


def markdown(results: dict[str, Any]) -> str:
    # The labels name the sizes that were run (--quick runs smaller ones), those of older results Sizes()'s.
    sizes = {**Sizes().__dict__, **results.get("sizes", {})}
    rows = [
        (
            f"cold prefill throughput, {sizes['prefix']:,}-token prompt, ours / transformers (target >= 1.0x)",
            "prefill",
            "ratio",
            "{:.2f}x",
        ),
        (
            f"TTFT {sizes['prefix']:,} cached + {sizes['suffix']:,} new: cold / hit (target >= 20x)",
            "cached_ttft",
            "cold_over_hit",
            "{:.1f}x",
        ),
        (
            "TTFT hit: transformers DynamicCache copy / ours (target >= 2x)",
            "cached_ttft",
            "transformers_reuse_over_hit",
            "{:.2f}x",
        ),
        (
            f"decode, {sizes['batch']} concurrent vs transformers one by one (target >= 4x)",
            "decode",
            "throughput_ratio",
            "{:.1f}x",
        ),
        ("time per output token, ours / transformers (target <= 0.6x)", "decode", "tpot_ratio", "{:.2f}x"),
        ("KV bytes per token (= 2 x layers x kv_heads x head_dim x dtype)", "memory", "kv_bytes_per_token", "{:,}"),
        ("peak RSS of the benchmark process, MiB", "memory", "peak_rss_mib", "{:,.0f}"),
    ]
    names = list(results["models"])
    lines = ["| figure | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for label, group, key, fmt in rows:
        cells = [fmt.format(results["models"][n][group][key]) for n in names]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="default,qwen0.5b", help="comma list of: default, qwen0.5b")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run in seconds")
    parser.add_argument("--out", default=None, help="write the raw results as JSON here")
    args = parser.parse_args()
    results = run(args.models.split(","), args.dtype, args.repeats, Sizes.quick() if args.quick else Sizes())
    print(markdown(results))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
