"""The offline cache simulator: block traces, prefix-hit semantics, LRU as the engine does it, Belady's bound.

Hand-worked traces use one-letter addresses; every expected number is worked out in the comments.
"""

from __future__ import annotations

import random

import pytest

from promptcache.bench.belady import SimResult, TraceEntry, block_trace, simulate
from promptcache.cache.hashing import chain_hashes, root_hash
from promptcache.cache.manager import KVCacheManager

BS = 4


def req(*blocks: str, writes: str | None = None) -> TraceEntry:
    """An entry reading ``blocks`` (one-letter addresses) and writing them (or ``writes``), 4 tokens a block + 1."""
    reads = [b.encode() for b in blocks]
    written = reads if writes is None else [w.encode() for w in writes]
    return TraceEntry(reads=reads, writes=list(written), prompt_tokens=len(reads) * BS + 1)


def hits(trace: list[TraceEntry], capacity: int, policy: str) -> list[int]:
    """Hit blocks per request."""
    return [t // BS for t in simulate(trace, capacity, BS, policy).per_request_hit_tokens]


# ---- hand-worked traces -----------------------------------------------------------------------------------------
def test_belady_keeps_the_block_read_again_where_lru_keeps_the_most_recent() -> None:
    # A, B, C, A with room for 2 blocks.
    # LRU: {A} -> {A,B} -> C evicts A (least recent) -> {B,C}; A misses.          hits 0,0,0,0
    # Belady: at C, A is read next at t=3 and B never: evict B -> {A,C}; A hits.  hits 0,0,0,1
    trace = [req("A"), req("B"), req("C"), req("A")]
    assert hits(trace, 2, "lru") == [0, 0, 0, 0]
    assert hits(trace, 2, "belady") == [0, 0, 0, 1]


def test_a_cycle_one_longer_than_the_cache_defeats_lru_but_not_belady() -> None:
    # A, B, C, A, B, C with room for 2: LRU always evicts the block needed next: 0 hits.
    # Belady: t2 C evicts B (next read t4, farther than A's t3) -> {A,C}; t3 A hits;
    # t4 B misses, evicts A (never read again) over C (t5) -> {C,B}; t5 C hits.  2 hits.
    trace = [req(x) for x in "ABCABC"]
    assert hits(trace, 2, "lru") == [0] * 6
    assert hits(trace, 2, "belady") == [0, 0, 0, 1, 0, 1]
    result = simulate(trace, 2, BS, "belady")
    assert result.hit_tokens == 2 * BS
    assert result.prompt_tokens == 6 * (BS + 1)
    assert result.hit_ratio == pytest.approx(8 / 30)


def test_a_missing_first_block_means_no_hit_even_if_later_blocks_are_cached() -> None:
    # The first request leaves only "b" cached (it wrote just that block); the second reads a, b: a misses, and b's
    # KV depends on a's, so the hit is 0 although b is in the cache.
    trace = [req(writes="b"), req("a", "b")]
    for policy in ("lru", "belady"):
        assert hits(trace, 10, policy) == [0, 0]
    # A miss in the middle ends the hit there: a hits, x misses, c does not count.
    trace = [req("a", "b", "c"), req("a", "x", "c")]
    for policy in ("lru", "belady"):
        assert hits(trace, 10, policy) == [0, 1]


def test_lru_evicts_a_chain_from_its_tail_as_the_engine_releases_it() -> None:
    # Room for 3. Request 1 holds chain a1 a2 and releases it tail first: recency a2 < a1. Request 2 adds b:
    # a2 < a1 < b. Request 3 adds c and evicts the least recent, a2 (the tail), not a1. Request 4 reads a1 a2:
    # a1 hits, a2 misses -> 1 block. (Evicting the head first would have left 0.)
    trace = [req("1", "2"), req("b"), req("c"), req("1", "2")]
    assert hits(trace, 3, "lru") == [0, 0, 0, 1]


def test_a_hit_refreshes_recency_under_lru() -> None:
    # Room for 2: A, B, A (hit, A now most recent), C evicts B, A hits again.
    trace = [req("A"), req("B"), req("A"), req("C"), req("A")]
    assert hits(trace, 2, "lru") == [0, 0, 1, 0, 1]


def test_capacity_zero_caches_nothing() -> None:
    trace = [req("A"), req("A"), req("A", "B"), req("A", "B")]
    for policy in ("lru", "belady"):
        result = simulate(trace, 0, BS, policy)
        assert result.hit_tokens == 0
        assert result.per_request_hit_tokens == [0, 0, 0, 0]
        assert result.hit_ratio == 0.0


def test_writes_larger_than_the_cache_keep_the_head_of_the_chain() -> None:
    # Room for 2. Request 1 holds x. Request 2 writes a b c: more than fits, so only its first 2 blocks (the ones a
    # prefix hit can reach, and the last released) stay; x is evicted for them. Request 3 reads a b c: 2 blocks hit.
    # Request 4 reads x: gone.
    trace = [req("x"), req("a", "b", "c"), req("a", "b", "c"), req("x")]
    for policy in ("lru", "belady"):
        assert hits(trace, 2, policy) == [0, 0, 2, 0]


def test_the_current_requests_blocks_are_never_evicted_while_it_runs() -> None:
    # Room for 2. A is read again at t=2 and B never, yet request 2 holds B (and C): they are in use, so A, the
    # only block it does not hold, has to go, even under Belady.
    trace = [req("A"), req("B", "C"), req("A")]
    assert hits(trace, 2, "belady") == [0, 0, 0]
    # With room for 3 nothing has to go.
    assert hits(trace, 3, "belady") == [0, 0, 1]


def test_belady_breaks_ties_by_evicting_the_deeper_block() -> None:
    # Room for 3. Request 1 writes chain p q. Request 2 holds r s: 4 blocks, one must go, and it must be p or q.
    # Both are read next by request 3: a tie, broken towards the deeper block, q. Request 3 hits p: 1 block.
    # (Evicting p would have left q unreachable: 0.)
    trace = [req("p", "q"), req("r", "s"), req("p", "q")]
    assert hits(trace, 3, "belady") == [0, 0, 1]


def test_hit_tokens_count_blocks_times_block_size_and_ratio_uses_prompt_tokens() -> None:
    trace = [req("a", "b"), req("a", "b")]
    result = simulate(trace, 8, BS, "lru")
    assert result == SimResult("lru", 8, 2 * BS, 2 * (2 * BS + 1), [0, 2 * BS])
    assert result.hit_ratio == pytest.approx(8 / 18)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="policy"):
        simulate([], 4, BS, "fifo")
    with pytest.raises(ValueError, match="capacity"):
        simulate([], -1, BS, "lru")
    with pytest.raises(ValueError, match="block_size"):
        simulate([], 4, 0, "lru")
    with pytest.raises(ValueError, match="block_size"):
        block_trace([], 0)
    assert simulate([], 4, BS, "belady").hit_ratio == 0.0


