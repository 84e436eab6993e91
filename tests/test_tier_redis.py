"""The Redis tier against real redis-server processes: one server, a private one to stop, and a 3-node cluster."""

from __future__ import annotations

import time

import pytest
import redis
import torch
from redis_servers import RedisClusterServers, RedisServer

from promptcache.cache.hashing import block_hash, root_hash
from promptcache.cache.tiers import format as kvformat
from promptcache.cache.tiers.base import BlockEntry, KVLayout
from promptcache.cache.tiers.redis_tier import RedisTier

LAYOUT = KVLayout("fp-test", torch.float32, (2, 2, 4, 2, 8), 4)
BF16 = KVLayout("fp-test", torch.bfloat16, (2, 2, 4, 2, 8), 4)
OTHER = KVLayout("fp-other", torch.float32, (2, 2, 4, 2, 8), 4)
# format.py silences this at import; pytest's per-test warning capture brings it back.
pytestmark = pytest.mark.filterwarnings("ignore:The given buffer is not writable")


def run(layout: KVLayout, n: int, seed: int = 0, pin_until: float = 0.0) -> list[BlockEntry]:
    """``n`` chained blocks of random KV (real addresses: ``block_hash`` over the layout's root)."""
    gen = torch.Generator().manual_seed(seed)
    parent = root_hash(layout.fingerprint, layout.dtype_name, "tenant")
    entries = []
    for i in range(n):
        tokens = tuple(range(seed * 1000 + i * layout.block_size, seed * 1000 + (i + 1) * layout.block_size))
        h = block_hash(parent, tokens)
        kv = torch.randn(layout.shape, generator=gen).to(layout.dtype)
        entries.append(BlockEntry(h, parent, tokens, kv, pin_until))
        parent = h
    return entries


def hashes(entries: list[BlockEntry]) -> list[bytes]:
    return [e.block_hash for e in entries]


def assert_loaded(tier: RedisTier, entries: list[BlockEntry]) -> None:
    got = tier.load(hashes(entries))
    assert all(kv is not None and torch.equal(kv, e.kv) for kv, e in zip(got, entries))


def raw(url: str) -> redis.Redis:
    return redis.Redis.from_url(url)


@pytest.mark.parametrize("layout", [LAYOUT, BF16], ids=["float32", "bfloat16"])
def test_store_then_load_returns_the_same_kv(redis_url: str, layout: KVLayout) -> None:
    tier = RedisTier(layout, redis_url)
    entries = run(layout, 5)
    assert tier.store(entries) == 5
    assert tier.contains(hashes(entries)) == [True] * 5
    assert_loaded(tier, entries)
    c = tier.counters
    assert (c.stores, c.hits, c.misses, c.errors) == (5, 5, 0, {})
    assert c.bytes_written == c.bytes_read == sum(len(kvformat.encode(e, layout)) for e in entries)
    assert c.read_latency.count == 1 and c.write_latency.count == 5
    tier.close()


def test_another_replica_loads_what_one_stored(redis_url: str) -> None:
    writer, reader = RedisTier(LAYOUT, redis_url), RedisTier(LAYOUT, redis_url)
    entries = run(LAYOUT, 3)
    writer.store(entries)
    assert_loaded(reader, entries)
    assert reader.counters.hits == 3


def test_another_fingerprint_or_dtype_sees_nothing(redis_url: str) -> None:
    entries = run(LAYOUT, 3)
    RedisTier(LAYOUT, redis_url).store(entries)
    for layout in (OTHER, BF16):
        other = RedisTier(layout, redis_url)
        assert other.contains(hashes(entries)) == [False] * 3
        assert other.load(hashes(entries)) == [None] * 3
        assert other.num_entries() == 0


def test_one_value_per_block_holding_header_and_bytes(redis_url: str) -> None:
    tier = RedisTier(LAYOUT, redis_url)
    entries = run(LAYOUT, 4)
    tier.store(entries)
    r = raw(redis_url)
    keys = sorted(r.keys("*"))
    assert keys == sorted(f"pc:kv:fp-test:float32:bs4:{h.hex()}".encode() for h in hashes(entries))
    for e in entries:
        assert r.type(tier._key(e.block_hash)) == b"string"
        assert r.get(tier._key(e.block_hash)) == kvformat.encode(e, LAYOUT)


