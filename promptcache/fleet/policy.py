"""The routing decision: one cost per replica, in prefill tokens.

``cost = prefill still to compute there + the prefill queued there + decode_weight x its running decodes``

The prefill still to compute is the prompt less the cached run the replica would read, each block weighted by the
tier it comes from: a device block costs nothing, a host block a little (a copy), a disk block more (a read), and
a Redis block the same on every replica (so it decides nothing between them, but still lowers every replica's cost
against the load). The load is what the routers dispatched there and has not finished (``LoadBook``).
``prompt_cache_key`` / ``user`` give soft affinity: the replica a key last went to is preferred by
``affinity_tokens``, so it keeps a conversation unless another replica is clearly cheaper.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

POLICIES = ("cache", "round-robin", "least-loaded")
# Share of a block's prefill a hit from each tier saves, until a replica has measured its own (``measured_weights``);
# Dynamo and llm-d weigh tiers alike (device 1, host 0.75-0.8).
DEFAULT_TIER_WEIGHTS = {"device": 1.0, "host": 0.8, "disk": 0.6, "redis": 0.5, "pending": 1.0}


@dataclass
class Load:
    """Work a replica has been given and not finished, as counted by the routers."""

    prefill_tokens: int = 0  # uncached prompt tokens of requests not yet past their prefill
    decodes: int = 0  # requests dispatched and not finished
    requests: int = 0  # requests dispatched, in all (a counter, for max/min per replica)

    def __add__(self, other: Load) -> Load:
        return Load(self.prefill_tokens + other.prefill_tokens, self.decodes + other.decodes,
                    self.requests + other.requests)  # fmt: skip


@dataclass
class Candidate:
    """One replica as the decision sees it."""

    name: str
    tiers: list[str | None]  # the tier each prompt block would come from on this replica (None ends the run)
    load: Load
    affinity: bool = False
    weights: dict[str, float] | None = None  # this replica's measured tier weights (None: not measured yet)
    # Filled by ``Policy.rank``:
    cached_tokens: int = 0
    cached_by_tier: dict[str, int] = field(default_factory=dict)
    cost: float = 0.0


def cached_run(tiers: Sequence[str | None], block_size: int) -> tuple[int, dict[str, int]]:
    """Tokens of the leading run of blocks some tier holds, in all and by tier."""
    by_tier: dict[str, int] = {}
    n = 0
    for t in tiers:
        if t is None:
            break
        by_tier[t] = by_tier.get(t, 0) + block_size
        n += block_size
    return n, by_tier


class Policy:
    """Orders the healthy replicas for a request, best first (the rest is the failover order)."""

    name = "base"

    def __init__(self, decode_weight: float = 16.0):
        self.decode_weight = decode_weight
        self._turn = itertools.count()

    def load_cost(self, load: Load) -> float:
        return load.prefill_tokens + self.decode_weight * load.decodes

    def rank(self, candidates: list[Candidate], prompt_tokens: int, block_size: int) -> list[Candidate]:
        for c in candidates:
            c.cached_tokens, c.cached_by_tier = cached_run(c.tiers, block_size)
        return self._order(candidates, prompt_tokens, block_size)

    def _order(self, candidates: list[Candidate], prompt_tokens: int, block_size: int) -> list[Candidate]:
        raise NotImplementedError

    def _rotated(self, candidates: list[Candidate]) -> list[Candidate]:
        """The candidates from a position that advances every call: ties go round the replicas, not to the first."""
        if not candidates:
            return candidates
        k = next(self._turn) % len(candidates)
        return candidates[k:] + candidates[:k]


class RoundRobin(Policy):
    name = "round-robin"

    def _order(self, candidates: list[Candidate], prompt_tokens: int, block_size: int) -> list[Candidate]:
        for c in candidates:
            c.cost = self.load_cost(c.load)
        return self._rotated(sorted(candidates, key=lambda c: c.name))


class LeastLoaded(Policy):
    name = "least-loaded"

    def _order(self, candidates: list[Candidate], prompt_tokens: int, block_size: int) -> list[Candidate]:
        for c in candidates:
            c.cost = self.load_cost(c.load)
        return sorted(self._rotated(sorted(candidates, key=lambda c: c.name)), key=lambda c: c.cost)  # stable


class CacheAware(Policy):
    name = "cache"

    def __init__(
        self,
        decode_weight: float = 16.0,
        tier_weights: dict[str, float] | None = None,
        affinity_tokens: float = 256.0,
    ):
        super().__init__(decode_weight)
        self.fixed = dict(tier_weights or {})  # given by the operator: they win over measured ones
        self.tier_weights = {**DEFAULT_TIER_WEIGHTS, **self.fixed}
        self.affinity_tokens = affinity_tokens

    def weights_for(self, c: Candidate) -> dict[str, float]:
        """Defaults, then what the replica measured, then what the operator fixed."""
        return {**DEFAULT_TIER_WEIGHTS, **(c.weights or {}), **self.fixed}

    def prefill_left(self, c: Candidate, prompt_tokens: int) -> float:
        weights = self.weights_for(c)
        saved = sum(weights.get(t, 0.0) * n for t, n in c.cached_by_tier.items())
        return max(prompt_tokens - saved, 0.0)

    def _order(self, candidates: list[Candidate], prompt_tokens: int, block_size: int) -> list[Candidate]:
        for c in candidates:
            c.cost = self.prefill_left(c, prompt_tokens) + self.load_cost(c.load)
            if c.affinity:
                c.cost -= self.affinity_tokens
        return sorted(self._rotated(sorted(candidates, key=lambda c: c.name)), key=lambda c: c.cost)


def measured_weights(rates: dict[str, object] | None, block_size: int) -> dict[str, float]:
    """Tier weights from a replica's own measurements (its ``/health`` ``tier_rates``): the share of a block's
    recompute time that loading it from each tier saves, ``1 - load seconds per block / (block size x recompute
    seconds per token)``. Empty until the replica has measured both."""
    if not isinstance(rates, dict):
        return {}
    per_token = rates.get("recompute_seconds_per_token")
    loads = rates.get("load_seconds_per_block")
    if not isinstance(per_token, (int, float)) or per_token <= 0 or not isinstance(loads, dict):
        return {}
    return {str(tier): round(min(1.0, max(0.0, 1.0 - load / (block_size * per_token))), 3)
            for tier, load in loads.items() if isinstance(load, (int, float)) and load >= 0}  # fmt: skip


def make_policy(name: str, decode_weight: float = 16.0, tier_weights: dict[str, float] | None = None,
                affinity_tokens: float = 256.0) -> Policy:  # fmt: skip
    if name == "cache":
        return CacheAware(decode_weight, tier_weights, affinity_tokens)
    if name == "round-robin":
        return RoundRobin(decode_weight)
    if name == "least-loaded":
        return LeastLoaded(decode_weight)
    raise ValueError(f"routing policy must be one of {', '.join(POLICIES)}, got {name!r}")
