"""The compiled decode step: the same tokens as the eager one, batch buckets with padding, eager beyond the largest
bucket, its start-up cost reported, and a clean fall-back to eager when compilation fails."""

from __future__ import annotations

import random

import pytest

from promptcache import LLM, SamplingParams
from promptcache.model import kernels

GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
SHAPE = {"hidden_size": 128, "intermediate_size": 256}


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(8192) for _ in range(rng.randrange(8, 40))] for _ in range(n)]


def tokens(llm: LLM, batch: list[list[int]]) -> list[list[int]]:
    return [o.token_ids for o in llm.generate(batch, GREEDY)]


@pytest.mark.parametrize("quantization", ["none", "int8", "int4"])
def test_compiled_and_eager_steps_give_identical_tokens(model_factory, quantization: str) -> None:
    folder = str(model_factory("qwen3", **SHAPE))
    # buckets 1 and 4 (4: three decodes padded to four); other batches run the eager layer with compiled products
    opts = dict(num_kv_blocks=256, max_num_seqs=4, quantization=quantization, compile_buckets=(1, 4))
    compiled, eager = LLM(model=folder, compile=True, **opts), LLM(model=folder, compile=False, **opts)
    assert compiled.engine.execution_info()["compiled_buckets"] == [1, 4]
    for batch in (prompts(1), prompts(3, seed=1), prompts(6, seed=2)):
        assert tokens(compiled, batch) == tokens(eager, batch)
    assert compiled.engine.model.compiled is not None and compiled.engine.model.compiled.failed is None
    assert compiled.engine.kv.pool.num_in_use == 0


def test_compile_start_up_cost_is_reported(model_factory) -> None:
    llm = LLM(model=str(model_factory("llama", **SHAPE)), num_kv_blocks=64, compile=True)
    info = llm.engine.execution_info()
    assert info["compiled_buckets"] == [1] and info["compile_failed"] is None
    assert isinstance(info["compile_seconds"], float) and info["compile_seconds"] > 0
    assert (
        LLM(model=str(model_factory("llama", **SHAPE)), num_kv_blocks=64, compile=False).engine.execution_info()[
            "compile_seconds"
        ]
        is None
    )


def test_a_failing_compiler_falls_back_to_eager_with_the_same_tokens(model_factory, monkeypatch) -> None:
    def unavailable(fn, **kwargs):
        def run(*args, **kw):
            raise RuntimeError("no C++ compiler found")  # what inductor raises at the first call without g++

        return run

    folder = str(model_factory("llama", **SHAPE))
    expected = tokens(LLM(model=folder, num_kv_blocks=64, compile=False), prompts(2))
    monkeypatch.setattr(kernels.torch, "compile", unavailable)
    llm = LLM(model=folder, num_kv_blocks=64, max_num_seqs=2, compile=True)
    info = llm.engine.execution_info()
    assert info["compiled_buckets"] is None and "no C++ compiler" in str(info["compile_failed"])
    assert tokens(llm, prompts(2)) == expected


def test_padding_rows_never_write_the_kv_pool(model_factory) -> None:
    """3 decodes run as a bucket of 4: only their own 3 slots may change in the pool."""
    llm = LLM(model=str(model_factory("llama", **SHAPE)), num_kv_blocks=64, max_num_seqs=4, compile=True)
    eng = llm.engine
    reqs = [eng.add_request(p, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)) for p in prompts(3)]
    eng.step()  # prefills
    before = eng.runner.kv_cache.clone()
    eng.step()  # one decode step for the 3
    after = eng.runner.kv_cache
    # the pool is allocated uninitialised: a NaN left in an unwritten slot is unchanged, though NaN != NaN
    same = (after == before) | (after.isnan() & before.isnan())
    changed = (~same).any(dim=(0, 1, 3, 4)).nonzero().flatten().tolist()
    bs = eng.config.block_size
    written = sorted(r.seq.block_ids[(r.num_computed - 1) // bs] * bs + (r.num_computed - 1) % bs for r in reqs)
    assert changed == written
    while eng.has_unfinished_requests():
        eng.step()
    assert eng.kv.pool.num_in_use == 0
