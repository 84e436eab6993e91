"""The Responses API (``/v1/responses``) through the fleet router, for real: `promptcache serve` processes behind a
router on loopback, driven with the official OpenAI client.

With a shared redis-server the router reads the previous turn's stored record, so it computes a follow-up's prompt
exactly as the replica does (its prediction is the replica's count, to the block) and the follow-up reads the whole
previous turn from the cache; stored responses are read and deleted on the replica that produced them, and stay each
tenant's own. Without Redis, the router's memory of which replica produced which response keeps a conversation
going.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from conftest import DEFAULT_MODEL, LiveServer, keyed
from redis_servers import RedisServer, free_ports
from test_fleet import MODEL, Replica, until

from promptcache.api.tenancy import Tenancy, Tenant
from promptcache.fleet.router import (
    PREDICTED_HEADER,
    REPLICA_HEADER,
    RESPONSES,
    ResponseOwners,
    RouterConfig,
    _IdScanner,
    create_router_app,
)

BS = 16
KEYS = {"key-alice": "alice", "key-bob": "bob", "key-admin": {"tenant": "ops", "admin": True}}
INSTRUCTIONS = "You keep the lighthouse log. Answer in one short line, with the hour. " * 4
TURNS = ["The lamp was lit at dusk.", "A ship passed the point at nine.", "Fog came in before midnight."]


class Router(LiveServer):
    """A router app under uvicorn on loopback, its state inspectable (``core``)."""

    def __init__(self, urls: list[str], redis_url: str, keys_file: Path) -> None:
        # A long health interval: replicas are healthy when it starts, and a test may take one out of the rotation
        # by hand without the health loop putting it back meanwhile.
        cfg = RouterConfig(urls, redis_url, "cache",
                           Tenancy.from_options(api_keys_file=str(keys_file)), health_interval=600.0)  # fmt: skip
        self.serve(create_router_app(cfg))
        until(lambda: len(self.core.replicas.up()) == len(urls), 30, "the replicas joined")

    @property
    def core(self):
        return self.app.state.router

    def client(self, key: str = "key-alice") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0)


@pytest.fixture(scope="module")
def keys_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("fleet-responses") / "keys.json"
    path.write_text(json.dumps(KEYS))
    return path


@pytest.fixture(scope="module")
def with_redis(keys_file, tmp_path_factory) -> Iterator[Router]:
    """Two `promptcache serve` processes sharing a redis-server, behind a router that reads it too."""
    redis = RedisServer(workdir=tmp_path_factory.mktemp("redis")).start()
    replicas = [Replica(f"s{i}", DEFAULT_MODEL, redis.url, keys_file).start() for i in range(2)]
    try:
        for r in replicas:
            r.wait()
        router = Router([r.url for r in replicas], redis.url, keys_file)
        yield router
        router.stop()
    finally:
        for r in replicas:
            r.stop()
        redis.close()


@pytest.fixture(scope="module")
def without_redis(keys_file) -> Iterator[Router]:
    """Two replicas without Redis (each keeps its stored responses to itself), behind a router whose Redis URL
    names no server. In this process: processes would add their start-up time, and nothing is shared between
    these servers but the router's HTTP."""
    replicas = []
    for i in range(2):
        cfg = keyed()  # the tenants of KEYS
        cfg.replica_name, cfg.served_model_name = f"a{i}", MODEL
        replicas.append(LiveServer(cfg))
    try:
        router = Router([r.url for r in replicas], f"redis://127.0.0.1:{free_ports(1)[0]}/0", keys_file)
        assert router.core.model.kv_prefix is None  # no Redis tier either
        yield router
        router.stop()
    finally:
        for r in replicas:
            r.stop()


def create(client: openai.OpenAI, text: str, previous: str | None = None, **extra):
    """A greedy response to ``text`` (continuing ``previous``) and its HTTP headers."""
    raw = client.responses.with_raw_response.create(
        model=MODEL, instructions=INSTRUCTIONS, input=text, max_output_tokens=16, temperature=0.0,
        previous_response_id=previous if previous is not None else openai.NOT_GIVEN, **extra)  # fmt: skip
    return raw.parse(), raw.headers


