"""``promptcache chat``: an interactive terminal chat that shows, turn by turn, what the prompt cache served.

Each answer is streamed as it is generated and followed by one line of figures: prompt tokens, how many came
from the cache and how many of those were the previous answer (replayed with the exact ids the model generated),
time to first token, output tokens and the turn's cost under a price list.

The loop is :class:`ChatSession`, which reads lines from any text stream and writes to any other, so that tests
and scripts can drive it as well as a terminal.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TextIO

from promptcache.engine.request import RequestOutput, SamplingParams
from promptcache.pricing import PriceTable, Pricing, TokenUsage

if TYPE_CHECKING:
    from promptcache.llm import LLM

PROMPT = "you> "
HELP = """\
Type a message and press Enter; the answer streams as it is generated, then one line of figures:
  prompt tokens, cached tokens (and how many of them were the previous answer), time to first token,
  output tokens and the turn's cost.
Commands:
  /reset   start a new conversation (the prompt cache keeps every block, so a repeated prefix still hits)
  /stats   the cache's blocks, hit rate and evictions, and this session's tokens and cost
  /help    this text
  /exit    leave (or Ctrl-D); Ctrl-C stops an answer, or leaves at the prompt"""


@dataclass
class SessionTotals:
    """Tokens and USD over every answered turn of the session (all conversations)."""

    turns: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    output_tokens: int = 0
    cost: float = 0.0
    cost_without_cache: float = 0.0  # the same tokens with every prompt token billed as uncached input


class ChatSession:
    """A chat loop over an :class:`~promptcache.llm.LLM`: read a line, stream the answer, print its figures.

    Args:
        llm: the model to talk to.
        params: sampling parameters for every answer.
        pricing: prices per million tokens for the cost figures (cached input billed as cached).
        system: an optional system prompt, kept across ``/reset``.
        stdin, stdout: the streams to read lines from and to write to (default: the process's).
        interactive: whether a person is typing: then the ``you>`` prompt is shown and, on the process's own
            terminal, lines are read with ``input()`` (line editing and history when readline is loaded).
            Default: whether ``stdin`` is a terminal.
        namespace: the cache namespace of every request.
    """

    def __init__(
        self,
        llm: LLM,
        params: SamplingParams,
        pricing: Pricing,
        system: str | None = None,
        stdin: TextIO | None = None,
        stdout: TextIO | None = None,
        interactive: bool | None = None,
        namespace: str = "default",
    ) -> None:
        self.llm = llm
        self.params = params
        self.pricing = pricing
        self.system = system
        self.stdin = stdin or sys.stdin
        self.stdout = stdout or sys.stdout
        self.interactive = _isatty(self.stdin) if interactive is None else interactive
        self.namespace = namespace
        self.totals = SessionTotals()
        self.messages: list[dict[str, Any]] = []
        # The previous turn's prompt ids and the answer's replayed ids: where that answer sits in the next prompt.
        self._previous: tuple[list[int], list[int]] | None = None
        self._interrupted = threading.Event()
        self.reset()

    # ---- the loop -------------------------------------------------------------------------------------------
    def run(self) -> int:
        """Serve lines until end of input, ``/exit`` or Ctrl-C at the prompt; returns the exit status (0)."""
        if self.interactive:
            self._write("promptcache chat: /help lists the commands; Ctrl-D or /exit leaves.\n")
        while True:
            try:
                line = self._read_line()
            except (EOFError, KeyboardInterrupt):
                if self.interactive:  # end the prompt's line so the shell's prompt starts on its own
                    self._write("\n")
                return 0
            if not self.handle(line):
                return 0

    def handle(self, line: str) -> bool:
        """Act on one input line; False when the session should end."""
        text = line.strip()
        if not text:
            return True
        if text.startswith("/"):
            return self._command(text)
        self.ask(text)
        return True

    def reset(self) -> None:
        """Start a new conversation (only the system prompt is kept); the cache is untouched."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self._previous = None

    def ask(self, text: str) -> RequestOutput | None:
        """Send one user message, stream the answer and print its figures.

        Returns the final output, or None when the engine refused the request (the message is then dropped and
        the error printed) or the answer was interrupted (then the message and the partial answer are dropped).
        """
        messages = [*self.messages, {"role": "user", "content": text}]
        final: RequestOutput | None = None
        self._interrupted.clear()
        try:
            stream = self.llm.stream_chat(messages, self.params, namespace=self.namespace)
            # closing(): whatever ends the loop early, the generator's close aborts the request and frees its blocks.
            with self._defer_sigint(), contextlib.closing(stream):
                for out in stream:
                    if out.new_text:
                        self._write(out.new_text)
                    final = out
                    if self._interrupted.is_set():
                        break
        except KeyboardInterrupt:  # a second Ctrl-C, or one that came while not deferred
            self._interrupted.set()
        except ValueError as err:  # refused by the engine (too long for the context, ...): the session goes on
            self._write(f"{_line_end(final.text if final is not None else '')}error: {err}\n")
            return None
        if final is None or not final.finished:
            done = len(final.token_ids) if final is not None else 0
            partial = final.text if final is not None else ""
            note = f"[interrupted after {done} tokens: the question and its partial answer are dropped]"
            self._write(_line_end(partial) + note + "\n")
            return None
        self._write(_line_end(final.text) + self._figures(final) + "\n")
        self.messages = [*messages, {"role": "assistant", "content": final.text}]
        replayed = self.llm.replay.lookup(self.namespace, final.text)
        self._previous = (list(final.prompt_token_ids), list(replayed)) if replayed else None
        return final

    # ---- figures --------------------------------------------------------------------------------------------
    def _figures(self, out: RequestOutput) -> str:
        """One line: prompt / cached (previous answer) / TTFT / output / cost, and add the turn to the totals."""
        # As the server bills it: no explicit breakpoints here, so no cache writes; cached reads at their price.
        usage = TokenUsage(
            prompt_tokens=len(out.prompt_token_ids),
            cached_tokens=out.num_cached_tokens,
            output_tokens=len(out.token_ids),
        )
        cost = self.pricing.cost(usage)["total"]
        uncached = self.pricing.cost(TokenUsage(usage.prompt_tokens, 0, usage.output_tokens))["total"]
        t = self.totals
        t.turns += 1
        t.prompt_tokens += usage.prompt_tokens
        t.cached_tokens += usage.cached_tokens
        t.output_tokens += usage.output_tokens
        t.cost += cost
        t.cost_without_cache += uncached
        cached = f"cached {usage.cached_tokens}"
        if self._previous is not None:
            from_answer = _cached_from_answer(out.prompt_token_ids, out.num_cached_tokens, *self._previous)
            cached += f" ({from_answer} from the previous answer)"
        ttft = (out.metrics.time_to_first_token or 0.0) * 1000
        reason = f" ({out.finish_reason})" if out.finish_reason == "length" else ""
        return (
            f"[prompt {usage.prompt_tokens} tokens, {cached}, ttft {ttft:.1f} ms, "
            f"output {usage.output_tokens} tokens{reason}, cost ${cost:.7f}]"
        )

    def _stats(self) -> str:
        s = self.llm.cache_stats()
        t = self.totals
        saved = t.cost_without_cache - t.cost
        return (
            f"cache: {s['num_blocks']} blocks of {s['block_size']} tokens: {s['blocks_cached']} cached, "
            f"{s['blocks_in_use']} in use, {s['blocks_free']} free, {s['blocks_pinned']} pinned\n"
            f"hits: {s['hit_tokens']} of {s['query_tokens']} prompt tokens, hit rate {float(s['hit_rate']):.1%}; "
            f"evictions {s['evictions']} ({s['eviction_policy']}), preemptions {s['preemptions']}\n"
            f"session: {t.turns} turns, {t.prompt_tokens} prompt tokens ({t.cached_tokens} cached), "
            f"{t.output_tokens} output tokens, cost ${t.cost:.7f} (without the cache ${t.cost_without_cache:.7f}, "
            f"saved ${saved:.7f})"
        )

    # ---- commands and I/O -----------------------------------------------------------------------------------
    def _command(self, text: str) -> bool:
        name = text.split()[0].lower()
        if name in ("/exit", "/quit"):
            return False
        if name == "/reset":
            self.reset()
            self._write("[new conversation; the prompt cache is kept, so a repeated prefix is still read from it]\n")
        elif name == "/stats":
            self._write(self._stats() + "\n")
        elif name == "/help":
            self._write(HELP + "\n")
        else:
            self._write(f"unknown command {name}; /help lists them\n")
        return True

    def _read_line(self) -> str:
        """The next line without its newline; EOFError at the end of input."""
        if self.interactive and self.stdin is sys.stdin and self.stdout is sys.stdout:
            return input(PROMPT)  # on the process's terminal: readline's editing and history when it is loaded
        if self.interactive:
            self._write(PROMPT)
        line = self.stdin.readline()
        if not line:
            raise EOFError
        return line.rstrip("\r\n")

    def _write(self, text: str) -> None:
        self.stdout.write(text)
        self.stdout.flush()  # stream as the text arrives, whatever the stream's buffering

    @contextlib.contextmanager
    def _defer_sigint(self) -> Iterator[None]:
        """While an answer streams, a first Ctrl-C only sets a flag, checked between tokens.

        An interrupt that landed inside ``engine.step()`` could leave the scheduler half-updated; the flag lets
        the answer stop between steps, where aborting it is clean. A second Ctrl-C interrupts at once (a long
        prefill yields no token to stop at). Signal handlers can only be set from the main thread; elsewhere a
        KeyboardInterrupt is caught as it comes.
        """
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def on_sigint(signum: int, frame: object) -> None:
            if self._interrupted.is_set():
                raise KeyboardInterrupt
            self._interrupted.set()

        previous: Callable[..., Any] | int | None = signal.signal(signal.SIGINT, on_sigint)
        try:
            yield
        finally:
            # None: the previous handler was not set from Python; Python's own is the sensible one to put back.
            signal.signal(signal.SIGINT, signal.default_int_handler if previous is None else previous)


def _cached_from_answer(prompt_ids: list[int], num_cached: int, prev_prompt: list[int], prev_answer: list[int]) -> int:
    """How many of the cached tokens are the previous answer, at the place it sits in this prompt.

    The previous prompt is a prefix of this one and the answer's ids follow it, unless the template re-rendered
    the history differently; then the cache cannot have matched the answer in place, and the count is 0.
    """
    start = len(prev_prompt)
    end = start + len(prev_answer)
    if prompt_ids[:start] != prev_prompt or prompt_ids[start:end] != prev_answer:
        return 0
    return max(0, min(num_cached, end) - start)


def _line_end(text: str) -> str:
    """The newline that ends an answer's last line before the figures (none if the answer wrote nothing)."""
    return "\n" if text and not text.endswith("\n") else ""


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or file-less stream is not a terminal
        return False


def run_chat(
    model: str | None = None,
    system: str | None = None,
    params: SamplingParams | None = None,
    prices: PriceTable | None = None,
    device: str = "auto",
    dtype: str = "auto",
    **engine_options: Any,
) -> int:
    """Load the model and run a :class:`ChatSession` on this process's terminal (or pipes); the exit status.

    ``prices`` is looked up under the model's name, as the server does (default: the ``default`` preset).
    """
    from promptcache.llm import LLM

    if _isatty(sys.stdin):
        with contextlib.suppress(ImportError):  # line editing and history for input(); absent on some builds
            import readline  # noqa: F401
    llm = LLM(model=model, device=device, dtype=dtype, **engine_options)
    params = params or SamplingParams()
    params.validate(llm.engine.model_config.vocab_size)  # a bad option fails once, here, not on every turn
    table = prices or PriceTable.preset("default")
    # The name the server would serve this model under (its price-file key).
    pricing = table.for_model(llm.engine.model_name)
    return ChatSession(llm, params, pricing, system=system).run()
