"""Real `promptcache serve` processes for tests: started on a free loopback port, waited for until healthy."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Sequence

import httpx
from redis_servers import free_ports


def serve_args(port: int, *options: str) -> list[str]:
    """The command line of `promptcache serve` on ``port`` with ``options``."""
    return [sys.executable, "-m", "promptcache.cli", "serve", "--port", str(port), "--log-level", "warning", *options]


def start_serve(options: Sequence[str], env: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], str]:
    """Start `promptcache serve` with ``options`` on a free port; the process and its URL (not yet waited for)."""
    port = free_ports(1)[0]
    proc = subprocess.Popen(serve_args(port, *options), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    return proc, f"http://127.0.0.1:{port}"


def wait_healthy(proc: subprocess.Popen[bytes], url: str, timeout: float = 60.0) -> None:
    """Until ``url``'s /health answers 200; fails with the process's stderr if it died first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()  # type: ignore[union-attr]
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"the server at {url} did not start")
