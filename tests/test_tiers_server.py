"""The tiers through the HTTP API: a server killed with SIGKILL serves its disk cache when started again, replicas
share Redis with tenants kept apart, and usage, explain, metrics, reset and integrity report the tiers."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import anthropic
import httpx
import openai
import pytest
from conftest import LiveServer, assert_varied, keyed
from serve_processes import start_serve, wait_healthy

BS = 16
MODEL = "promptcache-default"  # the served name of LiveServer; the process below is given it too
PROMPT = [100 + (i * 37) % 7000 for i in range(10 * BS + 5)]  # ten full blocks and five tokens
COMPLETION = {"max_tokens": 8, "temperature": 0.0, "extra_body": {"ignore_eos": True}}


def tiers_of(usage) -> dict[str, int]:
    """Our usage extension: cached tokens by the tier they were read from."""
    return (usage.model_extra or {})["cached_tokens_by_tier"]


def client(server_url: str, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server_url}/v1", api_key=key, max_retries=0)


def wait_for_writes(url: str, key: str = "none", blocks: int = 1) -> None:
    """Until the tier writer's queue is empty and the first tier below holds at least ``blocks`` entries."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        stats = httpx.get(f"{url}/v1/cache/stats", headers={"Authorization": f"Bearer {key}"}).json()["tiers"]
        if stats["write_queue_blocks"] == 0 and stats["tiers"][-1]["entries"] >= blocks:
            return
        time.sleep(0.05)
    raise AssertionError("tier writes did not complete")


# ---- a real process, killed for real ----------------------------------------------------------------------------
class ServeProcess:
    def __init__(self, model: Path, disk: Path) -> None:
        self.proc, self.url = start_serve(["--model", str(model), "--kv-cache-memory-gb", "0.02", "--disk-cache",
                                           str(disk), "--tier-load-policy", "always", "--served-model-name", MODEL])
        wait_healthy(self.proc, self.url)

    def kill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)


def test_a_server_killed_with_sigkill_serves_its_prefix_from_disk_on_its_first_request(varied_model, tmp_path):
    first = ServeProcess(varied_model, tmp_path)
    try:
        cold = client(first.url).completions.create(model=MODEL, prompt=PROMPT, **COMPLETION)
        assert cold.usage.prompt_tokens_details is None or cold.usage.prompt_tokens_details.cached_tokens == 0
        wait_for_writes(first.url, blocks=10)
    finally:
        first.kill()
    second = ServeProcess(varied_model, tmp_path)
    try:
        warm = client(second.url).completions.create(model=MODEL, prompt=PROMPT, **COMPLETION)
        assert tiers_of(warm.usage) == {"disk": 10 * BS}
        assert warm.choices[0].text == cold.choices[0].text
        assert len(set(warm.choices[0].text.split())) >= 3
    finally:
        second.kill()


# ---- replicas sharing one Redis -------------------------------------------------------------------------------------
@pytest.fixture
def replicas(varied_model, redis_url):
    servers = [
        LiveServer(keyed(), model=str(varied_model), redis_url=redis_url, tier_load_policy="always") for _ in range(2)
    ]
    yield servers
    for s in servers:
        s.stop()


def chat(server: LiveServer, key: str, **extra):
    messages = [{"role": "system", "content": "You answer briefly. " * 20},
                {"role": "user", "content": "Name three rivers of Europe."}]  # fmt: skip
    return client(server.url, key).chat.completions.create(
        model=MODEL, messages=messages, max_tokens=8, temperature=0.0, extra_body={"ignore_eos": True, **extra}
    )


def test_a_prompt_computed_on_one_replica_is_a_redis_hit_on_another_only_for_its_tenant(replicas) -> None:
    a, b = replicas
    first = chat(a, "key-alice")
    wait_for_writes(a.url, "key-admin")
    assert chat(b, "key-bob").usage.prompt_tokens_details.cached_tokens == 0
    assert chat(b, "key-alice", cache_salt="other").usage.prompt_tokens_details.cached_tokens == 0
    shared = chat(b, "key-alice")
    cached = shared.usage.prompt_tokens_details.cached_tokens
    assert cached >= 4 * BS and tiers_of(shared.usage) == {"redis": cached}
    assert shared.choices[0].message.content == first.choices[0].message.content
    assert_varied(b.core.tokenizer.encode(shared.choices[0].message.content), at_least=3)


