"""The self-describing entry format shared by the disk and Redis tiers (no pickle: a JSON header and raw bytes).

    b"PCKV" | version (u16 LE) | header length (u32 LE) | header (JSON, UTF-8) | KV bytes

The header names the block's address, its parent's address and its tokens (so ``block_hash(parent, tokens)``
re-derives the address), the model fingerprint, dtype, shape, block size, the KV byte count and a CRC-32 of the
KV bytes. ``decode`` checks every field against what the reader expects and raises ``CorruptEntry`` naming the
first mismatch, so a stale, foreign, truncated or flipped entry can only ever be a miss.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass

import torch

from promptcache.cache.hashing import BlockHash, block_hash
from promptcache.cache.tiers.base import BlockEntry, KVLayout

MAGIC = b"PCKV"
VERSION = 1
_PREFIX = struct.Struct("<4sHI")  # magic, version, header length


class CorruptEntry(ValueError):
    """An entry that must not be loaded; the message says why (counted as a "corrupt" tier error)."""


@dataclass(frozen=True)
class DecodedEntry:
    block_hash: BlockHash
    parent_hash: BlockHash
    token_ids: tuple[int, ...]
    kv: torch.Tensor  # a view of the buffer it was decoded from


def kv_bytes(kv: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor, without a copy (bfloat16 included)."""
    flat = kv.contiguous().view(-1).view(torch.uint8)
    return memoryview(flat.numpy())


def encode_header(entry: BlockEntry, layout: KVLayout) -> bytes:
    """The magic, version, length and JSON header of an entry (its KV bytes follow)."""
    data = kv_bytes(entry.kv)
    header = json.dumps(
        {
            "address": entry.block_hash.hex(),
            "parent": entry.parent_hash.hex(),
            "tokens": list(entry.token_ids),
            "fingerprint": layout.fingerprint,
            "dtype": layout.dtype_name,
            "shape": list(layout.shape),
            "block_size": layout.block_size,
            "nbytes": data.nbytes,
            "crc32": zlib.crc32(data),
        },
        separators=(",", ":"),
    ).encode()
    return _PREFIX.pack(MAGIC, VERSION, len(header)) + header


def encode(entry: BlockEntry, layout: KVLayout) -> bytes:
    """One entry as a single bytes value (header then KV): what Redis stores."""
    return b"".join((encode_header(entry, layout), kv_bytes(entry.kv)))


def read_header(buf: bytes | memoryview) -> tuple[dict[str, object], int]:
    """The header of an encoded entry and the offset where its KV bytes start; CorruptEntry if unreadable."""
    if len(buf) < _PREFIX.size:
        raise CorruptEntry(f"entry is {len(buf)} bytes, shorter than its fixed prefix")
    magic, version, hlen = _PREFIX.unpack_from(buf, 0)
    if magic != MAGIC:
        raise CorruptEntry("not a promptcache KV entry (bad magic)")
    if version != VERSION:
        raise CorruptEntry(f"entry format version {version}, this server reads {VERSION}")
    end = _PREFIX.size + hlen
    if len(buf) < end:
        raise CorruptEntry("entry truncated inside its header")
    try:
        header = json.loads(bytes(buf[_PREFIX.size : end]))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CorruptEntry(f"unreadable header: {err}") from err
    if not isinstance(header, dict):
        raise CorruptEntry("header is not a JSON object")
    return header, end


def decode(buf: bytes | memoryview, layout: KVLayout, expected: BlockHash | None = None) -> DecodedEntry:
    """Verify an encoded entry against ``layout`` (and its address against ``expected``) and view its KV."""
    header, offset = read_header(buf)
    try:
        address = bytes.fromhex(str(header["address"]))
        parent = bytes.fromhex(str(header["parent"]))
        tokens = tuple(int(t) for t in header["tokens"])  # type: ignore[attr-defined]
        checks = (
            ("fingerprint", header["fingerprint"], layout.fingerprint),
            ("dtype", header["dtype"], layout.dtype_name),
            ("shape", list(header["shape"]), list(layout.shape)),  # type: ignore[call-overload]
            ("block_size", header["block_size"], layout.block_size),
            ("nbytes", header["nbytes"], layout.nbytes),
        )
        crc = int(header["crc32"])  # type: ignore[call-overload]
    except (KeyError, TypeError, ValueError) as err:
        raise CorruptEntry(f"header field missing or malformed: {err}") from err
    if expected is not None and address != expected:
        raise CorruptEntry(f"entry holds address {address.hex()[:16]}, expected {expected.hex()[:16]}")
    for name, got, want in checks:
        if got != want:
            raise CorruptEntry(f"{name} mismatch: entry has {got!r}, this server has {want!r}")
    if len(tokens) != layout.block_size or block_hash(parent, tokens) != address:
        raise CorruptEntry("the header's parent and tokens do not hash to its address")
    data = memoryview(buf)[offset:]
    if len(data) != layout.nbytes:
        raise CorruptEntry(f"entry has {len(data)} KV bytes, expected {layout.nbytes} (truncated or padded)")
    if zlib.crc32(data) != crc:
        raise CorruptEntry("checksum mismatch: the KV bytes are damaged")
    if data.readonly:  # torch views only writable memory without a warning; a copy costs less than the read
        data = memoryview(bytearray(data))
    kv = torch.frombuffer(data, dtype=layout.dtype).view(layout.shape) if len(data) else torch.empty(layout.shape)
    return DecodedEntry(address, parent, tokens, kv)
