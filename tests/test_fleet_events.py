"""KV events and the routing cost, below the HTTP layer: a replica's publisher and a router's follower through a real
Redis (snapshots, gaps, restarts, resets, heartbeats), the load book shared by two routers, and the policies."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from promptcache.cache.hashing import BlockHash, block_hash
from promptcache.fleet.events import EventFollower, KVEventPublisher
from promptcache.fleet.load import LoadBook
from promptcache.fleet.policy import Candidate, Load, make_policy, measured_weights
from promptcache.redis_link import RedisLink

SCOPE = "testfp:float32:bs16"


def addr(i: int) -> BlockHash:
    return block_hash(b"\0" * 32, [i] * 16)


class Replica:
    """A publisher over a held-addresses table that stands for a replica's caches (device, disk)."""

    def __init__(self, url: str, name: str = "r1") -> None:
        self.held: dict[str, set[BlockHash]] = {"device": set(), "host": set(), "disk": set()}
        self.pub = KVEventPublisher(RedisLink(url), SCOPE, name, flush_interval=0.01, heartbeat_interval=0.2)
        self.pub.start()

    def store(self, tier: str, *ids: int) -> None:
        hs = [addr(i) for i in ids]
        self.held[tier].update(hs)
        self.pub.stored(tier, hs)

    def remove(self, tier: str, *ids: int) -> None:
        hs = [addr(i) for i in ids]
        self.held[tier].difference_update(hs)
        self.pub.removed(tier, hs)

    def snapshot(self) -> dict:
        return self.pub.snapshot(lambda: {t: list(hs) for t, hs in self.held.items()})


def until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.02)
    raise AssertionError("condition not reached in time")


@pytest.fixture
def pair(redis_url):
    replicas: dict[str, Replica] = {"r1": Replica(redis_url)}
    follower = EventFollower(RedisLink(redis_url), lambda name: replicas[name].snapshot(), block_ms=50,
                             heartbeat_check=0.1)  # fmt: skip
    follower.start()
    follower.follow("r1", SCOPE)
    yield replicas, follower
    follower.close()
    for r in replicas.values():
        r.pub.close()


def view_of(follower: EventFollower, ids: range) -> list[str | None]:
    return follower.tiers_of("r1", [addr(i) for i in ids])


def test_a_router_sees_stores_and_removals_by_tier_with_the_best_tier_first(pair) -> None:
    replicas, follower = pair
    r = replicas["r1"]
    r.store("disk", 0, 1, 2)
    r.store("device", 1)
    until(lambda: view_of(follower, range(4)) == ["disk", "device", "disk", None])
    r.remove("disk", 1, 2)
    r.remove("device", 1)
    until(lambda: view_of(follower, range(4)) == ["disk", None, None, None])
    assert follower.views()["r1"].resyncs == {"join": 1}


def test_what_was_held_before_the_router_came_is_in_its_snapshot(redis_url) -> None:
    r = Replica(redis_url)
    r.store("device", 5, 6)
    time.sleep(0.1)
    follower = EventFollower(RedisLink(redis_url), lambda name: r.snapshot(), block_ms=50)
    follower.start()
    try:
        follower.follow("r1", SCOPE)
        until(lambda: follower.tiers_of("r1", [addr(5), addr(6)]) == ["device", "device"])
    finally:
        follower.close()
        r.pub.close()


def test_a_skipped_message_number_makes_the_router_take_a_new_snapshot(pair, redis_server) -> None:
    replicas, follower = pair
    r = replicas["r1"]
    r.store("device", 0)
    until(lambda: view_of(follower, range(2)) == ["device", None])
    # A message lost on its way (as when Redis is down): its number is skipped, its event never arrives.
    r.held["device"].add(addr(9))
    with r.pub._lock:
        r.pub._seq += 1
    r.store("device", 2)
    until(lambda: follower.views()["r1"].resyncs.get("gap") == 1)
    until(lambda: follower.tiers_of("r1", [addr(9), addr(2)]) == ["device", "device"])


