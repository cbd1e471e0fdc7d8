"""The live WebSocket, /v1/tts/live: Fish Audio's protocol against a real server, and `LiveSession` in process
(idle timeout, limits, backpressure) with a transport the test controls."""

from __future__ import annotations

import asyncio
import io
import re
import time

import httpx
import numpy as np
import ormsgpack
import pytest
import soundfile as sf

from shoal.compose import build_service
from shoal.live import (CLOSE_INVALID_PAYLOAD, CLOSE_POLICY, CLOSE_TOO_BIG, CLOSE_TRY_AGAIN, LIVE_MIN_CHUNK_LENGTH,
                        LiveLimits, LiveSession)
from shoal.server.schemas import read_tts_request
from shoal.settings import Settings
from shoal.text import SentenceSegmenter

from support import (live_close_code, live_receive, live_send, live_socket, live_until_finish, pyav_decode,
                     tone_clip)

#: Frames per segment in these tests: a few chunks of audio, quickly.
FRAMES = 10
#: The tiny codec's samples per frame.
SAMPLES_PER_FRAME = 2048


def start_request(**fields) -> dict:
    """A start event's request as the fishaudio SDK sends it (empty text), short and seeded."""
    return {"text": "", "format": "pcm", "max_new_tokens": FRAMES, "seed": 1, **fields}


