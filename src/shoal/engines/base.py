"""What every engine takes and gives: the request, the reference clips, the engine interface."""

from __future__ import annotations

import os
import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Protocol

import numpy as np

from shoal.errors import BadRequest, Cancelled, NotFound
from shoal.params import CHUNK_LENGTH, MAX_NEW_TOKENS, PARAMS, REPETITION_PENALTY, SPEED, TEMPERATURE, TOP_P

#: Fish Audio's `latency` modes: how long the first streamed chunk is, as a multiple of the engine's
#: `stream_first_frames` (11 frames, ~0.5 s, by default); chunks double from there either way.
LATENCY_FIRST_CHUNK = {"low": 0.5, "balanced": 1.0, "normal": 2.0}

# Seeds as the reference normalises them: negative seeds are mirrored, large ones capped at 2**31.
SEED_CAP = 1 << 31

#: Called as progress(done, total) while frames are generated; total is an upper bound.
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Reference:
    """A voice to clone: a clip (encoded audio bytes or a path) and what is said in it.

    `codes` (int64 `[num_codebooks, F]`), when given, are the clip already encoded by this engine's codec (a
    saved voice): the engine then uses them as they are and never runs the encoder. `audio` may be None then.
    """

    audio: bytes | str | os.PathLike | None
    text: str
    codes: np.ndarray | None = None
    #: Whether the engine may keep this clip's codes in its in-memory cache (Fish's `use_memory_cache`).
    cache: bool = True

    def read_bytes(self) -> bytes:
        if self.audio is None:
            raise BadRequest("reference has neither audio nor codes")
        if isinstance(self.audio, (bytes, bytearray, memoryview)):
            return bytes(self.audio)
        path = Path(self.audio)
        try:
            return path.read_bytes()
        except FileNotFoundError as exc:
            raise NotFound(f"reference audio file {path} does not exist") from exc
        except OSError as exc:
            raise BadRequest(f"cannot read reference audio {path}: {exc.strerror or exc}") from exc


@dataclass(frozen=True)
class SynthesisRequest:
    """One text-to-speech request. Defaults and ranges are `shoal.params`' (those of Fish Speech's
    `ServeTTSRequest`); `seed`: same seed and request give the same audio, None draws a fresh seed."""

    text: str
    references: tuple[Reference, ...] = ()
    seed: int | None = None
    temperature: float = TEMPERATURE.default
    top_p: float = TOP_P.default
    repetition_penalty: float = REPETITION_PENALTY.default
    max_new_tokens: int = MAX_NEW_TOKENS.default
    chunk_length: int = CHUNK_LENGTH.default
    speed: float = SPEED.default
    #: Streaming: how soon the first chunk comes (LATENCY_FIRST_CHUNK).
    latency: str = "balanced"
    #: Whether a segment's prompt carries the previous segment's text and codes (the voice continues).
    condition_on_previous: bool = True
    #: Segments shorter than this many characters are joined to a neighbour (0: segments as split).
    min_chunk_length: int = 0
    #: What was spoken just before this request, as (text, codes) of its last `Segment`: the first segment's
    #: prompt carries it as a long text's later segments carry their previous one (with condition_on_previous),
    #: so a text that arrives piece by piece (the live WebSocket) continues in one voice. Engines without codes
    #: ignore it.
    previous: tuple[str, np.ndarray] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "references", tuple(self.references))
        self.validate()

    def validate(self) -> None:
        """Raise BadRequest for anything the engine cannot honour, with the field's name and range."""
        if not isinstance(self.text, str) or not self.text.strip():
            raise BadRequest("text is empty")
        check_speakable("text", self.text)
        for param in PARAMS.values():
            param.check(getattr(self, param.name))
        if self.max_new_tokens == 1:
            raise BadRequest("max_new_tokens must be 0 (as many as fit) or at least 2: the last generated frame "
                             "is never decoded")
        if self.seed is not None and not _is_int(self.seed):
            raise BadRequest("seed must be an integer")
        if self.latency not in LATENCY_FIRST_CHUNK:
            raise BadRequest(f"latency must be one of {', '.join(LATENCY_FIRST_CHUNK)}, got {self.latency!r}")
        if not _is_int(self.min_chunk_length) or self.min_chunk_length < 0:
            raise BadRequest("min_chunk_length must be a non-negative integer")
        if self.previous is not None:
            text, codes = self.previous
            if not isinstance(text, str) or not text.strip() or not isinstance(codes, np.ndarray) or codes.ndim != 2:
                raise BadRequest("previous must be a (text, codes) pair: a segment's text and its [codebooks, "
                                 "frames] codes")
        for ref in self.references:
            if not isinstance(ref, Reference):
                raise BadRequest("references must be Reference(audio, text) items")
            if not isinstance(ref.text, str) or not ref.text.strip():
                raise BadRequest("a reference needs the transcript of its clip (reference text is empty)")

    def effective_seed(self) -> int:
        """The seed generation runs with: the caller's, normalised like the reference, or a fresh one."""
        if self.seed is None:
            return int.from_bytes(os.urandom(4), "little") % SEED_CAP
        seed = -self.seed if self.seed < 0 else self.seed
        return min(seed, SEED_CAP)


