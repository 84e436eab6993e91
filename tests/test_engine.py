"""The engine through its Python API, on the embedded default model: caching, chat replay, sampling, errors."""

from __future__ import annotations

import random
import re
import subprocess
import sys

import pytest

from promptcache import LLM, SamplingParams

BS = 16
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(kv_cache_memory_gb=0.25)


def ids(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(8192) for _ in range(n)]


def assert_clean(llm: LLM) -> None:
    """No finished request holds a block, and the pool's invariants hold."""
    stats = llm.cache_stats()
    assert stats["blocks_in_use"] == 0
    assert stats["blocks_free"] + stats["blocks_cached"] + stats["blocks_in_use"] == stats["num_blocks"]
    llm.engine.kv.pool.check_integrity()


# ---- the prefix cache ------------------------------------------------------------------------------------------
def test_shared_1000_token_prefix_is_reported_cached_to_the_block(llm: LLM) -> None:
    prefix = ids(1, 1000)
    first = llm.generate([prefix + ids(2, 20)], GREEDY)[0]
    second = llm.generate([prefix + ids(3, 20)], GREEDY)[0]
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens == 1000 // BS * BS
    assert_clean(llm)


def test_text_prompts_hit_the_cache_too(llm: LLM) -> None:
    doc = "The quick brown fox jumps over the lazy dog. " * 60
    a = llm.generate([doc + "Question one?"], GREEDY)[0]
    b = llm.generate([doc + "Another question entirely?"], GREEDY)[0]
    shared = 0
    while a.prompt_token_ids[shared] == b.prompt_token_ids[shared]:
        shared += 1
    assert b.num_cached_tokens == shared // BS * BS > 500


def test_generated_tokens_are_cached_for_the_next_request(llm: LLM) -> None:
    prompt = ids(4, 50)
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True))[0]
    follow = llm.generate([prompt + out.token_ids + ids(5, 10)], GREEDY)[0]
    # Every token whose KV was computed (all but the last sampled one) is cached, down to a block.
    assert follow.num_cached_tokens == (len(prompt) + len(out.token_ids) - 1) // BS * BS


def test_identical_prompt_leaves_one_token_to_compute(llm: LLM) -> None:
    prompt = ids(6, 64)
    llm.generate([prompt], GREEDY)
    again = llm.generate([prompt], GREEDY)[0]
    assert again.num_cached_tokens == 48  # 64 tokens = 4 blocks, but the last token must be computed


def test_namespaces_never_share_cached_blocks(llm: LLM) -> None:
    prompt = ids(7, 200)
    llm.generate([prompt], GREEDY, namespace="tenant-a")
    other = llm.generate([prompt], GREEDY, namespace="tenant-b")[0]
    same = llm.generate([prompt], GREEDY, namespace="tenant-a")[0]
    assert other.num_cached_tokens == 0
    assert same.num_cached_tokens == 192
    assert other.token_ids == same.token_ids


def test_batch_of_prompts_returns_in_order_and_shares_prefix(llm: LLM) -> None:
    prefix = ids(8, 160)
    prompts = [prefix + ids(9 + i, 5 + i) for i in range(6)]
    outs = llm.generate(prompts, GREEDY)
    assert [o.prompt_token_ids for o in outs] == prompts
    assert all(len(o.token_ids) == GREEDY.max_tokens for o in outs)
    assert_clean(llm)


def test_longest_prefix_first_admits_cache_hits_first() -> None:
    llm = LLM(kv_cache_memory_gb=0.05, max_num_seqs=1, scheduling_policy="lpm")
    warm = ids(10, 300)
    llm.generate([warm], GREEDY)
    cold_out, warm_out = llm.generate([ids(11, 300), warm + [1, 2]], GREEDY)
    assert warm_out.num_cached_tokens == 288
    assert warm_out.metrics.first_scheduled_time < cold_out.metrics.first_scheduled_time


# ---- multi-turn chat with token-exact replay ------------------------------------------------------------------
def two_turns(llm: LLM) -> tuple:
    system = {"role": "system", "content": "You are a careful assistant. " * 20}
    turn1 = [system, {"role": "user", "content": "Summarise the history of the printing press."}]
    # Sampled (seeded) tokens: random-weight greedy output repeats one token, which re-tokenizes unchanged.
    out1 = llm.chat(turn1, SamplingParams(temperature=1.0, seed=1234, max_tokens=40))[0]
    turn2 = [*turn1, {"role": "assistant", "content": out1.text}, {"role": "user", "content": "And the telegraph?"}]
    out2 = llm.chat(turn2, SamplingParams(temperature=0.0, max_tokens=8))[0]
    return out1, out2