def test_a_lost_last_message_is_found_through_the_heartbeat(pair) -> None:
    replicas, follower = pair
    r = replicas["r1"]
    r.store("device", 0)
    until(lambda: view_of(follower, range(2)) == ["device", None])
    # The replica's last message is lost (Redis was down as it was sent) and nothing follows it: no later message
    # reveals the gap, but the beat carries the number.
    r.held["device"].add(addr(1))
    with r.pub._lock:
        r.pub._seq += 1
    until(lambda: follower.views()["r1"].resyncs.get("gap") == 1)
    until(lambda: view_of(follower, range(2)) == ["device", "device"])


def test_a_restarted_replica_is_resynchronised_and_a_reset_too(pair, redis_url) -> None:
    replicas, follower = pair
    old = replicas["r1"]
    old.store("device", 1, 2)
    until(lambda: view_of(follower, range(3)) == [None, "device", "device"])
    old.pub.close()
    new = replicas["r1"] = Replica(redis_url)  # same name, new process: a new epoch, an empty device pool
    new.store("disk", 2)
    until(lambda: view_of(follower, range(3)) == [None, None, "disk"])
    assert follower.views()["r1"].resyncs.get("restart") == 1
    new.held["disk"].clear()
    new.pub.reset()
    until(lambda: follower.views()["r1"].resyncs.get("reset") == 1)
    until(lambda: view_of(follower, range(3)) == [None, None, None])


def test_a_replica_whose_heartbeat_stops_is_forgotten_until_it_beats_again(pair, redis_url) -> None:
    replicas, follower = pair
    r = replicas["r1"]
    r.store("device", 0)
    until(lambda: view_of(follower, range(1)) == ["device"])
    r.pub._stop.set()  # the process hangs: no more beats
    r.pub._thread.join()
    r.pub.link.client().delete(r.pub.heartbeat_key)  # as when its beat expires
    until(lambda: not follower.views()["r1"].alive)
    assert view_of(follower, range(1)) == [None]
    back = replicas["r1"] = Replica(redis_url)
    back.store("device", 0)
    until(lambda: view_of(follower, range(1)) == ["device"])


def test_two_routers_see_each_others_load_and_a_dead_routers_load_goes_away(redis_url) -> None:
    a = LoadBook(RedisLink(redis_url), SCOPE, "router-a", sync_interval=0.05)
    b = LoadBook(RedisLink(redis_url), SCOPE, "router-b", sync_interval=0.05)
    a.start()
    b.start()
    try:
        ticket = a.dispatch("r1", 500)
        until(lambda: b.of("r1") == Load(500, 1, 1))
        a.prefilled(ticket)
        a.finish(ticket)
        a.finish(ticket)  # released once, however often it ends
        until(lambda: b.of("r1") == Load(0, 0, 1))
        a.dispatch("r2", 100)
        until(lambda: b.of("r2").decodes == 1)
        a.close()  # a router that stops takes its counts with it
        until(lambda: b.of("r2").decodes == 0)
    finally:
        b.close()


# ---- the policies ----------------------------------------------------------------------------------------------
def cands(*specs: tuple[str, list[str | None], Load]) -> list[Candidate]:
    return [Candidate(name, tiers, load) for name, tiers, load in specs]


def test_the_cache_policy_prefers_device_hits_and_redis_decides_nothing() -> None:
    policy = make_policy("cache")
    hot = ["device"] * 10
    shared = ["redis"] * 10
    order = policy.rank(cands(("a", shared, Load()), ("b", hot, Load()), ("c", shared, Load())), 200, 16)
    assert order[0].name == "b" and order[0].cached_tokens == 160
    # Only Redis holds it: every replica is alike, and ties go round the replicas.
    firsts = {policy.rank(cands(("a", shared, Load()), ("b", shared, Load())), 200, 16)[0].name for _ in range(4)}
    assert firsts == {"a", "b"}


