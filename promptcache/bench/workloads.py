"""Seeded, deterministic benchmark workloads: what real traffic to a prompt cache looks like.

Five workloads (``WORKLOADS``), each a set of sessions whose requests arrive interleaved:

- ``chat``: many users in multi-turn conversations; every turn resends the whole history, the model's own earlier
  answers included, so a turn can hit the cache through the previous turn's answer.
- ``system-prompt``: one long system prompt shared by many short, single-turn questions.
- ``documents``: RAG / document QA: a few long documents, each asked several questions.
- ``agent``: tool definitions plus a transcript that grows by a tool result at every step.
- ``pressure``: more documents than the KV cache holds, asked with Zipf-skewed popularity, to exercise eviction.

A workload is data, not a runner: ``make_workload`` returns the messages of every request and their arrival order;
the runner sends them to a target and fills in the model's answers. Request ``i = order[k]`` is built as
``[system] + every earlier step's messages of that session, each followed by the model's answer as
{"role": "assistant", "content": text}, + this step's messages`` (``request_messages`` does exactly that), so each
turn resends the whole history.

Text comes from a built-in vocabulary of a few hundred English words put together by sentence templates: it reads
like (nonsensical) English, so its token counts are realistic for a byte-level BPE tokenizer. Sizes are given in
tokens of the embedded default model's tokenizer (which spends about ``TOKENS_PER_WORD`` tokens on a word of this
text; tokenizers with larger vocabularies spend fewer) and are met approximately: text is generated sentence by
sentence until the estimate reaches the size. Only ``random.Random(seed)`` is used, so the same name, ``quick``,
seed and overrides always give an identical ``Workload`` (compare with ``==``).
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

WORKLOADS = ("chat", "system-prompt", "documents", "agent", "pressure")

# Tokens the embedded default model's tokenizer (8,192-token byte-level BPE) spends per word of this generator's text,
# punctuation included; measured, and checked by tests/test_workloads.py. Sizes below are estimates in these units.
TOKENS_PER_WORD = 2.0

# Zipf exponent of document popularity in ``pressure``: s = 1 is the classic shape of web and content popularity
# (the k-th most popular item is asked 1/k as often as the first), skewed enough that keeping the popular
# documents pays, flat enough that the tail still matters.
ZIPF_EXPONENT = 1.0

# Sizes: name -> (full, quick). Every size is a keyword override of make_workload.
_SIZES: dict[str, dict[str, tuple[int, int]]] = {
    "chat": {
        "users": (16, 4),  # concurrent conversations
        "turns": (8, 6),  # requests per conversation
        "system_tokens": (150, 80),  # each user's own short system prompt
        "question_tokens": (80, 50),  # mean user message; each varies from 0.4x to 1.6x
        "max_tokens": (64, 12),  # answer length asked for
    },
    "system-prompt": {
        "system_tokens": (1500, 500),  # the one shared system prompt
        "questions": (64, 24),  # single-turn requests, one session each
        "question_tokens": (30, 20),
        "max_tokens": (32, 8),
    },
    "documents": {
        "documents": (8, 4),
        "document_tokens": (1500, 400),
        "questions": (8, 6),  # per document
        "question_tokens": (30, 20),
        "max_tokens": (32, 8),
    },
    "agent": {
        "agents": (6, 3),  # concurrent agent sessions
        "steps": (8, 5),  # requests per session: the task, then one tool result per step
        "tools": (4, 4),  # function tools sent with every request (1 to 5)
        "task_tokens": (80, 40),
        "tool_result_tokens": (300, 120),  # mean tool result; each varies from 0.5x to 1.5x
        "max_tokens": (48, 12),
    },
    "pressure": {
        "documents": (24, 12),
        "document_tokens": (800, 300),
        "requests": (192, 40),  # single-turn questions, each about one document drawn by Zipf popularity
        "question_tokens": (20, 16),
        "max_tokens": (16, 8),
        "cache_fraction_pct": (33, 33),  # cache_tokens = this % of the tokens of the documents asked about
    },
}

# Lower bounds of sizes that may go below 1.
_MINIMUM: dict[str, int] = {"tools": 1}
_MAXIMUM: dict[str, int] = {"tools": 5, "cache_fraction_pct": 1000}


@dataclass
class Step:
    """One request of a session."""

    # OpenAI-style messages appended to the session's history just before this request (user messages, tool results)
    messages: list[dict[str, Any]]
    max_tokens: int


@dataclass
class Session:
    """A conversation: its requests go out in order, each resending everything before it."""

    session_id: str
    system: str | None  # system prompt (sent first in every request of the session)
    tools: list[dict[str, Any]] | None  # OpenAI-style function tools (sent with every request)
    steps: list[Step]


@dataclass
class Workload:
    """Sessions and the order their requests arrive in."""

    name: str
    description: str
    sessions: list[Session]
    # Arrival order of requests: (session index, step index); a session's steps stay in order, sessions interleave.
    order: list[tuple[int, int]]
    # KV capacity (tokens, estimated as the sizes are) the workload is meant to run with; None = ample.
    # ``pressure`` sets it below its working set.
    cache_tokens: int | None

    def num_requests(self) -> int:
        """Requests in the workload (every step of every session)."""
        return sum(len(s.steps) for s in self.sessions)


# ---- public helpers ------------------------------------------------------------------------------------------
def workload_sizes(name: str, quick: bool = False, **overrides: int) -> dict[str, int]:
    """The sizes ``make_workload(name, quick, **overrides)`` uses: defaults, then overrides, validated.

    Besides its own sizes (see ``make_workload``) every workload takes ``cache_tokens`` (sets
    ``Workload.cache_tokens``; ``pressure`` otherwise derives it from ``cache_fraction_pct``).

    Raises:
        ValueError: an unknown workload or size name, or a size out of range.
    """
    if name not in _SIZES:
        raise ValueError(f"unknown workload {name!r}; choose one of {', '.join(WORKLOADS)}")
    table = _SIZES[name]
    sizes = {key: full_quick[1] if quick else full_quick[0] for key, full_quick in table.items()}
    allowed = [*table, "cache_tokens"]
    for key, value in overrides.items():
        if key not in allowed:
            raise ValueError(f"workload {name!r} has no size {key!r}; its sizes are {', '.join(allowed)}")
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"size {key} must be an integer, got {value!r}")
        low, high = _MINIMUM.get(key, 1), _MAXIMUM.get(key)
        if value < low or (high is not None and value > high):
            bound = f"between {low} and {high}" if high is not None else f">= {low}"
            raise ValueError(f"size {key} must be {bound}, got {value}")
        sizes[key] = value
    return sizes


def make_workload(name: str, quick: bool = False, seed: int = 0, **overrides: int) -> Workload:
    """Build workload ``name`` (one of ``WORKLOADS``), seeded and deterministic.

    Sizes (full / ``quick``), in tokens of the embedded model's tokenizer where they are token counts, each a
    keyword override:

    - ``chat``: ``users`` 16 / 4, ``turns`` 8 / 6, ``system_tokens`` 150 / 80 (per user), ``question_tokens``
      80 / 50 (mean; 0.4x-1.6x), ``max_tokens`` 64 / 12.
    - ``system-prompt``: ``system_tokens`` 1500 / 500, ``questions`` 64 / 24, ``question_tokens`` 30 / 20,
      ``max_tokens`` 32 / 8.
    - ``documents``: ``documents`` 8 / 4, ``document_tokens`` 1500 / 400, ``questions`` 8 / 6 (per document),
      ``question_tokens`` 30 / 20, ``max_tokens`` 32 / 8.
    - ``agent``: ``agents`` 6 / 3, ``steps`` 8 / 5, ``tools`` 4 / 4 (1-5), ``task_tokens`` 80 / 40,
      ``tool_result_tokens`` 300 / 120 (mean; 0.5x-1.5x), ``max_tokens`` 48 / 12.
    - ``pressure``: ``documents`` 24 / 12, ``document_tokens`` 800 / 300, ``requests`` 192 / 40,
      ``question_tokens`` 20 / 16, ``max_tokens`` 16 / 8, ``cache_fraction_pct`` 33 / 33: ``cache_tokens`` is
      that percentage of the (estimated) tokens of the documents the requests ask about, their working set.

    ``quick`` keeps each workload near 8-17k prompt tokens in all (about 100k in full) with short answers, so that
    all five run against the embedded 5M-parameter model on two CPU cores in well under a minute per target.

    Raises:
        ValueError: an unknown workload or size name, or a size out of range.
    """
    sizes = workload_sizes(name, quick, **overrides)
    rng = random.Random(seed)
    workload = _BUILDERS[name](_TextGen(rng), sizes)
    if "cache_tokens" in sizes:
        workload.cache_tokens = sizes["cache_tokens"]
    _check_order(workload)
    return workload


def request_messages(session: Session, step_index: int, answers: Sequence[str]) -> list[dict[str, Any]]:
    """The messages of request ``step_index`` of ``session``: the whole history resent, then this step's messages.

    ``answers[j]`` is the model's answer to step ``j``; the first ``step_index`` are used.
    """
    if not 0 <= step_index < len(session.steps):
        raise ValueError(f"session {session.session_id} has no step {step_index}")
    if len(answers) < step_index:
        raise ValueError(f"request {step_index} needs the answers of the {step_index} steps before it")
    messages: list[dict[str, Any]] = []
    if session.system is not None:
        messages.append({"role": "system", "content": session.system})
    for j in range(step_index):
        messages.extend(dict(m) for m in session.steps[j].messages)
        messages.append({"role": "assistant", "content": answers[j]})
    messages.extend(dict(m) for m in session.steps[step_index].messages)
    return messages


# ---- text ----------------------------------------------------------------------------------------------------
def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


_NOUNS = _words(
    "system cache request token model server user question answer document report engineer analyst team city "
    "river valley garden library market bridge engine program function table record file folder network signal "
    "memory battery window kitchen teacher student doctor farmer painter writer manager customer supplier contract "
    "budget invoice schedule meeting project plan result method theory experiment sample measure price cost policy "
    "rule court council village island mountain forest ocean harbor ship train station road truck letter message "
    "book chapter page story song picture camera phone computer keyboard screen database query index queue thread "
    "process service client product factory machine tool hammer recipe bread coffee dinner weather storm winter "
    "summer season morning evening history language grammar word sentence number problem solution error warning "
    "feature version release update patch test benchmark graph chart figure map route journey museum painting "
    "festival audience player coach match score harvest orchard lantern compass archive ledger"
)
_VERBS = _words(
    "review explain describe measure build repair update check compare predict record read write send receive "
    "store move carry open close follow support improve reduce increase protect replace collect share prepare "
    "study visit find keep change handle avoid estimate question answer summarize translate schedule approve "
    "reject deliver test watch teach organize publish borrow design inspect finish plan"
)
_ADJECTIVES = _words(
    "quiet careful old new small large bright dark early late northern southern local global simple complex quick "
    "slow strong weak private public shared long short ancient modern busy empty full warm cold green blue red "
    "golden silver heavy light rare common useful strange familiar honest clever patient formal casual daily weekly "
    "annual final initial hidden visible narrow wide deep shallow rich poor fresh clean noisy gentle rough steady "
    "sudden curious"
)
_ADVERBS = _words(
    "quickly slowly carefully rarely often always sometimes usually clearly quietly eventually finally suddenly "
    "gently openly briefly nearly mostly largely easily barely happily calmly directly later again together"
)
_PREPOSITIONS = _words("in on near under over behind beside after before during without with across through around")
_NAMES = _words(
    "Alice Bruno Chen Dana Elena Farid Grace Hiro Ines Jonas Kofi Lena Mateo Nadia Omar Priya Quinn Rosa Sven "
    "Tara Uma Victor Wen Yara Zane"
)
_PLACES = _words("Lisbon Oslo Nairobi Lima Kyoto Dublin Quebec Tunis Perth Riga Accra Hanoi Porto Bergen Cusco")
_CONNECTIVES = (
    "However,",
    "Meanwhile,",
    "As a result,",
    "In practice,",
    "Later that week,",
    "For example,",
    "Even so,",
    "In the end,",
    "At first,",
    "By contrast,",
    "On most days,",
)
_DETERMINERS = ("the", "this", "that", "our", "their", "each", "one")
_DETERMINER_WEIGHTS = (10, 2, 1, 2, 2, 1, 1)
_NUMBERS = _words("two three four five six seven eight nine ten twelve twenty forty")


def _third_person(verb: str) -> str:
    if verb.endswith(("s", "sh", "ch", "x", "z")):
        return verb + "es"
    if verb.endswith("y") and verb[-2] not in "aeiou":
        return verb[:-1] + "ies"
    return verb + "s"


def _plural(noun: str) -> str:
    return _third_person(noun)  # the same spelling rules


class _TextGen:
    """English-like text from the built-in vocabulary; every draw comes from the one seeded ``rng``."""

    def __init__(self, rng: random.Random):
        self.rng = rng

    # -- words
    def noun(self) -> str:
        return self.rng.choice(_NOUNS)

    def adj(self) -> str:
        return self.rng.choice(_ADJECTIVES)

    def verb(self) -> str:
        return self.rng.choice(_VERBS)

    def verb3(self) -> str:
        return _third_person(self.rng.choice(_VERBS))

    def adv(self) -> str:
        return self.rng.choice(_ADVERBS)

    def a_adj(self) -> str:
        """An adjective with its indefinite article ("a quiet", "an old")."""
        adj = self.adj()
        return f"{'an' if adj[0] in 'aeiou' else 'a'} {adj}"

    def det(self) -> str:
        """A determiner: mostly "the", as in English prose, but not only."""
        return self.rng.choices(_DETERMINERS, _DETERMINER_WEIGHTS)[0]

    def prep(self) -> str:
        return self.rng.choice(_PREPOSITIONS)

    def name(self) -> str:
        return self.rng.choice(_NAMES)

    def place(self) -> str:
        return self.rng.choice(_PLACES)

    # -- sentences
    def sentence(self) -> str:
        """One declarative sentence."""
        d, n, v, adj, prep = self.det, self.noun, self.verb3, self.adj, self.prep
        r = self.rng.randrange(9)
        if r == 0:
            s = f"{d()} {adj()} {n()} {v()} {d()} {n()} {prep()} {d()} {n()}."
        elif r == 1:
            s = f"{self.name()} {v()} {d()} {adj()} {n()} {self.adv()}."
        elif r == 2:
            s = f"{self.rng.choice(_CONNECTIVES)} {d()} {n()} {prep()} {self.place()} {v()} {self.a_adj()} {n()}."
        elif r == 3:
            s = f"Every {n()} {v()} {d()} {n()}, and {d()} {n()} {v()} it {self.adv()}."
        elif r == 4:
            number = self.rng.choice(_NUMBERS)
            s = f"{d()} {n()} of {d()} {adj()} {n()} {v()} {number} {_plural(n())} {prep()} {self.place()}."
        elif r == 5:
            s = f"When {d()} {n()} {v()} {d()} {n()}, {self.name()} {v()} the {adj()} {n()}."
        elif r == 6:
            s = f"{self.name()} says that {d()} {n()} {v()} {self.adv()} {prep()} the {adj()} {n()}."
        elif r == 7:
            s = f"Most {_plural(n())} {self.verb()} {adj()} {_plural(n())} {prep()} the {n()}."
        else:
            s = (
                f"{self.rng.choice(_CONNECTIVES)} {self.name()} and {self.name()} {self.verb()} the {n()} "
                f"{self.adv()}, {prep()} {self.a_adj()} {n()}."
            )
        return s[0].upper() + s[1:]

    def question(self) -> str:
        """One question."""
        r = self.rng.randrange(7)
        if r == 0:
            return f"Why does the {self.adj()} {self.noun()} {self.verb()} the {self.noun()}?"
        if r == 1:
            return f"How does {self.name()} {self.verb()} the {self.noun()} {self.prep()} {self.place()}?"
        if r == 2:
            return f"What does the text say about the {self.adj()} {self.noun()}?"
        if r == 3:
            return f"Which {self.noun()} {self.verb3()} the {self.noun()} {self.prep()} the {self.noun()}?"
        if r == 4:
            return f"Can you {self.verb()} the {self.noun()} and {self.verb()} the {self.adj()} {_plural(self.noun())}?"
        if r == 5:
            return f"When will the {self.noun()} {self.verb()} the {self.adj()} {self.noun()}?"
        return f"Who should {self.verb()} the {_plural(self.noun())} {self.prep()} the {self.adj()} {self.noun()}?"

    def sentences(self, tokens: int) -> str:
        """Sentences until about ``tokens`` tokens (at least one sentence)."""
        out: list[str] = []
        words = 0
        target = tokens / TOKENS_PER_WORD
        while not out or words < target:
            s = self.sentence()
            out.append(s)
            words += len(s.split())
        return " ".join(out)

    def paragraphs(self, tokens: int) -> str:
        """Paragraphs of 3-7 sentences, separated by blank lines, until about ``tokens`` tokens."""
        paras: list[list[str]] = [[]]
        length = self.rng.randint(3, 7)
        words = 0
        target = tokens / TOKENS_PER_WORD
        while words < target or not paras[0]:
            if len(paras[-1]) == length:
                paras.append([])
                length = self.rng.randint(3, 7)
            s = self.sentence()
            paras[-1].append(s)
            words += len(s.split())
        return "\n\n".join(" ".join(p) for p in paras)

    def user_question(self, tokens: int) -> str:
        """A user message of about ``tokens`` tokens: some context sentences, then a question."""
        q = self.question()
        rest = tokens - len(q.split()) * TOKENS_PER_WORD
        if rest < 8:
            return q
        return f"{self.sentences(int(rest))} {q}"

    def vary(self, mean: int, low: float, high: float) -> int:
        """A size drawn uniformly from [low * mean, high * mean], at least 1."""
        return max(1, round(mean * self.rng.uniform(low, high)))

    def title(self) -> str:
        return f"The {self.adj()} {self.noun()} of {self.place()}".title().replace(" Of ", " of ")


def _estimate_tokens(text: str) -> int:
    return math.ceil(len(text.split()) * TOKENS_PER_WORD)


# ---- arrival order --------------------------------------------------------------------------------------------
def _interleave(lengths: Sequence[int], rng: random.Random) -> list[tuple[int, int]]:
    """Round-robin over sessions with seeded jitter: step j of every session arrives around "round" j.

    Each step arrives at ``j + jitter`` with jitter in [0, 0.9): a session's steps stay in order (their arrival
    times grow by more than 0.1), while sessions overtake each other within and across neighbouring rounds, as
    independent users do.
    """
    timed: list[tuple[float, int, int]] = []
    for s, n in enumerate(lengths):
        for j in range(n):
            timed.append((j + rng.uniform(0.0, 0.9), s, j))
    timed.sort()
    return [(s, j) for _, s, j in timed]


def _check_order(workload: Workload) -> None:
    seen: dict[int, int] = {}
    for s, j in workload.order:
        if seen.get(s, -1) + 1 != j:
            raise AssertionError(f"{workload.name}: step {j} of session {s} arrives out of order")
        seen[s] = j
    if any(seen.get(i, -1) + 1 != len(sess.steps) for i, sess in enumerate(workload.sessions)):
        raise AssertionError(f"{workload.name}: the order does not cover every step")


# ---- the workloads ---------------------------------------------------------------------------------------------
_ROLES = "support agent, travel planner, research assistant, writing coach, data analyst, tutor, project manager"


def _chat(gen: _TextGen, sizes: Mapping[str, int]) -> Workload:
    sessions: list[Session] = []
    roles = [r.strip() for r in _ROLES.split(",")]
    for u in range(sizes["users"]):
        # A per-user system prompt, as chat products write one per user (name, role, preferences).
        opening = (
            f"You are a {gen.rng.choice(roles)} for {gen.name()}, who lives in {gen.place()}. "
            f"Answer {gen.adv()} and keep answers short."
        )
        system = f"{opening} {gen.sentences(max(1, sizes['system_tokens'] - _estimate_tokens(opening)))}"
        steps = [
            Step(
                messages=[{"role": "user", "content": gen.user_question(gen.vary(sizes["question_tokens"], 0.4, 1.6))}],
                max_tokens=sizes["max_tokens"],
            )
            for _ in range(sizes["turns"])
        ]
        sessions.append(Session(f"user-{u:03d}", system, None, steps))
    order = _interleave([len(s.steps) for s in sessions], gen.rng)
    return Workload(
        "chat",
        f"{sizes['users']} users x {sizes['turns']} turns, interleaved; each turn resends the whole conversation "
        f"(a ~{sizes['system_tokens']}-token system prompt per user, ~{sizes['question_tokens']}-token questions, "
        f"answers up to {sizes['max_tokens']} tokens)",
        sessions,
        order,
        None,
    )


def _system_prompt(gen: _TextGen, sizes: Mapping[str, int]) -> Workload:
    company = f"{gen.name()} {gen.noun().title()} Services of {gen.place()}"
    head = f"You are the assistant of {company}. Follow every rule below when you answer.\n\n"
    rules: list[str] = []
    words = len(head.split())
    target = sizes["system_tokens"] / TOKENS_PER_WORD
    while not rules or words < target:
        rule = f"{len(rules) + 1}. {gen.sentences(gen.vary(40, 0.5, 1.5))}"
        rules.append(rule)
        words += len(rule.split())
    system = head + "\n".join(rules)
    sessions = [
        Session(
            f"question-{i:04d}",
            system,
            None,
            [
                Step(
                    [{"role": "user", "content": gen.user_question(gen.vary(sizes["question_tokens"], 0.5, 1.5))}],
                    sizes["max_tokens"],
                )
            ],
        )
        for i in range(sizes["questions"])
    ]
    return Workload(
        "system-prompt",
        f"one shared ~{sizes['system_tokens']}-token system prompt, {sizes['questions']} single-turn questions of "
        f"~{sizes['question_tokens']} tokens (answers up to {sizes['max_tokens']} tokens)",
        sessions,
        [(i, 0) for i in range(len(sessions))],
        None,
    )


_DOC_SYSTEM = (
    "You answer questions about the document in the user's message. Use only what the document says, quote it "
    "where you can, and say so when the document does not answer the question."
)


def _document(gen: _TextGen, index: int, tokens: int) -> str:
    return f"Document {index + 1}: {gen.title()}\n\n{gen.paragraphs(tokens)}"


def _doc_step(document: str, question: str, max_tokens: int) -> Step:
    # RAG puts the retrieved document in the user message, before the question: the system prompt stays a fixed
    # instruction shared by every request, and system + document is still a common prefix of every question about
    # that document, which is what the prompt cache can reuse.
    return Step([{"role": "user", "content": f"{document}\n\nQuestion: {question}"}], max_tokens)


def _documents(gen: _TextGen, sizes: Mapping[str, int]) -> Workload:
    docs = [_document(gen, d, sizes["document_tokens"]) for d in range(sizes["documents"])]
    sessions: list[Session] = []
    for d, doc in enumerate(docs):
        for q in range(sizes["questions"]):
            question = gen.user_question(gen.vary(sizes["question_tokens"], 0.5, 1.5))
            sessions.append(
                Session(f"doc{d:02d}-q{q:02d}", _DOC_SYSTEM, None, [_doc_step(doc, question, sizes["max_tokens"])])
            )
    # Questions about different documents interleave: each document is a stream of questions.
    streams = _interleave([sizes["questions"]] * len(docs), gen.rng)
    order = [(d * sizes["questions"] + q, 0) for d, q in streams]
    return Workload(
        "documents",
        f"{sizes['documents']} documents of ~{sizes['document_tokens']} tokens, {sizes['questions']} questions each "
        f"(document in the user message, then the question), interleaved across documents; answers up to "
        f"{sizes['max_tokens']} tokens",
        sessions,
        order,
        None,
    )


def _tool(name: str, description: str, properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {"type": "object", "properties": properties, "required": required},
        },
    }


_TOOLS: tuple[dict[str, Any], ...] = (
    _tool(
        "search_web",
        "Search the web and return the most relevant pages with a short extract of each.",
        {
            "query": {"type": "string", "description": "What to search for."},
            "max_results": {"type": "integer", "description": "How many results to return.", "minimum": 1},
        },
        ["query"],
    ),
    _tool(
        "read_file",
        "Read a text file from the project workspace.",
        {
            "path": {"type": "string", "description": "Path relative to the workspace root."},
            "start_line": {"type": "integer", "description": "First line to return (1-based)."},
            "end_line": {"type": "integer", "description": "Last line to return (inclusive)."},
        },
        ["path"],
    ),
    _tool(
        "run_python",
        "Run a Python snippet in a sandbox and return its standard output and errors.",
        {
            "code": {"type": "string", "description": "The Python source to run."},
            "timeout_s": {"type": "number", "description": "Seconds before the run is stopped."},
        },
        ["code"],
    ),
    _tool(
        "get_weather",
        "Current weather and a three-day forecast for a city.",
        {
            "city": {"type": "string", "description": "City name, optionally with its country."},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "description": "Temperature unit."},
        },
        ["city"],
    ),
    _tool(
        "send_email",
        "Send an email on the user's behalf.",
        {
            "to": {"type": "array", "items": {"type": "string"}, "description": "Recipient addresses."},
            "subject": {"type": "string"},
            "body": {"type": "string", "description": "Plain-text body."},
        },
        ["to", "subject", "body"],
    ),
)

_AGENT_SYSTEM = (
    "You are an autonomous agent. Work step by step: call one tool at a time, read its result, and continue until "
    "the task is done; then give the user a short final answer."
)


def _agent(gen: _TextGen, sizes: Mapping[str, int]) -> Workload:
    tool_names = [t["function"]["name"] for t in _TOOLS[: sizes["tools"]]]
    sessions: list[Session] = []
    for a in range(sizes["agents"]):
        task = f"Task: {gen.user_question(gen.vary(sizes['task_tokens'], 0.7, 1.3))}"
        steps = [Step([{"role": "user", "content": task}], sizes["max_tokens"])]
        for _ in range(sizes["steps"] - 1):
            # A real "tool" message must answer an assistant tool call with its id; the runner only replays the
            # model's answer as plain text, so tool results come back as user messages that name the tool, as
            # agent frameworks without native tool calling do.
            result = gen.paragraphs(gen.vary(sizes["tool_result_tokens"], 0.5, 1.5))
            steps.append(
                Step(
                    [{"role": "user", "content": f"Tool result ({gen.rng.choice(tool_names)}):\n{result}"}],
                    sizes["max_tokens"],
                )
            )
        # Every session sends the same tools (as one agent framework does), each its own copy, so nothing is shared.
        sessions.append(Session(f"agent-{a:02d}", _AGENT_SYSTEM, copy.deepcopy(list(_TOOLS[: sizes["tools"]])), steps))
    order = _interleave([len(s.steps) for s in sessions], gen.rng)
    return Workload(
        "agent",
        f"{sizes['agents']} agent sessions x {sizes['steps']} steps, interleaved; {sizes['tools']} function tools "
        f"sent with every request; the transcript grows by a ~{sizes['tool_result_tokens']}-token tool result per "
        f"step (answers up to {sizes['max_tokens']} tokens)",
        sessions,
        order,
        None,
    )


def _pressure(gen: _TextGen, sizes: Mapping[str, int]) -> Workload:
    n_docs = sizes["documents"]
    docs = [_document(gen, d, sizes["document_tokens"]) for d in range(n_docs)]
    # Popularity rank -> document: shuffled, so the popular documents are not simply the first ones written.
    ranked = list(range(n_docs))
    gen.rng.shuffle(ranked)
    weights = [0.0] * n_docs
    for rank, d in enumerate(ranked):
        weights[d] = 1.0 / (rank + 1) ** ZIPF_EXPONENT
    picks = gen.rng.choices(range(n_docs), weights=weights, k=sizes["requests"])
    sessions = [
        Session(
            f"r{i:04d}-doc{d:02d}",
            _DOC_SYSTEM,
            None,
            [_doc_step(docs[d], gen.user_question(gen.vary(sizes["question_tokens"], 0.5, 1.5)), sizes["max_tokens"])],
        )
        for i, d in enumerate(picks)
    ]
    # The working set is the documents actually asked about (a rarely asked one may not come up at all).
    doc_tokens = sum(_estimate_tokens(docs[d]) for d in sorted(set(picks)))
    cache_tokens = max(1, doc_tokens * sizes["cache_fraction_pct"] // 100)
    return Workload(
        "pressure",
        f"{n_docs} documents of ~{sizes['document_tokens']} tokens (~{doc_tokens} tokens in those asked about), "
        f"{sizes['requests']} single-turn questions whose document is drawn with Zipf({ZIPF_EXPONENT:g}) popularity; "
        f"the cache holds ~{cache_tokens} tokens ({sizes['cache_fraction_pct']}% of those documents)",
        sessions,
        [(i, 0) for i in range(len(sessions))],
        cache_tokens,
    )


_BUILDERS: dict[str, Callable[[_TextGen, Mapping[str, int]], Workload]] = {
    "chat": _chat,
    "system-prompt": _system_prompt,
    "documents": _documents,
    "agent": _agent,
    "pressure": _pressure,
}
