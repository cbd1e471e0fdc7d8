"""The Wyoming server (`shoal serve --wyoming-port`, Home Assistant's protocol), driven by the `wyoming` library's
own client and by `wyoming-bench`, on the bundled piper voice and on the tiny S1 checkpoint."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys

import numpy as np
import pytest

from shoal.testing import Server, free_port

from support import noise_clip

pytest.importorskip("wyoming")

from wyoming.audio import AudioChunk, AudioStart  # noqa: E402
from wyoming.client import AsyncTcpClient  # noqa: E402
from wyoming.error import Error  # noqa: E402
from wyoming.event import Event  # noqa: E402
from wyoming.info import Describe, Info, SelectProgram  # noqa: E402
from wyoming.tts import (Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop,  # noqa: E402
                         SynthesizeVoice)

#: Seconds a test waits for the server's next event before it fails (a hang, never a speed check).
READ_TIMEOUT = 120.0
BUFFER_LIMIT = 300


@pytest.fixture(scope="module")
def piper_server(tmp_path_factory):
    port = free_port()
    env = {"SHOAL_LIVE_MAX_BUFFERED_CHARS": str(BUFFER_LIMIT), "SHOAL_MAX_TEXT_LENGTH": "2000"}
    with Server(None, tmp_path_factory.mktemp("wyoming-piper"), "--wyoming-port", str(port), "--no-ui",
                env=env) as srv:
        srv.start()
        srv.wyoming_port = port
        yield srv


@pytest.fixture(scope="module")
def fish_server(tmp_path_factory, tiny_checkpoint):
    port = free_port()
    with Server(tiny_checkpoint, tmp_path_factory.mktemp("wyoming-fish"), "--wyoming-port", str(port), "--no-ui",
                env={"SHOAL_MAX_BATCH_SIZE": "2"}) as srv:
        srv.start()
        srv.wyoming_port = port
        with srv.client() as c:
            r = c.post("/v1/references/add", data={"id": "narrator", "text": "What the clip says."},
                       files={"audio": ("a.wav", noise_clip(1.5, 4), "audio/wav")})
            assert r.status_code == 200, r.text
        yield srv


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 300))


class Conversation:
    """One Wyoming connection through the library's AsyncTcpClient."""

    def __init__(self, server: Server):
        self.client = AsyncTcpClient("127.0.0.1", server.wyoming_port)

    async def __aenter__(self) -> "Conversation":
        await self.client.connect()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.client.disconnect()

    async def send(self, eventable) -> None:
        await self.client.write_event(eventable if isinstance(eventable, Event) else eventable.event())

    async def read(self) -> Event:
        event = await asyncio.wait_for(self.client.read_event(), READ_TIMEOUT)
        assert event is not None, "the server closed the connection"
        return event

    async def until(self, last: str) -> list[Event]:
        """Events up to and including the first of type `last` (or an error)."""
        events = []
        while True:
            events.append(event := await self.read())
            if event.type in (last, "error"):
                return events

    async def info(self) -> Info:
        await self.send(Describe())
        event = await self.read()
        assert Info.is_type(event.type), event
        return Info.from_event(event)


def audio_of(events: list[Event]) -> tuple[AudioStart, np.ndarray, int]:
    """(the audio-start, the samples of every audio-chunk as int16, how many chunks)."""
    start = AudioStart.from_event(next(e for e in events if e.type == "audio-start"))
    chunks = [AudioChunk.from_event(e) for e in events if e.type == "audio-chunk"]
    assert all((c.rate, c.width, c.channels) == (start.rate, 2, 1) for c in chunks)
    return start, np.frombuffer(b"".join(c.audio for c in chunks), "<i2"), len(chunks)


def error_of(events: list[Event]) -> Error:
    assert events[-1].type == "error", [e.type for e in events]
    return Error.from_event(events[-1])


# -- describe -----------------------------------------------------------------------------------------------------

