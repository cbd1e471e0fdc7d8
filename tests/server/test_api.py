"""The HTTP APIs against a real server process: Fish's, OpenAI's, saved voices, errors, concurrency."""

from __future__ import annotations

import base64
import io
import json
import threading
import time

import httpx
import msgpack
import numpy as np
import openai
import pytest
import soundfile as sf

from support import load_golden, load_request, other_codec_layout, pyav_decode, tree, with_codec_layout

FIXTURE_TEXT = "This is a short reference recording."


# -- basics ------------------------------------------------------------------------------------------------------

def test_health_reports_models_and_counters(server):
    body = httpx.get(server.url + "/v1/health").json()
    assert body["status"] == "ok" and body["default_model"] == "s1"
    assert set(body["models"]) == {"s1", "piper"} and body["notice"] is None
    assert "codec_encodes" in body["counters"]
    assert body["threads"]["torch_intra_op"] >= 1 and body["threads"]["omp_wait_policy"] == "PASSIVE"


def test_models_and_voices_listings(server):
    with server.client() as c:
        models = c.get("/v1/models").json()
        assert models["object"] == "list" and {m["id"] for m in models["data"]} == {"s1", "piper"}
        voices = c.get("/v1/audio/voices").json()
        assert voices["model"] == "s1"
        assert {"id": "default", "name": "default", "builtin": True} in voices["voices"]
        models = c.get("/v1/audio/models").json()["models"]
        assert {m["id"] for m in models} == {"s1", "piper"} and all("sample_rate" in m for m in models)


# -- OpenAI ------------------------------------------------------------------------------------------------------

