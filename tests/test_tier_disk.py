"""The disk tier: round trips, restart, isolation, budget and LRU, pins, corruption, crash leftovers, I/O errors,
integrity checks and a concurrent writer."""

from __future__ import annotations

import errno
import os
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch

from promptcache.cache.hashing import block_hash, root_hash
from promptcache.cache.tiers import format as fmt
from promptcache.cache.tiers.base import BlockEntry, KVLayout
from promptcache.cache.tiers.disk import DiskTier

SHAPE = (2, 2, 4, 2, 8)
F32 = KVLayout("fp-test", torch.float32, SHAPE, 4)
BF16 = KVLayout("fp-test", torch.bfloat16, SHAPE, 4)


def make_entries(layout: KVLayout, n: int, seed: int = 0) -> list[BlockEntry]:
    """A chain of ``n`` blocks with real addresses and random KV."""
    gen = torch.Generator().manual_seed(seed)
    parent = root_hash(layout.fingerprint, layout.dtype_name, f"ns{seed}")
    out = []
    for i in range(n):
        tokens = tuple(range(i * 4 + seed * 1000, i * 4 + seed * 1000 + 4))
        h = block_hash(parent, tokens)
        out.append(BlockEntry(h, parent, tokens, torch.randn(SHAPE, generator=gen).to(layout.dtype)))
        parent = h
    return out


def entry_size(e: BlockEntry, layout: KVLayout = F32) -> int:
    return len(fmt.encode_header(e, layout)) + layout.nbytes


def entry_path(tier: DiskTier, e: BlockEntry) -> Path:
    x = e.block_hash.hex()
    return tier.root / x[:2] / f"{x}.kv"


def hashes(entries: list[BlockEntry]) -> list[bytes]:
    return [e.block_hash for e in entries]


@pytest.mark.parametrize("layout", [F32, BF16], ids=["float32", "bfloat16"])
def test_store_then_load_returns_equal_tensors(tmp_path, layout):
    tier = DiskTier(layout, tmp_path, 1 << 20)
    entries = make_entries(layout, 3)
    assert tier.store(entries) == 3
    assert tier.contains(hashes(entries)) == [True] * 3
    for e, kv in zip(entries, tier.load(hashes(entries))):
        assert kv is not None and kv.dtype == layout.dtype and torch.equal(kv, e.kv)
    assert entry_path(tier, entries[0]).parent.parent.name == f"fp-test-{layout.dtype_name}-bs4"
    c = tier.counters
    assert (c.hits, c.misses, c.stores, c.read_latency.count, c.write_latency.count) == (3, 0, 3, 1, 3)
    assert c.bytes_written == c.bytes_read == tier.size_bytes() == sum(entry_size(e, layout) for e in entries)
    assert tier.store(entries[:1]) == 0 and c.store_skipped == 1


def test_restart_finds_and_loads_entries(tmp_path):
    entries = make_entries(F32, 4)
    DiskTier(F32, tmp_path, 1 << 20).store(entries)
    tier = DiskTier(F32, tmp_path, 1 << 20)
    assert tier.num_entries() == 4 and tier.size_bytes() == sum(map(entry_size, entries))
    for e, kv in zip(entries, tier.load(hashes(entries))):
        assert kv is not None and torch.equal(kv, e.kv)


def test_other_fingerprint_sees_nothing(tmp_path):
    entries = make_entries(F32, 2)
    DiskTier(F32, tmp_path, 1 << 20).store(entries)
    other = DiskTier(KVLayout("fp-other", torch.float32, SHAPE, 4), tmp_path, 1 << 20)
    assert other.num_entries() == 0 and other.contains(hashes(entries)) == [False, False]
    assert other.load(hashes(entries)) == [None, None]
    assert DiskTier(F32, tmp_path, 1 << 20).num_entries() == 2  # and it did not disturb the first model's


