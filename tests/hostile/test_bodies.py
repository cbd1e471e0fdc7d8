"""Hostile request bodies for /v1/tts (JSON and msgpack) and /v1/audio/speech: malformed encodings, wrong
content types, every field out of range or of the wrong type, NaN and infinities, and texts nobody should
send. Each case is a 4xx in the one JSON error shape, or (where the input is odd but acceptable) real audio;
either way the server lives on."""

from __future__ import annotations

import base64
import json
import math

import httpx
import msgpack
import pytest

from hostile_checks import check_alive, check_audio, check_error
from hostile_media import good_wav, hostile_clips

NAN, INF = math.nan, math.inf
JSON, MSGPACK = "application/json", "application/msgpack"
CLIP = good_wav(1.5)
CLIP_B64 = base64.b64encode(CLIP).decode()
REF = {"audio": CLIP_B64, "text": "A tone."}
FISH_BASE = {"text": "Hostile input.", "max_new_tokens": 4, "seed": 1}
SPEECH_BASE = {"input": "Hostile input.", "max_new_tokens": 4, "seed": 1, "response_format": "pcm"}


def send(server, path: str, content: bytes, ctype: str | None) -> httpx.Response:
    headers = {"content-type": ctype} if ctype is not None else {}
    return server.http.post(path, content=content, headers=headers)


def encode(body, ctype: str) -> bytes:
    """JSON as Python writes it (NaN and Infinity literals included), or msgpack with raw bytes for audio."""
    if ctype == JSON:
        return json.dumps(body).encode()
    if isinstance(body, dict) and isinstance(body.get("references"), list):  # clips as bytes, as Fish's client
        body = {**body, "references": [{**r, "audio": CLIP} if isinstance(r, dict) and r.get("audio") == CLIP_B64
                                       else r for r in body["references"]]}
    # Lone surrogates go out as their (invalid) UTF-8 bytes, as a client with surrogatepass would send them.
    return msgpack.packb(body, unicode_errors="surrogatepass")


def outcome(server, r: httpx.Response, *, ok: bool, fmt: str = "wav", statuses=None) -> None:
    """`ok`: the input is acceptable, so a 2xx is allowed (and must then be real audio); a 4xx always is."""
    if ok and r.status_code < 300:
        check_audio(server, r, fmt)
    else:
        check_error(server, r, statuses)
    check_alive(server)


# -- /v1/tts: malformed bodies and content types ---------------------------------------------------------------

MALFORMED_JSON = {
    "empty": b"", "space": b" ", "open-brace": b"{", "close-brace": b"}", "single-quotes": b"{'text': 'hi'}",
    "trailing-comma": b'{"text": "hi",}', "trailing-garbage": b'{"text": "hi"} x', "two-objects": b'{}{}',
    "null": b"null", "true": b"true", "number": b"42", "string": b'"text"', "array": b"[]",
    "array-of-request": json.dumps([FISH_BASE]).encode(), "unterminated-string": b'{"text": "aaaaaaaa',
    "bad-escape": b'{"text": "\\x41"}', "invalid-utf8": b'{"text": "\xff\xfe"}', "nul-bytes": bytes(16),
    "utf16-garbage": "{\"text\": \"hi\"".encode("utf-16"), "huge-exponent": b'{"text": "hi", "top_p": 1e999}',
    "5000-digit-int": b'{"text": "hi", "max_new_tokens": ' + b"9" * 5000 + b"}",
    "deep-array": b"[" * 100_000 + b"]" * 100_000,
    "deep-object": b'{"a":' * 20_000 + b"1" + b"}" * 20_000,
    "deep-in-field": b'{"text": "hi", "references": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
    "nul-escape-in-text": b'{"text": "a\\u0000b", "max_new_tokens": 4}',
    "lone-surrogate-in-text": b'{"text": "\\ud800", "max_new_tokens": 4}',
    "nan-literal": b'{"text": "hi", "temperature": NaN}',
    "infinity-literal": b'{"text": "hi", "top_p": Infinity}',
    "minus-infinity-literal": b'{"text": "hi", "repetition_penalty": -Infinity}',
}

