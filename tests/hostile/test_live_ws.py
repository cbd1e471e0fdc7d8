"""Hostile input on the live WebSocket, /v1/tts/live: frames that are not msgpack, msgpack that is not an event,
unknown events, events out of order, invalid start requests and text, messages and texts past the limits, and
handshakes without the API key. Each session ends with `finish` `error` (a message, no internals) and the close
code its case names; the server serves a normal session afterwards."""

from __future__ import annotations

import base64
import http.client
import math
import random
import re

import httpx
import msgpack
import pytest
from httpx_ws import WebSocketUpgradeError

from hostile_checks import API_KEY, check_alive, check_error, no_leaks

from support import live_close_code, live_receive, live_send, live_socket, live_until_finish

UNSUPPORTED, INVALID, POLICY, TOO_BIG = 1003, 1007, 1008, 1009
BASE = {"text": "", "max_new_tokens": 4, "seed": 1, "format": "pcm"}


def ev(**event) -> bytes:
    # Lone surrogates go out as their (invalid) UTF-8 bytes, as a careless client would send them.
    return msgpack.packb(event, unicode_errors="surrogatepass")


def start(**request) -> bytes:
    return ev(event="start", request={**BASE, **request})


START = start()
TEXT = ev(event="text", text="Hello there. ")
FLUSH = ev(event="flush")
STOP = ev(event="stop")
_random = random.Random(7)

CASES: dict[str, tuple[list[bytes | str], int]] = {}

# Text frames: events are binary msgpack
for name, frame in {"empty": "", "word": "hello", "json-start": '{"event": "start", "request": {}}',
                    "json-text": '{"event": "text", "text": "hi"}', "nul": "\x00", "snowmen": "☃" * 100,
                    "msgpack-as-text": START.decode("latin-1")}.items():
    CASES[f"text-frame-{name}"] = ([frame], UNSUPPORTED)
CASES["text-frame-after-start"] = ([START, "Hello there."], UNSUPPORTED)

# Not msgpack at all
for name, frame in {"empty": b"", "reserved-c1": b"\xc1", "two-reserved": b"\xc1\xc1",
                    "map-without-entries": b"\x81", "map-missing-value": b"\x81\xa5event",
                    "array32-truncated": b"\xdd\xff\xff\xff\xff", "str32-truncated": b"\xdb\xff\xff\xff\xff",
                    "bin-truncated": b"\xc4\x05ab", "array-truncated": b"\x92\x01",
                    "invalid-utf8-key": b"\x81\xa2\xff\xfe\x01", "invalid-utf8-event": b"\x81\xa5event\xa2\xff\xfe",
                    "deep-nesting": b"\x91" * 100_000 + b"\xc0", "timestamp-ext": b"\xd6\xff\x00\x00\x00\x00",
                    "wav-bytes": b"RIFF\x24\x00\x00\x00WAVEfmt "}.items():
    CASES[f"not-msgpack-{name}"] = ([frame], INVALID)
for n in range(10):
    CASES[f"not-msgpack-random-{n}"] = ([b"\xc1" + _random.randbytes(_random.randint(1, 256))], INVALID)

# msgpack, but not an event map
for name, value in {"zero": 0, "negative": -1, "float": 1.5, "nan": math.nan, "nil": None, "true": True,
                    "string": "start", "bytes": b"start", "empty-array": [], "array": ["start"],
                    "array-of-event": [{"event": "start"}]}.items():
    CASES[f"not-a-map-{name}"] = ([msgpack.packb(value)], INVALID)
for name, value in {"empty": {}, "nil-event": {"event": None}, "int-event": {"event": 1},
                    "bytes-event": {"event": b"start"}, "list-event": {"event": ["start"]},
                    "map-event": {"event": {"x": 1}}, "bool-event": {"event": True},
                    "capitalised-key": {"Event": "start"}, "type-key": {"type": "start"},
                    "int-key": {1: "start"}}.items():
    CASES[f"no-event-{name}"] = ([msgpack.packb(value)], INVALID)

# Unknown events
for name in ("", "START", "Start", "begin", "audio", "finish", "close", "text ", " text", "end", "ping",
             "x" * 1000, "stop\x00", "flush!", "😀"):
    CASES[f"unknown-event-{name[:20]!r}"] = ([ev(event=name)], INVALID)
