"""The tier replay below the device pool (``belady.simulate_tiers``) and the write-policy study built on it.

Hand-worked traces use one-letter addresses (4 tokens a block); every expected number is worked out in comments.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from promptcache.bench import tier_study
from promptcache.bench.belady import (
    WRITE_POLICIES,
    WRITE_POLICY_VARIANTS,
    TraceEntry,
    block_trace,
    second_pass,
    simulate,
    simulate_tiers,
)

BS = 4


def req(*blocks: str, writes: str | None = None) -> TraceEntry:
    """An entry reading ``blocks`` (one-letter addresses) and writing them (or ``writes``), 4 tokens a block + 1."""
    reads = [b.encode() for b in blocks]
    written = reads if writes is None else [w.encode() for w in writes]
    return TraceEntry(reads=reads, writes=list(written), prompt_tokens=len(reads) * BS + 1)


def random_trace(seed: int, n: int = 120) -> list[TraceEntry]:
    """Requests over a few shared "documents" of varied lengths (Zipf-ish), each with its own question and answer."""
    rng = random.Random(seed)
    docs = [[rng.randrange(1000) for _ in range(rng.randrange(4, 40))] for _ in range(8)]
    weights = [1 / (k + 1) for k in range(len(docs))]
    requests = []
    for _ in range(n):
        question = [rng.randrange(1000) for _ in range(rng.randrange(1, 9))]
        answer = [rng.randrange(1000) for _ in range(rng.randrange(1, 9))]
        requests.append((rng.choices(docs, weights)[0] + question, answer))
    return block_trace(requests, BS, namespace="t")


def working_set(trace: list[TraceEntry]) -> int:
    return len({a for e in trace for a in e.writes})


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_device_alone_replays_exactly_as_the_engines_lfu(seed: int) -> None:
    trace = random_trace(seed)
    for capacity in (12, 30, 80):
        expected = simulate(trace, capacity, BS, "lfu").per_request_hit_tokens
        assert sum(expected) > 0
        for policy in WRITE_POLICIES:
            result = simulate_tiers(trace, BS, capacity, [], policy)
            assert [h[0] for h in result.hit_tokens_per_request] == expected
            assert result.total.blocks_written_by_tier == {}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_an_unbounded_disk_under_write_through_reaches_the_unbounded_caches_hits(seed: int) -> None:
    trace = random_trace(seed)
    unbounded = simulate(trace, working_set(trace), BS, "lfu").per_request_hit_tokens
    result = simulate_tiers(trace, BS, 12, [("host", 10), ("disk", None)], "write-through")
    assert [sum(h) for h in result.hit_tokens_per_request] == unbounded
    # ... and the device and host alone are far from it, so the disk really served hits.
    assert result.total.hit_tokens_by_tier["disk"] > sum(unbounded) / 4


def test_write_back_writes_below_only_the_blocks_host_evicts() -> None:
    # Device 2 blocks (LFU), host 1, disk unbounded; one new block per request.
    # t0 Z, t1 Y: device {Z, Y}. t2 X: the device evicts Z (fewest, oldest uses) -> host {Z}.
    # t3 W: the device evicts Y -> host stores Y and evicts Z, which is in no memory now -> disk {Z}.
    trace = [req(writes="Z"), req(writes="Y"), req(writes="X"), req(writes="W")]
    result = simulate_tiers(trace, BS, 2, [("host", 1), ("disk", None)], "write-back")
    assert result.blocks_written_per_request == [[0, 0], [0, 0], [1, 0], [1, 1]]
    # A block host evicts while the device holds it again is not written below: it is still in memory.
    # t0 A, t1 B, t2 C: the device evicts A -> host {A}. t3 hits A from host (back in the device, fresh count) and
    # the device evicts B (fewest uses) -> host stores B and evicts A, which the device holds: no disk write.
    again = simulate_tiers([req("A"), req("B"), req("C"), req("A")], BS, 2, [("host", 1), ("disk", None)],
                           "write-back")  # fmt: skip
    assert again.hit_tokens_per_request[3] == [0, BS, 0]
    assert again.blocks_written_per_request == [[0, 0], [0, 0], [1, 0], [1, 0]]
    # With room for everything in the device, nothing is ever evicted and nothing is written below it.
    roomy = simulate_tiers(trace, BS, 4, [("host", 1), ("disk", None)], "write-back")
    assert roomy.total.blocks_written_by_tier == {"host": 0, "disk": 0}


def test_the_part_of_a_request_the_device_cannot_hold_goes_down_to_host() -> None:
    # Device 1 block: the request holds A, and B (computed, then released at once) goes to host, where the same
    # request next time finds it.
    trace = [req("A", "B"), req("A", "B")]
    result = simulate_tiers(trace, BS, 1, [("host", 10)], "write-back")
    assert result.blocks_written_per_request == [[1], [0]]
    assert result.hit_tokens_per_request[1] == [BS, BS]


def test_each_level_serves_its_share_of_one_hit_and_the_shares_add_up() -> None:
    # The trace above leaves X, W in the device, Y in host and Z on disk; a request reading X, Y, Z then hits one
    # block from each level, 3 blocks in all.
    trace = [req(writes="Z"), req(writes="Y"), req(writes="X"), req(writes="W"), req("X", "Y", "Z")]
    result = simulate_tiers(trace, BS, 2, [("host", 1), ("disk", None)], "write-back")
    assert result.hit_tokens_per_request[-1] == [BS, BS, BS]
    assert result.span(4).hit_tokens == 3 * BS == result.hit_tokens


@pytest.mark.parametrize("policy", WRITE_POLICIES)
def test_hits_by_tier_add_up_to_the_total_on_random_traces(policy: str) -> None:
    trace = random_trace(3)
    result = simulate_tiers(trace, BS, 12, [("host", 10), ("disk", 40)], policy, restart_after=60)
    total = result.total
    assert set(total.hit_tokens_by_tier) == {"device", "host", "disk"}
    assert all(v > 0 for k, v in total.hit_tokens_by_tier.items() if k != "host" or policy != "write-through")
    assert sum(total.hit_tokens_by_tier.values()) == total.hit_tokens == sum(map(sum, result.hit_tokens_per_request))
    before, after = result.before_restart, result.after_restart
    assert after is not None and before.requests == after.requests == 60
    for level, tokens in total.hit_tokens_by_tier.items():
        assert before.hit_tokens_by_tier[level] + after.hit_tokens_by_tier[level] == tokens
    assert total.prompt_tokens == result.prompt_tokens == sum(e.prompt_tokens for e in trace)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_write_through_writes_each_distinct_block_exactly_once(seed: int) -> None:
    trace = random_trace(seed)
    result = simulate_tiers(trace, BS, 12, [("host", 10), ("disk", None)], "write-through")
    assert result.total.blocks_written_by_tier["disk"] == working_set(trace)
    # Write-back writes no more than that (each block at most once to an unbounded disk) and misses those still in
    # memory at the end.
    back = simulate_tiers(trace, BS, 12, [("host", 10), ("disk", None)], "write-back")
    assert 0 < back.total.blocks_written_by_tier["disk"] < working_set(trace)


def test_write_through_after_hit_stores_a_block_only_once_it_was_hit() -> None:
    # Device 1 block, no host: each request evicts the previous one's block. A is computed, evicted and lost (never
    # hit); B is hit at t2, stored then, and so A misses at t4 while B hits from disk at t5.
    trace = [req("A"), req("B"), req("B"), req("C"), req("A"), req("B")]
    result = simulate_tiers(trace, BS, 1, [("disk", None)], "write-through-after-hit")
    assert [w[0] for w in result.blocks_written_per_request] == [0, 0, 1, 0, 0, 0]
    assert result.hit_tokens_per_request == [[0, 0], [0, 0], [BS, 0], [0, 0], [0, 0], [0, BS]]


HYBRIDS = ("write-through+back", *WRITE_POLICY_VARIANTS)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("hybrid", HYBRIDS)
def test_write_through_back_is_write_through_on_an_unbounded_tier(seed: int, hybrid: str) -> None:
    # An unbounded tier never drops a block, so the writes when a block leaves memory find it there and write
    # nothing: the hits (by level) and the writes are write-through's, request by request, with a restart in the
    # middle, on one replica's disk and on a Redis two replicas share. Each distinct block is written exactly once.
    trace = random_trace(seed)
    for lower, replicas in (("disk", 1), ("redis", 2)):
        tiers = [("host", 10), (lower, None)]
        through = simulate_tiers(trace, BS, 12, tiers, "write-through", restart_after=60, replicas=replicas)
        both = simulate_tiers(trace, BS, 12, tiers, hybrid, restart_after=60, replicas=replicas)
        assert both.hit_tokens_per_request == through.hit_tokens_per_request
        assert both.blocks_written_per_request == through.blocks_written_per_request
        assert both.total.blocks_written_by_tier[lower] == working_set(trace)
        assert both.total.hit_tokens_by_tier[lower] > 0


def test_write_through_back_also_writes_a_block_the_disk_dropped_when_it_leaves_memory() -> None:
    # Device 2 blocks (LFU), no host, disk 3 blocks (LRU). The disk lists least recent first.
    # t0 A: computed, written through: disk [A].       t1 A: a device hit (A has 2 uses); the disk is not touched.
    # t2 B: written: disk [A, B].                       t3 C: the device evicts B (1 use); C written: [A, B, C].
    # t4 D: the device evicts C; D written, and the disk drops A, which the device still serves: [B, C, D].
    # t5 X, Y (computed, read nothing): the device lets go of D (1 use, the fewer) then A.
    #   write-through:      X, Y written: [D, X, Y]. A is in no tier any more.
    #   write-through+back: D leaves memory while on disk (a use: [B, C, D]); A leaves it while not on disk, so is
    #                       written again ([C, D, A]); then X, Y: [A, X, Y]. 3 writes.
    # t6 A: write-through computes it again (1 write); write-through+back hits it from disk, and the device, taking
    #   it, lets go of Y, still on disk: no write. One block more hit, for the same 7 writes in all.
    trace = [req("A"), req("A"), req("B"), req("C"), req("D"), req(writes="XY"), req("A")]
    tiers = [("disk", 3)]
    through = simulate_tiers(trace, BS, 2, tiers, "write-through")
    assert [w[0] for w in through.blocks_written_per_request] == [1, 0, 1, 1, 1, 2, 1]
    assert through.hit_tokens_per_request[6] == [0, 0]
    for hybrid in HYBRIDS:  # every touch here finds the block already last on disk: the variant does the same
        both = simulate_tiers(trace, BS, 2, tiers, hybrid)
        assert [w[0] for w in both.blocks_written_per_request] == [1, 0, 1, 1, 1, 3, 0]
        assert both.hit_tokens_per_request[6] == [0, BS]
        assert both.hit_tokens > through.hit_tokens
        # Write-back gets the same hit, writing later: B at t3, C at t4, D and A at t5, Y at t6.
        back = simulate_tiers(trace, BS, 2, tiers, "write-back")
        assert back.hit_tokens_per_request == both.hit_tokens_per_request
        assert [w[0] for w in back.blocks_written_per_request] == [0, 0, 0, 1, 1, 2, 1]


def test_write_through_back_refreshes_a_block_still_on_disk_when_it_leaves_memory() -> None:
    # Device 1 block, host 1, disk 2; every block is written through as computed.
    # t0 A: disk [A].  t1 B: the device evicts A -> host [A]; disk [A, B].
    # t2 C: the device evicts B -> host takes B and evicts A, which leaves memory while on disk.
    #   write-through+back touches it: [B, A], then C is written and B dropped: [A, C].
    #   the variant without the touch, like write-through, leaves [A, B]: C drops A: [B, C].
    # t3 A: a disk hit with the touch; computed again (and written, 1) without it. With the touch, A's return to the
    #   device sends C to host, whose eviction of B (no longer on disk) writes B again: 1 write either way.
    trace = [req("A"), req("B"), req("C"), req("A")]
    tiers = [("host", 1), ("disk", 2)]
    touch = simulate_tiers(trace, BS, 1, tiers, "write-through+back")
    no_touch = simulate_tiers(trace, BS, 1, tiers, "write-through+back (no touch)")
    through = simulate_tiers(trace, BS, 1, tiers, "write-through")
    assert touch.hit_tokens_per_request[3] == [0, 0, BS]
    assert no_touch.hit_tokens_per_request[3] == through.hit_tokens_per_request[3] == [0, 0, 0]
    for result in (touch, no_touch, through):  # [host, disk] per request
        assert result.blocks_written_per_request == [[0, 1], [1, 1], [1, 1], [1, 1]]


def test_write_through_back_on_a_shared_redis_rewrites_per_replica() -> None:
    # Two replicas, each device 1 block with no host, over a Redis of 1 block. t0 on replica 0 computes A (written);
    # t1 on replica 1 computes B (written; Redis drops A, still in replica 0's device). t2 on replica 0 computes C:
    # A leaves replica 0's memory and, absent from Redis, is written again (Redis drops B), then C is written (Redis
    # drops A). t3 on replica 1 computes D: B leaves replica 1, is written again, then D. 2 writes a request after
    # the first two.
    trace = [req("A"), req("B"), req("C"), req("D")]
    both = simulate_tiers(trace, BS, 1, [("redis", 1)], "write-through+back", replicas=2)
    assert [w[0] for w in both.blocks_written_per_request] == [1, 1, 2, 2]
    through = simulate_tiers(trace, BS, 1, [("redis", 1)], "write-through", replicas=2)
    assert [w[0] for w in through.blocks_written_per_request] == [1, 1, 1, 1]
    # A block another replica computed is in Redis at once, as under write-through.
    shared = simulate_tiers([req("A", "B"), req("A", "B")], BS, 10, [("redis", None)], "write-through+back",
                            replicas=2)  # fmt: skip
    assert shared.hit_tokens_per_request[1] == [0, 2 * BS]


def test_a_restart_keeps_the_disks_hits_and_loses_the_device_and_hosts() -> None:
    # A two-block request, then the same again after a restart. Without a restart it hits both blocks in the device.
    trace = [req("A", "B"), req("A", "B")]
    tiers = [("host", 10), ("disk", None)]
    assert simulate_tiers(trace, BS, 10, tiers, "write-back").hit_tokens_per_request[1] == [2 * BS, 0, 0]
    # Write-through stored both on disk when they were computed: the second request hits them there.
    through = simulate_tiers(trace, BS, 10, tiers, "write-through", restart_after=1)
    assert through.after_restart is not None
    assert through.after_restart.hit_tokens_by_tier == {"device": 0, "host": 0, "disk": 2 * BS}
    # Write-back never evicted them, so they lived only in the device: gone.
    back = simulate_tiers(trace, BS, 10, tiers, "write-back", restart_after=1)
    assert back.after_restart is not None and back.after_restart.hit_tokens == 0
    # A block host holds is lost too: with room for one block in the device, A moves to host when B comes.
    moved = [req("A"), req("B"), req("A")]
    assert simulate_tiers(moved, BS, 1, tiers, "write-back").hit_tokens_per_request[2] == [0, BS, 0]
    lost = simulate_tiers(moved, BS, 1, tiers, "write-back", restart_after=2)
    assert lost.after_restart is not None and lost.after_restart.hit_tokens == 0
    # second_pass is the same replay twice: its first pass is a single replay, its second the restarted one.
    twice = second_pass([trace[0]], BS, 10, tiers, "write-through")
    assert twice.first.hit_tokens == 0 and twice.second.hit_tokens_by_tier["disk"] == 2 * BS
    assert second_pass([trace[0]], BS, 10, tiers, "write-back", restart=False).second.hit_tokens == 2 * BS


def test_a_shared_redis_serves_another_replicas_blocks_only_once_written_there() -> None:
    # Two replicas take requests in turn; request 1 runs on the other replica than request 0. Under write-through
    # replica 0's blocks are in Redis by then; under write-back they are still in replica 0's device.
    trace = [req("A", "B"), req("A", "B")]
    tiers = [("host", 10), ("redis", None)]
    through = simulate_tiers(trace, BS, 10, tiers, "write-through", replicas=2)
    assert through.hit_tokens_per_request[1] == [0, 0, 2 * BS]
    back = simulate_tiers(trace, BS, 10, tiers, "write-back", replicas=2)
    assert back.hit_tokens_per_request[1] == [0, 0, 0]
    # A disk is each replica's own: the other replica does not see it.
    disk = simulate_tiers(trace, BS, 10, [("host", 10), ("disk", None)], "write-through", replicas=2)
    assert disk.hit_tokens_per_request[1] == [0, 0, 0]


def test_bad_arguments_are_refused() -> None:
    trace = [req("A")]
    with pytest.raises(ValueError, match="write policy"):
        simulate_tiers(trace, BS, 1, [], "write-around")
    with pytest.raises(ValueError, match="first tier"):
        simulate_tiers(trace, BS, 1, [("disk", 1), ("host", 1)], "write-back")
    with pytest.raises(ValueError, match="restart_after"):
        simulate_tiers(trace, BS, 1, [], "write-back", restart_after=2)


def test_the_cli_writes_every_row_as_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "tiers.json"
    assert tier_study.main(["--quick", "--seeds", "0", "--workloads", "chat", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["quick"] is True and data["command"].endswith("--out " + str(out))
    rows = data["rows"]
    # Per persistent tier: device + host alone, then 2 sizes x the write policies (the hybrid's variant too).
    assert len(rows) == 2 * (1 + 2 * (len(WRITE_POLICIES) + len(WRITE_POLICY_VARIANTS)))
    assert {r["workload"] for r in rows} == {"chat"} and {r["lower_tier"] for r in rows} == {"disk", "redis"}
    for r in rows:
        f = r["figures"]
        assert 0.0 <= f["share"]["min"] <= f["share"]["mean"] <= 1.0 + 1e-9, r
        assert f["device"]["mean"] + f["host"]["mean"] + f["lower"]["mean"] == pytest.approx(f["share"]["mean"])
    for policy in ("write-through", *HYBRIDS):
        unbounded = [r for r in rows if r["lower_capacity"] == "unbounded" and r["write_policy"] == policy]
        assert [r["figures"]["share"]["mean"] for r in unbounded] == [1.0, 1.0]
    table = capsys.readouterr().out
    assert table.startswith("| workload | below host | write policy | hits / unbounded |")
    assert table.count("\n") == len(rows) + 2  # a header, its rule, a line per row