# ---- block traces -------------------------------------------------------------------------------------------------
def test_block_trace_chains_like_the_engine_and_caps_reads() -> None:
    root = root_hash("bench", "sim", "bench")
    prompt = list(range(100, 112))  # 12 tokens = 3 full blocks of 4
    output = [7, 8, 9]  # the last is sampled, never fed: KV covers prompt + [7, 8] = 14 tokens -> 3 full blocks
    (entry,) = block_trace([(prompt, output)], BS)
    assert entry.prompt_tokens == 12
    # The last prompt token is always computed, so a hit covers at most (12 - 1) // 4 = 2 blocks.
    assert entry.reads == chain_hashes(root, prompt, BS)[:2]
    assert entry.writes == chain_hashes(root, prompt + output[:-1], BS)
    assert len(entry.writes) == 3
    # With 3 more output tokens the fourth block fills: prompt + 5 tokens with KV = 17 -> 4 blocks.
    (longer,) = block_trace([(prompt, [7, 8, 9, 10, 11, 12])], BS)
    assert len(longer.writes) == 4 and longer.writes[:3] == entry.writes


def test_the_popularity_oracle_keeps_the_most_read_block() -> None:
    # A, B, C, A, A, B with room for 2; over the whole trace A is read 3 times, B twice, C once.
    # Oracle: at C, evict B (fewer reads in all than A) -> {A,C}; A, A hit; B misses.   hits 0,0,0,1,1,0
    # LRU: at C, evict A (least recent) -> {B,C}; A misses (evicts B); A hits; B misses. hits 0,0,0,0,1,0
    trace = [req("A"), req("B"), req("C"), req("A"), req("A"), req("B")]
    assert hits(trace, 2, "popularity-oracle") == [0, 0, 0, 1, 1, 0]
    assert hits(trace, 2, "lru") == [0, 0, 0, 0, 1, 0]