def test_describe_lists_the_programs_and_every_saved_voice(fish_server):
    async def go():
        async with Conversation(fish_server) as c:
            return await c.info()

    info = run(go())
    assert [p.name for p in info.tts] == ["s1", "piper"]  # the default model first: the program a client gets
    s1, piper = info.tts
    assert all(p.supports_synthesize_streaming and p.installed for p in info.tts)
    assert [v.name for v in s1.voices] == ["default", "narrator"]
    assert [v.name for v in piper.voices] == ["default"] and piper.voices[0].languages == ["en_US"]


@pytest.mark.slow
def test_wyoming_bench_info_and_tts_both_modes(piper_server):
    bench = [sys.executable, "-c", "import sys; from wyoming_bench.cli import main; sys.exit(main())"]
    address = f"127.0.0.1:{piper_server.wyoming_port}"
    info = subprocess.run([*bench, "info", address], capture_output=True, text=True, timeout=300)
    assert info.returncode == 0, info.stdout + info.stderr
    assert "piper (synthesize streaming)" in info.stdout
    tts = subprocess.run([*bench, "tts", address, "--mode", "both", "--rounds", "1", "--warmup", "0",
                          "--texts", "The first sentence ends here. A second one follows it."],
                         capture_output=True, text=True, timeout=600)
    assert tts.returncode == 0, tts.stdout + tts.stderr
    assert "[non_streaming] ok=1 fail=0" in tts.stdout and "[streaming] ok=1 fail=0" in tts.stdout, tts.stdout


# -- synthesize ---------------------------------------------------------------------------------------------------

def test_synthesize_streams_audio_chunks_at_the_models_rate(piper_server):
    async def go():
        async with Conversation(piper_server) as c:
            await c.send(Synthesize("The first sentence. The second sentence. And a third."))
            return await c.until("audio-stop")

    events = run(go())
    assert [e.type for e in events][0] == "audio-start" and events[-1].type == "audio-stop"
    start, audio, chunks = audio_of(events)
    assert (start.rate, start.width, start.channels) == (22050, 2, 1)
    assert chunks >= 3 and len(audio) > 22050 and np.abs(audio).max() > 1000  # one chunk per sentence, speech


def test_synthesize_in_a_saved_voice_and_a_selected_program(fish_server):
    async def go():
        async with Conversation(fish_server) as c:
            await c.send(Synthesize("Hello there.", voice=SynthesizeVoice(name="narrator")))
            voiced = await c.until("audio-stop")
            await c.send(SelectProgram(name="piper"))
            await c.send(Synthesize("Hello there."))
            piper = await c.until("audio-stop")
            await c.send(Synthesize("Hello there.", voice=SynthesizeVoice(name="narrator")))  # piper cannot clone
            refused = await c.until("audio-stop")
            return voiced, piper, refused

    voiced, piper, refused = run(go())
    assert audio_of(voiced)[0].rate == 44100 and len(audio_of(voiced)[1]) > 0
    assert audio_of(piper)[0].rate == 22050
    assert "cannot clone" in error_of(refused).text


# -- synthesize-start / -chunk / -stop ------------------------------------------------------------------------------

def test_streamed_text_is_spoken_from_the_first_sentence_end(fish_server):
    async def go():
        async with Conversation(fish_server) as c:
            await c.send(SynthesizeStart(voice=SynthesizeVoice(name="narrator")))
            await c.send(SynthesizeChunk("Hello there, this is the first "))
            await c.send(SynthesizeChunk("sentence. And the second"))
            # no stop yet: the first sentence has ended, so its audio comes now
            first = [await c.read(), await c.read()]
            await c.send(Synthesize("Hello there, this is the first sentence. And the second one."))  # HA's copy
            await c.send(SynthesizeChunk(" one."))
            await c.send(SynthesizeStop())
            rest = await c.until("synthesize-stopped")
            info = await c.info()  # the connection goes on
            return first, rest, info

    first, rest, info = run(go())
    assert [e.type for e in first] == ["audio-start", "audio-chunk"]
    types = [e.type for e in first + rest]
    assert types[-2:] == ["audio-stop", "synthesize-stopped"] and types.count("audio-start") == 1
    assert "error" not in types and info.tts


