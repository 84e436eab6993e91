"""Property tests of the prompt cache: random sequences of cache operations, every invariant checked after every step.

Three hypothesis state machines drive the real classes (no fakes, no mocks: a real ``KVCacheManager`` and
``BlockPool``, a real ``TierStack`` with a ``HostTier``, a ``DiskTier`` in a temporary directory and a ``RedisTier``
on a real redis-server) beside a small reference model, at toy sizes (8 device blocks of 4 tokens, 4 host slots,
10 disk entries, 64 bytes of KV per block) so that a step takes a few milliseconds at most. The KV of a block is a
function of its address (``kv_of``): every block read from the device or any tier is compared with it byte for byte.

``DevicePoolMachine``: the device pool and its prefix cache.
    Rules: admit a request (prefix match, allocate its blocks; maybe prefill at once), a conversation's next turn or
    the same prompt again (after a request ended), run an engine step of a request (prefill, or decode sampled or
    greedy tokens: KV written, full blocks committed under their chained addresses), free it (the request ends), evict
    (another allocation takes idle cached blocks), pin a request's first blocks with a TTL, advance the pool's clock
    (pins expire; arrivals move it too), reset (forget every idle cached block).
    Invariants, after every step:
    - free + cached + in-use blocks add up to the pool, and each count matches the blocks' own states;
    - a block's ref count is the number of running requests whose block table holds it (never negative); an
      allocation never hands out a block a request holds, nor one under an unexpired pin;
    - every registered address maps to exactly one block and back, and the KV events told say the same;
    - every registered block holds, byte for byte, the KV computed for its address; every running request reads,
      in each block it computed or got from the cache, exactly its own KV, from the cache's one block for that
      address (a hit of another namespace or chain, or a second private copy, shows here: caching bugs are silent);
    - a prefix match is the longest registered run of the prompt's own chain, capped to leave one token to compute;
      an admission or a growth is refused exactly when the pool has too few blocks to give (idle, unpinned);
    - chains are evicted from their end: a registered block's parent is registered too;
    - pins: at most half the pool, held until their deadline and not after it; a hit renews a pin for the TTL of
      the pins on it (not of an expired one); a pinned block is never evicted; ``num_available`` is exact;
    - when no request runs, no block is in use (and at the end of every run, once all are freed).

``TieredCacheMachine``: the same pool and requests with the three tiers below it.
    More rules: demotion happens through device eviction (host write-back, disk re-write); promotion through admission
    (a prefix lookup that continues into host, disk and Redis and loads what it finds); pins reach the tiers (with
    wall-clock TTLs, some short enough to expire during a run); explicit evict or clear of one tier; reset of the
    device alone, with the local tiers, or with Redis too; restart (a new stack on the same disk directory and Redis).

``TierStackMachine``: the tier stack alone, driven as the cache manager drives it, over a few chains of blocks.
    Rules: compute a block into a device block (write-through), evict a device block (write-back, then the block is
    overwritten at once), load a chain (lookup, allocation that spills, load), pin, clear the stack, drop from a tier.

Both tier machines check, after every step (with the tier writer flushed):
    - every tier's own ``check_integrity`` finds no problem (``deep`` too, at the end of each run);
    - every entry of every tier holds, byte for byte, the KV computed for its address (disk and Redis: with its
      parent and tokens); a block loaded from a tier into the device holds exactly that KV;
    - the disk's files are exactly what it reports holding (addresses, sizes, total, within its budget), with no
      temporary file left behind; host slots and Redis keys are accounted for likewise; KV events match each tier;
    - a prefix lookup finds the longest run the tiers hold, each block from the first tier holding it, and the blocks
      it finds in the host are always loaded;
    - an entry pinned in a tier is not evicted for room before its pin expires;
    - a block the device evicts lands in the host (unless the host had to make room or refused), and on the disk
      (write-back) unless the disk made room, refused, or the write queue dropped it; a block computed for the first
      time since the stack was cleared is written through to disk and Redis; an evicted block never sent down since
      then goes to Redis too; a block found only in Redis is copied to the disk.

The runs are derandomized (the same sequences on every run; no example database written into the checkout);
``pytest -s`` prints how many steps each machine ran.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import redis
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
    run_state_machine_as_test,
)

from promptcache.cache.block_pool import Block, BlockPool
from promptcache.cache.events import DEVICE
from promptcache.cache.hashing import BlockHash, chain_hashes, root_hash
from promptcache.cache.manager import KVCacheManager, SeqBlocks
from promptcache.cache.tiers import format as fmt
from promptcache.cache.tiers.base import BlockEntry, KVLayout, Tier
from promptcache.cache.tiers.disk import DiskTier
from promptcache.cache.tiers.host import HostTier
from promptcache.cache.tiers.redis_tier import RedisTier
from promptcache.cache.tiers.stack import TierOptions, TierPlan, TierStack

BS = 4
NUM_BLOCKS = 8
MAX_PINNED = NUM_BLOCKS // 2  # the pool's default cap: pins never hold more than half of it
SHAPE = (1, 2, BS, 1, 2)  # [layers, K/V, block_size, kv_heads, head_dim]: 16 floats, 64 bytes a block
DTYPE_NAME = "float32"
LAYOUT = KVLayout("fp-cache-properties", torch.float32, SHAPE, BS)
NAMESPACES = ("alice", "alice", "bob")  # mostly one tenant (hits), sometimes another (isolation)
# Prompts are made of block-sized words: a document (a prefix of one of a few word chains), maybe one more word,
# then a partial block. Most prompts share their head with others, so hits, shared blocks, concurrent computations
# of one block and evictions of popular chains are all frequent.
WORDS = ((1, 2, 3, 4), (5, 6, 7, 8), (9, 10, 11, 12))
DOCS = ((0, 1, 2), (0, 2, 1), (1, 0, 0))
ROOTS = {root_hash(LAYOUT.fingerprint, DTYPE_NAME, ns) for ns in NAMESPACES}  # the parents of chains' first blocks
TOKEN = st.integers(1, 12)
ARRIVAL_GAP = 1.0  # clock seconds between two arrivals (more pass in ``advance_clock``)
MAX_TOKENS = 7 * BS  # a request never outgrows 7 of the 8 device blocks
HOST_SLOTS = 4
DISK_ENTRIES = 10
# The largest entry a disk file can be (two-digit tokens make the longest JSON header).
ENTRY_BYTES = len(fmt.encode_header(BlockEntry(bytes(32), bytes(32), (12,) * BS, torch.zeros(SHAPE)), LAYOUT))
ENTRY_BYTES += LAYOUT.nbytes
GB = 1 << 30

# Steps run per machine (rules executed, each followed by every invariant), for the report at the end.
STEPS: Counter[str] = Counter()
EXAMPLES: Counter[str] = Counter()


def _prompt(namespace: str, doc: int, depth: int, extra: list[int], tail: list[int]) -> tuple[str, list[int]]:
    return namespace, [t for w in (*DOCS[doc][:depth], *extra) for t in WORDS[w]] + tail


# (namespace, token ids): 4 to 19 tokens, the first 1 to 3 words of a document, maybe a word more, a partial block.
PROMPTS = st.builds(
    _prompt,
    st.sampled_from(NAMESPACES),
    st.integers(0, len(DOCS) - 1),
    st.integers(1, 3),
    st.lists(st.integers(0, len(WORDS) - 1), max_size=1),
    st.one_of(st.just([]), st.lists(TOKEN, min_size=1, max_size=3)),  # half of them end on a block boundary
)


def greedy(tokens: Sequence[int], n: int) -> list[int]:
    """The ``n`` tokens a greedy model would generate after ``tokens``: one at a time, each a function of the last
    few, so that the same conversation generates the same answer (and its blocks) again, however it is stepped."""
    out = list(tokens)
    for _ in range(n):
        out.append(sum((i + 1) * t for i, t in enumerate(out[-BS:])) % 12 + 1)
    return out[len(tokens) :]


def blocks_for(num_tokens: int) -> int:
    return -(-num_tokens // BS)


_KV: dict[BlockHash, torch.Tensor] = {}


def kv_of(h: BlockHash) -> torch.Tensor:
    """The KV that block ``h`` holds once computed: a function of its address alone, as real KV is a function of the
    tokens its address names. Every read of the cache, on any tier, is compared with it byte for byte."""
    kv = _KV.get(h)
    if kv is None:
        gen = torch.Generator().manual_seed(int.from_bytes(h[:8], "little"))
        kv = _KV[h] = torch.randn(SHAPE, generator=gen)
    return kv


def same_bytes(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Byte-exact equality (not ``allclose``: a cache hands back exactly what was written, or it is wrong)."""
    return (
        got.dtype == want.dtype
        and tuple(got.shape) == tuple(want.shape)
        and got.contiguous().numpy().tobytes() == want.contiguous().numpy().tobytes()
    )


