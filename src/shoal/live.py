"""Live sessions: Fish Audio's WebSocket protocol (`/v1/tts/live`), text in over time, audio out as it is made.

A client sends msgpack events: `start` (a TTS request, as `/v1/tts` takes it), `text` pieces, `flush` and `stop`.
The session cuts the text into segments at sentence ends (`SentenceSegmenter`), on `flush` and on `stop`, and
speaks them one after another through the service, each a request of its own that batches with everyone
else's rows; from the second on, each carries the previous segment's text and codes
(`SynthesisRequest.previous`), so the voice continues as in a long text. Audio streams out of each segment as it
is decoded, encoded as the `start` asked, in `audio` events; after `stop`, `finish` `stop`, and the socket may
`start` again (LiveKit reuses it). Anything wrong ends the session with `finish` `error` (its `message` says
why) and a close code.

The session knows nothing of the web framework: it talks to a `Transport` (the router's WebSocket), and the
router hands it the reader of `start` requests (`ReadRequest`: the API's `/v1/tts` schema).
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from typing import AsyncIterator, Callable, Protocol

import ormsgpack

from shoal.audio import OutputEncoder, OutputOptions
from shoal.engines.base import check_speakable
from shoal.errors import BadRequest, Busy, ShoalError, Unavailable
from shoal.service import Job, Service, SpeechParams
from shoal.settings import Settings
from shoal.text import SentenceSegmenter

log = logging.getLogger("shoal.live")

#: Fish Audio's default `min_chunk_length` on the live WebSocket: a segment ends at the first sentence end once
#: it has this many characters (a start request's own `min_chunk_length` overrides it).
LIVE_MIN_CHUNK_LENGTH = 50

#: How much of a decoder's or a client's words an error message quotes.
MAX_DETAIL_CHARS = 200

# Close codes (RFC 6455)
CLOSE_UNSUPPORTED_DATA = 1003  # a text frame: events are binary msgpack
CLOSE_INVALID_PAYLOAD = 1007  # not msgpack, not an event, an invalid request or text
CLOSE_POLICY = 1008  # events out of order, a limit passed, an unknown model, idle too long
CLOSE_TOO_BIG = 1009  # a message over live_max_message_bytes
CLOSE_INTERNAL = 1011  # generation failed
CLOSE_TRY_AGAIN = 1013  # the server is busy or not ready


class Transport(Protocol):
    """The socket a session talks over."""

    async def receive(self) -> bytes | str | None:
        """The next message (binary or text), or None once the client has gone."""
        ...

    async def send(self, data: bytes) -> None:
        """Send a binary message; raises ConnectionError if the client has gone."""
        ...

    async def close(self, code: int, reason: str) -> None:
        ...


class ReadRequest(Protocol):
    def __call__(self, data: object, model: str | None, min_chunk_length: int) -> tuple[SpeechParams, OutputOptions]:
        """A `start` event's `request`, validated: what to speak and how to encode it; BadRequest if invalid.
        `min_chunk_length` is the default for a request that sets none."""
        ...


@dataclass(frozen=True)
class LiveLimits:
    """A session's limits: the `live_*` settings."""

    idle_timeout: float
    max_buffered_chars: int
    max_text_chars: int
    max_message_bytes: int
    audio_queue: int

    @classmethod
    def from_settings(cls, settings: Settings) -> "LiveLimits":
        return cls(idle_timeout=settings.live_idle_timeout, max_buffered_chars=settings.live_max_buffered_chars,
                   max_text_chars=settings.live_max_text_chars, max_message_bytes=settings.live_max_message_bytes,
                   audio_queue=settings.live_audio_queue)


class LiveError(Exception):
    """Ends the session: `finish` `error` with this message, then a close with `code`."""

    def __init__(self, message: str, code: int, reason: str):
        super().__init__(message)
        self.code, self.reason = code, reason