def test_every_key_expires_after_ttl_or_later_when_pinned(redis_url: str) -> None:
    tier = RedisTier(LAYOUT, redis_url, ttl_seconds=100)
    plain, pinned = run(LAYOUT, 2, seed=1), run(LAYOUT, 2, seed=2, pin_until=time.time() + 1000)
    tier.store(plain + pinned)
    r = raw(redis_url)
    assert all(98_000 < r.pttl(tier._key(h)) <= 100_000 for h in hashes(plain))
    assert all(998_000 < r.pttl(tier._key(h)) <= 1_000_000 for h in hashes(pinned))


def test_pin_lengthens_an_expiry_and_never_shortens_it(redis_url: str) -> None:
    tier = RedisTier(LAYOUT, redis_url, ttl_seconds=100)
    entries = run(LAYOUT, 2)
    tier.store(entries)
    r = raw(redis_url)
    tier.pin(hashes(entries), time.time() + 5000)
    assert all(4_990_000 < r.pttl(tier._key(h)) <= 5_000_000 for h in hashes(entries))
    tier.pin(hashes(entries), time.time() + 10)
    assert all(r.pttl(tier._key(h)) > 4_990_000 for h in hashes(entries))
    assert tier._expire_gt  # Redis 7 understands EXPIRE ... GT


def test_pin_without_expire_gt_only_lengthens(redis_url: str) -> None:
    tier = RedisTier(LAYOUT, redis_url, ttl_seconds=100)
    short, long = run(LAYOUT, 1, seed=1), run(LAYOUT, 1, seed=2, pin_until=time.time() + 9000)
    tier.store(short + long)
    tier._expire_gt = False  # the path taken on a Redis older than 7
    tier.pin(hashes(short + long), time.time() + 5000)
    r = raw(redis_url)
    assert 4_990_000 < r.pttl(tier._key(short[0].block_hash)) <= 5_000_000
    assert r.pttl(tier._key(long[0].block_hash)) > 8_990_000


