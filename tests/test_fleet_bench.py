"""The fleet benchmark end to end on a tiny fleet (real replica, router and redis-server processes), and the
endpoint runner's concurrency: sessions in parallel, each session's turns in order with its own answers."""

from __future__ import annotations

import json
import threading
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from conftest import LiveServer

from promptcache.bench import runner
from promptcache.bench.fleet_bench import RECORD_COLUMNS, main
from promptcache.bench.workloads import make_workload
from promptcache.fleet.router import PREDICTED_HEADER, REPLICA_HEADER


def test_the_runner_reads_the_routers_headers_by_their_names() -> None:
    assert (runner.REPLICA_HEADER, runner.PREDICTED_HEADER) == (REPLICA_HEADER, PREDICTED_HEADER)


def test_concurrency_is_refused_below_one_and_outside_an_endpoint(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--endpoint", "http://127.0.0.1:9", "--concurrency", "0"], ["--concurrency", "4"]):
        with pytest.raises(SystemExit):
            runner.parse_args(argv)
        assert "--concurrency" in capsys.readouterr().err
    assert runner.parse_args(["--endpoint", "http://127.0.0.1:9", "--concurrency", "4"]).concurrency == 4


@pytest.fixture(scope="module")
def varied_server(varied_model: Path):
    """A server on a model whose greedy answers vary, so every answer of every session is told apart."""
    server = LiveServer(model=str(varied_model))
    yield server
    server.stop()


def test_concurrent_sessions_each_send_their_own_answers_back_in_order(
    varied_server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    workload = make_workload("chat", quick=True, users=6, turns=3, max_tokens=6)
    sent: dict[int, list[tuple[int, list[str]]]] = defaultdict(list)  # session -> (step, answers in its history)
    answered: dict[tuple[int, int], str] = {}
    lock = threading.Lock()
    in_flight = peak = 0
    # The first two requests meet here before either is sent: it passes only if two are in flight at once.
    meet = threading.Barrier(2, timeout=30)
    calls = 0
    original = runner._endpoint_request

    def spy(client: Any, model: str, wl: Any, index: int, s: int, k: int, answers: list[str], *rest: Any):
        nonlocal in_flight, peak, calls
        with lock:
            sent[s].append((k, list(answers)))
            in_flight += 1
            peak = max(peak, in_flight)
            calls += 1
            first_two = calls <= 2
        if first_two:
            meet.wait()
        try:
            record, text = original(client, model, wl, index, s, k, answers, *rest)
        finally:
            with lock:
                in_flight -= 1
        with lock:
            answered[(s, k)] = text
        return record, text

    monkeypatch.setattr(runner, "_endpoint_request", spy)
    run = runner.run_endpoint(workload, varied_server.url, ignore_eos=True, progress=False, concurrency=4)

    assert 2 <= peak <= 4
    assert len(run.records) == workload.num_requests()
    assert [r.index for r in run.records] == list(range(workload.num_requests()))
    assert [(r.session, r.step) for r in run.records] == workload.order  # index = place in the arrival order
    assert len(set(answered.values())) > workload.num_requests() // 2  # the answers tell the sessions apart
    for s, session in enumerate(workload.sessions):
        steps = [k for k, _ in sent[s]]
        assert steps == list(range(len(session.steps))), f"session {s} sent its steps as {steps}"
        for k, answers in sent[s]:
            assert answers == [answered[(s, j)] for j in range(k)], f"session {s} step {k}"
    # The server recognises its own earlier answers in each history, token for token.
    share = runner.previous_turn_share(run.records, block_size=16)
    assert share is not None and share["min"] >= 0.9
    assert run.info["concurrency"] == 4 and run.wall_s == run.info["wall_clock_s"]
    assert all(r.start_s is not None and r.start_s >= 0 for r in run.records)
    assert all(r.first_chunk_s is not None and 0 < r.first_chunk_s <= r.ttft_s for r in run.records)
    assert all(r.replica is not None and r.cached_by_tier is not None for r in run.records)  # a server, no router
    assert all(r.predicted_cached_tokens is None and r.retries == 0 for r in run.records)
    assert all(sum(r.cached_by_tier.values()) == r.cached_tokens for r in run.records)


def test_a_tiny_fleet_benchmark_reports_every_figure(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "fleet.json"
    argv = ["--out", str(out), "--quick", "--replicas", "2", "--policies", "cache,round-robin", "--workloads",
            "chat", "--size", "chat.users=3", "--size", "chat.turns=3", "--size", "chat.max_tokens=4",
            "--concurrency", "3", "--no-progress", "--max-minutes", "3"]  # fmt: skip
    assert main(argv) == 0
    results = json.loads(out.read_text())
    assert results["complete"] and results["machine"]["cpu_count"] and results["versions"]["openai"]
    assert results["command"].startswith("python -m promptcache.bench.fleet_bench --out")
    entry = results["workloads"]["chat"]
    ws, pool = entry["working_set"], entry["pool_per_replica"]
    assert pool["blocks"] > 0 and pool["kv_bytes_per_token"] == results["model"]["kv_bytes_per_token"] > 0
    assert 0 <= ws["shared_blocks"] <= ws["blocks"] <= ws["blocks_if_nothing_shared"]
    assert set(entry["policies"]) == {"cache", "round-robin"}
    for policy, cell in entry["policies"].items():
        f = cell["figures"]
        assert f["requests"] == entry["requests"] == 9 == len(cell["records"])
        assert sum(f["requests_per_replica"].values()) == f["requests"], policy
        assert set(f["requests_per_replica"]) == {"r0", "r1"}
        assert f["requests_without_replica_header"] == 0 and f["client_retries"] >= 0
        replica = RECORD_COLUMNS.index("replica")
        assert all(row[replica] in ("r0", "r1") for row in cell["records"])
        ratio = f["requests_per_replica_max_over_min"]
        assert ratio is None or ratio >= 1
        pred = f["prediction"]
        assert pred["requests_compared"] == f["requests"]
        assert 0 <= pred["exact_share"] <= 1 and pred["mean_abs_error_tokens"] >= 0
        assert pred["over_predicted"] + pred["under_predicted"] <= f["requests"]
        assert 0 <= f["device_tokens"] <= f["cached_tokens"] <= f["prompt_tokens"]
        assert sum(f["cached_tokens_by_tier"].values()) == f["cached_tokens"]
        assert 0 < f["ttft_p50_ms"] <= f["ttft_p99_ms"] and f["wall_s"] > 0
        assert 0 < f["first_token_p50_ms"] <= f["ttft_p50_ms"] and f["first_token_p99_ms"] <= f["ttft_p99_ms"]
        assert 0 <= f["requests_with_text_held_back"] <= f["requests"]
        assert {s["num_blocks"] for s in cell["replica_stats"].values()} == {pool["blocks"]}  # the pool asked for
        assert cell["rotation"]["always_up"] == (not cell["rotation"]["changes"])
    ratios = results["ratios"]["chat"]
    assert ratios["ttft_p99_cache_over_round_robin"] > 0
    assert {t["status"] for t in results["targets"]} <= {"met", "missed"}
    assert all(isinstance(t["replicas_always_up"], bool) for t in results["targets"])
    assert [t["workload"] for t in results["targets"]] == ["chat"] * 3  # the balance target needs `unique`
    table = capsys.readouterr().out
    assert "round-robin" in table and "target [" in table
