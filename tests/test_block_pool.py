"""The block pool and cache manager on their own: no torch, no model."""

from __future__ import annotations

import pytest

from promptcache.cache.block_pool import BlockPool
from promptcache.cache.hashing import block_hash, chain_hashes, root_hash
from promptcache.cache.manager import KVCacheManager

BS = 4


def manager(num_blocks: int = 8, caching: bool = True, policy: str = "lfu") -> KVCacheManager:
    return KVCacheManager(
        num_blocks, BS, model_fingerprint="fp", dtype="float32", enable_caching=caching, eviction_policy=policy
    )


def run_sequence(kv: KVCacheManager, tokens: list[int], namespace: str = "t") -> tuple[int, object]:
    """Admit, 'compute' every token, register, and free: what the engine does for one finished request."""
    seq = kv.new_seq(namespace)
    cached = kv.allocate_prefix(seq, tokens, len(tokens) - len(kv.match(seq, tokens)) * BS)
    assert cached is not None
    kv.commit(seq, tokens, len(tokens))
    kv.free(seq)
    return cached, seq


def test_roots_differ_by_namespace_model_and_dtype() -> None:
    roots = {
        root_hash("m", "float32", "a"),
        root_hash("m", "float32", "b"),
        root_hash("m2", "float32", "a"),
        root_hash("m", "bfloat16", "a"),
        root_hash("ma", "float32", ""),
    }
    assert len(roots) == 5


def test_block_hash_chains_on_parent() -> None:
    r = root_hash("m", "f", "n")
    a, b = chain_hashes(r, [1, 2, 3, 4, 5, 6, 7, 8], BS)
    assert a == block_hash(r, [1, 2, 3, 4]) and b == block_hash(a, [5, 6, 7, 8])
    # Same tokens under a different parent give a different address.
    assert block_hash(r, [5, 6, 7, 8]) != b
    assert len(a) == 32


def test_counts_add_up_and_integrity_holds_through_a_lifecycle() -> None:
    kv = manager()
    run_sequence(kv, list(range(10)))
    pool = kv.pool
    assert pool.num_free + pool.num_cached + pool.num_in_use == pool.num_blocks
    assert pool.num_cached == 2 and pool.num_in_use == 0  # two full blocks registered, the partial one freed
    pool.check_integrity()


def test_second_sequence_hits_full_blocks_of_the_first() -> None:
    kv = manager()
    run_sequence(kv, list(range(10)))
    cached, _ = run_sequence(kv, list(range(9)) + [99, 98])
    assert cached == 8


def test_match_is_capped_to_leave_one_token() -> None:
    kv = manager()
    run_sequence(kv, list(range(8)))
    seq = kv.new_seq("t")
    # The prompt is exactly the two cached blocks: only the first may be used, the last token must be computed.
    assert len(kv.match(seq, list(range(8)))) == 1
    assert len(kv.match(seq, list(range(9)))) == 2


def test_namespaces_never_share_blocks() -> None:
    kv = manager()
    run_sequence(kv, list(range(12)), namespace="alice")
    cached, _ = run_sequence(kv, list(range(12)), namespace="bob")
    assert cached == 0
    cached, _ = run_sequence(kv, list(range(12)), namespace="alice")
    assert cached == 8


def test_disabled_caching_never_hits_or_registers() -> None:
    kv = manager(caching=False)
    run_sequence(kv, list(range(12)))
    cached, _ = run_sequence(kv, list(range(12)))
    assert cached == 0 and kv.pool.num_registered == 0 and kv.pool.num_free == kv.pool.num_blocks


def test_free_blocks_are_used_before_cached_ones() -> None:
    kv = manager(num_blocks=4)
    run_sequence(kv, list(range(8)))  # 2 cached blocks, 2 free
    seq = kv.new_seq("other")
    assert kv.allocate_prefix(seq, [7] * 8, 8) == 0
    assert kv.pool.num_evictions == 0 and kv.pool.num_cached == 2


