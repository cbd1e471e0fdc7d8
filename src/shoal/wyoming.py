"""The Wyoming protocol (Home Assistant's local voice protocol), served beside the HTTP API in the same process.

An interface layer like `shoal.live`: it talks to the service only, so a Wyoming request batches with HTTP and
WebSocket requests on the same engines and voices. The protocol itself is the `wyoming` library's (its
AsyncTcpServer, AsyncEventHandler and event classes); nothing here reads or writes the wire format.

- `describe` -> `info`: one TTS program per served model (the default model's first, the one a client gets
  unless it sends `select-program`), each with the model's default voice and, if it clones, every saved voice.
- `synthesize` -> `audio-start` (the model's rate, 16-bit mono), `audio-chunk`s as they are decoded, `audio-stop`.
- `synthesize-start`, `synthesize-chunk`s, `synthesize-stop` -> the live segmenter (`shoal.live.Utterance`): the
  first sentence is spoken as soon as it ends, each later one carries the previous one's codes; one `audio-start`
  ... `audio-stop` for the utterance, then `synthesize-stopped`. A `synthesize` sent inside a streamed utterance
  (Home Assistant sends one for servers that do not stream) is ignored.
- Errors are `error` events and the connection stays usable: an unknown voice or model, text past the live
  limits, an event out of order. Bytes that are not Wyoming events end that connection only. A client that goes
  away has its generation cancelled at the engine's next step.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from contextlib import aclosing
from typing import Callable

from wyoming.audio import AudioChunk, AudioStart, AudioStop
from wyoming.error import Error
from wyoming.event import Event
from wyoming.info import Attribution, Describe, Info, SelectProgram, TtsProgram, TtsVoice
from wyoming.ping import Ping, Pong
from wyoming.server import AsyncEventHandler, AsyncTcpServer
from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop, SynthesizeStopped

from shoal import __version__
from shoal.audio import OutputEncoder, OutputOptions
from shoal.errors import ShoalError
from shoal.live import LiveError, LiveLimits, Utterance, speak
from shoal.service import DEFAULT_VOICE, Service, SpeechParams

log = logging.getLogger("shoal.wyoming")

ATTRIBUTION = Attribution(name="shoal", url="https://github.com/shoal-tts/shoal")
#: Bytes per sample and channels of the audio sent: 16-bit mono PCM, as wyoming-piper sends.
WIDTH, CHANNELS = 2, 1
#: The languages a Fish Speech model speaks (its model card's), for a voice's `languages`; piper's voice says its own.
FISH_LANGUAGES = ["en", "zh", "ja", "ko", "fr", "de", "es", "ar", "ru", "nl", "it", "pl", "pt"]
#: mDNS service type Home Assistant browses for Wyoming servers.
ZEROCONF_TYPE = "_wyoming._tcp.local."

#: Streamed text is cut at every sentence end (the live WebSocket joins sentences under 50 characters): Home
#: Assistant sends an LLM's answer as it is written, and its first sentence should be heard as soon as it ends.
WYOMING_MIN_CHUNK_LENGTH = 0

GetService = Callable[[], Service]  # the service, or a ShoalError (Unavailable while the engines load)


def describe(service: Service) -> Info:
    """shoal's TTS programs: one per served model, the default model's first."""
    models = sorted(service.model_names, key=lambda name: name != service.engines.default)
    titles = {v.id: v.details.title for v in service.list_voices()}
    programs = []
    for model in models:
        engine = service.engines.get(model)
        languages = list(getattr(engine, "languages", None) or FISH_LANGUAGES)
        voices = [TtsVoice(name=name, attribution=ATTRIBUTION, installed=True, version=None, languages=languages,
                           description=("the model's own voice" if name == DEFAULT_VOICE
                                        else titles.get(name) or name))
                  for name in service.voice_names(model)]
        programs.append(TtsProgram(name=model, attribution=ATTRIBUTION, installed=True, version=__version__,
                                   description=f"shoal: {model}", voices=voices,
                                   supports_synthesize_streaming=True))
    return Info(tts=programs)


class WyomingHandler(AsyncEventHandler):
    """One Wyoming connection. At most one synthesis runs at a time; it runs in its own task, so events (and the
    client going away) are read meanwhile."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, get_service: GetService,
                 limits: LiveLimits):
        super().__init__(reader, writer)
        self.get_service = get_service
        self.limits = limits
        self.model: str | None = None  # select-program's; None: the default model
        self.utterance: Utterance | None = None  # a streamed synthesize-start ... synthesize-stop
        self.task: asyncio.Task | None = None  # the synthesis being spoken
        self.text_chars = 0  # over the connection's streamed utterances (live_max_text_chars)

    async def run(self) -> None:
        try:
            await super().run()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except Exception as exc:  # an event the library could not make sense of: this connection ends, no other
            log.info("wyoming connection closed: %s: %s", type(exc).__name__, exc)

    async def disconnect(self) -> None:
        """The client went away (or sent garbage): cancel its generation."""
        await self._abort()

    async def _abort(self) -> None:
        """End the streamed utterance now, its generation cancelled (the error event follows)."""
        if self.task is not None and not self.task.done():
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        self.utterance = None

    async def handle_event(self, event: Event) -> bool:
        try:
            await self._handle(event)
        except (ShoalError, LiveError) as exc:
            await self._error(exc)
        except (KeyError, TypeError, AttributeError):  # an event of a known type without its fields
            await self._error(LiveError(f"malformed {event.type[:80]!r} event", 0, "bad_input"))
        return True

    async def _handle(self, event: Event) -> None:
        if Describe.is_type(event.type):
            await self.write_event(describe(self.get_service()).event())
        elif Ping.is_type(event.type):
            await self.write_event(Pong(text=Ping.from_event(event).text).event())
        elif SelectProgram.is_type(event.type):
            name = SelectProgram.from_event(event).name
            self.model, _ = self.get_service().resolve_model(name)
        elif Synthesize.is_type(event.type):
            if self.utterance is not None:
                return  # inside a streamed utterance: Home Assistant's copy of the text for non-streaming servers
            self._busy("synthesize")
            synthesize = Synthesize.from_event(event)
            params = self._params(synthesize.voice, text=synthesize.text)
            service = self.get_service()
            job = await asyncio.to_thread(service.prepare, params)  # a bad voice or text fails before any audio
            self.task = asyncio.create_task(self._synthesize(service, job))
        elif SynthesizeStart.is_type(event.type):
            self._busy("synthesize-start")
            params = self._params(SynthesizeStart.from_event(event).voice, text="")
            service = self.get_service()
            await asyncio.to_thread(service.resolve_voice, params)  # a bad voice fails now, before any text
            self.utterance = Utterance.of(params)
            self.task = asyncio.create_task(self._stream(service, self.utterance))
        elif SynthesizeChunk.is_type(event.type):
            u = self._streaming("synthesize-chunk")
            try:
                self.text_chars = u.push(SynthesizeChunk.from_event(event).text, self.limits, self.text_chars)
            except (ShoalError, LiveError):  # past a limit, or unspeakable text: this utterance ends here
                await self._abort()
                raise
        elif SynthesizeStop.is_type(event.type):
            self._streaming("synthesize-stop").stop()
        else:
            await self._error(LiveError(f"unexpected event {event.type[:80]!r}: shoal's Wyoming server speaks "
                                        "describe, synthesize and synthesize-start/-chunk/-stop", 0, "bad_event"))

    def _params(self, voice, text: str) -> SpeechParams:
        return SpeechParams(text=text, model=self.model, voice=voice.name if voice is not None else None,
                            min_chunk_length=WYOMING_MIN_CHUNK_LENGTH)

    def _busy(self, name: str) -> None:
        if self.utterance is not None:
            raise LiveError(f"{name} during a streamed synthesis: send synthesize-stop and wait for "
                            "synthesize-stopped first", 0, "out_of_order")
        if self.task is not None and not self.task.done():
            raise LiveError(f"{name} while a synthesis is still being spoken: wait for audio-stop", 0,
                            "out_of_order")

    def _streaming(self, name: str) -> Utterance:
        u = self.utterance
        if u is None or u.stopping:
            raise LiveError(f"{name} without synthesize-start: start a streamed synthesis first", 0, "out_of_order")
        return u

    async def _error(self, exc: Exception) -> None:
        code = exc.reason if isinstance(exc, LiveError) else exc.code
        await self.write_event(Error(text=str(exc), code=code).event())

    # -- speaking --------------------------------------------------------------------------------------------
    async def _synthesize(self, service: Service, job) -> None:
        encoder = OutputEncoder(OutputOptions("pcm"), job.engine.sample_rate)
        try:
            await self.write_event(self._audio_start(job.engine.sample_rate))
            async with aclosing(service.stream(job)) as chunks:
                async for chunk in chunks:
                    await self._chunk(encoder.push(chunk), job.engine.sample_rate)
            await self._chunk(encoder.finish(), job.engine.sample_rate)
            await self.write_event(AudioStop().event())
        except Exception as exc:
            await self._failed(exc, "wyoming synthesis failed")
        finally:
            encoder.close()

    async def _stream(self, service: Service, u: Utterance) -> None:
        """One audio-start ... audio-stop for the whole utterance (at its first audio), then synthesize-stopped."""
        encoder = rate = None
        try:
            async with aclosing(speak(service, u)) as spoken:
                async for kind, _, value in spoken:
                    if kind == "start" and encoder is None:
                        rate = value.engine.sample_rate
                        encoder = OutputEncoder(OutputOptions("pcm"), rate)
                        await self.write_event(self._audio_start(rate))
                    elif kind == "audio":
                        await self._chunk(encoder.push(value), rate)
            if encoder is not None:
                await self._chunk(encoder.finish(), rate)
                await self.write_event(AudioStop().event())
            self.utterance = None  # before synthesize-stopped: the client may start again once it reads it
            await self.write_event(SynthesizeStopped().event())
        except Exception as exc:
            self.utterance = None
            await self._failed(exc, "wyoming streamed synthesis failed")
        finally:
            if encoder is not None:
                encoder.close()

    async def _failed(self, exc: Exception, what: str) -> None:
        """A synthesis ended by `exc`: our errors as they are, the client gone as nothing, anything else as an
        internal error (logged with its traceback, never shown)."""
        if isinstance(exc, ConnectionError):
            return
        if not isinstance(exc, (ShoalError, LiveError)):
            log.error(what, exc_info=exc)
            exc = ShoalError("internal server error")
        try:
            await self._error(exc)
        except ConnectionError:
            pass

    @staticmethod
    def _audio_start(rate: int) -> Event:
        return AudioStart(rate=rate, width=WIDTH, channels=CHANNELS).event()

    async def _chunk(self, data: bytes, rate: int) -> None:
        if data:
            await self.write_event(AudioChunk(rate=rate, width=WIDTH, channels=CHANNELS, audio=data).event())