def short(h: BlockHash) -> str:
    return h.hex()[:12]


class DeviceKV:
    """The device pool's KV memory, one ``SHAPE`` slab per block: the ``BlockIO`` that the model runner is in the
    engine (the runner itself needs a model; the cache only ever reads and writes whole blocks through this)."""

    def __init__(self, num_blocks: int) -> None:
        self.kv = torch.zeros((num_blocks, *SHAPE))

    def read_block(self, block_id: int) -> torch.Tensor:
        return self.kv[block_id]

    def write_block(self, block_id: int, kv: torch.Tensor) -> None:
        self.kv[block_id].copy_(kv)


class EventLog:
    """A KV-event listener, as the fleet's publisher is one: what each cache says it holds, and every removal in order.

    Called from the engine thread and the tier writer thread, so it locks; it never calls back into a cache."""

    def __init__(self) -> None:
        self.held: defaultdict[str, set[BlockHash]] = defaultdict(set)
        self.removals: list[tuple[str, BlockHash]] = []
        self._lock = threading.Lock()

    def stored(self, tier: str, hashes: Sequence[BlockHash]) -> None:
        with self._lock:
            self.held[tier].update(hashes)

    def removed(self, tier: str, hashes: Sequence[BlockHash]) -> None:
        with self._lock:
            self.held[tier].difference_update(hashes)
            self.removals.extend((tier, h) for h in hashes)

    def cleared(self, tier: str) -> None:
        with self._lock:
            self.held[tier].clear()

    def drain(self) -> list[tuple[str, BlockHash]]:
        with self._lock:
            out, self.removals = self.removals, []
            return out


@dataclass(eq=False)
class Request:
    """A running request as the engine keeps it: its tokens, its cache state, and how many tokens have KV."""

    rid: int
    namespace: str
    tokens: list[int]
    seq: SeqBlocks
    computed: int  # tokens whose KV is in the request's blocks (computed, or read from the cache)
    prompt_len: int  # the first tokens are the prompt, the rest were generated

    @property
    def chain(self) -> list[BlockHash]:
        """The addresses of the request's full blocks, computed here from the namespace (not from ``seq``)."""
        return chain_hashes(root_hash(LAYOUT.fingerprint, DTYPE_NAME, self.namespace), self.tokens, BS)

    def __repr__(self) -> str:
        return f"Request({self.rid}, {self.namespace}, {len(self.tokens)} tokens)"


class CountedMachine(RuleBasedStateMachine):
    """A state machine whose rules count the steps they run (``STEPS``)."""

    @property
    def name(self) -> str:
        return type(self).__name__

    def _step(self) -> None:
        STEPS[self.name] += 1