MALFORMED_MSGPACK = {
    "empty": b"", "never-used-byte": b"\xc1", "array-missing-item": b"\x91", "map-missing-value": b"\x81\xa4text",
    "array32-4g": b"\xdd\xff\xff\xff\xff", "str32-4g": b"\xdb\xff\xff\xff\xff", "bin32-4g": b"\xc6\xff\xff\xff\xff",
    "map32-4g": b"\xdf\xff\xff\xff\xff", "int-key": b"\x81\x01\x02", "nil-key": b"\x81\xc0\xc0",
    "ext-type": msgpack.packb({"text": msgpack.ExtType(5, b"x")}), "timestamp": b"\x81\xa4text\xd6\xff\x00\x00\x00\x01",
    "deep": b"\x91" * 100_000 + b"\xc0", "deep-map": b"\x81\xa1a" * 50_000 + b"\xc0",
    "array": msgpack.packb([FISH_BASE]), "string": msgpack.packb("text"), "nil": b"\xc0",
    "invalid-utf8-str": b"\x81\xa4text\xa2\xff\xfe", "json-body": json.dumps(FISH_BASE).encode(),
    "nan-float": msgpack.packb({**FISH_BASE, "top_p": NAN}),
    "inf-float32": b"\x83\xa4text\xa2hi\xaamax_new_tokens\x04\xabtemperature\xca\x7f\x80\x00\x00",
}


@pytest.mark.parametrize("name", MALFORMED_JSON)
def test_tts_malformed_json(open_server, name):
    r = send(open_server, "/v1/tts", MALFORMED_JSON[name], JSON)
    check_error(open_server, r, {400})
    check_alive(open_server)


@pytest.mark.parametrize("name", MALFORMED_MSGPACK)
def test_tts_malformed_msgpack(open_server, name):
    r = send(open_server, "/v1/tts", MALFORMED_MSGPACK[name], MSGPACK)
    check_error(open_server, r, {400})
    check_alive(open_server)


VOICE_ROUTE_BODIES = {**{f"json-{k}": (v, JSON) for k, v in MALFORMED_JSON.items()
                         if k.startswith(("deep", "nan", "infinity", "invalid", "empty", "array", "5000"))},
                      **{f"msgpack-{k}": (v, MSGPACK) for k, v in MALFORMED_MSGPACK.items()
                         if k.startswith(("deep", "str32", "ext", "int-key", "invalid", "empty"))}}


@pytest.mark.parametrize("path", ["/v1/references/delete", "/v1/references/update"])
@pytest.mark.parametrize("name", VOICE_ROUTE_BODIES)
def test_voice_routes_malformed_bodies(open_server, path, name):
    body, ctype = VOICE_ROUTE_BODIES[name]
    check_error(open_server, send(open_server, path, body, ctype), {400})
    check_alive(open_server)
    assert open_server.http.get("/v1/references/list").json()["reference_ids"] == ["anchor"]


@pytest.mark.parametrize("ctype, body, ok", [
    (None, json.dumps(FISH_BASE).encode(), False),
    ("", json.dumps(FISH_BASE).encode(), False),
    ("text/plain", json.dumps(FISH_BASE).encode(), False),
    ("application/x-www-form-urlencoded", b"text=hi&max_new_tokens=4", False),
    ("multipart/form-data; boundary=x", b"--x\r\nContent-Disposition: form-data; name=\"text\"\r\n\r\nhi\r\n--x--\r\n",
     False),
    ("application/xml", b"<text>hi</text>", False),
    ("application/jsonx", json.dumps(FISH_BASE).encode(), False),
    ("audio/wav", CLIP, False),
    ("application/octet-stream", msgpack.packb(FISH_BASE), False),
    ("application/msgpack", json.dumps(FISH_BASE).encode(), False),  # '{' is a msgpack integer
    ("application/json", msgpack.packb(FISH_BASE), False),
    ("APPLICATION/JSON", json.dumps(FISH_BASE).encode(), True),
    ("application/json; charset=utf-8", json.dumps(FISH_BASE).encode(), True),
    ("application/x-msgpack", msgpack.packb(FISH_BASE), True),
], ids=lambda v: repr(v)[:40] if isinstance(v, str) or v is None else None)
def test_tts_content_types(open_server, ctype, body, ok):
    r = send(open_server, "/v1/tts", body, ctype)
    outcome(open_server, r, ok=ok, statuses={400, 415})
    if not ok and ctype not in ("application/msgpack", "application/json"):
        assert r.status_code == 415


