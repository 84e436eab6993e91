"""The soak benchmark, scaled down: a real redis-server, two `promptcache serve` replicas (one with its disk tier on a
tmpfs) and a router, 8 clients for about 18 seconds while Redis is restarted, the disk filled and a replica killed;
then the invariants the soak checks, one test each. Also the pieces that need no fleet: the fault plan, how a failed
stream is put down to a killed replica, and what counts as an error body in each API's format."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from promptcache.bench.soak import (
    ANTHROPIC,
    BAD_INPUTS,
    FAULTS,
    OPENAI,
    RECOVERY,
    STEADY,
    Record,
    cut_by_kill,
    error_format_problem,
    fault_plan,
    phase_at,
    windows,
)

# About 18 s of load with every fault once: the replica first (its restart is the slowest, so it overlaps the load
# rather than extending it), then Redis, then the disk; a small device pool so blocks go down to the tiers.
SOAK_ARGS = ["--minutes", "0.3", "--clients", "8", "--quick", "--kv-tokens", "4096",
             "--faults", "replica,redis,disk", "--fault-seconds", "2", "--fault-every", "4", "--recovery-seconds", "2",
             "--recovery-timeout", "60", "--request-timeout", "60", "--sample-seconds", "1", "--max-overrun", "90",
             "--max-minutes", "5"]  # fmt: skip


@pytest.fixture(scope="module")
def soak(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One short soak for the whole module (a process of its own: the soak installs a SIGTERM handler)."""
    if shutil.which("redis-server") is None:
        pytest.skip("the soak needs redis-server (Debian: apt-get install redis-server)")
    out = tmp_path_factory.mktemp("soak") / "soak.json"
    # The soak's own watchdog (--max-minutes) stops it well before this; the timeout only guards the test itself.
    done = subprocess.run([sys.executable, "-m", "promptcache.bench.soak", *SOAK_ARGS, "--out", str(out)],
                          capture_output=True, text=True, timeout=420)  # fmt: skip
    assert out.exists(), f"no report (exit {done.returncode}): {done.stderr[-4000:]}"
    report = json.loads(out.read_text())
    report.update(_stdout=done.stdout, _stderr=done.stderr, _rc=done.returncode, _png=out.with_suffix(".png"))
    return report


def _invariant(report: dict[str, Any], name: str) -> dict[str, Any]:
    return report["invariants"][name]


def test_the_soak_completes_and_writes_its_report_plot_and_summary(soak: dict[str, Any]) -> None:
    assert soak["complete"], soak["notes"]
    assert soak["requests"]["total"] > 0
    assert set(soak["requests"]["by_kind"]) >= {"workload", "greedy", "disconnect", "bad-input"}
    assert Path(soak["_png"]).stat().st_size > 10_000
    assert "| invariant | ok | value |" in soak["_stdout"]
    assert soak["_rc"] == (0 if all(v["ok"] for v in soak["invariants"].values()) else 1)


def test_no_valid_request_failed_outside_the_kill_window(soak: dict[str, Any]) -> None:
    failures = soak["failures"]
    assert failures["failed"] == 0, json.dumps(failures["details"][:10], indent=1)
    # Streams cut by the kill were on the killed replica and ended within the grace after the kill.
    killed = [f for f in soak["faults"] if f["kind"] == "replica"]
    for cut in failures["cut_by_kill_details"]:
        assert any(cut["replica"] == f["replica"] and cut["start_s"] <= f["start_s"] + 0.01 for f in killed), cut


def test_greedy_outputs_all_equal_the_cold_reference(soak: dict[str, Any]) -> None:
    greedy = soak["greedy"]
    assert greedy["checks"] > 0
    assert greedy["mismatches"] == 0, json.dumps(greedy["mismatch_details"][:5], indent=1)


def test_no_block_is_leaked_and_every_cache_is_intact(soak: dict[str, Any]) -> None:
    assert _invariant(soak, "no_leaked_blocks")["ok"], _invariant(soak, "no_leaked_blocks")
    assert _invariant(soak, "integrity_ok")["ok"], {n: r["integrity"] for n, r in soak["final"]["replicas"].items()}
    assert _invariant(soak, "router_load_released")["ok"], _invariant(soak, "router_load_released")


