"""The tiers below the device pool, end to end: a prefix evicted from the device comes back from host, disk or
Redis with the greedy output of a cold run; isolation, corruption, outages, concurrency and pins.

Every test runs the real engine on a small random llama whose answers vary (``varied_model``), real files in a
temporary directory, and a real redis-server (``tests/redis_servers.py``).
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
import torch
from conftest import assert_varied

from promptcache import LLM, SamplingParams
from promptcache.api.tenancy import Tenant
from promptcache.cache.hashing import block_hash, chain_hashes
from promptcache.cache.tiers.base import BlockEntry, KVLayout
from promptcache.cache.tiers.disk import DiskTier
from promptcache.cache.tiers.format import encode
from promptcache.cache.tiers.stack import TierOptions, TierStack
from promptcache.engine.engine import LLMEngine

BS = 16
SP = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def ids(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(100, 8000) for _ in range(n)]


PREFIX = ids(10 * BS, 1)  # ten full blocks
PROMPT = PREFIX + ids(5, 2)


@pytest.fixture(scope="module")
def cold(varied_model: Path) -> Callable[[list[int]], list[int]]:
    """The greedy answer of a cold run (prefix caching off): the reference every cached answer must equal."""
    llm = LLM(model=str(varied_model), enable_prefix_caching=False, num_kv_blocks=256)
    memo: dict[tuple[int, ...], list[int]] = {}

    def answer(prompt: list[int]) -> list[int]:
        key = tuple(prompt)
        if key not in memo:
            memo[key] = llm.generate([prompt], SP)[0].token_ids
            assert_varied(memo[key])
        return memo[key]

    def prepare(prompts: list[list[int]]) -> None:
        """Compute many cold answers in one batch (faster than one by one)."""
        for prompt, out in zip(prompts, llm.generate(prompts, SP)):
            memo[tuple(prompt)] = out.token_ids

    answer.prepare = prepare  # type: ignore[attr-defined]
    return answer


@pytest.fixture
def make_llm(varied_model: Path) -> Iterator[Callable[..., LLM]]:
    """LLMs on the varied model with tiers (``tier_load_policy="always"``: a test asserts which tier served)."""
    made: list[LLM] = []

    def make(**kwargs: object) -> LLM:
        kwargs.setdefault("num_kv_blocks", 24)
        kwargs.setdefault("tier_load_policy", "always")
        llm = LLM(model=str(varied_model), **kwargs)  # type: ignore[arg-type]
        made.append(llm)
        return llm

    yield make
    for llm in made:
        llm.engine.close()


def run(llm: LLM, prompt: list[int], namespace: str = "default"):
    return llm.generate([prompt], SP, namespace=namespace)[0]


def flood(llm: LLM, n: int = 4, seed: int = 100) -> None:
    """Run unrelated prompts that take every device block, so cached blocks are evicted."""
    for i in range(n):
        run(llm, ids(12 * BS, seed + i))


def settle(llm: LLM) -> None:
    """Wait for queued tier writes, then drop the device pool's idle blocks (not spilled to any tier)."""
    assert llm.engine.tiers is not None and llm.engine.tiers.flush(10)
    llm.engine.reset_cache()


def tier(llm: LLM, name: str):
    assert llm.engine.tiers is not None
    return next(t for t in llm.engine.tiers.tiers if t.name == name)


def prefix_hashes(llm: LLM, tokens: list[int], namespace: str = "default") -> list[bytes]:
    """The content addresses of the full blocks of ``tokens`` in a namespace, as the engine computes them."""
    return chain_hashes(llm.engine.kv.new_seq(namespace).root, tokens, BS)


def assert_clean(engine: LLMEngine) -> None:
    assert engine.kv.pool.num_in_use == 0, "a block is still in use after every request ended"
    problems = engine.check_integrity(deep=True)
    assert not any(problems.values()), problems