def test_an_empty_streamed_utterance_just_stops(piper_server):
    async def go():
        async with Conversation(piper_server) as c:
            await c.send(SynthesizeStart())
            await c.send(SynthesizeStop())
            return await c.until("synthesize-stopped")

    assert [e.type for e in run(go())] == ["synthesize-stopped"]


# -- errors -------------------------------------------------------------------------------------------------------

def test_unknown_voices_and_events_out_of_order_are_error_events(piper_server):
    async def go():
        out = {}
        async with Conversation(piper_server) as c:
            await c.send(Synthesize("Hi.", voice=SynthesizeVoice(name="nobody")))
            out["voice"] = await c.until("audio-stop")
            await c.send(SynthesizeStart(voice=SynthesizeVoice(name="nobody")))
            out["start-voice"] = await c.until("synthesize-stopped")
            await c.send(SynthesizeChunk("Hello."))
            out["chunk"] = await c.until("synthesize-stopped")
            await c.send(SynthesizeStop())
            out["stop"] = await c.until("synthesize-stopped")
            await c.send(SynthesizeStart())
            await c.send(SynthesizeStart())
            out["start-twice"] = await c.until("synthesize-stopped")
            await c.send(SynthesizeStop())
            out["stopped"] = await c.until("synthesize-stopped")
            await c.send(Event(type="transcribe", data={}))
            out["unknown"] = await c.until("synthesize-stopped")
            await c.send(Event(type="synthesize", data={}))
            out["malformed"] = await c.until("audio-stop")
            await c.send(SelectProgram(name="nope"))
            out["program"] = await c.until("info")
            await c.send(Synthesize("Still here."))
            out["after"] = await c.until("audio-stop")
        return out

    out = run(go())
    assert "unknown voice 'nobody'" in error_of(out["voice"]).text and error_of(out["voice"]).code == "bad_request"
    assert "unknown voice" in error_of(out["start-voice"]).text
    for name in ("chunk", "stop", "start-twice"):
        assert error_of(out[name]).code == "out_of_order", name
    assert [e.type for e in out["stopped"]] == ["synthesize-stopped"]
    assert "unexpected event 'transcribe'" in error_of(out["unknown"]).text
    assert error_of(out["malformed"]).code == "bad_input"
    assert "unknown model 'nope'" in error_of(out["program"]).text
    assert out["after"][-1].type == "audio-stop"


