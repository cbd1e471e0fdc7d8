"""Continuous batching for the dual-AR model.

One scheduler thread owns the model. Requests are submitted from any thread and become *rows*: each has its own
KV-cache slot, position, sampling parameters, repetition window and `torch.Generator`. At every step boundary
the scheduler admits at most one newcomer (its prefill is the only thing running rows wait for), then runs one
batched decode step for every active row and retires the rows that finished or were cancelled.

Because every row keeps its own state and its own generator, a request's codes are the same whether it runs
alone or beside others.
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator

import torch

from shoal.errors import Busy, Unavailable
from shoal.fish.dual_ar import DualARTransformer
from shoal.fish.generate import PENALTY_WINDOW, sample_frame
from shoal.fish.runner import ModelRunner
from shoal.fish.sampling import SamplingParams, params_tensor

log = logging.getLogger("shoal.scheduler")

#: KV caches grow in steps of this many positions (copying the rows in flight), never past max_seq_len.
CACHE_STEP = 1024
#: The window over which `tokens_per_second` is measured.
RATE_WINDOW_SECONDS = 10.0
_DONE = object()


@dataclass(eq=False)
class Row:
    """One request in flight. Frames arrive on `frames` (a queue) as `[1 + num_codebooks]` int64 CPU tensors;
    the scheduler ends the stream with _DONE, or with an exception."""

    prompt: torch.Tensor
    params: SamplingParams
    generator: torch.Generator
    max_new_tokens: int
    im_end_id: int
    frames: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    #: The request's own cancel event, if it has one: set when its client goes away, even while the consumer
    #: thread is still blocked waiting for this row's first frame.
    request_cancel: threading.Event | None = None
    # Scheduler-side state
    slot: int = -1
    produced: int = 0
    history: torch.Tensor | None = None
    last: torch.Tensor | None = None
    params_t: torch.Tensor | None = None

    @property
    def positions_needed(self) -> int:
        return self.prompt.shape[1] + self.max_new_tokens

    def cancel(self) -> None:
        self.cancelled.set()

    @property
    def stopped(self) -> bool:
        return self.cancelled.is_set() or (self.request_cancel is not None and self.request_cancel.is_set())

    def __iter__(self) -> Iterator[torch.Tensor]:
        """Block for frames until the row finishes. Stopping early does not cancel: call cancel()."""
        while True:
            item = self.frames.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


class BatchScheduler:
    """Decode up to `max_batch` rows together; `max_tokens` bounds positions (prompt + budget) in flight."""

    def __init__(self, model: DualARTransformer, max_batch: int = 8, max_tokens: int | None = None,
                 max_waiting: int = 256, runner: ModelRunner | None = None):
        self.model = model
        self.runner = runner or ModelRunner(model, max_batch)
        self.max_batch = max_batch
        self.max_tokens = max_tokens or max_batch * model.config.max_seq_len
        self.max_waiting = max_waiting
        self.device = model.embeddings.weight.device
        self._waiting: deque[Row] = deque()
        self._active: list[Row] = []
        self._free = list(range(max_batch))
        self._cond = threading.Condition()
        self._stopped = False
        self.steps = 0
        self.max_seen_batch = 0
        #: Frames (tokens) generated since start, prefill frames included.
        self.frames_generated = 0
        self._recent: deque[tuple[float, int]] = deque()  # (time, frames) per step within RATE_WINDOW_SECONDS
        self._thread = threading.Thread(target=self._loop, name="shoal-scheduler", daemon=True)
        self._thread.start()
        # Stop the thread before the interpreter tears torch down under it (which aborts the process).
        ref = weakref.ref(self)
        atexit.register(lambda: (s := ref()) is not None and s.stop())

    # -- public, any thread ------------------------------------------------------------------------------------
    def submit(self, prompt: torch.Tensor, params: SamplingParams, generator: torch.Generator,
               max_new_tokens: int, im_end_id: int, cancel: threading.Event | None = None) -> Row:
        """Queue a row. Setting `cancel` (the request's event) or calling `row.cancel()` drops it while it
        waits and retires it at the next step once it runs."""
        row = Row(prompt.long().to(self.device), params, generator, max_new_tokens, im_end_id,
                  request_cancel=cancel)
        if row.positions_needed > self.model.config.max_seq_len:
            raise ValueError("prompt + max_new_tokens exceed the model's max_seq_len")
        with self._cond:
            if self._stopped:
                raise Unavailable("the engine is shutting down")
            if len(self._waiting) >= self.max_waiting:
                raise Busy("too many requests are waiting for the model", retry_after=2.0)
            self._waiting.append(row)
            self._cond.notify()
        return row

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

    # -- the scheduler thread ----------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and not self._waiting and not self._active:
                    self._cond.wait()
                if self._stopped:
                    self._fail_all(Unavailable("the engine is shutting down"))
                    return
                newcomer = self._next_admissible()
            try:
                with torch.inference_mode():
                    if newcomer is not None:
                        self._prefill(newcomer)
                    self._retire()
                    if self._active:
                        self._step()
                    self._retire()
            except BaseException as exc:  # a failed step fails the rows in it, never the thread
                log.exception("decode step failed")
                for row in list(self._active):
                    self._finish(row, exc)

    def _next_admissible(self) -> Row | None:
        """Pop the first waiting row if a slot and the token budget allow it (cancelled ones are dropped)."""
        if any(row.stopped for row in self._waiting):
            for row in [r for r in self._waiting if r.stopped]:
                self._waiting.remove(row)
                row.frames.put(_DONE)
        if not self._waiting or not self._free:
            return None
        in_flight = sum(r.positions_needed for r in self._active)
        if self._active and in_flight + self._waiting[0].positions_needed > self.max_tokens:
            return None
        return self._waiting.popleft()

    def _ensure_cache(self, positions: int) -> None:
        model = self.model
        if self.runner.static_cache:
            if model.cache_batch < self.runner.cache_rows:
                model.setup_caches(batch=self.runner.cache_rows)  # once, at full length
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
        row.slot = self._free.pop(0)
        slot = torch.tensor([row.slot], device=self.device)
        length = row.prompt.shape[1]
        row.params_t = params_tensor([row.params], self.device)
        row.history = torch.zeros(row.prompt.shape[0], max(row.max_new_tokens, PENALTY_WINDOW), dtype=torch.long,
                                  device=self.device)
        self._active.append(row)
        try:
            logits, hidden = self.model.forward_slow(row.prompt[None], torch.arange(length, device=self.device)[None],
                                                     rows=slot)
            frame = sample_frame(self.model, logits, hidden, row.params_t, [row.generator], window=None,
                                 rows=slot, fast=self.runner.fast)[0]
        except BaseException as exc:
            self._finish(row, exc)
            return
        self._emit(row, frame, loop_frame=False)

    def _step(self) -> None:
        rows = self._active
        self.max_seen_batch = max(self.max_seen_batch, len(rows))
        slots = torch.tensor([r.slot for r in rows], device=self.device)
        x = torch.stack([r.last for r in rows])[:, :, None]
        pos = torch.tensor([[r.prompt.shape[1] + r.produced - 1] for r in rows], device=self.device)
        logits, hidden = self.runner.slow(x, pos, slots)
        windows = torch.stack([self._window(r) for r in rows])
        params = torch.cat([r.params_t for r in rows])
        frames = sample_frame(self.model, logits, hidden, params, [r.generator for r in rows], windows, rows=slots,
                              fast=self.runner.fast)
        self.steps += 1
        for row, frame in zip(list(rows), frames):
            self._emit(row, frame, loop_frame=True)

    @staticmethod
    def _window(row: Row) -> torch.Tensor:
        i = row.produced - 1  # index of the decode-loop frame about to be sampled
        start = max(0, i - PENALTY_WINDOW)
        return row.history[:, start : start + PENALTY_WINDOW]

    def _emit(self, row: Row, frame: torch.Tensor, loop_frame: bool) -> None:
        if loop_frame:
            row.history[:, row.produced - 1] = frame
        row.produced += 1
        row.last = frame
        self._count_frame()
        row.frames.put(frame.cpu())
        stopped = loop_frame and int(frame[0]) == row.im_end_id
        if stopped or row.produced >= row.max_new_tokens:
            self._finish(row)

    def _count_frame(self) -> None:
        now = time.monotonic()
        self.frames_generated += 1
        with self._cond:
            if self._recent and now - self._recent[-1][0] < 0.05:  # one entry per step, roughly
                self._recent[-1] = (self._recent[-1][0], self._recent[-1][1] + 1)
            else:
                self._recent.append((now, 1))
            while self._recent and now - self._recent[0][0] > RATE_WINDOW_SECONDS:
                self._recent.popleft()

    def _retire(self) -> None:
        for row in list(self._active):
            if row.stopped:
                self._finish(row)

    def _finish(self, row: Row, error: BaseException | None = None) -> None:
        if row in self._active:
            self._active.remove(row)
            self._free.append(row.slot)
            self._free.sort()
        row.frames.put(error if error is not None else _DONE)

    def _fail_all(self, error: BaseException) -> None:
        for row in list(self._active) + list(self._waiting):
            self._finish(row, error)
        self._waiting.clear()
