"""A request's parameters, its live state inside the engine, and what it returns to the caller."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from promptcache.cache.manager import SeqBlocks
from promptcache.engine.structured import StructuredOutput

MIN_TEMPERATURE = 1e-5


@dataclass
class SamplingParams:
    """How to generate: shaped like vLLM's ``SamplingParams``.

    temperature 0 is greedy. ``seed`` makes sampling reproducible per request, whatever else is in the batch.
    ``logprobs`` asks for the top-n log-probabilities of each generated token (the sampled one always included).
    ``structured_output`` keeps the output inside a JSON schema, regex, choice list or grammar (engine/structured.py);
    the request ends as soon as the output is complete.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int = 16
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    include_stop_str_in_output: bool = False
    structured_output: StructuredOutput | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])

    def validate(self, vocab_size: int) -> None:
        """Raise ValueError naming the first parameter out of range."""
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if self.seed is not None and not -(2**63) <= self.seed < 2**64:
            raise ValueError(f"seed must be a 64-bit integer, got {self.seed}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"top_k must be -1 (disabled) or >= 1, got {self.top_k}")
        if self.top_k >= vocab_size:
            self.top_k = -1  # every token kept: no truncation (and a huge k overflowed inside the step)
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError(f"logprobs must be between 0 and 20, got {self.logprobs}")
        if any(not s for s in self.stop or []):
            raise ValueError("stop strings must be non-empty")
        bad = [t for t in self.stop_token_ids or [] if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"stop_token_ids {bad} are outside the vocabulary (size {vocab_size})")

    @property
    def greedy(self) -> bool:
        # NOTE: below MIN_TEMPERATURE, sampling is greedy: logits divided by a denormal temperature (5e-324 is valid
        # JSON) overflow to inf, and a softmax of inf is NaN, which failed the whole batch's step.
        return self.temperature < MIN_TEMPERATURE


@dataclass
class Logprob:
    """Log-probability of one token (vLLM's shape); ``rank`` is 1 for the most likely token."""

    logprob: float
    rank: int
    decoded_token: str | None = None


@dataclass
class RequestMetrics:
    """Timestamps (time.perf_counter seconds) and the durations a user asks about."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def decode_time(self) -> float | None:
        if self.first_token_time is None or self.finished_time is None:
            return None
        return self.finished_time - self.first_token_time

    @property
    def queue_time(self) -> float | None:
        return None if self.first_scheduled_time is None else self.first_scheduled_time - self.arrival_time


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    """One sequence inside the engine.

    ``token_ids`` is prompt + output; the KV of ``token_ids[:num_computed]`` is written in ``seq.blocks``.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    namespace: str
    seq: SeqBlocks
    prompt: str | None = None
    eos_token_ids: frozenset[int] = frozenset()
    token_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    num_cached_tokens: int | None = None  # prompt tokens whose KV came from the cache, fixed at first admission
    cached_tokens_by_tier: dict[str, int] = field(default_factory=dict)  # the same, by tier ("device", "host", ...)
    retention_seconds: float = 0.0  # keep the prompt's blocks in the lower tiers this long (prompt_cache_retention)
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    num_preemptions: int = 0
    matcher: Any = None  # the structured output's grammar state (llguidance LLMatcher), if constrained
    # Explicit cache breakpoints: (number of leading prompt tokens, TTL in seconds) to pin once prefilled.
    cache_breakpoints: list[tuple[int, float]] = field(default_factory=list)
    written_blocks: list[int] = field(default_factory=list)  # prompt blocks this request wrote into the cache
    block_size: int = 16
    logprobs: list[dict[int, Logprob]] | None = None
    text: str = ""
    num_streamed_chars: int = 0  # text[:num_streamed_chars] has been handed out as new_text
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(time.perf_counter()))

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)
        if self.params.logprobs is not None and self.logprobs is None:
            self.logprobs = []

    @property
    def num_cache_write_tokens(self) -> int:
        """Prompt tokens this request wrote into the cache (full blocks no one had cached)."""
        return len(self.written_blocks) * self.block_size

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED


@dataclass
class RequestOutput:
    """What ``LLM.generate`` returns per prompt (and what the engine streams, with ``finished`` False)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str | None
    stop_reason: int | str | None
    num_cached_tokens: int
    metrics: RequestMetrics
    logprobs: list[dict[int, Logprob]] | None = None
    finished: bool = True
    num_cache_write_tokens: int = 0  # prompt tokens this request wrote into the cache (full blocks)
    cached_tokens_by_tier: dict[str, int] = field(default_factory=dict)  # num_cached_tokens by source tier
    written_blocks: list[int] = field(default_factory=list)  # which prompt blocks (index) it wrote
    new_token_ids: list[int] = field(default_factory=list)  # tokens since the previous output of a stream
    new_text: str = ""

    @property
    def outputs(self) -> list[RequestOutput]:
        """vLLM's ``out.outputs[0].text`` spelling: one completion per request, which is this object."""
        return [self]
