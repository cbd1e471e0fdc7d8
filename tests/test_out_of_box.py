"""The README's first command on a machine with no checkpoint: a server that speaks with the bundled voice."""

from __future__ import annotations

import io

import httpx
import openai
import soundfile as sf

from shoal.testing import Server

from asr import transcribe, word_error_rate
from support import shoal

SENTENCE = "The quick brown fox jumps over the lazy dog."


def test_serve_without_checkpoint_speaks_intelligibly_with_the_bundled_voice(tmp_path):
    srv = Server(None, tmp_path).start()
    try:
        health = httpx.get(srv.url + "/v1/health").json()
        assert health["default_model"] == "piper" and health["models"] == ["piper"]
        assert "no Fish Speech checkpoint was found" in health["notice"] and "shoal download" in health["notice"]
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused")
        speech = client.audio.speech.create(model="tts-1", voice="default", input=SENTENCE, response_format="wav",
                                            extra_body={"seed": 0})
        audio, rate = sf.read(io.BytesIO(speech.content), dtype="float32")
        heard = transcribe(audio, rate)
        assert word_error_rate(SENTENCE, heard) < 0.5, heard
        log = srv.log.read_text()
        assert "no Fish Speech checkpoint was found" in log  # said once, loudly, at start-up
    finally:
        srv.stop()


def test_print_config_shows_values_and_their_sources(tmp_path):
    (tmp_path / ".env").write_text("SHOAL_PORT=9123\nSHOAL_QUEUE_SIZE=3\n")
    proc = shoal("serve", "--print-config", "--host", "0.0.0.0", cwd=tmp_path, drop=("SHOAL_",), timeout=120,
                 env={"SHOAL_QUEUE_SIZE": "5", "SHOAL_LOG_LEVEL": "WARNING", "SHOAL_PROT": "1"})
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line.split() for line in proc.stdout.splitlines()}
    assert rows["host"][1:] == ["0.0.0.0", "(cli)"]
    assert rows["queue_size"][1:] == ["5", "(env)"]          # env beats .env
    assert rows["port"][1:] == ["9123", "(.env)"]            # .env beats the default
    assert rows["log_level"][1:] == ["warning", "(env)"]
    assert rows["request_timeout"][-1] == "(default)"
    assert "SHOAL_PROT" in proc.stderr and "SHOAL_PORT" in proc.stderr  # the typo is called out


def test_invalid_setting_is_one_line(tmp_path):
    proc = shoal("serve", "--print-config", cwd=tmp_path, drop=("SHOAL_",), env={"SHOAL_PORT": "eighty"},
                 timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "SHOAL_PORT" in proc.stderr and "Traceback" not in proc.stderr
