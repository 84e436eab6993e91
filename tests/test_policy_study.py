"""The eviction-policy study: every workload's trace replayed under Belady, LFU and LRU at several capacities."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

from promptcache.bench import policy_study
from promptcache.bench.workloads import WORKLOADS


def test_the_study_covers_every_workload_and_belady_bounds_every_policy(tmp_path: Path, capsys) -> None:
    out = tmp_path / "study.json"
    assert policy_study.main(["--quick", "--seeds", "0", "--half-lives", "2,8", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert {r["workload"] for r in rows} == {*WORKLOADS, "pressure x4"}
    assert data["command"].endswith("--out " + str(out))
    for r in rows:
        assert set(r["over_belady"]) == {"lru", "lfu", "lfu (half-life 2)", "perfect-lfu", "popularity-oracle"}
        for policy, figures in r["over_belady"].items():
            assert 0.0 <= figures["min"] <= figures["mean"] <= 1.0 + 1e-9, (r["workload"], r["capacity"], policy)
    # pressure is also replayed at the capacity its benchmark runs with, and at the smallest fraction the cache is
    # too small for an LRU replay to keep everything Belady keeps.
    pressure = [r for r in rows if r["workload"] == "pressure"]
    assert pressure[0]["capacity"].startswith("its own")
    assert min(r["over_belady"]["lru"]["mean"] for r in pressure) < 1.0
    table = capsys.readouterr().out
    assert table.startswith("| workload | cache capacity | lru | lfu (half-life 2) | lfu | perfect-lfu |")
    assert table.count("\n") == len(rows) + 2  # a header, its rule, a line per row


def test_answers_come_back_token_exact_in_the_next_turn() -> None:
    # A chat trace with synthetic answers: each turn reads (as a possible hit) every full block the previous turn
    # of its conversation wrote, answer included, as the engine's replay makes happen.
    from promptcache.engine.engine import DEFAULT_MODEL
    from promptcache.tokenizer import Tokenizer

    trace, capacity = policy_study.workload_trace(Tokenizer.from_pretrained(DEFAULT_MODEL), "chat", 0, True, 16,
                                                  users=1, turns=3)  # fmt: skip
    assert capacity is None and len(trace) == 3
    for before, after in itertools.pairwise(trace):
        assert after.reads[: len(before.writes)] == before.writes