# -- /v1/tts: every field out of range or of the wrong type ---------------------------------------------------

FISH_INVALID = [
    ("text", None), ("text", 5), ("text", 1.5), ("text", True), ("text", ["hi"]), ("text", {"t": "hi"}),
    ("chunk_length", -1), ("chunk_length", 1), ("chunk_length", 99), ("chunk_length", 301),
    ("chunk_length", 2**63), ("chunk_length", "long"), ("chunk_length", None), ("chunk_length", 150.5),
    ("chunk_length", []),
    ("format", "exe"), ("format", ""), ("format", "WAV"), ("format", "ogg"), ("format", None), ("format", 5),
    ("format", ["wav"]), ("format", "wav\x00"), ("format", "../wav"),
    ("references", "clip"), ("references", 5), ("references", {}), ("references", [1]), ("references", [{}]),
    ("references", [{"audio": CLIP_B64}]), ("references", [{"text": "A tone."}]),
    ("references", [{"audio": "!!not base64!!", "text": "x"}]), ("references", [{**REF, "extra": 1}]),
    ("references", [{"audio": None, "text": "x"}]), ("references", [{"audio": CLIP_B64, "text": 5}]),
    ("references", [{"audio": CLIP_B64, "text": ""}]), ("references", [{"audio": CLIP_B64, "text": "   "}]),
    ("references", [{"audio": "", "text": "x"}]), ("references", [{"audio": "aGVsbG8=", "text": "x"}]),
    ("references", [REF] * 9),
    ("reference_id", 5), ("reference_id", []), ("reference_id", {}), ("reference_id", True),
    ("reference_id", "nobody"),
    ("seed", "abc"), ("seed", 1.5), ("seed", []), ("seed", {}),
    ("use_memory_cache", "maybe"), ("use_memory_cache", True), ("use_memory_cache", 1),
    ("use_memory_cache", None), ("use_memory_cache", "ON"), ("use_memory_cache", ""),
    ("normalize", "maybe"), ("normalize", 2), ("normalize", None), ("normalize", []),
    ("streaming", "maybe"), ("streaming", 2), ("streaming", {}),
    ("max_new_tokens", -1), ("max_new_tokens", 1), ("max_new_tokens", 8193), ("max_new_tokens", 2**64),
    ("max_new_tokens", "many"), ("max_new_tokens", 2.5), ("max_new_tokens", None), ("max_new_tokens", [4]),
    ("max_new_tokens", True),
    ("top_p", 0), ("top_p", 0.09), ("top_p", 1.01), ("top_p", -1), ("top_p", "high"), ("top_p", None),
    ("top_p", 1e308),
    ("repetition_penalty", 0.89), ("repetition_penalty", 2.0), ("repetition_penalty", 2.01), ("repetition_penalty", 0),
    ("repetition_penalty", "x"), ("repetition_penalty", None),
    ("temperature", 0), ("temperature", 0.09), ("temperature", 1.01), ("temperature", -0.5),
    ("temperature", "hot"), ("temperature", None),
    # the Fish Audio API's fields
    ("sample_rate", 0), ("sample_rate", -8000), ("sample_rate", 10**6), ("sample_rate", "fast"),
    ("sample_rate", 22050.5), ("mp3_bitrate", 100), ("mp3_bitrate", "128"), ("mp3_bitrate", -1),
    ("opus_bitrate", 7), ("opus_bitrate", 25000), ("opus_bitrate", "auto"), ("opus_bitrate", -1),
    ("latency", "fast"), ("latency", ""), ("latency", None), ("latency", 1),
    ("prosody", "fast"), ("prosody", []), ("prosody", {"speed": 3}), ("prosody", {"speed": 0.1}),
    ("prosody", {"volume": 30}), ("prosody", {"volume": -21}), ("prosody", {"speed": "x"}),
    ("prosody", {"normalize_loudness": "maybe"}),
    ("min_chunk_length", -1), ("min_chunk_length", 101), ("min_chunk_length", "x"),
    ("early_stop_threshold", 2), ("early_stop_threshold", -0.1), ("early_stop_threshold", "x"),
    ("condition_on_previous_chunks", "x"), ("condition_on_previous_chunks", None),
]

