"""The cross-tenant prompt-cache timing audit (``promptcache/bench/timing_audit.py``, after Gu et al. 2025) on real
servers: for a prefix in the device pool, in host memory, on disk, in Redis and behind a router of two replicas,
a probe tenant's time on a prompt that the victim tenant cached is indistinguishable from a cold prompt's
(Kolmogorov-Smirnov p > 0.01), while its own cached prompt is clearly faster (p < 0.01), and no counter or header
tells it about the victim's cache. A control: a probe holding a second key of the victim's tenant shares the cache,
and the audit must call that a leak.

The servers are the real apps under uvicorn on loopback (in threads of this process, as ``LiveServer``), on a real
redis-server; the router is ``create_router_app``, what ``promptcache router`` serves. Every request is real HTTP.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from redis_servers import RedisServer

from promptcache.bench import timing_audit as ta

SAMPLES = 25  # timed samples per kind (victim, cold, own) and place
WARMUP = 2  # whole samples run first and dropped


@pytest.fixture(scope="module")
def prompts() -> ta.PromptMaker:
    from promptcache.model.source import resolve_model

    model = ta.resolve_model(None)
    return ta.PromptMaker(resolve_model(str(model), quiet=True).tokenizer(), seed=0)


@pytest.fixture(scope="module")
def launcher(tmp_path_factory: pytest.TempPathFactory, redis_server: RedisServer) -> Iterator[ta.Launcher]:
    # One intra-op thread, as the audit's server processes run: the client, the servers' event loops and their
    # engine threads share this process and two cores, and a second OpenMP thread spinning after each matmul only
    # takes the core the client's timing runs on. Restored afterwards for the other test modules.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield ta.Launcher(ta.resolve_model(None), tmp_path_factory.mktemp("timing-audit"), redis_server.url,
                          mode="thread", samples=SAMPLES, warmup=WARMUP)  # fmt: skip
    finally:
        torch.set_num_threads(threads)


def run_audit(launcher: ta.Launcher, prompts: ta.PromptMaker, name: str, **kwargs: Any) -> dict[str, Any]:
    target = launcher.start(name)
    try:
        return ta.audit(target, prompts, kwargs.pop("samples", SAMPLES), WARMUP, **kwargs)
    finally:
        target.close()


def describe(result: dict[str, Any]) -> str:
    """The result's table row and what went wrong, for a failure message."""
    batch = result["batches"][-1]
    return (f"{ta.table({'targets': {result['target']: result}})}\nchecks: {result['checks']}\n"
            f"own hits by tier: {batch['own_hits_by_tier']}\nproblems: {batch['problems']}")  # fmt: skip


@pytest.mark.parametrize("name", ta.TARGETS)
def test_a_probe_cannot_tell_another_tenants_cached_prompt_from_a_cold_one_but_sees_its_own_hits(
    name: str, launcher: ta.Launcher, prompts: ta.PromptMaker, redis_url: str
) -> None:
    # (redis_url: the session's redis-server, flushed for this test; the launcher serves from it)
    result = run_audit(launcher, prompts, name, seed=ta.TARGETS.index(name))
    why = describe(result)
    print(why)  # shown with -s or -rP: the figures of a passing run too
    checks, batch = result["checks"], result["batches"][-1]
    # The audit measured what it claims: every sample's prefixes were in the intended place (explain), every own
    # hit was read in full from that tier (usage.cached_tokens_by_tier), all prompts had one token length, and every
    # answer carried the headers checked below.
    assert checks["placement_confirmed"] and checks["prompt_tokens_equal"] and checks["headers_present"], why
    assert checks["own_hits_full_from_tier"], why
    want = "any" if name == "router" else name
    assert name == "router" or batch["own_hits_by_tier"] == {want: SAMPLES}, why
    # Counters and headers: nothing about the victim's cache, ever (no statistics needed for that leak).
    assert checks["victim_counters_zero"] and checks["cold_counters_zero"], why
    assert checks["victim_costs_as_cold"] and checks["explain_of_victim_prompt_empty_for_probe"], why
    # Timing: the victim's cached prompt looks cold; the probe's own hit does not (the probe is sensitive enough).
    assert result["p_own_vs_cold"] < ta.ALPHA, why
    assert result["p_victim_vs_cold"] > ta.ALPHA, why
    assert result["passed"], why


def test_the_audit_calls_a_probe_that_shares_the_victims_tenant_a_leak(
    launcher: ta.Launcher, prompts: ta.PromptMaker
) -> None:
    # The probe holds a second key of the victim's tenant: the victim's prompts are its hits. A probe that cannot see
    # this would pass any server.
    result = run_audit(launcher, prompts, "device", samples=10, probe_key=ta.TWIN_KEY)
    why = describe(result)
    assert result["p_victim_vs_cold"] <= ta.ALPHA, why
    assert not result["checks"]["victim_counters_zero"], why
    assert not result["checks"]["explain_of_victim_prompt_empty_for_probe"], why
    assert not result["passed"] and not result["rechecked"], why