def test_second_chat_turn_hits_the_whole_first_turn_answer_included() -> None:
    llm = LLM(kv_cache_memory_gb=0.05)
    out1, out2 = two_turns(llm)
    turn1 = out1.prompt_token_ids + out1.token_ids
    assert out2.prompt_token_ids[: len(turn1)] == turn1  # token-exact replay of our own answer
    assert out2.num_cached_tokens == (len(turn1) - 1) // BS * BS
    # The case that needs replay: the answer's text does not re-tokenize to the ids that were generated.
    assert llm.tokenizer.encode(out1.text, add_special_tokens=False) != out1.token_ids


def test_without_replay_re_tokenized_answer_misses(llm: LLM) -> None:
    replaying = LLM(kv_cache_memory_gb=0.05)
    out1, out2 = two_turns(replaying)
    fresh = LLM(kv_cache_memory_gb=0.05)  # never saw the answer: must re-tokenize its text
    fresh.generate([out1.prompt_token_ids], SamplingParams(temperature=0.0, max_tokens=40))
    system = {"role": "system", "content": "You are a careful assistant. " * 20}
    turn1 = [system, {"role": "user", "content": "Summarise the history of the printing press."}]
    turn2 = [*turn1, {"role": "assistant", "content": out1.text}, {"role": "user", "content": "And the telegraph?"}]
    miss = fresh.chat(turn2, SamplingParams(temperature=0.0, max_tokens=8))[0]
    assert miss.num_cached_tokens < out2.num_cached_tokens


# ---- sampling ---------------------------------------------------------------------------------------------------
def test_same_seed_same_output_whatever_the_batch(llm: LLM) -> None:
    p = ids(12, 30)
    seeded = SamplingParams(temperature=1.0, max_tokens=20, seed=7, ignore_eos=True)
    alone = llm.generate([p], seeded)[0].token_ids
    again = llm.generate([p], seeded)[0].token_ids
    other = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=20, seed=3, ignore_eos=True)
    batched = llm.generate([ids(13, 25), p], [other, seeded])[1].token_ids
    assert alone == again == batched
    different = llm.generate([p], SamplingParams(temperature=1.0, max_tokens=20, seed=8, ignore_eos=True))[0]
    assert different.token_ids != alone


def test_top_k_1_and_tiny_top_p_are_greedy(llm: LLM) -> None:
    p = ids(14, 40)
    greedy = llm.generate([p], GREEDY)[0].token_ids
    top_k = llm.generate([p], SamplingParams(temperature=1.5, top_k=1, max_tokens=24, ignore_eos=True))[0]
    top_p = llm.generate([p], SamplingParams(temperature=1.5, top_p=1e-6, max_tokens=24, ignore_eos=True))[0]
    assert top_k.token_ids == greedy and top_p.token_ids == greedy


def test_stop_string_cuts_the_text(llm: LLM) -> None:
    prompt = "Once upon a time"
    full = llm.generate([prompt], GREEDY)[0]
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 3]
    assert stop.strip(), "greedy output too short to pick a stop string"
    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=24, stop=[stop], ignore_eos=True))[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == full.text[: full.text.index(stop)]
    assert stop not in out.text


def test_stop_token_id_ends_generation(llm: LLM) -> None:
    p = ids(15, 20)
    full = llm.generate([p], GREEDY)[0].token_ids
    stop_at = next(i for i, t in enumerate(full) if t not in full[:i])  # first occurrence of some token
    stop_at = max(i for i in range(len(full)) if full[i] not in full[:i]) if stop_at == 0 else stop_at
    out = llm.generate([p], SamplingParams(temperature=0.0, max_tokens=24, stop_token_ids=[full[stop_at]]))[0]
    assert out.token_ids == full[: stop_at + 1]
    assert out.finish_reason == "stop" and out.stop_reason == full[stop_at]


def test_max_tokens_and_eos(llm: LLM) -> None:
    out = llm.generate([ids(16, 10)], SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))[0]
    assert len(out.token_ids) == 5 and out.finish_reason == "length"
    eos = llm.engine.tokenizer.eos_token_ids[0]
    p = ids(17, 10)
    first = llm.generate([p], SamplingParams(temperature=0.0, max_tokens=1))[0].token_ids[0]
    # Make the greedy token an EOS id: the request stops there, with the id but without its text.
    out = llm.generate([p], SamplingParams(temperature=0.0, max_tokens=5, stop_token_ids=[first]))[0]
    assert out.finish_reason == "stop" and len(out.token_ids) == 1
    assert eos in llm.engine.eos_token_ids


def test_logprobs_include_the_sampled_token_and_top_n(llm: LLM) -> None:
    out = llm.generate([ids(18, 30)], SamplingParams(temperature=0.0, max_tokens=6, logprobs=3, ignore_eos=True))[0]
    assert out.logprobs is not None and len(out.logprobs) == 6
    for tok, entry in zip(out.token_ids, out.logprobs):
        assert tok in entry and entry[tok].rank == 1  # greedy picks the most likely token
        assert len(entry) == 3
        values = sorted((lp.logprob for lp in entry.values()), reverse=True)
        assert entry[tok].logprob == values[0] <= 0.0
        assert sum(2.718281828**v for v in values) <= 1.0 + 1e-5


