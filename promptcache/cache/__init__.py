"""The prefix cache: content-addressed, hash-chained KV blocks (free of torch, unit-testable alone)."""