# Fields shoal does not know: accepted, ignored, and named in the X-Shoal-Ignored-Fields header.
FISH_IGNORED = [
    ("wibble", 1, "wibble"), ("__proto__", {"admin": True}, "__proto__"), ("Text", "hi", "Text"),
    ("input", "hi", "input"), ("prosody", {"speed": 1.0, "pitch": 2}, "prosody.pitch"),
]

# Odd but acceptable: pydantic's lax coercions as Fish's own server has them, seeds of any size, every format.
FISH_ACCEPTABLE = [
    ("max_new_tokens", "4"), ("seed", "7"), ("seed", -1), ("seed", 0), ("seed", 2**64), ("seed", 10**100),
    ("seed", None), ("streaming", "true"), ("normalize", 0), ("chunk_length", 0), ("chunk_length", 100),
    ("chunk_length", 300), ("reference_id", ""), ("reference_id", None), ("reference_id", "default"),
    ("reference_id", "anchor"), ("use_memory_cache", "on"), ("references", []), ("references", [REF]),
    ("references", [{"audio": CLIP_B64, "text": "words that are not what the clip says at all"}]),
    ("references", [{"audio": CLIP_B64, "text": "a\x00b"}]), ("references", [{"audio": CLIP_B64, "text": "\ud800"}]),
    ("references", [{"audio": CLIP_B64, "text": "مرحبا 你好 😀"}]), ("references", [REF] * 8),
    ("top_p", 0.1), ("top_p", 1), ("temperature", 1.0), ("repetition_penalty", 1.99),
    ("streaming", None), ("prosody", {}), ("prosody", None), ("sample_rate", 8000), ("sample_rate", None),
    ("mp3_bitrate", 64), ("opus_bitrate", -1000), ("opus_bitrate", 24000), ("latency", "low"),
    ("min_chunk_length", 0), ("min_chunk_length", 100), ("early_stop_threshold", 0),
    ("condition_on_previous_chunks", False), ("prosody", {"speed": 2, "volume": -20, "normalize_loudness": True}),
    ("prosody", {"speed": None, "volume": None, "normalize_loudness": None}),
]

FLOATS_AND_INTS = ["top_p", "repetition_penalty", "temperature", "seed", "max_new_tokens", "chunk_length"]


def field_id(value) -> str:
    text = repr(value)
    return text if len(text) <= 30 else text[:27] + "..."


def encodable(value, ctype: str) -> bool:
    """msgpack integers stop at 64 bits; bigger ones are JSON-only cases."""
    return ctype == JSON or not isinstance(value, int) or -(2**63) <= value < 2**64


FISH_INVALID_CASES = [(f, v, t) for f, v in FISH_INVALID for t in (JSON, MSGPACK) if encodable(v, t)]


@pytest.mark.parametrize("field, value, ctype", FISH_INVALID_CASES,
                         ids=[f"{f}={field_id(v)}-{t.split('/')[1]}" for f, v, t in FISH_INVALID_CASES])
def test_tts_invalid_fields(open_server, field, value, ctype):
    r = send(open_server, "/v1/tts", encode({**FISH_BASE, field: value}, ctype), ctype)
    err = check_error(open_server, r, {400})
    check_alive(open_server)
    if field not in ("references", "reference_id", "max_new_tokens"):
        assert field in err["message"], err  # names the field it refuses


