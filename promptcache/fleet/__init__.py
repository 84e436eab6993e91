"""The fleet: replicas that publish what their caches hold, and the cache-aware router in front of them.

NOTE: this package never imports the engine (nor torch): a router runs on a machine with no model, rebuilding the
replicas' tokenizer from what they send and computing the same block addresses with ``cache.hashing``.
"""