class DevicePoolMachine(CountedMachine):
    """The device pool and prefix cache under random requests; see the module docstring for what is checked."""

    requests = Bundle("requests")  # running requests
    finished = Bundle("finished")  # requests that ended: conversations whose next turn may come

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0  # the pool's clock: pins are set and expire on it
        self.next_rid = 0

    # ---- set-up ---------------------------------------------------------------------------------------------------
    @initialize(target=requests, policy=st.sampled_from(["lfu", "lru"]), first=PROMPTS)
    def setup(self, policy: str, first: tuple[str, list[int]]):
        """A pool with an eviction policy, and a first request (so every run has one to step, pin and free)."""
        EXAMPLES[self.name] += 1
        self._build(policy)
        return self._admit(first, prefill=True)

    def _build(self, policy: str) -> None:
        self.policy = policy
        self.kv = KVCacheManager(NUM_BLOCKS, BS, LAYOUT.fingerprint, DTYPE_NAME, True, policy)
        # The pool the manager makes, but on a clock the machine moves (the manager has no clock argument).
        self.kv.pool = BlockPool(NUM_BLOCKS, clock=lambda: self.now, eviction_policy=policy)
        self.pool = self.kv.pool
        assert self.pool.max_pinned == MAX_PINNED
        self.device = DeviceKV(NUM_BLOCKS)
        self.events = EventLog()
        self.pool.events = self.events
        self.live: dict[int, Request] = {}
        # The model: pins by address, (deadline, TTL); every address ever computed, with its parent and tokens.
        self.dev_pins: dict[BlockHash, tuple[float, float]] = {}
        self.known: dict[BlockHash, tuple[BlockHash, tuple[int, ...]]] = getattr(self, "known", {})
        self.explicit: set[str] = set()  # tiers whose removals in this step were asked for (reset, evict, clear)
        self.resets = 0

    # ---- the model's view -----------------------------------------------------------------------------------------
    def _pinned(self, h: BlockHash) -> bool:
        return self.dev_pins.get(h, (0.0, 0.0))[0] > self.now

    def _room(self, exclude: Iterable[Block] = ()) -> int:
        """Blocks an allocation may take now: every idle block but cached ones under an unexpired pin."""
        skip = {b.block_id for b in exclude}
        return sum(
            1
            for b in self.pool.blocks
            if b.ref_count == 0
            and b.block_id not in skip
            and not (b.block_hash is not None and self._pinned(b.block_hash))
        )

    def _remember(self, chain: Sequence[BlockHash], tokens: Sequence[int], root: BlockHash, upto: int) -> None:
        for i in range(upto):
            self.known[chain[i]] = (chain[i - 1] if i else root, tuple(tokens[i * BS : (i + 1) * BS]))

    # ---- hooks for the tiers (nothing without them) ---------------------------------------------------------------
    def _plan(self, seq: SeqBlocks, tokens: list[int], chain: list[BlockHash], hit: list[Block]) -> TierPlan | None:
        return None

    def _check_loads(self, plan: TierPlan | None, loaded: int) -> None:
        pass

    def _written(self, hashes: list[BlockHash]) -> None:
        pass

    def _pin_below(self, req: Request, k: int, wall_ttl: float) -> None:
        pass

    def _device_evicted(self, h: BlockHash) -> None:
        pass

    def _tier_removed(self, tier: str, h: BlockHash, wall: float) -> None:
        pass

    # ---- rules ----------------------------------------------------------------------------------------------------
    @rule(target=requests, prompt=PROMPTS, prefill=st.booleans())
    def admit(self, prompt: tuple[str, list[int]], prefill: bool):
        """A request arrives: its cached prefix is matched (device, then the tiers) and its blocks allocated;
        ``prefill``: its first engine step runs at once (else another request may compute the same blocks first)."""
        self._step()
        return self._admit(prompt, prefill)

    def _admit(self, prompt: tuple[str, list[int]], prefill: bool):
        self.now += ARRIVAL_GAP
        namespace, tokens = prompt
        seq = self.kv.new_seq(namespace)
        root = root_hash(LAYOUT.fingerprint, DTYPE_NAME, namespace)
        assert seq.root == root, "the chain's root is not H(model, dtype, namespace)"
        chain = chain_hashes(root, tokens, BS)
        usable = (len(tokens) - 1) // BS  # the last token is always computed: its block is never a hit

        hit = self.kv.match(seq, tokens)
        registered = set(self.pool.addresses())
        longest = 0
        while longest < usable and chain[longest] in registered:
            longest += 1
        assert len(hit) == longest, f"match found {len(hit)} blocks, the pool holds a run of {longest}"
        for i, blk in enumerate(hit):
            assert blk.block_hash == chain[i] and blk.token_ids == tuple(tokens[i * BS : (i + 1) * BS]), (
                f"hit block {i} is not the prompt's own block"
            )

        plan = self._plan(seq, tokens, chain, hit)
        n_plan = len(plan) if plan is not None else 0
        need = blocks_for(len(tokens)) - len(hit)
        room = self._room(exclude=hit)  # the hit's own idle blocks are taken as hits, not as new room
        refs_before = {b.block_id: b.ref_count for b in self.pool.blocks}
        got = self.kv.allocate_prefix(seq, tokens, len(tokens) - (len(hit) + n_plan) * BS, hit, plan)
        if got is None:
            assert need > room, (
                f"admission refused: it needs {need} new blocks and {room} idle unpinned blocks are there to take"
            )
            assert {b.block_id: b.ref_count for b in self.pool.blocks} == refs_before, "a refusal changed the pool"
            assert not seq.blocks
            return multiple()
        assert need <= room, f"admitted needing {need} new blocks with only {room} to give"

        now = self.now
        for blk in hit:  # a hit renews the pins of the blocks it reads, each for its own TTL
            until, ttl = self.dev_pins.get(blk.block_hash, (0.0, 0.0))  # type: ignore[arg-type]
            if until > now:
                self.dev_pins[blk.block_hash] = (max(until, now + ttl), ttl)  # type: ignore[index]

        assert got % BS == 0 and len(hit) * BS <= got <= (len(hit) + n_plan) * BS, f"{got} cached tokens"
        assert len(seq.blocks) == blocks_for(len(tokens)), "the request has no room for all its tokens"
        assert seq.num_registered == got // BS
        assert sum(seq.cached_by_tier.values()) == got and seq.cached_by_tier.get("device", 0) == len(hit) * BS
        for i in range(got // BS):
            blk = seq.blocks[i]
            assert same_bytes(self.device.read_block(blk.block_id), kv_of(chain[i])), (
                f"block {i} of the prompt (from {'the device' if i < len(hit) else 'a tier'}) is not its KV"
            )
        self._remember(chain, tokens, root, got // BS)
        self._check_loads(plan, got // BS - len(hit))
        req = Request(self.next_rid, namespace, list(tokens), seq, got, len(tokens))
        self.next_rid += 1
        self.live[req.rid] = req
        if prefill:
            self._compute(req)
        return req

    @rule(target=requests, prev=finished, more=st.lists(TOKEN, max_size=6), prefill=st.booleans())
    def follow_up(self, prev: Request, more: list[int], prefill: bool):
        """An ended request's conversation goes on: the next turn's prompt is its tokens, the generated ones included,
        then ``more`` (its hit goes through the earlier answer, and the earlier turn's pins); with no ``more``, the
        same prompt is sent again (a retry, a benchmark's repeat: its answer is computed again)."""
        self._step()
        tokens = prev.tokens + more if more else prev.tokens[: prev.prompt_len]
        if len(tokens) > MAX_TOKENS:
            return multiple()
        return self._admit((prev.namespace, tokens), prefill)

    @rule(req=requests, new=st.lists(TOKEN, min_size=1, max_size=5), sample=st.booleans())
    def run_step(self, req: Request, new: list[int], sample: bool) -> None:
        """An engine step of a request: prefill what it has not computed, else decode as many tokens as ``new`` has
        (``new`` itself when sampling, else the greedy answer), its blocks growing first. The KV of every full block
        is written, then the block committed under its address."""
        self._step()
        seq = req.seq
        if not sample:
            new = greedy(req.tokens, len(new))
        if req.computed == len(req.tokens):
            if len(req.tokens) + len(new) > MAX_TOKENS:
                return
            need = blocks_for(len(req.tokens) + len(new)) - len(seq.blocks)
            room = self._room()
            grown = self.kv.grow(seq, len(req.tokens) + len(new))
            assert grown == (need <= room), f"grow by {need} blocks with {room} to give answered {grown}"
            if not grown:
                return
            req.tokens += new
        self._compute(req)

    def _compute(self, req: Request) -> None:
        """Write the KV of the request's uncomputed tokens into its blocks, then commit its full blocks."""
        seq = req.seq
        assert len(seq.blocks) == blocks_for(len(req.tokens))
        chain = req.chain
        for i in range(req.computed // BS, len(seq.blocks)):
            blk = seq.blocks[i]
            # NOTE: a request writes only blocks it owns alone: a shared or registered block is read by others.
            assert blk.ref_count == 1 and blk.block_hash is None, f"block {i} to compute is shared or registered"
            if i < len(chain):
                self.device.write_block(blk.block_id, kv_of(chain[i]))
            else:  # the partial last block: its slots are this request's own
                self.device.write_block(blk.block_id, torch.full(SHAPE, -1.0 - req.rid))
        registered = seq.num_registered
        written = self.kv.commit(seq, req.tokens, len(req.tokens))
        req.computed = len(req.tokens)
        assert seq.num_registered == len(chain) and seq.hashes[: len(chain)] == chain, "a full block is uncommitted"
        assert set(written) <= set(range(registered, len(chain))), f"commit reports {written} as newly written"
        for i in written:
            assert seq.blocks[i].block_hash == chain[i], f"written block {i} is not registered under its address"
        self._remember(chain, req.tokens, seq.root, len(chain))
        self._written([chain[i] for i in written])

    @rule(target=finished, req=consumes(requests))
    def free(self, req: Request) -> Request:
        """The request ends: all its blocks are released (its registered ones stay cached)."""
        self._step()
        self.kv.free(req.seq)
        del self.live[req.rid]
        assert req.seq.blocks == []
        return req

    @rule(n=st.integers(1, 4))
    def evict(self, n: int) -> None:
        """Another allocation takes ``n`` blocks at once (free ones first, then idle cached ones, evicted), then
        gives them back."""
        self._step()
        n = min(n, self.pool.num_available)
        if n == 0:
            return
        in_use = {b.block_id for r in self.live.values() for b in r.seq.blocks}
        pinned = {b.block_id for b in self.pool.blocks if b.block_hash is not None and self._pinned(b.block_hash)}
        taken = self.pool.allocate(n)
        for blk in taken:
            assert blk.block_id not in in_use, f"block {blk.block_id} was handed out while a request holds it"
            assert blk.block_id not in pinned, f"block {blk.block_id} was evicted under an unexpired pin"
            assert blk.ref_count == 1 and blk.block_hash is None
        self.pool.release(taken)

    @rule(
        req=requests,
        k=st.integers(1, 7),
        ttl=st.sampled_from([2.0, 8.0, 32.0]),
        wall_ttl=st.sampled_from([0.05, 0.3, 600.0]),
    )
    def pin(self, req: Request, k: int, ttl: float, wall_ttl: float) -> None:
        """A cache breakpoint: the request's first ``k`` blocks are pinned for ``ttl`` clock seconds (head first, up
        to the cap; a pin extends, never shortens), and in the tiers for ``wall_ttl`` wall-clock seconds."""
        self._step()
        blocks = req.seq.blocks[:k]
        now, until = self.now, self.now + ttl
        pinned_now = sum(1 for u, _ in self.dev_pins.values() if u > now)
        expected = 0
        for blk in blocks:
            h = blk.block_hash
            if h is None:
                break  # a pin covers a registered prefix only
            old_until, old_ttl = self.dev_pins.get(h, (0.0, 0.0))
            if old_until <= now:
                if pinned_now >= MAX_PINNED:
                    break
                pinned_now += 1
                old_ttl = 0.0  # an expired pin is over: a hit renews the new pin for the new pin's TTL
            self.dev_pins[h] = (max(old_until, until), max(old_ttl, until - now))
            expected += 1
        done = self.pool.pin(blocks, until)
        assert done == expected, f"pin of {len(blocks)} blocks pinned {done}, expected {expected}"
        self._pin_below(req, k, wall_ttl)

    @rule(dt=st.sampled_from([0.5, 1.0, 4.0, 16.0]))
    def advance_clock(self, dt: float) -> None:
        """Time passes: pins whose deadline is reached expire."""
        self._step()
        self.now += dt

    @precondition(lambda self: self.pool.num_cached >= NUM_BLOCKS // 4)
    @rule()
    def reset(self) -> None:
        """Forget every idle cached block, pins included (blocks in use stay registered)."""
        self._step()
        self._reset_device()

    def _reset_device(self) -> None:
        idle = sum(1 for b in self.pool.blocks if b.ref_count == 0 and b.block_hash is not None)
        in_use = {b.block_hash for b in self.pool.blocks if b.ref_count > 0 and b.block_hash is not None}
        assert self.pool.reset() == idle
        assert self.pool.num_cached == 0 and self.pool.num_pinned == 0
        assert set(self.pool.addresses()) == in_use, "reset dropped a block in use"
        self.dev_pins.clear()
        self.explicit.add(DEVICE)
        self.resets += 1

    # ---- invariants -----------------------------------------------------------------------------------------------
    @invariant()
    def everything_holds(self) -> None:
        """After every step (in this order: removals are judged before the state they leave behind)."""
        self._settle()
        self._check_removals()
        self._check_counts_and_refs()
        self._check_index_and_content()
        self._check_requests()
        self._check_chains()
        self._check_pins()
        self._check_tiers()

    def _settle(self) -> None:
        pass

    def _check_removals(self) -> None:
        """A device block under an unexpired pin is never evicted; a tier entry under one is never evicted for room."""
        wall = time.time()
        for tier, h in self.events.drain():
            if tier == DEVICE:
                until = self.dev_pins.pop(h, (0.0, 0.0))[0]
                if DEVICE not in self.explicit:
                    assert until <= self.now, f"block {short(h)} evicted under a pin until {until} (now {self.now})"
                    self._device_evicted(h)
            else:
                self._tier_removed(tier, h, wall)
        self.explicit.clear()

    def _check_counts_and_refs(self) -> None:
        """Free + cached + in use = the pool; ref counts are the running requests' holdings."""
        pool = self.pool
        pool.check_integrity()
        holders = Counter(b.block_id for r in self.live.values() for b in r.seq.blocks)
        free = cached = in_use = 0
        for blk in pool.blocks:
            assert blk.ref_count >= 0, f"block {blk.block_id} has ref count {blk.ref_count}"
            assert blk.ref_count == holders[blk.block_id], (
                f"block {blk.block_id}: ref count {blk.ref_count}, held by {holders[blk.block_id]} running requests"
            )
            if blk.ref_count > 0:
                in_use += 1
                if blk.block_hash is None:
                    assert blk.ref_count == 1, f"unregistered block {blk.block_id} is shared by requests"
            elif blk.block_hash is None:
                free += 1
            else:
                cached += 1
        assert (pool.num_free, pool.num_cached, pool.num_in_use) == (free, cached, in_use), (
            f"pool reports free/cached/in use {(pool.num_free, pool.num_cached, pool.num_in_use)}, "
            f"its blocks say {(free, cached, in_use)}"
        )
        assert free + cached + in_use == NUM_BLOCKS
        assert pool.num_available == self._room(), "num_available is not the idle unpinned blocks"
        if not self.live:
            assert pool.num_in_use == 0, "no request runs, yet blocks are in use"

    def _check_index_and_content(self) -> None:
        """Every address maps to one block and back, holding exactly the KV computed for that address."""
        addresses = self.pool.addresses()
        by_hash = {b.block_hash: b for b in self.pool.blocks if b.block_hash is not None}
        assert len(addresses) == len(set(addresses)) == len(by_hash) == self.pool.num_registered
        assert set(addresses) == set(by_hash), "the index and the blocks' addresses disagree"
        assert self.events.held[DEVICE] == set(addresses), "the KV events told disagree with the device index"
        for h, blk in by_hash.items():
            assert self.pool.lookup(h) is blk
            assert h in self.known, f"block {blk.block_id} is registered under an address nobody computed"
            assert (blk.parent_hash, blk.token_ids) == self.known[h]
            assert same_bytes(self.device.read_block(blk.block_id), kv_of(h)), (
                f"block {blk.block_id}, registered under {short(h)}, does not hold that address's KV"
            )

    def _check_requests(self) -> None:
        """Each running request has room for its tokens and reads exactly its own KV in every computed block, from the
        cache's own block for that address."""
        for req in self.live.values():
            seq = req.seq
            assert len(seq.blocks) == blocks_for(len(req.tokens)), f"{req}: {len(seq.blocks)} blocks"
            assert len({b.block_id for b in seq.blocks}) == len(seq.blocks), f"{req}: a block twice in its table"
            chain = req.chain
            for i in range(req.computed // BS):
                blk = seq.blocks[i]
                # Each of its full blocks is the cache's block for that address: content the pool holds is shared,
                # never held twice (a private second copy would leave the cached one idle, unused, evicted first).
                assert blk.block_hash == chain[i], f"{req}: its block {i} is " + (
                    "a private copy of a cached block" if blk.block_hash is None else "under another address"
                )
                assert same_bytes(self.device.read_block(blk.block_id), kv_of(chain[i])), (
                    f"{req} reads wrong KV in its block {i}"
                )

    def _check_chains(self) -> None:
        """Chains are evicted from their end: a registered block's parent is registered too (else it could never be
        hit again). Not checked once a reset ran: it drops idle blocks but keeps running requests' blocks after them."""
        if self.resets:
            return
        for blk in self.pool.blocks:
            if blk.block_hash is not None and blk.parent_hash not in ROOTS:
                assert self.pool.lookup(blk.parent_hash) is not None, (  # type: ignore[arg-type]
                    f"block {blk.block_id} ({'in use' if blk.ref_count else 'cached'}) outlived its parent"
                )

    def _check_pins(self) -> None:
        """Pins hold until their deadline and not after it, at most ``MAX_PINNED`` at once."""
        now = self.now
        active = 0
        for blk in self.pool.blocks:
            if blk.block_hash is None:
                continue
            until, ttl = self.dev_pins.get(blk.block_hash, (0.0, 0.0))
            if until > now:
                active += 1
                assert blk.pinned_until == until, f"block {blk.block_id} pinned until {blk.pinned_until}, not {until}"
                # What a hit will renew the pin for: the longest TTL of the pins on it since it was last unpinned.
                assert blk.pin_ttl == ttl, f"block {blk.block_id}: a hit renews its pin for {blk.pin_ttl}, not {ttl}"
            else:
                assert blk.pinned_until <= now, f"block {blk.block_id} is still pinned (until {blk.pinned_until})"
        lost = [short(h) for h in self.dev_pins if self._pinned(h) and self.pool.lookup(h) is None]
        assert not lost, f"pinned blocks {lost} were dropped before their pins expired"
        assert self.pool.num_pinned == active <= MAX_PINNED, f"{self.pool.num_pinned} pinned, expected {active}"

    def _check_tiers(self, deep: bool = False) -> None:
        pass

    # ---- the end of a run -----------------------------------------------------------------------------------------
    def teardown(self) -> None:
        failing = sys.exc_info()[0] is not None  # a step failed: report that, not what its broken state does next
        if hasattr(self, "pool") and not failing:
            # Every request ends: nothing is left in use, and the pool is whole.
            for req in list(self.live.values()):
                self.kv.free(req.seq)
            self.live.clear()
            assert self.pool.num_in_use == 0, f"{self.pool.num_in_use} blocks in use after every request ended"
            self.pool.check_integrity()


class TierModel:
    """The tiers below a device (a real ``TierStack`` over a ``HostTier``, a ``DiskTier`` and a ``RedisTier``), the
    model kept beside them, and the checks both tier machines run after every step."""

    device: DeviceKV
    events: EventLog
    known: dict[BlockHash, tuple[BlockHash, tuple[int, ...]]]
    explicit: set[str]

    def _open_tiers(self, disk_dir: Path, redis_url: str, queue_gb: float, fresh: bool) -> None:
        self.host = HostTier(LAYOUT, HOST_SLOTS * LAYOUT.nbytes)
        self.disk = DiskTier(LAYOUT, disk_dir, DISK_ENTRIES * ENTRY_BYTES)
        self.redis = RedisTier(LAYOUT, redis_url, ttl_seconds=600, timeout=2.0)
        if fresh:
            self.redis.clear()  # the previous run's keys (same model fingerprint)
        options = TierOptions(
            host_cache_gb=HOST_SLOTS * LAYOUT.nbytes / GB,
            disk_cache_dir=str(disk_dir),
            disk_cache_gb=DISK_ENTRIES * ENTRY_BYTES / GB,
            redis_url=redis_url,
            read_timeout=2.0,
            write_queue_gb=queue_gb,
            load_policy="always",  # no timing estimates: what is found below is loaded (deterministic)
        )
        self.tiers: dict[str, Tier] = {"host": self.host, "disk": self.disk, "redis": self.redis}
        self.stack = TierStack(list(self.tiers.values()), self.device, options)
        # KV events as the engine wires them: local tiers only, from a snapshot of what they hold.
        self.host.events = self.disk.events = self.events
        self.events.held["disk"] = set(self.disk.addresses())
        self.tier_pins: dict[BlockHash, float] = {}  # address -> wall-clock deadline, as the stack was told
        self.redis_drops = 0  # explicit drops from Redis: with its counters, what tells that Redis changed
        self.redis_seen: tuple[int, ...] | None = None  # that state when Redis was last checked
        self.expect_host: set[BlockHash] = set()  # what this step must leave in each tier (see _check_expectations)
        self.expect_disk: set[BlockHash] = set()
        self.expect_redis: set[BlockHash] = set()
        self._baseline()

    def _close_tiers(self, check: bool) -> None:
        """At the end of a run (unless a step failed): every check once more, the tiers' own deep ones included."""
        if not hasattr(self, "stack"):
            return
        try:
            if check:
                self._settle()
                self._check_tiers(deep=True)
        finally:
            self.stack.close()

    # ---- what a step is excused from ------------------------------------------------------------------------------
    def _baseline(self) -> None:
        """Counters at the start of a step: a tier that made room, refused, timed out or dropped writes during it is
        excused from holding what it was sent."""
        self.base = {name: self._excuses(tier) for name, tier in self.tiers.items()}
        self.base_dropped = self.stack.dropped_writes

    @staticmethod
    def _excuses(tier: Tier) -> tuple[int, int]:
        return tier.counters.evictions, sum(tier.counters.errors.values())

    def _excused(self, name: str) -> bool:
        return self._excuses(self.tiers[name]) != self.base[name] or self.stack.dropped_writes != self.base_dropped

    # ---- checks within a step -------------------------------------------------------------------------------------
    def _check_plan(self, plan: TierPlan | None, hashes: Sequence[BlockHash]) -> None:
        """A lookup of ``hashes`` (what follows a device hit) finds the longest run the tiers hold, each block from
        the first tier (host, disk, Redis) that holds it. The writer is idle here: the previous step was flushed."""
        held = {name: tier.contains(hashes) for name, tier in self.tiers.items()}  # in lookup order
        holders = [[name for name in held if held[name][i]] for i in range(len(hashes))]
        n = len(plan) if plan is not None else 0
        if plan is not None:
            assert n > 0 and plan.hashes == list(hashes[:n]) and len(plan.sources) == n
            for i, src in enumerate(plan.sources):
                assert holders[i][:1] == [src.name], f"{short(hashes[i])} planned from {src.name}, held by {holders[i]}"
        if n < len(hashes):
            assert not holders[n], f"the lookup stopped at {short(hashes[n])}, which {holders[n]} hold"

    def _check_loads(self, plan: TierPlan | None, loaded: int) -> None:
        """What the plan found is loaded; only a tier that lost an entry meanwhile (the disk making room for this
        step's writes, a late read) may cut the run short, never the host (its planned entries are held)."""
        if plan is None:
            assert loaded == 0
            return
        assert 0 <= loaded <= len(plan)
        if loaded < len(plan):
            src = plan.sources[loaded]
            assert src is not self.host, f"a host entry was planned and not loaded ({short(plan.hashes[loaded])})"
            assert self._excused(src.name), f"a {src.name} entry was planned and not loaded, and nothing explains it"
        for i in range(loaded):
            if plan.sources[i] is self.redis:
                self.expect_disk.add(plan.hashes[i])  # found only in the shared tier: kept on local disk too

    def _clear_stack(self, shared: bool) -> None:
        """``TierStack.clear``: every local tier (and with ``shared`` Redis) empty of this model."""
        known = list(self.known)
        names = ["host", "disk", "redis"] if shared else ["host", "disk"]
        expected = {name: sum(self.tiers[name].contains(known)) for name in names}
        self.redis_drops += shared
        assert self.stack.clear(shared) == expected
        for name in names:
            assert not any(self.tiers[name].contains(known)), f"the {name} tier kept entries through a clear"
        self.explicit.update(self.tiers)

    def _drop(self, name: str, picks: list[int] | None) -> None:
        """Drop entries from one tier, pinned or not: some known addresses, or all (``None``: ``clear``)."""
        tier = self.tiers[name]
        known = list(self.known)
        self.redis_drops += name == "redis"
        if picks is None:
            present = sum(tier.contains(known))
            assert tier.clear() == present
            assert not any(tier.contains(known)), f"the {name} tier kept entries through a clear"
        else:
            hashes = list(dict.fromkeys(known[p % len(known)] for p in picks))
            present = sum(tier.contains(hashes))
            assert tier.evict(hashes) == present
            assert not any(tier.contains(hashes)), f"the {name} tier still holds an evicted entry"
        self.explicit.add(name)

    def _pin_tiers(self, hashes: Sequence[BlockHash], until: float) -> None:
        for h in hashes:
            self.tier_pins[h] = max(self.tier_pins.get(h, 0.0), until)

    # ---- checks after every step ----------------------------------------------------------------------------------
    def _settle(self) -> None:
        assert self.stack.flush(10), "the tier writer did not finish its queue"

    def _tier_removed(self, tier: str, h: BlockHash, wall: float) -> None:
        """A tier removed ``h``: if no step asked for it, it made room, and never under an unexpired pin."""
        if tier not in self.explicit:
            until = self.tier_pins.get(h, 0.0)
            assert until <= wall, f"{tier} entry {short(h)} evicted for room {until - wall:.3f} s before its pin ends"

    def _check_tiers(self, deep: bool = False) -> None:
        # The tiers' own checks (index against slots and files, sizes and budgets, every Redis key expires; ``deep``:
        # every entry decoded and verified too, as the checks below do on their own against the model).
        # NOTE: Redis is checked when it changed (a store, an error, a drop): its checks cost round trips, and Redis
        # changes in no other way here (its keys expire after 600 s, longer than any run).
        c = self.redis.counters
        redis_state = (c.stores, sum(c.errors.values()), self.redis_drops)
        names = [name for name in self.tiers if name != "redis" or deep or redis_state != self.redis_seen]
        problems = {name: self.tiers[name].check_integrity(deep) for name in names}
        assert not any(problems.values()), problems
        self._check_host()
        self._check_disk()
        if "redis" in names:
            self._check_redis()
            self.redis_seen = redis_state
        self._check_expectations()
        self._baseline()

    def _check_host(self) -> None:
        """Host slots: within the budget, accounted for, each holding exactly its address's KV."""
        held = self.host.addresses()
        assert len(held) == len(set(held)) == self.host.num_entries() <= HOST_SLOTS
        assert self.host.size_bytes() == len(held) * LAYOUT.nbytes
        assert set(held) == self.events.held["host"], "the host's KV events disagree with what it holds"
        # NOTE: loading in the LRU order that addresses() lists leaves that order as it was.
        for h, kv in zip(held, self.host.load(held)):
            assert h in self.known, f"the host holds {short(h)}, which nobody computed"
            assert kv is not None and same_bytes(kv, kv_of(h)), f"host entry {short(h)} is not its address's KV"

    def _check_disk(self) -> None:
        """The disk's files are exactly its index (addresses, sizes, total within budget), each one verified."""
        files = {bytes.fromhex(p.name[:-3]): p for p in self.disk.root.glob("*/*.kv")}
        sizes = {h: p.stat().st_size for h, p in files.items()}
        indexed = self.disk.addresses()
        assert set(files) == set(indexed), (
            f"files without an index entry {[short(h) for h in set(files) - set(indexed)]}, "
            f"index entries without a file {[short(h) for h in set(indexed) - set(files)]}"
        )
        assert len(indexed) == len(set(indexed)) == self.disk.num_entries()
        assert self.disk.size_bytes() == sum(sizes.values()) <= self.disk.capacity_bytes()
        assert not list(self.disk.root.glob("*/.*.tmp")), "a temporary file outlived its write"
        assert set(indexed) == self.events.held["disk"], "the disk's KV events disagree with what it holds"
        for h, path in files.items():
            # Read the file itself (a load would reorder the disk's LRU): header, checksum and KV.
            entry = fmt.decode(path.read_bytes(), LAYOUT, expected=h)
            assert h in self.known, f"the disk holds {short(h)}, which nobody computed"
            assert (entry.parent_hash, entry.token_ids) == self.known[h]
            assert same_bytes(entry.kv, kv_of(h)), f"disk entry {short(h)} is not its address's KV"

    def _check_redis(self) -> None:
        """Redis holds only computed blocks, each exactly its address's KV (and its parent and tokens)."""
        prefix = self.redis.prefix.encode()
        keys = self.raw.keys(self.redis.prefix + "*")  # the prefix holds no glob character
        for key, value in zip(keys, self.raw.mget(keys) if keys else []):
            h = bytes.fromhex(key[len(prefix) :].decode())
            assert h in self.known, f"Redis holds {short(h)}, which nobody computed"
            assert value is not None, f"Redis entry {short(h)} vanished (expired?)"
            entry = fmt.decode(value, LAYOUT, expected=h)
            assert (entry.parent_hash, entry.token_ids) == self.known[h]
            assert same_bytes(entry.kv, kv_of(h)), f"Redis entry {short(h)} is not its address's KV"

    def _check_expectations(self) -> None:
        """What this step sent down is there, unless the tier was excused (made room, refused, dropped writes)."""
        for name, expected in (("host", self.expect_host), ("disk", self.expect_disk), ("redis", self.expect_redis)):
            tier = self.tiers[name]
            missing = [h for h, c in zip(expected, tier.contains(list(expected))) if not c]
            assert not missing or self._excused(name), f"the {name} tier lacks {[short(h) for h in missing]}"
            expected.clear()


class TieredCacheMachine(TierModel, DevicePoolMachine):
    """The pool with host, disk and Redis tiers below it, under the same requests; see the module docstring."""

    # Fewer rules, so that each run's random subset of them (hypothesis's swarm testing) holds the ones that interact
    # with the tiers more often: time passes here only as requests arrive.
    advance_clock = None  # type: ignore[assignment]

    def __init__(self, workdir: Path, redis_url: str) -> None:
        super().__init__()
        self.workdir = workdir
        self.redis_url = redis_url

    @initialize(
        target=DevicePoolMachine.requests,
        policy=st.sampled_from(["lfu", "lru"]),
        first=PROMPTS,
        queue_blocks=st.sampled_from([4096, 4096, 4096, 2.5]),
    )
    def setup(self, policy: str, first: tuple[str, list[int]], queue_blocks: float):
        """A pool, its tiers (host, an empty disk directory, Redis cleared of this model) and a first request.
        ``queue_blocks``: the write queue's size; one of 2.5 blocks drops batches of writes (counted), and the tiers
        must stay right regardless."""
        EXAMPLES[self.name] += 1
        self.queue_gb = queue_blocks * LAYOUT.nbytes / GB
        self.disk_dir = Path(tempfile.mkdtemp(dir=self.workdir))
        self.raw = redis.Redis.from_url(self.redis_url)
        self._build(policy)
        self._open(fresh=True)
        return self._admit(first, prefill=True)

    def _open(self, fresh: bool) -> None:
        self._open_tiers(self.disk_dir, self.redis_url, self.queue_gb, fresh)
        self.kv.attach_tiers(self.stack)
        self.seen: set[BlockHash] = set()  # addresses on the device since the tiers were last cleared

    # ---- hooks ----------------------------------------------------------------------------------------------------
    def _plan(self, seq: SeqBlocks, tokens: list[int], chain: list[BlockHash], hit: list[Block]) -> TierPlan | None:
        plan = self.kv.match_tiers(seq, tokens, len(hit))
        self._check_plan(plan, chain[len(hit) : (len(tokens) - 1) // BS])
        return plan

    def _written(self, hashes: list[BlockHash]) -> None:
        """Write-through: a block computed for the first time since the tiers were cleared goes to disk and Redis."""
        for h in hashes:
            if h not in self.seen:
                self.expect_disk.add(h)
                self.expect_redis.add(h)
        self.seen.update(hashes)

    def _device_evicted(self, h: BlockHash) -> None:
        """Write-back: a block leaving the device goes into the host, and to the disk if it no longer holds it."""
        self.expect_host.add(h)
        self.expect_disk.add(h)

    def _pin_below(self, req: Request, k: int, wall_ttl: float) -> None:
        until = time.time() + wall_ttl
        self.kv.pin_in_tiers(req.seq, k, until)
        self._pin_tiers(req.chain[:k], until)

    def _check_tiers(self, deep: bool = False) -> None:
        super()._check_tiers(deep)
        self.seen.update(self.pool.addresses())

    # ---- more rules -----------------------------------------------------------------------------------------------
    @rule(scope=st.sampled_from(["device", "local tiers too", "shared tier too"]))
    def reset(self, scope: str) -> None:
        """``reset_cache``: forget every idle cached block of the device (not spilled: the tiers keep what they hold);
        with the tiers, clear the local ones too, and Redis with the shared one."""
        self._step()
        self._reset_device()
        if scope != "device":
            self._clear_stack(shared=scope == "shared tier too")
            self.seen = set(self.pool.addresses())  # blocks in use stay on the device: they count as seen

    @rule(
        name=st.sampled_from(["host", "disk", "redis"]),
        picks=st.one_of(st.none(), st.lists(st.integers(0, 1 << 16), min_size=1, max_size=4)),
    )
    def tier_drop(self, name: str, picks: list[int] | None) -> None:
        """Drop entries from one tier, pinned or not: some known addresses (``picks`` index them), or every entry of
        this model (``None``: a clear)."""
        self._step()
        self._drop(name, picks)

    @precondition(lambda self: not self.live)
    @rule()
    def restart(self) -> None:
        """The server restarts (no request runs): device and host start empty, the disk rebuilds its index from its
        files alone, Redis keeps what it had."""
        self._step()
        self._settle()
        self._check_removals()
        on_disk = set(self.disk.addresses())
        disk_bytes = self.disk.size_bytes()
        known = list(self.known)
        in_redis = [h for h, c in zip(known, self.redis.contains(known)) if c]
        self.stack.close()
        self._build(self.policy)
        self._open(fresh=False)
        assert set(self.disk.addresses()) == on_disk and self.disk.size_bytes() == disk_bytes, (
            "the restarted disk tier does not index what its files hold"
        )
        assert all(self.redis.contains(in_redis)), "Redis lost entries over a restart"

    def teardown(self) -> None:
        try:
            super().teardown()
        finally:
            self._close_tiers(check=sys.exc_info()[0] is None)
            if hasattr(self, "raw"):
                self.raw.close()
            if hasattr(self, "disk_dir"):
                shutil.rmtree(self.disk_dir, ignore_errors=True)


def _chains() -> tuple[list[list[BlockHash]], dict[BlockHash, tuple[BlockHash, tuple[int, ...]]]]:
    """The blocks the tier stack machine moves around: one chain of four blocks per document (heads shared), and the
    parent and tokens of each."""
    root = root_hash(LAYOUT.fingerprint, DTYPE_NAME, "alice")
    chains, origins = [], {}
    for doc in DOCS:
        tokens = [t for w in (*doc, 0) for t in WORDS[w]]
        chain = chain_hashes(root, tokens, BS)
        chains.append(chain)
        for i, h in enumerate(chain):
            origins[h] = (chain[i - 1] if i else root, tuple(tokens[i * BS : (i + 1) * BS]))
    return chains, origins


CHAINS, ORIGINS = _chains()
STACK_SLOTS = 6  # device blocks under the tier stack machine


class TierStackMachine(TierModel, CountedMachine):
    """The tier stack alone, driven as the cache manager drives it, over a few chains of blocks; see the module
    docstring. ``slots`` models what each device block holds (registered, with its KV written)."""

    def __init__(self, workdir: Path, redis_url: str) -> None:
        super().__init__()
        self.workdir = workdir
        self.redis_url = redis_url

    @initialize(queue_blocks=st.sampled_from([4096, 4096, 4096, 2.5]))
    def setup(self, queue_blocks: float) -> None:
        """A device of a few blocks and the tiers below it (an empty disk directory, Redis cleared of this model)."""
        EXAMPLES[self.name] += 1
        self.device = DeviceKV(STACK_SLOTS)
        self.slots: list[BlockHash | None] = [None] * STACK_SLOTS
        self.events = EventLog()
        self.known = dict(ORIGINS)
        self.explicit = set()
        self.sent: set[BlockHash] = set()  # addresses handed down to the stack since its last clear
        self.disk_dir = Path(tempfile.mkdtemp(dir=self.workdir))
        self.raw = redis.Redis.from_url(self.redis_url)
        self._open_tiers(self.disk_dir, self.redis_url, queue_blocks * LAYOUT.nbytes / GB, fresh=True)

    def _reuse(self, slot: int) -> None:
        """The device reuses a block: a registered one is copied down first (``on_evicted``), then overwritten."""
        h = self.slots[slot]
        if h is not None:
            self.stack.on_evicted(h, *self.known[h], slot)
            self.expect_host.add(h)  # write-back into the host,
            self.expect_disk.add(h)  # onto the disk if it no longer holds it,
            if h not in self.sent:
                self.expect_redis.add(h)  # and into Redis if never sent
            self.sent.add(h)
            self.slots[slot] = None
        # NOTE: overwritten at once: a tier that kept a view of the block instead of a copy would now hold garbage.
        self.device.write_block(slot, torch.full(SHAPE, float("nan")))

    @rule(chain=st.integers(0, len(CHAINS) - 1), i=st.integers(0, 3), slot=st.integers(0, STACK_SLOTS - 1))
    def compute(self, chain: int, i: int, slot: int) -> None:
        """A step computes block ``i`` of a chain into a device block and registers it: ``on_written`` (write-through
        to disk and Redis, once per address since the last clear)."""
        self._step()
        h = CHAINS[chain][i]
        if h in self.slots:
            return  # the device holds it already: a second copy would stay private, and nothing is written
        self._reuse(slot)
        self.device.write_block(slot, kv_of(h))
        self.slots[slot] = h
        self.stack.on_written([(h, *self.known[h], slot)])
        if h not in self.sent:
            self.expect_disk.add(h)
            self.expect_redis.add(h)
        self.sent.add(h)

    @rule(slot=st.integers(0, STACK_SLOTS - 1))
    def evict(self, slot: int) -> None:
        """The device evicts a block (demotion: it goes down before the block is reused)."""
        self._step()
        self._reuse(slot)

    @rule(chain=st.integers(0, len(CHAINS) - 1))
    def load(self, chain: int) -> None:
        """A request for a chain (promotion): its device hit is the leading blocks the device holds; the rest is
        looked up below (``plan``), device blocks are allocated for it (after the plan, spilling others, as
        ``allocate_prefix`` does) and ``load_into`` fills them."""
        self._step()
        hashes = CHAINS[chain]
        hit = 0
        while hit < len(hashes) and hashes[hit] in self.slots:
            hit += 1
        rest = hashes[hit:]
        if not rest:
            return
        plan = self.stack.plan(rest, BS)
        self._check_plan(plan if len(plan) else None, rest)
        if not len(plan):
            return
        keep = {self.slots.index(h) for h in hashes[:hit]}
        targets = [s for s in range(STACK_SLOTS) if self.slots[s] is None][: len(plan)]
        for s in range(STACK_SLOTS):  # a full device: evict others (never the hit's own blocks)
            if len(targets) < len(plan) and s not in keep and s not in targets:
                self._reuse(s)
                targets.append(s)
        loaded = self.stack.load_into(plan, targets, [self.known[h] for h in plan.hashes])
        self._check_loads(plan, loaded)
        for h, src, s in list(zip(plan.hashes, plan.sources, targets))[:loaded]:
            assert same_bytes(self.device.read_block(s), kv_of(h)), f"{short(h)} loaded from {src.name} is not its KV"
            if h not in self.slots:  # (else a second copy: it stays private)
                self.slots[s] = h
            if src is self.redis:
                self.sent.add(h)  # queued for the disk

    @rule(chain=st.integers(0, len(CHAINS) - 1), k=st.integers(1, 4), wall_ttl=st.sampled_from([0.05, 0.3, 600.0]))
    def pin(self, chain: int, k: int, wall_ttl: float) -> None:
        """A cache breakpoint reaches the tiers: a chain's first ``k`` blocks are kept for ``wall_ttl`` seconds."""
        self._step()
        until = time.time() + wall_ttl
        self.stack.pin(CHAINS[chain][:k], until)
        self._pin_tiers(CHAINS[chain][:k], until)

    @rule(shared=st.booleans())
    def clear(self, shared: bool) -> None:
        """``TierStack.clear``: the local tiers (and with ``shared`` Redis) forget this model; what was sent down is
        gone, so every block is written through again from now on."""
        self._step()
        self._clear_stack(shared)
        self.sent.clear()

    @rule(
        name=st.sampled_from(["host", "disk", "redis"]),
        picks=st.one_of(st.none(), st.lists(st.integers(0, 1 << 16), min_size=1, max_size=4)),
    )
    def drop(self, name: str, picks: list[int] | None) -> None:
        """Drop entries from one tier, pinned or not: some addresses (``picks`` index them), or all (``None``)."""
        self._step()
        self._drop(name, picks)

    @invariant()
    def everything_holds(self) -> None:
        self._settle()
        wall = time.time()
        for tier, h in self.events.drain():
            self._tier_removed(tier, h, wall)
        self.explicit.clear()
        for s, h in enumerate(self.slots):
            if h is not None:
                assert same_bytes(self.device.read_block(s), kv_of(h)), f"device block {s} no longer holds {short(h)}"
        self._check_tiers()

    def teardown(self) -> None:
        self._close_tiers(check=sys.exc_info()[0] is None)
        if hasattr(self, "raw"):
            self.raw.close()
        if hasattr(self, "disk_dir"):
            shutil.rmtree(self.disk_dir, ignore_errors=True)


def _settings(max_examples: int, steps: int) -> settings:
    # Derandomized (like the API fuzz tests): CI runs the same sequences every time, with no example database
    # written into the checkout; a failure prints its shrunk steps and a blob to reproduce it.
    return settings(
        max_examples=max_examples,
        stateful_step_count=steps,
        deadline=None,
        database=None,
        derandomize=True,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


def _run(factory: Callable[[], RuleBasedStateMachine], name: str, config: settings) -> None:
    start, steps = time.perf_counter(), STEPS[name]
    run_state_machine_as_test(factory, settings=config)
    print(f"\n{name}: {STEPS[name] - steps} steps, every invariant after each, in {time.perf_counter() - start:.1f} s")


def test_device_pool_and_prefix_cache_keep_their_invariants() -> None:
    _run(DevicePoolMachine, "DevicePoolMachine", _settings(max_examples=150, steps=60))


def test_tiered_cache_keeps_its_invariants_and_never_serves_wrong_kv(tmp_path: Path, redis_url: str) -> None:
    _run(lambda: TieredCacheMachine(tmp_path, redis_url), "TieredCacheMachine", _settings(max_examples=45, steps=60))


def test_tier_stack_keeps_its_invariants_and_never_serves_wrong_kv(tmp_path: Path, redis_url: str) -> None:
    _run(lambda: TierStackMachine(tmp_path, redis_url), "TierStackMachine", _settings(max_examples=30, steps=60))


def test_property_steps_are_counted() -> None:
    """The number of property-test steps this run (``pytest -s`` shows it)."""
    total = sum(STEPS.values())
    print(f"\nproperty-test steps this run: {total} ({dict(STEPS)}; examples {dict(EXAMPLES)})")
    assert total > 0 or not EXAMPLES, "the state machines ran no step"
