"""The official Fish Audio SDK (`fishaudio`, pinned in the test extra) against a live `shoal serve`: the calls a
user makes after changing `base_url`, sync and async."""

from __future__ import annotations

import asyncio
import os
import re
import threading
from pathlib import Path

import numpy as np
import pytest
from fishaudio import AsyncFishAudio, FishAudio
from fishaudio.exceptions import AuthenticationError, APIError
from fishaudio.types import FlushEvent, Prosody, TTSConfig

from shoal.testing import Server

from support import live_receive, live_send, live_socket, live_until_finish, pyav_decode, tone_clip

KEY = "sdk-key"
# Short generations on the tiny checkpoint; the SDK's own defaults (1024 tokens) would only take longer.
CONFIG = TTSConfig(max_new_tokens=12, temperature=0.7, top_p=0.7)
FORMATS = ["mp3", "wav", "pcm", "opus"]
LIVE_WAIT_SECONDS = 120.0  # how long the text iterator waits for audio before it gives up (and the test fails)
SDK_DEFAULT_RATE = 44100  # what shoal's engine makes; the SDK sends no sample_rate unless asked
# The SDK and LiveKit send no seed, and the tiny checkpoint's random weights pick its end token at random steps, so
# an answer may be a single frame long: the tests bound the length by max_new_tokens (12 frames of 2048 samples,
# plus the compressed formats' padding) and ask only for some audio below it.
MAX_SECONDS = CONFIG.max_new_tokens * 2048 / SDK_DEFAULT_RATE + 0.1


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_checkpoint):
    with Server(tiny_checkpoint, tmp_path_factory.mktemp("sdk"), "--api-key", KEY) as srv:
        yield srv.start()


@pytest.fixture
def client(server):
    with FishAudio(api_key=KEY, base_url=server.url) as c:
        yield c


def decoded_seconds(data: bytes, fmt: str, rate: int = SDK_DEFAULT_RATE) -> float:
    audio, decoded_rate = pyav_decode(data, fmt, rate)
    return audio.shape[1] / decoded_rate


@pytest.mark.parametrize("fmt", FORMATS)
def test_convert_in_every_format(client, fmt):
    data = client.tts.convert(text="Hello from the SDK.", format=fmt, config=CONFIG)
    assert 0 < decoded_seconds(data, fmt) < MAX_SECONDS


@pytest.mark.parametrize("fmt", FORMATS)
def test_async_convert_in_every_format(server, fmt):
    async def main():
        async with AsyncFishAudio(api_key=KEY, base_url=server.url) as c:
            return await c.tts.convert(text="Hello, asynchronously.", format=fmt, config=CONFIG)

    assert 0 < decoded_seconds(asyncio.run(main()), fmt) < MAX_SECONDS


def test_stream_yields_chunks_that_make_one_file(client):
    """shoal streams the body (the SDK's `model` header makes it default to streaming); SDK 1.3.0's `tts.stream`
    itself reads the whole response before it iterates, so the chunk count says nothing about the server."""
    config = CONFIG.model_copy(update={"max_new_tokens": 60})
    chunks = list(client.tts.stream(text="A streamed sentence, in chunks.", format="pcm", config=config))
    assert decoded_seconds(b"".join(chunks), "pcm") > 0


def test_async_stream(server):
    async def main():
        async with AsyncFishAudio(api_key=KEY, base_url=server.url) as c:
            stream = await c.tts.stream(text="Streamed, asynchronously.", format="mp3", config=CONFIG)
            return [chunk async for chunk in stream]

    assert 0 < decoded_seconds(b"".join(asyncio.run(main())), "mp3") < MAX_SECONDS


def test_sdk_options_reach_the_audio(client):
    """sample_rate and volume from the SDK's own types change what comes back. The SDK sends no seed, and the tiny
    checkpoint stops at random lengths, so this compares levels (20 dB apart), not lengths; speed is timed with a
    seed in tests/server/test_api.py."""
    def convert(**prosody):
        config = CONFIG.model_copy(update={"sample_rate": 16000, "prosody": Prosody(**prosody)})
        audio, rate = pyav_decode(client.tts.convert(text="Options.", format="wav", config=config))
        assert rate == 16000
        return 20 * np.log10(np.sqrt(np.mean(audio ** 2)))

    assert convert(volume=-20, speed=1.5) < convert() - 10


def test_every_fish_model_name_the_sdk_knows_is_served(client):
    for model in ("s1", "s2-pro", "speech-1.5", "speech-1.6"):
        assert client.tts.convert(text="Model.", format="wav", config=CONFIG, model=model)


def test_wrong_key_is_an_authentication_error(server):
    with FishAudio(api_key="wrong", base_url=server.url) as c, pytest.raises(AuthenticationError):
        c.tts.convert(text="No.", config=CONFIG)


def test_bad_request_surfaces_shoal_s_message(client):
    with pytest.raises(APIError) as info:
        client.tts.convert(text="Bad.", config=CONFIG, reference_id="nobody-saved-this")
    assert info.value.status == 400 and "nobody-saved-this" in str(info.value)


# -- LiveKit Agents' Fish Audio plugin ----------------------------------------------------------------------------

