"""The engine through its Python API: caching, chat replay, sampling, errors.

Most tests run on the embedded default model. Its greedy answer repeats one token, so a cache hit's answer is
checked on ``varied_model`` (a small random llama whose answers vary) against the same prompt computed from scratch.
"""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import assert_varied

from promptcache import LLM, SamplingParams
from promptcache.engine.request import RequestOutput

BS = 16
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(kv_cache_memory_gb=0.25)


@pytest.fixture(scope="module")
def varied(varied_model: Path) -> LLM:
    """Prefix caching on, on a model whose answers vary."""
    return LLM(model=str(varied_model), kv_cache_memory_gb=0.25)


@pytest.fixture(scope="module")
def cold(varied_model: Path) -> LLM:
    """The same model with prefix caching off: every answer computed from scratch."""
    return LLM(model=str(varied_model), kv_cache_memory_gb=0.25, enable_prefix_caching=False)


def assert_same_as_cold(out: RequestOutput, cold: LLM, params: SamplingParams = GREEDY) -> None:
    """``out`` read part of its prompt from the cache, and its answer is token for token the one computed from
    scratch for the same prompt ids (an answer varied enough for the comparison to mean something)."""
    assert out.num_cached_tokens > 0
    ref = cold.generate([out.prompt_token_ids], params)[0]
    assert ref.num_cached_tokens == 0
    assert_varied(ref.token_ids)
    assert out.token_ids == ref.token_ids


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
def test_shared_1000_token_prefix_is_reported_cached_to_the_block(varied: LLM, cold: LLM) -> None:
    prefix = ids(1, 1000)
    first = varied.generate([prefix + ids(2, 20)], GREEDY)[0]
    second = varied.generate([prefix + ids(3, 20)], GREEDY)[0]
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens == 1000 // BS * BS
    assert_same_as_cold(second, cold)
    assert_clean(varied)


def test_text_prompts_hit_the_cache_too(varied: LLM, cold: LLM) -> None:
    doc = "The quick brown fox jumps over the lazy dog. " * 60
    a = varied.generate([doc + "Question one?"], GREEDY)[0]
    b = varied.generate([doc + "Another question entirely?"], GREEDY)[0]
    shared = 0
    while a.prompt_token_ids[shared] == b.prompt_token_ids[shared]:
        shared += 1
    assert b.num_cached_tokens == shared // BS * BS > 500
    assert_same_as_cold(b, cold)


def test_generated_tokens_are_cached_for_the_next_request(varied: LLM, cold: LLM) -> None:
    prompt = ids(4, 50)
    out = varied.generate([prompt], SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True))[0]
    follow = varied.generate([prompt + out.token_ids + ids(5, 10)], GREEDY)[0]
    # Every token whose KV was computed (all but the last sampled one) is cached: the full blocks, and the last
    # partial block as a tail that the follow-up takes over.
    assert follow.num_cached_tokens == len(prompt) + len(out.token_ids) - 1
    assert_same_as_cold(follow, cold)  # the KV written while decoding is as good as a prefill's


def test_identical_prompt_leaves_one_token_to_compute(varied: LLM, cold: LLM) -> None:
    prompt = ids(6, 64)
    first = varied.generate([prompt], GREEDY)[0]
    again = varied.generate([prompt], GREEDY)[0]
    assert again.num_cached_tokens == 48  # 64 tokens = 4 blocks, but the last token must be computed
    assert_same_as_cold(again, cold)
    assert again.token_ids == first.token_ids


def test_namespaces_never_share_cached_blocks(varied: LLM) -> None:
    prompt = ids(7, 200)
    varied.generate([prompt], GREEDY, namespace="tenant-a")
    other = varied.generate([prompt], GREEDY, namespace="tenant-b")[0]
    same = varied.generate([prompt], GREEDY, namespace="tenant-a")[0]
    assert other.num_cached_tokens == 0  # computed from scratch: the reference for the hit
    assert same.num_cached_tokens == 192
    assert_varied(other.token_ids)
    assert other.token_ids == same.token_ids


def test_batch_of_prompts_returns_in_order_and_shares_prefix(llm: LLM) -> None:
    prefix = ids(8, 160)
    prompts = [prefix + ids(9 + i, 5 + i) for i in range(6)]
    outs = llm.generate(prompts, GREEDY)
    assert [o.prompt_token_ids for o in outs] == prompts
    assert all(len(o.token_ids) == GREEDY.max_tokens for o in outs)
    assert_clean(llm)


def test_longest_prefix_first_admits_cache_hits_first(varied_model: Path, cold: LLM) -> None:
    llm = LLM(model=str(varied_model), kv_cache_memory_gb=0.05, max_num_seqs=1, scheduling_policy="lpm")
    warm = ids(10, 300)
    llm.generate([warm], GREEDY)
    cold_out, warm_out = llm.generate([ids(11, 300), warm + [1, 2]], GREEDY)
    assert warm_out.num_cached_tokens == 288
    assert warm_out.metrics.first_scheduled_time < cold_out.metrics.first_scheduled_time
    assert_same_as_cold(warm_out, cold)


