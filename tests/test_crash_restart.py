"""Crash safety of the disk tier, with real `promptcache serve` processes and real signals.

SIGTERM with writes pending (tests/test_shutdown.py already covers that a running stream finishes, that new
connections are refused while draining, the exit status 0, and that a prompt computed long before SIGTERM is served
from disk after a restart; it does not cover writes still pending when the server shuts down):
- requests admitted before SIGTERM are answered, though most of their blocks are computed during the drain, and the
  process exits 0;
- the blocks of the last step, still queued for the tier writer when the server shuts down, are all on disk once the
  process has exited (its shutdown flushed them), and no unfinished write is left behind;
- a restart serves each of those prompts from disk, with the cold server's greedy output.

SIGKILL while blocks are being written, then damage on disk:
- a server SIGKILLed while clients keep sending it distinct long prompts (its tier writer busy) leaves only whole
  entries; we then flip bytes in one entry's KV payload, truncate another, and replace a third by the half-written
  temporary file that a write interrupted before its rename leaves;
- a server restarted on that directory starts, deletes the temporary file, and its shallow integrity check passes
  (index == directory) while the deep one names exactly the two damaged entries;
- every prompt with blocks on disk is answered from disk up to its first damaged or missing block, the rest is
  recomputed, and the greedy answer equals the cold server's: a damaged block is never served; the damaged entries
  are counted as corrupt, dropped, written again from the recomputed KV, and the deep check then passes.

The cold server is the same model with no disk tier and no prefix caching: every answer computed from scratch. The
model is conftest's small random llama (``varied_model``): the embedded default model repeats one token, so its
answers would agree whatever KV they were computed from, and could not show that no damaged block was served.

One disk directory goes through both scenarios (the SIGTERM restart is the server then SIGKILLed), because each
server start costs 5-15 s on 2 shared cores. Each scenario runs once, in a module fixture that records what it saw;
the tests assert on the record.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from serve_processes import start_serve, wait_healthy

from promptcache.cache.tiers import format as fmt

BS = 16  # the default block size
MODEL = "promptcache-default"  # the served model name every process below is given
ANSWER = 8  # tokens of each compared answer
NO_PROBLEMS = {"ok": True, "problems": {"device": [], "disk": []}}

# SIGTERM: a burst of prompts prefilled in one step (16,384 tokens a step) while the server drains. That step queues
# 640 blocks for the tier writer at once, more than it writes in the ~0.1 s the server then takes to reach its
# shutdown (uvicorn notices the closed connections on a 0.1 s poll): writes are still pending at the shutdown, and
# only its flush gets them to disk (a server made to skip it left some prompts with 0-19 of their 40 blocks).
BURST = 16
BURST_PROMPT_LEN = 40 * BS + 5
STEP_TOKENS = 16384

# SIGKILL: client prompts of 24 full blocks and 5 tokens; the server is killed once this many new entries exist.
CRASH_CLIENTS = 4
CRASH_PROMPT_LEN = 24 * BS + 5
KILL_AT_ENTRIES = 10 * 24


def prompt(seed: int, length: int) -> list[int]:
    """Token ids inside the vocabulary; seeds distinct modulo 8000 give prompts distinct from their first token on,
    so no two share a block (the SIGKILL clients use seeds 0-3999, the SIGTERM burst 6000-6015)."""
    return [100 + (seed * 7919 + j * 37) % 8000 for j in range(length)]


def usable_blocks(length: int) -> int:
    """Blocks of a prompt of ``length`` tokens that a cache can serve (its last token is always computed)."""
    return (length - 1) // BS


# ---- real processes ------------------------------------------------------------------------------------------------
class Server:
    """A `promptcache serve` process on a free loopback port: started when constructed, waited for by ``ready``."""

    def __init__(self, *options: str) -> None:
        # A small device pool (2,500 blocks here) holds every request below and starts in a fraction of the time
        # the default budget's takes (one Python object a block).
        self.proc, self.url = start_serve(["--served-model-name", MODEL, "--kv-cache-memory-gb", "0.02", *options])

    def ready(self) -> Server:
        wait_healthy(self.proc, self.url, timeout=120)  # 2 shared cores: a start can take several times its 5 s
        return self

    def complete(self, ids: Sequence[int], max_tokens: int = ANSWER) -> dict:
        # logprobs: the answer's tokens come back one by one (how varied an answer is, is counted in tokens).
        body = {"model": MODEL, "prompt": list(ids), "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True,
                "logprobs": 1}  # fmt: skip
        resp = httpx.post(f"{self.url}/v1/completions", json=body, timeout=120)
        assert resp.status_code == 200, resp.text
        return resp.json()

    def requests(self) -> int:
        """Requests in the engine (waiting or running), as /health reports them."""
        return httpx.get(f"{self.url}/health", timeout=30).json()["requests"]

    def tier_stats(self) -> dict:
        return httpx.get(f"{self.url}/v1/cache/stats", timeout=30).json()["tiers"]

    def integrity(self, deep: bool) -> dict:
        return httpx.get(f"{self.url}/v1/cache/integrity", params={"deep": "1" if deep else "0"}, timeout=60).json()

    def wait_for_writes(self) -> None:
        """Until the tier writer's queue is empty (what the requests so far computed is on disk)."""
        deadline = time.monotonic() + 30
        while self.tier_stats()["write_queue_blocks"] > 0:
            assert time.monotonic() < deadline, "tier writes did not complete"
            time.sleep(0.02)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


