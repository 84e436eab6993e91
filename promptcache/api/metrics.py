"""Prometheus metrics of one server (its own registry, so several servers can live in one process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from promptcache.pricing import TokenUsage

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("promptcache_requests", "Requests by API and outcome", ["api", "outcome"], registry=r)
        self.prefix_queries = Counter(
            "promptcache_prefix_cache_queries_tokens", "Prompt tokens looked up in the prefix cache", registry=r
        )
        self.prefix_hits = Counter(
            "promptcache_prefix_cache_hits_tokens", "Prompt tokens served from the prefix cache", registry=r
        )
        self.kv_blocks = Gauge("promptcache_kv_blocks", "KV blocks by state", ["state"], registry=r)
        self.kv_usage = Gauge("promptcache_kv_cache_usage_ratio", "Share of KV blocks in use by requests", registry=r)
        self.evictions = Gauge("promptcache_kv_evictions", "Cached blocks evicted so far", registry=r)
        self.preemptions = Gauge("promptcache_preemptions", "Requests preempted so far", registry=r)
        self.ttft = Histogram(
            "promptcache_time_to_first_token_seconds", "Time to first token", buckets=LATENCY_BUCKETS, registry=r
        )
        self.itl = Histogram(
            "promptcache_inter_token_latency_seconds", "Time between tokens", buckets=LATENCY_BUCKETS, registry=r
        )
        self.tokens = Counter("promptcache_tokens", "Tokens by kind", ["kind"], registry=r)
        self.cost = Counter("promptcache_cost_usd", "Cost in USD by kind", ["kind"], registry=r)
        self.response_cache_hits = Counter(
            "promptcache_response_cache_hits", "Requests answered from the response cache", registry=r
        )

    def record_usage(self, usage: TokenUsage, cost: dict[str, float]) -> None:
        self.prefix_queries.inc(usage.prompt_tokens)
        self.prefix_hits.inc(usage.cached_tokens)
        for kind, n in (
            ("input", usage.uncached_input_tokens),
            ("cached_input", usage.cached_tokens),
            ("cache_write_5m", usage.cache_write_5m_tokens),
            ("cache_write_1h", usage.cache_write_1h_tokens),
            ("output", usage.output_tokens),
        ):
            self.tokens.labels(kind).inc(n)
            self.cost.labels(kind).inc(cost.get(kind, 0.0))

    def set_cache_state(self, stats: dict[str, int | float]) -> None:
        for state in ("free", "cached", "in_use", "pinned"):
            self.kv_blocks.labels(state).set(stats[f"blocks_{state}"])
        self.kv_usage.set(stats["blocks_in_use"] / stats["num_blocks"])
        self.evictions.set(stats["evictions"])
        self.preemptions.set(stats["preemptions"])

    def render(self) -> bytes:
        return generate_latest(self.registry)