def check_speakable(name: str, text: str) -> None:
    """Text every engine can take. JSON's `\\ud800` escapes decode to lone surrogates, which are no Unicode
    text (piper cannot encode them to UTF-8 for espeak), and espeak refuses NUL: both used to fail inside
    generation as a 500."""
    if "\x00" in text:
        raise BadRequest(f"{name} must not contain NUL characters")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise BadRequest(f"{name} is not valid Unicode: lone surrogate at character {exc.start}") from None


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@dataclass
class Synthesis:
    """Everything one request produced, for callers that want more than audio (CLI stats, tests, server)."""

    sample_rate: int
    audio: np.ndarray
    codes: np.ndarray  # int64 [num_codebooks, T]: what the codec decoded, all segments concatenated
    seed: int
    frames_generated: int
    stopped_by_im_end: list[bool]
    seconds: float

    @property
    def duration(self) -> float:
        return len(self.audio) / self.sample_rate

    @property
    def real_time_factor(self) -> float:
        """Wall time over audio time: below 1 is faster than real time."""
        return self.seconds / self.duration if self.duration else float("inf")


class Sink:
    """Where an engine delivers one request's results: `audio` for each float32 chunk, in order, then `end`
    exactly once (None when it finished or was cancelled, else the exception that failed it). Engines call these
    from their own thread; an implementation hands them on (to an asyncio queue, a blocking queue) and returns."""

    def audio(self, chunk: np.ndarray) -> None:
        raise NotImplementedError

    def segment(self, segment: "Segment") -> None:
        """A text segment's codes, after its audio (engines with codes only; ignored unless overridden)."""

    def end(self, error: BaseException | None = None) -> None:
        raise NotImplementedError


@dataclass
class Segment:
    """What one text segment generated: its `text`, `codes` int64 `[num_codebooks, T]` (what the codec decoded),
    the frames generated (one more than decoded) and whether `<|im_end|>` ended it."""

    text: str
    codes: np.ndarray
    frames: int
    stopped_by_im_end: bool


class BlockingSink(Sink):
    """A Sink read from another thread: iterate it for the audio chunks (the engine's error is raised at the end);
    the segments are kept in `segments`."""

    def __init__(self) -> None:
        self._queue: queue.Queue = queue.Queue()
        self.segments: list[Segment] = []

    def audio(self, chunk: np.ndarray) -> None:
        self._queue.put(chunk)

    def segment(self, segment: Segment) -> None:
        self.segments.append(segment)

    def end(self, error: BaseException | None = None) -> None:
        self._queue.put(_End(error))

    def __iter__(self) -> Iterator[np.ndarray]:
        while True:
            item = self._queue.get()
            if isinstance(item, _End):
                if item.error is not None:
                    raise item.error
                return
            yield item


@dataclass(frozen=True)
class _End:
    error: BaseException | None