def synced(router: Router, tenant: str, response_id: str, replica: str) -> bool:
    """Whether the router knows ``replica`` holds every full block of the stored response's context (its events
    arrive some milliseconds after the answer: the prediction of the next turn is exact from then on)."""
    core = router.core
    record = core.previous_response(Tenant(tenant), response_id)
    addresses = core.model.addresses(Tenant(tenant).namespace(), record.context_ids)
    return all(t == "device" for t in core.follower.tiers_of(replica, addresses))


# ---- units: the router's memory of response ids -------------------------------------------------------------------
def test_the_owner_book_is_a_bounded_lru() -> None:
    owners = ResponseOwners(2)
    owners.set("resp_a", "r0")
    owners.set("resp_b", "r1")
    assert owners.get("resp_a") == "r0"  # used: resp_b is now the least recently used
    owners.set("resp_c", "r0")
    assert (owners.get("resp_b"), owners.get("resp_c"), len(owners)) == (None, "r0", 2)
    owners.forget("resp_a")
    assert owners.get("resp_a") is None and owners.get(None) is None and owners.get(7) is None


def test_a_streamed_response_id_is_found_across_chunk_boundaries() -> None:
    found: list[str] = []
    scanner = _IdScanner(found.append)
    created = {"type": "response.created", "sequence_number": 0,
               "response": {"id": "resp_42", "previous_response_id": "resp_41", "object": "response"}}  # fmt: skip
    stream = f"event: response.created\ndata: {json.dumps(created)}\n\nevent: response.in_progress\n".encode()
    for i in range(0, len(stream), 7):  # the transport splits events anywhere
        scanner.feed(stream[i : i + 7])
    assert found == ["resp_42"] and scanner.done
    quiet = _IdScanner(found.append)
    quiet.feed(b'data: {"type": "keepalive"}\n\n' + b" " * (2 << 20))
    assert quiet.done and found == ["resp_42"]  # gives up after its limit


# ---- with the shared Redis ----------------------------------------------------------------------------------------
def test_a_conversation_continues_with_exact_predictions_and_the_previous_turn_cached(with_redis) -> None:
    router = with_redis
    client = router.client()
    first, headers = create(client, TURNS[0])
    assert first.id.startswith("resp_")
    previous, replica = first, headers[REPLICA_HEADER]
    assert router.core.owners.get(first.id) == replica
    for text in TURNS[1:]:
        until(lambda p=previous: synced(router, "alice", p.id, replica), 10, "the router sees the previous turn")
        body = {"model": MODEL, "instructions": INSTRUCTIONS, "input": text, "previous_response_id": previous.id}
        ids, _ = router.core.prompt_of(Tenant("alice"), RESPONSES, body)
        out, headers = create(client, text, previous.id)
        cached = out.usage.input_tokens_details.cached_tokens
        assert len(ids) == out.usage.input_tokens  # the router computed the replica's prompt
        assert headers[REPLICA_HEADER] == replica  # the previous turn is hot there
        assert cached == int(headers["x-promptcache-cached-tokens"])
        # Exact to the block: a replica may also take over the previous turn's last, partial block (a tail of
        # fewer than BS tokens), which the router does not predict.
        assert int(headers[PREDICTED_HEADER]) == cached // BS * BS
        # The previous turn's prompt and answer (but its last token, never computed) are read from the cache.
        assert cached >= previous.usage.input_tokens + previous.usage.output_tokens - (BS + 1)
        assert router.core.owners.get(out.id) == replica
        previous = out
    unstored, _ = create(client, "Not for the log.", store=False)
    assert router.core.owners.get(unstored.id) is None  # it cannot be continued: nothing to remember


def test_a_streamed_response_is_remembered_and_continued(with_redis) -> None:
    router = with_redis
    client = router.client()
    with client.responses.with_streaming_response.create(
        model=MODEL, instructions=INSTRUCTIONS, input="Streamed: the keeper wound the clock.", max_output_tokens=8,
        temperature=0.0, stream=True,
    ) as raw:  # fmt: skip
        replica = raw.headers[REPLICA_HEADER]
        events = list(raw.parse())
    created = next(e for e in events if e.type == "response.created").response
    assert events[-1].type in ("response.completed", "response.incomplete")  # incomplete: max_output_tokens
    assert router.core.owners.get(created.id) == replica  # learned from the first event
    out, headers = create(client, "And then?", created.id)
    assert headers[REPLICA_HEADER] == replica and out.previous_response_id == created.id