@pytest.mark.parametrize("field, value", FISH_ACCEPTABLE, ids=[f"{f}={field_id(v)}" for f, v in FISH_ACCEPTABLE])
def test_tts_acceptable_fields(open_server, field, value):
    r = send(open_server, "/v1/tts", encode({**FISH_BASE, field: value}, JSON), JSON)
    outcome(open_server, r, ok=True)
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("field, value, listed", FISH_IGNORED, ids=[f for f, _, _ in FISH_IGNORED])
def test_tts_unknown_fields_are_listed(open_server, field, value, listed):
    r = send(open_server, "/v1/tts", encode({**FISH_BASE, field: value}, MSGPACK), MSGPACK)
    outcome(open_server, r, ok=True)
    assert r.status_code == 200, r.text
    assert r.headers["x-shoal-ignored-fields"] == listed


# Inline clips have no shortest length (saved voices do), so short but decodable audio may be spoken from.
INLINE_MAY_SUCCEED = {"too-short", "8-channel-too-short", "truncated-data", "hours-claimed-by-header",
                      "riff-size-lies", "384-khz-too-short"}


@pytest.mark.parametrize("name", hostile_clips())
def test_tts_hostile_inline_references(open_server, name):
    """The upload suite's clips as inline references (msgpack, raw bytes): refused with a 400, or, for real
    audio, spoken from. The hour-long ones are refused at the voice duration limit before any encoding."""
    data, acceptable = hostile_clips()[name]
    body = {**FISH_BASE, "references": [{"audio": data, "text": "A tone."}], "use_memory_cache": "on"}
    r = send(open_server, "/v1/tts", msgpack.packb(body), MSGPACK)
    ok = acceptable or name in INLINE_MAY_SUCCEED
    outcome(open_server, r, ok=ok, statuses={400})
    if not ok:
        assert r.status_code == 400


