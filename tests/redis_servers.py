"""Real redis-server processes on loopback for tests (no fakes): one server, a 3-node cluster, and fixtures.

Fixtures (imported by ``conftest.py``):
- ``redis_server``: one server for the whole session (a ``RedisServer``); tests must not stop it.
- ``redis_url``: that server's URL, its data flushed before each test.
- ``redis_cluster``: a 3-node Redis Cluster for the whole session (a ``RedisClusterServers``); call ``flushall()``
  first; a test that kills a node calls ``heal()`` before it ends.
- ``own_redis``: a private server for one test, which it may stop, kill and restart.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import redis

_START_TIMEOUT_S = 5.0
_CLUSTER_TIMEOUT_S = 15.0


def free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on loopback now (held open together, so none is handed out twice)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _require(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        raise RuntimeError(f"{binary} is not installed (Debian: apt-get install redis-server); the Redis tests need it")
    return path


class RedisServer:
    """One ``redis-server`` without persistence on 127.0.0.1, its log in its own temporary folder."""

    def __init__(self, port: int | None = None, extra_args: Sequence[str] = (), workdir: Path | None = None):
        self.binary = _require("redis-server")
        self.port = port or free_ports(1)[0]
        self.extra_args = list(extra_args)
        self._own_dir = workdir is None
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="pc-redis-"))
        self.dir.mkdir(parents=True, exist_ok=True)
        self.log = self.dir / "redis.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self, **kwargs: object) -> redis.Redis:
        """A plain client of this server (close it when done)."""
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2, **kwargs)  # type: ignore[arg-type]

    def start(self) -> RedisServer:
        if self.proc is not None and self.proc.poll() is None:
            return self
        args = ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        args += ["--daemonize", "no", "--dir", str(self.dir), *self.extra_args]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([self.binary, *args], stdout=log, stderr=subprocess.STDOUT)
        self._wait_ping()
        return self

    def _wait_ping(self) -> None:
        deadline = time.monotonic() + _START_TIMEOUT_S
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server on port {self.port} exited ({self.proc.returncode}): {self._tail()}")
            try:
                with redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=0.2) as c:
                    if c.ping():
                        return
            except redis.exceptions.RedisError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"redis-server on port {self.port} did not answer PING in time: {self._tail()}")
            time.sleep(0.02)

    def _tail(self) -> str:
        return self.log.read_text(errors="replace")[-2000:] if self.log.exists() else "(no log)"

    def _end(self, sig: int) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        """Shut down cleanly (SIGTERM) and wait."""
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        """Die at once (SIGKILL), as a crashed server would."""
        self._end(signal.SIGKILL)

    def restart(self) -> RedisServer:
        """Stop and start again on the same port (empty: nothing is persisted)."""
        self.stop()
        return self.start()

    def close(self) -> None:
        """Stop and remove the temporary folder (if this object made it)."""
        self.kill()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


class RedisClusterServers:
    """A 3-primary Redis Cluster (no replicas) on loopback, made with ``redis-cli --cluster create``."""

    def __init__(self, nodes: int = 3, workdir: Path | None = None):
        self.cli = _require("redis-cli")
        self._own_dir = workdir is None
        self.dir = Path(workdir or tempfile.mkdtemp(prefix="pc-redis-cluster-"))
        self.servers: list[RedisServer] = []
        ports = free_ports(2 * nodes)
        for port, bus_port in zip(ports[:nodes], ports[nodes:]):
            node_dir = self.dir / str(port)
            node_dir.mkdir(parents=True)
            args = ["--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf"]
            # An explicit bus port: the default (port + 10000) may be taken, or past 65535 for a high free port.
            args += ["--cluster-port", str(bus_port), "--cluster-node-timeout", "2000"]
            self.servers.append(RedisServer(port, args, workdir=node_dir))

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.servers[0].port}"

    def start(self) -> RedisClusterServers:
        try:
            for server in self.servers:
                server.start()
            addrs = [f"127.0.0.1:{s.port}" for s in self.servers]
            cmd = [self.cli, "--cluster", "create", *addrs, "--cluster-replicas", "0", "--cluster-yes"]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=_CLUSTER_TIMEOUT_S)
            if done.returncode != 0:
                raise RuntimeError(f"redis-cli --cluster create failed: {done.stdout[-2000:]}{done.stderr[-2000:]}")
            self._wait_ok()
        except BaseException:
            self.close()
            raise
        return self

    def _wait_ok(self) -> None:
        deadline = time.monotonic() + _CLUSTER_TIMEOUT_S
        pending = list(self.servers)
        while pending:
            with pending[0].client() as c:
                if c.cluster("INFO").get("cluster_state") == "ok":  # redis-py parses CLUSTER INFO into a dict
                    pending.pop(0)
                    continue
            if time.monotonic() > deadline:
                raise RuntimeError(f"cluster node on port {pending[0].port} never reached cluster_state:ok")
            time.sleep(0.05)

    def heal(self) -> None:
        """Start any stopped or killed node again (same port and nodes.conf: it rejoins with its slots, empty) and
        wait until every node says cluster_state:ok."""
        for server in self.servers:
            server.start()
        self._wait_ok()

    def clients(self) -> list[redis.Redis]:
        """A plain client per node (each sees only its own slots' keys)."""
        return [s.client() for s in self.servers]

    def flushall(self) -> None:
        for server in self.servers:
            with server.client() as c:
                c.flushall()

    def close(self) -> None:
        for server in self.servers:
            server.close()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisClusterServers:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the whole session (shared: do not stop it; use ``own_redis`` for that)."""
    with RedisServer(workdir=tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session server's URL, flushed (FLUSHALL) before the test."""
    with redis_server.client() as c:
        c.flushall()
    return redis_server.url


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServers]:
    """A 3-node Redis Cluster for the whole session; ``.url`` is ``redis+cluster://`` to a seed node."""
    with RedisClusterServers(workdir=tmp_path_factory.mktemp("redis-cluster")) as cluster:
        yield cluster


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A private redis-server the test may stop, kill and restart (killed after the test)."""
    with RedisServer(workdir=tmp_path / "redis") as server:
        yield server