def test_perfect_lfu_remembers_uses_across_evictions_where_lfu_starts_afresh() -> None:
    # Room for 2. A is used twice, then evicted by the two-block request XY; X is used again (2 uses).
    # A returns: LFU counts it once (its uses left with it), perfect LFU three times. E then needs room:
    # LFU evicts A (1 use < X's 2), perfect LFU evicts X (2 < 3). So A's last request hits only under perfect LFU.
    trace = [req("A"), req("A"), req("B"), req("C"), req("X", "Y"), req("X"), req("A"), req("E"), req("A")]
    assert hits(trace, 2, "lfu") == [0, 1, 0, 0, 0, 1, 0, 0, 0]
    assert hits(trace, 2, "perfect-lfu") == [0, 1, 0, 0, 0, 1, 0, 0, 1]


def test_equal_prefixes_give_equal_leading_addresses_and_namespaces_never_meet() -> None:
    shared = list(range(8))
    a, b = block_trace([(shared + [50, 51, 52, 53, 54], [1]), (shared + [60, 61, 62, 63, 64], [1])], BS)
    assert a.reads[:2] == b.reads[:2]  # the 8 shared tokens: 2 blocks
    assert a.reads[2] != b.reads[2]
    (other,) = block_trace([(shared + [50, 51, 52, 53, 54], [1])], BS, namespace="tenant-b")
    assert not set(other.writes) & set(a.writes)


def test_a_prompt_answered_and_resent_hits_through_the_answer() -> None:
    # Turn 2 resends turn 1's prompt and answer: every block of turn 1 (answer included) is a hit for turn 2.
    prompt1, answer = list(range(10)), [20, 21, 22, 23, 24, 25]
    prompt2 = prompt1 + answer + [30, 31, 32]
    trace = block_trace([(prompt1, answer), (prompt2, [1, 2])], BS)
    # Turn 1 wrote (10 + 5) // 4 = 3 blocks; turn 2 may hit (19 - 1) // 4 = 4 blocks, of which those 3 are cached.
    result = simulate(trace, 100, BS, "lru")
    assert result.per_request_hit_tokens == [0, 3 * BS]


def test_short_prompts_read_nothing() -> None:
    (one, empty_out) = block_trace([([5], [6]), (list(range(4)), [])], BS)
    assert one.reads == [] and one.writes == []
    # 4 prompt tokens: a full block is written but cannot be a hit for this prompt ((4 - 1) // 4 = 0).
    assert empty_out.reads == [] and len(empty_out.writes) == 1


# ---- against the engine's own cache, and the bound ---------------------------------------------------------------
def random_requests(seed: int, n: int = 60) -> list[tuple[list[int], list[int]]]:
    """Requests over a few shared "documents" of varied lengths, each with its own question and answer."""
    rng = random.Random(seed)
    docs = [[rng.randrange(1000) for _ in range(rng.randrange(4, 40))] for _ in range(8)]
    weights = [1 / (k + 1) for k in range(len(docs))]
    out = []
    for _ in range(n):
        doc = rng.choices(docs, weights)[0]
        question = [rng.randrange(1000) for _ in range(rng.randrange(1, 9))]
        answer = [rng.randrange(1000) for _ in range(rng.randrange(1, 9))]
        out.append((doc + question, answer))
    return out


