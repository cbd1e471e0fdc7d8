"""S1 and S2-Pro side by side in one `shoal serve` (`--checkpoint S1 --extra-checkpoint S2`): each served under its
Fish name by every API, a saved voice of two clips speaking a two-speaker S2 text, and both models at once."""

from __future__ import annotations

import io
import threading
import time

import msgpack
import numpy as np
import pytest
import soundfile as sf

from shoal.testing import Server

from support import noise_clip

FAST = {"seed": 3, "max_new_tokens": 8}
TWO_SPEAKERS = "<|speaker:0|>Hello there, how are you? <|speaker:1|>I'm fine, thanks [laughing]."


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_checkpoint, s2_fixture_dir):
    with Server(tiny_checkpoint, tmp_path_factory.mktemp("s2"), "--extra-checkpoint", str(s2_fixture_dir)) as srv:
        yield srv.start()


def httpx_get(url: str):
    """GET `url`, or None while nothing answers."""
    import httpx

    try:
        return httpx.get(url, timeout=2)
    except httpx.HTTPError:
        return None


def fish_tts(server, body: dict, model: str | None) -> "httpx.Response":  # noqa: F821
    headers = {"content-type": "application/msgpack", **({"model": model} if model else {})}
    with server.client() as c:
        return c.post("/v1/tts", content=msgpack.packb({"format": "wav", "streaming": False, **FAST, **body}),
                      headers=headers)


def test_both_models_are_listed_under_their_fish_names(server, tiny_checkpoint, s2_fixture_dir):
    with server.client() as c:
        models = {m["id"]: m for m in c.get("/v1/models").json()["data"]}
        health = c.get("/v1/health").json()
    assert set(models) == {"s1", "s2-pro", "piper"}
    assert models["s2-pro"]["checkpoint"] == str(s2_fixture_dir) and models["s1"]["checkpoint"] == str(
        tiny_checkpoint)
    assert health["default_model"] == "s1" and models["s1"]["default"]  # the --checkpoint one


@pytest.mark.parametrize("header, spoke", [("s2-pro", "s2-pro"), ("s2.1-pro", "s2-pro"), ("drama-3", "s2-pro"),
                                           ("s1", "s1"), ("speech-1.6", "s1"), ("fish", "s1"), (None, "s1")])
def test_the_fish_model_header_picks_s2_pro(server, header, spoke):
    r = fish_tts(server, {"text": "Hello from the header."}, header)
    assert r.status_code == 200, r.text
    assert r.headers["x-shoal-model"] == spoke
    audio, rate = sf.read(io.BytesIO(r.content))
    assert rate == 44100 and 0 < len(audio) <= FAST["max_new_tokens"] * 2048


def test_the_openai_model_field_picks_s2_pro(server):
    with server.client() as c:
        r = c.post("/v1/audio/speech", json={"model": "s2-pro", "input": "Hello [whisper] quietly.",
                                             "response_format": "wav", **FAST})
    assert r.status_code == 200, r.text
    assert r.headers["x-shoal-model"] == "s2-pro"
    assert len(sf.read(io.BytesIO(r.content))[0]) > 0


def test_a_voice_of_two_clips_speaks_a_two_speaker_s2_text(server):
    """The voice's clips are the speakers in order; the same seed gives the same audio twice."""
    files = [("voices", (f"clip{n}.wav", noise_clip(1.5, n), "audio/wav")) for n in range(2)]
    with server.client() as c:
        r = c.post("/model", data={"title": "Two speakers", "texts": ["First speaker.", "Second speaker."]},
                   files=files)
        assert r.status_code == 200, r.text
        voice = r.json()["_id"]
    first = fish_tts(server, {"text": TWO_SPEAKERS, "reference_id": voice}, "s2-pro")
    again = fish_tts(server, {"text": TWO_SPEAKERS, "reference_id": voice}, "s2-pro")
    assert first.status_code == 200, first.text
    assert first.headers["x-shoal-model"] == "s2-pro" and first.content == again.content


def test_both_models_at_once_give_what_each_gives_alone(server):
    """Two engines in one process, each with its own thread and batch: a seeded request's audio does not depend
    on the other model working beside it."""
    bodies = {"s1": {"text": "The first model speaks."}, "s2-pro": {"text": "<|speaker:0|>The second one, too."}}
    alone = {model: fish_tts(server, body, model).content for model, body in bodies.items()}
    together: dict[str, bytes] = {}

    def run(model):
        together[model] = fish_tts(server, bodies[model], model).content

    threads = [threading.Thread(target=run, args=(m,)) for m in bodies]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone
    assert not np.array_equal(*(sf.read(io.BytesIO(alone[m]))[0][:100] for m in bodies))  # two models really