def access_line(server, request_id: str, deadline: float = 30.0) -> str:
    """The server's access-log line of the session with this request id (written once the session has ended)."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        for line in server.log.read_text().splitlines():
            if f"request_id={request_id} " in line:
                return line
        time.sleep(0.05)
    raise AssertionError(f"no access-log line for {request_id}")


# -- the segmenter -----------------------------------------------------------------------------------------------

def test_segments_end_at_the_first_sentence_end_past_min_length():
    s = SentenceSegmenter(20)
    assert s.push("Short one. ") == []  # 10 characters: not yet
    assert s.push("Now it is long enough. Tail") == ["Short one. Now it is long enough."]
    assert s.buffer == " Tail"
    assert s.push(" goes on") == [] and s.flush() == "Tail goes on" and s.flush() is None


def test_a_full_stop_at_the_end_of_what_arrived_waits_for_what_follows():
    s = SentenceSegmenter(0)
    assert s.push("Pi is 3.") == []  # "3." may become "3.14"
    assert s.push("14. Yes") == ["Pi is 3.14."]
    assert s.push("! ") == ["Yes!"]


def test_cjk_sentence_ends_need_no_space():
    s = SentenceSegmenter(0)
    assert s.push("你好。我很好！谢谢") == ["你好。", "我很好！"]
    assert s.push("。") == ["谢谢。"]
    s = SentenceSegmenter(6)
    assert s.push("你好。我很好！今天天气很好。") == ["你好。我很好！", "今天天气很好。"]


def test_closing_quotes_stay_with_their_sentence_and_blank_segments_are_dropped():
    s = SentenceSegmenter(0)
    assert s.push('He said "stop." Then left? ') == ['He said "stop."', "Then left?"]
    assert s.push("   ") == [] and s.flush() is None


# -- the protocol against a server ---------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["wav", "pcm", "mp3", "opus"])
def test_start_text_flush_stop_gives_decodable_audio(server, fmt):
    with live_socket(server.url) as ws:
        live_send(ws, "start", request=start_request(format=fmt, min_chunk_length=0))
        live_send(ws, "text", text="The first sentence. ")
        live_send(ws, "flush")
        live_send(ws, "text", text="And the second one.")
        live_send(ws, "stop")
        data, finish = live_until_finish(ws)
    assert finish == {"event": "finish", "reason": "stop"}
    audio, rate = pyav_decode(data, fmt, rate=44100)
    assert rate == (48000 if fmt == "opus" else 44100) and audio.shape[1] > 0  # opus runs at 48 kHz
    if fmt in ("wav", "pcm"):  # whole frames (a segment may end early at <|im_end|>: the tiny model is random)
        assert audio.shape[1] % SAMPLES_PER_FRAME == 0


def test_a_streamed_wav_starts_with_one_header_as_http_streaming_does(server):
    with live_socket(server.url) as ws:
        live_send(ws, "start", request=start_request(format="wav", min_chunk_length=0))
        live_send(ws, "text", text="One. Two. ")
        live_send(ws, "stop")
        data, _ = live_until_finish(ws)
    with httpx.Client(base_url=server.url, timeout=120) as c:
        http = c.post("/v1/tts", json={**start_request(format="wav"), "text": "One.", "streaming": True}).content
    assert data[:4] == b"RIFF" and data.count(b"RIFF") == 1
    assert data[:44] == http[:44]  # the same streaming header (unknown length)


def test_the_first_sentence_is_spoken_before_the_rest_of_the_text_is_sent(server):
    with live_socket(server.url) as ws:
        live_send(ws, "start", request=start_request())
        live_send(ws, "text", text="Only the first sentence has arrived.")
        live_send(ws, "flush")
        first = live_receive(ws)  # would hang (and time out) if the server waited for more text
        assert first["event"] == "audio" and first["audio"]
        live_send(ws, "text", text="Now the second one comes.")
        live_send(ws, "stop")
        rest, finish = live_until_finish(ws)
    assert finish["reason"] == "stop" and rest


def test_text_is_cut_at_sentence_ends_by_min_chunk_length(server):
    text = "One. Two. Three is a longer sentence than the others. Four. "
    counts = {}
    for min_chunk_length in (0, None):
        request_id = f"live-segments-{min_chunk_length}"
        with live_socket(server.url, headers={"X-Request-Id": request_id}) as ws:
            fields = {} if min_chunk_length is None else {"min_chunk_length": min_chunk_length}
            live_send(ws, "start", request=start_request(max_new_tokens=3, **fields))
            live_send(ws, "text", text=text)
            live_send(ws, "stop")
            live_until_finish(ws)
        counts[min_chunk_length] = int(re.search(r"segments=(\d+)", access_line(server, request_id)).group(1))
    assert counts[0] == 4  # every sentence end
    # the default (50): one segment past 50 characters at "others.", then the rest on stop
    assert len("One. Two. Three is a longer sentence than the others.") >= LIVE_MIN_CHUNK_LENGTH
    assert counts[None] == 2


def test_audio_events_name_their_segment_from_0_in_each_utterance(server):
    with live_socket(server.url) as ws:
        for _ in range(2):
            live_send(ws, "start", request=start_request(min_chunk_length=0))
            live_send(ws, "text", text="One. Two. Three. ")
            live_send(ws, "stop")
            marks = []
            while (event := live_receive(ws))["event"] == "audio":
                marks.append(event["segment"])
            assert event == {"event": "finish", "reason": "stop"}
            assert marks == sorted(marks) and set(marks) == {0, 1, 2}


def livekit_request() -> dict:
    """The start request LiveKit's Fish Audio plugin sends with its defaults (its `_build_tts_request`)."""
    return {"text": "", "chunk_length": 100, "format": "wav", "sample_rate": 24000, "mp3_bitrate": 64,
            "opus_bitrate": 64000, "references": [], "reference_id": None, "normalize": True, "latency": "balanced",
            "prosody": None, "top_p": 0.7, "temperature": 0.7, "features": ["quality-guard"],
            "max_new_tokens": FRAMES}


def test_the_socket_is_reused_after_finish_as_livekit_does(server):
    with live_socket(server.url, headers={"model": "s2.1-pro"}) as ws:
        for n in range(3):  # LiveKit's pool hands the socket to the next utterance once `finish` came
            live_send(ws, "start", request=livekit_request())
            for sentence in (f"Utterance number {n}.", "It has two sentences."):
                live_send(ws, "text", text=sentence + " ")  # a sentence at a time, each flushed
                live_send(ws, "flush")
            live_send(ws, "stop")
            data, finish = live_until_finish(ws)
            assert finish == {"event": "finish", "reason": "stop"}
            audio, rate = sf.read(io.BytesIO(data))  # each utterance is one whole wav stream of its own
            assert rate == 24000 and len(audio) > 0 and data.count(b"RIFF") == 1


