"""The Python API, shaped like vLLM's: ``LLM(...).generate(prompts, SamplingParams(...))`` and ``.chat(messages)``."""

from __future__ import annotations

from collections.abc import Sequence
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
            render_chat_ids(
                self.tokenizer, conv, self.replay, namespace, tools, add_generation_prompt, **template_kwargs
            )  # type: ignore[arg-type]
            for conv in conversations
        ]
        for ids, sp in zip(encoded, params):
            self.engine.validate(ids, sp)
        outs = self._run(encoded, params, [namespace] * len(encoded), [None] * len(encoded))
        for out in outs:
            ids = replay_ids(self.tokenizer, out.token_ids, out.text, self.engine.eos_token_ids)
            if ids is not None:
                self.replay.remember(namespace, out.text, ids)
        return outs

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
        return self.engine.cache_stats()