CASES["unknown-event-after-start"] = ([START, ev(event="speak", text="hi")], INVALID)

# Out of order
CASES["text-before-start"] = ([TEXT], POLICY)
CASES["flush-before-start"] = ([FLUSH], POLICY)
CASES["stop-before-start"] = ([STOP], POLICY)
CASES["second-start"] = ([START, START], POLICY)
CASES["second-start-after-text"] = ([START, TEXT, start(format="wav")], POLICY)
CASES["text-after-stop"] = ([START, TEXT, STOP, TEXT], POLICY)
CASES["flush-after-stop"] = ([START, TEXT, STOP, FLUSH], POLICY)
CASES["stop-after-stop"] = ([START, TEXT, STOP, STOP], POLICY)
# A message is read up to the end of its first object (as /v1/tts reads a msgpack body): here a flush, too early
CASES["two-events-in-one-message"] = ([FLUSH + FLUSH], POLICY)
CASES["trailing-garbage"] = ([FLUSH + b"\xc1"], POLICY)

# Invalid start requests
CASES["start-without-request"] = ([ev(event="start")], INVALID)
for name, request in {"nil": None, "array": [], "string": "x", "int": 1}.items():
    CASES[f"start-request-{name}"] = ([ev(event="start", request=request)], INVALID)
for name, fields in {
    "format-ogg": {"format": "ogg"}, "format-int": {"format": 1}, "format-nil": {"format": None},
    "temperature-word": {"temperature": "hot"}, "temperature-zero": {"temperature": 0},
    "temperature-high": {"temperature": 5}, "temperature-nan": {"temperature": math.nan},
    "temperature-inf": {"temperature": math.inf}, "top-p-high": {"top_p": 2},
    "repetition-penalty-high": {"repetition_penalty": 9}, "max-new-tokens-negative": {"max_new_tokens": -3},
    "chunk-length-short": {"chunk_length": 5}, "chunk-length-long": {"chunk_length": 1000},
    "latency-fast": {"latency": "fast"}, "sample-rate-one": {"sample_rate": 1},
    "sample-rate-word": {"sample_rate": "x"},
    "opus-bitrate-odd": {"format": "opus", "opus_bitrate": 7}, "mp3-bitrate-odd": {"format": "mp3", "mp3_bitrate": 1},
    "prosody-speed": {"prosody": {"speed": 9}}, "prosody-volume": {"prosody": {"volume": 99}},
    "prosody-string": {"prosody": "fast"}, "min-chunk-negative": {"min_chunk_length": -1},
    "min-chunk-huge": {"min_chunk_length": 1000}, "references-string": {"references": "x"},
    "reference-audio-int": {"references": [{"audio": 1, "text": "x"}]},
    "reference-without-audio": {"references": [{"text": "x"}]},
    "too-many-references": {"references": [{"audio": b"x", "text": "x"}] * 9},
    "unknown-voice": {"reference_id": "nobody"}, "traversal-voice": {"reference_id": "../../etc/passwd"},
    "seed-word": {"seed": "x"}, "seed-float": {"seed": 1.5}, "text-int": {"text": 5},
    "text-nul": {"text": "a\x00b"}, "text-lone-surrogate": {"text": "a\ud800b"},
    "memory-cache-maybe": {"use_memory_cache": "maybe"}, "streaming-word": {"streaming": "x"},
    "early-stop-high": {"early_stop_threshold": 2}, "condition-word": {"condition_on_previous_chunks": "x"},
    "normalize-list": {"normalize": []},
}.items():
    CASES[f"start-{name}"] = ([start(**fields)], INVALID)
CASES["start-reference-not-audio"] = ([start(references=[{"audio": b"not audio at all", "text": "x"}])], INVALID)
# Accepted at start, refused when its first segment is prepared
CASES["start-max-new-tokens-one"] = ([start(max_new_tokens=1), TEXT, FLUSH], INVALID)

# Invalid text events
for name, fields in {"missing": {}, "nil": {"text": None}, "int": {"text": 5}, "bytes": {"text": b"hi"},
                     "list": {"text": ["hi"]}, "map": {"text": {"a": 1}}, "float": {"text": 1.5},
                     "bool": {"text": True}, "nul": {"text": "a\x00b"}, "lone-surrogate": {"text": "a\udfffb"}}.items():
    CASES[f"text-{name}"] = ([START, ev(event="text", **fields)], INVALID)