# ---- each tier serves a prefix the device pool lost ---------------------------------------------------------------
def test_a_prefix_evicted_to_host_comes_back_with_the_cold_answer(make_llm, cold) -> None:
    llm = make_llm(host_cache_gb=0.01)
    run(llm, PROMPT)
    flood(llm)
    out = run(llm, PREFIX + ids(5, 3))
    assert out.cached_tokens_by_tier == {"host": len(PREFIX)}
    assert out.num_cached_tokens == len(PREFIX)
    assert out.token_ids == cold(PREFIX + ids(5, 3))
    assert_clean(llm.engine)


def test_spills_made_to_load_a_prefix_from_a_full_host_tier_do_not_push_that_prefix_out(make_llm, cold) -> None:
    llm = make_llm(num_kv_blocks=12, host_cache_gb=10 * 8192 / (1 << 30))  # host: exactly ten blocks
    run(llm, PROMPT)
    run(llm, ids(10 * BS + 5, 12))  # PROMPT's blocks spill to the host, which is now full
    # Loading PROMPT needs device blocks, whose eviction spills the other prompt into the full host.
    out = run(llm, PREFIX + ids(5, 13))
    assert out.num_cached_tokens == len(PREFIX)
    assert out.cached_tokens_by_tier["host"] >= 8 * BS  # (the pool may still hold the head block)
    assert out.token_ids == cold(PREFIX + ids(5, 13))
    assert_clean(llm.engine)


def test_the_prefix_comes_back_from_host_then_disk_then_redis(make_llm, cold, tmp_path, redis_url) -> None:
    llm = make_llm(host_cache_gb=0.01, disk_cache_dir=str(tmp_path), redis_url=redis_url)
    run(llm, PROMPT)
    llm.engine.tiers.flush(10)
    flood(llm)
    for seed, source in enumerate(("host", "disk", "redis")):
        prompt = PREFIX + ids(5, 900 + seed)
        out = run(llm, prompt)
        assert out.cached_tokens_by_tier == {source: len(PREFIX)}, source
        assert out.token_ids == cold(prompt), f"wrong answer from the {source} tier"
        settle(llm)
        tier(llm, source).clear()  # the next tier down must serve it now
    assert_clean(llm.engine)


def test_a_second_engine_reads_what_the_first_computed_through_redis(make_llm, cold, redis_url) -> None:
    a, b = make_llm(redis_url=redis_url), make_llm(redis_url=redis_url)
    run(a, PROMPT)
    assert a.engine.tiers.flush(10)
    out = run(b, PREFIX + ids(5, 4))
    assert out.cached_tokens_by_tier == {"redis": len(PREFIX)}
    assert out.token_ids == cold(PREFIX + ids(5, 4))


def test_blocks_found_only_in_redis_are_kept_on_local_disk_too(make_llm, redis_url, tmp_path) -> None:
    a = make_llm(redis_url=redis_url)
    b = make_llm(redis_url=redis_url, disk_cache_dir=str(tmp_path))
    run(a, PROMPT)
    a.engine.tiers.flush(10)
    assert run(b, PROMPT).cached_tokens_by_tier == {"redis": len(PREFIX)}
    b.engine.tiers.flush(10)
    assert all(tier(b, "disk").contains(prefix_hashes(b, PREFIX)))


class PoolIO:
    """A device pool of a few blocks for a ``TierStack`` alone (the runner is the BlockIO in an engine)."""

    def __init__(self, layout: KVLayout, n: int) -> None:
        self.kv = torch.randn((n, *layout.shape))

    def read_block(self, block_id: int) -> torch.Tensor:
        return self.kv[block_id]

    def write_block(self, block_id: int, kv: torch.Tensor) -> None:
        self.kv[block_id].copy_(kv)


