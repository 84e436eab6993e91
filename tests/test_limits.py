"""Request limits at the door: a body over the limit is refused with 413 in the API's own format, before it is
read whole, whether its length is declared or it arrives chunked; the server keeps serving."""

from __future__ import annotations

import httpx
import pytest
from conftest import LiveServer

LIMIT_MB = 0.05  # 52,428 bytes


@pytest.fixture(scope="module")
def small_door():
    from promptcache.api.server import ServerConfig

    server = LiveServer(ServerConfig(max_body_mb=LIMIT_MB))
    yield server
    server.stop()


def chat_body(pad: int) -> dict:
    return {"model": "promptcache-default", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}],
            "metadata": {"pad": "x" * pad}}  # fmt: skip


def test_a_declared_length_over_the_limit_is_413_in_openai_format(small_door) -> None:
    resp = httpx.post(f"{small_door.url}/v1/chat/completions", json=chat_body(60_000))
    assert resp.status_code == 413
    error = resp.json()["error"]
    assert error["code"] == "request_too_large" and "52428 bytes" in error["message"]


def test_the_messages_api_gets_its_own_error_format(small_door) -> None:
    body = {"model": "promptcache-default", "max_tokens": 2, "messages": [{"role": "user", "content": "y" * 60_000}]}
    resp = httpx.post(f"{small_door.url}/v1/messages", json=body)
    assert resp.status_code == 413
    assert resp.json() == {"type": "error", "error": {"type": "request_too_large", "message": resp.json()["error"][
        "message"]}}  # fmt: skip


def test_a_chunked_body_with_no_length_is_cut_off_at_the_limit(small_door) -> None:
    def chunks():
        for _ in range(100):  # 1 MB in all, if the server read it all
            yield b"x" * 10_000

    resp = httpx.post(f"{small_door.url}/v1/chat/completions", content=chunks(),
                      headers={"content-type": "application/json"})  # fmt: skip
    assert resp.status_code == 413 and resp.json()["error"]["code"] == "request_too_large"


def test_a_body_under_the_limit_is_served_and_the_server_stays_up(small_door) -> None:
    for pad in (60_000, 40_000):
        status = httpx.post(f"{small_door.url}/v1/chat/completions", json=chat_body(pad)).status_code
        assert status == (413 if pad > 52_000 else 200)
    assert httpx.get(f"{small_door.url}/health").json()["status"] == "ok"


@pytest.fixture(scope="module")
def limited(varied_model):
    from promptcache.api.server import ServerConfig
    from promptcache.api.tenancy import Tenancy, Tenant

    tenancy = Tenancy({"key-alice": Tenant("alice", max_concurrent=2), "key-bob": Tenant("bob")})
    server = LiveServer(ServerConfig(tenancy=tenancy, max_concurrent_per_tenant=4), model=str(varied_model))
    yield server
    server.stop()


def test_a_tenant_over_its_concurrency_limit_gets_429_and_others_are_not_held(limited) -> None:
    import asyncio

    async def run() -> None:
        async with httpx.AsyncClient(base_url=limited.url, timeout=60) as client:
            def body(n: int) -> dict:
                return {"model": "promptcache-default", "prompt": "Once upon a time", "max_tokens": n,
                        "temperature": 0.0, "ignore_eos": True, "stream": True}  # fmt: skip

            alice = {"Authorization": "Bearer key-alice"}
            async with client.stream("POST", "/v1/completions", json=body(2000), headers=alice) as one, \
                    client.stream("POST", "/v1/completions", json=body(2000), headers=alice) as two:  # fmt: skip
                assert one.status_code == two.status_code == 200
                third = await client.post("/v1/completions", json={**body(2), "stream": False}, headers=alice)
                assert third.status_code == 429 and third.headers["retry-after"] == "1"
                assert third.json()["error"]["code"] == "rate_limit_exceeded"
                messages = {"model": "promptcache-default", "max_tokens": 2,
                            "messages": [{"role": "user", "content": "hi"}]}  # fmt: skip
                refused = await client.post("/v1/messages", json=messages, headers=alice)
                assert refused.status_code == 429 and refused.json()["error"]["type"] == "rate_limit_error"
                bob = await client.post("/v1/completions", json={**body(2), "stream": False},
                                        headers={"Authorization": "Bearer key-bob"})  # fmt: skip
                assert bob.status_code == 200  # another tenant is not held back
            # alice's streams were closed early (the client went away): once the server notices, her limit is free
            deadline = asyncio.get_running_loop().time() + 10
            while limited.app.state.service._running and asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.05)
            assert limited.app.state.service._running == {}
            again = await client.post("/v1/completions", json={**body(2), "stream": False}, headers=alice)
            assert again.status_code == 200

    asyncio.run(run())


