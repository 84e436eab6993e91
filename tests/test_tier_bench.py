"""Smoke test of the tier benchmark (promptcache/bench/tier_bench.py): its smallest slice, checked for structure and
for the one thing its figures rest on, that every timed request was served by the tier its row names."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest

from promptcache.bench import tier_bench
from promptcache.model.source import EMBEDDED_MODEL

pytestmark = [
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="the tier benchmark starts its own redis-server"),
    pytest.mark.filterwarnings("ignore:The given buffer is not writable"),
]
ROWS = {
    "device": "device",
    "host": "host",
    "disk (page cache)": "disk",
    "disk (page cache dropped)": "disk",
    "redis": "redis",
    "redis from another engine": "redis",
}


def test_ttft_and_bandwidth_slice(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Per-file fadvise instead of dropping the whole machine's page cache from a test.
    monkeypatch.setattr(tier_bench, "MACHINE_WIDE_DROP", False)
    sizes = tier_bench.Sizes(
        prefix=64, suffix=16, output_tokens=2, repeats=2, cold_repeats=1, bandwidth_blocks=4, bandwidth_rounds=1,
        workloads={}, restart=None,
    )  # fmt: skip
    results = tier_bench.run(["default"], sizes, workdir=tmp_path, sections=["ttft", "bandwidth"])
    results = json.loads(json.dumps(results))  # what --out writes
    assert list(tmp_path.iterdir()) == [], "the benchmark's directory (disk tiers, Redis) is removed"
    assert {"command", "machine", "sizes", "ttft_by_tier", "worth_loading", "bandwidth", "memory", "wall_s"} <= set(
        results
    )
    assert results["machine"]["cores"] and results["machine"]["torch"]

    model = results["ttft_by_tier"]["models"]["default"]
    rows = {r["row"]: r for r in model["rows"]}
    assert set(rows) == set(ROWS)
    for name, tier in ROWS.items():
        row = rows[name]
        assert row["tier"] == tier
        # Every timed request was served by exactly this tier, and for the whole prefix.
        assert row["served_by"] == [{tier: 64}] * 2, (name, row["served_by"])
        assert row["served_as_claimed"]
        assert row["cold_s"] > 0 and row["tier_s"] > 0
        assert row["cold_over_tier"] == pytest.approx(row["cold_s"] / row["tier_s"])
        assert (row["met"] is None) == (tier == "device")
    for label, engine in model["engines"].items():
        assert engine["cold_served_nothing"], f"a cold request of the {label} engine hit a cache"
        if label != "device":
            assert engine["device_reference_served_by_device"]
    assert model["engines"]["host"]["explain_after_fillers"] == {"device": 0, "host": 64}
    assert rows["disk (page cache dropped)"]["page_cache_drop"] == "fadvise"

    worth = results["worth_loading"]["models"]["default"]["rows"]
    assert [r["row"] for r in worth] == [r for r in ROWS if r != "device"]

    bw = results["bandwidth"]
    assert bw["block_bytes"] == 737_280 and bw["blocks"] == 4
    for tier in ("host", "disk", "redis"):
        assert bw[tier]["write_gb_s"] > 0 and bw[tier]["read_gb_s"] > 0
    assert bw["disk"]["read_cold_gb_s"] > 0 and bw["dd"]["read_cold_gb_s"] > 0
    assert bw["redis_benchmark"]["set_gb_s"] > 0 and bw["redis_benchmark"]["get_gb_s"] > 0
    assert results["memory"]["redis_smollm2_shaped"]["entries"] == 4

    text = tier_bench.markdown(results)
    assert "### 1. TTFT by tier" in text and "### 2. Tier bandwidth" in text and "### 6. Worth loading" in text
    assert "| NO |" not in text
    with socket.socket() as s:  # the benchmark's own redis-server is gone
        assert s.connect_ex(("127.0.0.1", results["redis_port"])) != 0

    # promptcache calibrate --tiers: the same loads through the tier classes, weighed against a recompute cost.
    weighed = tier_bench.calibrate_tiers(str(EMBEDDED_MODEL), "float32", prefill_s_per_token=1.0, blocks=4)
    assert weighed["block_bytes"] == 16 * 2048
    assert set(weighed["tiers"]) == {"host", "disk"}
    assert all(r["worth_loading"] for r in weighed["tiers"].values()), "16 s to recompute a block loses to any tier"