def test_metrics_report_ttft_and_decode_time(llm: LLM) -> None:
    out = llm.generate([ids(19, 40)], GREEDY)[0]
    m = out.metrics
    assert m.time_to_first_token is not None and m.time_to_first_token > 0
    assert m.decode_time is not None and m.decode_time > 0


# ---- bad input ---------------------------------------------------------------------------------------------------
BAD = [
    ("", SamplingParams(), "empty"),
    ([], SamplingParams(), "empty"),
    ([5] * 9000, SamplingParams(), "context"),
    ([1, 2, 99999], SamplingParams(), "vocabulary"),
    ([1, 2, -1], SamplingParams(), "vocabulary"),
    ("hi", SamplingParams(max_tokens=0), "max_tokens"),
    ("hi", SamplingParams(temperature=-0.5), "temperature"),
    ("hi", SamplingParams(top_p=0.0), "top_p"),
    ("hi", SamplingParams(top_p=1.5), "top_p"),
    ("hi", SamplingParams(top_k=0), "top_k"),
]


@pytest.mark.parametrize(("prompt", "params", "words"), BAD, ids=[b[2] + str(i) for i, b in enumerate(BAD)])
def test_bad_input_is_a_clear_value_error_and_serving_continues(llm: LLM, prompt, params, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        llm.generate([prompt], params)
    assert llm.generate(["still serving"], SamplingParams(temperature=0.0, max_tokens=3))[0].token_ids
    assert_clean(llm)


def test_one_bad_prompt_in_a_batch_queues_nothing(llm: LLM) -> None:
    with pytest.raises(ValueError):
        llm.generate(["fine", ""], GREEDY)
    assert not llm.engine.has_unfinished_requests()


def test_abort_frees_blocks_and_others_finish(llm: LLM) -> None:
    eng = llm.engine
    keep = eng.add_request(ids(20, 100), SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))
    drop = eng.add_request(ids(21, 100), SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True))
    for _ in range(3):
        eng.step()
    assert drop.seq.blocks
    assert eng.abort(drop.request_id)
    assert not drop.seq.blocks and drop.finish_reason == "abort"
    while eng.has_unfinished_requests():
        eng.step()
    assert keep.finish_reason == "length" and len(keep.output_token_ids) == 20
    for r in (keep, drop):
        eng.release(r.request_id)
    assert_clean(llm)


# ---- the command line -----------------------------------------------------------------------------------------
def test_cli_generate_prints_text_and_cache_figures() -> None:
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "promptcache.cli",
            "generate",
            "Hello there, tell me a story " * 10,
            "--max-tokens",
            "4",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    runs = re.findall(r"\[prompt (\d+) tokens, cached (\d+)", res.stdout)
    assert len(runs) == 2
    (_, c1), (n2, c2) = runs
    assert c1 == "0"
    assert int(c2) == (int(n2) - 1) // BS * BS > 0  # the second run reuses the first run's full blocks


def test_cli_reports_bad_model_folder(tmp_path) -> None:
    res = subprocess.run(
        [sys.executable, "-m", "promptcache.cli", "generate", "hi", "--model", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2 and "config.json" in res.stderr


def test_streamed_text_never_includes_part_of_a_stop_string(llm: LLM) -> None:
    prompt = "Once upon a time"
    full = llm.generate([prompt], GREEDY)[0].text
    # A stop string that straddles token boundaries somewhere in the middle of the greedy text.
    stop = full[len(full) // 3 : len(full) // 3 + 4]
    eng = llm.engine
    req = eng.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=24, stop=[stop], ignore_eos=True))
    pieces = []
    while not req.finished:
        pieces.extend(o.new_text for o in eng.step() if o.request_id == req.request_id)
    assert "".join(pieces) == req.text == full[: full.index(stop)]
    eng.release(req.request_id)


def test_pins_are_renewed_by_any_hit() -> None:
    llm = LLM(kv_cache_memory_gb=0.02)
    eng = llm.engine
    now = [1000.0]
    eng.kv.pool._clock = lambda: now[0]
    prompt = ids(40, 100)
    req = eng.add_request(prompt, SamplingParams(max_tokens=1), cache_breakpoints=[(96, 300.0)])
    while not req.finished:
        eng.step()
    pinned = [b for b in eng.kv.pool.blocks if b.pinned_until > now[0]]
    assert len(pinned) == 6 and all(b.pinned_until == 1300.0 for b in pinned)
    now[0] = 1200.0
    llm.generate([prompt[:97]], SamplingParams(max_tokens=1))  # no breakpoint of its own, reads the prefix
    assert all(b.pinned_until == 1500.0 for b in pinned)
