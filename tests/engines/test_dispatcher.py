"""The Dispatcher on its own, with a scripted engine: admission, release, timeouts, cancellation, error mapping,
and events that arrive from another thread."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from shoal.engines.base import EngineStats, SynthesisRequest
from shoal.errors import BadRequest, Busy, EngineFailure, ShoalError, Timeout, Unavailable
from shoal.service import Dispatcher, Job


class ScriptedEngine:
    """Plays `script` on its own thread for each request: ("audio", n) sends n samples, ("wait", event) blocks
    until the event or the request's cancel, ("end", error) ends. `submit_error` is raised by submit itself."""

    name = "scripted"
    sample_rate = 1000
    supports_cloning = False

    def __init__(self, script, submit_error: BaseException | None = None):
        self.script = script
        self.submit_error = submit_error
        self.threads: list[threading.Thread] = []
        self.cancels: list[threading.Event] = []
        self.ended = threading.Event()

    def submit(self, request, sink, cancel=None, stream=True, progress=None):
        if self.submit_error is not None:
            raise self.submit_error
        self.cancels.append(cancel)
        thread = threading.Thread(target=self._play, args=(sink, cancel), daemon=True)
        self.threads.append(thread)
        thread.start()

    def _play(self, sink, cancel):
        for kind, value in self.script:
            if kind == "audio":
                sink.audio(np.zeros(value, np.float32))
            elif kind == "wait":
                while not value.is_set() and not cancel.is_set():
                    value.wait(0.01)
                if cancel.is_set():
                    break
            elif kind == "end":
                sink.end(value)
                self.ended.set()
                return
        sink.end(None)
        self.ended.set()

    def stats(self):
        return EngineStats()


def job(engine) -> Job:
    return Job("scripted", engine, SynthesisRequest(text="hello"))


async def collect(dispatcher, j):
    return [len(chunk) async for chunk in dispatcher.stream(j)]


def run(coro):
    return asyncio.run(coro)


def test_chunks_arrive_in_order_from_the_engine_thread_and_the_job_is_accounted():
    engine = ScriptedEngine([("audio", 3), ("audio", 5), ("audio", 7)])
    dispatcher = Dispatcher(queue_size=2, timeout=10)
    seen = []
    dispatcher.listeners.append(seen.append)
    j = job(engine)
    assert run(collect(dispatcher, j)) == [3, 5, 7]
    assert j.outcome == "ok" and j.samples == 15 and j.first_audio is not None
    assert seen == [j] and dispatcher.depth == 0
    assert engine.threads[0] is not threading.current_thread()


def test_a_full_queue_is_busy_and_a_slot_frees_when_the_engine_lets_go():
    gate = threading.Event()
    engine = ScriptedEngine([("audio", 1), ("wait", gate), ("audio", 1)])
    dispatcher = Dispatcher(queue_size=1, timeout=10)

    async def main():
        first = dispatcher.stream(job(engine))
        assert len(await first.__anext__()) == 1  # admitted, running
        assert dispatcher.depth == 1
        busy = job(engine)
        with pytest.raises(Busy) as info:
            await collect(dispatcher, busy)
        assert info.value.retry_after and busy.outcome == "busy"
        gate.set()
        assert [len(c) async for c in first] == [1]
        assert dispatcher.depth == 0
        assert await collect(dispatcher, job(engine)) == [1, 1]  # the slot is free again

    run(main())


def test_a_consumer_that_goes_away_cancels_and_the_slot_frees_once_the_engine_ends():
    gate = threading.Event()  # never set: only the cancel ends the wait
    engine = ScriptedEngine([("audio", 1), ("wait", gate), ("audio", 1)])
    dispatcher = Dispatcher(queue_size=1, timeout=10)

    async def main():
        j = job(engine)
        stream = dispatcher.stream(j)
        await stream.__anext__()
        await stream.aclose()  # the client went away
        assert engine.cancels[0].is_set() and j.outcome == "cancelled"
        await asyncio.to_thread(engine.ended.wait, 5)
        for _ in range(100):
            if dispatcher.depth == 0:
                break
            await asyncio.sleep(0.01)
        assert dispatcher.depth == 0

    run(main())


def test_the_timeout_holds_even_while_chunks_keep_coming():
    gate = threading.Event()
    engine = ScriptedEngine([("audio", 1)] * 2000 + [("wait", gate)])
    dispatcher = Dispatcher(queue_size=1, timeout=0.3)
    j = job(engine)
    with pytest.raises(Timeout):
        run(collect(dispatcher, j))
    assert j.outcome == "timeout" and engine.cancels[0].is_set()


@pytest.mark.parametrize("error, expected", [
    (BadRequest("bad clip"), BadRequest),
    (RuntimeError("boom"), EngineFailure),
    (type("OutOfMemoryError", (RuntimeError,), {})("CUDA out of memory"), Unavailable),
])
def test_engine_errors_are_mapped_to_ours(error, expected):
    engine = ScriptedEngine([("audio", 2), ("end", error)])
    dispatcher = Dispatcher(queue_size=1, timeout=10)
    j = job(engine)
    with pytest.raises(expected) as info:
        run(collect(dispatcher, j))
    assert isinstance(info.value, ShoalError) and "boom" not in str(info.value)  # no internals in a 500
    assert j.outcome == "error" and dispatcher.depth == 0


def test_a_request_the_engine_refuses_at_submit_frees_its_slot():
    engine = ScriptedEngine([], submit_error=BadRequest("text has nothing to say"))
    dispatcher = Dispatcher(queue_size=1, timeout=10)
    j = job(engine)
    with pytest.raises(BadRequest, match="nothing to say"):
        run(collect(dispatcher, j))
    assert j.outcome == "error" and dispatcher.depth == 0


def test_a_closed_dispatcher_refuses_new_jobs():
    dispatcher = Dispatcher(queue_size=1, timeout=10)
    dispatcher.close()
    with pytest.raises(Unavailable):
        run(collect(dispatcher, job(ScriptedEngine([]))))
