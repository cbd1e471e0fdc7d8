"""Hostile voice uploads to /v1/references/add: audio that lies, is not audio, or expands enormously;
transcripts missing, empty or wrong; multipart bodies that are malformed. A refused upload leaves the disk
exactly as it was; the few odd-but-real clips that may become voices must be whole, valid voices."""

from __future__ import annotations

import json
import os

import pytest

from hostile_checks import (ANCHOR, API_KEY, check_alive, check_error, check_valid_voice, no_leaks, snapshot,
                            stray_files)
from hostile_media import good_wav, hostile_clips

OK_CLIP = good_wav()
CLIPS = hostile_clips()


def add(server, *, id="upload_case", text="Some words.", audio=OK_CLIP, filename="clip.wav", headers=None,
        **kwargs):
    data = {k: v for k, v in (("id", id), ("text", text)) if v is not None}
    files = {"audio": (filename, audio, "audio/wav")} if audio is not None else None
    return server.http.post("/v1/references/add", data=data, files=files, headers=headers, **kwargs)


def settle(server, before: dict, r, voice_id: str | None, may_succeed: bool) -> None:
    """After one upload: refused -> nothing on disk changed; accepted (only where allowed) -> one whole valid
    voice, which is then deleted through the API, after which the disk is as before."""
    if r.status_code < 300:
        assert may_succeed, f"accepted: {r.text}"
        body = r.json()
        no_leaks(server, r.text)
        assert body["success"] is True and body["reference_id"] == voice_id, body
        check_valid_voice(server, voice_id)
        assert voice_id in server.http.get("/v1/references/list").json()["reference_ids"]
        d = server.http.post("/v1/references/delete", json={"reference_id": voice_id})
        assert d.status_code == 200, d.text
    else:
        check_error(server, r)
    assert snapshot(*server.watched) == before
    assert not stray_files(server), stray_files(server)
    check_alive(server)


@pytest.mark.parametrize("name", CLIPS)
def test_hostile_audio(open_server, name):
    data, may_succeed = CLIPS[name]
    voice_id = "clip_" + name.replace("-", "_")
    before = snapshot(*open_server.watched)
    r = add(open_server, id=voice_id, audio=data, filename=f"{name}.wav")
    settle(open_server, before, r, voice_id, may_succeed)
    if not may_succeed:
        assert r.status_code == 400, r.text


TRANSCRIPTS = {
    "missing": (None, False), "empty": ("", False), "space": (" ", False), "whitespace": ("\t\n\r \u3000", False),
    "limit-plus-one": ("a" * 2001, False), "10k": ("word " * 2000, False), "1mb": ("x" * 1_000_000, False),
    "mismatched": ("This is not at all what the clip says.", True), "one-char": ("a", True),
    "nul": ("a\x00b", True), "control": ("\x01\x1b[31m", True), "rtl": ("مرحبا بالعالم", True),
    "emoji": ("😀🎉", True), "cjk": ("你好，世界。", True), "html": ("<script>alert(1)</script>", True),
    "json-in-text": ('{"id": "../../x"}', True), "path-in-text": ("../../../etc/passwd", True),
}


@pytest.mark.parametrize("name", TRANSCRIPTS)
def test_hostile_transcripts(open_server, name):
    text, may_succeed = TRANSCRIPTS[name]
    voice_id = "text_" + name.replace("-", "_")
    before = snapshot(*open_server.watched)
    r = add(open_server, id=voice_id, text=text)
    settle(open_server, before, r, voice_id, may_succeed)
    if may_succeed:
        assert r.status_code == 200, r.text


def multipart(*parts: tuple[str, bytes, str | None], boundary: str = "hostile") -> tuple[bytes, str]:
    """A hand-built multipart body from (name, value, filename) parts."""
    out = b""
    for name, value, filename in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n".encode()
        out += b"Content-Type: audio/wav\r\n" if filename else b""
        out += b"\r\n" + value + b"\r\n"
    return out + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


FULL = [("id", b"mp_case", None), ("text", b"Some words.", None), ("audio", OK_CLIP, "clip.wav")]

