"""Continuous batching: which requests run this step, on how many tokens, with which blocks.

Each step has a token budget. Running requests go first (a decode costs one token, an unfinished prefill the
rest of its chunk), then waiting requests are admitted with their cached prefix. When blocks run out the newest
running request is preempted: its blocks go back to the pool (its full blocks stay registered, so recomputing
it later is mostly a cache hit) and it re-queues at the front.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from promptcache.cache.manager import KVCacheManager
from promptcache.engine.request import Request, RequestStatus

SCHEDULING_POLICIES = ("fcfs", "lpm")


@dataclass
class ScheduledBatch:
    """The work of one step: (request, number of its tokens to compute)."""

    work: list[tuple[Request, int]] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.work)

    def __bool__(self) -> bool:
        return bool(self.work)


class Scheduler:
    def __init__(
        self,
        kv: KVCacheManager,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = 2048,
        policy: str = "fcfs",
    ):
        if policy not in SCHEDULING_POLICIES:
            raise ValueError(f"scheduling policy must be one of {SCHEDULING_POLICIES}, got {policy!r}")
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.policy = policy
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # oldest admission first; preemption takes from the end
        self.num_preemptions = 0

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        budget = self.max_num_batched_tokens
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_uncomputed, budget)
            while not self.kv.grow(req.seq, req.num_computed + n):
                victim = self.running[-1]
                self._preempt(victim, batch)
                if victim is req:
                    break
            else:
                batch.work.append((req, n))
                budget -= n
                i += 1
        if not batch.preempted:
            self._admit(batch, budget)
        return batch

    def _admit(self, batch: ScheduledBatch, budget: int) -> None:
        if self.policy == "lpm" and len(self.waiting) > 1:
            # Longest cached prefix first: hits are cheap, and running them now keeps their blocks warm.
            ordered = sorted(self.waiting, key=lambda r: -len(self.kv.match(r.seq, r.token_ids)))
            self.waiting = deque(ordered)
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self.waiting[0]
            hit = self.kv.match(req.seq, req.token_ids)
            if not self.kv.fits(hit, min(len(req.token_ids) - len(hit) * self.kv.block_size, budget)):
                break  # no room even without loading from the tiers: do not ask them (a Redis round trip)
            plan = self.kv.match_tiers(req.seq, req.token_ids, len(hit))
            cached = (len(hit) + (len(plan) if plan else 0)) * self.kv.block_size
            n = min(len(req.token_ids) - cached, budget)
            got = self.kv.allocate_prefix(req.seq, req.token_ids, n, hit, plan)
            if got is None:
                break  # not enough blocks: wait for running requests to finish (FCFS, no overtaking)
            n = min(len(req.token_ids) - got, budget)  # a tail after the hit (cache/manager.py) covers a few more
            self.waiting.popleft()
            req.num_computed = got
            if req.num_cached_tokens is None:
                req.num_cached_tokens = min(got, req.num_prompt_tokens)
                req.cached_tokens_by_tier = dict(req.seq.cached_by_tier)
                self.kv.record_lookup(req.num_prompt_tokens, req.num_cached_tokens, req.cached_tokens_by_tier)
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            batch.work.append((req, n))
            budget -= n

    def _preempt(self, req: Request, batch: ScheduledBatch) -> None:
        self.running.remove(req)
        self.kv.free(req.seq)
        req.num_computed = 0
        req.status = RequestStatus.WAITING
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)
        batch.preempted.append(req)

    def finish(self, req: Request) -> None:
        """Take a finished or aborted request out of the queues and give back its blocks."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.kv.free(req.seq, req.token_ids[: req.num_computed])
        req.status = RequestStatus.FINISHED
