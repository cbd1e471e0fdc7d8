"""Continuous batching for the dual-AR model, on the one engine thread.

One thread, "shoal-engine", runs every torch operation of the engine: the engine's own work (handed over with
`call_soon`), each newcomer's prefill, the batched decode steps, and after each step the engine's `after_step`
work (the fish engine's codec stage). Requests become *rows*. A row holds one slot of the persistent
`DecodeBatch` (shoal.fish.generate): its position, sampling parameters, penalty history and `torch.Generator`
live there, on the device, and its KV cache in the same slot of the model's caches. Active rows hold slots
0..n-1; when one leaves, the last moves into its slot, so a decode step reads views, never a gather. At every
step boundary the scheduler admits the waiting rows that fit (their prefills are the only thing running rows wait
for, bounded by `PREFILL_POSITIONS`), runs one batched decode step (`decode_one_token`) for every active row, copies the new frames to the host once,
hands each row its frame (`on_frame`, on this thread) and retires the rows that finished or were cancelled
(`on_end`).

Because every row keeps its own state and its own generator, a request's codes are the same whether it runs
alone or beside others. That is also how a failed step is isolated: the generators are restored and the rows
are stepped again one by one (a CUDA out-of-memory: in halves), so the row that fails is found and fails alone,
while the others get exactly the frames they would have got.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import logging
import queue
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator, TypeVar

import torch

from shoal.errors import Unavailable
from shoal.fish.dual_ar import DualARTransformer
from shoal.fish.generate import DecodeBatch, decode_one_token, is_last, prefill
from shoal.fish.runner import ModelRunner
from shoal.fish.sampling import SamplingParams

log = logging.getLogger("shoal.scheduler")
T = TypeVar("T")

#: KV caches grow in steps of this many positions (copying the rows in flight), never past max_seq_len.
CACHE_STEP = 1024
#: Prompt positions prefilled at one step boundary (the first newcomer is admitted whatever its length): running
#: rows wait for these prefills, so this bounds how long a burst of arrivals stalls them.
PREFILL_POSITIONS = 2048
#: The window over which `tokens_per_second` is measured.
RATE_WINDOW_SECONDS = 10.0
#: Frames counted within this long of each other share one entry of that window (about one step).
RATE_BUCKET_SECONDS = 0.05
#: The name of the one thread that runs the engine's torch operations.
ENGINE_THREAD = "shoal-engine"
_DONE = object()


@dataclass(eq=False)
class Row:
    """One generation in flight (a segment of a request). On the engine thread, the scheduler calls
    `on_frame(frame)` with each new frame, a `[1 + num_codebooks]` int64 CPU tensor, and then `on_end(error)`
    exactly once: None when the row finished or was cancelled, else the exception that ended it. Without those
    callbacks, frames go to a queue that iterating the row reads (tests and offline callers)."""

    prompt: torch.Tensor
    params: SamplingParams
    generator: torch.Generator
    max_new_tokens: int
    im_end_id: int
    on_frame: Callable[[torch.Tensor], None] | None = None
    on_end: Callable[[BaseException | None], None] | None = None
    #: Testing only: called inside every decode step this row is part of, as fault(frames produced, rows in the
    #: step); it may raise, as a real failure inside the batched step would (see Settings.fault_injection).
    fault: Callable[[int, int], None] | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    #: The request's own cancel event, if it has one: set when its client goes away.
    request_cancel: threading.Event | None = None
    slot: int = -1  # in the DecodeBatch, while active
    _queue: queue.Queue | None = None

    def __post_init__(self) -> None:
        if self.on_frame is None:
            q = self._queue = queue.Queue()
            self.on_frame = q.put
            self.on_end = lambda error: q.put(_DONE if error is None else error)

    @property
    def positions_needed(self) -> int:
        return self.prompt.shape[1] + self.max_new_tokens

    def cancel(self) -> None:
        self.cancelled.set()

    @property
    def stopped(self) -> bool:
        return self.cancelled.is_set() or (self.request_cancel is not None and self.request_cancel.is_set())

    def __iter__(self) -> Iterator[torch.Tensor]:
        """Block for frames until the row finishes (rows submitted without callbacks). Stopping early does not
        cancel: call cancel()."""
        if self._queue is None:
            raise TypeError("this row delivers its frames to its on_frame callback")
        while True:
            item = self._queue.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


class BatchScheduler:
    """Decode up to `max_batch` rows together; `max_tokens` bounds positions (prompt + budget) in flight."""

    def __init__(self, model: DualARTransformer, max_batch: int = 8, max_tokens: int | None = None,
                 runner: ModelRunner | None = None):
        self.model = model
        self.runner = runner or ModelRunner(model, max_batch)
        self.max_batch = max_batch
        self.max_tokens = max_tokens or max_batch * model.config.max_seq_len
        self.device = model.embeddings.weight.device
        self.batch = DecodeBatch(model, max_batch)
        self._waiting: deque[Row] = deque()
        self._active: list[Row] = []  # index == slot in self.batch
        self._cond = threading.Condition()
        self._stopped = False
        self.steps = 0
        self.max_seen_batch = 0
        #: Frames (tokens) generated since start, prefill frames included.
        self.frames_generated = 0
        #: Decode steps that failed and were replayed row by row (or in halves, for out-of-memory).
        self.isolated_faults = 0
        self._recent: deque[tuple[float, int]] = deque()  # (time, frames) per step within RATE_WINDOW_SECONDS
        self._ending: list[tuple[Row, BaseException | None]] = []  # rows to retire at the end of this step
        self._tasks: list[Callable[[], None]] = []  # call_soon's, run at the next step boundary
        #: Run on the engine thread at the end of every loop turn (the fish engine's codec stage).
        self.after_step: Callable[[], None] | None = None
        self._thread = threading.Thread(target=self._loop, name=ENGINE_THREAD, daemon=True)
        self._thread.start()
        # Stop the thread before the interpreter tears torch down under it (which aborts the process).
        ref = weakref.ref(self)
        atexit.register(lambda: (s := ref()) is not None and s.stop())

    # -- public, any thread ------------------------------------------------------------------------------------
    def submit(self, prompt: torch.Tensor, params: SamplingParams, generator: torch.Generator,
               max_new_tokens: int, im_end_id: int, cancel: threading.Event | None = None,
               fault: Callable[[int, int], None] | None = None,
               on_frame: Callable[[torch.Tensor], None] | None = None,
               on_end: Callable[[BaseException | None], None] | None = None) -> Row:
        """Queue a row (see Row for `on_frame` and `on_end`). Setting `cancel` (the request's event) or calling
        `row.cancel()` drops it while it waits and retires it at the next step once it runs. (The service's
        admission limit bounds the queue.)"""
        row = Row(prompt.long().to(self.device), params, generator, max_new_tokens, im_end_id, on_frame=on_frame,
                  on_end=on_end, request_cancel=cancel, fault=fault)
        if row.positions_needed > self.model.config.max_seq_len:
            raise ValueError("prompt + max_new_tokens exceed the model's max_seq_len")
        with self._cond:
            if self._stopped:
                raise Unavailable("the engine is shutting down")
            self._waiting.append(row)
            self._cond.notify()
        return row

    def call_soon(self, task: Callable[[], None]) -> None:
        """Run `task` on the engine thread at the next step boundary (in inference mode). It must handle its own
        errors: one that escapes is logged. Tasks still queued when the scheduler stops are run then, so every
        request hears back (rows they submit fail with Unavailable)."""
        with self._cond:
            if self._stopped:
                raise Unavailable("the engine is shutting down")
            self._tasks.append(task)
            self._cond.notify()

    def call(self, fn: Callable[[], T]) -> T:
        """`fn()` run on the engine thread, from any thread (directly when already on it); blocks until done."""
        if threading.current_thread() is self._thread:
            return fn()
        future: concurrent.futures.Future = concurrent.futures.Future()

        def task() -> None:
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)

        self.call_soon(task)
        return future.result()

    @property
    def in_flight(self) -> int:
        """Rows waiting or decoding; 0 once every request has finished or been cancelled."""
        with self._cond:
            return len(self._waiting) + len(self._active)

    @property
    def batch_size(self) -> int:
        return len(self._active)

    @property
    def tokens_per_second(self) -> float:
        """Frames generated per second over the last RATE_WINDOW_SECONDS (0 when idle)."""
        now = time.monotonic()
        with self._cond:
            recent = [(t, n) for t, n in self._recent if now - t <= RATE_WINDOW_SECONDS]
        return sum(n for _, n in recent) / RATE_WINDOW_SECONDS

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(timeout=10)

    # -- the engine thread ---------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and not self._tasks and not self._waiting and not self._active:
                    self._cond.wait()
                tasks, self._tasks = self._tasks, []
                stopped = self._stopped
            with torch.inference_mode():
                self._run_tasks(tasks)
                if stopped:
                    self._fail_all(Unavailable("the engine is shutting down"))
                    return
                with self._cond:
                    newcomers = self._admissible()
                try:
                    for row in newcomers:
                        self._prefill(row)
                    self._retire()
                    if self._active:
                        self._step()
                    self._retire()
                except BaseException as exc:  # a bug outside the isolated step: fail the rows, never the thread
                    log.exception("scheduler step failed")
                    for row in list(self._active):
                        self._end(row, exc)
                    self._retire()
                if self.after_step is not None:
                    self._guarded(self.after_step)

    def _run_tasks(self, tasks: list[Callable[[], None]]) -> None:
        for task in tasks:
            self._guarded(task)

    @staticmethod
    def _guarded(fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception:
            log.exception("engine work failed")

    def _admissible(self) -> list[Row]:
        """Pop the waiting rows (in order) that free slots, the token budget and `PREFILL_POSITIONS` allow, at
        least one if a slot is free; cancelled ones are dropped. Rows admitted together decode in step from then on,
        so their streamed chunks line up for batched codec calls."""
        if any(row.stopped for row in self._waiting):
            for row in [r for r in self._waiting if r.stopped]:
                self._waiting.remove(row)
                self._notify_end(row, None)
        admitted: list[Row] = []
        in_flight = sum(r.positions_needed for r in self._active)
        prefill = 0
        while self._waiting and len(self._active) + len(admitted) < self.max_batch:
            row = self._waiting[0]
            if (self._active or admitted) and in_flight + row.positions_needed > self.max_tokens:
                break
            if admitted and prefill + row.prompt.shape[1] > PREFILL_POSITIONS:
                break
            admitted.append(self._waiting.popleft())
            in_flight += row.positions_needed
            prefill += row.prompt.shape[1]
        return admitted

    def _ensure_cache(self, positions: int) -> None:
        model = self.model
        if self.runner.static_cache:
            if model.cache_batch < self.max_batch:
                model.setup_caches(batch=self.max_batch)  # once, at full length
            return
        if model.cache_batch >= self.max_batch and model.cache_seq_len >= positions:
            return
        size = min(-(-positions // CACHE_STEP) * CACHE_STEP, model.config.max_seq_len)
        size = max(size, model.cache_seq_len)
        old = [(layer.attention.kv_cache.k, layer.attention.kv_cache.v) for layer in model.layers
               if layer.attention.kv_cache is not None]
        model.setup_caches(batch=self.max_batch, seq_len=size)
        for layer, (k, v) in zip(model.layers, old):  # keep the rows in flight
            n, s = min(k.shape[0], self.max_batch), k.shape[2]
            layer.attention.kv_cache.k[:n, :, :s] = k[:n]
            layer.attention.kv_cache.v[:n, :, :s] = v[:n]

    def _prefill(self, row: Row) -> None:
        self._ensure_cache(row.positions_needed)
        row.slot = self.batch.add(row.prompt.shape[1], row.max_new_tokens, row.params, row.generator,
                                  row.im_end_id)
        self._active.append(row)
        try:
            frame = prefill(self.model, self.batch, row.slot, row.prompt)
        except BaseException as exc:
            self._end(row, exc)
            return
        self._publish(row, frame.cpu(), loop_frame=False)

    def _step(self) -> None:
        n = len(self._active)
        self.max_seen_batch = max(self.max_seen_batch, n)
        self.steps += 1
        self._run_range(0, n, isolate=True)

    def _run_range(self, lo: int, hi: int, isolate: bool) -> None:
        """Decode slots lo..hi-1 together. If that fails: restore their generators and, with `isolate`, replay
        them in smaller groups (halves for out-of-memory, single rows otherwise) until the failing rows are found;
        a single row that fails ends with its error."""
        states = self.batch.snapshot(lo, hi)
        try:
            frames = decode_one_token(self.model, self.batch, lo, hi, slow=self.runner.slow, fast=self.runner.fast,
                                      hook=self._faults)
        except BaseException as exc:
            self.batch.restore(lo, states)
            if hi - lo == 1:
                log.warning("decode step failed for one row: %s: %s", type(exc).__name__, exc)
                self._end(self._active[lo], exc)
                return
            if not isolate or isinstance(exc, (KeyboardInterrupt, SystemExit)):
                raise
            self.isolated_faults += 1
            log.warning("a batched decode step of %d rows failed (%s); replaying it %s", hi - lo,
                        type(exc).__name__, "in halves" if is_out_of_memory(exc) else "row by row")
            groups = halves(lo, hi) if is_out_of_memory(exc) else [(s, s + 1) for s in range(lo, hi)]
            for a, b in groups:
                self._run_range(a, b, isolate=True)
            return
        host = frames.cpu()  # the one device-to-host copy of the step
        for row, frame in zip(self._active[lo:hi], host):
            self._publish(row, frame, loop_frame=True)

    def _faults(self, lo: int, hi: int) -> None:
        for slot in range(lo, hi):
            fault = self._active[slot].fault
            if fault is not None:
                fault(self.batch.produced[slot], hi - lo)

    def _publish(self, row: Row, frame: torch.Tensor, loop_frame: bool) -> None:
        """Hand a frame (on the host) to the row's consumer; mark the row to retire if it was its last."""
        self._count_frame()
        try:
            row.on_frame(frame)
        except Exception as exc:  # the consumer's own failure ends its row, not the step
            log.exception("a row's frame consumer failed")
            self._end(row, exc)
            return
        if is_last(int(frame[0]), self.batch.produced[row.slot], row.max_new_tokens, row.im_end_id, loop_frame):
            self._end(row)

    def _count_frame(self) -> None:
        now = time.monotonic()
        self.frames_generated += 1
        with self._cond:
            if self._recent and now - self._recent[-1][0] < RATE_BUCKET_SECONDS:  # one entry per step, roughly
                self._recent[-1] = (self._recent[-1][0], self._recent[-1][1] + 1)
            else:
                self._recent.append((now, 1))
            while self._recent and now - self._recent[0][0] > RATE_WINDOW_SECONDS:
                self._recent.popleft()

    def _end(self, row: Row, error: BaseException | None = None) -> None:
        """Retire `row` once the step is over (slots move when rows leave, so not in the middle of one)."""
        if all(r is not row for r, _ in self._ending):
            self._ending.append((row, error))

    def _retire(self) -> None:
        for row in self._active:
            if row.stopped:
                self._end(row)
        ending, self._ending = self._ending, []
        for row, error in ending:
            with self._cond:
                moved = self.batch.remove(row.slot)
                if moved is not None:
                    self._active[row.slot] = self._active[moved]
                    self._active[row.slot].slot = row.slot
                self._active.pop()
            row.slot = -1
            self._notify_end(row, error)

    @staticmethod
    def _notify_end(row: Row, error: BaseException | None) -> None:
        try:
            row.on_end(error)
        except Exception:
            log.exception("a row's end callback failed")

    def _fail_all(self, error: BaseException) -> None:
        for row in list(self._active):
            self._end(row, error)
        self._retire()
        waiting, self._waiting = list(self._waiting), deque()
        for row in waiting:
            self._notify_end(row, error)


def is_out_of_memory(exc: BaseException) -> bool:
    return type(exc).__name__ == "OutOfMemoryError"


def halves(lo: int, hi: int) -> list[tuple[int, int]]:
    mid = (lo + hi) // 2
    return [(lo, mid), (mid, hi)]