@dataclass
class EngineStats:
    """What an engine reports about itself, the same fields for every engine (zero where they mean nothing)."""

    in_flight: int = 0  # requests submitted and not yet ended
    batch_size: int = 0  # rows in the running decode step
    decode_steps: int = 0  # batched decode steps run
    generated_tokens: int = 0  # frames (tokens) generated, prefill included
    tokens_per_second: float = 0.0  # over the last few seconds
    isolated_faults: int = 0  # failed batched steps replayed row by row
    codec_encodes: int = 0  # reference clips through the codec encoder
    codec_frames: int = 0  # frames through the codec decoder
    codec_batches: int = 0  # codec decoder calls that served more than one request
    reference_cache_hits: int = 0
    reference_cache_misses: int = 0


class Engine(Protocol):
    """What the service layer, the CLI and the UI rely on.

    `submit` is the one way in: it checks the request (raising BadRequest at once), queues it, and returns; the
    engine's own thread then delivers the audio to the sink. `synthesize` and `run` are blocking conveniences on
    top of it for callers without an event loop.
    """

    name: str
    sample_rate: int
    #: Whether references (inline clips or saved voices) can be used; engines that cannot reject them.
    supports_cloning: bool

    def submit(self, request: SynthesisRequest, sink: Sink, cancel: threading.Event | None = None,
               stream: bool = True, progress: Progress | None = None) -> None:
        """Start `request`; its audio goes to `sink` (`stream=False`: the caller wants the whole audio, so the
        engine may decode in larger pieces). Setting `cancel` stops generation at the next step; the sink then
        ends without an error."""
        ...

    def synthesize(self, request: SynthesisRequest, progress: Progress | None = None,
                   cancel: threading.Event | None = None, stream: bool = True) -> Iterator[np.ndarray]:
        """Blocking: yield float32 mono audio chunks at `sample_rate` as they become available."""
        ...

    def run(self, request: SynthesisRequest, progress: Progress | None = None,
            cancel: threading.Event | None = None) -> Synthesis:
        """Blocking: synthesize the whole request and return it with its codes and statistics (Cancelled if
        `cancel` is set before the end)."""
        ...

    def stats(self) -> EngineStats:
        ...

    def close(self) -> None:
        ...


def synthesize_blocking(engine: Engine, request: SynthesisRequest, progress: Progress | None = None,
                        cancel: threading.Event | None = None, stream: bool = True) -> Iterator[np.ndarray]:
    """Engine.synthesize for any engine: submit now (so a bad request raises here), then yield the chunks. An
    abandoned iterator cancels the request."""
    cancel = cancel if cancel is not None else threading.Event()
    sink = BlockingSink()
    engine.submit(request, sink, cancel=cancel, stream=stream, progress=progress)
    return _drain(sink, cancel)


def _drain(sink: BlockingSink, cancel: threading.Event) -> Iterator[np.ndarray]:
    try:
        yield from sink
    finally:
        cancel.set()


def run_blocking(engine: Engine, request: SynthesisRequest, progress: Progress | None = None,
                 cancel: threading.Event | None = None) -> Synthesis:
    """Engine.run for any engine: the whole request through `submit`, with its segments' codes. The seed it
    reports is the request's (normalised); an engine that draws a fresh one for None fixes it before calling."""
    start = time.perf_counter()
    sink = BlockingSink()
    engine.submit(request, sink, cancel=cancel, stream=False, progress=progress)
    audio = list(sink)
    if cancel is not None and cancel.is_set():
        raise Cancelled("synthesis was cancelled")
    segments = sink.segments
    return Synthesis(
        sample_rate=engine.sample_rate,
        audio=np.concatenate(audio) if audio else np.zeros(0, np.float32),
        codes=(np.concatenate([s.codes for s in segments], axis=1) if segments else np.zeros((0, 0), np.int64)),
        seed=request.effective_seed(),
        frames_generated=sum(s.frames for s in segments),
        stopped_by_im_end=[s.stopped_by_im_end for s in segments],
        seconds=time.perf_counter() - start,
    )
