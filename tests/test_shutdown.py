"""Graceful shutdown of a real `promptcache serve` process: SIGTERM lets a running stream finish, admits nothing new,
flushes the tier writes (the next process serves the prompt from disk) and exits 0; a request still running at the
deadline is cut, and the process still exits 0."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import httpx
from serve_processes import start_serve, wait_healthy

MODEL = "promptcache-default"
PROMPT = [100 + (i * 37) % 7000 for i in range(6 * 16 + 3)]


class Serve:
    def __init__(self, model: Path, disk: Path, shutdown_timeout: float) -> None:
        self.proc, self.url = start_serve(["--model", str(model), "--disk-cache", str(disk), "--tier-load-policy",
                                           "always", "--served-model-name", MODEL, "--shutdown-timeout",
                                           str(shutdown_timeout)])  # fmt: skip
        wait_healthy(self.proc, self.url)


def stream_then_sigterm(server: Serve, max_tokens: int) -> tuple[list[dict], float]:
    """Start a stream, SIGTERM the server after its first chunks, read the rest; the chunks and the exit wait."""
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
            "stream": True}  # fmt: skip
    chunks: list[dict] = []
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as resp:
        lines = resp.iter_lines()
        for line in lines:
            if line.startswith("data: {"):
                chunks.append(json.loads(line[6:]))
                if len(chunks) == 2:
                    os.kill(server.proc.pid, signal.SIGTERM)
                    time.sleep(0.3)
                    try:  # nothing new is admitted while it drains
                        httpx.get(f"{server.url}/health", timeout=2)
                        raise AssertionError("a new connection was admitted while draining")
                    except httpx.ConnectError:
                        pass
                    break
        try:
            for line in lines:
                if line.startswith("data: {"):
                    chunks.append(json.loads(line[6:]))
        except httpx.HTTPError:
            pass  # cut at the deadline
    start = time.monotonic()
    server.proc.wait(timeout=60)
    return chunks, time.monotonic() - start


def test_sigterm_finishes_the_running_stream_flushes_the_disk_tier_and_exits_0(varied_model, tmp_path) -> None:
    server = Serve(varied_model, tmp_path, shutdown_timeout=30)
    chunks, _ = stream_then_sigterm(server, max_tokens=300)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"  # finished, all 300 tokens
    assert server.proc.returncode == 0
    again = Serve(varied_model, tmp_path, shutdown_timeout=30)  # what the first wrote is on disk
    try:
        out = httpx.post(f"{again.url}/v1/completions", json={"model": MODEL, "prompt": PROMPT, "max_tokens": 2},
                         timeout=30).json()  # fmt: skip
        assert out["usage"]["cached_tokens_by_tier"] == {"disk": 6 * 16}
    finally:
        again.proc.terminate()
        again.proc.wait(timeout=30)


def test_a_request_running_past_the_deadline_is_cut_and_the_process_still_exits_0(varied_model, tmp_path) -> None:
    server = Serve(varied_model, tmp_path, shutdown_timeout=1)
    chunks, _ = stream_then_sigterm(server, max_tokens=3500)
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks)  # it never finished
    assert server.proc.returncode == 0
