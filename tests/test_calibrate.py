"""Calibration: measured token costs, the pricing they imply, and the TL;DR table beside providers' ratios."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from promptcache.bench.calibrate import (
    CACHED_FLOOR_FRACTION,
    Calibration,
    Sizes,
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


# ---- measured on this machine -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def measured() -> Calibration:
    return calibrate(quick=True, progress=False)


def test_quick_calibration_measures_every_cost_and_they_order_as_the_asymmetry_says(measured: Calibration) -> None:
    cal = measured
    assert cal.prefill_s_per_token > 0
    assert cal.cached_s_per_token > 0
    assert set(cal.output_s_per_token) == {1, 8, 32}
    assert all(c > 0 for c in cal.output_s_per_token.values())
    # A cached prompt token costs less than computing it.
    assert cal.cached_s_per_token < cal.prefill_s_per_token
    # Batching amortizes the weights' reads over the batch: an output token costs less at batch 32 than alone.
    assert cal.output_s_per_token[32] <= cal.output_s_per_token[1]
    # One token decoded alone costs more than one prompt token of a parallel prefill.
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
    assert 0 < prices.cached_input < prices.input
    assert prices.cache_write_5m == prices.cache_write_1h == prices.input
    assert prices.output > 0
    printed = capsys.readouterr().out
    assert "| output / uncached input, batch 32 |" in printed and "4-5x" in printed and str(out) in printed
    saved = json.loads(doc.read_text())
    assert saved["pricing"]["usd_per_million"]["output"] == pytest.approx(prices.output, rel=1e-5)
    assert saved["raw"]["command"].startswith("promptcache calibrate --quick")


def test_calibrate_command_names_a_bad_model_folder(tmp_path: Path, capsys) -> None:
    assert main(["--model", str(tmp_path / "nope"), "--out", str(tmp_path / "p.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "p.toml").exists()
