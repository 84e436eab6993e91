"""A fleet for real: three `promptcache serve` processes sharing a redis-server, behind routers on loopback, driven
with the official clients. Routing lands a shared prefix on one replica with exact predictions, conversations keep
their cache across replicas, tenants stay apart, a killed replica loses no request that had not started streaming,
and the load the routers count returns to zero."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import anthropic
import httpx
import openai
import pytest
from conftest import LiveServer, assert_varied, keyed
from redis_servers import RedisServer, free_ports
from serve_processes import serve_args, wait_healthy

from promptcache.api.tenancy import Tenant
from promptcache.fleet.router import PREDICTED_HEADER, REPLICA_HEADER, RouterConfig, create_router_app

BS = 16
MODEL = "fleet-model"
KEYS = {"key-alice": "alice", "key-bob": "bob", "key-admin": {"tenant": "ops", "admin": True}}
SYSTEM = "You are the archivist of a large library. Answer in one short sentence, citing the shelf. " * 6
QUESTIONS = [f"Where would I find book number {i * 7 + 3} about {topic}?" for i, topic in enumerate(
    ["rivers", "birds", "ships", "bridges", "stars", "maps", "clocks", "salt", "glass", "bees", "wool", "tea"])]


def until(check: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} not reached in {timeout} s")


class Replica:
    """A real `promptcache serve` process of the fleet."""

    def __init__(self, name: str, model: Path, redis_url: str, keys_file: Path) -> None:
        self.name, self.port = name, free_ports(1)[0]
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = serve_args(self.port, "--model", str(model), "--redis-url", redis_url, "--replica-name", name,
                               "--api-keys-file", str(keys_file), "--served-model-name", MODEL,
                               "--kv-cache-memory-gb", "0.05", "--tier-load-policy", "always")  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Replica:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}  # three replicas share two cores
        self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        return self

    def wait(self) -> None:
        assert self.proc is not None
        wait_healthy(self.proc, self.url, timeout=90)

    def kill(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()

    def write_queue_empty(self) -> bool:
        stats = httpx.get(f"{self.url}/v1/cache/stats", headers={"Authorization": "Bearer key-admin"}).json()
        return stats["tiers"]["write_queue_blocks"] == 0


class Router(LiveServer):
    """A router app under uvicorn on loopback (the replicas are processes; the router's state is inspectable)."""

    def __init__(self, urls: list[str], redis_url: str, keys_file: Path, policy: str = "cache", up: int = -1) -> None:
        from promptcache.api.tenancy import Tenancy

        cfg = RouterConfig(urls, redis_url, policy, Tenancy.from_options(api_keys_file=str(keys_file)),
                           health_interval=0.3)  # fmt: skip
        self.serve(create_router_app(cfg))
        want = len(urls) if up < 0 else up
        until(lambda: len(self.state()["up"]) == want, 60, "the replicas joined")

    @property
    def core(self):
        return self.app.state.router

    def state(self) -> dict:
        st = httpx.get(f"{self.url}/v1/fleet", headers={"Authorization": "Bearer key-admin"}).json()
        st["up"] = [r["name"] for r in st["replicas"] if r["state"] == "up"]
        return st

    def client(self, key: str = "key-alice") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key, max_retries=0)


@pytest.fixture(scope="module")
def fleet(varied_model, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fleet")
    keys_file = tmp / "keys.json"
    keys_file.write_text(json.dumps(KEYS))
    redis = RedisServer(workdir=tmp / "redis").start()
    replicas = [Replica(f"r{i}", varied_model, redis.url, keys_file).start() for i in range(3)]
    try:
        for r in replicas:
            r.wait()
        router = Router([r.url for r in replicas], redis.url, keys_file)
        yield router, replicas, redis, keys_file
        router.stop()
    finally:
        for r in replicas:
            r.stop()
        redis.close()


def chat(client: openai.OpenAI, messages: list[dict], max_tokens: int = 8, **extra):
    """A greedy chat completion and its response headers."""
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=messages, max_tokens=max_tokens, temperature=0.0, extra_body={"ignore_eos": True, **extra}
    )
    return raw.parse(), raw.headers


def tiers_of(usage) -> dict[str, int]:
    return (usage.model_extra or {})["cached_tokens_by_tier"]


