"""What a request means: resolve the model and the voice, check limits, hand it to the engine, await its audio.

The HTTP routes, the web UI, the CLI and the Python API all call this layer; none of them talks to an engine
directly. An admitted request is submitted to its engine, whose own thread generates the audio and publishes
each chunk to the request's asyncio queue (`call_soon_threadsafe`): no thread waits per request, and the event
loop stays free to answer health checks and other clients while audio is generated.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import AsyncIterator, Callable, Sequence

import numpy as np

from shoal.engines.base import Engine, EngineStats, Progress, Reference, Segment, Sink, Synthesis, SynthesisRequest
from shoal.engines.registry import Engines
from shoal.errors import BadRequest, Busy, EngineFailure, NotFound, ShoalError, Timeout, Unavailable
from shoal.files import low_space_warning
from shoal.params import CHUNK_LENGTH, MAX_NEW_TOKENS, REPETITION_PENALTY, SPEED, TEMPERATURE, TOP_P
from shoal.settings import Settings
from shoal.text import SPEAKER_TAG
from shoal.voices import Details, Voice, VoiceLibrary, new_voice_id

log = logging.getLogger("shoal.service")

#: OpenAI model names that clients send by habit; they mean "the server's default model".
OPENAI_MODEL_ALIASES = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts")
#: Retry-After of a full queue: a slot frees whenever any request ends, usually within a second under load.
BUSY_RETRY_AFTER_SECONDS = 1.0
#: The voice name for "no cloning: the model's own voice".
DEFAULT_VOICE = "default"
#: OpenAI's voice names: clients such as Open WebUI fall back to `alloy`. Each means the default voice (the
#: `default_voice` setting, else the model's own) unless `voice_map` says otherwise or a saved voice has the name.
OPENAI_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage", "shimmer", "verse",
                 "marin", "cedar")
#: The model whose text takes inline tags (`[whisper]`): an OpenAI `instructions` becomes its leading tag.
INSTRUCTIONS_MODEL = "s2-pro"
#: How `find_voices` may order voices: sort_by -> (Voice attribute, newest first). shoal counts no uses, so
#: the Fish API's popularity orders (task_count, its default, and score) list the newest voices first.
VOICE_SORTS = {"created_at": ("created", True), "updated_at": ("updated", True), "task_count": ("created", True),
               "score": ("created", True)}
#: The longest page `find_voices` returns: a listing stays one quick response.
MAX_PAGE_SIZE = 100


@dataclass
class SpeechParams:
    """One speech request as the API layers hand it over, before any engine-specific meaning is applied."""

    text: str
    model: str | None = None
    voice: str | None = None  # a saved voice id, or "default"
    # inline clips (bytes or paths) with their transcripts, or References already encoded (`encode_references`)
    references: Sequence[tuple[bytes | str | os.PathLike, str] | Reference] = ()
    use_memory_cache: bool = True
    seed: int | None = None
    temperature: float = TEMPERATURE.default
    top_p: float = TOP_P.default
    repetition_penalty: float = REPETITION_PENALTY.default
    max_new_tokens: int = MAX_NEW_TOKENS.default
    chunk_length: int = CHUNK_LENGTH.default
    speed: float = SPEED.default
    latency: str = "balanced"
    condition_on_previous: bool = True
    min_chunk_length: int = 0
    previous: tuple[str, np.ndarray] | None = None  # what was spoken just before (SynthesisRequest.previous)
    instructions: str | None = None  # OpenAI's delivery instructions: a leading inline tag on S2-Pro


@dataclass
class Job:
    """A prepared request: the engine that runs it and what it runs."""

    model: str
    engine: Engine
    request: SynthesisRequest
    voice: str | None = None
    started: float = field(default_factory=time.perf_counter)
    # What running it gave, for metrics and the access log (filled in by the Dispatcher)
    first_audio: float | None = None  # seconds from `started` to the first chunk
    seconds: float | None = None  # seconds from `started` to the end, however it ended
    samples: int = 0
    outcome: str = "pending"  # ok | error | cancelled | timeout | busy
    segments: list[Segment] = field(default_factory=list)  # each text segment's codes, once its audio is out
    ignored: list[str] = field(default_factory=list)  # request fields that had no effect on this model

    @property
    def audio_seconds(self) -> float:
        return self.samples / self.engine.sample_rate


def with_instructions(text: str, instructions: str | None, model: str) -> tuple[str, list[str]]:
    """(the text to speak, the fields ignored) for OpenAI's `instructions`: on S2-Pro a leading inline tag
    (`[be cheerful] Hello.`, after a leading speaker tag if the text starts with one); on a model without inline
    tags, the text as it is and `instructions` named as ignored."""
    if not instructions or not instructions.strip():
        return text, []
    if model != INSTRUCTIONS_MODEL:
        return text, ["instructions"]
    tag = instructions.strip()
    if any(c in tag for c in "[]") or "<|" in tag:
        raise BadRequest("instructions may not contain square brackets or <| |> tags: they become one inline tag")
    match = SPEAKER_TAG.match(text)
    if match:
        return f"{match.group(1)}[{tag}] {text[match.end():].lstrip()}", []
    return f"[{tag}] {text}", []


class Dispatcher:
    """Admission control and the bridge from the engines' threads to asyncio.

    At most `queue_size` requests wait or run at once; beyond that, Busy (HTTP 429 with Retry-After). A request
    that outlives `timeout` is cancelled and fails with Timeout. A consumer that goes away (client disconnect)
    cancels its generation at the engine's next step.
    """

    def __init__(self, queue_size: int, timeout: float):
        self.queue_size = queue_size
        self.timeout = timeout
        self._pending = 0
        self._lock = threading.Lock()
        self._closed = False
        #: Called with each job once it has ended (metrics); a failing listener is logged, never raised.
        self.listeners: list[Callable[[Job], None]] = []

    @property
    def depth(self) -> int:
        """Requests waiting or running, including cancelled ones the engine has not yet let go of."""
        return self._pending

    def _admit(self) -> None:
        with self._lock:
            if self._closed:
                raise Unavailable("the server is shutting down")
            if self._pending >= self.queue_size:
                raise Busy(f"{self._pending} requests are already queued or running; retry shortly",
                           retry_after=BUSY_RETRY_AFTER_SECONDS)
            self._pending += 1

    def _release(self) -> None:
        with self._lock:
            self._pending -= 1

    async def stream(self, job: Job, stream: bool = True) -> AsyncIterator[np.ndarray]:
        """Yield the job's audio chunks as the engine produces them (`stream=False`: the caller only wants
        the whole audio, which the engine may then decode in one piece)."""
        try:
            self._admit()
        except Busy:
            self._ended(job, "busy")
            raise
        sink = LoopSink(asyncio.get_running_loop(), on_end=self._release)
        outcome = "cancelled"  # unless it ends otherwise: the consumer stopped reading (client went away)
        try:
            try:  # reference clips are read and decoded in submit: off the event loop
                await asyncio.to_thread(job.engine.submit, job.request, sink, sink.cancel, stream)
            except BaseException as exc:
                sink.end(None)  # refused, or the consumer left meanwhile: free the slot now (a later end is ignored)
                if not isinstance(exc, Exception):
                    raise
                outcome = "error"
                raise engine_error(exc) from None
            deadline = asyncio.get_running_loop().time() + self.timeout
            while True:
                try:
                    kind, value = await sink.get(deadline)
                except asyncio.TimeoutError:
                    outcome = "timeout"
                    raise Timeout(f"the request took longer than {self.timeout:g} s") from None
                if kind == "audio":
                    if job.first_audio is None:
                        job.first_audio = time.perf_counter() - job.started
                    job.samples += len(value)
                    yield value
                elif kind == "segment":
                    job.segments.append(value)
                elif value is None:
                    outcome = "ok"
                    return
                else:
                    outcome = "error"
                    raise engine_error(value)
        finally:
            sink.cancel.set()
            self._ended(job, outcome)

    def _ended(self, job: Job, outcome: str) -> None:
        job.outcome, job.seconds = outcome, time.perf_counter() - job.started
        for listener in self.listeners:
            try:
                listener(job)
            except Exception:
                log.exception("a job listener failed")

    def close(self) -> None:
        with self._lock:
            self._closed = True


class LoopSink(Sink):
    """A request's sink on an event loop: the engine's thread puts each event on an asyncio queue with
    `call_soon_threadsafe`; `on_end` runs (on that thread) once the engine has let the request go."""

    def __init__(self, loop: asyncio.AbstractEventLoop, on_end: Callable[[], None]):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.cancel = threading.Event()
        self._on_end = on_end
        self._ended = False
        self._lock = threading.Lock()  # the engine's thread and the loop's may both end it

    def audio(self, chunk: np.ndarray) -> None:
        self._post(("audio", chunk))

    def segment(self, segment: Segment) -> None:
        self._post(("segment", segment))

    def end(self, error: BaseException | None = None) -> None:
        with self._lock:
            if self._ended:
                return
            self._ended = True
        self._on_end()
        self._post(("end", error))

    def _post(self, event: tuple) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the loop has closed under us (shutdown): nobody is listening any more
            self.cancel.set()

    async def get(self, deadline: float) -> tuple[str, object]:
        """The next event; asyncio.TimeoutError past `deadline` (loop time), even while events keep coming."""
        remaining = deadline - self.loop.time()
        if remaining <= 0:
            raise asyncio.TimeoutError
        return await asyncio.wait_for(self.queue.get(), remaining)


def engine_error(exc: BaseException) -> ShoalError:
    """Our errors pass through; CUDA out-of-memory is 503; anything else is a 500 without internals."""
    if isinstance(exc, ShoalError):
        return exc
    if type(exc).__name__ == "OutOfMemoryError":
        return Unavailable("the GPU ran out of memory for this request; retry, or send shorter text")
    log.error("engine failure", exc_info=exc)
    return EngineFailure(f"generation failed ({type(exc).__name__})")


class Service:
    """The one object the API layers talk to."""

    def __init__(self, settings: Settings, engines: Engines, voices: VoiceLibrary):
        self.settings = settings
        self.engines = engines
        self.voices = voices
        self.dispatcher = Dispatcher(settings.queue_size, settings.request_timeout)

    # -- models ------------------------------------------------------------------------------------------------
    @property
    def model_names(self) -> list[str]:
        return list(self.engines.engines)

    def resolve_model(self, name: str | None) -> tuple[str, Engine]:
        """A model name as clients send it -> (our model name, engine). Unknown names list the valid ones."""
        if name is None or name == "" or name in OPENAI_MODEL_ALIASES:
            name = self.engines.default
        served = self.engines.names()
        if name not in served:
            valid = ", ".join([*served, *OPENAI_MODEL_ALIASES])
            raise BadRequest(f"unknown model {name!r}; valid models: {valid}")
        return served[name], self.engines.get(name)

    def resolve_fish_model(self, name: str | None) -> str:
        """The served model a Fish Audio `model` header means: a served name (`s1`, `s2-pro`, or an alias such as
        `fish`) as it is; a Fish Audio cloud name (`s2.1-pro`, `speech-1.6`, ...) through the `model_map`
        setting, followed from name to name until one is served, else the server's default (the closest there
        is); no header, the default. Anything else is a BadRequest listing the valid names."""
        if not name:
            return self.engines.default
        served = self.engines.names()
        if name not in served and name not in self.settings.model_map:
            valid = ", ".join(sorted({*served, *self.settings.model_map}))
            raise BadRequest(f"unknown model {name!r}; valid models: {valid}")
        seen = set()
        while name not in served and name in self.settings.model_map and name not in seen:
            seen.add(name)
            name = self.settings.model_map[name]
        return served.get(name, self.engines.default)

    def stats(self) -> EngineStats:
        """Every engine's `stats()`, summed: what /metrics and /v1/health report."""
        total = EngineStats()
        for engine in self.engines.engines.values():
            for f in fields(EngineStats):
                setattr(total, f.name, getattr(total, f.name) + getattr(engine.stats(), f.name))
        return total

    def thread_layout(self) -> dict:
        """How torch runs here: its intra-op threads (on the engine thread, the only one that runs it) and how
        OpenMP workers wait between parallel regions (see `shoal.OMP_WAIT_POLICY`)."""
        import torch

        return {"torch_intra_op": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}

    def counters(self) -> dict[str, float]:
        """Process-lifetime counters operators and tests watch (codec encodes: zero for saved voices)."""
        return {**asdict(self.stats()), **self.voices.cache_counters()}

    def describe_models(self) -> list[dict]:
        out = []
        for name, engine in self.engines.engines.items():
            out.append({"id": name, "default": name == self.engines.default, "sample_rate": engine.sample_rate,
                        "supports_cloning": engine.supports_cloning,
                        "checkpoint": str(self.engines.checkpoints[name]) if name in self.engines.checkpoints
                        else None})
        return out

    # -- voices ------------------------------------------------------------------------------------------------
    def voice_names(self, model: str | None = None) -> list[str]:
        """Voices a request may name: "default" (the model's own voice) plus saved voices if it clones."""
        names = [DEFAULT_VOICE]
        engine = self.engines.get(model) if model else None
        if engine is None or engine.supports_cloning:
            names += [v.id for v in self.voices.list()]
        return names

    def describe_voices(self, model: str | None = None) -> list[dict]:
        """The voices a request may name, as OpenAI-style clients list them: `id` (what `voice` takes), `name`
        (the saved voice's title, else its id), and a saved voice's record or `builtin: true`."""
        saved = {v.id: v for v in self.voices.list()}
        out = []
        for voice_id in self.voice_names(model):
            if voice_id in saved:
                record = saved[voice_id].to_dict()
                out.append({**record, "id": voice_id, "name": saved[voice_id].details.title or voice_id})
            else:
                out.append({"id": voice_id, "name": voice_id, "builtin": True})
        return out

    def voice_aliases(self) -> dict[str, str | None]:
        """Voice names that stand for another voice: every OpenAI name (None: the default voice), then the
        `voice_map` setting laid over them."""
        return {**dict.fromkeys(OPENAI_VOICES), **self.settings.voice_map}

    def map_voice(self, name: str | None) -> str | None:
        """The voice a request's name means: a saved voice by that name as it is, else its `voice_aliases`
        entry (None: the default voice), else the name as given (unknown names fail in `resolve_voice`)."""
        aliases = self.voice_aliases()
        if not name or name not in aliases:
            return name
        try:
            self.voices.get(name)
            return name
        except (NotFound, BadRequest):
            return aliases[name]

    def list_voices(self) -> list[Voice]:
        return self.voices.list()

    def add_voice(self, voice_id: str, audio: bytes, text: str, overwrite: bool = False) -> Voice:
        """Save a voice; its codes are computed now (once) when a fish engine is loaded."""
        encoder = self.engines.encoder()
        return self.voices.add(voice_id, audio, text, encoder, overwrite=overwrite)

    def create_voice(self, clips: Sequence[tuple[bytes, str]], details: Details, cover: bytes | None = None
                     ) -> Voice:
        """Save a voice of one or more (audio, transcript) clips under a new id (32 hex digits, as Fish's)."""
        encoder = self.engines.encoder()
        return self.voices.save(new_voice_id(), clips, encoder, details=details, cover=cover)

    def update_voice(self, voice_id: str, **changes) -> Voice:
        """Change a voice's details or cover (see VoiceLibrary.update)."""
        return self.voices.update(voice_id, **changes)

    def find_voices(self, *, title: str | None = None, tags: Sequence[str] = (), sort_by: str = "created_at",
                    page_size: int, page_number: int) -> tuple[int, list[Voice]]:
        """(how many voices match, the page of them): titles containing `title` (any case), carrying every
        one of `tags`, ordered by `sort_by` (VOICE_SORTS), pages numbered from 1."""
        if sort_by not in VOICE_SORTS:
            raise BadRequest(f"sort_by must be one of {', '.join(VOICE_SORTS)}, not {sort_by!r}")
        if not 1 <= page_size <= MAX_PAGE_SIZE or page_number < 1:
            raise BadRequest(f"page_size must be 1 to {MAX_PAGE_SIZE} and page_number 1 or more")
        voices = self.voices.list()
        if title:
            voices = [v for v in voices if title.casefold() in v.details.title.casefold()]
        if tags:
            voices = [v for v in voices if set(tags) <= set(v.details.tags)]
        field_name, newest_first = VOICE_SORTS[sort_by]
        voices.sort(key=lambda v: (getattr(v, field_name), v.id), reverse=newest_first)
        start = (page_number - 1) * page_size
        return len(voices), voices[start:start + page_size]

    def voice_cover(self, voice_id: str) -> tuple[bytes, str]:
        return self.voices.cover(voice_id)

    def disk_warnings(self) -> list[str]:
        """What an operator should hear about the data dir's free space (see `min_free_disk_mb`)."""
        warning = low_space_warning(Path(self.settings.data_dir), self.settings.min_free_disk_mb)
        return [warning] if warning else []

    def delete_voice(self, voice_id: str) -> None:
        self.voices.delete(voice_id)

    def rename_voice(self, old_id: str, new_id: str) -> Voice:
        return self.voices.rename(old_id, new_id)

    # -- speech ------------------------------------------------------------------------------------------------
    def prepare(self, params: SpeechParams) -> Job:
        """Validate and resolve a request into a Job. Raises BadRequest/NotFound with a clear message."""
        if len(params.text) > self.settings.max_text_length:
            raise BadRequest(f"text is {len(params.text)} characters; the limit is {self.settings.max_text_length}")
        model, engine, references, voice = self.resolve_voice(params)
        text, ignored = with_instructions(params.text, params.instructions, model)
        request = SynthesisRequest(
            text=text, references=references, seed=params.seed, temperature=params.temperature,
            top_p=params.top_p, repetition_penalty=params.repetition_penalty,
            max_new_tokens=params.max_new_tokens, chunk_length=params.chunk_length, speed=params.speed,
            latency=params.latency, condition_on_previous=params.condition_on_previous,
            min_chunk_length=params.min_chunk_length, previous=params.previous)
        return Job(model, engine, request, voice=voice, ignored=ignored)

    def resolve_voice(self, params: SpeechParams) -> tuple[str, Engine, tuple[Reference, ...], str | None]:
        """(model, engine, references, voice name) of a request: BadRequest for an unknown model or voice, or
        references the model cannot use. The live WebSocket checks its `start` with it before any text."""
        model, engine = self.resolve_model(params.model)
        references: list[Reference] = []
        voice = self.map_voice(params.voice) or self.settings.default_voice
        if voice and voice != DEFAULT_VOICE:
            try:
                saved = self.voices.get(voice)
            except (NotFound, BadRequest):  # unknown, or not even a valid id: same answer, with the choices
                raise BadRequest(f"unknown voice {voice!r}; valid voices: "
                                 f"{', '.join(self.voice_names(model))}") from None
            if not engine.supports_cloning:
                raise BadRequest(f"model {model!r} cannot clone voices, so it cannot use saved voice {voice!r}; "
                                 "use the fish model with an S1 checkpoint")
            codes = self.voices.codes(voice, engine)
            references += [Reference(None, clip.text, codes=c) for clip, c in zip(saved.clips, codes)]
        for ref in params.references:
            references.append(ref if isinstance(ref, Reference) else Reference(*ref, cache=params.use_memory_cache))
        if references and not engine.supports_cloning:
            raise BadRequest(f"model {model!r} cannot clone voices: references need the fish model with an "
                             "S1 checkpoint")
        return model, engine, tuple(references), voice

    def encode_references(self, params: SpeechParams) -> SpeechParams:
        """`params` with its inline clips replaced by their codes, encoded now, once: for a live session, whose
        segments are each a request with the same references. The cache setting applies to this one encode.
        A model that cannot clone keeps them as they are (and refuses them in `prepare`)."""
        _, engine = self.resolve_model(params.model)
        if not params.references or not engine.supports_cloning:
            return params
        encoded = []
        for ref in params.references:
            if not isinstance(ref, Reference):
                ref = Reference(*ref, cache=params.use_memory_cache)
            if ref.codes is None:
                ref = Reference(None, ref.text, codes=engine.encode_reference(ref).numpy())
            encoded.append(ref)
        return replace(params, references=tuple(encoded))

    def stream(self, job: Job) -> AsyncIterator[np.ndarray]:
        """The job's audio chunks as they come. The generator itself, not a wrapper: closing it (aclose) runs
        its cleanup, which cancels the generation at once."""
        return self.dispatcher.stream(job)

    async def synthesize(self, job: Job) -> np.ndarray:
        """The whole audio of a job, decoded segment by segment as the reference decodes (no streaming)."""
        chunks = [chunk async for chunk in self.dispatcher.stream(job, stream=False)]
        return np.concatenate(chunks) if chunks else np.zeros(0, np.float32)

    def run(self, job: Job, progress: Progress | None = None) -> Synthesis:
        """Run a job to the end in the calling thread and return everything it produced (codes, frames, stop
        reasons), reporting `progress(done, total)`: for one-shot callers like `shoal say`, which have no
        event loop and no queue to share."""
        return job.engine.run(job.request, progress=progress)

    def close(self, engines: bool = False) -> None:
        """Stop admitting requests; with `engines`, also stop the engines (their threads end)."""
        self.dispatcher.close()
        if engines:
            self.engines.close()