# ---- output tokens, messages, slow bodies ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def capped(tmp_path_factory):
    import json

    from promptcache.api.server import ServerConfig
    from promptcache.api.tenancy import Tenancy

    keys = tmp_path_factory.mktemp("keys") / "keys.json"
    keys.write_text(json.dumps({"key-small": {"tenant": "small", "max_tokens": 4}, "key-big": "big"}))
    config = ServerConfig(tenancy=Tenancy.from_options(api_keys_file=str(keys)), max_tokens_limit=16,
                          max_messages=3, body_timeout=1.0)  # fmt: skip
    server = LiveServer(config)
    yield server
    server.stop()


def ask(server: LiveServer, key: str, **body) -> httpx.Response:
    body = {"model": "promptcache-default", "messages": [{"role": "user", "content": "Hi"}], **body}
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})


def test_max_tokens_over_the_keys_own_cap_is_400_naming_it(capped) -> None:
    resp = ask(capped, "key-small", max_tokens=5)
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert (error["code"], error["param"]) == ("max_tokens_exceeded", "max_tokens") and "limit of 4" in error["message"]
    assert ask(capped, "key-small", max_tokens=4, ignore_eos=True).json()["usage"]["completion_tokens"] == 4


def test_the_servers_cap_holds_for_keys_without_their_own(capped) -> None:
    assert ask(capped, "key-big", max_completion_tokens=17).json()["error"]["param"] == "max_completion_tokens"
    assert ask(capped, "key-big", max_tokens=16, ignore_eos=True).status_code == 200


def test_with_no_max_tokens_a_request_gets_at_most_its_cap(capped) -> None:
    usage = ask(capped, "key-small", ignore_eos=True).json()["usage"]
    assert usage["completion_tokens"] == 4


def test_the_messages_api_is_capped_in_its_own_format(capped) -> None:
    body = {"model": "promptcache-default", "max_tokens": 64, "messages": [{"role": "user", "content": "Hi"}]}
    resp = httpx.post(f"{capped.url}/v1/messages", json=body, headers={"x-api-key": "key-small"})
    assert resp.status_code == 400 and resp.json()["type"] == "error"
    assert resp.json()["error"]["type"] == "invalid_request_error" and "limit of 4" in resp.json()["error"]["message"]


def test_a_conversation_over_the_message_limit_is_400(capped) -> None:
    many = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}] * 2
    resp = ask(capped, "key-big", messages=many)
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "too_many_messages"
    assert ask(capped, "key-big", messages=many[:3], max_tokens=2).status_code == 200


def test_a_body_sent_too_slowly_gets_408_and_the_server_serves_others(capped) -> None:
    import socket
    import time

    payload = b'{"model": "promptcache-default", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}'
    with socket.create_connection(("127.0.0.1", capped.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer key-big\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(payload) + payload[:10])
        start = time.monotonic()
        # Meanwhile another client is served at once.
        assert ask(capped, "key-big", max_tokens=2).status_code == 200
        answer = b""
        while chunk := sock.recv(65536):  # the server closes the connection after its answer
            answer += chunk
        waited = time.monotonic() - start
        answer = answer.decode()
    assert answer.startswith("HTTP/1.1 408"), answer[:200]
    assert '"code": "request_timeout"' in answer and "10 bytes came" in answer
    assert 0.5 < waited < 5
