"""Model definitions, weight loading and attention over the paged KV cache."""