def test_contains_is_one_round_trip(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    tier = RedisTier(LAYOUT, redis_url)
    entries = run(LAYOUT, 8)
    tier.store(entries[:5])
    tier.contains(hashes(entries))  # connect first (the handshake is a write of its own)
    exists_before = raw(redis_url).info("commandstats").get("cmdstat_exists", {}).get("calls", 0)
    writes: list[object] = []
    send = redis.connection.Connection.send_packed_command

    def counting(self, command, check_health=True):
        writes.append(command)
        return send(self, command, check_health)

    monkeypatch.setattr(redis.connection.Connection, "send_packed_command", counting)
    assert tier.contains(hashes(entries)) == [True] * 5 + [False] * 3
    monkeypatch.undo()
    assert len(writes) == 1  # every EXISTS went out in one write, then the replies were read
    assert raw(redis_url).info("commandstats")["cmdstat_exists"]["calls"] - exists_before == 8


def _corrupt(value: bytes, how: str, other: bytes) -> bytes:
    if how == "truncated":
        return value[:-7]
    if how == "flipped":
        return value[:-3] + bytes([value[-3] ^ 0x01]) + value[-2:]
    if how == "foreign_header":
        return other  # another block's (valid) entry under this block's key
    if how == "foreign_fingerprint":
        e = run(OTHER, 1)[0]
        return kvformat.encode(e, OTHER)
    return b"not a promptcache entry at all"


@pytest.mark.parametrize("how", ["truncated", "flipped", "foreign_header", "foreign_fingerprint", "garbage"])
def test_a_corrupt_value_is_a_counted_miss_and_deleted(redis_url: str, how: str) -> None:
    tier = RedisTier(LAYOUT, redis_url)
    entries = run(LAYOUT, 2)
    tier.store(entries)
    r = raw(redis_url)
    key = tier._key(entries[0].block_hash)
    r.set(key, _corrupt(r.get(key), how, r.get(tier._key(entries[1].block_hash))), ex=100)
    got = tier.load(hashes(entries))
    assert got[0] is None and got[1] is not None
    assert (tier.counters.hits, tier.counters.misses, tier.counters.errors) == (1, 1, {"corrupt": 1})
    assert r.exists(key) == 0 and r.exists(tier._key(entries[1].block_hash)) == 1


def test_a_stopped_redis_answers_nothing_and_never_raises(own_redis: RedisServer) -> None:
    tier = RedisTier(LAYOUT, own_redis.url)
    entries = run(LAYOUT, 3)
    tier.store(entries)
    own_redis.stop()
    assert tier.contains(hashes(entries)) == [False] * 3
    assert not tier.available and tier.counters.errors == {"unavailable": 1}
    start = time.perf_counter()
    assert tier.load(hashes(entries)) == [None] * 3
    assert tier.store(entries) == 0
    assert tier.evict(hashes(entries)) == 0 and tier.clear() == 0 and tier.num_entries() == 0
    assert tier.check_integrity() == ["redis unreachable"]
    tier.pin(hashes(entries), time.time() + 100)
    assert time.perf_counter() - start < 0.05  # while down, the network is not touched
    assert tier.counters.errors == {"unavailable": 1, "dropped": 3}
    assert tier.counters.misses == 3


def test_a_redis_that_never_answered_is_down_not_an_error() -> None:
    for url in ("redis://127.0.0.1:1/0", "redis+cluster://127.0.0.1:1"):
        tier = RedisTier(LAYOUT, url)
        assert tier.contains([b"\0" * 32]) == [False] and tier.load([b"\0" * 32]) == [None]
        assert not tier.available and tier.counters.errors == {"unavailable": 1}


def test_backoff_doubles_while_redis_stays_down(own_redis: RedisServer) -> None:
    tier = RedisTier(LAYOUT, own_redis.url)
    own_redis.stop()
    tier.contains([b"\0" * 32])
    assert tier._backoff == 0.5
    for expected in (1.0, 2.0, 4.0):
        tier._retry_at = time.monotonic() - 0.001  # the retry time has come: the next call PINGs (and fails)
        tier.contains([b"\0" * 32])
        assert tier._backoff == expected and not tier.available
    assert tier.counters.errors == {"unavailable": 4}


def test_a_restarted_redis_serves_again_after_the_backoff(own_redis: RedisServer) -> None:
    tier = RedisTier(LAYOUT, own_redis.url)
    entries = run(LAYOUT, 2)
    own_redis.stop()
    assert tier.store(entries) == 0 and not tier.available
    own_redis.start()  # same port, empty
    assert tier.store(entries) == 0  # still inside the backoff: not tried
    time.sleep(0.55)
    assert tier.store(entries) == 2 and tier.available
    assert_loaded(tier, entries)


def test_a_redis_restarted_between_calls_is_picked_up(own_redis: RedisServer) -> None:
    tier = RedisTier(LAYOUT, own_redis.url)
    entries = run(LAYOUT, 2)
    tier.store(entries)
    own_redis.restart()  # the pooled connection now points at a closed socket; redis-py reconnects
    assert tier.contains(hashes(entries)) == [False, False]
    assert tier.available and tier.counters.errors == {}
    assert tier.store(entries) == 2


def test_a_late_read_is_a_miss(redis_url: str) -> None:
    tier = RedisTier(LAYOUT, redis_url, timeout=0.1)
    entries = run(LAYOUT, 2)
    tier.store(entries)
    raw(redis_url).client_pause(300, all=True)
    start = time.perf_counter()
    assert tier.load(hashes(entries)) == [None, None]
    assert time.perf_counter() - start < 0.3
    assert tier.counters.errors == {"timeout": 1} and not tier.available


def test_evict_and_count(redis_url: str) -> None:
    tier = RedisTier(LAYOUT, redis_url)
    entries = run(LAYOUT, 4)
    tier.store(entries)
    assert tier.num_entries() == 4
    assert tier.size_bytes() >= 4 * LAYOUT.nbytes
    assert abs(tier.size_bytes() - sum(len(kvformat.encode(e, LAYOUT)) for e in entries)) < 4 * 20
    assert tier.evict(hashes(entries[:3])) == 3
    assert tier.contains(hashes(entries)) == [False, False, False, True]
    assert tier.capacity_bytes() is None


def test_clear_removes_only_own_keys(redis_url: str) -> None:
    mine, theirs = RedisTier(LAYOUT, redis_url), RedisTier(OTHER, redis_url)
    mine.store(run(LAYOUT, 3))
    theirs.store(run(OTHER, 2))
    r = raw(redis_url)
    r.set("user:1", b"x")
    assert mine.clear() == 3
    assert mine.num_entries() == 0 and theirs.num_entries() == 2 and r.get("user:1") == b"x"


def test_check_integrity_after_mixed_use(redis_url: str) -> None:
    tier = RedisTier(LAYOUT, redis_url)
    entries = run(LAYOUT, 6)
    tier.store(entries)
    tier.pin(hashes(entries[:2]), time.time() + 500)
    tier.evict(hashes(entries[2:3]))
    r = raw(redis_url)
    r.set(tier._key(entries[3].block_hash), b"garbage", ex=100)
    tier.load(hashes(entries))  # drops the garbage
    assert tier.check_integrity(deep=True) == []


def test_check_integrity_finds_a_key_without_expiry_and_a_bad_value(redis_url: str) -> None:
    tier = RedisTier(LAYOUT, redis_url)
    entries = run(LAYOUT, 2)
    tier.store(entries)
    r = raw(redis_url)
    r.persist(tier._key(entries[0].block_hash))
    r.set(tier._key(entries[1].block_hash), b"garbage", ex=100)
    assert len(tier.check_integrity()) == 1
    problems = tier.check_integrity(deep=True)
    assert len(problems) == 2 and "no expiry" in problems[0] + problems[1]


# ---- the same on a 3-node Redis Cluster ---------------------------------------------------------------------------
def test_cluster_store_load_share_and_spread(redis_cluster: RedisClusterServers) -> None:
    redis_cluster.flushall()
    writer, reader = RedisTier(LAYOUT, redis_cluster.url), RedisTier(LAYOUT, redis_cluster.url)
    entries = run(LAYOUT, 16)
    assert writer.store(entries) == 16
    assert reader.contains(hashes(entries)) == [True] * 16
    assert_loaded(reader, entries)
    per_node = [c.dbsize() for c in redis_cluster.clients()]
    assert sum(per_node) == 16 and sum(n > 0 for n in per_node) >= 2  # no hash tag: one run over several nodes
    assert RedisTier(OTHER, redis_cluster.url).contains(hashes(entries)) == [False] * 16
    assert reader.num_entries() == 16 and reader.check_integrity(deep=True) == []


def test_cluster_clear_and_evict_reach_every_node(redis_cluster: RedisClusterServers) -> None:
    redis_cluster.flushall()
    mine, theirs = RedisTier(LAYOUT, redis_cluster.url), RedisTier(OTHER, redis_cluster.url)
    entries = run(LAYOUT, 12)
    mine.store(entries)
    theirs.store(run(OTHER, 4))
    assert mine.evict(hashes(entries[:2])) == 2
    mine.pin(hashes(entries[2:]), time.time() + 500)
    assert mine.clear() == 10
    assert mine.num_entries() == 0 and theirs.num_entries() == 4


def test_cluster_with_a_dead_node_is_down_then_serves_again(redis_cluster: RedisClusterServers) -> None:
    redis_cluster.flushall()
    tier = RedisTier(LAYOUT, redis_cluster.url)
    entries = run(LAYOUT, 12)
    assert tier.store(entries) == 12
    redis_cluster.servers[1].kill()
    try:
        assert tier.contains(hashes(entries)) == [False] * 12
        assert not tier.available and tier.counters.errors == {"unavailable": 1}
        assert tier.load(hashes(entries)) == [None] * 12 and tier.store(entries) == 0
    finally:
        redis_cluster.heal()  # the node comes back empty, with its slots
    time.sleep(0.55)
    assert tier.store(entries) == 12 and tier.available
    assert_loaded(tier, entries)
