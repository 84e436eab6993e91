"""Eviction policies (``promptcache.cache.eviction``) through the block pool: who goes first, aging, integrity."""

from __future__ import annotations

import math
import random

import pytest

from promptcache.cache.block_pool import BlockPool
from promptcache.cache.eviction import LFU_HALF_LIFE_POOLS, decayed_use, make_evictor
from promptcache.cache.hashing import chain_hashes, root_hash
from promptcache.cache.manager import KVCacheManager
from promptcache.engine.engine import EngineConfig

BS = 4


def manager(num_blocks: int, policy: str) -> KVCacheManager:
    return KVCacheManager(num_blocks, BS, model_fingerprint="fp", dtype="float32", enable_caching=True,
                          eviction_policy=policy)  # fmt: skip


def run(kv: KVCacheManager, doc: list[int], question: int = 999) -> int:
    """One finished request, ``doc`` + one question token: admit (hitting what is cached), compute, register, free.

    The question token keeps every block of ``doc`` readable as a hit (the last prompt token is always computed).
    Returns the request's cached tokens.
    """
    tokens = [*doc, question]
    seq = kv.new_seq("t")
    cached = kv.allocate_prefix(seq, tokens, len(tokens) - len(kv.match(seq, tokens)) * BS)
    assert cached is not None
    kv.commit(seq, tokens, len(tokens))
    kv.free(seq)
    return cached


def cached_blocks(kv: KVCacheManager, doc: list[int]) -> int:
    return len(kv.match(kv.new_seq("t"), [*doc, 0]))


def doc(i: int) -> list[int]:
    """A two-block document of its own."""
    return list(range(100 * i, 100 * i + 2 * BS))


A, B, C, X = doc(1), doc(2), doc(3), list(range(5000, 5000 + 4 * BS))


def test_decayed_use_is_the_log_of_the_sum_of_the_uses_weights() -> None:
    key = None
    for t in (0.0, 0.5, 3.0, 3.0):
        key = decayed_use(key, t)
    assert key == pytest.approx(math.log2(2**0.0 + 2**0.5 + 2**3.0 + 2**3.0))
    # Far apart in time it stays finite and exact enough (no overflow of 2 ** t).
    assert decayed_use(decayed_use(None, 5000.0), 5000.0) == pytest.approx(5001.0)
    assert decayed_use(5000.0, 0.0) == pytest.approx(5000.0)


@pytest.mark.parametrize(("policy", "survivor", "loser"), [("lfu", A, B), ("lru", B, A)])
def test_lfu_keeps_a_popular_prefix_that_lru_evicts(policy: str, survivor: list[int], loser: list[int]) -> None:
    # A is used by three requests, then B by one (more recently). Six blocks: A and B take two each when idle, and
    # C needs three (two, plus its partial block): the two free blocks and one evicted.
    kv = manager(num_blocks=6, policy=policy)
    for _ in range(3):
        run(kv, A)
    run(kv, B)
    run(kv, C)
    assert kv.pool.num_evictions == 1
    assert cached_blocks(kv, survivor) == 2
    assert cached_blocks(kv, loser) == 1  # a chain loses its tail first
    kv.pool.check_integrity()


@pytest.mark.parametrize("evict_a_first", [False, True])
def test_lfu_counts_start_afresh_when_a_block_is_evicted(evict_a_first: bool) -> None:
    # A is used four times. If it is then flushed out (one 5-block request takes the whole pool) and used once
    # more, its earlier uses are gone with it: B, used twice, now outranks it, and C's admission evicts A.
    # Without the flush, A's four uses keep it and B goes.
    kv = manager(num_blocks=5, policy="lfu")
    for _ in range(4):
        run(kv, A)
    if evict_a_first:
        run(kv, X)
        assert cached_blocks(kv, A) == 0
        run(kv, A)
    run(kv, B)
    run(kv, B)
    run(kv, C)
    assert (cached_blocks(kv, A), cached_blocks(kv, B)) == ((0, 2) if evict_a_first else (2, 0))
    assert all(b.use_key is None for b in kv.pool.blocks if b.block_hash is None)


def test_lfu_ages_out_content_nobody_uses_any_more() -> None:
    # A is used 4 times, then only one-off content is used, two blocks a request. A use's weight halves every
    # LFU_HALF_LIFE_POOLS x num_blocks uses, so A's four uses weigh less than one fresh use after two half-lives:
    # A is kept until then and evicted soon after.
    num_blocks = 6
    half_life = LFU_HALF_LIFE_POOLS * num_blocks
    kv = manager(num_blocks, policy="lfu")
    for _ in range(4):
        run(kv, A)
    others = 0
    for i in range(10, 1000):
        run(kv, doc(i))
        others += 2
        if cached_blocks(kv, A) < 2:
            break
    assert 2 * half_life - 8 <= others <= 2 * half_life + 8
    kv.pool.check_integrity()


@pytest.mark.parametrize("policy", ["lfu", "lru"])
def test_pool_invariants_hold_under_random_traffic(policy: str) -> None:
    # Random interleavings of admissions, hits, pins, releases and resets never break an invariant, and every
    # cached block is always either evictable or pinned.
    rng = random.Random(7)
    now = [0.0]
    pool = BlockPool(16, clock=lambda: now[0], eviction_policy=policy)
    root = root_hash("fp", "float32", "t")
    docs = [[rng.randrange(50) for _ in range(rng.randrange(4, 24))] for _ in range(6)]
    held: list[list] = []
    for step in range(600):
        now[0] += rng.random()
        op = rng.random()
        if op < 0.5:
            tokens = rng.choice(docs) + [rng.randrange(50) for _ in range(rng.randrange(0, 6))]
            hashes = chain_hashes(root, tokens, BS)
            hit = pool.match(hashes)
            need = len(hashes) - len(hit)
            if need > pool.num_available - sum(1 for b in hit if b.ref_count == 0):
                continue
            pool.acquire(hit)
            blocks = hit + pool.allocate(need)
            parent = root
            for i, blk in enumerate(blocks):
                blocks[i] = pool.register(blk, parent, tuple(tokens[i * BS : (i + 1) * BS]), hashes[i])
                parent = hashes[i]
            if rng.random() < 0.2:
                pool.pin(blocks, now[0] + rng.random() * 5)
            held.append(blocks)
        elif op < 0.95 and held:
            pool.release(reversed(held.pop(rng.randrange(len(held)))))
        elif op >= 0.99:
            pool.reset()
        pool.check_integrity()
        assert pool.num_free + pool.num_cached + pool.num_in_use == pool.num_blocks, step
    assert pool.num_evictions > 0


def test_unknown_policies_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="lfu, lru"):
        make_evictor("arc", 8)
    with pytest.raises(ValueError, match="eviction policy must be one of"):
        EngineConfig(eviction_policy="mru")
