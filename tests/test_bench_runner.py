"""The workload benchmark: an end-to-end --quick run and its report, and the arithmetic the report rests on."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from promptcache.bench import runner
from promptcache.bench.report import summary_markdown
from promptcache.bench.runner import (
    BENCH_INSTALL,
    ENDPOINT,
    ENGINE_OFF,
    ENGINE_ON,
    TRANSFORMERS,
    Record,
    RunResult,
    cost_comparison,
    first_difference,
    main,
    missing_dependencies,
    output_agreement,
    output_divergence,
    parse_args,
    parse_sizes,
    percentile,
    previous_turn_share,
    price_run,
    run_endpoint,
)
from promptcache.bench.workloads import WORKLOADS, make_workload
from promptcache.pricing import PRESETS, Pricing

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PLOTS = ("ttft_by_turn.png", "hit_ratio_vs_belady.png", "cost_by_component.png")


def record(session: int, step: int, prompt: int, cached: int | None, output: int) -> Record:
    return Record(
        index=0,
        session=session,
        session_id=f"s{session}",
        step=step,
        turn=step + 1,
        prompt_tokens=prompt,
        cached_tokens=cached,
        output_tokens=output,
        ttft_s=0.01,
        tpot_s=0.001,
        e2e_s=0.02,
    )


# ---- helpers, by hand ------------------------------------------------------------------------------------------
def test_percentile_interpolates_linearly_between_closest_ranks() -> None:
    values = [4.0, 1.0, 3.0, 2.0]  # unsorted on purpose
    assert percentile(values, 0) == 1.0
    assert percentile(values, 50) == 2.5
    assert percentile(values, 90) == pytest.approx(3.7)  # rank 2.7: 3 + 0.7 x (4 - 3)
    assert percentile(values, 100) == 4.0
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None
    with pytest.raises(ValueError, match="percentile"):
        percentile(values, 101)


def test_a_run_is_priced_by_component_from_its_token_counts() -> None:
    # Two requests of 1,000 prompt tokens and 10 output tokens; the second reads 800 of its prompt from the cache.
    on = [record(0, 0, 1000, 0, 10), record(1, 0, 1000, 800, 10)]
    default = PRESETS["default"]  # $1 input, $0.10 cached input, $4 output per million tokens
    cost = price_run(on, default)
    assert cost["input"] == pytest.approx(1200 * 1e-6)  # 1,000 + 200 uncached prompt tokens
    assert cost["cached_input"] == pytest.approx(800 * 0.10e-6)
    assert cost["output"] == pytest.approx(20 * 4e-6)
    assert cost["cache_write_5m"] == cost["cache_write_1h"] == 0.0  # no breakpoints, no cache writes
    assert cost["total"] == pytest.approx(0.00136)

    # Without a caching-off run, "off" is the same tokens priced with no cache reads: 2,000 x $1 + 20 x $4.
    cmp = cost_comparison(on, None, {"default": default})["default"]
    assert cmp["off"]["total"] == pytest.approx(0.00208)
    assert cmp["on"]["total"] == pytest.approx(0.00136)
    assert cmp["saving_usd"] == pytest.approx(0.00072)
    assert cmp["saving_pct"] == pytest.approx(100 * 0.00072 / 0.00208)

    # With a caching-off run, that run is priced as it happened.
    off = [record(0, 0, 1000, 0, 10), record(1, 0, 1000, 0, 12)]
    flat = Pricing(input=2.0, cached_input=0.0, cache_write_5m=0.0, cache_write_1h=0.0, output=10.0)
    cmp = cost_comparison(on, off, {"flat": flat})["flat"]
    assert cmp["off"]["total"] == pytest.approx(2000 * 2e-6 + 22 * 10e-6)
    assert cmp["on"]["total"] == pytest.approx(1200 * 2e-6 + 20 * 10e-6)


def test_previous_turn_share_counts_the_previous_prompt_and_answer() -> None:
    recs = [
        record(0, 0, 100, 0, 12),  # turn 1: 100 + 12 tokens
        record(0, 1, 150, 96, 12),  # turn 2 reads 96 of them (6 blocks of 16; block 7 is partial)
        record(1, 0, 64, 0, 16),  # another session: 80 tokens
        record(1, 1, 120, 64, 16),  # reads 64 of them (the answer's last token's KV is never computed)
    ]
    share = previous_turn_share(recs, block_size=16)
    assert share is not None
    assert share["turns"] == 2
    assert share["min"] == pytest.approx(64 / 80)
    assert share["mean"] == pytest.approx((96 / 112 + 64 / 80) / 2)
    assert share["achievable_mean"] == pytest.approx((96 / 112 + 64 / 80) / 2)  # both hit all that a cache could
    assert previous_turn_share([record(0, 0, 100, None, 12), record(0, 1, 150, None, 12)], 16) is None


# ---- the targets' generated tokens, compared -------------------------------------------------------------------
def generated(index: int, output_ids: list[int], prompt_ids: list[int] | None = None) -> Record:
    rec = record(index, 0, 10, 0, len(output_ids))
    rec.index, rec.prompt_ids, rec.output_ids = index, prompt_ids or [1, 2, 3, index], output_ids
    return rec


def run_of(target: str, outputs: list[list[int]], prompts: list[list[int]] | None = None) -> RunResult:
    recs = [generated(i, ids, prompts[i] if prompts else None) for i, ids in enumerate(outputs)]
    return RunResult(target, recs, wall_s=1.0)


def test_first_difference_is_where_two_id_lists_part() -> None:
    assert first_difference([5, 6, 7], [5, 6, 7]) is None
    assert first_difference([5, 6, 7], [5, 9, 7]) == 1
    assert first_difference([5, 6], [5, 6, 7]) == 2  # one a prefix of the other: they part where it ends
    assert first_difference([], []) is None


def test_identical_runs_report_no_divergence() -> None:
    outputs = [[11, 12, 13], [21, 22], [31, 32, 33, 34]]
    agreement = output_agreement({t: run_of(t, outputs) for t in (ENGINE_ON, ENGINE_OFF, TRANSFORMERS)})
    assert [(p["a"], p["b"]) for p in agreement] == [(ENGINE_ON, ENGINE_OFF), (ENGINE_ON, TRANSFORMERS),
                                                     (ENGINE_OFF, TRANSFORMERS)]  # fmt: skip
    for pair in agreement:
        assert pair["requests_compared"] == 3
        assert pair["requests_diverging"] == 0 and pair["first_divergence"] is None


def test_a_divergence_is_reported_with_its_first_request_and_token() -> None:
    on = run_of(ENGINE_ON, [[11, 12, 13], [21, 22, 23], [31, 32, 33]])
    # Request 1 parts at token 2; request 2 at token 0, after an earlier answer changed its prompt.
    off = run_of(ENGINE_OFF, [[11, 12, 13], [21, 22, 99], [98, 32, 33]],
                 prompts=[[1, 2, 3, 0], [1, 2, 3, 1], [1, 2, 3, 2, 99]])  # fmt: skip
    result = output_divergence(on, off)
    assert result["requests_compared"] == 3 and result["requests_diverging"] == 2
    assert result["first_divergence"] == {"request": 1, "session_id": "s1", "turn": 1, "token": 2,
                                          "same_prompt": True}  # fmt: skip
    # Request 2 alone: its prompt already differed, so the divergence was inherited, and the report says so.
    inherited = output_divergence(on, RunResult(ENGINE_OFF, off.records[2:], wall_s=1.0))
    assert inherited["requests_compared"] == 1 and inherited["first_divergence"]["same_prompt"] is False


def test_requests_without_ids_are_not_compared() -> None:
    endpoint = RunResult(ENDPOINT, [record(0, 0, 10, 0, 3)], wall_s=1.0)  # an endpoint returns no ids
    assert output_agreement({ENGINE_ON: run_of(ENGINE_ON, [[1, 2, 3]]), ENDPOINT: endpoint}) == []
    assert output_divergence(run_of(ENGINE_ON, [[1, 2, 3]]), endpoint)["requests_compared"] == 0


# ---- optional dependencies ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("module", "options", "named"),
    [
        ("matplotlib", [], "matplotlib (for the plots)"),
        ("transformers", [], "transformers (for the transformers baseline; --no-transformers skips it)"),
        ("openai", ["--endpoint", "http://127.0.0.1:9"], "openai (for --endpoint)"),
    ],
)
def test_bench_stops_before_any_work_naming_a_missing_package(
    module: str, options: list[str], named: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # what an interpreter without the package sees
    monkeypatch.setattr(runner, "run_bench", lambda *a: pytest.fail("the benchmark ran with a package missing"))
    out = tmp_path / "report"
    assert main(["--workload", "chat", "--quick", "--out", str(out), *options]) == 2
    err = capsys.readouterr().err.strip()
    assert named in err and BENCH_INSTALL in err and BENCH_INSTALL == 'pip install "promptcache[bench]"'
    assert len(err.splitlines()) == 1
    assert not out.exists()


def test_only_the_packages_the_options_use_are_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.setitem(sys.modules, "openai", None)
    assert missing_dependencies(parse_args(["--no-transformers"])) == []
    assert missing_dependencies(parse_args([])) == [
        "transformers (for the transformers baseline; --no-transformers skips it)"
    ]
    assert missing_dependencies(parse_args(["--endpoint", "http://127.0.0.1:9"])) == ["openai (for --endpoint)"]


# ---- --size ----------------------------------------------------------------------------------------------------
def test_a_bare_size_applies_to_every_selected_workload_that_has_it() -> None:
    sizes = parse_sizes(["requests=50", "users=3", "max_tokens=4"], list(WORKLOADS), quick=True)
    assert sizes["pressure"] == {"requests": 50, "max_tokens": 4}
    assert sizes["chat"] == {"users": 3, "max_tokens": 4}
    assert sizes["agent"] == {"max_tokens": 4}


def test_a_workload_qualified_size_applies_to_that_workload_only() -> None:
    sizes = parse_sizes(["documents.documents=3", "pressure.cache_tokens=4096"], list(WORKLOADS), quick=False)
    assert sizes["documents"] == {"documents": 3} and sizes["pressure"] == {"cache_tokens": 4096}
    assert sizes["chat"] == {}


@pytest.mark.parametrize(
    ("items", "selected", "message"),
    [
        (["bogus=1"], list(WORKLOADS), "no selected workload has a size 'bogus'"),
        (["users"], list(WORKLOADS), "KEY=N"),
        (["chat.users=many"], list(WORKLOADS), "not an integer"),
        (["pressure.tools=2"], list(WORKLOADS), "has no size 'tools'"),
        (["users=0"], ["chat"], "must be >= 1"),
        (["chat.users=3"], ["pressure"], "not selected"),
    ],
)
def test_bad_sizes_are_refused_with_the_reason(items: list[str], selected: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_sizes(items, selected, quick=True)


def test_the_command_line_refuses_a_bad_size_before_running_anything(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        parse_args(["--workload", "chat", "--size", "requests=5"])
    assert exc.value.code == 2 and "no selected workload has a size 'requests'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """`promptcache bench --workload all --quick`: every workload, every target, a quick calibration (and one size
    set on the command line)."""
    out = tmp_path_factory.mktemp("bench")
    assert main(["--workload", "all", "--quick", "--size", "pressure.requests=44", "--out", str(out),
                 "--no-progress"]) == 0  # fmt: skip
    return out, json.loads((out / "results.json").read_text())


def test_quick_run_writes_json_markdown_and_three_png_plots(quick_run: tuple[Path, dict[str, Any]]) -> None:
    out, results = quick_run
    summary = (out / "summary.md").read_text()
    for name in PLOTS:
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC, name
        assert len(data) > 5_000, f"{name} is only {len(data)} bytes"
        assert f"]({name})" in summary  # the summary shows it
    assert list(results["workloads"]) == list(WORKLOADS)
    assert results["command"] == (
        "promptcache bench --workload all --quick --size pressure.requests=44 --out " + str(out) + " --no-progress"
    )
    pressure = results["workloads"]["pressure"]["sizes"]
    assert pressure["overrides"] == {"requests": 44} and pressure["requests"] == 44
    assert pressure["parameters"]["requests"] == 44
    assert results["workloads"]["chat"]["sizes"]["overrides"] == {}
    assert results["machine"]["cpu_count"] >= 1 and results["machine"]["memory_gib"] > 0
    assert {"python", "torch", "transformers", "promptcache"} <= set(results["versions"])
    assert results["seed"] == 0 and results["quick"] is True
    assert results["calibration"]["prefill_s_per_token"] > 0
    for section in ("## Headline", "## Latency and throughput", "## Hit ratio against Belady", "## Cost",
                    "## Compute cost per token"):  # fmt: skip
        assert section in summary


def test_every_target_runs_the_same_requests(quick_run: tuple[Path, dict[str, Any]]) -> None:
    _, results = quick_run
    for name, w in results["workloads"].items():
        runs = w["runs"]
        assert set(runs) == {ENGINE_ON, ENGINE_OFF, TRANSFORMERS}
        expected = make_workload(name, quick=True, **w["sizes"]["overrides"]).num_requests()
        for target, run in runs.items():
            recs = run["records"]
            assert len(recs) == expected, (name, target)
            assert all(r["ttft_s"] > 0 and r["e2e_s"] >= r["ttft_s"] for r in recs), (name, target)
            assert "prompt_ids" not in recs[0]  # the id lists stay out of results.json
        on, hf = runs[ENGINE_ON]["records"], runs[TRANSFORMERS]["records"]
        assert [r["prompt_tokens"] for r in hf] == [r["prompt_tokens"] for r in on]
        assert [r["output_tokens"] for r in hf] == [r["output_tokens"] for r in on]


def test_every_pair_of_targets_generates_the_same_tokens(quick_run: tuple[Path, dict[str, Any]]) -> None:
    out, results = quick_run
    for name, w in results["workloads"].items():
        pairs = {(p["a"], p["b"]): p for p in w["output_agreement"]}
        assert set(pairs) == {(ENGINE_ON, ENGINE_OFF), (ENGINE_ON, TRANSFORMERS), (ENGINE_OFF, TRANSFORMERS)}
        for pair in pairs.values():
            assert pair["requests_compared"] == w["sizes"]["requests"], (name, pair)
            # Greedy float32 on CPU: the cache (or its absence, or transformers) never changes an answer.
            assert pair["requests_diverging"] == 0 and pair["first_divergence"] is None, (name, pair)
    summary = (out / "summary.md").read_text()
    expected = "Generated token ids: promptcache, cache on = promptcache, cache off = transformers (no reuse), on every"
    assert expected in summary and "none diverging" in summary


def test_the_summary_reports_a_divergence_with_where_it_starts(quick_run: tuple[Path, dict[str, Any]]) -> None:
    _, results = quick_run
    diverged = copy.deepcopy(results)
    pair = diverged["workloads"]["chat"]["output_agreement"][1]
    pair.update(requests_diverging=2, first_divergence={"request": 5, "session_id": "chat-3", "turn": 2,
                                                         "token": 7, "same_prompt": True})  # fmt: skip
    summary = summary_markdown(diverged)
    assert "**Generated token ids diverge**" in summary and "none diverging" not in summary
    n = pair["requests_compared"]
    assert (f"- chat: promptcache, cache on vs transformers (no reuse): 2 of {n} requests; the first at request 5 "
            "(chat-3, turn 2), token 7 (same prompt ids)") in summary  # fmt: skip


def test_caching_cuts_time_to_first_token_under_a_shared_system_prompt(quick_run: tuple[Path, dict[str, Any]]) -> None:
    _, results = quick_run
    w = results["workloads"]["system-prompt"]
    on, off = w["runs"][ENGINE_ON]["figures"], w["runs"][ENGINE_OFF]["figures"]
    assert on["ttft_p50_s"] < off["ttft_p50_s"]
    assert w["ttft_p50_off_over_on"] == pytest.approx(off["ttft_p50_s"] / on["ttft_p50_s"])
    assert on["cached_share"] > 0.5  # every question after the first reads the system prompt from the cache


def test_chat_turns_hit_the_cache_through_the_previous_answer(quick_run: tuple[Path, dict[str, Any]]) -> None:
    _, results = quick_run
    share = results["workloads"]["chat"]["previous_turn_share"][ENGINE_ON]
    assert share["turns"] > 0
    assert share["min"] >= 0.9
    turns = results["workloads"]["chat"]["runs"][ENGINE_ON]["figures"]["ttft_by_turn"]
    assert [t["turn"] for t in turns] == list(range(1, len(turns) + 1))


def test_nothing_is_served_from_cache_with_caching_off(quick_run: tuple[Path, dict[str, Any]]) -> None:
    _, results = quick_run
    for name, w in results["workloads"].items():
        for target in (ENGINE_OFF, TRANSFORMERS):
            assert all(r["cached_tokens"] == 0 for r in w["runs"][target]["records"]), (name, target)
            assert w["runs"][target]["figures"]["cached_tokens"] == 0


def test_caching_saves_money_under_the_default_preset(quick_run: tuple[Path, dict[str, Any]]) -> None:
    _, results = quick_run
    default = PRESETS["default"]
    for name, w in results["workloads"].items():
        cost = w["cost"]["default"]
        assert cost["saving_usd"] > 0, name
        assert cost["on"]["total"] < cost["off"]["total"]
        # The report's "on" total is the caching-on run's records priced by hand.
        recs = w["runs"][ENGINE_ON]["records"]
        prompt = sum(r["prompt_tokens"] for r in recs)
        cached = sum(r["cached_tokens"] for r in recs)
        output = sum(r["output_tokens"] for r in recs)
        by_hand = ((prompt - cached) * default.input + cached * default.cached_input + output * default.output) / 1e6
        assert cost["on"]["total"] == pytest.approx(by_hand, abs=1e-9)
        assert set(w["cost"]) == {*PRESETS, "measured"}


def test_belady_bounds_the_engines_policies_at_every_capacity(quick_run: tuple[Path, dict[str, Any]]) -> None:
    _, results = quick_run
    for name, w in results["workloads"].items():
        b = w["belady"]
        assert b["belady_hit_ratio"] >= max(b["lru_sim_hit_ratio"], b["lfu_sim_hit_ratio"]), name
        assert len(b["sweep"]) >= 6
        for point in b["sweep"]:
            assert point["belady"] >= max(point["lru"], point["lfu"]), (name, point)
        if w["sizes"]["cache_tokens"] is None:  # an ample cache evicts nothing: every policy gets every hit
            assert b["measured_hit_ratio"] == pytest.approx(b["belady_hit_ratio"]), name


def test_the_engine_evicts_as_its_simulated_policy_does_under_pressure(
    quick_run: tuple[Path, dict[str, Any]],
) -> None:
    _, results = quick_run
    w = results["workloads"]["pressure"]
    b = w["belady"]
    assert w["runs"][ENGINE_ON]["info"]["evictions"] > 0  # the working set does not fit
    assert b["capacity_blocks"] < b["working_set_blocks"]
    assert b["engine_policy"] == "lfu"  # the default
    # Same capacity, same policy: the measured hits and the offline replay agree to within a few points (the
    # engine's scratch block for a partial last block costs it at most one extra eviction per request).
    assert b["measured_hit_ratio"] == pytest.approx(b["lfu_sim_hit_ratio"], abs=0.05)
    steady = b["steady_state"]
    assert 0 < steady["measured_hit_tokens"] <= steady["belady_hit_tokens"]


# ---- an OpenAI-compatible endpoint (our own server) ------------------------------------------------------------
def test_endpoint_target_reads_ttft_and_cached_tokens_from_the_stream(live_server: Any) -> None:
    workload = make_workload("chat", quick=True, users=2, turns=3)
    run = run_endpoint(workload, live_server.url, ignore_eos=True, progress=False)
    assert run.target == ENDPOINT
    assert run.info["model"] == "promptcache-default"  # from GET /v1/models
    assert len(run.records) == workload.num_requests()
    for r in run.records:
        assert r.cached_tokens is not None and r.prompt_tokens > 0
        assert r.output_tokens == workload.sessions[r.session].steps[r.step].max_tokens  # ignore_eos
        assert 0 < r.ttft_s <= r.e2e_s
    share = previous_turn_share(run.records, block_size=16)
    assert share is not None and share["min"] >= 0.9  # the server replays its answers token for token
    cost = cost_comparison(run.records, None, {"default": PRESETS["default"]})["default"]
    assert cost["saving_usd"] > 0