def test_a_shared_system_prompt_lands_on_one_replica_with_device_hits_predicted_exactly(fleet) -> None:
    router, _, _, _ = fleet
    client = router.client()
    renderer = router.core.model.renderer
    a, b = (renderer.openai_chat_ids("alice", {"messages": [{"role": "system", "content": SYSTEM},
                                                            {"role": "user", "content": q}]}) for q in QUESTIONS[:2])
    common = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    assert common >= 8 * BS
    served = set()
    for i, question in enumerate(QUESTIONS):
        out, headers = chat(client, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}])
        served.add(headers[REPLICA_HEADER])
        cached = out.usage.prompt_tokens_details.cached_tokens
        assert int(headers[PREDICTED_HEADER]) == cached, f"request {i}: predicted {headers[PREDICTED_HEADER]}"
        assert int(headers["x-promptcache-cached-tokens"]) == cached
        if i == 0:
            assert cached == 0
        else:
            assert tiers_of(out.usage) == {"device": cached} and cached == common // BS * BS
    assert len(served) == 1
    # The last answer, read through eleven device hits, equals the cold answer (a fresh namespace: no cache).
    cold, _ = chat(client, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTIONS[-1]}],
                   cache_salt="cold-reference")  # fmt: skip
    assert cold.usage.prompt_tokens_details.cached_tokens == 0
    assert cold.choices[0].message.content == out.choices[0].message.content


def test_a_five_turn_chat_reads_each_previous_answer_from_cache_on_whichever_replica(fleet) -> None:
    router, replicas, _, _ = fleet
    admin = router.client("key-admin")
    by_name = {r.name: r for r in replicas}
    messages = [{"role": "system", "content": "You keep a ship's log. " * 8}]
    previous: tuple[int, int] | None = None
    for turn, name in enumerate(["r0", "r1", "r2", "r0", "r1"]):
        messages.append({"role": "user", "content": f"Log entry {turn}: the wind turned {turn * 45} degrees."})
        pinned = openai.OpenAI(base_url=f"{router.url}/v1", api_key="key-admin", max_retries=0,
                               default_headers={REPLICA_HEADER: name})  # an admin may choose the replica
        out, headers = chat(pinned, messages)
        assert headers[REPLICA_HEADER] == name
        cached = out.usage.prompt_tokens_details.cached_tokens
        assert int(headers[PREDICTED_HEADER]) == cached, f"turn {turn}"
        if previous is not None:
            # Everything the previous turn computed (its prompt and its answer but the last token) is a hit.
            assert cached >= (previous[0] + previous[1] - 1) // BS * BS, f"turn {turn}: {tiers_of(out.usage)}"
            assert set(tiers_of(out.usage)) <= {"device", "redis"}
        answer = out.choices[0].message.content
        messages.append({"role": "assistant", "content": answer})
        previous = (out.usage.prompt_tokens, out.usage.completion_tokens)
        until(by_name[name].write_queue_empty, what="tier writes")  # the next replica reads them from Redis
    # The last answer is the cold answer: the same conversation in a fresh namespace (no cache) agrees.
    cold, _ = chat(admin, messages[:-1], cache_salt="cold-reference")
    assert cold.usage.prompt_tokens_details.cached_tokens == 0
    assert cold.choices[0].message.content == messages[-1]["content"]
    assert_varied(router.core.model.renderer.text_ids(cold.choices[0].message.content), at_least=3)


def test_another_tenants_prefix_gives_no_preference_and_no_hit(fleet) -> None:
    router, _, _, _ = fleet
    messages = [{"role": "system", "content": "Tenant secrets stay with their tenant. " * 10},
                {"role": "user", "content": "Summarise the policy."}]  # fmt: skip
    chat(router.client("key-alice"), messages)
    explained = httpx.post(f"{router.url}/v1/cache/explain", json={"messages": messages},
                           headers={"Authorization": "Bearer key-bob"}).json()  # fmt: skip
    candidates = explained["router"]["candidates"]
    assert [c["predicted_cached_tokens"] for c in candidates] == [0, 0, 0]
    assert len({c["cost"] for c in candidates}) == 1  # nothing sets one replica apart for bob
    out, headers = chat(router.client("key-bob"), messages)
    assert out.usage.prompt_tokens_details.cached_tokens == 0 and headers[PREDICTED_HEADER] == "0"
    alice, _ = chat(router.client("key-alice"), messages)
    assert alice.usage.prompt_tokens_details.cached_tokens > 0