def test_openai_sdk_wav(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    speech = client.audio.speech.create(model="tts-1", voice="default", input="Hello from the SDK.",
                                        response_format="wav", extra_body={"seed": 1, "max_new_tokens": 12})
    audio, rate = sf.read(io.BytesIO(speech.content))
    assert rate == 44100 and len(audio) == 11 * 2048 or len(audio) % 2048 == 0


def test_openai_sdk_streaming_mp3(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    buf = io.BytesIO()
    with client.audio.speech.with_streaming_response.create(
            model="fish", voice="default", input="Streaming mp3.", response_format="mp3",
            extra_body={"seed": 2, "max_new_tokens": 12}) as response:
        for chunk in response.iter_bytes():
            buf.write(chunk)
    audio, rate = pyav_decode(buf.getvalue())
    audio = audio.mean(axis=0)
    assert rate == 44100 and abs(len(audio) - 11 * 2048) < 4096


def test_openai_same_seed_same_audio(server):
    with server.client() as c:
        body = {"input": "Deterministic.", "voice": "default", "response_format": "pcm", "seed": 9,
                "max_new_tokens": 10}
        a, b = c.post("/v1/audio/speech", json=body).content, c.post("/v1/audio/speech", json=body).content
    assert a == b and len(a) == 9 * 2048 * 2


def test_openai_sse_events(server):
    with server.client() as c:
        r = c.post("/v1/audio/speech", json={"input": "Events.", "voice": "default", "response_format": "pcm",
                                              "stream_format": "sse", "seed": 1, "max_new_tokens": 10})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1]["type"] == "speech.audio.done" and "usage" in events[-1]
    pcm = b"".join(base64.b64decode(e["audio"]) for e in events if e["type"] == "speech.audio.delta")
    assert len(pcm) == 9 * 2048 * 2


def test_piper_model_is_available(server):
    with server.client() as c:
        r = c.post("/v1/audio/speech", json={"model": "piper", "input": "Hello there.", "response_format": "wav"})
    assert r.status_code == 200
    audio, rate = sf.read(io.BytesIO(r.content))
    assert rate == 22050 and len(audio) > 0.3 * rate


@pytest.mark.parametrize("body, status, needle", [
    ({"input": "x", "voice": "nobody"}, 400, "valid voices: default"),
    ({"input": "x", "model": "gpt-9"}, 400, "valid models"),
    ({"input": ""}, 400, "text is empty"),
    ({"input": "x" * 100_000}, 400, "limit"),
    ({"input": "x", "speed": 9}, 400, "speed"),
    ({"input": "x", "response_format": "ogg"}, 400, "response_format"),
    ({"input": "x", "temperature": "hot"}, 400, "temperature"),
    ({"input": "x", "wibble": 1}, 400, "wibble"),
    ({"input": "x", "instructions": "x" * 501}, 400, "instructions"),
    ({"input": "x", "model": "piper", "voice": "nobody"}, 400, "unknown voice"),
])
def test_openai_bad_requests_are_json_4xx(server, body, status, needle):
    with server.client() as c:
        r = c.post("/v1/audio/speech", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"] and set(err) == {"message", "type", "code"}
    assert "Traceback" not in r.text


# -- Fish --------------------------------------------------------------------------------------------------------

def fish_request(fixture_dir, **fields) -> dict:
    """A ServeTTSRequest as fish's tools/api_client.py builds it (all fields, msgpack-ready)."""
    data = {"text": "The quick brown fox.", "references": [], "reference_id": None, "format": "wav",
            "max_new_tokens": 12, "chunk_length": 200, "top_p": 0.8, "repetition_penalty": 1.1,
            "temperature": 0.8, "streaming": False, "use_memory_cache": "off", "seed": 3, "normalize": True}
    data.update(fields)
    return data


def test_fish_msgpack_with_inline_reference(server, fixture_dir):
    ref = {"audio": (fixture_dir / "reference.wav").read_bytes(), "text": FIXTURE_TEXT}
    body = msgpack.packb(fish_request(fixture_dir, references=[ref]))
    with server.client() as c:
        r = c.post("/v1/tts", content=body, headers={"content-type": "application/msgpack"})
    assert r.status_code == 200, r.text
    audio, rate = sf.read(io.BytesIO(r.content))
    assert rate == 44100 and len(audio) % 2048 == 0 and len(audio) > 0


def test_fish_streaming_starts_with_a_wav_header(server, fixture_dir):
    body = msgpack.packb(fish_request(fixture_dir, streaming=True))
    with server.client() as c, c.stream("POST", "/v1/tts", content=body,
                                        headers={"content-type": "application/msgpack"}) as r:
        assert r.status_code == 200
        data = b"".join(r.iter_bytes())
    assert data[:4] == b"RIFF" and data[8:12] == b"WAVE"
    audio, rate = sf.read(io.BytesIO(data))
    assert rate == 44100 and len(audio) == 11 * 2048


def test_fish_json_with_base64_reference(server, fixture_dir):
    ref = {"audio": base64.b64encode((fixture_dir / "reference.wav").read_bytes()).decode(), "text": FIXTURE_TEXT}
    with server.client() as c:
        r = c.post("/v1/tts", json=fish_request(fixture_dir, references=[ref], format="flac"))
    assert r.status_code == 200 and r.headers["content-type"] == "audio/flac"


@pytest.mark.parametrize("content, ctype, status, needle", [
    (b"{not json", "application/json", 400, "not valid JSON"),
    (b"\xc1\xc1\xc1", "application/msgpack", 400, "not valid msgpack"),
    (b"text=hi", "text/plain", 415, "application/json"),
    (b'{"text": "hi", "chunk_length": 50}', "application/json", 400, "chunk_length"),
    (b'{"text": "hi", "format": "exe"}', "application/json", 400, "format"),
    (b'{"text": "hi", "reference_id": "../x"}', "application/json", 400, "unknown voice"),
    (b'{"text": "hi", "top_p": NaN}', "application/json", 400, "top_p"),
    (b'[1, 2]', "application/json", 400, "object"),
])
def test_fish_bad_bodies(server, content, ctype, status, needle):
    with server.client() as c:
        r = c.post("/v1/tts", content=content, headers={"content-type": ctype})
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]["message"]


def test_wrong_method_is_json_405(server):
    with server.client() as c:
        r = c.get("/v1/tts")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


def test_oversized_body_is_413(server):
    with server.client() as c:
        r = c.post("/v1/tts", content=b"x" * (33 * 2**20), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"


# -- saved voices ------------------------------------------------------------------------------------------------

def test_saved_voice_survives_restart_and_runs_zero_encodes(make_server, fixture_dir):
    srv = make_server()
    clip = (fixture_dir / "reference.wav").read_bytes()
    with srv.client() as c:
        r = c.post("/v1/references/add", data={"id": "narrator", "text": FIXTURE_TEXT},
                   files={"audio": ("ref.wav", clip, "audio/wav")})
        assert r.status_code == 200 and r.json()["reference_id"] == "narrator", r.text
        assert c.get("/v1/references/list").json()["reference_ids"] == ["narrator"]
    srv.restart()
    with srv.client() as c:
        assert c.get("/v1/references/list").json()["reference_ids"] == ["narrator"]
        before = c.get("/v1/health").json()["counters"]["codec_encodes"]
        r1 = c.post("/v1/tts", json={"text": "Saved voice.", "reference_id": "narrator", "seed": 1,
                                     "max_new_tokens": 8})
        r2 = c.post("/v1/audio/speech", json={"input": "Saved voice.", "voice": "narrator",
                                              "response_format": "wav", "seed": 1, "max_new_tokens": 8})
        assert r1.status_code == 200 and r2.status_code == 200
        assert r1.content == r2.content  # same seed, same voice, same audio through both APIs
        after = c.get("/v1/health").json()["counters"]["codec_encodes"]
        assert before == after == 0
        assert "narrator" in [v["id"] for v in c.get("/v1/audio/voices").json()["voices"]]
        r = c.post("/v1/references/update", json={"old_reference_id": "narrator",
                                                  "new_reference_id": "host"})
        assert r.status_code == 200
        assert c.get("/v1/references/list").json()["reference_ids"] == ["host"]
        assert c.post("/v1/references/delete", json={"reference_id": "host"}).status_code == 200
        assert c.get("/v1/references/list").json()["reference_ids"] == []


@pytest.mark.parametrize("voice_id", ["../x", "..%2fx", "/etc/passwd", "a/b", "a\\b", "..", "é", "x" * 65, ""])
def test_hostile_voice_ids_write_nothing(server, fixture_dir, voice_id):
    data_dir = server.data_dir
    before = tree(data_dir)
    with server.client() as c:
        r = c.post("/v1/references/add", data={"id": voice_id, "text": "hello"},
                   files={"audio": ("a.wav", (fixture_dir / "reference.wav").read_bytes(), "audio/wav")})
    assert 400 <= r.status_code < 500 and "error" in r.json()
    assert tree(data_dir) == before
    assert not (data_dir.parent / "x").exists()


def test_non_audio_upload_is_400(server):
    with server.client() as c:
        r = c.post("/v1/references/add", data={"id": "fake", "text": "hello"},
                   files={"audio": ("a.wav", b"this is a text file renamed .wav" * 20, "audio/wav")})
    assert r.status_code == 400 and "decode" in r.json()["error"]["message"]


def test_unknown_voice_delete_is_404(server):
    with server.client() as c:
        r = c.post("/v1/references/delete", json={"reference_id": "ghost"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


# -- concurrency -------------------------------------------------------------------------------------------------

def test_health_answers_while_a_long_generation_runs(server):
    """The engine runs off the event loop: health keeps answering (a generous bound: not a benchmark)."""
    done = threading.Event()

    def long_request():
        with server.client() as c:
            c.post("/v1/audio/speech", json={"input": "A long one. " * 20, "voice": "default",
                                             "response_format": "pcm", "seed": 1, "max_new_tokens": 600,
                                             "chunk_length": 0})
        done.set()

    thread = threading.Thread(target=long_request)
    thread.start()
    time.sleep(0.5)
    worst = 0.0
    polled = 0
    while not done.is_set() and polled < 30:
        t0 = time.perf_counter()
        assert httpx.get(server.url + "/v1/health", timeout=5).status_code == 200
        worst = max(worst, time.perf_counter() - t0)
        polled += 1
        time.sleep(0.05)
    thread.join(120)
    assert polled >= 3, "generation finished too fast to observe"
    assert worst < 1.0


def test_disconnected_stream_frees_the_queue(server):
    with server.client() as c:
        with c.stream("POST", "/v1/audio/speech", json={"input": "Cut me off. " * 20, "voice": "default",
                                                         "response_format": "pcm", "seed": 1,
                                                         "max_new_tokens": 800, "chunk_length": 60}) as r:
            next(r.iter_bytes())
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if httpx.get(server.url + "/v1/health").json()["queue_depth"] == 0:
            return
        time.sleep(0.1)
    pytest.fail("queue depth did not return to 0 after the client went away")


def test_full_queue_is_429_with_retry_after(make_server):
    srv = make_server(env={"SHOAL_QUEUE_SIZE": "1"})
    statuses = []

    def call():
        with srv.client() as c:
            r = c.post("/v1/audio/speech", json={"input": "Busy busy. " * 10, "voice": "default",
                                                 "response_format": "pcm", "seed": 1, "max_new_tokens": 1500,
                                                 "chunk_length": 0})
            statuses.append((r.status_code, r.headers.get("retry-after")))

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert any(s == 200 for s, _ in statuses)
    assert any(s == 429 and ra is not None for s, ra in statuses), statuses


# -- auth --------------------------------------------------------------------------------------------------------

def test_api_key_is_required_and_compared(make_server):
    srv = make_server("--api-key", "s3cret")
    body = {"input": "Auth.", "voice": "default", "response_format": "pcm", "max_new_tokens": 4}
    with srv.client() as c:
        assert c.get("/v1/health").status_code == 200  # health stays open
        missing = c.post("/v1/audio/speech", json=body)
        wrong = c.post("/v1/audio/speech", json=body, headers={"Authorization": "Bearer nope"})
        right = c.post("/v1/audio/speech", json=body, headers={"Authorization": "Bearer s3cret"})
        listing = c.get("/v1/references/list")
    assert missing.status_code == wrong.status_code == listing.status_code == 401
    assert missing.json()["error"]["code"] == "unauthorized"
    assert right.status_code == 200
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="s3cret")
    assert client.audio.speech.create(model="tts-1", voice="default", input="Key.", response_format="pcm",
                                      extra_body={"max_new_tokens": 4}).content


def test_request_timeout_is_504_and_frees_the_queue(make_server):
    srv = make_server(env={"SHOAL_REQUEST_TIMEOUT": "0.5"})
    with srv.client() as c:
        # seed 7 runs ~450 frames (seconds) on this checkpoint before <|im_end|>
        r = c.post("/v1/audio/speech", json={"input": "Too slow. " * 20, "voice": "default",
                                             "response_format": "wav", "seed": 7, "max_new_tokens": 3000,
                                             "chunk_length": 0})
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout"
        deadline = time.monotonic() + 30
        while c.get("/v1/health").json()["queue_depth"] and time.monotonic() < deadline:
            time.sleep(0.1)
        assert c.get("/v1/health").json()["queue_depth"] == 0


@pytest.mark.parametrize("codec", ["as-written", "without-buffers"])
def test_fish_api_reproduces_the_golden_request(make_server, fixture_dir, tmp_path, codec):
    """Default settings through the HTTP API give the reference's audio for the same seed, also with the codec
    re-saved without its RoPE tables and masks (as fish-speech 2.x saves one)."""
    req = load_request(fixture_dir, "c")
    golden = load_golden(fixture_dir, req)["audio"]
    checkpoint = fixture_dir
    if codec == "without-buffers":
        checkpoint = with_codec_layout(fixture_dir, other_codec_layout("s1"), tmp_path / "ckpt")
    srv = make_server(checkpoint=checkpoint)
    ref = {"audio": (fixture_dir / req["reference"]).read_bytes(), "text": req["reference_text"]}
    body = {"text": req["text"], "references": [ref], "seed": req["seed"], "temperature": req["temperature"],
            "top_p": req["top_p"], "repetition_penalty": req["repetition_penalty"],
            "max_new_tokens": req["max_new_tokens"], "format": "wav"}
    with srv.client() as c:
        r = c.post("/v1/tts", content=msgpack.packb(body), headers={"content-type": "application/msgpack"})
    assert r.status_code == 200, r.text
    audio, rate = sf.read(io.BytesIO(r.content), dtype="float32")
    assert rate == 44100 and audio.shape == golden.shape
    np.testing.assert_allclose(audio, golden, atol=1 / 32768 + 1e-4)  # PCM16 quantisation


# -- the Fish Audio API's request on /v1/tts ---------------------------------------------------------------------

def fish_audio(server, headers=None, **fields) -> httpx.Response:
    """A /v1/tts request as the fishaudio SDK sends it (msgpack), with `fields` over a short fixed-seed body."""
    body = {"text": "The quick brown fox.", "max_new_tokens": 12, "seed": 3, "format": "wav", **fields}
    with server.client() as c:
        return c.post("/v1/tts", content=msgpack.packb(body),
                      headers={"content-type": "application/msgpack", **(headers or {})})


def rms(audio: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(audio, dtype=np.float64))))


@pytest.mark.parametrize("header, spoke", [(None, "s1"), ("s1", "s1"), ("fish", "s1"), ("s2-pro", "s1"),
                                           ("s2.1-pro", "s1"), ("speech-1.6", "s1"), ("drama-3", "s1"),
                                           ("piper", "piper")])
def test_model_header_picks_the_model_and_the_response_names_it(server, header, spoke):
    r = fish_audio(server, {"model": header} if header else None, streaming=False)
    assert r.status_code == 200, r.text
    assert r.headers["x-shoal-model"] == spoke


def test_unknown_model_header_is_a_400_listing_the_valid_names(server):
    r = fish_audio(server, {"model": "speech-9"})
    assert r.status_code == 400
    message = r.json()["error"]["message"]
    assert "speech-9" in message and all(name in message for name in ("s1", "piper", "s2-pro", "drama-3"))


def test_model_map_is_a_setting(make_server):
    srv = make_server(env={"SHOAL_MODEL_MAP": "s2-pro=piper,house-voice=s1,gone=s9"})
    assert fish_audio(srv, {"model": "s2-pro"}).headers["x-shoal-model"] == "piper"
    assert fish_audio(srv, {"model": "house-voice"}).headers["x-shoal-model"] == "s1"
    assert fish_audio(srv, {"model": "gone"}).headers["x-shoal-model"] == "s1"  # not served: the default
    assert fish_audio(srv, {"model": "drama-3"}).status_code == 400  # the map replaced the default one


def test_a_fish_audio_request_streams_by_default_and_fish_speech_s_does_not(server):
    streamed = fish_audio(server, {"model": "s1"})
    whole = fish_audio(server)
    explicit = fish_audio(server, {"model": "s1"}, streaming=False)
    assert streamed.content[40:44] == b"\xff\xff\xff\xff"  # a streamed WAV's data size: unknown
    assert whole.content[40:44] != b"\xff\xff\xff\xff" and explicit.content[40:44] != b"\xff\xff\xff\xff"
    assert streamed.content[44:] == whole.content[44:]


@pytest.mark.parametrize("fmt, rate", [("wav", 16000), ("pcm", 24000), ("flac", 8000), ("mp3", 32000),
                                       ("opus", 48000)])
def test_sample_rate_resamples_the_output(server, fmt, rate):
    r = fish_audio(server, format=fmt, sample_rate=rate, streaming=False)
    assert r.status_code == 200, r.text
    audio, decoded_rate = pyav_decode(r.content, fmt, rate)
    assert decoded_rate == rate
    native, _ = pyav_decode(fish_audio(server, format="wav", streaming=False).content)
    assert abs(audio.shape[1] / rate - native.shape[1] / 44100) < 0.03  # the same speech, at the new rate


def test_resampling_is_soxr_on_the_model_output(server):
    import soxr

    native, _ = pyav_decode(fish_audio(server, format="wav", streaming=False).content)
    resampled, _ = pyav_decode(fish_audio(server, format="wav", sample_rate=22050, streaming=False).content)
    expected = soxr.resample(native[0], 44100, 22050, quality="VHQ")
    assert resampled.shape[1] == len(expected)
    assert np.max(np.abs(resampled[0] - expected)) < 2 / 32768


def test_an_unsupported_rate_for_the_format_is_a_400_listing_the_rates(server):
    r = fish_audio(server, format="mp3", sample_rate=96000)
    assert r.status_code == 400
    assert "sample_rate" in r.json()["error"]["message"] and "44100" in r.json()["error"]["message"]


@pytest.mark.parametrize("fmt, field, low, high", [("mp3", "mp3_bitrate", 64, 192),
                                                   ("opus", "opus_bitrate", 24, 64),
                                                   ("opus", "opus_bitrate", 24000, 64000)])
def test_bitrates_change_the_encoding(server, fmt, field, low, high):
    body = dict(text="A longer sentence, so that the bitrate shows in the size of the file.", max_new_tokens=80,
                format=fmt, streaming=False)
    small = fish_audio(server, **body, **{field: low})
    large = fish_audio(server, **body, **{field: high})
    assert small.status_code == large.status_code == 200
    assert len(large.content) > 1.8 * len(small.content)


def test_opus_automatic_bitrate_is_accepted(server):
    assert fish_audio(server, format="opus", opus_bitrate=-1000, streaming=False).status_code == 200


@pytest.mark.parametrize("volume", [-6.0, -12.0])
def test_prosody_volume_is_a_gain_in_db(server, volume):
    plain, _ = pyav_decode(fish_audio(server, streaming=False).content)
    quiet, _ = pyav_decode(fish_audio(server, streaming=False, prosody={"volume": volume}).content)
    assert abs(20 * np.log10(rms(quiet) / rms(plain)) - volume) < 0.1


def test_prosody_normalize_loudness_brings_speech_to_minus_20_dbfs_then_volume_applies(server):
    def level(prosody) -> float:
        audio, _ = pyav_decode(fish_audio(server, streaming=False, max_new_tokens=40, prosody=prosody).content)
        blocks = audio[0, : len(audio[0]) // 882 * 882].reshape(-1, 882)  # 20 ms blocks, as the normaliser's
        voiced = blocks[np.sqrt(np.mean(blocks ** 2, axis=1)) > 10 ** (-50 / 20)]
        return 20 * np.log10(rms(voiced))

    assert abs(level({}) + 20) > 2  # the tiny model's own level is off the target
    for volume in (-6.0, 0.0):
        assert abs(level({"volume": volume, "normalize_loudness": True}) - (-20 + volume)) < 1.0, volume


def test_prosody_speed_changes_the_duration(server):
    plain, _ = pyav_decode(fish_audio(server, streaming=False).content)
    fast, _ = pyav_decode(fish_audio(server, streaming=False, prosody={"speed": 2.0}).content)
    assert abs(fast.shape[1] / plain.shape[1] - 0.5) < 0.05
