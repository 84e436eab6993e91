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