class WyomingServer:
    """The Wyoming TCP server on the running event loop, and its zeroconf advertisement if asked for."""

    def __init__(self, get_service: GetService, limits: LiveLimits, host: str, port: int, zeroconf: bool = False):
        self.get_service, self.limits = get_service, limits
        self.host, self.port, self.zeroconf = host, port, zeroconf
        self.server = AsyncTcpServer(host, port)
        self._zeroconf = None

    async def start(self) -> None:
        await self.server.start(lambda reader, writer: WyomingHandler(reader, writer, self.get_service, self.limits))
        if self.port == 0:  # an ephemeral port (tests): the one bound
            self.port = self.server._server.sockets[0].getsockname()[1]
        log.info("Wyoming server on tcp://%s:%d", self.host, self.port)
        if self.zeroconf:
            await self._advertise()

    async def stop(self) -> None:
        if self._zeroconf is not None:
            await self._zeroconf.async_close()
            self._zeroconf = None
        await self.server.stop()

    async def _advertise(self) -> None:
        try:
            from zeroconf.asyncio import AsyncZeroconf
        except ImportError:
            log.error("--wyoming-zeroconf needs the zeroconf package (pip install zeroconf); not advertising")
            return
        address = advertised_address(self.host)
        if address.startswith("127."):
            log.warning("advertising the loopback address %s: only this machine can use it; serve on --host "
                        "0.0.0.0 for Home Assistant elsewhere", address)
        info = service_info(self.port, address)
        try:
            self._zeroconf = AsyncZeroconf()
            await self._zeroconf.async_register_service(info)
            log.info("advertising %s over mDNS", info.name)
        except Exception as exc:  # no multicast here: the server itself still runs
            log.warning("zeroconf advertisement failed: %s", exc)


def service_info(port: int, address: str, name: str | None = None):
    """The mDNS record Home Assistant discovers: `_wyoming._tcp`, as wyoming-piper's --zeroconf publishes."""
    from zeroconf.asyncio import AsyncServiceInfo

    name = name or f"shoal-{socket.gethostname().split('.')[0]}"
    return AsyncServiceInfo(ZEROCONF_TYPE, f"{name}.{ZEROCONF_TYPE}", addresses=[socket.inet_aton(address)],
                            port=port, properties={"program": "shoal", "version": __version__})


def advertised_address(host: str) -> str:
    """The IPv4 address to advertise: the listening one, or for a wildcard the address of the default route."""
    if host not in ("0.0.0.0", "", "::"):
        return socket.gethostbyname(host)
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("224.0.0.251", 5353))  # no packet is sent: this only picks the outgoing interface
        return probe.getsockname()[0]
    except OSError:
        return "127.0.0.1"
    finally:
        probe.close()


__all__ = ["WyomingServer", "WyomingHandler", "describe", "service_info"]