@pytest.mark.parametrize("policy", ["lfu", "lru"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_simulated_policy_replays_exactly_what_the_engines_block_pool_does(seed: int, policy: str) -> None:
    # The engine's cache manager, driven as the engine drives it for requests run one at a time: match and allocate
    # the prompt, compute it, grow through the output, register, free tail first. Its hits must equal the simulation
    # of its policy, request by request, when the pool has no partial blocks to hold (so sizes are whole blocks).
    capacity = 12
    requests = [
        (p, a)
        for p, a in random_requests(seed, n=200)
        if (len(p) + len(a) - 1) % BS == 0 and (len(p) + len(a) - 1) // BS <= capacity
    ]
    assert len(requests) >= 20
    trace = block_trace(requests, BS, namespace="t")
    kv = KVCacheManager(
        capacity, BS, model_fingerprint="bench", dtype="sim", enable_caching=True, eviction_policy=policy
    )
    engine_hits = []
    for prompt, answer in requests:
        seq = kv.new_seq("t")
        cached = kv.allocate_prefix(seq, prompt, len(prompt) - len(kv.match(seq, prompt)) * BS)
        assert cached is not None
        tokens = prompt + answer
        assert kv.grow(seq, len(tokens) - 1)
        kv.commit(seq, tokens, len(tokens) - 1)
        kv.free(seq)
        engine_hits.append(cached)
    assert simulate(trace, capacity, BS, policy).per_request_hit_tokens == engine_hits
    assert sum(engine_hits) > 0 and kv.pool.num_evictions > 0
    # The two policies really choose differently on this trace (the comparison above is not vacuous).
    other = "lru" if policy == "lfu" else "lfu"
    assert simulate(trace, capacity, BS, other).per_request_hit_tokens != engine_hits


@pytest.mark.parametrize("seed", range(6))
def test_belady_is_an_upper_bound_on_the_engines_policies_and_the_infinite_cache_on_all(seed: int) -> None:
    trace = block_trace(random_requests(seed, n=120), BS)
    unlimited = simulate(trace, 10**9, BS, "lru").hit_tokens
    assert simulate(trace, 10**9, BS, "belady").hit_tokens == unlimited
    assert simulate(trace, 10**9, BS, "lfu").hit_tokens == unlimited
    previous = 0
    for capacity in (1, 2, 4, 8, 16, 32, 64):
        best = simulate(trace, capacity, BS, "belady").hit_tokens
        for policy in ("lfu", "lru", "perfect-lfu", "popularity-oracle"):
            assert simulate(trace, capacity, BS, policy).hit_tokens <= best <= unlimited, (capacity, policy)
        assert best >= previous  # more room never hurts the optimum
        previous = best
    # With room for every block ever written, no policy evicts anything.
    everything = len({a for e in trace for a in e.writes})
    for policy in ("belady", "lfu", "lru"):
        assert simulate(trace, everything, BS, policy).hit_tokens == unlimited


@pytest.mark.parametrize("policy", ["lfu", "lru"])
def test_the_simulation_replays_what_the_real_engine_served(policy: str) -> None:
    # The real engine on the embedded model, a 16-block cache, requests one at a time (greedy, fixed lengths):
    # the prompt tokens it reports from the cache are, request by request, the simulation's hits under its policy
    # on the block trace of what it ran. Output lengths make prompt + output - 1 whole blocks, so no partial block
    # takes room.
    from promptcache import LLM, SamplingParams

    llm = LLM(device="cpu", dtype="float32", block_size=BS, num_kv_blocks=16, eviction_policy=policy)
    rng = random.Random(0)
    docs = [[rng.randrange(100, 8000) for _ in range(4 * k + 2)] for k in (3, 4, 5, 6)]
    requests, served = [], []
    for _ in range(20):
        prompt = rng.choices(docs, [1, 1 / 2, 1 / 3, 1 / 4])[0] + [rng.randrange(100, 8000) for _ in range(3)]
        n = rng.randrange(2, 8)
        n += -(len(prompt) + n - 1) % BS
        out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True))[0]
        requests.append((out.prompt_token_ids, out.token_ids))
        served.append(out.num_cached_tokens)
    assert llm.cache_stats()["evictions"] > 0 and sum(served) > 0
    assert llm.cache_stats()["eviction_policy"] == policy
    assert simulate(block_trace(requests, BS), 16, BS, policy).per_request_hit_tokens == served
    assert simulate(block_trace(requests, BS), 16, BS, "belady").hit_tokens >= sum(served)