def test_a_block_the_disk_dropped_is_written_again_when_it_leaves_the_device(tmp_path) -> None:
    layout = KVLayout("fp", torch.float32, (2, 2, 4, 2, 8), 4)
    io = PoolIO(layout, 3)
    root = b"\0" * 32
    blocks = [(block_hash(root, (i, i, i, i)), root, (i, i, i, i), i) for i in range(3)]
    entry_bytes = len(encode(BlockEntry(*blocks[0][:3], io.kv[0]), layout))
    disk = DiskTier(layout, tmp_path, capacity_bytes=2 * entry_bytes + 10)  # room for two entries
    stack = TierStack([disk], io, TierOptions(disk_cache_dir=str(tmp_path)))
    stack.on_written(blocks)  # write-through: the third store drops the first (LRU)
    stack.flush()
    assert disk.contains([b[0] for b in blocks]) == [False, True, True]
    stores = disk.counters.stores
    stack.on_evicted(*blocks[1])  # still on disk: nothing to write
    stack.flush()
    assert disk.counters.stores == stores
    stack.on_evicted(*blocks[0])  # the disk dropped it: it leaves the device, so it goes down again
    stack.flush()
    assert disk.contains([blocks[0][0]]) == [True]
    assert torch.equal(disk.load([blocks[0][0]])[0], io.kv[0])
    stack.close()


def test_replicas_share_blocks_through_a_redis_cluster(make_llm, cold, redis_cluster) -> None:
    redis_cluster.flushall()
    a, b = make_llm(redis_url=redis_cluster.url), make_llm(redis_url=redis_cluster.url)
    run(a, PROMPT)
    assert a.engine.tiers.flush(10)
    out = run(b, PREFIX + ids(5, 11))
    assert out.cached_tokens_by_tier == {"redis": len(PREFIX)}
    assert out.token_ids == cold(PREFIX + ids(5, 11))
    assert run(b, PROMPT, namespace="other").num_cached_tokens == 0
    assert_clean(b.engine)


# ---- isolation --------------------------------------------------------------------------------------------------
def test_no_tier_serves_one_namespace_the_blocks_of_another(make_llm, tmp_path, redis_url) -> None:
    llm = make_llm(host_cache_gb=0.01, disk_cache_dir=str(tmp_path), redis_url=redis_url)
    other = make_llm(redis_url=redis_url)
    run(llm, PROMPT, namespace="alice")
    llm.engine.tiers.flush(10)
    flood(llm)  # alice's prefix is now in host, disk and Redis
    # Each check uses a namespace of its own: a miss computes that namespace's blocks and writes them to Redis.
    assert run(llm, PROMPT, namespace="bob").num_cached_tokens == 0
    assert run(other, PROMPT, namespace="carol").num_cached_tokens == 0
    # A tenant's cache_salt is part of the namespace (tenancy.py), so a salted request is another namespace too.
    assert run(other, PROMPT, namespace=Tenant("alice").namespace("salt")).num_cached_tokens == 0
    assert run(other, PROMPT, namespace="alice").cached_tokens_by_tier == {"redis": len(PREFIX)}


# ---- restart ----------------------------------------------------------------------------------------------------
def test_a_new_engine_on_the_same_directory_serves_the_prefix_from_disk(varied_model, make_llm, cold, tmp_path):
    with LLM(model=str(varied_model), num_kv_blocks=24, disk_cache_dir=str(tmp_path)) as first:
        run(first, PROMPT)  # leaving the block finishes the queued disk writes
    second = make_llm(disk_cache_dir=str(tmp_path))
    out = run(second, PREFIX + ids(5, 5))
    assert out.cached_tokens_by_tier == {"disk": len(PREFIX)}
    assert out.token_ids == cold(PREFIX + ids(5, 5))


# ---- corruption: a counted miss, never a wrong answer -------------------------------------------------------------
def _entry_files(llm: LLM) -> list[Path]:
    return sorted(Path(tier(llm, "disk").root).rglob("*.kv"), key=os.path.getmtime)