# name -> (body, content type, whether the upload may succeed as voice mp_case)
MULTIPART = {
    "no-id": multipart(*FULL[1:]), "no-text": multipart(FULL[0], FULL[2]), "no-audio": multipart(*FULL[:2]),
    "audio-as-field": multipart(*FULL[:2], ("audio", b"UklGRg==", None)),
    "text-as-file": multipart(FULL[0], ("text", b"Some words.", "t.txt"), FULL[2]),
    "id-as-file": multipart(("id", b"mp_case", "id.txt"), *FULL[1:]),
    "empty-filename": multipart(*FULL[:2], ("audio", OK_CLIP, "")),
    "empty-body": (b"", "multipart/form-data; boundary=hostile"),
    "no-boundary": (multipart(*FULL)[0], "multipart/form-data"),
    "wrong-boundary": (multipart(*FULL)[0], "multipart/form-data; boundary=other"),
    "garbage": (b"garbage " * 100, "multipart/form-data; boundary=hostile"),
    "unterminated": (multipart(*FULL)[0][:-40], "multipart/form-data; boundary=hostile"),
    "no-closing-delimiter": (multipart(*FULL)[0][:-12], "multipart/form-data; boundary=hostile"),
    "1500-fields": multipart(*[(f"f{i}", b"v", None) for i in range(1500)], *FULL),
    "1500-files": multipart(*[(f"f{i}", b"v", "f.bin") for i in range(1500)], *FULL),
    "2mb-field": multipart(FULL[0], ("text", b"a" * (2 << 20), None), FULL[2]),
    "invalid-utf8-id": multipart(("id", b"\xff\xfe", None), *FULL[1:]),
    "nul-in-id": multipart(("id", b"mp\x00case", None), *FULL[1:]),
    # Not UTF-8: read with replacement characters, a transcript like any other.
    "surrogate-bytes-in-text": (multipart(FULL[0], ("text", b"\xed\xa0\x80 words", None), FULL[2]), True),
    "json-body": (json.dumps({"id": "mp_case", "text": "Some words.", "audio": "UklGRg=="}).encode(),
                  "application/json"),
    "urlencoded": (b"id=mp_case&text=hi&audio=UklGRg%3D%3D", "application/x-www-form-urlencoded"),
    "msgpack": (b"\x83\xa2id\xa7mp_case\xa4text\xa2hi\xa5audio\xc4\x04RIFF", "application/msgpack"),
    "text-plain": (b"id=mp_case", "text/plain"),
    "no-content-type": (multipart(*FULL)[0], None),
    "traversal-filename": (multipart(*FULL[:2], ("audio", OK_CLIP, "../../../../../tmp/hostile-evil.wav")), True),
    "absolute-filename": (multipart(*FULL[:2], ("audio", OK_CLIP, "/tmp/hostile-evil-abs.wav")), True),
    "nul-filename": (multipart(*FULL[:2], ("audio", OK_CLIP, "a\x00.wav")), True),
    "duplicate-id": (multipart(("id", b"../../x", None), *FULL), True),
    "duplicate-audio": multipart(*FULL, ("audio", b"not audio", "b.wav")),
}
MAY_SUCCEED = {name for name, value in MULTIPART.items() if value[1] is True}
MULTIPART = {name: (value[0] if value[1] is True else value) for name, value in MULTIPART.items()}


@pytest.mark.parametrize("name", MULTIPART)
def test_hostile_multipart(open_server, name):
    body, ctype = MULTIPART[name]
    before = snapshot(*open_server.watched)
    headers = {"content-type": ctype} if ctype else {}
    r = open_server.http.post("/v1/references/add", content=body, headers=headers)
    settle(open_server, before, r, "mp_case", name in MAY_SUCCEED)
    for path in ("/tmp/hostile-evil.wav", "/tmp/hostile-evil-abs.wav", open_server.root / "x"):
        assert not os.path.lexists(path)


def test_existing_voice_is_409_and_untouched(open_server):
    before = snapshot(*open_server.watched)
    r = add(open_server, id=ANCHOR, audio=good_wav(3.0), text="Replacement.")
    check_error(open_server, r, {409})
    assert snapshot(*open_server.watched) == before
    check_alive(open_server)


def test_upload_over_the_default_limit_is_413(open_server):
    """20 MiB is the default voice clip limit; the body (32 MiB) is not what refuses it."""
    before = snapshot(*open_server.watched)
    r = add(open_server, id="too_big", audio=b"RIFF" + bytes(21 << 20))
    check_error(open_server, r, {413})
    assert snapshot(*open_server.watched) == before
    check_alive(open_server)


@pytest.mark.parametrize("size", [64 * 1024 + 1, 200 * 1024])
def test_upload_over_a_lowered_limit_is_413(key_server, size):
    before = snapshot(*key_server.watched)
    r = add(key_server, id="too_big", audio=b"RIFF" + bytes(size), headers={"authorization": f"Bearer {API_KEY}"})
    check_error(key_server, r, {413})
    assert "limit" in r.json()["error"]["message"]
    assert snapshot(*key_server.watched) == before
    check_alive(key_server)


def test_a_voice_longer_than_the_limit_is_refused_before_decoding(key_server):
    """SHOAL_MAX_VOICE_SECONDS=5 there: 6 s of 1 kHz audio fits the 64 KiB upload limit."""
    before = snapshot(*key_server.watched)
    r = add(key_server, id="long", audio=good_wav(6.0, rate=1000), headers={"authorization": f"Bearer {API_KEY}"})
    err = check_error(key_server, r, {400})
    assert "seconds" in err["message"]
    assert snapshot(*key_server.watched) == before
    check_alive(key_server)