# ---- multi-turn chat with token-exact replay ------------------------------------------------------------------
TURN2 = SamplingParams(temperature=0.0, max_tokens=16)


def two_turns(llm: LLM) -> tuple:
    system = {"role": "system", "content": "You are a careful assistant. " * 20}
    turn1 = [system, {"role": "user", "content": "Summarise the history of the printing press."}]
    # Sampled (seeded) tokens: the embedded model's greedy output repeats one token, which re-tokenizes unchanged.
    out1 = llm.chat(turn1, SamplingParams(temperature=1.0, seed=1234, max_tokens=40))[0]
    turn2 = [*turn1, {"role": "assistant", "content": out1.text}, {"role": "user", "content": "And the telegraph?"}]
    out2 = llm.chat(turn2, TURN2)[0]
    return out1, out2


def test_second_chat_turn_hits_the_whole_first_turn_answer_included(varied_model: Path, cold: LLM) -> None:
    llm = LLM(model=str(varied_model), kv_cache_memory_gb=0.05)
    out1, out2 = two_turns(llm)
    turn1 = out1.prompt_token_ids + out1.token_ids
    assert out2.prompt_token_ids[: len(turn1)] == turn1  # token-exact replay of our own answer
    assert out2.num_cached_tokens == len(turn1) - 1  # every token whose KV exists (the last partial block: a tail)
    assert_same_as_cold(out2, cold, TURN2)
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


@pytest.fixture(scope="module")
def eos_case(varied: LLM) -> tuple[list[int], list[int], int]:
    """A prompt, its greedy answer (EOS ignored) and a step ``k`` whose token comes out there for the first time:
    declared the model's EOS, it ends generation exactly at step ``k``. Its text is nowhere in the answer before."""
    prompt = ids(22, 30)
    full = varied.generate([prompt], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))[0].token_ids
    assert_varied(full)
    tok, eos = varied.tokenizer, varied.engine.eos_token_ids
    steps = [
        i
        for i in range(4, len(full))
        if full[i] not in full[:i]
        and not eos & set(full[: i + 1])
        and tok.decode([full[i]]).strip()
        and tok.decode([full[i]]) not in tok.decode(full[:i])
    ]
    assert steps, f"no token of {full} can stand for an EOS"
    return prompt, full, steps[0]


@pytest.mark.parametrize("declared_in", ["generation_config.json", "config.json"])
def test_generation_stops_at_the_models_eos_token(
    varied_model: Path, eos_case: tuple[list[int], list[int], int], tmp_path: Path, declared_in: str
) -> None:
    prompt, full, k = eos_case
    eos = full[k]
    folder = Path(shutil.copytree(varied_model, tmp_path / "model"))
    config = json.loads((folder / declared_in).read_text())
    (folder / declared_in).write_text(json.dumps({**config, "eos_token_id": eos}))
    llm = LLM(model=str(folder), num_kv_blocks=32)
    assert eos in llm.engine.eos_token_ids

    out = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=24))[0]
    assert out.finish_reason == "stop" and out.stop_reason == eos
    assert out.token_ids == full[: k + 1]  # the EOS id ends the ids ...
    past = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True))[0]
    eos_text = llm.tokenizer.decode([eos])
    assert eos_text not in out.text and past.text.startswith(out.text)  # ... but its text is not in the answer
    # ignore_eos runs past it, to max_tokens.
    assert past.token_ids == full and past.finish_reason == "length" and eos_text in past.text


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
def test_cli_generate_prints_text_and_cache_figures(varied_model: Path, varied: LLM) -> None:
    prompt = "Tell me a story about a lighthouse keeper. " * 5  # asked through the model's chat template
    res = subprocess.run(
        [sys.executable, "-m", "promptcache.cli", "generate", prompt, "--model", str(varied_model),
         "--max-tokens", "16", "--temperature", "0"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )  # fmt: skip
    runs = re.findall(r"\[prompt (\d+) tokens, cached (\d+)", res.stdout)
    assert len(runs) == 2
    (_, c1), (n2, c2) = runs
    assert c1 == "0"
    assert int(c2) == (int(n2) - 1) // BS * BS > 0  # the second run reuses the first run's full blocks
    # The first run is a fresh engine's, computed from scratch: the second, a cache hit, prints the same answer.
    cold_text, hit_text = re.findall(r"--- run \d+ ---\n(.*?)\n\[prompt", res.stdout, flags=re.DOTALL)
    assert hit_text == cold_text
    assert_varied(varied.tokenizer.encode(cold_text, add_special_tokens=False))


def test_cli_generate_asks_through_the_chat_template_unless_raw(llm: LLM) -> None:
    def prompt_tokens(*flags: str) -> int:
        cmd = [sys.executable, "-m", "promptcache.cli", "generate", "Hello", "--max-tokens", "2", "--repeat", "1"]
        res = subprocess.run([*cmd, *flags], capture_output=True, text=True, timeout=120, check=True)
        return int(re.findall(r"\[prompt (\d+) tokens", res.stdout)[0])

    chat = llm.tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}])
    assert prompt_tokens() == len(llm.tokenizer.encode(chat, add_special_tokens=False))
    assert prompt_tokens("--raw") == len(llm.tokenizer.encode("Hello"))


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