def _damage(kind: str, files: list[Path]) -> Path:
    victim = files[len(files) // 2]
    data = victim.read_bytes()
    if kind == "flipped":
        victim.write_bytes(data[:-100] + bytes([data[-100] ^ 0xFF]) + data[-99:])
    elif kind == "truncated":
        victim.write_bytes(data[: len(data) // 2])
    else:  # "foreign": another block's entry under this block's name
        victim.write_bytes(files[0].read_bytes())
    return victim


@pytest.mark.parametrize("kind", ["flipped", "truncated", "foreign"])
def test_a_damaged_disk_entry_is_a_counted_miss_and_the_answer_is_right(make_llm, cold, tmp_path, kind) -> None:
    llm = make_llm(disk_cache_dir=str(tmp_path))
    run(llm, PROMPT)
    settle(llm)
    files = _entry_files(llm)
    assert len(files) == len(PREFIX) // BS
    victim = _damage(kind, files)
    prompt = PREFIX + ids(5, 6)
    out = run(llm, prompt)
    assert out.token_ids == cold(prompt)
    assert 0 < out.num_cached_tokens < len(PREFIX)  # the blocks before the damaged one still count
    assert tier(llm, "disk").counters.errors.get("corrupt") == 1
    llm.engine.tiers.flush(10)
    # The bad entry was dropped, then written again from the recomputed block: the next read is whole.
    assert victim.exists() and victim.read_bytes() != b""
    settle(llm)
    assert run(llm, prompt).cached_tokens_by_tier == {"disk": len(PREFIX)}
    assert_clean(llm.engine)


def test_a_truncated_redis_value_is_a_counted_miss_and_the_answer_is_right(make_llm, cold, redis_url) -> None:
    llm = make_llm(redis_url=redis_url)
    run(llm, PROMPT)
    settle(llm)
    raw = redis.Redis.from_url(redis_url)
    keys = sorted(raw.keys("pc:kv:*"))
    assert len(keys) == len(PREFIX) // BS
    for key in keys:
        raw.set(key, raw.get(key)[:-1])  # every value one byte short
    prompt = PREFIX + ids(5, 7)
    out = run(llm, prompt)
    assert out.num_cached_tokens == 0
    assert out.token_ids == cold(prompt)
    assert tier(llm, "redis").counters.errors.get("corrupt", 0) >= 1
    assert_clean(llm.engine)


# ---- outages ----------------------------------------------------------------------------------------------------
def test_redis_stopping_mid_run_fails_no_request_and_it_is_used_again_once_back(make_llm, cold, own_redis) -> None:
    llm = make_llm(redis_url=own_redis.url, tier_read_timeout=0.2)
    run(llm, PROMPT)
    settle(llm)
    own_redis.stop()
    for seed in range(3):  # valid requests keep being served, from recomputation
        prompt = PREFIX + ids(5, 10 + seed)
        out = run(llm, prompt)
        assert out.token_ids == cold(prompt)
        llm.engine.reset_cache()
    assert not tier(llm, "redis").available
    own_redis.start()  # an empty Redis on the same port (no persistence)
    import time

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the tier retries with backoff; each request gives it a chance
        run(llm, PROMPT)
        llm.engine.tiers.flush(10)
        llm.engine.reset_cache()
        if tier(llm, "redis").available and run(llm, PROMPT).cached_tokens_by_tier.get("redis"):
            break
        time.sleep(0.2)
    llm.engine.reset_cache()
    out = run(llm, PREFIX + ids(5, 20))
    assert out.cached_tokens_by_tier == {"redis": len(PREFIX)}
    assert out.token_ids == cold(PREFIX + ids(5, 20))
    assert_clean(llm.engine)


def test_an_unwritable_disk_tier_is_a_miss_not_an_error(make_llm, cold, tmp_path) -> None:
    llm = make_llm(disk_cache_dir=str(tmp_path / "cache"))
    run(llm, PROMPT)
    settle(llm)
    import shutil

    shutil.rmtree(tmp_path / "cache")  # the disk went away under the server
    prompt = PREFIX + ids(5, 8)
    out = run(llm, prompt)
    assert out.num_cached_tokens == 0
    assert out.token_ids == cold(prompt)
    assert llm.engine.kv.pool.num_in_use == 0  # the failed reads left no block held


# ---- pins -------------------------------------------------------------------------------------------------------
def test_a_retained_prompt_outlives_disk_eviction(make_llm, tmp_path) -> None:
    llm = make_llm(disk_cache_dir=str(tmp_path), disk_cache_gb=24 * 8192 / (1 << 30))  # room for ~24 blocks
    engine = llm.engine
    engine.add_request(PROMPT, SP, retention_seconds=86400.0)
    while engine.has_unfinished_requests():
        engine.step()
    engine.tiers.flush(10)
    for i in range(6):  # 6 x 12 blocks of other prompts through a disk that holds ~24
        run(llm, ids(12 * BS, 200 + i))
    engine.tiers.flush(10)
    assert tier(llm, "disk").counters.evictions > 0
    settle(llm)
    assert run(llm, PROMPT).cached_tokens_by_tier == {"disk": len(PREFIX)}


# ---- concurrency, and invariants after every step ---------------------------------------------------------
def test_32_concurrent_requests_across_tiers_under_eviction_match_cold_runs(make_llm, cold, tmp_path, redis_url):
    llm = make_llm(num_kv_blocks=30, host_cache_gb=64 * 8192 / (1 << 30), disk_cache_dir=str(tmp_path),
                   redis_url=redis_url)  # fmt: skip
    prefixes = [ids(6 * BS, 300 + p) for p in range(4)]
    for p in prefixes:  # each prefix lands in every tier, then the device forgets it
        run(llm, p + [1])
    settle(llm)
    tier(llm, "host").clear()
    for p in prefixes[:2]:  # two prefixes only in Redis, two on disk too
        tier(llm, "disk").evict(prefix_hashes(llm, p))
    prompts = [prefixes[i % 4] + ids(3 + (i % 5) * 9, 400 + i) for i in range(32)]
    cold.prepare(prompts)
    outs = llm.generate(prompts, SP)
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == cold(prompt)
    by_tier = {k for o in outs for k in o.cached_tokens_by_tier}
    assert {"disk", "redis"} <= by_tier, by_tier
    assert llm.engine.kv.pool.num_evictions > 0
    llm.engine.tiers.flush(10)
    assert_clean(llm.engine)


def test_invariants_hold_after_every_operation_of_a_random_sequence(make_llm, cold, tmp_path, redis_url) -> None:
    llm = make_llm(num_kv_blocks=32, host_cache_gb=20 * 8192 / (1 << 30), disk_cache_dir=str(tmp_path),
                   disk_cache_gb=40 * 8192 / (1 << 30), redis_url=redis_url)  # fmt: skip
    rng = random.Random(0)
    prefixes = [ids(rng.choice([2, 5, 9]) * BS, 500 + p) for p in range(5)]
    for step in range(30):
        op = rng.choice(["request", "request", "request", "reset", "clear", "evict", "flush"])
        if op == "request":
            prompt = rng.choice(prefixes) + ids(rng.randrange(1, 20), 600 + step)
            assert run(llm, prompt).token_ids == cold(prompt), f"step {step}"
        elif op == "reset":
            llm.engine.reset_cache()
        elif op == "clear":
            rng.choice(llm.engine.tiers.tiers).clear()
        elif op == "evict":
            rng.choice(llm.engine.tiers.tiers).evict(prefix_hashes(llm, rng.choice(prefixes))[-2:])
        else:
            llm.engine.tiers.flush(10)
        assert llm.engine.kv.pool.num_in_use == 0
        problems = llm.engine.check_integrity(deep=op == "flush")
        assert not any(problems.values()), (step, op, problems)
