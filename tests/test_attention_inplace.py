"""In-place paged attention (cached context read as contiguous runs of the pool, partial results merged by their
log-sum-exps) against the old gather path: same tokens, same logits, for every family and engine situation."""

from __future__ import annotations

import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from promptcache import LLM, SamplingParams
from promptcache.engine.engine import EngineConfig
from promptcache.engine.request import Request
from promptcache.engine.runner import MIN_IN_PLACE_RUN, ModelRunner, contiguous_runs
from promptcache.model.attention import attention_with_lse, math_attention_with_lse, merge_partials
from promptcache.model.context import ForwardContext, KVRun

N = 12
GREEDY = SamplingParams(temperature=0.0, max_tokens=N, ignore_eos=True)


def prompt(seed: int, length: int, vocab: int = 8192) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(vocab) for _ in range(length)]


# ---- the runs ---------------------------------------------------------------------------------------------------
def test_consecutive_blocks_make_one_run() -> None:
    assert contiguous_runs([3, 4, 5], 4, 0, 12) == [(12, 24)]


def test_gaps_split_runs() -> None:
    assert contiguous_runs([3, 7, 8, 2], 4, 0, 16) == [(12, 16), (28, 36), (8, 12)]
    assert contiguous_runs([5, 4, 3], 4, 0, 12) == [(20, 24), (16, 20), (12, 16)]  # descending ids never merge


def test_partial_first_and_last_blocks() -> None:
    # Positions 2..9: the end of block 3, all of block 4 (consecutive: one run), the start of block 9.
    assert contiguous_runs([3, 4, 9], 4, 2, 10) == [(14, 20), (36, 38)]
    assert contiguous_runs([3, 4, 9], 4, 5, 7) == [(17, 19)]  # inside one block
    assert contiguous_runs([3, 4, 9], 4, 4, 4) == []


def fake_runner(window: int | None, block_size: int, device: str = "cpu", attention: str = "paged") -> ModelRunner:
    """A runner over a stand-in model: only the config fields the context building reads."""
    cfg = SimpleNamespace(sliding_window=window, num_layers=1, num_kv_heads=1, head_dim=2)
    model = SimpleNamespace(cfg=cfg)
    return ModelRunner(model, 64, block_size, torch.float32, torch.device(device), attention)  # type: ignore[arg-type]


def test_attention_modes() -> None:
    assert fake_runner(None, 4).in_place
    assert not fake_runner(None, 4, attention="gather").in_place
    # Only the CPU flash kernel (which takes a mask and returns the log-sum-exp) is wired in: other devices gather.
    assert not fake_runner(None, 4, device="meta").in_place
    with pytest.raises(ValueError, match="attention must be one of"):
        fake_runner(None, 4, attention="dense")


def slots_of(run: KVRun) -> list[int]:
    return list(range(run.slots.start, run.slots.stop)) if isinstance(run.slots, slice) else run.slots.tolist()


