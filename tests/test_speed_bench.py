"""The speed benchmark runs end to end (a child process per configuration) and reports what issue 12 asks for."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from promptcache.bench import speed_bench
from promptcache.engine.engine import DEFAULT_MODEL


def test_quick_speed_bench_reports_decode_against_the_floor_ttft_prefill_and_rss(tmp_path: Path) -> None:
    out = tmp_path / "speed.json"
    args = ["--quick", "--model", str(DEFAULT_MODEL), "--configs", "fp32-eager", "--baseline-rev", ""]
    args += ["--out", str(out)]
    assert speed_bench.main(args) == 0
    report = json.loads(out.read_text())
    assert report["machine"]["read_bandwidth_gb_s"] > 0.1
    r = report["results"]["fp32-eager"]
    assert r["execution"]["weights"] == "dense" and r["execution"]["compiled_buckets"] is None
    assert set(r["decode_ms"]) == {"1", "16"} and all(ms > 0 for ms in r["decode_ms"].values())
    floor_ms = r["weight_bytes"] / (report["machine"]["read_bandwidth_gb_s"] * 1e9) * 1000
    assert r["floor_ms"] == pytest.approx(floor_ms, rel=1e-9)
    assert r["share_of_floor"]["1"] == pytest.approx(floor_ms / r["decode_ms"]["1"], rel=1e-9)
    assert r["ttft_hit_cached_tokens"] >= 256 - 16  # every timed request really hit the cached prefix
    assert r["cold_prefill_ms"] > 0 and r["concurrent16_tokens_per_s"] > 0
    assert r["rss_end_mb"] >= r["rss_loaded_mb"] * 0.5 > 0