assert len(CASES) >= 100, len(CASES)


def check_finish_error(server, ws) -> str:
    """Read to the finish event, which must be an error with a message and no internals; its message."""
    while (event := live_receive(ws))["event"] == "audio":
        pass
    assert event["event"] == "finish" and event["reason"] == "error", event
    assert set(event) == {"event", "reason", "message"} and isinstance(event["message"], str) and event["message"]
    no_leaks(server, event["message"])
    return event["message"]


def speaks(server, headers: dict | None = None) -> None:
    """A normal session on the server: start, text, stop, audio and finish stop."""
    with live_socket(server.url, headers=headers) as ws:
        live_send(ws, "start", request=BASE)
        live_send(ws, "text", text="Still serving.")
        live_send(ws, "stop")
        audio, finish = live_until_finish(ws)
    assert finish == {"event": "finish", "reason": "stop"} and audio


@pytest.mark.parametrize("frames, code", CASES.values(), ids=CASES.keys())
def test_hostile_frames_get_finish_error_and_a_close(open_server, frames, code):
    with live_socket(open_server.url) as ws:
        for frame in frames:
            if isinstance(frame, str):
                ws.send_text(frame)
            else:
                ws.send_bytes(frame)
        check_finish_error(open_server, ws)
        assert live_close_code(ws) == code
    check_alive(open_server)


def test_the_server_still_speaks_after_the_hostile_frames(open_server):
    speaks(open_server)
    assert open_server.wait_idle(timeout=60)["idle"]


# -- limits (the key server's are small) and the handshake --------------------------------------------------------

KEY = {"Authorization": f"Bearer {API_KEY}"}


@pytest.mark.parametrize("frames, code, needle", [
    ([START, ev(event="text", text="x" * 5000)], TOO_BIG, "byte limit"),
    ([ev(event="text", text="x" * 5000)], TOO_BIG, "byte limit"),  # before start: the size is checked first
    ([START, ev(event="text", text="no sentence end " * 8)], POLICY, "buffered"),
    ([START] + [ev(event="text", text="Short. ")] * 40, POLICY, "characters of text"),
], ids=["message-too-big", "message-too-big-before-start", "buffer-full", "connection-text-cap"])
def test_limits_get_finish_error_and_a_close(key_server, frames, code, needle):
    with live_socket(key_server.url, headers=KEY) as ws:
        for frame in frames:
            ws.send_bytes(frame)
        assert needle in check_finish_error(key_server, ws)
        assert live_close_code(ws) == code
    check_alive(key_server)


def test_a_message_far_past_the_limit_is_cut_off_by_the_server(key_server):
    with live_socket(key_server.url, headers=KEY) as ws:
        ws.send_bytes(ev(event="text", text="x" * 100_000))
        assert live_close_code(ws) == TOO_BIG
    check_alive(key_server)


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY},
                                     {"Authorization": f"Basic {API_KEY}"}, {"Authorization": "Bearer"}],
                         ids=["missing", "wrong", "no-scheme", "basic", "empty"])
def test_a_handshake_without_the_key_is_refused_with_401(key_server, headers):
    with pytest.raises(WebSocketUpgradeError) as refused:  # what the fishaudio SDK raises
        with live_socket(key_server.url, headers=headers):
            pass
    assert refused.value.response.status_code == 401
    # The refusal's body is the API's JSON error (a raw handshake, to read it)
    host, port = key_server.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    connection.request("GET", "/v1/tts/live", headers={
        "Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
        "Sec-WebSocket-Key": base64.b64encode(bytes(16)).decode(), **headers})
    answer = connection.getresponse()
    refusal = httpx.Response(answer.status, headers=answer.getheaders(), content=answer.read(),
                             request=httpx.Request("GET", key_server.url + "/v1/tts/live"))
    connection.close()
    check_error(key_server, refusal, {401})
    speaks(key_server, headers=KEY)
    metrics = key_server.http.get("/metrics", headers=KEY).text
    assert re.search(r'^shoal_live_sessions_total\{reason="unauthorized"\} [1-9]', metrics, re.M)