def test_the_metrics_model_label_is_the_engine_that_spoke(server):
    """README, Metrics: `model` is s1, s2-pro or piper, whatever name the request used ("fish" maps to s1)."""
    from prometheus_client.parser import text_string_to_metric_families

    def spoken() -> dict[str, float]:
        text = httpx_get(server.url + "/metrics").text
        return {s.labels["model"]: s.value for f in text_string_to_metric_families(text) for s in f.samples
                if s.name == "shoal_speech_requests_total" and s.labels["outcome"] == "ok"}

    before = spoken()
    for header in ("fish", "s2-pro", "piper"):
        assert fish_tts(server, {"text": "Counted by the engine that spoke."}, header).status_code == 200
    after = spoken()
    assert {m: after[m] - before.get(m, 0.0) for m in after} == {"s1": 1, "s2-pro": 1, "piper": 1}


def test_a_checkpoint_per_model_only(tmp_path, tiny_checkpoint):
    """Two S1 checkpoints would share one name: loading fails, saying why, and the server says so."""
    with Server(tiny_checkpoint, tmp_path, "--extra-checkpoint", str(tiny_checkpoint)) as srv:
        srv.spawn()
        deadline = time.monotonic() + 120
        while (r := httpx_get(srv.url + "/v1/health")) is None or r.status_code != 503 or \
                r.json()["status"] != "error":
            assert time.monotonic() < deadline, srv.log.read_text()[-2000:]
            time.sleep(0.2)
    assert "both s1 checkpoints" in r.json()["error"]



def live_segments(server, carry: bool) -> dict[int, bytes]:
    """Two sentences over /v1/tts/live to S2-Pro: each segment's PCM audio, by the events' `segment` index."""
    from support import live_receive, live_send, live_socket

    start = {"text": "", "format": "pcm", "min_chunk_length": 0, "condition_on_previous_chunks": carry, **FAST}
    audio: dict[int, bytes] = {}
    with live_socket(server.url, headers={"model": "s2-pro"}) as ws:
        live_send(ws, "start", request=start)
        live_send(ws, "text", text="<|speaker:0|>The first sentence. ")
        live_send(ws, "flush")
        live_send(ws, "text", text="<|speaker:0|>And the second one.")
        live_send(ws, "stop")
        while (event := live_receive(ws))["event"] == "audio":
            audio[event["segment"]] = audio.get(event["segment"], b"") + event["audio"]
    assert event == {"event": "finish", "reason": "stop"}
    return audio


def test_the_live_socket_speaks_s2_pro_and_carries_the_conversation(server):
    """Each live segment after the first is an S2 conversation turn after the one before: with
    condition_on_previous_chunks the second segment's audio depends on the first, without it not; the first is
    the same either way, and a replay is identical."""
    carried, again, alone = live_segments(server, True), live_segments(server, True), live_segments(server, False)
    assert sorted(carried) == [0, 1] and carried == again
    assert carried[0] == alone[0] and carried[1] != alone[1]


def test_text_before_the_first_speaker_tag_is_a_400(server):
    r = fish_tts(server, {"text": "Untagged first. <|speaker:0|>Then a turn."}, "s2-pro")
    assert r.status_code == 400 and "before the first <|speaker:N|> tag" in r.json()["error"]["message"]
    assert fish_tts(server, {"text": "Untagged first. <|speaker:0|>Then a turn."}, "s1").status_code == 200


@pytest.mark.parametrize("text, tagged", [("Hello there.", "[whisper softly] Hello there."),
                                          ("<|speaker:0|>Hello there.", "<|speaker:0|>[whisper softly] Hello there.")])
def test_openai_instructions_become_a_leading_inline_tag_on_s2_pro(server, text, tagged):
    with server.client() as c:
        told = c.post("/v1/audio/speech", json={"model": "s2-pro", "input": text, "instructions": "whisper softly",
                                                "response_format": "wav", **FAST})
        spelled = c.post("/v1/audio/speech", json={"model": "s2-pro", "input": tagged, "response_format": "wav",
                                                   **FAST})
        plain = c.post("/v1/audio/speech", json={"model": "s2-pro", "input": text, "response_format": "wav", **FAST})
        bad = c.post("/v1/audio/speech", json={"model": "s2-pro", "input": text, "instructions": "a] [b", **FAST})
    assert told.status_code == spelled.status_code == 200, told.text
    assert "x-shoal-ignored-fields" not in told.headers
    assert told.content == spelled.content and told.content != plain.content
    assert bad.status_code == 400 and "square brackets" in bad.json()["error"]["message"]