@pytest.mark.parametrize("policy", ["lfu", "lru"])
def test_among_equally_used_blocks_the_least_recent_goes_first_chain_tail_first(policy: str) -> None:
    kv = manager(num_blocks=4, policy=policy)
    run_sequence(kv, list(range(9)))  # blocks A0, A1 cached (A1 released before A0)
    run_sequence(kv, list(range(100, 109)))  # B0, B1 cached, more recent
    pool = kv.pool
    seq = kv.new_seq("x")
    assert kv.allocate_prefix(seq, [5] * 4, 4) == 0  # needs 1 block: evicts the LRU one, A's tail
    assert pool.num_evictions == 1
    probe = kv.new_seq("t")
    assert len(kv.match(probe, list(range(9)))) == 1  # A0 survived, A1 went first
    pool.check_integrity()


def test_blocks_in_use_are_never_evicted() -> None:
    kv = manager(num_blocks=3)
    seq = kv.new_seq("t")
    assert kv.allocate_prefix(seq, list(range(8)), 8) == 0
    other = kv.new_seq("u")
    assert kv.allocate_prefix(other, list(range(8)), 8) is None  # only 1 block left, needs 2
    assert kv.pool.num_in_use == 2
    kv.pool.check_integrity()


def test_duplicate_content_is_shared_not_registered_twice() -> None:
    kv = manager()
    tokens = list(range(9))
    a, b = kv.new_seq("t"), kv.new_seq("t")
    assert kv.allocate_prefix(a, tokens, 9) == 0
    assert kv.allocate_prefix(b, tokens, 9) == 0  # admitted before a registered anything
    kv.commit(a, tokens, 9)
    kv.commit(b, tokens, 9)
    assert a.blocks[:2] == b.blocks[:2]  # b switched to a's registered blocks
    assert kv.pool.num_registered == 2
    kv.free(a)
    kv.free(b)
    kv.pool.check_integrity()


def test_pins_protect_until_expiry() -> None:
    now = [0.0]
    pool = BlockPool(3, clock=lambda: now[0], max_pinned_fraction=1.0)
    kv = manager(num_blocks=3)
    kv.pool = pool
    run_sequence(kv, list(range(9)))
    pinned = kv.match(kv.new_seq("t"), list(range(9)))
    pool.pin(pinned, until=10.0)
    assert pool.num_available == 1
    with pytest.raises(MemoryError):
        pool.allocate(2)
    now[0] = 11.0
    assert pool.num_available == 3
    pool.allocate(3)
    pool.check_integrity()


def test_pins_are_capped_so_they_cannot_starve_requests() -> None:
    kv = manager(num_blocks=8)  # at most half the pool may be pinned
    tokens = list(range(24))
    run_sequence(kv, tokens)
    blocks = kv.match(kv.new_seq("t"), [*tokens, 0])
    assert len(blocks) == 6
    assert kv.pool.pin(blocks, until=1e12) == 4  # the chain's head first, up to the cap
    assert kv.pool.num_pinned == 4
    assert kv.pool.num_available == 8 - 4
    # Re-pinning the same head extends it without counting twice.
    assert kv.pool.pin(blocks[:2], until=2e12) == 2 and kv.pool.num_pinned == 4
    kv.pool.check_integrity()


def test_evicted_addresses_are_remembered_for_explanations() -> None:
    kv = manager(num_blocks=2)
    run_sequence(kv, list(range(8)))
    evicted = kv.new_seq("t")
    kv.match(evicted, list(range(9)))
    run_sequence(kv, list(range(100, 108)))  # needs both blocks: evicts the first sequence's
    assert all(h in kv.pool.recently_evicted for h in evicted.hashes)


def test_release_more_than_acquired_is_an_error() -> None:
    pool = BlockPool(2)
    (blk,) = pool.allocate(1)
    pool.release([blk])
    with pytest.raises(RuntimeError):
        pool.release([blk])


def test_integrity_check_catches_a_corrupted_hash() -> None:
    kv = manager()
    run_sequence(kv, list(range(8)))
    blk = next(b for b in kv.pool.blocks if b.block_hash is not None)
    blk.token_ids = (0, 0, 0, 0)
    with pytest.raises(AssertionError):
        kv.pool.check_integrity()