def disk_server(model: Path, disk: Path, *options: str) -> Server:
    # "always": a block found on disk is loaded, never recomputed on a speed estimate, so hits are deterministic.
    return Server("--model", str(model), "--disk-cache", str(disk), "--tier-load-policy", "always", *options)


def answers(server: Server, prompts: Sequence[Sequence[int]], max_tokens: int = ANSWER) -> list[dict]:
    """Completions of ``prompts``, sent concurrently (the server batches them)."""
    out: list[dict] = [{} for _ in prompts]

    def one(i: int) -> None:
        out[i] = server.complete(prompts[i], max_tokens)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(out), "a request failed (its thread's traceback is above)"
    return out


def text(completion: dict) -> str:
    return completion["choices"][0]["text"]


def disk_tokens(completion: dict) -> int:
    """Prompt tokens read from the disk tier (our usage extension); a restarted server can hit nothing else."""
    by_tier = completion["usage"]["cached_tokens_by_tier"]
    assert set(by_tier) <= {"disk"}, f"a restarted server hit another tier: {by_tier}"
    return by_tier.get("disk", 0)


def assert_varied(completion: dict) -> None:
    """An answer used as evidence varies (a comparison of two repeated tokens would prove little)."""
    tokens = completion["choices"][0]["logprobs"]["tokens"]
    assert len(set(tokens)) >= 4, f"too uniform an answer to compare: {tokens}"


# ---- what is on disk, read from the entry files themselves ---------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    """One entry file as format.py lays it out: its address, its parent's, its tokens, where its KV bytes start."""

    path: Path
    address: str
    parent: str
    tokens: tuple[int, ...]
    kv_offset: int


def entries_on_disk(disk: Path) -> list[Entry]:
    out = []
    for path in disk.rglob("*.kv"):
        header, offset = fmt.read_header(path.read_bytes())
        out.append(Entry(path, str(header["address"]), str(header["parent"]), tuple(header["tokens"]), offset))
    return out


def chain(entries: Sequence[Entry], ids: Sequence[int]) -> list[Entry]:
    """The entries of ``ids``' leading blocks, in order, up to the first one not on disk (the run a lookup hits),
    found by the parent address and tokens in their headers."""
    by_parent: dict[str, list[Entry]] = {}
    for e in entries:
        by_parent.setdefault(e.parent, []).append(e)
    first = [e for e in entries if e.tokens == tuple(ids[:BS])]
    assert len(first) <= 1, "two entries hold the same first block: the prompts are not distinct"
    run = first[:1]
    while run and (k := len(run) * BS) + BS <= len(ids):
        children = [e for e in by_parent.get(run[-1].address, []) if e.tokens == tuple(ids[k : k + BS])]
        if not children:
            break
        run.append(children[0])
    return run


def count_entries(disk: Path) -> int:
    return sum(1 for _ in disk.rglob("*.kv"))


# ---- damage, as a crash or a bad disk leaves it --------------------------------------------------------------------
def flip_payload(e: Entry) -> None:
    """XOR 256 bytes in the middle of the KV payload: the header stays valid, only the checksum can tell."""
    buf = bytearray(e.path.read_bytes())
    mid = e.kv_offset + (len(buf) - e.kv_offset) // 2
    buf[mid : mid + 256] = bytes(b ^ 0xFF for b in buf[mid : mid + 256])
    e.path.write_bytes(bytes(buf))