def test_anthropic_usage_reports_cache_reads_by_tier(replicas) -> None:
    a, b = replicas
    system = "You answer in one short line. " * 20
    ask = dict(model=MODEL, max_tokens=8, system=system,
               messages=[{"role": "user", "content": "Hi"}])  # fmt: skip
    anthropic.Anthropic(base_url=a.url, api_key="key-alice", max_retries=0).messages.create(**ask)
    wait_for_writes(a.url, "key-admin")
    msg = anthropic.Anthropic(base_url=b.url, api_key="key-alice", max_retries=0).messages.create(**ask)
    assert msg.usage.cache_read_input_tokens >= 4 * BS
    assert (msg.usage.model_extra or {})["cached_tokens_by_tier"] == {"redis": msg.usage.cache_read_input_tokens}


# ---- one server with a disk tier: retention, explain, metrics, reset, integrity ----------------------------------
@pytest.fixture(scope="module")
def disk_server(varied_model, tmp_path_factory):
    server = LiveServer(keyed(), model=str(varied_model), disk_cache_dir=str(tmp_path_factory.mktemp("disk")),
                        tier_load_policy="always")  # fmt: skip
    yield server
    server.stop()


def admin(server: LiveServer) -> dict[str, str]:
    return {"Authorization": "Bearer key-admin"}


def test_prompt_cache_retention_24h_pins_the_prompt_in_the_lower_tiers(disk_server) -> None:
    before = httpx.get(f"{disk_server.url}/v1/cache/stats", headers=admin(disk_server)).json()["tiers"]["pinned_blocks"]
    c = client(disk_server.url, "key-alice")
    c.completions.create(model=MODEL, prompt=PROMPT, extra_body={"prompt_cache_retention": "24h"}, max_tokens=2)
    stats = httpx.get(f"{disk_server.url}/v1/cache/stats", headers=admin(disk_server)).json()["tiers"]
    assert stats["pinned_blocks"] - before == 10
    with pytest.raises(openai.BadRequestError) as err:
        c.completions.create(model=MODEL, prompt=PROMPT, extra_body={"prompt_cache_retention": "1y"}, max_tokens=2)
    assert err.value.body["param"] == "prompt_cache_retention"


def test_explain_metrics_reset_and_integrity_report_the_disk_tier(disk_server) -> None:
    url, c = disk_server.url, client(disk_server.url, "key-bob")
    prompt = [7 + (i * 53) % 7000 for i in range(6 * BS + 3)]
    c.completions.create(model=MODEL, prompt=prompt, max_tokens=2)
    wait_for_writes(url, "key-admin", blocks=6)
    assert httpx.post(f"{url}/v1/cache/reset", headers=admin(disk_server)).json()["blocks_dropped"] > 0
    explain = httpx.post(f"{url}/v1/cache/explain", json={"prompt": prompt},
                         headers={"Authorization": "Bearer key-bob"}).json()  # fmt: skip
    assert explain["cached_tokens_by_tier"]["disk"] > 0
    out = c.completions.create(model=MODEL, prompt=prompt, max_tokens=2)
    assert tiers_of(out.usage) == {"disk": 6 * BS}
    metrics = httpx.get(f"{url}/metrics").text
    assert 'promptcache_prefix_cache_hits_by_tier_tokens_total{tier="disk"}' in metrics
    assert 'promptcache_tier_hits_blocks_total{tier="disk"}' in metrics
    assert 'promptcache_tier_read_seconds_bucket{le="+Inf",tier="disk"}' in metrics
    integrity = httpx.get(f"{url}/v1/cache/integrity?deep=1", headers=admin(disk_server)).json()
    assert integrity == {"ok": True, "problems": {"device": [], "disk": []}}
    assert httpx.get(f"{url}/v1/cache/integrity", headers={"Authorization": "Bearer key-bob"}).status_code == 403
    dropped = httpx.post(f"{url}/v1/cache/reset", json={"tiers": True}, headers=admin(disk_server)).json()
    assert dropped["entries_dropped"]["disk"] >= 6
    assert c.completions.create(model=MODEL, prompt=prompt, max_tokens=2).usage.prompt_tokens_details.cached_tokens == 0
