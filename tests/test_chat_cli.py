"""``promptcache chat`` as a user drives it (through a pseudo-terminal and through pipes), and ``LLM.stream_chat``.

The embedded model has random weights: its text is gibberish, so these tests assert on the figures and the
structure of the session, never on the text.
"""

from __future__ import annotations

import io
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from promptcache import LLM, SamplingParams
from promptcache.chat import ChatSession
from promptcache.pricing import PRESETS

MODEL = Path(__file__).resolve().parent.parent / "promptcache" / "data" / "default_model"
BS = 16
SYSTEM = "You are a terse assistant who answers every question in one short sentence."
CHAT = [sys.executable, "-m", "promptcache.cli", "chat", "--model", str(MODEL), "--temperature", "0",
        "--max-tokens", "16", "--system", SYSTEM]  # fmt: skip
TIMEOUT = 60.0  # every wait on the child is bounded by this
STATS = re.compile(
    r"\[prompt (?P<prompt>\d+) tokens, cached (?P<cached>\d+)(?: \((?P<answer>\d+) from the previous answer\))?, "
    r"ttft (?P<ttft>[\d.]+) ms, output (?P<output>\d+) tokens[^,\]]*, cost \$(?P<cost>[\d.]+)\]"
)
GREEDY = SamplingParams(temperature=0.0, max_tokens=16)


def figures(match: re.Match[str]) -> dict[str, float]:
    return {k: float(v) for k, v in match.groupdict().items() if v is not None}


def assert_second_turn_read_the_first_answer(first: dict[str, float], second: dict[str, float]) -> None:
    """Turn 2's prompt starts with turn 1's prompt and answer; every full block of them whose KV was computed (all
    but the answer's last token, which was sampled and never fed back) is read from the cache."""
    reused = int(first["prompt"] + first["output"]) - 1
    assert second["cached"] >= reused // BS * BS
    assert second["cached"] < second["prompt"]
    assert second["answer"] == max(0, min(second["cached"], first["prompt"] + first["output"]) - first["prompt"])
    assert second["answer"] > 0  # the fixture's sizes put a block boundary inside the first answer