def test_livekit_streams_two_utterances_over_one_pooled_socket(server):
    import aiohttp
    from livekit.plugins import fishaudio

    def websocket_lines() -> list[str]:
        return [line for line in server.log.read_text().splitlines() if "method=WEBSOCKET" in line]

    before = len(websocket_lines())

    async def main():
        async with aiohttp.ClientSession() as session:
            # voice_id: the plugin's default is a voice on Fish's cloud, which a self-hosted server does not have
            tts = fishaudio.TTS(base_url=server.url, api_key="unused", http_session=session, voice_id="default",
                                max_new_tokens=FRAMES, output_format="pcm")
            utterances = []
            for n in range(2):
                stream = tts.stream()
                stream.push_text(f"Utterance number {n}. It has two sentences. ")
                stream.end_input()
                utterances.append([event.frame async for event in stream])
                await stream.aclose()
            await tts.aclose()
            return utterances

    for frames in asyncio.run(main()):
        assert frames and all(f.sample_rate == 24000 and f.num_channels == 1 for f in frames)
    end = time.monotonic() + 30  # the session's line is written once the pool has closed the socket
    while len(websocket_lines()) == before and time.monotonic() < end:
        time.sleep(0.05)
    lines = websocket_lines()[before:]
    assert len(lines) == 1 and "segments=4" in lines[0], lines  # one socket, two sentences each


def test_the_fishaudio_sdk_streams_over_the_websocket(server):
    from fishaudio import FishAudio
    from fishaudio.types import TTSConfig

    client = FishAudio(api_key="unused", base_url=server.url)
    config = TTSConfig(format="pcm", max_new_tokens=FRAMES)
    chunks = list(client.tts.stream_websocket(iter(["Hello from the ", "SDK. ", "And goodbye."]), config=config))
    assert sum(map(len, chunks)) > 0 and sum(map(len, chunks)) % 2 == 0


def test_the_piper_model_speaks_each_segment_alone(server):
    with live_socket(server.url, headers={"model": "piper"}) as ws:
        live_send(ws, "start", request=start_request(min_chunk_length=0))
        live_send(ws, "text", text="Hello there. General greetings. ")
        live_send(ws, "stop")
        data, finish = live_until_finish(ws)
    assert finish["reason"] == "stop" and len(data) > 0


def test_an_unknown_model_header_is_a_finish_error_and_a_close(server):
    with live_socket(server.url, headers={"model": "gpt-9"}) as ws:
        event = live_receive(ws)
        code = live_close_code(ws)
    assert event["event"] == "finish" and event["reason"] == "error" and "valid models" in event["message"]
    assert code == CLOSE_POLICY


def test_a_client_that_leaves_mid_stream_frees_its_rows(server):
    first, budget = "Sentence number zero, long enough to run.", 1000
    # What the first segment generates when nobody leaves: the same request over HTTP (same prompt, same seed)
    pcm = httpx.post(server.url + "/v1/tts", json={"text": first, "seed": 1, "max_new_tokens": budget,
                                                    "format": "pcm"}, timeout=120).content
    whole = len(pcm) // 2 // SAMPLES_PER_FRAME + 1  # frames generated (the last one is never decoded)
    assert whole > 4 * FRAMES  # long enough that leaving after its first chunk cuts it short
    before = httpx.get(server.url + "/v1/health").json()["counters"]["generated_tokens"]
    with live_socket(server.url, headers={"X-Request-Id": "live-leaves"}) as ws:
        live_send(ws, "start", request=start_request(max_new_tokens=budget, min_chunk_length=0))
        live_send(ws, "text", text=f"{first} A second sentence waits. So does a third. ")
        assert live_receive(ws)["event"] == "audio"
    idle = server.wait_idle(timeout=60)
    assert idle["idle"], idle
    # Fewer frames than the first segment alone: it was cut short and the others never ran
    assert idle["last"]["counters"]["generated_tokens"] - before < whole
    assert "reason=disconnected" in access_line(server, "live-leaves")


