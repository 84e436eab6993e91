"""promptcache: an LLM inference engine whose KV cache is a cross-request prompt cache.

The public names are imported lazily so that ``promptcache.cache`` (pure Python) loads without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["LLM", "Logprob", "RequestOutput", "SamplingParams", "StructuredOutput"]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from promptcache.engine.request import Logprob, RequestOutput, SamplingParams
    from promptcache.engine.structured import StructuredOutput
    from promptcache.llm import LLM


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from promptcache.llm import LLM

        return LLM
    if name in ("Logprob", "RequestOutput", "SamplingParams"):
        from promptcache.engine import request

        return getattr(request, name)
    if name == "StructuredOutput":
        from promptcache.engine.structured import StructuredOutput

        return StructuredOutput
    raise AttributeError(f"module 'promptcache' has no attribute {name!r}")
