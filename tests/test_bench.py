"""The engine benchmark runs end to end (small sizes) and reports what it claims to."""

from __future__ import annotations

from typing import Any

import pytest

from promptcache.bench.engine_bench import Sizes, markdown, run


@pytest.fixture(scope="module")
def quick_results() -> dict[str, Any]:
    return run(["default"], "float32", repeats=1, sizes=Sizes.quick())


def test_quick_benchmark_reports_every_figure(quick_results: dict[str, Any]) -> None:
    fig = quick_results["models"]["default"]
    assert fig["prefill"]["ours_tok_s"] > 0 and fig["prefill"]["transformers_tok_s"] > 0
    assert fig["cached_ttft"]["ours_hit_s"] < fig["cached_ttft"]["ours_cold_s"]
    assert fig["decode"]["throughput_ratio"] > 1.0  # a batch of 4 beats 4 serial generations
    assert fig["memory"]["kv_bytes_per_token"] == fig["memory"]["formula_bytes_per_token"] == 2048
    assert fig["memory"]["ours_load_s"] > 0 and fig["memory"]["transformers_load_s"] > 0
    # A real `promptcache serve` was started and measured: more than the interpreter, less than a GiB.
    assert 100 < fig["memory"]["serve_rss_mib"] < 1024
    table = markdown(quick_results)
    assert "cold prefill throughput" in table and "| default |" in table


def test_the_table_names_the_sizes_that_were_run(quick_results: dict[str, Any]) -> None:
    quick = Sizes.quick()  # 256-token prefix, 16 new tokens, a batch of 4
    table = markdown(quick_results)
    assert f"cold prefill throughput, {quick.prefix:,}-token prompt" in table
    assert f"TTFT {quick.prefix:,} cached + {quick.suffix:,} new: cold / hit" in table
    assert f"decode, {quick.batch} concurrent vs transformers one by one" in table
    full = Sizes()
    assert f"{full.prefix:,}-token" not in table and f"{full.prefix:,} cached" not in table
    assert f"{full.batch} concurrent" not in table
