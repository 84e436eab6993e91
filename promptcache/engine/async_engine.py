"""The engine in its own thread, with an asyncio front: many concurrent streams, one stepping loop.

NOTE: every call into ``LLMEngine`` happens on the engine thread. Other threads talk to it through a command
queue (add, abort, run a function) and receive outputs through per-request asyncio queues fed with
``call_soon_threadsafe``. A failure inside a step fails the requests of that step, frees their blocks and keeps
the loop serving.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import traceback
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

from promptcache.engine.engine import LLMEngine
from promptcache.engine.request import RequestOutput, SamplingParams

log = logging.getLogger("promptcache.engine")
T = TypeVar("T")


class QueueFullError(RuntimeError):
    """The engine has as many waiting requests as it accepts; retry later."""


class EngineDeadError(RuntimeError):
    """A request failed inside the engine (the engine itself keeps serving)."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput | BaseException] = field(default_factory=asyncio.Queue)


class AsyncEngine:
    """Runs ``LLMEngine.step()`` in a background thread and streams outputs to asyncio consumers."""

    def __init__(self, engine: LLMEngine, max_waiting: int = 1024):
        self.engine = engine
        self.max_waiting = max_waiting
        self._commands: queue.Queue[Callable[[], None]] = queue.Queue()
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="promptcache-engine", daemon=True)
        self.num_waiting_or_running = 0

    def start(self) -> None:
        self._thread.start()

    def shutdown(self) -> None:
        """Stop the loop, then let the engine finish its pending tier writes."""
        self._stop.set()
        self._commands.put(lambda: None)
        self._thread.join(timeout=10)
        self.engine.close()

    # ---- calls from other threads ---------------------------------------------------------------------------
    def call(self, fn: Callable[[LLMEngine], T]) -> Future[T]:
        """Run ``fn(engine)`` on the engine thread between steps; the future has its result."""
        fut: Future[T] = Future()

        def run() -> None:
            try:
                fut.set_result(fn(self.engine))
            except BaseException as err:  # handed to the caller
                fut.set_exception(err)

        self._commands.put(run)
        return fut

    async def call_async(self, fn: Callable[[LLMEngine], T]) -> T:
        return await asyncio.wrap_future(self.call(fn))

    async def generate(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        namespace: str,
        request_id: str,
        cache_breakpoints: list[tuple[int, float]] | None = None,
        retention_seconds: float = 0.0,
    ) -> AsyncIterator[RequestOutput]:
        """Queue a request and yield its outputs as they come; the last one has ``finished`` set.

        Raises ValueError for bad input, QueueFullError when the engine is saturated. Closing the iterator
        early (a client that went away) aborts the request and frees its blocks.
        """
        with self._lock:
            if self.num_waiting_or_running >= self.max_waiting:
                raise QueueFullError(f"the engine already holds {self.num_waiting_or_running} requests")
            self.num_waiting_or_running += 1
        stream = _Stream(asyncio.get_running_loop())
        self._streams[request_id] = stream
        try:
            await self.call_async(
                lambda e: e.add_request(prompt_ids, params, namespace, request_id, cache_breakpoints, retention_seconds)
            )
        except BaseException:
            self._forget(request_id)
            raise
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item.finished:
                    finished = True
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request_id)
            self._forget(request_id)

    def abort(self, request_id: str) -> None:
        def run() -> None:
            self.engine.abort(request_id)
            self.engine.release(request_id)

        self._commands.put(run)

    def _forget(self, request_id: str) -> None:
        if self._streams.pop(request_id, None) is not None:
            with self._lock:
                self.num_waiting_or_running -= 1

    # ---- the engine thread ----------------------------------------------------------------------------------
    def _loop(self) -> None:
        engine = self.engine
        while not self._stop.is_set():
            if not engine.has_unfinished_requests():
                try:  # idle: sleep until a command comes
                    self._run_command(self._commands.get(timeout=0.5))
                except queue.Empty:
                    continue
            while True:  # every pending command runs before the next step
                try:
                    self._run_command(self._commands.get_nowait())
                except queue.Empty:
                    break
            if engine.has_unfinished_requests():
                self._step()

    @staticmethod
    def _run_command(cmd: Callable[[], None]) -> None:
        try:
            cmd()
        except Exception:  # a failed command must not stop the loop
            log.error("engine command failed\n%s", traceback.format_exc())

    def _step(self) -> None:
        engine = self.engine
        try:
            outputs = engine.step()
        except Exception as err:  # one bad step must not take the server down
            log.error("engine step failed; failing its requests\n%s", traceback.format_exc())
            self._fail_all(EngineDeadError(f"the request failed inside the engine: {err}"))
            return
        for out in outputs:
            self._deliver(out.request_id, out)
            if out.finished:
                engine.release(out.request_id)

    def _fail_all(self, err: BaseException) -> None:
        engine = self.engine
        for rid in [r.request_id for r in engine.scheduler.running + list(engine.scheduler.waiting)]:
            engine.abort(rid)
            engine.release(rid)
            self._deliver(rid, err)

    def _deliver(self, request_id: str, item: Any) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)