def livekit_tts(server, session, **options):
    from livekit.plugins import fishaudio

    # voice_id: the plugin's default is a voice on Fish's cloud, which a self-hosted server does not have.
    return fishaudio.TTS(base_url=server.url, api_key=KEY, http_session=session, voice_id="default",
                         max_new_tokens=CONFIG.max_new_tokens, **options)


@pytest.mark.parametrize("fmt, rate", [("wav", 24000), ("mp3", 32000), ("pcm", 24000)])
def test_livekit_synthesize(server, fmt, rate):
    import aiohttp

    async def main():
        async with aiohttp.ClientSession() as session:
            tts = livekit_tts(server, session, output_format=fmt, volume=-3.0, normalize_loudness=True)
            return [event.frame async for event in tts.synthesize("Hello from LiveKit.")]

    frames = asyncio.run(main())
    assert frames and all(f.sample_rate == rate and f.num_channels == 1 for f in frames)
    assert 0 < sum(f.samples_per_channel for f in frames) / rate < MAX_SECONDS


# -- the README's snippet -----------------------------------------------------------------------------------------

def readme_sdk_snippet() -> str:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Use it from the Fish Audio SDK, LiveKit or Pipecat", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)[0]


def test_the_readme_sdk_snippet_runs_as_written(server, tmp_path):
    """The README's fishaudio snippet, run against the live server: only the URL, the key and a cap on tokens
    (the tiny checkpoint's random weights may not stop on their own) are changed."""
    code = readme_sdk_snippet()
    for old, new in (('"http://127.0.0.1:8080"', repr(server.url)), ('"my-key"', repr(KEY)),
                     ("reference_id=voice.id)", "reference_id=voice.id, config=CONFIG)")):
        assert old in code, old
        code = code.replace(old, new)
    (tmp_path / "me.wav").write_bytes(tone_clip(3.0))
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(compile(code, "README.md", "exec"), {"CONFIG": CONFIG})
    finally:
        os.chdir(cwd)
    for name in ("hello.mp3", "live.mp3"):
        assert decoded_seconds((tmp_path / name).read_bytes(), "mp3") > 0, name


# -- the live WebSocket through the SDK, and Pipecat's wire sequence -----------------------------------------------

def test_stream_websocket_speaks_before_the_text_iterator_ends(client):
    """Words a few at a time, a FlushEvent, then the iterator waits until audio has arrived: it can only go on if
    the first sentence was spoken while the text was still open."""
    heard = threading.Event()
    waited = []

    def text():
        yield from ["The first ", "sentence, a few ", "words at a time."]
        yield FlushEvent()
        waited.append(heard.wait(LIVE_WAIT_SECONDS))
        yield from ["And the ", "second one."]

    chunks = []
    for chunk in client.tts.stream_websocket(text(), config=CONFIG.model_copy(update={"format": "pcm"})):
        chunks.append(chunk)
        heard.set()
    assert waited == [True]
    assert decoded_seconds(b"".join(chunks), "pcm") > 0


def test_async_stream_websocket_speaks_before_the_text_iterator_ends(server):
    async def main():
        heard = asyncio.Event()
        waited = []

        async def text():
            for words in ["The first ", "sentence, a few ", "words at a time."]:
                yield words
            yield FlushEvent()
            try:
                await asyncio.wait_for(heard.wait(), LIVE_WAIT_SECONDS)
                waited.append(True)
            except asyncio.TimeoutError:
                waited.append(False)
            yield "And the second one."

        chunks = []
        async with AsyncFishAudio(api_key=KEY, base_url=server.url) as c:
            async for chunk in c.tts.stream_websocket(text(), config=CONFIG.model_copy(update={"format": "pcm"})):
                chunks.append(chunk)
                heard.set()
        return waited, chunks

    waited, chunks = asyncio.run(main())
    assert waited == [True] and decoded_seconds(b"".join(chunks), "pcm") > 0


def test_wrong_key_on_the_websocket_is_refused(server):
    with FishAudio(api_key="wrong", base_url=server.url) as c, pytest.raises(Exception) as info:
        list(c.tts.stream_websocket(iter(["No."]), config=CONFIG))
    assert "401" in str(info.value)


def test_pipecat_s_wire_sequence(server):
    """What Pipecat's FishAudioTTSService sends (pipecat-ai 1.14, not installed here): a start with empty text and
    its settings (prosody with both fields), then per sentence a text and a flush, without waiting, and at the end
    stop and close. Audio for each sentence comes as pcm at the rate it asked for."""
    start = {"text": "", "sample_rate": 24000, "latency": "balanced", "format": "pcm", "normalize": True,
             "prosody": {"speed": 1.0, "volume": 0}, "reference_id": None, "temperature": 0.7, "top_p": 0.7,
             "max_new_tokens": 12}
    with live_socket(server.url, {"Authorization": f"Bearer {KEY}", "model": "s2.1-pro"}) as ws:
        live_send(ws, "start", request=start)
        for sentence in ("Hello there.", "This is Pipecat speaking."):
            live_send(ws, "text", text=sentence)
            live_send(ws, "flush")
        segments = set()
        while len(segments) < 2:
            event = live_receive(ws)
            assert event["event"] == "audio", event
            segments.add(event["segment"])
        live_send(ws, "stop")
        audio, finish = live_until_finish(ws)
    assert finish == {"event": "finish", "reason": "stop"}