def test_budget_and_lru_order(tmp_path):
    a, b, c, d = make_entries(F32, 4)
    cap = sum(map(entry_size, (a, b, c))) + 10  # room for three
    tier = DiskTier(F32, tmp_path, cap)
    tier.store([a, b, c])
    tier.load([a.block_hash])  # a is now the most recently used: b is the oldest
    tier.store([d])
    assert tier.contains(hashes([a, b, c, d])) == [True, False, True, True]
    assert not entry_path(tier, b).exists() and tier.counters.evictions == 1
    tier.touch([c.block_hash])  # c used after a: a goes next
    tier.store([b])
    assert tier.contains(hashes([a, b, c, d])) == [False, True, True, True]
    assert tier.size_bytes() <= cap and tier.check_integrity() == []


def test_restart_with_smaller_budget_evicts_oldest_mtime(tmp_path):
    entries = make_entries(F32, 4)
    first = DiskTier(F32, tmp_path, 1 << 20)
    first.store(entries)
    for i, e in enumerate(reversed(entries)):  # entries[0] is the newest by mtime
        os.utime(entry_path(first, e), ns=(10**18 + i, 10**18 + i))
    tier = DiskTier(F32, tmp_path, entry_size(entries[0]) + entry_size(entries[1]) + 10)
    assert tier.contains(hashes(entries)) == [True, True, False, False]
    assert tier.counters.evictions == 2 and tier.check_integrity() == []


def test_pinned_entries_are_not_evicted_and_full_store_is_skipped(tmp_path):
    a, b, c, d = make_entries(F32, 4)
    a.pin_until = time.time() + 60
    tier = DiskTier(F32, tmp_path, entry_size(a) + entry_size(b) + 10)  # room for two
    tier.store([a, b])
    assert tier.store([c]) == 1  # a is the oldest but pinned: b goes
    assert tier.contains(hashes([a, b, c])) == [True, False, True]
    tier.pin([c.block_hash], time.time() + 60)
    assert tier.store([d]) == 0  # both pinned: no room, nothing evicted
    assert tier.counters.errors == {"full": 1} and tier.contains(hashes([a, c, d])) == [True, True, False]