def test_anthropic_requests_route_on_the_same_addresses(fleet) -> None:
    router, _, _, _ = fleet
    client = anthropic.Anthropic(base_url=router.url, api_key="key-alice", max_retries=0)
    system = [{"type": "text", "text": "You index maritime charts. " * 12, "cache_control": {"type": "ephemeral"}}]
    seen = set()
    for q in ("Which chart shows the Skagerrak?", "Which chart shows the Solent?"):
        raw = client.messages.with_raw_response.create(model=MODEL, max_tokens=4, system=system,
                                                       messages=[{"role": "user", "content": q}])  # fmt: skip
        msg = raw.parse()
        seen.add(raw.headers[REPLICA_HEADER])
        assert int(raw.headers[PREDICTED_HEADER]) == msg.usage.cache_read_input_tokens
    assert len(seen) == 1 and msg.usage.cache_read_input_tokens > 0


def test_a_prompt_cache_key_keeps_unrelated_prompts_on_one_replica(fleet) -> None:
    router, _, _, _ = fleet
    client = router.client()

    def replicas_for(**extra) -> set[str]:
        seen = set()
        for i in range(4):
            _, headers = chat(client, [{"role": "user", "content": f"Unrelated question {i}: {i * 17} apples?"}],
                              **extra)  # fmt: skip
            seen.add(headers[REPLICA_HEADER])
        return seen

    assert len(replicas_for()) >= 2  # nothing in common: the load and the ties spread them
    assert len(replicas_for(prompt_cache_key="conversation-7")) == 1


def test_the_router_answers_every_endpoint_with_errors_in_each_apis_format(fleet) -> None:
    router, replicas, _, _ = fleet
    admin = {"Authorization": "Bearer key-admin"}
    assert [m.id for m in router.client().models.list().data] == [MODEL]
    claude = anthropic.Anthropic(base_url=router.url, api_key="key-bob", max_retries=0)
    count = claude.messages.count_tokens(model=MODEL, messages=[{"role": "user", "content": "Hello there"}])
    assert count.input_tokens > 2
    completion = router.client().completions.create(model=MODEL, prompt="Once upon a time", max_tokens=4)
    assert completion.usage.completion_tokens == 4
    # Errors: the router's own (auth) and the replicas' (bad bodies), each in its API's format.
    with pytest.raises(openai.AuthenticationError):
        router.client("wrong-key").models.list()
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=router.url, api_key="wrong", max_retries=0).messages.create(
            model=MODEL, max_tokens=4, messages=[{"role": "user", "content": "hi"}])  # fmt: skip
    with pytest.raises(anthropic.BadRequestError, match="role"):
        claude.messages.create(model=MODEL, max_tokens=4, messages=[{"role": "robot", "content": "hi"}])
    with pytest.raises(openai.NotFoundError):
        router.client().chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    # Cache administration fans out to every replica.
    stats = httpx.get(f"{router.url}/v1/cache/stats", headers=admin).json()
    assert set(stats["replicas"]) == {r.name for r in replicas} and stats["router"]["policy"] == "cache"
    integrity = httpx.get(f"{router.url}/v1/cache/integrity", headers=admin).json()
    assert integrity["ok"] is True and len(integrity["replicas"]) == 3
    assert httpx.post(f"{router.url}/v1/cache/reset", headers={"Authorization": "Bearer key-bob"}).status_code == 403
    assert httpx.get(f"{router.url}/health").json() == {"status": "ok", "replicas_up": 3, "replicas": 3}
    metrics = httpx.get(f"{router.url}/metrics").text
    for name in ("promptcache_router_predicted_cached_tokens_total", "promptcache_router_reported_cached_tokens_total",
                 "promptcache_router_replica_up", "promptcache_router_index_blocks"):  # fmt: skip
        assert name in metrics


