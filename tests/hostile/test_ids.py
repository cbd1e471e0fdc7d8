"""Hostile voice ids everywhere an id goes: /v1/references/add, reference_id of /v1/tts, voice of
/v1/audio/speech, /v1/references/delete and both sides of /v1/references/update. Each is refused with a 4xx,
nothing is written anywhere (no folder outside voices/, none inside it), and the saved voice `anchor` is
left exactly as it was."""

from __future__ import annotations

import json
import os

import pytest

from hostile_checks import ANCHOR, check_alive, check_error, snapshot, stray_files
from hostile_media import good_wav

CLIP = good_wav()

HOSTILE_IDS = {
    "dotdot": "..", "dot": ".", "parent-file": "../x", "parent-parent": "../../x", "deep-parent": "../" * 20 + "tmp",
    "etc-passwd": "/etc/passwd", "slash": "/", "inner-slash": "a/b", "backslash": "a\\b", "parent-backslash": "..\\x",
    "url-encoded-parent": "..%2fx", "double-encoded": "..%252fx", "nul": "a\x00b", "nul-only": "\x00",
    "trailing-nul": "anchor\x00", "cyrillic-a": "\u0430nchor", "fullwidth": "ａｎｃｈｏｒ", "kelvin-sign": "\u212anchor",
    "dotless-i": "\u0131d", "arabic-digits": "\u0661\u0662\u0663", "zero-width": "anc\u200bhor",
    "rtl-override": "\u202eanchor", "combining": "anchor\u0301", "trailing-newline": "anchor\n",
    "leading-space": " anchor", "trailing-space": "anchor ", "tab": "an\tchor", "65-chars": "x" * 65,
    "10k-chars": "v" * 10_000, "empty": "", "tilde": "~root", "dollar": "$HOME", "colon": "a:b", "star": "*",
    "question": "a?b", "quote": "a'b\"c", "semicolon": "a;rm -rf", "hash": "#x", "percent": "%00",
    "emoji": "😀", "windows-drive": "C:\\x", "unc": "\\\\server\\share",
}
# Ids a JSON body carries but a multipart form cannot (lone surrogates are not UTF-8).
JSON_ONLY = {"lone-surrogate": "an\ud800chor"}
ALL_IDS = {**HOSTILE_IDS, **JSON_ONLY}


def settled(server, before: dict) -> None:
    assert snapshot(*server.watched) == before, "a hostile id changed files on disk"
    assert not stray_files(server), stray_files(server)
    for path in (server.root / "x", server.root.parent / "x", server.root / "tmp"):
        assert not os.path.lexists(path)
    check_alive(server)


def post_json(server, path: str, body: dict):
    return server.http.post(path, content=json.dumps(body).encode(), headers={"content-type": "application/json"})


@pytest.mark.parametrize("name", HOSTILE_IDS)
def test_add(open_server, name):
    before = snapshot(*open_server.watched)
    r = open_server.http.post("/v1/references/add", data={"id": HOSTILE_IDS[name], "text": "Some words."},
                              files={"audio": ("clip.wav", CLIP, "audio/wav")})
    check_error(open_server, r, {400})
    settled(open_server, before)


@pytest.mark.parametrize("name", ALL_IDS)
def test_tts_reference_id(open_server, name):
    before = snapshot(*open_server.watched)
    r = post_json(open_server, "/v1/tts", {"text": "Hi.", "reference_id": ALL_IDS[name], "max_new_tokens": 4})
    if ALL_IDS[name] == "":  # no voice named: the default voice, real audio
        assert r.status_code == 200 and r.content[:4] == b"RIFF"
    else:
        err = check_error(open_server, r, {400})
        assert "unknown voice" in err["message"] or "reference_id" in err["message"], err
    settled(open_server, before)


@pytest.mark.parametrize("name", ALL_IDS)
def test_speech_voice(open_server, name):
    before = snapshot(*open_server.watched)
    r = post_json(open_server, "/v1/audio/speech", {"input": "Hi.", "voice": ALL_IDS[name], "max_new_tokens": 4,
                                                    "response_format": "pcm"})
    if ALL_IDS[name] == "":
        assert r.status_code == 200 and len(r.content) > 0
    else:
        err = check_error(open_server, r, {400})
        assert "unknown voice" in err["message"] and "anchor" in err["message"], err  # lists the valid ones
    settled(open_server, before)


@pytest.mark.parametrize("name", ALL_IDS)
def test_delete(open_server, name):
    before = snapshot(*open_server.watched)
    r = post_json(open_server, "/v1/references/delete", {"reference_id": ALL_IDS[name]})
    check_error(open_server, r, {400, 404})
    settled(open_server, before)


@pytest.mark.parametrize("side", ["old", "new"])
@pytest.mark.parametrize("name", ALL_IDS)
def test_update(open_server, name, side):
    """Renaming a hostile id to a fine one, and the saved voice to a hostile one: both refused, anchor kept."""
    before = snapshot(*open_server.watched)
    body = ({"old_reference_id": ALL_IDS[name], "new_reference_id": "renamed"} if side == "old"
            else {"old_reference_id": ANCHOR, "new_reference_id": ALL_IDS[name]})
    r = post_json(open_server, "/v1/references/update", body)
    check_error(open_server, r, {400, 404})
    settled(open_server, before)
    assert open_server.http.get("/v1/references/list").json()["reference_ids"] == [ANCHOR]


def test_voice_ids_of_the_wrong_type(open_server):
    before = snapshot(*open_server.watched)
    for path, body in [("/v1/references/delete", {"reference_id": 5}), ("/v1/references/delete", {}),
                       ("/v1/references/delete", {"reference_id": None}),
                       ("/v1/references/delete", {"reference_id": ANCHOR, "extra": 1}),
                       ("/v1/references/update", {"old_reference_id": ANCHOR}),
                       ("/v1/references/update", {"old_reference_id": ANCHOR, "new_reference_id": ["x"]})]:
        check_error(open_server, post_json(open_server, path, body), {400})
    settled(open_server, before)


def test_delete_and_update_of_unknown_voices_are_404(open_server):
    before = snapshot(*open_server.watched)
    check_error(open_server, post_json(open_server, "/v1/references/delete", {"reference_id": "ghost"}), {404})
    check_error(open_server, post_json(open_server, "/v1/references/update",
                                       {"old_reference_id": "ghost", "new_reference_id": "spirit"}), {404})
    settled(open_server, before)
