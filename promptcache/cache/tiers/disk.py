"""The local-disk tier: one file per block, written crash-safely (temporary name, then an atomic rename).

Entries live in ``<directory>/<fingerprint[:16]>-<dtype>-bs<block_size>/<hex[:2]>/<hex>.kv`` (``format`` entries:
JSON header + raw KV bytes), so models sharing a directory never see each other's entries, a restart rebuilds the
index from the listing alone, and every load re-verifies what it reads (a bad file is a counted miss, then deleted).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch

from promptcache.cache.hashing import BlockHash
from promptcache.cache.tiers import format as fmt
from promptcache.cache.tiers.base import BlockEntry, KVLayout, Tier

_ENTRY_NAME = re.compile(r"[0-9a-f]{64}\.kv")


class DiskTier(Tier):
    """KV blocks as files in a local directory, within a byte budget; the least recently used go first."""

    name = "disk"

    def __init__(self, layout: KVLayout, directory: str | Path, capacity_bytes: int, fsync: bool = False):
        """Open (creating it if needed) this model's subdirectory of ``directory`` and index what it holds.

        Leftover temporary files of a crashed writer are deleted; files not named like an entry are left alone;
        entries beyond ``capacity_bytes`` are evicted, oldest modification time first. Never raises on I/O errors:
        a directory that cannot be created or read leaves the tier empty (and unavailable if it does not exist).
        """
        super().__init__(layout)
        self.root = Path(directory) / f"{layout.fingerprint[:16]}-{layout.dtype_name}-bs{layout.block_size}"
        self._capacity = int(capacity_bytes)
        self._fsync = fsync
        self._lock = threading.Lock()  # guards the index, pins, sizes and counters (never held during a write)
        self._index: OrderedDict[BlockHash, int] = OrderedDict()  # address -> file size, least recently used first
        self._pins: dict[BlockHash, float] = {}  # address -> keep until (time.time() seconds)
        self._size = 0  # bytes of the indexed files
        self._reserved = 0  # bytes of stores being written: counted against the budget before they land
        self._avail = (float("-inf"), False)  # (monotonic time of the last check, result)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            for _, h, size in sorted(self._listing(remove_tmp=True)):  # oldest mtime first: LRU order survives
                self._index[h] = size
                self._size += size
        except OSError:
            self.counters.error("io")
        with self._lock:
            self._make_room(0)  # a smaller budget than last time (or a full directory): evict down to it

    # -- helpers (callers hold the lock unless said otherwise) --

    def _path(self, h: BlockHash) -> Path:
        x = h.hex()
        return self.root / x[:2] / f"{x}.kv"

    def _listing(self, remove_tmp: bool) -> list[tuple[int, BlockHash, int]]:
        """(mtime_ns, address, size) of every entry file on disk; optionally deletes leftover ``*.tmp`` files."""
        found = []
        with os.scandir(self.root) as subdirs:
            for sub in subdirs:
                if not sub.is_dir(follow_symlinks=False):
                    continue
                with os.scandir(sub.path) as files:
                    for f in files:
                        if f.name.endswith(".tmp"):
                            if remove_tmp:  # only at start: a live writer's temp file is never ours to delete
                                with contextlib.suppress(OSError):
                                    os.unlink(f.path)
                        elif _ENTRY_NAME.fullmatch(f.name) and f.name.startswith(sub.name) and f.is_file():
                            st = f.stat()
                            found.append((st.st_mtime_ns, bytes.fromhex(f.name[:64]), st.st_size))
        return found

    @staticmethod
    def _read(path: Path) -> memoryview:
        """The whole file in one read, into a writable buffer (decoded tensors are views of it)."""
        with open(path, "rb", buffering=0) as f:
            buf = bytearray(os.fstat(f.fileno()).st_size)
            return memoryview(buf)[: f.readinto(buf) or 0]

    def _remove(self, h: BlockHash) -> bool:
        """Drop an entry from the index and delete its file (under the lock, so a store cannot interleave)."""
        size = self._index.pop(h, None)
        self._pins.pop(h, None)
        if size is None:
            return False
        self._removed((h,))
        self._size -= size
        try:
            self._path(h).unlink(missing_ok=True)
        except OSError:
            self.counters.error("io")
        return True

    def _make_room(self, need: int) -> bool:
        """Evict least recently used unpinned entries until ``need`` more bytes fit; evict nothing if they can't."""
        excess = self._size + self._reserved + need - self._capacity
        now, victims = time.time(), []
        for h, size in self._index.items():
            if excess <= 0:
                break
            if self._pins.get(h, 0.0) <= now:
                victims.append(h)
                excess -= size
        if excess > 0:
            return False
        for h in victims:
            self._remove(h)
        self.counters.evictions += len(victims)
        return True

    # -- the Tier interface --

    @property
    def available(self) -> bool:
        """The model's directory exists and is writable (checked at most once a second)."""
        checked, ok = self._avail
        now = time.monotonic()
        if now - checked >= 1.0:
            ok = self.root.is_dir() and os.access(self.root, os.W_OK)
            self._avail = (now, ok)
        return ok

    def contains(self, hashes: Sequence[BlockHash]) -> list[bool]:
        """Which blocks are indexed (no I/O: a file lost since is found out, and forgotten, by ``load``)."""
        with self._lock:
            return [h in self._index for h in hashes]

    def load(self, hashes: Sequence[BlockHash]) -> list[torch.Tensor | None]:
        """Read and verify each block (tensors are views of the read buffers); anything wrong is a miss."""
        t0 = time.perf_counter()
        out = [self._load_one(h) for h in hashes]
        hits = sum(kv is not None for kv in out)
        with self._lock:
            self.counters.hits += hits
            self.counters.misses += len(out) - hits
        self.counters.read_latency.observe(time.perf_counter() - t0)
        return out

    def _load_one(self, h: BlockHash) -> torch.Tensor | None:
        with self._lock:
            if h not in self._index:
                return None
        path = self._path(h)
        try:
            buf = self._read(path)
            kv = fmt.decode(buf, self.layout, expected=h).kv
        except FileNotFoundError:  # deleted behind our back
            with self._lock:
                self._remove(h)
            return None
        except OSError:
            with self._lock:
                self.counters.error("io")
            return None
        except Exception:  # CorruptEntry, or anything else a damaged file provokes: never serve it, never raise
            with self._lock:
                self.counters.error("corrupt")
                self._remove(h)
            return None
        with self._lock:
            self.counters.bytes_read += len(buf)
            if h in self._index:
                self._index.move_to_end(h)
        with contextlib.suppress(OSError):
            os.utime(path)  # the mtime is the last use a restart orders the index by
        return kv

    def store(self, entries: Sequence[BlockEntry]) -> int:
        """Write the entries not yet present, each visible once renamed into place; returns how many were written.

        Room is made by evicting least recently used unpinned entries; an entry that cannot fit is skipped
        ("full"), an I/O error skips it too ("io", "disk_full"), and the call goes on with the next.
        """
        if not self.available:
            with self._lock:
                self.counters.error("unavailable", len(entries))
            return 0
        return sum(self._store_one(e) for e in entries)

    def _store_one(self, e: BlockEntry) -> int:
        c, lay = self.counters, self.layout
        if e.kv.dtype != lay.dtype or tuple(e.kv.shape) != lay.shape or e.kv.device.type != "cpu":
            with self._lock:
                c.error("invalid")
            return 0
        header = fmt.encode_header(e, lay)
        size = len(header) + lay.nbytes
        with self._lock:
            if e.block_hash in self._index:
                c.store_skipped += 1
                return 0
            if not self._make_room(size):
                c.error("full")
                return 0
            self._reserved += size
        t0 = time.perf_counter()
        final = self._path(e.block_hash)
        tmp = final.with_name(f".{e.block_hash.hex()}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            # Not parents=True: a vanished root (an unmounted disk) must not be recreated underneath it.
            with contextlib.suppress(FileExistsError):
                final.parent.mkdir()
            with open(tmp, "wb") as f:  # two large writes: the header, then the KV bytes
                f.write(header)
                f.write(fmt.kv_bytes(e.kv))
                if self._fsync:
                    f.flush()
                    os.fsync(f.fileno())
            with self._lock:  # rename and index together, so evict/clear never see one without the other
                os.replace(tmp, final)
                self._reserved -= size
                self._size += size - self._index.pop(e.block_hash, 0)
                self._index[e.block_hash] = size
                self._stored((e.block_hash,))
                if e.pin_until > 0:
                    self._pins[e.block_hash] = max(self._pins.get(e.block_hash, 0.0), e.pin_until)
                c.stores += 1
                c.bytes_written += size
        except OSError as err:
            with self._lock:
                self._reserved -= size
                c.error("disk_full" if err.errno == errno.ENOSPC else "io")
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            return 0
        c.write_latency.observe(time.perf_counter() - t0)
        return 1

    def touch(self, hashes: Sequence[BlockHash]) -> None:
        """Mark present blocks as just used, so making room evicts them last."""
        with self._lock:
            for h in hashes:
                if h in self._index:
                    self._index.move_to_end(h)

    def pin(self, hashes: Sequence[BlockHash], until: float) -> None:
        """Keep present blocks until ``until`` (time.time() seconds) at least; an earlier pin is extended."""
        with self._lock:
            for h in hashes:
                if h in self._index:
                    self._pins[h] = max(self._pins.get(h, 0.0), until)

    def evict(self, hashes: Sequence[BlockHash]) -> int:
        """Drop these entries (pinned or not) where present; returns how many were dropped."""
        with self._lock:
            return sum(self._remove(h) for h in hashes)

    def clear(self) -> int:
        """Delete every entry file of this model's subdirectory; returns how many indexed entries were dropped."""
        with self._lock:
            n = len(self._index)
            for h in list(self._index):
                self._remove(h)
            try:  # entries on disk but not indexed (another process's) go too
                for _, h, _ in self._listing(remove_tmp=False):
                    self._path(h).unlink(missing_ok=True)
            except OSError:
                self.counters.error("io")
            self._cleared()
            return n

    def addresses(self) -> list[BlockHash]:
        with self._lock:
            return list(self._index)

    def num_entries(self) -> int:
        """Entries indexed now."""
        with self._lock:
            return len(self._index)

    def size_bytes(self) -> int:
        """Bytes of the indexed files (headers included)."""
        with self._lock:
            return self._size

    def capacity_bytes(self) -> int:
        """The byte budget, never exceeded."""
        return self._capacity

    def check_integrity(self, deep: bool = False) -> list[str]:
        """Index vs directory (addresses, sizes), size sum and budget; ``deep`` also decodes every entry."""
        problems: list[str] = []
        with self._lock:  # index and listing at one instant (stores rename under this lock); a rare diagnostic
            index, size = dict(self._index), self._size
            try:
                disk = {h: sz for _, h, sz in self._listing(remove_tmp=False)}
            except OSError as err:
                return [f"cannot list {self.root}: {err}"]
        problems += [f"{h.hex()}: indexed, no file" for h in index.keys() - disk.keys()]
        problems += [f"{h.hex()}: file not indexed" for h in disk.keys() - index.keys()]
        problems += [
            f"{h.hex()}: indexed size {index[h]}, file size {disk[h]}"
            for h in index.keys() & disk.keys()
            if index[h] != disk[h]
        ]
        if sum(index.values()) != size:
            problems.append(f"index sizes sum to {sum(index.values())}, size_bytes is {size}")
        if size > self._capacity:
            problems.append(f"size {size} exceeds the budget {self._capacity}")
        for h in sorted(index.keys() & disk.keys()) if deep else ():
            try:
                fmt.decode(self._read(self._path(h)), self.layout, expected=h)
            except FileNotFoundError:
                continue  # removed since the snapshot (evicted or found corrupt by a load)
            except Exception as err:
                problems.append(f"{h.hex()}: {err}")
        return problems

    def close(self) -> None:
        """Nothing is held open between calls; the entries stay on disk for the next start."""
