"""Prometheus metrics of one server (its own registry, so several servers can live in one process)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

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
        self.tier_hits = Counter(
            "promptcache_prefix_cache_hits_by_tier_tokens", "Prompt tokens served from the cache, by the tier read",
            ["tier"], registry=r,
        )  # fmt: skip
        self.tiers = TierCollector()
        r.register(self.tiers)

    def record_usage(self, usage: TokenUsage, cost: dict[str, float]) -> None:
        self.prefix_queries.inc(usage.prompt_tokens)
        self.prefix_hits.inc(usage.cached_tokens)
        for tier, n in usage.cached_tokens_by_tier.items():
            self.tier_hits.labels(tier).inc(n)
        for kind, n in (
            ("input", usage.uncached_input_tokens),
            ("cached_input", usage.cached_tokens),
            ("cache_write_5m", usage.cache_write_5m_tokens),
            ("cache_write_1h", usage.cache_write_1h_tokens),
            ("output", usage.output_tokens),
        ):
            self.tokens.labels(kind).inc(n)
            self.cost.labels(kind).inc(cost.get(kind, 0.0))

    def set_cache_state(self, stats: dict[str, Any], tiers: dict[str, Any] | None = None) -> None:
        for state in ("free", "cached", "in_use", "pinned"):
            self.kv_blocks.labels(state).set(stats[f"blocks_{state}"])
        self.kv_usage.set(stats["blocks_in_use"] / stats["num_blocks"])
        self.evictions.set(stats["evictions"])
        self.preemptions.set(stats["preemptions"])
        if tiers is not None:
            self.tiers.snapshot = tiers

    def render(self) -> bytes:
        return generate_latest(self.registry)


class TierCollector:
    """Exports the lower tiers' own counters (kept by the cache package, which knows nothing of Prometheus)."""

    def __init__(self) -> None:
        self.snapshot: dict[str, Any] | None = None  # the engine's tier_stats(), refreshed before each scrape

    def describe(self) -> list[Metric]:
        return []  # the metric set depends on the configured tiers; collect() defines it

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot
        if not snap:
            return
        p = "promptcache_tier_"
        counters = {name: CounterMetricFamily(p + name, doc, labels=["tier"]) for name, doc in (
            ("hits_blocks", "Blocks loaded from the tier and verified"),
            ("misses_blocks", "Blocks asked of the tier and not loaded (absent, corrupt, late)"),
            ("stores_blocks", "Blocks written to the tier"),
            ("evictions_blocks", "Entries the tier dropped to stay within its budget"),
            ("read_bytes", "KV bytes read from the tier"),
            ("written_bytes", "KV bytes written to the tier"),
        )}  # fmt: skip
        errors = CounterMetricFamily(p + "errors", "Tier errors by kind (each one a miss or a dropped write)",
                                     labels=["tier", "kind"])  # fmt: skip
        gauges = {name: GaugeMetricFamily(p + name, doc, labels=["tier"]) for name, doc in (
            ("entries", "Entries held"),
            ("size_bytes", "Bytes held"),
            ("capacity_bytes", "The tier's budget in bytes (absent: no budget of ours)"),
            ("available", "1 while the tier is reachable, 0 while it is down"),
        )}  # fmt: skip
        read = HistogramMetricFamily(p + "read_seconds", "Latency of one load call", labels=["tier"])
        write = HistogramMetricFamily(p + "write_seconds", "Latency of writing one block", labels=["tier"])
        for t in snap["tiers"]:
            name = [t["tier"]]
            for metric, key in (("hits_blocks", "hits"), ("misses_blocks", "misses"), ("stores_blocks", "stores"),
                                ("evictions_blocks", "evictions"), ("read_bytes", "bytes_read"),
                                ("written_bytes", "bytes_written")):  # fmt: skip
                counters[metric].add_metric(name, t[key])
            for kind, n in t["errors"].items():
                errors.add_metric([t["tier"], kind], n)
            gauges["entries"].add_metric(name, t["entries"])
            gauges["size_bytes"].add_metric(name, t["size_bytes"])
            if t["capacity_bytes"] is not None:
                gauges["capacity_bytes"].add_metric(name, t["capacity_bytes"])
            gauges["available"].add_metric(name, 1.0 if t["available"] else 0.0)
            for family, key in ((read, "read_latency"), (write, "write_latency")):
                h = t[key]
                buckets = [("+Inf" if le == float("inf") else str(le), n) for le, n in h["buckets"]]
                family.add_metric(name, buckets, h["sum"])
        queue = GaugeMetricFamily(p + "write_queue_blocks", "Blocks waiting for the tier writer thread")
        queue.add_metric([], snap["write_queue_blocks"])
        dropped = CounterMetricFamily(p + "dropped_writes_blocks", "Blocks not queued for the lower tiers (full queue)")
        dropped.add_metric([], snap["dropped_writes"])
        yield from (*counters.values(), errors, *gauges.values(), read, write, queue, dropped)
