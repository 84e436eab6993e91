"""Content addresses for KV blocks: a cryptographic hash chain rooted in model, dtype and namespace.

``root = H(model fingerprint, dtype, namespace)`` and ``hash(block i) = H(hash(block i-1), tokens of block i)``.
The same address names a block on every tier and replica. A collision would serve one user another user's KV,
so H is BLAKE2b with a 256-bit digest, never Python's ``hash``.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from hashlib import blake2b

BlockHash = bytes

_DIGEST_SIZE = 32
_ROOT_PERSON = b"pc-root"
_BLOCK_PERSON = b"pc-block"
_TAIL_PERSON = b"pc-tail"


def root_hash(model_fingerprint: str, dtype: str, namespace: str) -> BlockHash:
    """The chain's root: blocks of different models, dtypes or namespaces (tenant + cache_salt) never meet."""
    h = blake2b(digest_size=_DIGEST_SIZE, person=_ROOT_PERSON)
    for part in (model_fingerprint, dtype, namespace):
        data = part.encode()
        # Length-prefix each field so ("ab", "c") and ("a", "bc") cannot collide.
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.digest()


def block_hash(parent: BlockHash, token_ids: Sequence[int]) -> BlockHash:
    """The address of a full block, given its parent's address and its tokens."""
    h = blake2b(parent, digest_size=_DIGEST_SIZE, person=_BLOCK_PERSON)
    h.update(array("q", token_ids).tobytes())
    return h.digest()


def tail_hash(parent: BlockHash, token_ids: Sequence[int]) -> BlockHash:
    """The address of a partial block (a finished sequence's last, under-full block) after ``parent``: never equal
    to a full block's address, so a lookup of full blocks cannot find it."""
    h = blake2b(parent, digest_size=_DIGEST_SIZE, person=_TAIL_PERSON)
    h.update(array("q", token_ids).tobytes())
    return h.digest()


def chain_hashes(
    root: BlockHash, token_ids: Sequence[int], block_size: int, start: int = 0, parent: BlockHash | None = None
) -> list[BlockHash]:
    """Hashes of the full blocks of ``token_ids`` from block index ``start`` on (``parent`` is block start-1's)."""
    prev = root if parent is None else parent
    out: list[BlockHash] = []
    for i in range(start, len(token_ids) // block_size):
        prev = block_hash(prev, token_ids[i * block_size : (i + 1) * block_size])
        out.append(prev)
    return out