def test_stored_responses_are_read_and_deleted_through_the_router_by_their_tenant_only(with_redis) -> None:
    router = with_redis
    alice, bob = router.client(), router.client("key-bob")
    out, headers = create(alice, "Log: the oil was refilled.")
    replica = headers[REPLICA_HEADER]
    got = alice.responses.with_raw_response.retrieve(out.id)
    assert got.headers[REPLICA_HEADER] == replica and got.parse().id == out.id
    assert got.parse().output_text == out.output_text
    items = alice.responses.input_items.list(out.id)
    assert [i.type for i in items.data] == ["message"]
    with pytest.raises(openai.NotFoundError):
        bob.responses.retrieve(out.id)
    with pytest.raises(openai.NotFoundError):
        bob.responses.delete(out.id)
    with pytest.raises(openai.NotFoundError):  # bob cannot continue alice's conversation either
        create(bob, "Mine now?", out.id)
    # The producer out of the rotation: the other replica reads the record from the shared Redis.
    core = router.core
    core.replicas.by_name(replica).set_state("down", "taken out by the test")
    try:
        again = alice.responses.with_raw_response.retrieve(out.id)
        assert again.headers[REPLICA_HEADER] != replica and again.parse().id == out.id
        follow, follow_headers = create(alice, "And the wick?", out.id)
        assert follow_headers[REPLICA_HEADER] != replica and follow.previous_response_id == out.id
    finally:
        core.replicas.by_name(replica).set_state("up")
    deleted = httpx.delete(f"{router.url}/v1/responses/{out.id}", headers={"Authorization": "Bearer key-alice"})
    assert deleted.status_code == 200 and deleted.headers[REPLICA_HEADER] == replica
    assert deleted.json()["deleted"] is True and core.owners.get(out.id) is None
    with pytest.raises(openai.NotFoundError):
        alice.responses.retrieve(out.id)


def test_errors_pass_through_in_the_openai_format(with_redis) -> None:
    router = with_redis
    bad = httpx.post(f"{router.url}/v1/responses", headers={"Authorization": "Bearer key-alice"},
                     json={"model": MODEL, "input": [{"type": "input_image", "image_url": "x"}]})  # fmt: skip
    assert bad.status_code == 400 and bad.headers[REPLICA_HEADER]
    assert set(bad.json()["error"]) >= {"message", "type", "param", "code"}
    with pytest.raises(openai.AuthenticationError):
        router.client("wrong-key").responses.retrieve("resp_nothing")
    with pytest.raises(openai.NotFoundError):
        router.client().responses.retrieve("resp_unknown")


# ---- without Redis ------------------------------------------------------------------------------------------------
def test_without_redis_the_producing_replica_keeps_a_conversation_going(without_redis) -> None:
    router = without_redis
    client = router.client()
    first, headers = create(client, TURNS[0])
    replica = headers[REPLICA_HEADER]
    previous = first
    for text in TURNS[1:]:
        out, headers = create(client, text, previous.id)
        assert headers[REPLICA_HEADER] == replica and out.previous_response_id == previous.id
        assert out.usage.input_tokens_details.cached_tokens > 0  # read from the producer's own cache
        previous = out
    got = client.responses.with_raw_response.retrieve(previous.id)
    assert got.headers[REPLICA_HEADER] == replica and got.parse().id == previous.id
    with pytest.raises(openai.NotFoundError):
        router.client("key-bob").responses.retrieve(previous.id)
    # Forgotten by the router (another router's response, or a restart): each replica is asked until one has it.
    # Equal replicas take turns first, so of two tries one asks the other replica first, which answers 404.
    before = retried_404(router)
    for _ in range(2):
        router.core.owners.forget(previous.id)
        again = client.responses.with_raw_response.retrieve(previous.id)
        assert again.headers[REPLICA_HEADER] == replica and router.core.owners.get(previous.id) == replica
    assert retried_404(router) > before
    router.core.owners.forget(previous.id)
    out, headers = create(client, "Dawn came at six.", previous.id)
    assert headers[REPLICA_HEADER] == replica


def retried_404(router: Router) -> float:
    registry = router.core.metrics.registry
    return sum(registry.get_sample_value("promptcache_router_requests_total", {"replica": r, "outcome": "retried_404"})
               or 0.0 for r in ("a0", "a1"))  # fmt: skip
