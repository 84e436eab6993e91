"""Benchmark workloads: seeded and deterministic, the right shape for each traffic pattern, realistic sizes."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from promptcache.bench.workloads import (
    TOKENS_PER_WORD,
    WORKLOADS,
    Session,
    Workload,
    make_workload,
    request_messages,
    workload_sizes,
)
from promptcache.engine.engine import DEFAULT_MODEL
from promptcache.tokenizer import Tokenizer

EVERY = [(name, quick) for name in WORKLOADS for quick in (True, False)]


def all_text(w: Workload) -> str:
    """Every piece of text the workload would send (system prompts, tools, messages)."""
    parts: list[str] = []
    for s in w.sessions:
        parts.append(s.system or "")
        parts.append(json.dumps(s.tools) if s.tools else "")
        parts.extend(m["content"] for step in s.steps for m in step.messages)
    return "\n".join(parts)


def answers_for(session: Session) -> list[str]:
    return [f"answer {j} of {session.session_id}" for j in range(len(session.steps))]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_pretrained(DEFAULT_MODEL)


def prompt_tokens(tok: Tokenizer, w: Workload, answer_tokens: int) -> list[int]:
    """Prompt length of each request, in arrival order, with every answer ``answer_tokens`` words long."""
    out = []
    for s, j in w.order:
        session = w.sessions[s]
        answers = [" ".join(["fine"] * answer_tokens)] * j
        text = tok.apply_chat_template(request_messages(session, j, answers), tools=session.tools)
        out.append(len(tok.encode(text, add_special_tokens=False)))
    return out


# ---- determinism ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "quick"), EVERY)
def test_same_arguments_give_an_identical_workload(name: str, quick: bool) -> None:
    assert make_workload(name, quick=quick, seed=7) == make_workload(name, quick=quick, seed=7)
    assert make_workload(name, quick=quick, seed=7, max_tokens=5) == make_workload(
        name, quick=quick, seed=7, max_tokens=5
    )


@pytest.mark.parametrize("name", WORKLOADS)
def test_another_seed_gives_other_text(name: str) -> None:
    a, b = make_workload(name, quick=True, seed=0), make_workload(name, quick=True, seed=1)
    assert a != b
    assert all_text(a) != all_text(b)
    # Not just a reshuffle of the same sentences: most sentences of one are absent from the other.
    sentences_a = set(all_text(a).replace("\n", " ").split(". "))
    sentences_b = set(all_text(b).replace("\n", " ").split(". "))
    assert len(sentences_a & sentences_b) < 0.2 * len(sentences_a)


def test_the_text_is_varied_english_like_prose() -> None:
    text = all_text(make_workload("documents", seed=3))
    words = [w.strip(".,?:()").lower() for w in text.split()]
    assert len(set(words)) >= 300  # a few hundred distinct words
    top_word, top_count = Counter(words).most_common(1)[0]
    assert top_word == "the" and top_count < 0.15 * len(words)
    assert all(len(s.split()) >= 4 for s in text.replace("\n", " ").split(". ") if s)


# ---- order and structure --------------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "quick"), EVERY)
def test_order_covers_every_step_once_and_keeps_each_sessions_steps_in_order(name: str, quick: bool) -> None:
    w = make_workload(name, quick=quick)
    assert w.name == name and w.description
    assert len(w.order) == w.num_requests() == sum(len(s.steps) for s in w.sessions)
    assert Counter(w.order) == Counter((i, j) for i, s in enumerate(w.sessions) for j in range(len(s.steps)))
    next_step = [0] * len(w.sessions)
    for s, j in w.order:
        assert j == next_step[s], f"{name}: session {s} step {j} arrives before step {next_step[s]}"
        next_step[s] += 1
    assert len({s.session_id for s in w.sessions}) == len(w.sessions)
    for session in w.sessions:
        for step in session.steps:
            assert step.max_tokens >= 1
            assert step.messages and all(m["role"] == "user" and m["content"].strip() for m in step.messages)


@pytest.mark.parametrize("name", ["chat", "agent"])
def test_sessions_interleave(name: str) -> None:
    w = make_workload(name, quick=True)
    first = w.order[0][0]
    # Another session's request arrives before the first session is done: they run side by side.
    last_of_first = max(k for k, (s, _) in enumerate(w.order) if s == first)
    assert any(s != first for s, _ in w.order[:last_of_first])
    # ... and not strictly round-robin either: the arrival pattern is jittered.
    sessions_in_order = [s for s, _ in w.order]
    width = len({s for s, _ in w.order})
    rounds = [sessions_in_order[k : k + width] for k in range(0, len(sessions_in_order), width)]
    assert len({tuple(r) for r in rounds}) > 1


def test_chat_turns_resend_the_whole_history_answers_included() -> None:
    w = make_workload("chat", quick=True)
    for session in w.sessions:
        answers = answers_for(session)
        previous: list[dict] = []
        for j in range(len(session.steps)):
            messages = request_messages(session, j, answers)
            assert messages[0] == {"role": "system", "content": session.system}
            # Turn j extends turn j-1 with its answer and the new question.
            assert messages[: len(previous)] == previous
            if j:
                assert messages[len(previous)] == {"role": "assistant", "content": answers[j - 1]}
            assert messages[-1] == session.steps[j].messages[-1]
            previous = messages
        assert len(previous) == 1 + 2 * len(session.steps) - 1


def test_chat_users_have_their_own_system_prompts_and_questions_vary_in_length() -> None:
    w = make_workload("chat", seed=2)
    assert len({s.system for s in w.sessions}) == len(w.sessions)
    lengths = [len(step.messages[0]["content"].split()) for s in w.sessions for step in s.steps]
    assert max(lengths) > 2 * min(lengths)


def test_system_prompt_is_one_long_prompt_shared_by_short_single_turn_questions() -> None:
    w = make_workload("system-prompt")
    systems = {s.system for s in w.sessions}
    assert len(systems) == 1
    (system,) = systems
    assert all(len(s.steps) == 1 for s in w.sessions)
    questions = [s.steps[0].messages[0]["content"] for s in w.sessions]
    assert len(set(questions)) == len(questions)
    assert max(len(q) for q in questions) * 10 < len(system)


def test_documents_put_each_document_before_its_questions() -> None:
    w = make_workload("documents", documents=3, questions=4)
    assert w.num_requests() == 12
    by_document: dict[str, list[str]] = {}
    for s in w.sessions:
        content = s.steps[0].messages[0]["content"]
        document, question = content.split("\n\nQuestion: ")
        by_document.setdefault(document, []).append(question)
    assert len(by_document) == 3
    assert all(len(qs) == 4 and len(set(qs)) == 4 for qs in by_document.values())
    assert len({s.system for s in w.sessions}) == 1  # a fixed instruction: system + document is the shared prefix
    # Questions about different documents interleave.
    docs_in_order = [w.sessions[s].session_id.split("-")[0] for s, _ in w.order]
    assert docs_in_order != sorted(docs_in_order)


def test_agent_sends_its_tools_every_time_and_the_transcript_grows_by_tool_results() -> None:
    w = make_workload("agent", quick=True, tools=3, steps=4, agents=2)
    assert w.num_requests() == 8
    for session in w.sessions:
        assert session.tools == w.sessions[0].tools and len(session.tools) == 3
        names = set()
        for tool in session.tools:
            assert tool["type"] == "function"
            fn = tool["function"]
            names.add(fn["name"])
            assert fn["description"] and fn["parameters"]["type"] == "object"
            assert set(fn["parameters"]["required"]) <= set(fn["parameters"]["properties"])
            json.dumps(tool)  # plain JSON
        assert session.steps[0].messages[0]["content"].startswith("Task: ")
        for step in session.steps[1:]:
            content = step.messages[0]["content"]
            assert content.startswith("Tool result (") and content.split("(")[1].split(")")[0] in names
        lengths = [len(request_messages(session, j, answers_for(session))) for j in range(4)]
        assert lengths == [2, 4, 6, 8]  # system, then (message, answer) pairs
    # Each session has its own copy of the tools: changing one cannot change another.
    w.sessions[0].tools[0]["function"]["name"] = "changed"
    assert w.sessions[1].tools[0]["function"]["name"] != "changed"


def test_pressure_asks_about_popular_documents_far_more_often_than_rare_ones() -> None:
    w = make_workload("pressure")
    counts = Counter(s.session_id.split("-doc")[1] for s in w.sessions)
    assert w.num_requests() == 192
    top, bottom = counts.most_common()[0][1], counts.most_common()[-1][1]
    # Zipf(1) over 24 documents: the most popular gets ~1/H(24) = 26% of the requests, 6x a uniform share.
    assert top > 3 * 192 / 24
    assert top > 5 * bottom


# ---- sizes --------------------------------------------------------------------------------------------------------
def test_sizes_scale_with_overrides() -> None:
    assert make_workload("chat", users=3, turns=2).num_requests() == 6
    assert len(make_workload("chat", users=3, turns=2).sessions) == 3
    assert make_workload("system-prompt", questions=5).num_requests() == 5
    assert make_workload("documents", documents=2, questions=3).num_requests() == 6
    assert make_workload("agent", agents=2, steps=3).num_requests() == 6
    assert make_workload("pressure", requests=10).num_requests() == 10
    assert all(st.max_tokens == 3 for s in make_workload("chat", max_tokens=3).sessions for st in s.steps)
    short = make_workload("system-prompt", system_tokens=200).sessions[0].system
    long = make_workload("system-prompt", system_tokens=2000).sessions[0].system
    assert 7 < len(long.split()) / len(short.split()) < 13
    assert make_workload("chat", cache_tokens=4096).cache_tokens == 4096


def test_quick_is_smaller_than_full() -> None:
    for name in WORKLOADS:
        quick, full = make_workload(name, quick=True), make_workload(name)
        assert quick.num_requests() < full.num_requests() or name == "agent"
        assert len(all_text(quick)) < len(all_text(full)) / 2, name
        assert workload_sizes(name, quick=True)["max_tokens"] <= 16


def test_bad_sizes_are_refused_with_the_valid_names() -> None:
    with pytest.raises(ValueError, match="unknown workload"):
        make_workload("nope")
    with pytest.raises(ValueError, match="users, turns"):
        make_workload("chat", documents=3)
    with pytest.raises(ValueError, match=">= 1"):
        make_workload("chat", users=0)
    with pytest.raises(ValueError, match="between 1 and 5"):
        make_workload("agent", tools=6)
    with pytest.raises(ValueError, match="integer"):
        make_workload("chat", users=True)
    with pytest.raises(ValueError, match="no step"):
        request_messages(make_workload("chat", quick=True).sessions[0], 99, [])


def test_only_pressure_is_meant_to_run_with_a_small_cache() -> None:
    for name in WORKLOADS:
        w = make_workload(name, quick=True)
        assert (w.cache_tokens is None) == (name != "pressure")


# ---- real token counts ------------------------------------------------------------------------------------------
def test_sizes_are_met_in_real_tokens_of_the_embedded_tokenizer(tokenizer: Tokenizer) -> None:
    words = all_text(make_workload("documents", seed=5))
    measured = len(tokenizer.encode(words, add_special_tokens=False)) / len(words.split())
    assert measured == pytest.approx(TOKENS_PER_WORD, rel=0.1)
    for quick, target in ((False, 1500), (True, 500)):
        system = make_workload("system-prompt", quick=quick).sessions[0].system
        assert len(tokenizer.encode(system, add_special_tokens=False)) == pytest.approx(target, rel=0.15)


def test_pressures_working_set_is_about_three_times_the_cache(tokenizer: Tokenizer) -> None:
    for quick in (True, False):
        w = make_workload("pressure", quick=quick)
        documents = {s.steps[0].messages[0]["content"].split("\n\nQuestion: ")[0] for s in w.sessions}
        working_set = sum(len(tokenizer.encode(d, add_special_tokens=False)) for d in documents)
        assert w.cache_tokens is not None
        assert 2.5 < working_set / w.cache_tokens < 3.6


def test_quick_workloads_are_small_enough_to_run_in_seconds(tokenizer: Tokenizer) -> None:
    # About 10-20k prompt tokens each (a few seconds of cold prefill on 2 CPU cores for the embedded model),
    # answers of at most 16 tokens.
    for name in WORKLOADS:
        w = make_workload(name, quick=True)
        lengths = prompt_tokens(tokenizer, w, answer_tokens=12)
        assert 6_000 < sum(lengths) < 22_000, (name, sum(lengths))
        assert max(lengths) < 2_048
