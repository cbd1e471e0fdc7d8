"""OpenAI clients that discover voices: Open WebUI's calls replayed as its audio router makes them (the voice and
model listings without a key, then speech with it), OpenAI's voice names, and `instructions`."""

from __future__ import annotations

import httpx
import numpy as np
import pytest

from shoal.service import OPENAI_VOICES
from shoal.testing import Server

from support import noise_clip, pyav_decode

KEY = "discovery-test-key-0123456789"
AUTH = {"authorization": f"Bearer {KEY}"}
#: What an Open WebUI admin may put in its TTS "OpenAI params" (merged into every speech payload): a seed, so that
#: the audio can be compared, and a short budget.
WEBUI_PARAMS = {"seed": 5, "max_new_tokens": 10}


@pytest.fixture(scope="module")
def webui_server(tmp_path_factory, tiny_checkpoint):
    """A key, public discovery, `nova` mapped to the saved voice `narrator`, and a saved voice named `echo`."""
    env = {"SHOAL_PUBLIC_DISCOVERY": "true", "SHOAL_VOICE_MAP": "nova=narrator"}
    with Server(tiny_checkpoint, tmp_path_factory.mktemp("webui"), "--api-key", KEY, "--no-ui", env=env) as srv:
        srv.start()
        with srv.client(headers=AUTH) as c:
            for voice_id, seed in (("narrator", 21), ("echo", 22)):
                r = c.post("/v1/references/add", data={"id": voice_id, "text": "What the clip says."},
                           files={"audio": ("a.wav", noise_clip(1.5, seed), "audio/wav")})
                assert r.status_code == 200, r.text
        yield srv


@pytest.fixture(scope="module")
def locked_server(tmp_path_factory):
    """A key and the default (no public discovery); the bundled piper voice is enough."""
    with Server(None, tmp_path_factory.mktemp("locked"), "--api-key", KEY, "--no-ui") as srv:
        yield srv.start()


def webui_voices(base: str) -> dict[str, str]:
    """Open WebUI's voice discovery: GET {base}/audio/voices with no auth header, read as id -> name."""
    r = httpx.get(f"{base}/audio/voices", timeout=60)
    r.raise_for_status()
    return {voice["id"]: voice["name"] for voice in r.json()["voices"]}


def webui_models(base: str) -> list[dict]:
    r = httpx.get(f"{base}/audio/models", timeout=60)
    r.raise_for_status()
    return r.json().get("models", [])


def webui_speech(base: str, voice: str, model: str, text: str) -> httpx.Response:
    """Open WebUI's speech call: the browser's {input, voice}, the admin's model and params, the key as Bearer."""
    payload = {"input": text, "voice": voice, "model": model, **WEBUI_PARAMS}
    return httpx.post(f"{base}/audio/speech", json=payload, timeout=120,
                      headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})


def decoded(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    audio, _ = pyav_decode(response.content)
    assert audio.shape[1] > 0
    return audio.mean(axis=0)


def speech(server: Server, **body) -> np.ndarray:
    with server.client(headers=AUTH) as c:
        return decoded(c.post("/v1/audio/speech", json={**WEBUI_PARAMS, **body}))


def test_open_webui_lists_voices_and_models_and_speaks_in_the_picked_voice(webui_server):
    base = webui_server.url + "/v1"
    voices = webui_voices(base)
    assert voices == {"default": "default", "echo": "echo", "narrator": "narrator"}
    assert {m["id"] for m in webui_models(base)} == {"s1", "piper"}
    text = "Open WebUI reads this aloud."
    picked = decoded(webui_speech(base, "narrator", "tts-1", text))
    assert np.array_equal(picked, speech(webui_server, input=text, voice="narrator"))
    assert not np.array_equal(picked, speech(webui_server, input=text, voice="default"))


def test_open_webui_with_no_voice_picked_falls_back_to_alloy_and_gets_the_default_voice(webui_server):
    text = "No voice was picked."
    alloy = decoded(webui_speech(webui_server.url + "/v1", "alloy", "", text))
    assert np.array_equal(alloy, speech(webui_server, input=text, voice="default"))


@pytest.mark.parametrize("name", OPENAI_VOICES)
def test_every_openai_voice_name_speaks(webui_server, name):
    r = webui_speech(webui_server.url + "/v1", name, "tts-1", "Hi.")
    assert r.status_code == 200, r.text


def test_the_voice_map_and_a_saved_voice_of_the_same_name(webui_server):
    text = "Mapped voices."
    assert np.array_equal(speech(webui_server, input=text, voice="nova"),
                          speech(webui_server, input=text, voice="narrator"))  # SHOAL_VOICE_MAP=nova=narrator
    echo = speech(webui_server, input=text, voice="echo")  # the saved voice `echo`, not the default voice
    assert not np.array_equal(echo, speech(webui_server, input=text, voice="default"))
    assert not np.array_equal(echo, speech(webui_server, input=text, voice="narrator"))


def test_public_discovery_never_opens_speech_or_voice_changes(webui_server):
    with httpx.Client(base_url=webui_server.url, timeout=60) as c:
        assert c.post("/v1/audio/speech", json={"input": "Hi."}).status_code == 401
        assert c.get("/v1/models").status_code == 401
        assert c.get("/v1/references/list").status_code == 401
        assert c.post("/v1/references/delete", json={"reference_id": "echo"}).status_code == 401
        assert c.get("/model").status_code == 401
    assert "echo" in webui_voices(webui_server.url + "/v1")


def test_without_public_discovery_the_listings_need_the_key(locked_server):
    with httpx.Client(base_url=locked_server.url, timeout=60) as c:
        for path in ("/v1/audio/voices", "/v1/audio/models"):
            r = c.get(path)
            assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized", r.text
            assert c.get(path, headers=AUTH).status_code == 200
        voices = c.get("/v1/audio/voices", headers=AUTH).json()
    assert voices["model"] == "piper" and voices["voices"] == [{"id": "default", "name": "default", "builtin": True}]


def test_instructions_on_s1_are_named_as_ignored(webui_server):
    with webui_server.client(headers=AUTH) as c:
        plain = c.post("/v1/audio/speech", json={"input": "Hi.", **WEBUI_PARAMS})
        told = c.post("/v1/audio/speech", json={"input": "Hi.", "instructions": "Speak softly.", **WEBUI_PARAMS})
    assert told.status_code == 200 and told.headers["x-shoal-ignored-fields"] == "instructions"
    assert "x-shoal-ignored-fields" not in plain.headers
    assert np.array_equal(decoded(told), decoded(plain))