def test_the_live_limits_apply(piper_server):
    async def go():
        async with Conversation(piper_server) as c:
            await c.send(SynthesizeStart())
            await c.send(SynthesizeChunk("word " * (BUFFER_LIMIT // 5 + 1)))  # no sentence end
            buffered = await c.until("synthesize-stopped")
            await c.send(Synthesize("x" * 2001))
            long = await c.until("audio-stop")
            return buffered, long

    buffered, long = run(go())
    assert error_of(buffered).code == "limit" and "buffered" in error_of(buffered).text
    assert "the limit is 2000" in error_of(long).text


def test_garbage_bytes_close_that_connection_only(piper_server):
    with socket.create_connection(("127.0.0.1", piper_server.wyoming_port), timeout=READ_TIMEOUT) as raw:
        raw.sendall(b"\xff\xfe not json at all\n")
        assert raw.recv(1024) == b""  # closed by the server
    with socket.create_connection(("127.0.0.1", piper_server.wyoming_port), timeout=READ_TIMEOUT) as raw:
        raw.sendall(b'["a list, not an event"]\n')
        assert raw.recv(1024) == b""

    async def go():
        async with Conversation(piper_server) as c:
            return await c.info()

    assert run(go()).tts and piper_server.alive


def test_a_client_that_goes_away_frees_its_rows(fish_server):
    async def go():
        async with Conversation(fish_server) as c:
            await c.send(Synthesize("A long text that would take a good while to speak. " * 20))
            assert (await c.read()).type == "audio-start"
            assert (await c.read()).type == "audio-chunk"
        # disconnected mid-generation

    def cancelled() -> float:
        with fish_server.client() as c:
            metrics = c.get("/metrics").text
        line = next((l for l in metrics.splitlines()
                     if l.startswith('shoal_speech_requests_total{') and 'outcome="cancelled"' in l
                     and 'model="s1"' in l), None)
        return float(line.rsplit(" ", 1)[1]) if line else 0.0

    before = cancelled()
    run(go())
    idle = fish_server.wait_idle(timeout=60)
    assert idle["idle"], idle["last"]
    assert cancelled() == before + 1  # ended by the disconnect, not run to its end
    assert fish_server.alive


# -- zeroconf ------------------------------------------------------------------------------------------------------

def test_zeroconf_advertises_wyoming_tcp():
    pytest.importorskip("zeroconf")
    from shoal.wyoming import ZEROCONF_TYPE, advertised_address, service_info

    info = service_info(10200, "192.168.1.20", name="shoal-test")
    assert ZEROCONF_TYPE == "_wyoming._tcp.local."
    assert info.type == "_wyoming._tcp.local." and info.name == "shoal-test._wyoming._tcp.local."
    assert info.port == 10200 and info.parsed_addresses() == ["192.168.1.20"]
    assert advertised_address("127.0.0.1") == "127.0.0.1"


# -- in process: what the service is asked --------------------------------------------------------------------------

def test_each_streamed_sentence_carries_the_previous_ones_codes(tiny_checkpoint, tmp_path):
    """Over a real service on the tiny checkpoint: every prepare() the Wyoming server makes, recorded."""
    from shoal.compose import build_service
    from shoal.live import LiveLimits
    from shoal.settings import Settings
    from shoal.wyoming import WyomingServer

    settings = Settings.load(cli={"checkpoint": str(tiny_checkpoint), "data_dir": str(tmp_path), "device": "cpu",
                                  "lite_voice": False}, env={}, dotenv=None)
    service = build_service(settings, warm_up=False)
    asked = []
    prepare = service.prepare
    service.prepare = lambda params: asked.append(params) or prepare(params)

    async def go():
        server = WyomingServer(lambda: service, LiveLimits.from_settings(settings), "127.0.0.1", 0)
        await server.start()
        try:
            client = AsyncTcpClient("127.0.0.1", server.port)
            await client.connect()
            await client.write_event(SynthesizeStart().event())
            for piece in ("First sentence here. ", "Second sentence here. ", "Third one."):
                await client.write_event(SynthesizeChunk(piece).event())
            await client.write_event(SynthesizeStop().event())
            while (event := await asyncio.wait_for(client.read_event(), READ_TIMEOUT)).type != "synthesize-stopped":
                assert event.type != "error", event
            await client.disconnect()
        finally:
            await server.stop()

    try:
        run(go())
    finally:
        service.close(engines=True)
    assert [p.text.strip() for p in asked] == ["First sentence here.", "Second sentence here.", "Third one."]
    assert asked[0].previous is None
    assert [p.previous[0].strip() for p in asked[1:]] == ["First sentence here.", "Second sentence here."]
    assert all(p.previous[1].shape[1] > 0 for p in asked[1:])


def test_a_wyoming_port_in_use_is_one_line_and_exit_1(tmp_path):
    from support import shoal

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        proc = shoal("serve", "--port", str(free_port()), "--wyoming-port", str(port), "--data-dir",
                     str(tmp_path / "data"), "--no-ui", cwd=tmp_path, timeout=120)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("shoal: error: cannot listen on") and str(port) in lines[0]