def test_load_returns_to_zero_after_32_streams_with_4_disconnects(fleet) -> None:
    router, _, _, _ = fleet

    async def one(i: int, client: httpx.AsyncClient) -> int:
        body = {"model": MODEL, "stream": True, "max_tokens": 24, "temperature": 0.0, "ignore_eos": True,
                "messages": [{"role": "user", "content": f"Count the sheep in field {i}."}]}  # fmt: skip
        chunks = 0
        async with client.stream("POST", f"{router.url}/v1/chat/completions", json=body,
                                 headers={"Authorization": "Bearer key-alice"}) as resp:  # fmt: skip
            assert resp.status_code == 200
            async for _ in resp.aiter_bytes():
                chunks += 1
                if i % 8 == 0 and chunks >= 2:
                    break  # this client goes away mid-stream
        return chunks

    async def run() -> list[int]:
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(one(i, client) for i in range(32)))

    assert all(n >= 1 for n in asyncio.run(run()))
    until(lambda: all(r["load_own"] == {**r["load_own"], "prefill_tokens": 0, "decodes": 0}
                      for r in router.state()["replicas"]), 15, "load released")  # fmt: skip
    assert sum(r["load_own"]["requests"] for r in router.state()["replicas"]) >= 32
    until(lambda: all(httpx.get(f"{r.url}/health").json()["requests"] == 0 for r in fleet[1]), 15, "replicas idle")
    # Cut streams aborted their requests on the replicas: no block is left in use anywhere.
    assert [httpx.get(f"{r.url}/health").json()["blocks_in_use"] for r in fleet[1]] == [0, 0, 0]


def test_a_second_router_agrees_with_the_first(fleet) -> None:
    router, replicas, redis, keys_file = fleet
    second = Router([r.url for r in replicas], redis.url, keys_file)
    try:
        messages = [{"role": "system", "content": "Two routers, one fleet. " * 12},
                    {"role": "user", "content": "Which replica?"}]  # fmt: skip
        _, first_headers = chat(router.client(), messages)
        model = second.core.model
        addresses = model.addresses(Tenant("alice").namespace(), model.renderer.openai_chat_ids("alice", {
            "messages": messages}))  # fmt: skip
        until(lambda: second.core.follower.tiers_of(first_headers[REPLICA_HEADER], addresses)[0] == "device", 10,
              "the second router sees the first's blocks")  # fmt: skip
        out, headers = chat(second.client(), messages)
        assert headers[REPLICA_HEADER] == first_headers[REPLICA_HEADER]
        assert int(headers[PREDICTED_HEADER]) == out.usage.prompt_tokens_details.cached_tokens > 0
        # Load dispatched by one router counts in the other's decisions.
        ticket = router.core.loads.dispatch("r2", 4096)
        until(lambda: second.core.loads.of("r2").prefill_tokens >= 4096, 5, "shared load")
        router.core.loads.finish(ticket)
        until(lambda: second.core.loads.of("r2").prefill_tokens == 0, 5, "shared load released")
    finally:
        second.stop()


def test_a_replica_with_another_model_is_refused(fleet) -> None:
    _, replicas, redis, keys_file = fleet
    other = LiveServer(keyed(), redis_url=redis.url)  # the embedded model: another fingerprint
    try:
        probe = Router([replicas[0].url, other.url], redis.url, keys_file, up=1)
        try:
            until(lambda: any(r["state"] == "refused" for r in probe.state()["replicas"]), 15, "refusal")
            refused = next(r for r in probe.state()["replicas"] if r["state"] == "refused")
            assert "fingerprint" in refused["reason"]
        finally:
            probe.stop()
    finally:
        other.stop()


def test_redis_going_away_fails_no_request_and_every_view_is_rebuilt_when_it_returns(fleet) -> None:
    router, _, redis, _ = fleet
    client = router.client()
    messages = [{"role": "system", "content": "The harbour master keeps the tide tables. " * 8},
                {"role": "user", "content": "When is high tide?"}]  # fmt: skip
    redis.kill()
    try:
        for i in range(3):  # routed on the views and loads the router holds; the replicas miss their Redis tier
            out, _ = chat(client, [*messages[:1], {"role": "user", "content": f"Tide question {i}?"}])
            assert out.usage.completion_tokens == 8
    finally:
        redis.start()  # empty: no persistence; the events sent meanwhile are lost
    # Events flow again; each replica's next message is numbered past what the router applied: a gap, a snapshot.
    chat(client, messages)
    until(lambda: sum(r["index"]["resyncs"].get("gap", 0) + r["index"]["resyncs"].get("heartbeat", 0)
                      for r in router.state()["replicas"]) >= 1, 30, "a snapshot after the outage")  # fmt: skip
    until(lambda: all(r["index"]["synced"] for r in router.state()["replicas"]), 30, "every view synced")
    out, headers = chat(client, messages)
    assert int(headers[PREDICTED_HEADER]) == out.usage.prompt_tokens_details.cached_tokens > 0