@pytest.mark.parametrize("ctype", [JSON, MSGPACK])
@pytest.mark.parametrize("value", [NAN, INF, -INF], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("field", FLOATS_AND_INTS)
def test_tts_non_finite_numbers(open_server, field, value, ctype):
    r = send(open_server, "/v1/tts", encode({**FISH_BASE, field: value}, ctype), ctype)
    err = check_error(open_server, r, {400})
    assert field in err["message"]
    check_alive(open_server)


@pytest.mark.parametrize("fmt", ["wav", "pcm", "mp3", "opus", "aac", "flac"])
@pytest.mark.parametrize("streaming", [False, True])
def test_tts_every_format_is_real_audio(open_server, fmt, streaming):
    r = send(open_server, "/v1/tts", encode({**FISH_BASE, "format": fmt, "streaming": streaming}, MSGPACK), MSGPACK)
    outcome(open_server, r, ok=True, fmt=fmt)
    assert r.status_code == 200


# -- /v1/audio/speech -------------------------------------------------------------------------------------------

SPEECH_INVALID = [
    ("model", 5), ("model", []), ("model", {}), ("model", "gpt-9"), ("model", "x" * 10_000), ("model", "fish\x00"),
    ("model", "FISH"),
    ("input", None), ("input", 5), ("input", ["hi"]), ("input", {}),
    ("voice", 5), ("voice", []), ("voice", {}), ("voice", "nobody"), ("voice", True),
    ("response_format", "ogg"), ("response_format", ""), ("response_format", "MP3"), ("response_format", None),
    ("response_format", 5), ("response_format", "wav; rm -rf /"), ("response_format", "../../etc/passwd"),
    ("speed", 0), ("speed", 0.24), ("speed", 4.01), ("speed", -1), ("speed", "fast"), ("speed", None),
    ("speed", 1e308),
    ("stream_format", "json"), ("stream_format", ""), ("stream_format", None), ("stream_format", 5),
    ("stream_format", "SSE"),
    ("instructions", 5), ("instructions", []), ("instructions", "x" * 501),
    ("seed", "abc"), ("seed", 1.5), ("seed", []),
    ("temperature", 0), ("temperature", 1.5), ("temperature", "hot"), ("temperature", None),
    ("top_p", 0.05), ("top_p", 1.5), ("top_p", "x"),
    ("repetition_penalty", 0.5), ("repetition_penalty", 2), ("repetition_penalty", 2.5),
    ("repetition_penalty", "x"),
    ("max_new_tokens", -1), ("max_new_tokens", 1), ("max_new_tokens", 8193), ("max_new_tokens", "many"),
    ("max_new_tokens", 2.5), ("max_new_tokens", None),
    ("chunk_length", -1), ("chunk_length", 1001), ("chunk_length", "x"), ("chunk_length", 2.5),
    ("wibble", 1), ("references", []), ("reference_id", "anchor"), ("text", "hi"), ("format", "wav"),
    ("streaming", True),
]

SPEECH_ACCEPTABLE = [
    ("model", None), ("model", ""), ("model", "tts-1"), ("model", "tts-1-hd"), ("model", "gpt-4o-mini-tts"),
    ("model", "fish"), ("model", "piper"), ("voice", None), ("voice", "default"), ("voice", "anchor"),
    ("speed", 0.25), ("speed", 4.0), ("speed", 1), ("instructions", ""), ("instructions", None),
    ("instructions", "be cheerful"), ("voice", "alloy"), ("voice", "cedar"),
    ("chunk_length", 0), ("chunk_length", 1), ("chunk_length", 1000), ("seed", 2**64), ("seed", -(2**70)),
]

SPEECH_FLOATS = ["speed", "temperature", "top_p", "repetition_penalty", "seed", "max_new_tokens", "chunk_length"]


def speech(server, body, ctype: str | None = JSON, raw: bytes | None = None) -> httpx.Response:
    return send(server, "/v1/audio/speech", raw if raw is not None else json.dumps(body).encode(), ctype)


@pytest.mark.parametrize("field, value", SPEECH_INVALID, ids=[f"{f}={field_id(v)}" for f, v in SPEECH_INVALID])
def test_speech_invalid_fields(open_server, field, value):
    r = speech(open_server, {**SPEECH_BASE, field: value})
    err = check_error(open_server, r, {400})
    check_alive(open_server)
    if field not in ("model", "voice", "max_new_tokens"):
        assert field in err["message"], err


@pytest.mark.parametrize("field, value", SPEECH_ACCEPTABLE,
                         ids=[f"{f}={field_id(v)}" for f, v in SPEECH_ACCEPTABLE])
def test_speech_acceptable_fields(open_server, field, value):
    r = speech(open_server, {**SPEECH_BASE, field: value})
    outcome(open_server, r, ok=True, fmt="pcm")
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("value", [NAN, INF, -INF], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("field", SPEECH_FLOATS)
def test_speech_non_finite_numbers(open_server, field, value):
    r = speech(open_server, {**SPEECH_BASE, field: value})
    err = check_error(open_server, r, {400})
    assert field in err["message"]
    check_alive(open_server)


@pytest.mark.parametrize("fmt", ["wav", "pcm", "mp3", "opus", "aac", "flac"])
@pytest.mark.parametrize("stream_format", ["audio", "sse"])
def test_speech_every_format_is_real_audio(open_server, fmt, stream_format):
    r = speech(open_server, {**SPEECH_BASE, "response_format": fmt, "stream_format": stream_format})
    outcome(open_server, r, ok=True, fmt=fmt)
    assert r.status_code == 200


@pytest.mark.parametrize("ctype, raw, ok", [
    (None, json.dumps(SPEECH_BASE).encode(), False),
    ("text/plain", json.dumps(SPEECH_BASE).encode(), False),
    ("application/x-www-form-urlencoded", json.dumps(SPEECH_BASE).encode(), False),  # what `curl -d` sends
    ("multipart/form-data; boundary=x", b"--x\r\nContent-Disposition: form-data; name=\"input\"\r\n\r\nhi\r\n--x--\r\n",
     False),
    ("application/msgpack", msgpack.packb(SPEECH_BASE), False),
    ("application/xml", b"<input>hi</input>", False),
    ("application/json", b"", False), ("application/json", b"{", False), ("application/json", b"null", False),
    ("application/json", b"[]", False), ("application/json", b'"input"', False),
    ("application/json", b'{"input": "hi",}', False), ("application/json", b'{"input": "\xff"}', False),
    ("application/json", b"[" * 100_000 + b"]" * 100_000, False),
    ("application/json", b'{"input": "hi", "voice": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", False),
    ("application/json", msgpack.packb(SPEECH_BASE), False),
    ("application/json", b'{"input": "a\\u0000b"}', False), ("application/json", b'{"input": "\\udfff"}', False),
    ("application/json; charset=utf-8", json.dumps(SPEECH_BASE).encode(), True),
    ("application/vnd.api+json", json.dumps(SPEECH_BASE).encode(), True),
], ids=lambda v: repr(v)[:40] if isinstance(v, (str, bytes)) or v is None else None)
def test_speech_bodies_and_content_types(open_server, ctype, raw, ok):
    r = speech(open_server, None, ctype, raw)
    outcome(open_server, r, ok=ok, fmt="pcm", statuses={400, 415})
    if not ok and ctype is not None and not ctype.startswith("application/json"):
        assert r.status_code == 415, r.text


# -- texts ----------------------------------------------------------------------------------------------------

# name -> (text, whether a 2xx is acceptable)
TEXTS = {
    "empty": ("", False), "space": (" ", False), "whitespace": (" \t\n\r\x0b\x0c\x1c\x1d\x85 ", False),
    "unicode-spaces": ("\u00a0\u2003\u3000\u2028", False),
    "nul": ("a\x00b", False), "lone-surrogate": ("ab\ud800cd", False), "low-surrogate": ("\udfff", False),
    "zero-width": ("\u200b\u200c\u200d\u2060", True), "control": ("\x01\x02\x07\x1b[31m\x7f", True),
    "bidi-override": ("\u202eevil.exe\u202c", True), "rtl-arabic": ("مرحبا", True), "rtl-hebrew": ("שלום", True),
    "emoji": ("😀🎉👍🏽👨‍👩‍👧", True), "cjk": ("你好。こんにちは。", True), "combining": ("e" + "\u0301" * 300, True),
    "bom": ("\ufeffhi", True), "noncharacters": ("\uffff\ufffe\U0010ffff", True),
    "private-use": ("\ue000\uf8ff\U000f0000", True), "mixed-scripts": ("Hi مرحبا 你好 😀", True),
    "one-long-word": ("a" * 600, True), "punctuation-only": ("?!.,;:" * 50, True),
    "html": ("<script>alert(1)</script>", True), "format-strings": ("%s %n {0} ${HOME} {{7*7}}", True),
    "limit-plus-one": ("a" * 5001, False), "1mb-ascii": ("x" * 1_000_000, False),
    "1mb-cjk": ("你" * 350_000, False),
}


@pytest.mark.parametrize("route", ["tts-json", "tts-msgpack", "speech-fish", "speech-piper"])
@pytest.mark.parametrize("name", TEXTS)
def test_hostile_texts(open_server, name, route):
    """Default limits: the 1 MB texts travel whole (well under the 32 MiB body limit) and are refused for their
    length; odd scripts and symbols may be spoken, and then the body is real audio."""
    text, ok = TEXTS[name]
    if route.startswith("tts"):
        ctype = JSON if route == "tts-json" else MSGPACK
        r = send(open_server, "/v1/tts", encode({**FISH_BASE, "text": text}, ctype), ctype)
        outcome(open_server, r, ok=ok)
    else:
        model = route.split("-")[1]
        r = speech(open_server, {**SPEECH_BASE, "input": text, "model": model})
        outcome(open_server, r, ok=ok, fmt="pcm")
    if len(text) > 5000:
        assert "limit" in r.json()["error"]["message"]