def error_close(exc: Exception, where: str) -> LiveError:
    """How the session ends on `exc`: a LiveError as it is, a service error by its kind, anything else as an
    internal error (logged with its traceback, never shown to the client)."""
    if isinstance(exc, LiveError):
        return exc
    if isinstance(exc, (Busy, Unavailable)):
        return LiveError(str(exc), CLOSE_TRY_AGAIN, "busy")
    if isinstance(exc, BadRequest):
        return LiveError(str(exc), CLOSE_INVALID_PAYLOAD, "bad_input")
    if isinstance(exc, ShoalError):
        return LiveError(str(exc), CLOSE_INTERNAL, "server_error")
    log.error("%s", where, exc_info=exc)
    return LiveError("internal server error", CLOSE_INTERNAL, "server_error")


def event(name: str, **fields) -> bytes:
    return ormsgpack.packb({"event": name, **fields})


FINISH_STOP = event("finish", reason="stop")
_CLOSE = object()  # the outbox's last item: close the socket


@dataclass(eq=False)
class Utterance:
    """Text that arrives over time, spoken as one utterance: its request, its text not yet segmented, and its
    segments to speak (None after the last one: stop). The live WebSocket and the Wyoming server's
    synthesize-start ... synthesize-stop (`shoal.wyoming`) both feed one and `speak` it."""

    params: SpeechParams
    segmenter: SentenceSegmenter
    pending: asyncio.Queue = field(default_factory=asyncio.Queue)
    stopping: bool = False  # stop received: no more text
    speaking: bool = False  # a segment is being generated

    @classmethod
    def of(cls, params: SpeechParams) -> "Utterance":
        return cls(params, SentenceSegmenter(params.min_chunk_length))

    def push(self, text: object, limits: LiveLimits, chars_before: int) -> int:
        """Take a piece of text: complete segments go to `pending`. Returns the connection's characters so far
        (`chars_before` plus this text's); LiveError past the live limits or for text that is not a string."""
        if not isinstance(text, str):
            raise LiveError("text must be a string", CLOSE_INVALID_PAYLOAD, "bad_input")
        check_speakable("text", text)
        chars = chars_before + len(text)
        if chars > limits.max_text_chars:
            raise LiveError(f"more than {limits.max_text_chars} characters of text on this connection",
                            CLOSE_POLICY, "limit")
        for segment in self.segmenter.push(text):
            self.pending.put_nowait(segment)
        if len(self.segmenter.buffer) > limits.max_buffered_chars:
            raise LiveError(f"more than {limits.max_buffered_chars} characters buffered without a sentence "
                            "end; send flush", CLOSE_POLICY, "limit")
        return chars

    def flush(self) -> None:
        segment = self.segmenter.flush()
        if segment is not None:
            self.pending.put_nowait(segment)

    def stop(self) -> None:
        """No more text: what is buffered becomes the last segment."""
        self.flush()
        self.stopping = True
        self.pending.put_nowait(None)

    @property
    def generating(self) -> bool:
        return self.speaking or not self.pending.empty()


async def speak(service: Service, u: Utterance) -> AsyncIterator[tuple[str, int, object]]:
    """Speak an utterance's segments in order as they come, each a request of its own through the service; from
    the second on, each carries the previous segment's text and codes (`SynthesisRequest.previous`). Yields
    ("start", index, job) once a segment is submitted, ("audio", index, float32 chunk) as it is decoded and
    ("end", index, job) once it is spoken; returns after the last. Closing the generator cancels the segment
    being spoken at its next step."""
    previous = None
    index = -1  # the segment being spoken, from 0 in each utterance
    while (text := await u.pending.get()) is not None:
        u.speaking, index = True, index + 1
        job = await asyncio.to_thread(service.prepare, replace(u.params, text=text, previous=previous))
        yield "start", index, job
        async with aclosing(service.stream(job)) as chunks:
            async for chunk in chunks:
                yield "audio", index, chunk
        u.speaking = False
        yield "end", index, job
        if job.segments and job.segments[-1].codes.shape[1]:
            previous = (job.segments[-1].text, job.segments[-1].codes)


