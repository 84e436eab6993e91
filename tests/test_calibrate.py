"""Calibration: measured token costs, the pricing they imply, and the TL;DR table beside providers' ratios."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest

from promptcache import LLM
from promptcache.bench.calibrate import (
    CACHED_FLOOR_FRACTION,
    Calibration,
    Sizes,
    _Calibrator,
    _NoBar,
    cached_cost_for_pricing,
    calibrate,
    main,
    measured_pricing,
    tldr_table,
)
from promptcache.pricing import PriceTable


def hand_made(cached: float = 5e-6) -> Calibration:
    """100 µs per uncached prompt token; output 25x / 5x / 2x of that at batch 1 / 8 / 32."""
    return Calibration(
        prefill_s_per_token=1e-4,
        cached_s_per_token=cached,
        output_s_per_token={1: 2.5e-3, 8: 5e-4, 32: 2e-4},
        raw={"config": {"model_name": "promptcache-default", "device": "cpu", "dtype": "float32"}},
    )


# ---- pricing arithmetic -------------------------------------------------------------------------------------
def test_pricing_scales_uncached_input_to_the_given_price_and_keeps_every_ratio() -> None:
    p = measured_pricing(hand_made(), input_price=2.0, batch=32)
    assert p.input == pytest.approx(2.0)
    assert p.cached_input == pytest.approx(2.0 * 5e-6 / 1e-4)  # 0.05x input
    assert p.output == pytest.approx(2.0 * 2e-4 / 1e-4)  # 2x input at batch 32
    assert p.output / p.input == pytest.approx(hand_made().output_over_input(32))


def test_cache_writes_cost_what_the_prefill_that_produced_them_cost() -> None:
    p = measured_pricing(hand_made(), input_price=3.0)
    assert p.cache_write_5m == p.cache_write_1h == p.input == pytest.approx(3.0)


def test_output_is_priced_at_the_requested_batch_size() -> None:
    cal = hand_made()
    assert measured_pricing(cal, batch=1).output == pytest.approx(25.0)
    assert measured_pricing(cal, batch=8).output == pytest.approx(5.0)
    assert measured_pricing(cal).output == pytest.approx(2.0)  # batch 32 by default
    with pytest.raises(ValueError, match="batch 16"):
        measured_pricing(cal, batch=16)


def test_a_cached_cost_at_or_below_zero_is_floored_in_the_price_but_kept_as_measured() -> None:
    cal = hand_made(cached=-3e-7)  # noise around "almost free"
    p = measured_pricing(cal, input_price=1.0)
    assert p.cached_input == pytest.approx(CACHED_FLOOR_FRACTION)
    assert p.cached_input > 0
    assert cal.cached_s_per_token == -3e-7
    assert cal.to_dict()["cached_s_per_token"] == -3e-7
    assert cal.to_dict()["ratios"]["cached_over_uncached"] == pytest.approx(-3e-3)


def test_pricing_needs_a_positive_prefill_cost() -> None:
    cal = hand_made()
    cal.prefill_s_per_token = 0.0
    with pytest.raises(ValueError, match="prefill"):
        measured_pricing(cal)


# ---- the table ----------------------------------------------------------------------------------------------
def test_tldr_table_sets_the_measured_ratios_beside_what_providers_charge() -> None:
    table = tldr_table(hand_made())
    # The seed's rows are there ...
    for row in ("Parallel prefill", "Sequential decode", "Not until it becomes input on the next turn"):
        assert row in table
    # ... with the measured ratios (25x, 5.0x, 2.0x output; 0.05x cached) next to 4-5x and 0.1x.
    assert "| output / uncached input, batch 1 | 25x | 4-5x |" in table
    assert "| output / uncached input, batch 8 | 5.0x | 4-5x |" in table
    assert "| output / uncached input, batch 32 | 2.0x | 4-5x |" in table
    assert "| cached / uncached input (marginal) | 0.05x | 0.1x |" in table
    assert "promptcache-default on cpu float32" in table
    assert "floors it" not in table


def test_tldr_table_says_when_the_cached_cost_is_within_noise_of_zero() -> None:
    table = tldr_table(hand_made(cached=-1e-8))
    assert "-0.0001x" in table
    assert "floors it" in table


# ---- the fits, on synthetic timings ----------------------------------------------------------------------------
# A machine where a request costs FIXED_S, plus UNCACHED_S per computed prompt token, plus a given cost per cached
# one; the calibrator's measuring calls are replaced by this model, so its fits must recover the costs exactly.
FIXED_S, UNCACHED_S = 4e-3, 2e-5
NOISE_S = (0.0, 3e-4, -2e-4)  # the same jitter on both sides of a pair, repeated: the medians see through it
SYNTHETIC = Sizes(prompt_tokens=256, suffix_tokens=32, short_prefix_tokens=64, decode_prompt_tokens=8,
                  decode_tokens=4, batch_sizes=(1, 8, 32), cold_repeats=3, hit_repeats=3, decode_repeats=3,
                  prefill_batch=1)  # fmt: skip


@pytest.fixture(scope="module")
def small_llm() -> LLM:
    return LLM(num_kv_blocks=64, device="cpu", dtype="float32")


def synthetic(llm: LLM, cached_s: float, step_s: dict[int, float] | None = None) -> _Calibrator:
    """A calibrator on a real engine whose measurements (TTFT, decode step) come from the cost model above."""
    cal = _Calibrator(llm, SYNTHETIC, seed=0, bar=_NoBar())
    calls = {"ttft": 0, "decode": 0}

    def ttft(prompt: list[int], expect_cached: int) -> float:
        jitter = NOISE_S[calls["ttft"] // 2 % len(NOISE_S)]  # one jitter per interleaved pair
        calls["ttft"] += 1
        return FIXED_S + UNCACHED_S * (len(prompt) - expect_cached) + cached_s * expect_cached + jitter

    def decode_once(batch: int, m: int) -> tuple[float, float]:
        return (step_s or {}).get(batch, 1e-3), 0.0

    cal.ttft = ttft  # type: ignore[method-assign]
    cal._decode_once = decode_once  # type: ignore[method-assign]
    return cal


def test_prefill_fit_is_the_cost_per_token_without_the_fixed_per_request_cost(small_llm: LLM) -> None:
    fit = synthetic(small_llm, cached_s=1e-7).prefill()
    assert fit["prompt_tokens"] == 256
    assert fit["cold_ttft_median_s"] == pytest.approx(FIXED_S + 256 * UNCACHED_S)
    assert fit["one_token_ttft_median_s"] == pytest.approx(FIXED_S + UNCACHED_S)
    assert fit["s_per_token"] == pytest.approx(UNCACHED_S)
    assert fit["tokens_per_s"] == pytest.approx(1 / UNCACHED_S)


def test_cached_fit_is_the_marginal_cost_of_a_cached_token(small_llm: LLM) -> None:
    fit = synthetic(small_llm, cached_s=3e-7).cached(cold_ttft_s=FIXED_S + 256 * UNCACHED_S)
    assert (fit["long_prefix_tokens"], fit["short_prefix_tokens"], fit["suffix_tokens"]) == (224, 64, 32)
    assert fit["delta_cached_tokens"] == 160
    assert fit["s_per_token"] == pytest.approx(3e-7)
    assert fit["noise_s_per_token"] == pytest.approx(0.0, abs=1e-15)  # the jitter is the same on both sides
    assert fit["resolved"]
    hit = FIXED_S + 32 * UNCACHED_S + 224 * 3e-7
    assert fit["whole_request"]["hit_over_cold"] == pytest.approx(hit / (FIXED_S + 256 * UNCACHED_S))


def test_a_negative_cached_estimate_is_kept_as_measured_and_priced_at_the_floor(small_llm: LLM) -> None:
    # On a loaded machine the long-prefix hits can come out faster than the short-prefix ones.
    fit = synthetic(small_llm, cached_s=-2e-7).cached(cold_ttft_s=FIXED_S + 256 * UNCACHED_S)
    assert fit["s_per_token"] == pytest.approx(-2e-7)
    assert not fit["resolved"]  # not above its noise band
    cal = Calibration(prefill_s_per_token=UNCACHED_S, cached_s_per_token=fit["s_per_token"],
                      output_s_per_token={32: 1e-4})  # fmt: skip
    assert cached_cost_for_pricing(cal) == pytest.approx(CACHED_FLOOR_FRACTION * UNCACHED_S)
    assert measured_pricing(cal, input_price=1.0).cached_input == pytest.approx(CACHED_FLOOR_FRACTION)
    assert "floors it" in tldr_table(cal)


def test_decode_fit_is_the_step_time_shared_by_the_batch(small_llm: LLM) -> None:
    steps = {1: 5e-3, 8: 8e-3, 32: 16e-3}
    fit = synthetic(small_llm, cached_s=0.0, step_s=steps).decode()
    by_batch = fit["by_batch"]
    assert set(by_batch) == {"1", "8", "32"}
    for b, step in steps.items():
        assert by_batch[str(b)]["step_median_s"] == pytest.approx(step)
        assert by_batch[str(b)]["s_per_token"] == pytest.approx(step / b)
        assert by_batch[str(b)]["step_s"] == [step] * SYNTHETIC.decode_repeats


# ---- measured on this machine -------------------------------------------------------------------------------
# Timings on a shared machine are noisy: these tests check what a run guarantees (every figure present, each one
# the fit of its raw numbers) and only orderings with a margin of more than an order of magnitude. The marginal cost
# of a cached token is within noise of zero and may come out negative: its sign is not checked.
@pytest.fixture(scope="module")
def measured() -> Calibration:
    return calibrate(quick=True, progress=False)


def test_quick_calibration_measures_every_cost_and_each_is_the_fit_of_its_raw_numbers(
    measured: Calibration,
) -> None:
    cal, raw = measured, measured.raw
    assert set(cal.output_s_per_token) == {1, 8, 32}
    assert all(c > 0 for c in cal.output_s_per_token.values())
    assert math.isfinite(cal.cached_s_per_token)
    prefill = raw["prefill"]
    assert cal.prefill_s_per_token == pytest.approx(
        (statistics.median(prefill["cold_ttft_s"]) - statistics.median(prefill["one_token_ttft_s"]))
        / (prefill["prompt_tokens"] - 1)
    )
    cached = raw["cached"]
    assert cal.cached_s_per_token == pytest.approx(
        (statistics.median(cached["hit_long_ttft_s"]) - statistics.median(cached["hit_short_ttft_s"]))
        / cached["delta_cached_tokens"]
    )
    assert cached["resolved"] == (cal.cached_s_per_token > cached["noise_s_per_token"])
    for b, cost in cal.output_s_per_token.items():
        assert cost == pytest.approx(statistics.median(raw["decode"]["by_batch"][str(b)]["step_s"]) / b)
    assert cached_cost_for_pricing(cal) >= CACHED_FLOOR_FRACTION * cal.prefill_s_per_token
    # Margins of 10x and more: a 2,048-token prefill against a 1-token one; one token decoded alone against one
    # prompt token of a parallel prefill.
    assert cal.prefill_s_per_token > 0
    assert cal.output_over_input(1) > 1.0


def test_quick_calibration_keeps_every_raw_number(measured: Calibration) -> None:
    raw, sizes = measured.raw, Sizes.quick()
    assert len(raw["prefill"]["cold_ttft_s"]) == len(raw["prefill"]["one_token_ttft_s"]) == sizes.cold_repeats
    assert len(raw["cached"]["hit_long_ttft_s"]) == len(raw["cached"]["hit_short_ttft_s"]) == sizes.hit_repeats
    assert raw["cached"]["long_prefix_tokens"] + raw["cached"]["suffix_tokens"] == sizes.prompt_tokens
    assert raw["cached"]["whole_request"]["hit_over_cold"] < 1.0
    assert all(len(v["step_s"]) == sizes.decode_repeats for v in raw["decode"]["by_batch"].values())
    assert raw["cache_stats"]["evictions"] == 0  # the pool was ample: every hit was a hit
    assert raw["config"]["model_name"] == "promptcache-default"
    assert {"machine", "versions", "date", "definitions"} <= set(raw)
    json.dumps(measured.to_dict())  # JSON-ready as it is


def test_calibrate_command_writes_a_pricing_file_the_server_loads(tmp_path: Path, capsys) -> None:
    out, doc = tmp_path / "pricing.toml", tmp_path / "cal.json"
    assert main(["--quick", "--no-progress", "--out", str(out), "--json", str(doc)]) == 0
    table = PriceTable.from_file(out)
    prices = table.for_model("promptcache-default")
    assert prices.input == pytest.approx(1.0)
    assert prices.cache_write_5m == prices.cache_write_1h == prices.input
    assert prices.output > 0
    printed = capsys.readouterr().out
    assert "| output / uncached input, batch 32 |" in printed and "4-5x" in printed and str(out) in printed
    saved = json.loads(doc.read_text())
    assert saved["pricing"]["usd_per_million"]["output"] == pytest.approx(prices.output, rel=1e-5)
    # The cached price is the measured cost (floored above zero) over the prefill cost, whatever its sign came out.
    priced = saved["pricing"]["cached_s_per_token_priced"]
    assert priced == max(saved["cached_s_per_token"], CACHED_FLOOR_FRACTION * saved["prefill_s_per_token"])
    assert prices.cached_input == pytest.approx(priced / saved["prefill_s_per_token"], rel=1e-5)
    assert prices.cached_input > 0
    assert saved["raw"]["command"].startswith("promptcache calibrate --quick")


def test_calibrate_command_names_a_bad_model_folder(tmp_path: Path, capsys) -> None:
    assert main(["--model", str(tmp_path / "nope"), "--out", str(tmp_path / "p.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "p.toml").exists()
