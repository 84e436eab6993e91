"""The Python API, shaped like vLLM's: ``LLM(...).generate(prompts, SamplingParams(...))`` and ``.chat(messages)``."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from promptcache.engine.engine import EngineConfig, LLMEngine
from promptcache.engine.request import RequestOutput, SamplingParams
from promptcache.replay import ReplayStore, render_chat_ids, replay_ids

Prompt = str | list[int]
Message = dict[str, Any]


class LLM:
    """An in-process engine over one model (the embedded default model unless ``model`` names a HF folder).

    >>> llm = LLM()
    >>> out = llm.generate(["Hello"], SamplingParams(temperature=0.0, max_tokens=8))[0]
    >>> out.text, out.num_cached_tokens
    """

    def __init__(self, model: str | None = None, **kwargs: Any):
        unknown = set(kwargs) - set(EngineConfig.__dataclass_fields__)
        if unknown:
            raise TypeError(f"unknown LLM arguments: {', '.join(sorted(unknown))}")
        self.engine = LLMEngine(EngineConfig(model=model, **kwargs))
        self.tokenizer = self.engine.tokenizer
        self.replay = ReplayStore()

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        namespace: str = "default",
    ) -> list[RequestOutput]:
        """Run every prompt as one continuously batched workload; outputs come back in prompt order.

        A prompt is text or a list of token ids. Bad input raises ValueError before any prompt is queued.
        """
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)  # type: ignore[arg-type]
        params = self._params_list(sampling_params, len(prompts))
        encoded = [self.engine.encode_prompt(p) for p in prompts]
        for ids, sp in zip(encoded, params):
            self.engine.validate(ids, sp)
        return self._run(
            encoded, params, [namespace] * len(prompts), [p if isinstance(p, str) else None for p in prompts]
        )

    def chat(
        self,
        messages: list[Message] | Sequence[list[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        tools: list[dict[str, Any]] | None = None,
        namespace: str = "default",
        add_generation_prompt: bool = True,
        **template_kwargs: Any,
    ) -> list[RequestOutput]:
        """Chat through the model's template. Earlier answers of this LLM come back with their exact token ids,
        so a follow-up turn hits the cache through the whole previous answer."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)  # type: ignore[list-item]
        params = self._params_list(sampling_params, len(conversations))
        encoded = [
            self._render_chat(conv, tools, namespace, add_generation_prompt, template_kwargs)  # type: ignore[arg-type]
            for conv in conversations
        ]
        for ids, sp in zip(encoded, params):
            self.engine.validate(ids, sp)
        outs = self._run(encoded, params, [namespace] * len(encoded), [None] * len(encoded))
        for out in outs:
            self._remember(out, namespace)
        return outs

    def stream_chat(
        self,
        messages: list[Message],
        sampling_params: SamplingParams | None = None,
        tools: list[dict[str, Any]] | None = None,
        namespace: str = "default",
        add_generation_prompt: bool = True,
        **template_kwargs: Any,
    ) -> Iterator[RequestOutput]:
        """Chat as :meth:`chat` does, for one conversation, yielding outputs as the tokens are generated.

        Each output's ``new_text`` is the text since the previous one (joined, they are the final ``text``); the
        last has ``finished`` True and carries the finish reason, cached-token count and metrics. The final answer
        is remembered for token-exact replay, as :meth:`chat` does, so the next turn hits the cache through it.

        The prompt is rendered and checked now, so bad input raises ValueError at the call and queues nothing; the
        request is queued when iteration starts. Stopping early (``break``, ``close()``, an exception in the
        caller's loop) aborts the request and frees its blocks; its full blocks stay cached.

        >>> for out in llm.stream_chat([{"role": "user", "content": "Hi!"}]):
        ...     print(out.new_text, end="", flush=True)
        """
        sp = sampling_params or SamplingParams()
        ids = self._render_chat(messages, tools, namespace, add_generation_prompt, template_kwargs)
        self.engine.validate(ids, sp)
        return self._stream(ids, sp, namespace)

    def _render_chat(
        self,
        messages: list[Message],
        tools: list[dict[str, Any]] | None,
        namespace: str,
        add_generation_prompt: bool,
        template_kwargs: dict[str, Any],
    ) -> list[int]:
        return render_chat_ids(
            self.tokenizer, messages, self.replay, namespace, tools, add_generation_prompt, **template_kwargs
        )

    def _remember(self, out: RequestOutput, namespace: str) -> None:
        """Keep the ids behind a finished answer, so that a later turn quoting it replays them exactly."""
        ids = replay_ids(self.tokenizer, out.token_ids, out.text, self.engine.eos_token_ids)
        if ids is not None:
            self.replay.remember(namespace, out.text, ids)

    def _stream(self, ids: list[int], sp: SamplingParams, namespace: str) -> Iterator[RequestOutput]:
        engine = self.engine
        # Queued here, not in stream_chat: a generator that is never started can then never leak a request.
        req = engine.add_request(ids, sp, namespace=namespace)
        try:
            while not req.finished:
                for out in engine.step():
                    if out.request_id != req.request_id:
                        continue
                    if out.finished:  # before the yield: a caller that stops at the last output still gets replay
                        self._remember(out, namespace)
                    yield out
        finally:
            # A no-op once finished; otherwise the caller stopped early (GeneratorExit) or step() raised.
            engine.abort(req.request_id)
            engine.release(req.request_id)

    def _params_list(self, sp: SamplingParams | Sequence[SamplingParams] | None, n: int) -> list[SamplingParams]:
        if sp is None or isinstance(sp, SamplingParams):
            return [sp or SamplingParams()] * n
        sp = list(sp)
        if len(sp) != n:
            raise ValueError(f"got {len(sp)} SamplingParams for {n} prompts")
        return sp

    def _run(
        self, encoded: list[list[int]], params: list[SamplingParams], namespaces: list[str], texts: list[str | None]
    ) -> list[RequestOutput]:
        engine = self.engine
        reqs = [engine.add_request(ids, sp, namespace=ns) for ids, sp, ns in zip(encoded, params, namespaces)]
        for req, text in zip(reqs, texts):
            req.prompt = text
        try:
            while any(not r.finished for r in reqs):
                engine.step()
        finally:
            for r in reqs:
                engine.abort(r.request_id)
        outs = [engine.output_of(r.request_id) for r in reqs]
        for r in reqs:
            engine.release(r.request_id)
        return outs

    def cache_stats(self) -> dict[str, int | float | str]:
        """The KV cache's blocks (free / cached / in use / pinned), hits, evictions and preemptions."""
        return self.engine.cache_stats()

    def close(self) -> None:
        """Finish pending writes to the cache tiers (disk, Redis) and release them; the LLM is not used after."""
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