class PtyChat:
    """``promptcache chat`` on a pseudo-terminal: write what a user types, read what the terminal shows."""

    def __init__(self, args: list[str]) -> None:
        self.master, slave = pty.openpty()
        try:
            self.proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, close_fds=True)
        finally:
            os.close(slave)  # the child holds it; our copy would keep the terminal open after the child exits
        self.out = ""
        self.pos = 0  # what expect() has consumed

    def _read(self, deadline: float) -> bool:
        """Append what the terminal shows; False once the child side is closed."""
        ready, _, _ = select.select([self.master], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            return True
        try:
            data = os.read(self.master, 65536)
        except OSError:  # EIO: every holder of the slave side has closed it
            return False
        if not data:
            return False
        self.out += data.decode("utf-8", "replace").replace("\r\n", "\n")
        return True

    def expect(self, pattern: str | re.Pattern[str]) -> re.Match[str]:
        """Wait (bounded) for the pattern after what was consumed; consume through it."""
        regex = re.compile(re.escape(pattern)) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + TIMEOUT
        while True:
            m = regex.search(self.out, self.pos)
            if m:
                self.pos = m.end()
                return m
            if time.monotonic() > deadline or not self._read(deadline):
                raise AssertionError(f"never saw {regex.pattern!r}; the terminal shows:\n{self.out[-2000:]}")

    def say(self, line: str) -> dict[str, float]:
        """At the prompt, type a line; the figures of its answer."""
        self.expect("you> ")
        self.type(line + "\n")
        return figures(self.expect(STATS))

    def type(self, text: str | bytes) -> None:
        os.write(self.master, text.encode() if isinstance(text, str) else text)

    def wait(self) -> int:
        deadline = time.monotonic() + TIMEOUT
        while self.proc.poll() is None and time.monotonic() < deadline:
            self._read(min(deadline, time.monotonic() + 0.2))  # drain, so the child never blocks on a full terminal
        return self.proc.wait(timeout=1)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        os.close(self.master)


@pytest.fixture
def chat() -> PtyChat:
    session = PtyChat(CHAT)
    try:
        yield session
    finally:
        session.close()


# ---- through a terminal ----------------------------------------------------------------------------------------
def test_second_turn_reads_the_first_answer_from_the_cache_and_ctrl_d_exits_0(chat: PtyChat) -> None:
    first = chat.say("What is a prompt cache?")
    second = chat.say("And why does it help a second turn?")
    assert first["cached"] == 0 and "answer" not in first  # a cold cache, no previous answer
    assert first["output"] == 16 and first["cost"] > 0
    assert_second_turn_read_the_first_answer(first, second)
    assert second["prompt"] > first["prompt"] + first["output"]
    chat.expect("you> ")
    chat.type(b"\x04")  # Ctrl-D at an empty prompt: end of input
    assert chat.wait() == 0


def test_reset_restarts_the_conversation_and_keeps_the_cache(chat: PtyChat) -> None:
    first = chat.say("What is a prompt cache?")
    chat.say("Tell me more.")
    chat.expect("you> ")
    chat.type("/reset\n")
    chat.expect(re.compile(r"new conversation; the prompt cache is kept"))
    again = chat.say("What is a prompt cache?")
    assert again["prompt"] == first["prompt"]  # the conversation restarted: system prompt and this question only
    assert again["cached"] >= (first["prompt"] - 1) // BS * BS > 0  # its full blocks were read from the cache
    assert "answer" not in again
    chat.expect("you> ")
    chat.type("/exit\n")
    assert chat.wait() == 0


def test_stats_prints_the_cache_figures(chat: PtyChat) -> None:
    first = chat.say("What is a prompt cache?")
    second = chat.say("Tell me more.")
    chat.expect("you> ")
    chat.type("/stats\n")
    blocks = chat.expect(re.compile(r"cache: (\d+) blocks of 16 tokens: (\d+) cached, (\d+) in use, (\d+) free"))
    hits = chat.expect(re.compile(r"hits: (\d+) of (\d+) prompt tokens, hit rate ([\d.]+)%; evictions (\d+)"))
    session = chat.expect(re.compile(r"session: 2 turns, (\d+) prompt tokens \((\d+) cached\)"))
    total, cached, in_use, free = (int(g) for g in blocks.groups())
    assert in_use == 0 and cached > 0 and cached + free == total
    assert int(hits[1]) == second["cached"] and int(hits[2]) == first["prompt"] + second["prompt"]
    assert int(hits[4]) == 0
    assert int(session[1]) == first["prompt"] + second["prompt"] and int(session[2]) == second["cached"]
    chat.expect("you> ")
    chat.type(b"\x04")
    assert chat.wait() == 0


# ---- through pipes (scripting) ---------------------------------------------------------------------------------
def test_piped_script_works_without_a_terminal() -> None:
    script = "What is a prompt cache?\n\nAnd why does it help a second turn?\n/stats\n"
    done = subprocess.run(CHAT, input=script, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr
    first, second = (figures(m) for m in STATS.finditer(done.stdout))  # the empty line asked nothing
    assert_second_turn_read_the_first_answer(first, second)
    assert "hit rate" in done.stdout and "you> " not in done.stdout  # no prompt when no one is typing


# ---- the Python API underneath ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(model=str(MODEL), kv_cache_memory_gb=0.05)


CONVERSATION = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is a prompt cache?"}]


def test_stream_chat_streams_the_chat_text_and_frees_its_blocks_when_stopped_early(llm: LLM) -> None:
    outs = list(llm.stream_chat(CONVERSATION, GREEDY))
    final = outs[-1]
    assert final.finished and not any(o.finished for o in outs[:-1])
    assert "".join(o.new_text for o in outs) == final.text
    fresh = LLM(model=str(MODEL), kv_cache_memory_gb=0.05)
    assert fresh.chat(CONVERSATION, GREEDY)[0].text == final.text
    assert llm.replay.lookup("default", final.text) is not None  # remembered: the next turn replays its ids
    follow = [*CONVERSATION, {"role": "assistant", "content": final.text}, {"role": "user", "content": "More."}]
    second = list(llm.stream_chat(follow, GREEDY))[-1]
    assert second.num_cached_tokens >= (len(final.prompt_token_ids) + len(final.token_ids) - 1) // BS * BS

    other = [CONVERSATION[0], {"role": "user", "content": "Something else entirely."}]
    stream = llm.stream_chat(other, GREEDY)
    assert not next(stream).finished
    assert llm.cache_stats()["blocks_in_use"] > 0
    stream.close()  # what a `break` out of a for loop over it comes to
    assert llm.cache_stats()["blocks_in_use"] == 0
    assert not llm.engine.requests and not llm.engine.has_unfinished_requests()
    for out in llm.stream_chat(other, GREEDY):  # dropped mid-way: the generator is closed when collected
        if len(out.token_ids) == 3:
            break
    assert llm.cache_stats()["blocks_in_use"] == 0 and not llm.engine.requests

    with pytest.raises(ValueError, match="context"):  # checked at the call, before anything is queued
        llm.stream_chat([{"role": "user", "content": "word " * 9000}], GREEDY)
    assert not llm.engine.has_unfinished_requests()


class InterruptingOutput(io.StringIO):
    """A terminal whose user presses Ctrl-C as the first piece of an answer appears."""

    def __init__(self) -> None:
        super().__init__()
        self.pressed = False

    def write(self, text: str) -> int:
        if not self.pressed:
            self.pressed = True
            os.kill(os.getpid(), signal.SIGINT)
        return super().write(text)


class CtrlCAtPrompt(io.StringIO):
    """Input that runs out with Ctrl-C at the prompt."""

    def readline(self, size: int | None = -1) -> str:
        line = super().readline()
        if not line:
            raise KeyboardInterrupt
        return line


def test_ctrl_c_aborts_the_answer_and_the_session_goes_on(llm: LLM) -> None:
    handler = signal.getsignal(signal.SIGINT)
    out = InterruptingOutput()
    lines = CtrlCAtPrompt("What is a prompt cache?\n" + "word " * 9000 + "\nWhat is a prompt cache?\n/stats\n")
    session = ChatSession(llm, GREEDY, PRESETS["default"], system=SYSTEM, stdin=lines, stdout=out, interactive=False)
    assert session.run() == 0  # Ctrl-C at the prompt leaves cleanly
    text = out.getvalue()
    interrupted = re.search(r"\[interrupted after (\d+) tokens", text)
    assert interrupted and int(interrupted[1]) < GREEDY.max_tokens
    assert "error: " in text and "context" in text  # a refused request is reported; the session goes on
    (answered,) = (figures(m) for m in STATS.finditer(text))
    assert "answer" not in answered  # the interrupted question was dropped from the conversation
    assert session.totals.turns == 1 and len(session.messages) == 3
    assert llm.cache_stats()["blocks_in_use"] == 0
    assert signal.getsignal(signal.SIGINT) is handler  # the session's Ctrl-C handler is gone after the answer