def test_a_replica_that_computes_other_addresses_is_refused_by_the_address_check(fleet, varied_model) -> None:
    _, replicas, redis, keys_file = fleet
    config = keyed()
    config.served_model_name = MODEL
    odd = LiveServer(config, model=str(varied_model), redis_url=redis.url)  # the same model and tokenizer...
    odd.core.kv._dtype = "float32"  # ...but its addresses are rooted otherwise (as a replica of another version)
    try:
        probe = Router([replicas[0].url, odd.url], redis.url, keys_file, up=1)
        try:
            until(lambda: any(r["state"] == "refused" for r in probe.state()["replicas"]), 15, "refusal")
            refused = next(r for r in probe.state()["replicas"] if r["state"] == "refused")
            assert "block addresses differ" in refused["reason"] and "text test vector" in refused["reason"]
        finally:
            probe.stop()
    finally:
        odd.stop()


def test_a_killed_replica_fails_no_request_that_had_not_started_streaming(fleet) -> None:
    router, replicas, _, _ = fleet
    victim = replicas[2]
    results: list[str] = []
    stream_ends: list[str] = []
    streaming = threading.Event()

    def ask(i: int) -> None:
        try:
            question = [{"role": "user", "content": f"Describe harbour number {i} in detail."}]
            out, _ = chat(router.client(), question, 400)
            results.append("ok" if out.choices[0].message.content is not None else "empty")
        except openai.APIError as err:
            results.append(f"error: {err}")

    def stream_on_victim() -> None:
        pinned = openai.OpenAI(base_url=f"{router.url}/v1", api_key="key-admin", max_retries=0,
                               default_headers={REPLICA_HEADER: victim.name})  # fmt: skip
        stream = pinned.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Tell a very long story."}], max_tokens=3000,
            temperature=0.0, stream=True, extra_body={"ignore_eos": True})  # fmt: skip
        try:
            for n, _ in enumerate(stream):
                if n == 2:
                    streaming.set()
            stream_ends.append("finished")
        except openai.APIError as err:
            stream_ends.append(str(err))

    def retries() -> float:
        sample = router.core.metrics.registry.get_sample_value("promptcache_router_retries_total",
                                                               {"reason": "next_replica"})  # fmt: skip
        return sample or 0.0

    before = retries()
    threads = [threading.Thread(target=stream_on_victim)]
    threads[0].start()
    assert streaming.wait(30)
    threads += [threading.Thread(target=ask, args=(i,)) for i in range(12)]
    for t in threads[1:]:
        t.start()
    # Kill it once it serves one of the twelve besides the stream (the router counts what it dispatched there).
    until(lambda: router.core.loads.own(victim.name).decodes >= 2, 20, "a request in flight on the victim")
    victim.kill()
    for t in threads:
        t.join(timeout=120)
    assert results == ["ok"] * 12, results
    # The stream it was serving had started: it ends with an error event, which the client raises.
    assert len(stream_ends) == 1 and "replica" in stream_ends[0], stream_ends
    assert retries() > before  # requests in flight on the victim were served elsewhere
    until(lambda: "r2" not in router.state()["up"], 10, "the dead replica leaves the rotation")
    _, headers = chat(router.client(), [{"role": "user", "content": "Still there?"}])
    assert headers[REPLICA_HEADER] in ("r0", "r1")
    until(lambda: all(httpx.get(f"{r.url}/health").json()["blocks_in_use"] == 0 for r in replicas[:2]), 15,
          "the survivors hold no block in use")  # fmt: skip
    victim.start().wait()  # it comes back: checked and admitted again, its view taken afresh
    until(lambda: "r2" in router.state()["up"], 20, "the replica rejoins")
