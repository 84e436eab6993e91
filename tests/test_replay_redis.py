"""Replay records shared through Redis (``RedisReplayStore``) by replicas of one model, against real redis-servers."""

from __future__ import annotations

import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis_servers import RedisClusterServers, RedisServer

from promptcache.replay import RedisReplayStore, ReplayStore, make_replay_store, render_chat_ids
from promptcache.tokenizer import Tokenizer

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "promptcache" / "data" / "default_model"
SCOPE = "fp-replay-test"
IDS = (0, 1, 300, 65_535, 65_536, 151_643, 2**32 - 1)  # both uint32 ends and ids past 16 bits


def raw(url: str) -> redis.Redis:
    return redis.Redis.from_url(url)


def get_calls(url: str) -> int:
    return raw(url).info("commandstats").get("cmdstat_get", {}).get("calls", 0)


@pytest.fixture
def count_writes(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[object]]:
    """Every command buffer a redis-py connection writes to its socket while the test runs (one per round trip)."""
    writes: list[object] = []
    send = redis.connection.Connection.send_packed_command

    def counting(self, command, check_health=True):
        writes.append(command)
        return send(self, command, check_health)

    monkeypatch.setattr(redis.connection.Connection, "send_packed_command", counting)
    yield writes


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    assert (DEFAULT_MODEL / "tokenizer_config.json").exists()
    tok = Tokenizer.from_pretrained(DEFAULT_MODEL)
    assert tok.get_chat_template()  # the embedded model has one: render_chat_ids needs it
    return tok


def test_a_record_remembered_on_one_replica_is_found_on_another_with_the_exact_ids(redis_url: str) -> None:
    writer, reader = RedisReplayStore(redis_url, SCOPE), RedisReplayStore(redis_url, SCOPE)
    writer.remember("alice", "Hello there.", list(IDS))
    assert len(reader) == 0
    assert reader.lookup("alice", "Hello there.") == IDS
    assert len(reader) == 1  # kept locally too
    assert reader.stats() == {
        "entries": 1,
        "redis_hits": 1,
        "redis_misses": 0,
        "redis_errors": {},
        "redis_available": True,
    }


def test_the_value_is_a_version_byte_then_little_endian_uint32_ids_under_a_scoped_key(redis_url: str) -> None:
    store = RedisReplayStore(redis_url, "s" * 40)
    store.remember("alice", "Hi", list(IDS))
    keys = raw(redis_url).keys("*")
    assert len(keys) == 1
    key = keys[0].decode()
    assert key == store.key("alice", "Hi")
    prefix, digest = key.rsplit(":", 1)
    assert prefix == "pc:replay:" + "s" * 32 and len(digest) == 64 and int(digest, 16) >= 0
    assert raw(redis_url).get(key) == b"\x01" + struct.pack(f"<{len(IDS)}I", *IDS)


def test_another_namespace_or_another_scope_finds_nothing(redis_url: str) -> None:
    long_scope = "f" * 32 + "-model-a"
    RedisReplayStore(redis_url, long_scope).remember("alice", "Hello there.", IDS)
    assert RedisReplayStore(redis_url, long_scope).lookup("bob", "Hello there.") is None
    # Same first 32 characters (the part in the key prefix), another model: still nothing.
    assert RedisReplayStore(redis_url, "f" * 32 + "-model-b").lookup("alice", "Hello there.") is None
    assert RedisReplayStore(redis_url, "other").lookup("alice", "Hello there.") is None
    assert RedisReplayStore(redis_url, long_scope).lookup("alice", "Hello there.") == IDS


@pytest.mark.parametrize(
    "first, second",
    [(("a", "b\x1fc"), ("a\x1fb", "c")), (("ab", "c"), ("a", "bc")), (("", "abc"), ("abc", "x"))],
    ids=["separator", "boundary", "empty-namespace"],
)
def test_pairs_that_concatenate_alike_are_distinct_records(
    redis_url: str, first: tuple[str, str], second: tuple[str, str]
) -> None:
    writer = RedisReplayStore(redis_url, SCOPE)
    writer.remember(*first, [1, 2, 3])
    writer.remember(*second, [4, 5, 6])
    assert raw(redis_url).dbsize() == 2
    reader = RedisReplayStore(redis_url, SCOPE)  # a fresh one: its answers come from Redis alone
    assert reader.lookup(*first) == (1, 2, 3)
    assert reader.lookup(*second) == (4, 5, 6)


