"""Benchmarks: promptcache against transformers on the same weights, ratios measured in one run."""