def test_metrics_and_the_access_log_count_sessions(server):
    with live_socket(server.url, headers={"X-Request-Id": "live-metrics"}) as ws:
        live_send(ws, "start", request=start_request())
        live_send(ws, "text", text="Counted.")
        live_send(ws, "stop")
        live_until_finish(ws)
    line = access_line(server, "live-metrics")
    assert "method=WEBSOCKET route=/v1/tts/live" in line and "reason=closed" in line and "segments=1" in line
    assert float(re.search(r"audio_s=([\d.]+)", line).group(1)) > 0
    log = server.log.read_text()  # and only that line: none of uvicorn's own per-WebSocket lines
    assert '"WebSocket /v1/tts/live"' not in log and "connection open" not in log
    body = httpx.get(server.url + "/metrics").text
    assert re.search(r'^shoal_live_sessions_total\{reason="closed"\} [1-9]', body, re.M)
    assert re.search(r"^shoal_live_segments_total [1-9]", body, re.M)
    assert re.search(r"^shoal_live_audio_seconds_total [0-9.]*[1-9]", body, re.M)
    assert re.search(r"^shoal_live_session_duration_seconds_count [1-9]", body, re.M)
    assert "shoal_live_sessions_active 0.0" in body


# -- LiveSession in process ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def service(tiny_checkpoint, tmp_path_factory):
    settings = Settings.load(cli={"checkpoint": tiny_checkpoint, "lite_voice": False,
                                  "data_dir": tmp_path_factory.mktemp("live-data")}, env={}, dotenv=None)
    svc = build_service(settings, warm_up=False)
    yield svc
    svc.close(engines=True)


def limits(**changes) -> LiveLimits:
    return LiveLimits(**{**vars(LiveLimits.from_settings(Settings.load(env={}, dotenv=None))), **changes})


class Transport:
    """A client the test drives: `put` events in; what the session sends is in `sent` (decoded), its close in
    `closed`. `reading` cleared: the client reads nothing (each send waits)."""

    def __init__(self):
        self.inbox: asyncio.Queue = asyncio.Queue()
        self.sent: list[dict] = []
        self.closed: tuple[int, str] | None = None
        self.reading = asyncio.Event()
        self.reading.set()

    def put(self, name: str, **fields) -> None:
        self.inbox.put_nowait(ormsgpack.packb({"event": name, **fields}))

    async def receive(self):
        return await self.inbox.get()

    async def send(self, data: bytes) -> None:
        await self.reading.wait()
        self.sent.append(ormsgpack.unpackb(data))

    async def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)
        self.leave()  # a real socket ends its reads once closed

    def leave(self) -> None:
        """The client goes away."""
        self.inbox.put_nowait(None)