def test_lookup_many_asks_redis_once_for_all_texts(redis_url: str, count_writes: list[object]) -> None:
    writer, reader = RedisReplayStore(redis_url, SCOPE), RedisReplayStore(redis_url, SCOPE)
    for i in range(5):
        writer.remember("alice", f"answer {i}", [i, i + 1])
    reader.lookup("alice", "warm-up")  # connect first (the handshake is a write of its own)
    gets_before = get_calls(redis_url)
    count_writes.clear()
    texts = ["answer 0", "answer 1", "unknown", "answer 2", "answer 1", "answer 3", "answer 4"]
    got = reader.lookup_many("alice", texts)
    writes = len(count_writes)
    assert got == [(0, 1), (1, 2), None, (2, 3), (1, 2), (3, 4), (4, 5)]
    assert writes == 1  # every GET went out in one write, then the replies were read
    assert get_calls(redis_url) - gets_before == 6  # 5 distinct texts + the unknown one; no duplicate GET


def test_the_record_last_written_anywhere_wins_over_an_older_local_one(redis_url: str) -> None:
    a, b = RedisReplayStore(redis_url, SCOPE), RedisReplayStore(redis_url, SCOPE)
    a.remember("alice", "same text", [1, 2])
    assert b.lookup("alice", "same text") == (1, 2)  # b now holds it locally too
    a.remember("alice", "same text", [3])  # the same text, generated as other ids
    assert b.lookup("alice", "same text") == (3,)  # what a router and every replica read alike


def test_every_record_expires_after_the_ttl(redis_url: str) -> None:
    store = RedisReplayStore(redis_url, SCOPE, ttl_seconds=100)
    store.remember("alice", "Hello there.", IDS)
    assert 98_000 < raw(redis_url).pttl(store.key("alice", "Hello there.")) <= 100_000


def test_the_local_lru_stays_bounded_and_redis_backs_what_it_dropped(redis_url: str) -> None:
    store = RedisReplayStore(redis_url, SCOPE, capacity=2)
    for i in range(3):
        store.remember("alice", f"answer {i}", [i])
    assert len(store) == 2
    assert store.lookup("alice", "answer 0") == (0,)  # dropped locally, read back from Redis
    assert len(store) == 2 and store.stats()["redis_hits"] == 1


@pytest.mark.parametrize(
    "value",
    [b"", b"\x01", b"\x01\x02\x00\x00", b"\x02" + struct.pack("<2I", 1, 2), b"not a replay record"],
    ids=["empty", "no-ids", "truncated", "other-version", "garbage"],
)
def test_an_undecodable_value_is_a_counted_miss(redis_url: str, value: bytes) -> None:
    store = RedisReplayStore(redis_url, SCOPE)
    raw(redis_url).set(store.key("alice", "Hello there."), value, ex=100)
    assert store.lookup_many("alice", ["Hello there."]) == [None]
    stats = store.stats()
    assert (stats["entries"], stats["redis_hits"], stats["redis_misses"]) == (0, 0, 1)
    assert stats["redis_errors"] == {"corrupt": 1}


def test_with_redis_killed_the_store_works_locally_without_waiting_then_shares_again(own_redis: RedisServer) -> None:
    store = RedisReplayStore(own_redis.url, SCOPE, timeout=0.2)
    store.remember("alice", "before", [1, 2])
    own_redis.kill()
    start = time.perf_counter()
    store.remember("alice", "during", [3, 4])  # finds Redis gone: the store goes down, the record stays local
    assert store.lookup("alice", "during") == (3, 4)
    assert store.lookup("alice", "before") == (1, 2)
    assert store.lookup_many("alice", ["never", "during"]) == [None, (3, 4)]
    assert time.perf_counter() - start < 0.2  # under one timeout for all of it: while down, no network
    stats = store.stats()
    assert not stats["redis_available"] and stats["redis_errors"] == {"unavailable": 1}
    own_redis.start()  # same port, empty
    time.sleep(0.55)  # past the first backoff
    store.remember("alice", "after", [5, 6])
    assert store.stats()["redis_available"]
    other = RedisReplayStore(own_redis.url, SCOPE)
    assert other.lookup("alice", "after") == (5, 6)
    assert other.lookup("alice", "during") is None  # remembered while down: local only


def test_a_paused_redis_is_a_miss_within_the_timeout(redis_url: str) -> None:
    writer, reader = RedisReplayStore(redis_url, SCOPE), RedisReplayStore(redis_url, SCOPE, timeout=0.1)
    writer.remember("alice", "Hello there.", IDS)
    reader.remember("alice", "mine", [7])
    reader.lookup("alice", "warm-up")  # connected before the pause
    raw(redis_url).client_pause(300, all=True)
    start = time.perf_counter()
    assert reader.lookup_many("alice", ["Hello there.", "mine"]) == [None, (7,)]
    assert time.perf_counter() - start < 0.25
    assert reader.stats()["redis_errors"] == {"timeout": 1} and not reader.stats()["redis_available"]