class LiveSession:
    """One WebSocket connection, from accept to close. `run` drives it; the figures (`segments`,
    `audio_seconds`, `close_reason`, `close_code`) are what metrics and the access log report.

    `close_reason` is one of a bounded set: `closed` (the client closed between utterances), `disconnected` (it
    left mid-utterance), `idle`, `bad_input`, `limit`, `busy` or `server_error`."""

    def __init__(self, service: Service, read_request: ReadRequest, model_header: str | None, limits: LiveLimits,
                 on_segment: Callable[[Job], None] | None = None):
        """`on_segment` is called with each segment's job once it has been spoken to the end (metrics)."""
        self.service = service
        self.read_request = read_request
        self.model_header = model_header
        self.limits = limits
        self.on_segment = on_segment
        #: Encoded events on their way to the socket: bounded, so a reader that does not keep up pauses the
        #: segment being spoken at its next chunk, and with it every later segment (none is submitted meanwhile).
        self.outbox: asyncio.Queue = asyncio.Queue(limits.audio_queue)
        self.model: str | None = None
        self.utterance: Utterance | None = None
        self._speaker: asyncio.Task | None = None  # speaks the latest utterance (`_speak`)
        self.started = time.perf_counter()
        self.submitted = 0  # segments handed to the service
        self.segments = 0  # segments spoken to the end
        self.audio_seconds = 0.0
        self.text_chars = 0
        self.close_code: int | None = None  # the server's, when it closed the socket
        self.close_reason: str | None = None  # once it has ended (see above)
        self.close_message = ""

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started

    async def run(self, transport: Transport) -> None:
        """Serve the connection until it closes, however it ends; its generation is cancelled then."""
        sender = asyncio.create_task(self._send_all(transport))
        receiver = asyncio.create_task(self._receive_all(transport))
        try:
            await asyncio.wait({sender, receiver}, return_when=asyncio.FIRST_COMPLETED)
            if receiver.done() and self.close_code is not None:
                await asyncio.wait({sender})  # the session failed: the sender delivers finish and closes
        finally:
            tasks = [receiver, sender] + ([self._speaker] if self._speaker is not None else [])
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self.close_reason is None:  # the client went away
                self.close_reason = "disconnected" if self.utterance is not None else "closed"

    # -- the two directions ----------------------------------------------------------------------------------
    async def _send_all(self, transport: Transport) -> None:
        while True:
            item = await self.outbox.get()
            if item is _CLOSE:
                return await transport.close(self.close_code, self.close_message)
            await transport.send(item)

    async def _receive_all(self, transport: Transport) -> None:
        try:
            self.model = self.service.resolve_fish_model(self.model_header)
        except BadRequest as exc:
            return self._fail(LiveError(str(exc), CLOSE_POLICY, "bad_input"))
        receiving = None  # one receive at a time, never cancelled while the session lives
        try:
            while True:
                if receiving is None:
                    receiving = asyncio.ensure_future(transport.receive())
                done, _ = await asyncio.wait({receiving}, timeout=self.limits.idle_timeout)
                if not done:
                    if self._generating:
                        continue
                    raise LiveError(f"no message for {self.limits.idle_timeout:g} s", CLOSE_POLICY, "idle")
                message, receiving = receiving.result(), None
                if message is None:
                    return
                await self._handle(self._decode(message))
        except Exception as exc:
            self._fail(error_close(exc, "live session failed"))
        finally:
            if receiving is not None:
                receiving.cancel()

    @property
    def _generating(self) -> bool:
        return self.utterance is not None and self.utterance.generating

    def _decode(self, message: bytes | str) -> dict:
        if len(message) > self.limits.max_message_bytes:
            raise LiveError(f"the message is larger than the {self.limits.max_message_bytes} byte limit",
                            CLOSE_TOO_BIG, "limit")
        if isinstance(message, str):
            raise LiveError("send events as binary msgpack messages, not text", CLOSE_UNSUPPORTED_DATA, "bad_input")
        try:
            data = ormsgpack.unpackb(message)
        except (ValueError, TypeError, RecursionError) as exc:  # ormsgpack's MsgpackDecodeError is a ValueError
            detail = str(exc).splitlines()[0][:MAX_DETAIL_CHARS] if str(exc) else type(exc).__name__
            raise LiveError(f"the message is not valid msgpack: {detail}", CLOSE_INVALID_PAYLOAD, "bad_input") from None
        if not isinstance(data, dict) or not isinstance(data.get("event"), str):
            raise LiveError("an event must be a msgpack map with an `event` name", CLOSE_INVALID_PAYLOAD,
                            "bad_input")
        return data

    # -- events ----------------------------------------------------------------------------------------------
    async def _handle(self, data: dict) -> None:
        name = data["event"]
        if name == "start":
            return await self._start(data.get("request"))
        if name not in ("text", "flush", "stop"):
            raise LiveError(f"unknown event {name[:MAX_DETAIL_CHARS]!r}; events are start, text, flush and stop",
                            CLOSE_INVALID_PAYLOAD, "bad_input")
        u = self.utterance
        if u is None:
            raise LiveError(f"{name} before start: send a start event first", CLOSE_POLICY, "bad_input")
        if u.stopping:
            raise LiveError(f"{name} after stop: wait for finish, then start again", CLOSE_POLICY, "bad_input")
        if name == "text":
            self._text(u, data.get("text"))
        elif name == "flush":
            u.flush()
        else:
            u.stop()

    async def _start(self, request: object) -> None:
        if self.utterance is not None:
            raise LiveError("start while an utterance is active: send stop and wait for finish first", CLOSE_POLICY,
                            "bad_input")
        try:
            params, output = self.read_request(request, self.model, LIVE_MIN_CHUNK_LENGTH)
        except BadRequest as exc:
            raise LiveError(f"invalid start request: {exc}", CLOSE_INVALID_PAYLOAD, "bad_input") from None
        _, engine, _, _ = await asyncio.to_thread(self.service.resolve_voice, params)  # a bad voice fails now
        params = await asyncio.to_thread(self.service.encode_references, params)  # once, not per segment
        u = Utterance.of(params)
        self.utterance = u
        self._speaker = asyncio.create_task(self._speak(u, OutputEncoder(output, engine.sample_rate)))
        if params.text:  # the SDK sends an empty one; any text here comes first
            self._text(u, params.text)

    def _text(self, u: Utterance, text: object) -> None:
        self.text_chars = u.push(text, self.limits, self.text_chars)

    # -- speaking --------------------------------------------------------------------------------------------
    async def _speak(self, u: Utterance, encoder: OutputEncoder) -> None:
        """Speak the utterance's segments in order, then finish it."""
        index = 0
        try:
            async with aclosing(speak(self.service, u)) as spoken:
                async for kind, index, value in spoken:
                    if kind == "start":
                        self.submitted += 1
                    elif kind == "audio":
                        await self._audio(await asyncio.to_thread(encoder.push, value), index)
                    else:
                        self.segments += 1
                        self.audio_seconds += value.audio_seconds
                        if self.on_segment is not None:
                            self.on_segment(value)
            await self._audio(encoder.finish(), index)
            self.utterance = None  # before finish is queued: the client may start again once it reads it
            await self.outbox.put(FINISH_STOP)
        except Exception as exc:
            self._fail(error_close(exc, "live generation failed"))
        finally:
            encoder.close()

    async def _audio(self, data: bytes, segment: int) -> None:
        """An `audio` event; `segment` (an extension, which Fish's clients ignore) is the index of the segment
        whose chunk gave these bytes, so a client can time each sentence (`shoal bench --live`)."""
        if data:
            await self.outbox.put(event("audio", audio=data, segment=segment))

    def _fail(self, exc: LiveError) -> None:
        """End the session: drop the audio not yet sent, then `finish` `error` and the close."""
        if self.close_code is not None:
            return
        self.close_code, self.close_reason, self.close_message = exc.code, exc.reason, str(exc)
        if self._speaker is not None and self._speaker is not asyncio.current_task():
            self._speaker.cancel()
        while not self.outbox.empty():
            self.outbox.get_nowait()
        self.outbox.put_nowait(event("finish", reason="error", message=str(exc)))
        self.outbox.put_nowait(_CLOSE)