def test_every_bad_input_got_a_4xx_in_its_apis_format(soak: dict[str, Any]) -> None:
    bad = soak["bad_input"]
    # The sweep at the start sends every case at least once, however short the run.
    assert set(bad["by_case"]) == {f"{api}/{name}" for name, api, _ in BAD_INPUTS}
    assert bad["wrong"] == 0, json.dumps(bad["details"][:10], indent=1)


def test_every_fault_was_injected_and_the_fleet_survived_it(soak: dict[str, Any]) -> None:
    faults = soak["faults"]
    assert sorted({f["kind"] for f in faults if "start_s" in f and "error" not in f}) == sorted(FAULTS), faults
    for f in faults:
        assert f["survived"], f
    disk = next(f for f in faults if f["kind"] == "disk")
    if soak["disk"]["tmpfs"]:  # a real ENOSPC (whether the tier wrote meanwhile, and saw it, depends on the load)
        assert disk["enospc"] and disk["free_bytes_while_full"] < 64 * 1024, disk
    replica = next(f for f in faults if f["kind"] == "replica")
    assert replica["rejoined"] and replica["restarted_pid"] != replica["killed_pid"], replica


# ---- the pieces, without a fleet ---------------------------------------------------------------------------------
def test_the_fault_plan_puts_every_fault_in_the_run_and_cycles_them_when_it_is_long() -> None:
    short = fault_plan(list(FAULTS), 20, 60)
    assert [k for _, k in short] == list(FAULTS)
    assert all(2 <= at < 20 for at, _ in short)
    long = fault_plan(list(FAULTS), 3600, 120)
    assert len(long) == 3 * ((3600 - 60) // 360) and [k for _, k in long[:4]] == [*FAULTS, FAULTS[0]]
    assert fault_plan([], 600, 60) == []


def _record(start: float, end: float, replica: str | None, stream: bool = True) -> Record:
    return Record("workload", "chat", OPENAI, stream, start, end, None, 200, "failed", "error event", replica)


def test_only_a_stream_on_the_killed_replica_cut_at_the_kill_is_put_down_to_it() -> None:
    kill = {"kind": "replica", "replica": "r1", "start_s": 10.0, "end_s": 25.0}
    assert cut_by_kill(_record(8.0, 10.3, "r1"), [kill]) is kill
    assert cut_by_kill(_record(8.0, 10.3, "r0"), [kill]) is None  # another replica
    assert cut_by_kill(_record(10.5, 11.0, "r1"), [kill]) is None  # sent after the kill: the router must retry it
    assert cut_by_kill(_record(8.0, 30.0, "r1"), [kill]) is None  # failed long after the kill
    assert cut_by_kill(_record(8.0, 10.3, "r1", stream=False), [kill]) is None  # a whole body is never cut


def test_phases_come_from_the_fault_windows_then_the_recovery_after_each() -> None:
    spans = windows([{"phase": "redis-down", "start_s": 10.0, "end_s": 15.0}], 5.0)
    assert [phase_at(t, spans) for t in (5, 12, 17, 30)] == [STEADY, "redis-down", RECOVERY, STEADY]


def test_error_bodies_are_checked_against_each_apis_own_format() -> None:
    openai_body = {"error": {"message": "bad", "type": "invalid_request_error", "param": None, "code": None}}
    anthropic_body = {"type": "error", "error": {"type": "invalid_request_error", "message": "bad"}}
    assert error_format_problem(OPENAI, 400, openai_body) is None
    assert error_format_problem(ANTHROPIC, 404, anthropic_body) is None
    assert error_format_problem(OPENAI, 400, anthropic_body) is not None
    assert error_format_problem(ANTHROPIC, 400, openai_body) is not None
    assert error_format_problem(OPENAI, 500, openai_body) is not None
    assert error_format_problem(ANTHROPIC, 200, {"type": "message"}) is not None
    assert error_format_problem(OPENAI, 400, "<html>bad</html>") is not None