def _flip_kv_byte(path: Path, a: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x40
    path.write_bytes(bytes(data))


def _foreign_fingerprint(path: Path, a: Path) -> None:
    e = make_entries(F32, 2)[1]
    path.write_bytes(fmt.encode(e, KVLayout("fp-foreign", torch.float32, SHAPE, 4)))


CORRUPTIONS = {
    "flipped_kv_byte": _flip_kv_byte,
    "truncated": lambda path, a: path.write_bytes(path.read_bytes()[:-10]),
    "other_address": lambda path, a: shutil.copyfile(a, path),
    "foreign_fingerprint": _foreign_fingerprint,
    "garbage": lambda path, a: path.write_bytes(os.urandom(200)),
}


@pytest.mark.parametrize("damage", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_corrupt_entry_is_counted_miss_and_removed(tmp_path, damage):
    a, b = make_entries(F32, 2)
    tier = DiskTier(F32, tmp_path, 1 << 20)
    tier.store([a, b])
    damage(entry_path(tier, b), entry_path(tier, a))
    kv_a, kv_b = tier.load(hashes([a, b]))
    assert kv_b is None and kv_a is not None and torch.equal(kv_a, a.kv)
    assert tier.counters.errors == {"corrupt": 1} and (tier.counters.hits, tier.counters.misses) == (1, 1)
    assert not entry_path(tier, b).exists() and tier.contains([b.block_hash]) == [False]
    assert tier.check_integrity(deep=True) == []


def test_leftover_tmp_removed_at_start_and_strangers_left_alone(tmp_path):
    (a,) = make_entries(F32, 1)
    tier = DiskTier(F32, tmp_path, 1 << 20)
    tier.store([a])
    fan = entry_path(tier, a).parent
    tmp = fan / f".{a.block_hash.hex()}.123.456.tmp"
    tmp.write_bytes(b"half a write")
    strangers = [fan / "notes.kv", fan / ("z" * 64 + ".kv"), tier.root / "README"]
    for p in strangers:
        p.write_bytes(b"not ours")
    tier = DiskTier(F32, tmp_path, 1 << 20)
    assert not tmp.exists() and all(p.exists() for p in strangers)
    assert tier.num_entries() == 1 and tier.check_integrity(deep=True) == []


def test_store_into_uncreatable_directory_is_counted(tmp_path):
    (tmp_path / "file").write_bytes(b"")
    tier = DiskTier(F32, tmp_path / "file" / "cache", 1 << 20)  # a regular file where a directory should be
    assert not tier.available
    assert tier.store(make_entries(F32, 2)) == 0 and tier.counters.errors.get("unavailable") == 2
    assert tier.num_entries() == 0 and tier.load([b"\0" * 32]) == [None]


def test_store_into_removed_directory_is_counted(tmp_path):
    tier = DiskTier(F32, tmp_path, 1 << 20)
    shutil.rmtree(tier.root)
    assert tier.store(make_entries(F32, 2)) == 0
    assert sum(tier.counters.errors.get(k, 0) for k in ("io", "unavailable")) == 2
    assert tier.num_entries() == tier.size_bytes() == 0 and not tier.root.exists()  # not recreated


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_store_into_read_only_directory_is_counted(tmp_path):
    tier = DiskTier(F32, tmp_path, 1 << 20)
    tier.root.chmod(0o555)
    try:
        assert tier.store(make_entries(F32, 2)) == 0 and tier.num_entries() == 0
    finally:
        tier.root.chmod(0o755)


@pytest.mark.parametrize(("code", "kind"), [(errno.ENOSPC, "disk_full"), (errno.EACCES, "io")])
def test_write_error_is_counted_and_temp_removed(tmp_path, monkeypatch, code, kind):
    a, b = make_entries(F32, 2)
    tier = DiskTier(F32, tmp_path, 1 << 20)
    real_replace = os.replace

    def failing_replace(src, dst):
        if Path(dst).name.startswith(a.block_hash.hex()):
            raise OSError(code, os.strerror(code))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    assert tier.store([a, b]) == 1  # a fails, the call goes on with b
    assert tier.counters.errors == {kind: 1} and tier.contains(hashes([a, b])) == [False, True]
    assert not list(tier.root.rglob("*.tmp")) and tier.check_integrity(deep=True) == []


def test_integrity_after_mixed_operations_and_file_deleted_behind_back(tmp_path):
    entries = make_entries(F32, 8)
    tier = DiskTier(F32, tmp_path, sum(map(entry_size, entries[:5])))
    tier.store(entries[:4])
    tier.load(hashes(entries[:2]))
    tier.touch([entries[3].block_hash])
    tier.store(entries[4:])  # evicts
    assert tier.evict([entries[7].block_hash]) == 1
    tier.store(entries[:2])
    assert tier.counters.evictions > 0 and tier.check_integrity(deep=True) == []
    victim = next(e for e in entries if tier.contains([e.block_hash])[0])
    entry_path(tier, victim).unlink()
    problems = tier.check_integrity()
    assert len(problems) == 1 and victim.block_hash.hex() in problems[0]
    n = tier.num_entries()
    assert tier.clear() == n
    assert tier.num_entries() == 0 and not list(tier.root.rglob("*.kv"))


def test_concurrent_store_and_load_never_return_wrong_data(tmp_path):
    entries = make_entries(F32, 300, seed=1)
    tier = DiskTier(F32, tmp_path, sum(map(entry_size, entries[:50])))  # evictions happen during the run
    writer = threading.Thread(target=lambda: [tier.store(entries[i : i + 10]) for i in range(0, 300, 10)])
    writer.start()
    seen = 0
    while writer.is_alive() or seen == 0:
        window = entries[max(0, tier.counters.stores - 40) : tier.counters.stores + 5]
        for e, kv in zip(window, tier.load(hashes(window))):
            assert kv is None or torch.equal(kv, e.kv)
            seen += kv is not None
    writer.join()
    assert seen > 0 and tier.counters.errors == {} and tier.check_integrity(deep=True) == []
