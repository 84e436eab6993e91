"""The engine benchmark runs end to end (small sizes) and reports what it claims to."""

from __future__ import annotations

from promptcache.bench.engine_bench import Sizes, markdown, run


def test_quick_benchmark_reports_every_figure() -> None:
    results = run(["default"], "float32", repeats=1, sizes=Sizes.quick())
    fig = results["models"]["default"]
    assert fig["prefill"]["ours_tok_s"] > 0 and fig["prefill"]["transformers_tok_s"] > 0
    assert fig["cached_ttft"]["ours_hit_s"] < fig["cached_ttft"]["ours_cold_s"]
    assert fig["decode"]["throughput_ratio"] > 1.0  # a batch of 4 beats 4 serial generations
    assert fig["memory"]["kv_bytes_per_token"] == fig["memory"]["formula_bytes_per_token"] == 2048
    table = markdown(results)
    assert "cold prefill throughput" in table and "| default |" in table