def test_load_outweighs_a_hit_once_the_queue_is_longer_than_the_prefill_saved() -> None:
    policy = make_policy("cache", decode_weight=16)
    hot = ["device"] * 4  # saves 64 tokens
    busy = Load(prefill_tokens=0, decodes=3)  # 48 tokens of load: still worth it
    assert policy.rank(cands(("a", hot, busy), ("b", [None] * 4, Load())), 80, 16)[0].name == "a"
    busier = Load(prefill_tokens=200, decodes=3)
    assert policy.rank(cands(("a", hot, busier), ("b", [None] * 4, Load())), 80, 16)[0].name == "b"


def test_affinity_keeps_a_key_on_its_replica_unless_another_is_clearly_cheaper() -> None:
    policy = make_policy("cache", affinity_tokens=256)
    a, b = Candidate("a", [None], Load(prefill_tokens=100)), Candidate("b", [None], Load())
    a.affinity = True
    assert policy.rank([a, b], 40, 16)[0].name == "a"
    a2, b2 = Candidate("a", [None], Load(prefill_tokens=1000)), Candidate("b", [None], Load())
    a2.affinity = True
    assert policy.rank([a2, b2], 40, 16)[0].name == "b"


def test_measured_tier_costs_set_the_weights_and_an_operators_weights_win() -> None:
    # Recomputing a block of 16 tokens takes 16 ms here; loading it from Redis 2 ms, from disk 8 ms.
    rates = {"recompute_seconds_per_token": 0.001, "load_seconds_per_block": {"redis": 0.002, "disk": 0.008,
                                                                               "host": None}}  # fmt: skip
    assert measured_weights(rates, 16) == {"redis": 0.875, "disk": 0.5}
    assert measured_weights({"recompute_seconds_per_token": None, "load_seconds_per_block": {}}, 16) == {}
    assert measured_weights(None, 16) == {}
    moved = Candidate("b", ["redis"] * 4, Load(decodes=2), weights={"redis": 0.875})
    stay = Candidate("a", ["device"] * 4, Load(decodes=3))
    # A cheap Redis load makes the idler replica worth the move; with the default Redis weight (0.5) it is not.
    assert make_policy("cache").rank([stay, moved], 70, 16)[0].name == "b"
    assert make_policy("cache", tier_weights={"redis": 0.5}).rank([stay, moved], 70, 16)[0].name == "a"


def test_round_robin_cycles_and_least_loaded_takes_the_idlest() -> None:
    rr = make_policy("round-robin")
    seen = [rr.rank(cands(("a", [], Load()), ("b", [], Load()), ("c", [], Load())), 10, 16)[0].name
            for _ in range(6)]  # fmt: skip
    assert sorted(seen) == ["a", "a", "b", "b", "c", "c"]
    ll = make_policy("least-loaded")
    order = ll.rank(cands(("a", ["device"], Load(decodes=2)), ("b", [], Load(decodes=1))), 10, 16)
    assert [c.name for c in order] == ["b", "a"]
    with pytest.raises(ValueError, match="round-robin"):
        make_policy("random")


def test_events_and_loads_work_on_a_redis_cluster(redis_cluster) -> None:
    redis_cluster.flushall()
    replicas = {"r1": Replica(redis_cluster.url), "r2": Replica(redis_cluster.url, name="r2")}
    follower = EventFollower(RedisLink(redis_cluster.url), lambda name: replicas[name].snapshot(), block_ms=50)
    follower.start()
    books = [LoadBook(RedisLink(redis_cluster.url), SCOPE, f"router-{i}", sync_interval=0.05) for i in range(2)]
    for b in books:
        b.start()
    try:
        for name in replicas:
            follower.follow(name, SCOPE)
        replicas["r1"].store("device", 0)
        replicas["r2"].store("host", 0)
        until(lambda: follower.tiers_of("r1", [addr(0)]) == ["device"] and follower.tiers_of("r2", [addr(0)])
              == ["host"])  # fmt: skip
        books[0].dispatch("r2", 64)
        until(lambda: books[1].of("r2") == Load(64, 1, 1))
    finally:
        for b in books:
            b.close()
        follower.close()
        for r in replicas.values():
            r.pub.close()