def truncate(e: Entry) -> None:
    """Cut the file in the middle of its KV payload (a torn write on a disk that lost power)."""
    os.truncate(e.path, e.kv_offset + (e.path.stat().st_size - e.kv_offset) // 2)


def half_written(e: Entry) -> Path:
    """Replace an entry by what a writer killed in mid-write leaves (disk.py's naming): half its bytes under
    ``.<address>.<pid>.<thread>.tmp``, and no ``<address>.kv``, since the rename never happened."""
    data = e.path.read_bytes()
    tmp = e.path.with_name(f".{e.address}.4242.139871.tmp")
    tmp.write_bytes(data[: len(data) // 2])
    e.path.unlink()
    return tmp


# ---- the scenarios -------------------------------------------------------------------------------------------------
@dataclass
class Case:
    """One prompt sent to a restarted server: the disk hit it should get, and its answer there and on the cold
    server."""

    name: str
    ids: list[int]
    expected_disk_tokens: int
    warm: dict = field(default_factory=dict)
    cold: dict = field(default_factory=dict)


@pytest.fixture(scope="module")
def cold(varied_model: Path) -> Iterator[Server]:
    """The reference server. Started here and waited for only when first asked, so it starts alongside the first
    server with a disk tier."""
    server = Server("--model", str(varied_model), "--no-prefix-caching")
    yield server
    server.stop()


@dataclass
class DrainRun:
    disk: Path
    restarted: Server  # the server started on the directory after the exit (the SIGKILL scenario's victim)
    in_engine_at_sigterm: int  # burst requests admitted and not yet answered when SIGTERM was sent
    burst: list[dict]  # each burst request's answer, or {"error": ...}
    exit_rc: int
    tmp_after_exit: list[Path]
    blocks_on_disk: list[int]  # per burst prompt, its leading blocks found on disk after the exit
    integrity_deep: dict  # of the restarted server, before any request
    cases: list[Case]


def post_completion(server: Server, ids: list[int], record: dict) -> None:
    """A one-token completion into ``record``: the response body, or {"error": ...} if the request failed."""
    body = {"model": MODEL, "prompt": ids, "max_tokens": 1, "temperature": 0.0}
    try:
        record.update(httpx.post(f"{server.url}/v1/completions", json=body, timeout=120).raise_for_status().json())
    except httpx.HTTPError as err:
        record["error"] = repr(err)


@pytest.fixture(scope="module")
def drain(cold: Server, varied_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[DrainRun]:
    """SIGTERM while a burst of long prompts waits for, or runs, its prefill; after the exit, a restart on the same
    directory asks for every prompt again."""
    disk = tmp_path_factory.mktemp("disk")
    first = disk_server(varied_model, disk, "--max-num-batched-tokens", str(STEP_TOKENS)).ready()
    servers = [first]
    try:
        prompts = [prompt(6000 + i, BURST_PROMPT_LEN) for i in range(BURST)]
        burst: list[dict] = [{} for _ in prompts]
        clients = [threading.Thread(target=post_completion, args=(first, ids, out)) for ids, out in zip(prompts, burst)]
        for t in clients:
            t.start()
        # SIGTERM as soon as every request is admitted. Those answered, then those in the engine, add up to a lower
        # bound of those admitted (one answered in between is in neither): SIGTERM never comes too early.
        deadline = time.monotonic() + 60
        while True:
            answered = sum("choices" in out for out in burst)
            in_engine = first.requests()
            if answered + in_engine >= BURST:
                break
            assert time.monotonic() < deadline, f"the burst was not admitted: {burst}"
            time.sleep(0.002)
        os.kill(first.proc.pid, signal.SIGTERM)
        for t in clients:
            t.join(timeout=120)
        exit_rc = first.proc.wait(timeout=60)

        entries = entries_on_disk(disk)
        cases = [Case(f"burst prompt {i}", ids, usable_blocks(BURST_PROMPT_LEN) * BS) for i, ids in enumerate(prompts)]
        second = disk_server(varied_model, disk)
        servers.append(second)

        def reference() -> None:  # on the cold server, while the second one starts
            for case, out in zip(cases, answers(cold.ready(), [c.ids for c in cases])):
                case.cold = out

        on_cold = threading.Thread(target=reference)
        on_cold.start()
        second.ready()
        deep = second.integrity(deep=True)
        for case in cases:  # one at a time: each is the restarted server's first sight of its prompt
            case.warm = second.complete(case.ids)
        second.wait_for_writes()
        on_cold.join()
        assert all(case.cold for case in cases), "the cold server did not answer (its thread's traceback is above)"
        yield DrainRun(disk, second, in_engine, burst, exit_rc, sorted(disk.rglob("*.tmp")),
                       [len(chain(entries, ids)) for ids in prompts], deep, cases)  # fmt: skip
    finally:
        for s in servers:
            s.stop()


@dataclass
class CrashRun:
    killed_rc: int
    in_flight_at_kill: int  # requests sent and not yet answered when SIGKILL was sent
    new_entries_at_kill: int
    planted_tmp: Path
    damaged: dict[str, str]  # address -> how it was damaged
    tmp_after_restart: list[Path]
    integrity_shallow: dict  # of the restarted server, before any request
    integrity_deep_before: dict
    cases: list[Case]
    errors_after: dict[str, int]  # the disk tier's error counters after the requests
    integrity_deep_after: dict


@pytest.fixture(scope="module")
def crash(drain: DrainRun, cold: Server, varied_model: Path) -> Iterator[CrashRun]:
    """SIGKILL the server while clients keep it busy with distinct long prompts, damage three entries, restart on
    the same directory and ask for the prefixes on disk."""
    victim, disk = drain.restarted, drain.disk
    servers = [victim]
    try:
        before = count_entries(disk)
        sent: list[int] = []
        answered: list[int] = []
        gone = threading.Event()

        def client(k: int) -> None:
            """Keep one request in flight, prompt after prompt, until the server is gone."""
            with httpx.Client(timeout=60) as http:
                for n in range(k, 4000, CRASH_CLIENTS):
                    if gone.is_set():
                        return
                    sent.append(n)
                    body = {"model": MODEL, "prompt": prompt(n, CRASH_PROMPT_LEN), "max_tokens": 2,
                            "temperature": 0.0}  # fmt: skip
                    try:
                        http.post(f"{victim.url}/v1/completions", json=body).raise_for_status()
                    except httpx.HTTPError:
                        return  # killed under this request
                    answered.append(n)

        clients = [threading.Thread(target=client, args=(k,)) for k in range(CRASH_CLIENTS)]
        for t in clients:
            t.start()
        deadline = time.monotonic() + 60
        while count_entries(disk) < before + KILL_AT_ENTRIES:  # the writer is busy: kill it in mid-stream
            assert time.monotonic() < deadline and victim.proc.poll() is None, "the server wrote too few entries"
            time.sleep(0.005)
        in_flight = len(sent) - len(answered)
        os.kill(victim.proc.pid, signal.SIGKILL)
        killed_rc = victim.proc.wait(timeout=30)
        gone.set()
        for t in clients:
            t.join(timeout=60)
        new_entries = count_entries(disk) - before

        entries = entries_on_disk(disk)
        usable = usable_blocks(CRASH_PROMPT_LEN)
        chains = {n: chain(entries, prompt(n, CRASH_PROMPT_LEN)) for n in sorted(set(sent))}
        whole = [n for n, c in chains.items() if len(c) == usable]
        assert len(whole) >= 6, f"too few prompts reached the disk before the kill: {[len(c) for c in chains.values()]}"
        flipped, cut, torn = whole[:3]
        # The intact prompts asked for: those the kill caught half-written (the crash's own leftovers), then whole.
        partial = [n for n, c in chains.items() if 0 < len(c) < usable]
        intact = partial[:2] + whole[3 : 7 - len(partial[:2])]
        cases = [Case(f"intact prompt {n} ({len(chains[n])} blocks on disk)", prompt(n, CRASH_PROMPT_LEN),
                      len(chains[n]) * BS) for n in intact]  # fmt: skip
        cases += [
            Case("KV bytes flipped in block 2", prompt(flipped, CRASH_PROMPT_LEN), 2 * BS),
            Case("block 1 truncated", prompt(cut, CRASH_PROMPT_LEN), 1 * BS),
            Case("block 1 left as a half-written temporary file", prompt(torn, CRASH_PROMPT_LEN), 1 * BS),
        ]
        flip_payload(chains[flipped][2])
        truncate(chains[cut][1])
        planted = half_written(chains[torn][1])
        damaged = {chains[flipped][2].address: "flipped", chains[cut][1].address: "truncated"}

        restarted = disk_server(varied_model, disk)
        servers.append(restarted)

        def reference() -> None:  # on the cold server, while the restarted one starts
            for case, out in zip(cases, answers(cold.ready(), [c.ids for c in cases])):
                case.cold = out

        on_cold = threading.Thread(target=reference)
        on_cold.start()
        restarted.ready()
        tmp_after = sorted(disk.rglob("*.tmp"))
        shallow, deep_before = restarted.integrity(deep=False), restarted.integrity(deep=True)
        for case in cases:  # one at a time: each is the restarted server's first sight of its prompt
            case.warm = restarted.complete(case.ids)
        restarted.wait_for_writes()
        on_cold.join()
        assert all(case.cold for case in cases), "the cold server did not answer (its thread's traceback is above)"
        errors = restarted.tier_stats()["tiers"][0]["errors"]
        yield CrashRun(killed_rc, in_flight, new_entries, planted, damaged, tmp_after, shallow, deep_before, cases,
                       errors, restarted.integrity(deep=True))  # fmt: skip
    finally:
        for s in servers:
            s.stop()


# ---- SIGTERM -------------------------------------------------------------------------------------------------------
def test_requests_admitted_before_sigterm_are_answered_and_the_process_exits_0(drain: DrainRun) -> None:
    assert drain.in_engine_at_sigterm > 0, "the burst was answered before SIGTERM: the drain had nothing to do"
    errors = [out["error"] for out in drain.burst if "error" in out]
    assert errors == [], f"requests admitted before SIGTERM were not answered: {errors}"
    assert drain.exit_rc == 0, f"the drained server exited with {drain.exit_rc}"


def test_writes_pending_at_shutdown_are_flushed_to_disk_before_the_exit(drain: DrainRun) -> None:
    # Every full block of every prompt, though most were computed, and all queued, after SIGTERM.
    assert drain.blocks_on_disk == [usable_blocks(BURST_PROMPT_LEN)] * BURST, drain.blocks_on_disk
    assert drain.tmp_after_exit == [], f"an unfinished write was left behind: {drain.tmp_after_exit}"
    assert drain.integrity_deep == NO_PROBLEMS, drain.integrity_deep


def test_a_restart_serves_every_flushed_prefix_from_disk_with_the_cold_output(drain: DrainRun) -> None:
    for case in drain.cases:
        assert disk_tokens(case.warm) == case.expected_disk_tokens, f"{case.name}: {case.warm['usage']}"
        assert text(case.warm) == text(case.cold), f"{case.name}: the answer from disk differs from the cold one"
        assert_varied(case.cold)


# ---- SIGKILL -------------------------------------------------------------------------------------------------------
def test_the_server_is_killed_with_requests_in_flight_and_writes_under_way(crash: CrashRun) -> None:
    assert crash.killed_rc == -signal.SIGKILL, f"the server did not die of SIGKILL: rc {crash.killed_rc}"
    assert crash.in_flight_at_kill > 0, "no request was in flight at the kill"
    assert crash.new_entries_at_kill >= KILL_AT_ENTRIES, f"only {crash.new_entries_at_kill} entries were written"


def test_a_restart_deletes_the_half_written_file_and_its_index_matches_the_directory(crash: CrashRun) -> None:
    assert crash.tmp_after_restart == [], f"temporary files survived the restart: {crash.tmp_after_restart}"
    assert not crash.planted_tmp.exists()
    assert crash.integrity_shallow == NO_PROBLEMS, crash.integrity_shallow


def test_the_deep_integrity_check_names_exactly_the_damaged_entries(crash: CrashRun) -> None:
    problems = crash.integrity_deep_before["problems"]["disk"]
    named = {p.split(":", 1)[0]: p for p in problems}
    assert crash.integrity_deep_before["ok"] is False, crash.integrity_deep_before
    assert set(named) == set(crash.damaged) and len(problems) == len(named), f"damaged {crash.damaged}: {problems}"
    for address, how in crash.damaged.items():
        expected = "checksum mismatch" if how == "flipped" else "truncated"
        assert expected in named[address], f"the {how} entry was reported as {named[address]!r}"


def test_prefixes_on_disk_are_served_from_disk_with_the_cold_output(crash: CrashRun) -> None:
    for case in crash.cases[:-3]:
        assert disk_tokens(case.warm) == case.expected_disk_tokens, f"{case.name}: {case.warm['usage']}"
        assert text(case.warm) == text(case.cold), f"{case.name}: the answer from disk differs from the cold one"
        assert_varied(case.cold)


def test_a_damaged_or_missing_block_is_a_miss_recomputed_to_the_cold_output(crash: CrashRun) -> None:
    for case in crash.cases[-3:]:
        # The blocks before the damaged one come from disk; from it on, nothing does: it is never served.
        assert disk_tokens(case.warm) == case.expected_disk_tokens, f"{case.name}: {case.warm['usage']}"
        assert text(case.warm) == text(case.cold), f"{case.name}: the answer differs from the cold one"
        assert_varied(case.cold)


def test_damaged_entries_are_counted_dropped_and_written_again_whole(crash: CrashRun) -> None:
    assert crash.errors_after == {"corrupt": len(crash.damaged)}, crash.errors_after
    # Each was deleted at its failed load, and the block recomputed in its place was written down again.
    assert crash.integrity_deep_after == NO_PROBLEMS, crash.integrity_deep_after