@pytest.mark.parametrize("window", [None, 5, 24, 40])
@pytest.mark.parametrize("min_run", [1, 8, MIN_IN_PLACE_RUN])
def test_runs_cover_exactly_what_each_query_sees(window: int | None, min_run: int) -> None:
    """Over random block tables and chunks: every query attends (through the runs' rows and masks) to exactly the
    cached keys its causal window holds, each once, and never to a run in which it sees nothing."""
    bs = 4
    runner = fake_runner(window, bs)
    runner.min_in_place_run = min_run
    rng = random.Random(window or 0)
    for _ in range(40):
        start, n = rng.randrange(1, 90), rng.randrange(2, 30)
        ids = rng.sample(range(64), -(-(start + n) // bs))
        if rng.random() < 0.5:  # long consecutive stretches too
            first = rng.randrange(0, 64 - len(ids))
            ids = list(range(first, first + len(ids)))
        slot_pos = {ids[p // bs] * bs + p % bs: p for p in range(start + n)}
        seen: list[list[int]] = [[] for _ in range(n)]
        for run in runner._cached_runs(ids, start, n):
            keys = [slot_pos[s] for s in slots_of(run)]
            assert 1 <= run.rows <= n
            keep = torch.ones(run.rows, len(keys), dtype=torch.bool) if run.mask is None else run.mask == 0
            assert keep.any(1).all(), "a query attends to a run in which it sees nothing"
            for i in range(run.rows):
                seen[i] += [k for k, kept in zip(keys, keep[i].tolist()) if kept]
        for i in range(n):
            p = start + i
            lo = 0 if window is None else max(0, p - window + 1)
            assert sorted(seen[i]) == list(range(lo, start)), (start, n, i)


# ---- the kernel and the merge -----------------------------------------------------------------------------------
def test_partial_passes_merge_to_full_attention() -> None:
    """Causal own keys + disjoint cached pieces (one masked, one seen only by the first rows) == one SDPA."""
    torch.manual_seed(0)
    heads, kv_heads, d, n, cached = 6, 2, 16, 9, 40
    q = torch.randn(1, heads, n, d)
    k, v = torch.randn(1, kv_heads, cached + n, d), torch.randn(1, kv_heads, cached + n, d)
    full_mask = torch.zeros(n, cached + n)
    full_mask[:, cached:] = torch.full((n, n), float("-inf")).triu(1)
    full_mask[4:, 10:14] = float("-inf")  # rows 4.. do not see keys 10..13
    full_mask[:, 14:20] = float("-inf")  # no row sees keys 14..19
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), full_mask)
    ref = ref[0].transpose(0, 1)
    parts = [attention_with_lse(q, k[:, :, cached:], v[:, :, cached:], None, causal=True)]
    parts.append(attention_with_lse(q, k[:, :, :10], v[:, :, :10], None, causal=False))
    parts.append(attention_with_lse(q[:, :, :4], k[:, :, 10:14], v[:, :, 10:14], None, causal=False))
    parts.append(attention_with_lse(q, k[:, :, 20:cached], v[:, :, 20:cached], full_mask[:, 20:cached], causal=False))
    torch.testing.assert_close(merge_partials(parts), ref, atol=1e-6, rtol=1e-5)
    # Two parts covering every row take a shortcut (a sigmoid of the log-sum-exp difference): the same result.
    two_mask = full_mask.clone()
    two_mask[:, 10:cached] = float("-inf")
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), two_mask)
    torch.testing.assert_close(merge_partials(parts[:2]), ref[0].transpose(0, 1), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_cpu_kernel_returns_natural_log_sum_exp(causal: bool) -> None:
    """The CPU flash kernel's (out, lse) layout and log base, against plain float32 math on strided inputs."""
    torch.manual_seed(1)
    q = torch.randn(7, 6, 8).transpose(0, 1).unsqueeze(0)  # [1, H, L, D] with the flat batch's strides
    k, v = (torch.randn(7, 2, 8).transpose(0, 1).unsqueeze(0) for _ in range(2))
    mask = None if causal else torch.zeros(7, 7).masked_fill_(torch.rand(7, 7) < 0.3, float("-inf")).fill_diagonal_(0)
    out, lse = attention_with_lse(q, k, v, mask, causal)
    ref_out, ref_lse = math_attention_with_lse(q, k, v, mask, causal)
    assert out.shape == (7, 6, 8) and lse.shape == (6, 7) and lse.dtype == torch.float32
    torch.testing.assert_close(out, ref_out, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)


# ---- the model, in-place vs gather ------------------------------------------------------------------------------
class Recorded:
    """An LLM on CPU/float32 whose runner records every step's context and logits."""

    def __init__(self, path: Path, attention: str, min_run: int = 1, **kwargs: object) -> None:
        kwargs = {"num_kv_blocks": 64, "device": "cpu", "dtype": "float32", **kwargs}
        if "attention" in EngineConfig.__dataclass_fields__:
            self.llm = LLM(model=str(path), attention=attention, **kwargs)
        else:  # the engine has no attention option yet: swap in a runner built for the mode
            self.llm = LLM(model=str(path), **kwargs)
            eng = self.llm.engine
            eng.runner = ModelRunner(eng.model, eng.kv.pool.num_blocks, eng.kv.block_size, eng.dtype, eng.device,
                                     attention=attention)  # fmt: skip
        runner = self.llm.engine.runner
        assert runner.attention == attention
        runner.min_in_place_run = min_run
        self.contexts: list[ForwardContext] = []
        self.logits: list[torch.Tensor] = []
        build, execute = runner.build, runner.execute

        def recording_build(work: list[tuple[Request, int]]) -> tuple[torch.Tensor, ForwardContext, list[Request]]:
            ids, ctx, sampled = build(work)
            self.contexts.append(ctx)
            return ids, ctx, sampled

        def recording_execute(work: list[tuple[Request, int]]) -> tuple[torch.Tensor | None, list[Request]]:
            logits, sampled = execute(work)
            if logits is not None:
                self.logits.append(logits.clone())
            return logits, sampled

        runner.build, runner.execute = recording_build, recording_execute

    def generate(self, prompts: list[list[int]], params: SamplingParams = GREEDY) -> list[list[int]]:
        return [o.token_ids for o in self.llm.generate(prompts, params)]

    def runs(self) -> list[list[KVRun]]:
        """The runs of every prefill chunk so far that had cached context."""
        return [p.runs for ctx in self.contexts for p in ctx.prefills if p.runs]


def run_len(run: KVRun) -> int:
    return run.slots.stop - run.slots.start if isinstance(run.slots, slice) else len(run.slots)


def assert_same(paged: Recorded, gather: Recorded) -> None:
    """Every step's logits within 1e-5 (float32), and only the paged engine read runs."""
    assert len(paged.logits) == len(gather.logits)
    for ours, ref in zip(paged.logits, gather.logits):
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    assert paged.runs(), "the in-place path never ran"
    assert not gather.runs()


FAMILIES = [("llama", {}), ("mistral", {"sliding_window": 24}), ("qwen2", {"tie": True}), ("qwen3", {})]


@pytest.mark.parametrize(("family", "kwargs"), FAMILIES, ids=[f for f, _ in FAMILIES])
def test_cold_and_prefix_hit_match_gather(model_factory, family: str, kwargs: dict) -> None:
    path = model_factory(family, **kwargs)
    paged, gather = Recorded(path, "paged"), Recorded(path, "gather")
    first = prompt(1, 110)
    second = first[:96] + prompt(2, 20)
    for prompts in ([first], [second]):
        assert paged.generate(prompts) == gather.generate(prompts)
    assert paged.llm.engine.requests == {} and gather.llm.engine.requests == {}
    hit = paged.runs()[-1]
    # Without a window all 96 cached tokens; with one, only the last 23 (the first query's window), partly masked.
    assert sum(run_len(r) for r in hit) == (96 if family != "mistral" else 23)
    assert_same(paged, gather)


@pytest.mark.parametrize("budget", [20, 40])
def test_sliding_window_with_chunked_prefill_matches_gather(model_factory, budget: int) -> None:
    """Window 24, block 16, prompts of 100+ tokens prefilled in chunks shorter and longer than the window, some
    sharing a prefix: masked and unmasked runs, runs the window has passed, and a window inside the chunk."""
    path = model_factory("mistral", sliding_window=24)
    paged = Recorded(path, "paged", max_num_batched_tokens=budget, num_kv_blocks=96)
    gather = Recorded(path, "gather", max_num_batched_tokens=budget, num_kv_blocks=96)
    shared = prompt(3, 70)
    prompts = [shared + prompt(4, 50), prompt(5, 130), shared + prompt(6, 35)]
    assert paged.generate(prompts) == gather.generate(prompts)
    masked = [r for runs in paged.runs() for r in runs if r.mask is not None]
    assert masked, "no run needed a window mask"
    assert any(r.rows < budget for r in masked)  # the later queries skipped a run the window had passed
    assert any(p.mask is not None and p.runs for ctx in paged.contexts for p in ctx.prefills) == (budget > 24)
    assert_same(paged, gather)


@pytest.mark.parametrize("min_run", [1, 32, MIN_IN_PLACE_RUN])
def test_fragmented_block_table_matches_gather(model_factory, min_run: int) -> None:
    """Two conversations decoding side by side take alternate blocks; a follow-up turn of one hits its
    fragmented prefix. Pieces are read in place (min_run 1), gathered together (the default), or a mix."""
    path = model_factory("qwen2")
    params = SamplingParams(temperature=0.0, max_tokens=96, ignore_eos=True)
    paged, gather = Recorded(path, "paged", min_run), Recorded(path, "gather")
    turns = [prompt(7, 40), prompt(8, 40)]
    outs = paged.generate(turns, params)
    assert outs == gather.generate(turns, params)
    follow_up = turns[0] + outs[0] + prompt(9, 30)
    kv = paged.llm.engine.kv
    seq = kv.new_seq("default")
    cached = [b.block_id for b in kv.match(seq, follow_up)]
    tail, k = kv._match_tail(seq, follow_up, len(cached))  # the first turn's last, partial block
    # Both conversations grew a block at the same decode steps, so the first one's blocks alternate with the
    # second's after its prompt: several pieces, each one block long.
    assert len(cached) == 8 and tail is not None and k == 40 + 96 - 1 - 128
    pieces = contiguous_runs([*cached, tail.block_id], 16, 0, 16 * len(cached) + k)
    assert len(pieces) > 1, f"the block table was not fragmented: {cached}"
    assert paged.generate([follow_up]) == gather.generate([follow_up])
    hit = paged.runs()[-1]
    assert sum(run_len(r) for r in hit) == 16 * len(cached) + k
    in_place = [r for r in hit if isinstance(r.slots, slice)]
    expected = sum(1 for a, b in pieces if b - a >= min_run)
    assert len(in_place) == expected and len(hit) == expected + (expected < len(pieces))
    assert_same(paged, gather)
