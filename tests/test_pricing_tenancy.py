"""Pricing arithmetic and files; API keys and tenants; the serve command."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from promptcache.api.errors import APIError
from promptcache.api.tenancy import Tenancy, Tenant
from promptcache.pricing import PRESETS, PriceTable, Pricing, TokenUsage, write_pricing_file


def test_cost_is_each_count_times_its_price() -> None:
    p = Pricing(input=2.0, cached_input=0.2, cache_write_5m=2.5, cache_write_1h=4.0, output=8.0)
    usage = TokenUsage(prompt_tokens=1_000_000, cached_tokens=500_000, output_tokens=250_000,
                       cache_write_5m_tokens=100_000, cache_write_1h_tokens=50_000)  # fmt: skip
    assert usage.uncached_input_tokens == 350_000
    cost = p.cost(usage)
    assert cost["input"] == pytest.approx(0.7)
    assert cost["cached_input"] == pytest.approx(0.1)
    assert cost["cache_write_5m"] == pytest.approx(0.25)
    assert cost["cache_write_1h"] == pytest.approx(0.2)
    assert cost["output"] == pytest.approx(2.0)
    assert cost["total"] == pytest.approx(3.25)


def test_presets_are_shaped_like_the_providers() -> None:
    for name, p in PRESETS.items():
        assert p.cached_input == pytest.approx(0.1 * p.input) or name.startswith("openai-gpt-4"), name
        assert p.cache_write_5m == pytest.approx(1.25 * p.input), name
        assert p.cache_write_1h == pytest.approx(2.0 * p.input), name
        assert 4.0 <= p.output / p.input <= 8.0, name


def test_pricing_file_round_trip_and_fallback(tmp_path: Path) -> None:
    path = tmp_path / "prices.toml"
    write_pricing_file(path, "my-model", Pricing(1.5, 0.15, 1.875, 3.0, 6.0))
    table = PriceTable.from_file(path)
    assert table.for_model("my-model") == Pricing(1.5, 0.15, 1.875, 3.0, 6.0)
    assert table.for_model("other") == PRESETS["default"]


@pytest.mark.parametrize(
    ("text", "words"),
    [("input = 1", "lacks"), ('[models."m"]\ninput = "cheap"\n', "lacks"), ("input = [", "cannot read"),
     ("input=1\ncached_input=-1\ncache_write_5m=1\ncache_write_1h=1\noutput=1", "cached_input must be")],
)  # fmt: skip
def test_bad_pricing_files_say_what_is_wrong(tmp_path: Path, text: str, words: str) -> None:
    path = tmp_path / "p.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=words):
        PriceTable.from_file(path)


def test_unknown_preset_names_the_presets() -> None:
    with pytest.raises(ValueError, match="anthropic-sonnet"):
        PriceTable.preset("free-lunch")


def test_api_keys_from_flags_file_and_admins(tmp_path: Path) -> None:
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"k-alice": "alice", "k-ops": {"tenant": "ops", "admin": True}}))
    t = Tenancy.from_options(["k-flag"], str(keys), ["k-alice"])
    assert t.resolve({"authorization": "Bearer k-alice"}) == Tenant("alice", admin=True)
    assert t.resolve({"x-api-key": "k-ops"}).admin
    assert t.resolve({"authorization": "bearer k-flag"}).name == "key-0"
    with pytest.raises(APIError) as err:
        t.resolve({"authorization": "Bearer nope"})
    assert err.value.status == 401
    with pytest.raises(APIError, match="missing API key"):
        t.resolve({})


def test_no_keys_means_one_local_admin_tenant() -> None:
    t = Tenancy.from_options()
    assert t.open and t.resolve({}) == Tenant("local", admin=True)


def test_namespaces_separate_tenants_and_salts() -> None:
    a, b = Tenant("a"), Tenant("b")
    assert len({a.namespace(), b.namespace(), a.namespace("s"), b.namespace("s")}) == 4


def test_a_tenant_and_salt_never_share_a_namespace_with_another_pair() -> None:
    assert Tenant("a").namespace("b\x1f") != Tenant("a\x1fb").namespace()  # the collision a separator allowed
    pairs = [("a", "bc"), ("ab", "c"), ("a:1", "b"), ("a", "1:b"), ("a", ""), ("a", None)]
    assert len({Tenant(t).namespace(salt) for t, salt in pairs}) == 5  # no salt and an empty salt are the same


def test_tenant_names_with_control_characters_are_refused(tmp_path: Path) -> None:
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"k-1": "a\x1fb"}))
    with pytest.raises(ValueError, match="control character"):
        Tenancy.from_options(api_keys_file=str(keys))
    keys.write_text(json.dumps({"k-1": ""}))
    with pytest.raises(ValueError, match="empty"):
        Tenancy.from_options(api_keys_file=str(keys))


def test_a_key_that_shares_a_prefix_with_a_real_one_is_refused() -> None:
    t = Tenancy({"sk-secret-key": Tenant("alice")})
    for guess in ("sk-secret-ke", "sk-secret-key ", "sk-secret-kez", "SK-SECRET-KEY"):
        with pytest.raises(APIError) as err:
            t.resolve({"x-api-key": guess})
        assert err.value.status == 401
    assert t.resolve({"x-api-key": "sk-secret-key"}) == Tenant("alice")


def test_bad_keys_file_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "keys.json"
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON object"):
        Tenancy.from_options(api_keys_file=str(bad))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_command_starts_and_answers(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "promptcache.cli", "serve", "--port", str(port), "--kv-cache-memory-gb", "0.05",
         "--api-key", "secret", "--admin-key", "ops", "--log-level", "warning", "--eviction-policy", "lru"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)
        res = httpx.post(f"http://127.0.0.1:{port}/v1/completions", headers={"authorization": "Bearer secret"},
                         json={"model": "promptcache-default", "prompt": "Hi", "max_tokens": 2})  # fmt: skip
        assert res.status_code == 200 and res.json()["usage"]["completion_tokens"] == 2
        stats = httpx.get(f"http://127.0.0.1:{port}/v1/cache/stats", headers={"authorization": "Bearer secret"})
        assert stats.status_code == 403  # every tenant's traffic is counted there: admins only
        stats = httpx.get(f"http://127.0.0.1:{port}/v1/cache/stats", headers={"authorization": "Bearer ops"})
        assert stats.json()["eviction_policy"] == "lru"
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_serve_refuses_a_public_address_without_keys() -> None:
    res = subprocess.run([sys.executable, "-m", "promptcache.cli", "serve", "--host", "0.0.0.0"],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert res.returncode == 2 and "loopback" in res.stderr
