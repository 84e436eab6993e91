"""The server benchmark runs end to end (small sizes) against a real server and reports what it claims to."""

from __future__ import annotations

import json

import pytest

from promptcache.bench.server_bench import Sizes, markdown, run


def test_quick_server_benchmark_reports_every_figure() -> None:
    results = run(Sizes.quick())
    ttft, over, itl = results["ttft"], results["overhead"], results["itl"]

    # 1. a cached prefix beats a cold one, and the usage says it was a cache hit (and the cold ones were not)
    assert 0 < ttft["hit_median_s"] < ttft["cold_median_s"]
    assert ttft["cache_hit_proved"]
    assert ttft["expected_cached_tokens"] >= Sizes.quick().prefix_tokens - 16
    assert min(ttft["hit_cached_tokens"]) >= ttft["expected_cached_tokens"]
    assert ttft["cold_cached_tokens"] == [0] * len(ttft["cold_ttft_s"])
    assert len(ttft["hit_ttft_s"]) == len(ttft["cold_ttft_s"]) == Sizes.quick().ttft_pairs

    # 2. server overhead: both sides measured, the same greedy answer from both identical engines
    for api in ("completions", "chat"):
        fig = over[api]
        assert fig["http_median_s"] > 0 and fig["inprocess_median_s"] > 0
        assert len(fig["http_s"]) == len(fig["inprocess_s"]) == Sizes.quick().overhead_requests
        assert fig["overhead_ms"] == pytest.approx((fig["http_median_s"] - fig["inprocess_median_s"]) * 1e3)
        assert fig["same_output"]
        assert fig["http_raw_median_s"] > 0 and "overhead_paired_ms" in fig
    assert over["bare_http_median_s"] > 0

    # 3. inter-token latency through HTTP and in-process
    assert itl["http_median_s"] > 0 and itl["inprocess_median_s"] > 0
    assert itl["ratio"] == pytest.approx(itl["http_median_s"] / itl["inprocess_median_s"])

    assert results["machine"]["cpu_count"] and results["versions"]["openai"] and results["command"]
    json.dumps(results)  # every raw number is JSON
    table = markdown(results)
    assert "TTFT" in table and "server overhead" in table and "inter-token latency" in table