async def until(condition, seconds: float = 60.0) -> None:
    """Wait for `condition()` (a hang guard: the test fails if it never holds, however long it would take)."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the condition never held"
        await asyncio.sleep(0.01)


def run_session(service, transport: Transport, **limit_changes) -> LiveSession:
    session = LiveSession(service, read_tts_request, None, limits(**limit_changes))
    asyncio.run(asyncio.wait_for(session.run(transport), 120))
    return session


def test_a_silent_client_gets_finish_error_and_close_when_idle(service):
    t = Transport()
    t.put("start", request=start_request())
    session = run_session(service, t, idle_timeout=0.05)
    assert t.sent[-1]["reason"] == "error" and "no message" in t.sent[-1]["message"]
    assert t.closed[0] == CLOSE_POLICY and session.close_reason == "idle"


@pytest.mark.parametrize("changes, events, code, needle", [
    ({"max_text_chars": 30}, [("text", {"text": "Fifteen chars. "}), ("text", {"text": "Fifteen chars. "}),
                              ("text", {"text": "x"})], CLOSE_POLICY, "more than 30 characters of text"),
    ({"max_buffered_chars": 20}, [("text", {"text": "no sentence end in sight yet"})], CLOSE_POLICY, "buffered"),
    ({"max_message_bytes": 1024}, [("text", {"text": "x" * 2000})], CLOSE_TOO_BIG, "1024 byte limit"),
    ({}, [("text", {"text": "bad \x00 text"})], CLOSE_INVALID_PAYLOAD, "NUL"),
])
def test_limits_end_the_session_with_finish_error(service, changes, events, code, needle):
    t = Transport()
    t.put("start", request=start_request())
    for name, fields in events:
        t.put(name, **fields)
    session = run_session(service, t, **changes)
    assert t.sent[-1]["event"] == "finish" and t.sent[-1]["reason"] == "error", t.sent
    assert needle in t.sent[-1]["message"] and t.closed[0] == code
    assert session.close_reason in ("limit", "bad_input")


def test_inline_references_are_encoded_once_per_utterance_not_per_segment(service):
    encodes = service.stats().codec_encodes

    async def main():
        t = Transport()
        run = asyncio.create_task(LiveSession(service, read_tts_request, None, limits()).run(t))
        t.put("start", request=start_request(min_chunk_length=0,
                                             references=[{"audio": tone_clip(1.5), "text": "A tone."}]))
        t.put("text", text="First one. Second one. Third one. ")
        t.put("stop")
        await until(lambda: t.sent and t.sent[-1]["event"] == "finish")
        t.leave()
        await run
        return t

    t = asyncio.run(asyncio.wait_for(main(), 120))
    assert t.sent[-1] == {"event": "finish", "reason": "stop"}
    assert service.stats().codec_encodes - encodes == 1  # "off" caching, yet one encode for three segments


def test_a_full_queue_ends_the_session_with_try_again_later(service, monkeypatch):
    monkeypatch.setattr(service.dispatcher, "queue_size", 0)  # every request is refused as Busy
    t = Transport()
    t.put("start", request=start_request())
    t.put("text", text="Nobody will speak this.")
    t.put("flush")
    session = run_session(service, t)
    assert t.sent[-1]["reason"] == "error" and "already queued" in t.sent[-1]["message"]
    assert t.closed[0] == CLOSE_TRY_AGAIN and session.close_reason == "busy"


def test_a_reader_that_does_not_read_pauses_generation(service):
    segments = 4
    t = Transport()
    t.reading.clear()

    async def main():
        session = LiveSession(service, read_tts_request, None, limits(audio_queue=2))
        run = asyncio.create_task(session.run(t))
        t.put("start", request=start_request(max_new_tokens=40, latency="low", min_chunk_length=0))
        for n in range(segments):
            t.put("text", text=f"Sentence number {n}. ")
        # The audio queue fills and the engine runs dry while segments are still waiting: nothing is generated
        # for them while nobody reads.
        await until(lambda: session.outbox.full() and service.stats().in_flight == 0)
        assert session.submitted < segments and not session.utterance.pending.empty()
        t.reading.set()
        t.put("stop")
        await until(lambda: t.sent and t.sent[-1]["event"] == "finish")
        t.leave()
        await run
        return session

    session = asyncio.run(asyncio.wait_for(main(), 120))
    assert t.sent[-1] == {"event": "finish", "reason": "stop"}
    assert session.submitted == segments and session.segments == segments


def test_each_segment_after_the_first_carries_the_previous_segments_codes(service, monkeypatch):
    jobs = []
    prepare = service.prepare

    def spy(params):
        jobs.append(prepare(params))
        return jobs[-1]

    monkeypatch.setattr(service, "prepare", spy)

    async def main():
        t = Transport()
        run = asyncio.create_task(LiveSession(service, read_tts_request, None, limits()).run(t))
        t.put("start", request=start_request(min_chunk_length=0))
        t.put("text", text="First one. Second one. Third one. ")
        t.put("stop")
        await until(lambda: t.sent and t.sent[-1]["event"] == "finish")
        t.leave()
        await run
        assert t.sent[-1] == {"event": "finish", "reason": "stop"}

    asyncio.run(asyncio.wait_for(main(), 120))
    first, second, third = jobs
    assert first.request.previous is None
    for earlier, later in ((first, second), (second, third)):
        text, codes = later.request.previous
        assert text == earlier.segments[-1].text == earlier.request.text
        assert np.array_equal(codes, earlier.segments[-1].codes) and codes.shape[1] == FRAMES - 1
