"""Our forward against transformers on the same weights: logits and greedy tokens, in every engine situation."""

from __future__ import annotations

import random

import pytest
import torch
from conftest import hf_greedy, hf_logits, our_prefill_logits

from promptcache import LLM, SamplingParams

N = 32
GREEDY = SamplingParams(temperature=0.0, max_tokens=N, ignore_eos=True)


def prompt(seed: int, length: int, vocab: int = 8192) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(vocab) for _ in range(length)]


CASES: list[tuple[str, dict]] = [
    ("llama", {}),
    ("llama", {"tie": True, "shard": True}),
    ("llama3", {}),
    ("mistral", {}),
    ("mistral", {"sliding_window": 48}),
    ("qwen2", {"tie": True}),
    ("qwen3", {}),
]
IDS = [f"{f}-{'-'.join(k) or 'plain'}" for f, k in CASES]


@pytest.mark.parametrize(("family", "kwargs"), CASES, ids=IDS)
def test_prefill_logits_match_transformers(model_factory, family: str, kwargs: dict) -> None:
    path = model_factory(family, **kwargs)
    llm = LLM(model=str(path), num_kv_blocks=64, device="cpu", dtype="float32")
    ids = prompt(1, 300)
    ours, ref = our_prefill_logits(llm, ids), hf_logits(path, ids)
    torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize(("family", "kwargs"), CASES, ids=IDS)
def test_greedy_tokens_match_cold_and_with_prefix_hit(model_factory, family: str, kwargs: dict) -> None:
    path = model_factory(family, **kwargs)
    llm = LLM(model=str(path), num_kv_blocks=128, device="cpu")
    first = prompt(2, 100)
    second = first[:80] + prompt(3, 30)
    cold = llm.generate([first], GREEDY)[0]
    assert cold.num_cached_tokens == 0
    assert cold.token_ids == hf_greedy(path, first, N)
    hit = llm.generate([second], GREEDY)[0]
    assert hit.num_cached_tokens == 80
    assert hit.token_ids == hf_greedy(path, second, N)


def test_greedy_tokens_match_in_a_mixed_batch_with_chunked_prefill(model_factory) -> None:
    path = model_factory("qwen2")
    # A budget of 24 tokens per step chunks every prompt and mixes prefill chunks with decodes of others.
    llm = LLM(model=str(path), num_kv_blocks=256, max_num_batched_tokens=24)
    shared = prompt(4, 40)
    prompts = [prompt(5, 7), shared + prompt(6, 50), prompt(7, 90), shared + prompt(8, 20), prompt(9, 1)]
    outs = llm.generate(prompts, GREEDY)
    for p, out in zip(prompts, outs):
        assert out.token_ids == hf_greedy(path, p, N)
    assert llm.engine.num_steps > N + 5  # the prefills really were chunked across steps


def test_greedy_tokens_match_after_preemption_and_eviction(model_factory) -> None:
    path = model_factory("llama3")
    # 14 blocks of 16 tokens: four requests of ~70 + 32 tokens cannot all fit, so the newest are preempted and
    # recomputed, and cached blocks are evicted to make room.
    llm = LLM(model=str(path), num_kv_blocks=14, block_size=16)
    prompts = [prompt(10 + i, 60 + 5 * i) for i in range(4)]
    outs = llm.generate(prompts, GREEDY)
    stats = llm.cache_stats()
    assert stats["preemptions"] > 0
    assert stats["evictions"] > 0
    for p, out in zip(prompts, outs):
        assert out.token_ids == hf_greedy(path, p, N)
    assert stats["blocks_in_use"] == 0
    llm.engine.kv.pool.check_integrity()


def test_caching_disabled_gives_the_same_tokens(model_factory) -> None:
    path = model_factory("qwen3")
    prompts = [prompt(20, 70), prompt(20, 70)[:64] + prompt(21, 10)]
    on = LLM(model=str(path), num_kv_blocks=64)
    off = LLM(model=str(path), num_kv_blocks=64, enable_prefix_caching=False)
    on_outs = [on.generate([p], GREEDY)[0] for p in prompts]
    off_outs = [off.generate([p], GREEDY)[0] for p in prompts]
    assert on_outs[1].num_cached_tokens == 64 and off_outs[1].num_cached_tokens == 0
    assert [o.token_ids for o in on_outs] == [o.token_ids for o in off_outs]


def test_request_state_is_clean_after_generate(model_factory) -> None:
    llm = LLM(model=str(model_factory("llama")), num_kv_blocks=64)
    llm.generate([prompt(30, 50), prompt(31, 20)], GREEDY)
    assert llm.engine.requests == {}
    assert not llm.engine.has_unfinished_requests()