def _answer_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    """Ids that decode to ``text`` but are not its re-tokenization (one piece per character): what a model may
    generate, and what only replay gives back."""
    ids = [i for ch in text for i in tokenizer.encode(ch, add_special_tokens=False)]
    assert tokenizer.decode(ids) == text and ids != tokenizer.encode(text, add_special_tokens=False)
    return ids


def _expected(tokenizer: Tokenizer, messages: list[dict[str, str]], answers: dict[str, list[int]]) -> list[int]:
    """The rendered conversation tokenized as text, except each answer, which is its remembered ids."""
    rest = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    out: list[int] = []
    for text, ids in answers.items():
        before, found, rest = rest.partition(text)
        assert found
        out += tokenizer.encode(before, add_special_tokens=False) + ids
    return out + tokenizer.encode(rest, add_special_tokens=False)


def test_render_chat_ids_splices_the_ids_another_replica_remembered(tokenizer: Tokenizer, redis_url: str) -> None:
    answer = "Hello there, my friend."
    ids = _answer_ids(tokenizer, answer)
    RedisReplayStore(redis_url, SCOPE).remember("alice", answer, ids)
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "How are you?"},
    ]
    reader = RedisReplayStore(redis_url, SCOPE)  # empty locally: everything it splices comes from Redis
    assert render_chat_ids(tokenizer, messages, reader, "alice") == _expected(tokenizer, messages, {answer: ids})
    plain = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True), False)
    assert render_chat_ids(tokenizer, messages, RedisReplayStore(redis_url, SCOPE), "bob") == plain


def test_render_chat_ids_asks_redis_once_per_conversation(
    tokenizer: Tokenizer, redis_url: str, count_writes: list[object]
) -> None:
    answers = {"First answer here.": [], "Second answer, longer.": []}
    writer = RedisReplayStore(redis_url, SCOPE)
    for text in answers:
        answers[text] = _answer_ids(tokenizer, text)
        writer.remember("alice", text, answers[text])
    messages = [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "First answer here."},
        {"role": "user", "content": "two"},
        {"role": "assistant", "content": "Second answer, longer."},
        {"role": "user", "content": "three"},
    ]
    reader = RedisReplayStore(redis_url, SCOPE)
    reader.lookup("alice", "warm-up")  # connect first
    gets_before = get_calls(redis_url)
    count_writes.clear()
    got = render_chat_ids(tokenizer, messages, reader, "alice")
    assert len(count_writes) == 1 and get_calls(redis_url) - gets_before == 2
    assert got == _expected(tokenizer, messages, answers)


def test_make_replay_store_is_local_without_a_url_and_shared_with_one(tokenizer: Tokenizer, redis_url: str) -> None:
    local = make_replay_store(None, SCOPE, capacity=3)
    assert type(local) is ReplayStore and local.capacity == 3
    shared = make_replay_store(redis_url, SCOPE, ttl_seconds=50, capacity=7)
    assert isinstance(shared, RedisReplayStore) and (shared.ttl_seconds, shared.capacity) == (50, 7)
    answer = "Hello there, my friend."
    ids = _answer_ids(tokenizer, answer)
    local.remember("alice", answer, ids)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": answer}]
    assert render_chat_ids(tokenizer, messages, local, "alice") == _expected(tokenizer, messages, {answer: ids})
    assert local.lookup_many("alice", [answer, "other"]) == [tuple(ids), None]
    assert local.stats() == {"entries": 1}


def test_replicas_share_records_through_a_cluster(redis_cluster: RedisClusterServers) -> None:
    redis_cluster.flushall()
    writer, reader = RedisReplayStore(redis_cluster.url, SCOPE), RedisReplayStore(redis_cluster.url, SCOPE)
    texts = [f"answer number {i}" for i in range(12)]
    for i, text in enumerate(texts):
        writer.remember("alice", text, [i, 2**32 - 1 - i])
    per_node = [c.dbsize() for c in redis_cluster.clients()]
    assert sum(per_node) == 12 and sum(n > 0 for n in per_node) >= 2  # the keys span slots on several nodes
    assert reader.lookup_many("alice", [*texts, "unknown"]) == [(i, 2**32 - 1 - i) for i in range(12)] + [None]
    assert reader.stats()["redis_errors"] == {} and reader.stats()["redis_hits"] == 12
