"""`shoal bench --live`: the live WebSocket (`/v1/tts/live`) with text arriving as an LLM streams it, beside
HTTP streaming, on one server over loopback.

What a voice agent feels:
- **flush → first audio**: a sentence's last words and a `flush` are sent; how long until that sentence's first
  audio arrives. The first sentence's figure is the agent's time to first audio; a later sentence's may include
  waiting for the one before it to finish (segments of one connection run one after another).
- **gap between segments**: wall time from a sentence's last audio to the next one's first audio;
- **playback stall**: audio played in real time from its first byte: the seconds the player would starve;
- beside them, **HTTP streaming**: time to first audio of `POST /v1/tts` (`streaming: true`) for the first
  sentence alone and for the whole text.

The text is sent a few words at a time (`WORDS_PER_TICK` every `TICK_SECONDS`), with a `flush` after each
sentence, as LiveKit's and Pipecat's plugins do. Audio is requested as 16-bit PCM at 24 kHz, as LiveKit asks.
"""

from __future__ import annotations

import datetime
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import ormsgpack

TICK_SECONDS = 0.05
WORDS_PER_TICK = 3
#: Each utterance is a few sentences from bench.TEXTS, sent as one live session.
SENTENCES_PER_UTTERANCE = 3
UTTERANCES = 3
#: 16-bit mono PCM at LiveKit's default rate: its bytes count its seconds.
SAMPLE_RATE = 24000
PCM_BYTES_PER_SAMPLE = 2
#: A figure this long, or a session that takes this long, means the server is stuck: the bench stops.
SESSION_TIMEOUT_SECONDS = 3600.0


def progress(message: str) -> None:
    print(f"bench --live: {message}", file=sys.stderr, flush=True)


def utterances(texts: tuple[str, ...]) -> list[list[str]]:
    """UTTERANCES lists of SENTENCES_PER_UTTERANCE sentences, taken in turn from `texts`."""
    return [[texts[(u * SENTENCES_PER_UTTERANCE + s) % len(texts)] for s in range(SENTENCES_PER_UTTERANCE)]
            for u in range(UTTERANCES)]


def word_ticks(sentence: str) -> list[str]:
    """A sentence as an LLM streams it: WORDS_PER_TICK words per message, the spaces kept."""
    words = sentence.split(" ")
    return [" ".join(words[i:i + WORDS_PER_TICK]) + " " for i in range(0, len(words), WORDS_PER_TICK)]


def live_session(url: str, model: str, sentences: list[str], request: dict) -> dict:
    """One WebSocket session: the sentences streamed in, audio timed out. Times are seconds from the start."""
    from websockets.sync.client import connect

    ws_url = url.replace("http://", "ws://", 1) + "/v1/tts/live"
    audio: list[tuple[float, int, int]] = []  # (arrival, segment, samples)
    finish: dict = {}
    with connect(ws_url, additional_headers={"model": model}, max_size=None,
                 open_timeout=SESSION_TIMEOUT_SECONDS) as ws:
        t0 = time.perf_counter()

        def receive() -> None:
            for message in ws:
                event = ormsgpack.unpackb(message)
                if event.get("event") == "audio":
                    audio.append((time.perf_counter() - t0, event.get("segment", -1),
                                  len(event["audio"]) // PCM_BYTES_PER_SAMPLE))
                elif event.get("event") == "finish":
                    finish.update(event)
                    return

        receiver = threading.Thread(target=receive, daemon=True)
        receiver.start()
        ws.send(ormsgpack.packb({"event": "start", "request": request}))
        sent: list[float] = []  # when each sentence's last words and flush went out
        for sentence in sentences:
            for chunk in word_ticks(sentence):
                time.sleep(TICK_SECONDS)
                ws.send(ormsgpack.packb({"event": "text", "text": chunk}))
            ws.send(ormsgpack.packb({"event": "flush"}))
            sent.append(time.perf_counter() - t0)
        ws.send(ormsgpack.packb({"event": "stop"}))
        receiver.join(SESSION_TIMEOUT_SECONDS)
    if finish.get("reason") != "stop":
        raise RuntimeError(f"the live session did not finish cleanly: {finish or 'no finish event'}")
    return summarise_session(sent, audio, SAMPLE_RATE)


def summarise_session(sent: list[float], audio: list[tuple[float, int, int]], rate: int) -> dict:
    """flush → first audio per sentence, the gaps between segments and the playback stall, from the timings."""
    segments = sorted({segment for _, segment, _ in audio})
    if segments != list(range(len(sent))):
        raise RuntimeError(f"expected audio for segments 0..{len(sent) - 1}, got {segments} (does the server "
                           "mark its audio events with their segment?)")
    first = [min(t for t, s, _ in audio if s == k) for k in segments]
    last = [max(t for t, s, _ in audio if s == k) for k in segments]
    stall, clock = 0.0, None  # real-time playback from the first audio
    for t, _, samples in audio:
        clock = t if clock is None else clock
        stall += max(0.0, t - clock)
        clock = max(clock, t) + samples / rate
    return {
        "flush_to_first_audio_s": [first[k] - sent[k] for k in segments],
        "gap_between_segments_s": [first[k + 1] - last[k] for k in segments[:-1]],
        "playback_stall_s": stall,
        "audio_s": sum(samples for _, _, samples in audio) / rate,
        "session_s": last[-1],
    }


def http_first_audio(url: str, model: str, body: dict) -> float:
    """Seconds from sending a streamed `POST /v1/tts` to its first audio byte past the WAV header."""
    import httpx

    t0 = time.perf_counter()
    with httpx.stream("POST", url + "/v1/tts", content=ormsgpack.packb({**body, "streaming": True}),
                      headers={"content-type": "application/msgpack", "model": model},
                      timeout=SESSION_TIMEOUT_SECONDS) as r:
        r.raise_for_status()
        chunks = r.iter_bytes()  # one iterator: httpx streams a response's body once
        for chunk in chunks:
            if chunk:
                first = time.perf_counter() - t0
                for _ in chunks:
                    pass
                return first
    raise RuntimeError("a streamed /v1/tts request returned no audio")


def describe(values: list[float]) -> dict:
    return {"n": len(values), "median": statistics.median(values), "max": max(values), "min": min(values)}


def run_live_bench(options: dict, checkpoint: dict, texts: tuple[str, ...]) -> dict:
    """Start one server on `checkpoint`, warm it, then for each utterance: a live session and the HTTP figures.
    Both send the `model` header a Fish Audio client sends for the checkpoint's model (`s1`, `s2-pro`)."""
    from shoal.layout import MODEL_NAMES
    from shoal.testing import Server

    model = MODEL_NAMES[options["model"]]

    tokens = options["tokens"]
    request = {"text": "", "format": "pcm", "sample_rate": SAMPLE_RATE, "max_new_tokens": tokens, "seed": 7}
    started = datetime.datetime.now().astimezone()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="shoal-bench-live-") as tmp:
        extra = ["--device", options["device"], "--precision", options["precision"]]
        env = {"OMP_NUM_THREADS": str(options["threads"])} if options["threads"] else None
        progress(f"starting shoal serve on {checkpoint['path']}")
        with Server(Path(checkpoint["path"]), Path(tmp), *extra, env=env) as server:
            server.start(timeout=SESSION_TIMEOUT_SECONDS)
            progress("warming up (one live session, one HTTP stream)")
            live_session(server.url, model, ["Warming up."], request)
            http_first_audio(server.url, model, {**request, "text": "Warming up."})
            runs = []
            for i, sentences in enumerate(utterances(texts)):
                progress(f"utterance {i + 1}/{UTTERANCES}: live session ({len(sentences)} sentences)")
                live = live_session(server.url, model, sentences, request)
                progress(f"utterance {i + 1}/{UTTERANCES}: HTTP streaming, first sentence then the whole text")
                runs.append({
                    "sentences": sentences,
                    "live": live,
                    "http_first_sentence_first_audio_s": http_first_audio(server.url, model, {**request, "text": sentences[0]}),
                    "http_whole_text_first_audio_s": http_first_audio(server.url, model, {**request,
                                                                                   "text": " ".join(sentences)}),
                })
    load_after = os.getloadavg()
    first = [r["live"]["flush_to_first_audio_s"][0] for r in runs]
    later = [t for r in runs for t in r["live"]["flush_to_first_audio_s"][1:]]
    gaps = [g for r in runs for g in r["live"]["gap_between_segments_s"]]
    return {
        "kind": "live",
        "label": options["label"],
        "started": started.isoformat(timespec="seconds"),
        "checkpoint": checkpoint,
        "device": options["device"], "precision": options["precision"], "max_new_tokens": tokens,
        "text_stream": {"words_per_tick": WORDS_PER_TICK, "tick_s": TICK_SECONDS, "flush": "after each sentence"},
        "load_average": {"before": load_before, "after": load_after},
        "summary": {
            "live_first_sentence_flush_to_first_audio_s": describe(first),
            "live_later_sentences_flush_to_first_audio_s": describe(later),
            "live_gap_between_segments_s": describe(gaps),
            "live_playback_stall_s": describe([r["live"]["playback_stall_s"] for r in runs]),
            "http_first_sentence_first_audio_s": describe([r["http_first_sentence_first_audio_s"] for r in runs]),
            "http_whole_text_first_audio_s": describe([r["http_whole_text_first_audio_s"] for r in runs]),
        },
        "runs": runs,
    }


def render_live_markdown(report: dict) -> str:
    s = report["summary"]
    rows = [
        ("live: first sentence, flush → first audio", s["live_first_sentence_flush_to_first_audio_s"]),
        ("HTTP streaming: first sentence alone, first audio", s["http_first_sentence_first_audio_s"]),
        ("live: later sentences, flush → first audio", s["live_later_sentences_flush_to_first_audio_s"]),
        ("live: gap between segments (last audio → next first audio)", s["live_gap_between_segments_s"]),
        ("live: playback stall per utterance (real-time player)", s["live_playback_stall_s"]),
        ("HTTP streaming: whole text, first audio", s["http_whole_text_first_audio_s"]),
    ]
    text_stream = report["text_stream"]
    lines = [
        f"# shoal bench --live: {report['label']}",
        "",
        f"{report['started']} · {report['checkpoint']['description']} · {report['device']} {report['precision']} · "
        f"max_new_tokens {report['max_new_tokens']} · load average {report['load_average']['before'][0]:.2f} → "
        f"{report['load_average']['after'][0]:.2f}",
        "",
        f"Text arrives {text_stream['words_per_tick']} words every {text_stream['tick_s'] * 1000:.0f} ms, with a "
        f"flush {text_stream['flush']}; {UTTERANCES} utterances of {SENTENCES_PER_UTTERANCE} sentences, each a "
        "live session, then the same text over HTTP streaming. Seconds.",
        "",
        "| figure | median | min | max | n |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {name} | {d['median']:.3f} | {d['min']:.3f} | {d['max']:.3f} | {d['n']} |" for name, d in rows]
    lines += ["", "Per utterance (live: flush → first audio per sentence; gaps):", ""]
    for i, run in enumerate(report["runs"], 1):
        live = run["live"]
        lines.append(f"- {i}: " + ", ".join(f"{t:.3f}" for t in live["flush_to_first_audio_s"]) + " s; gaps "
                     + ", ".join(f"{g:.3f}" for g in live["gap_between_segments_s"])
                     + f" s; {live['audio_s']:.1f} s of audio in {live['session_s']:.1f} s; stall "
                     f"{live['playback_stall_s']:.2f} s")
    return "\n".join(lines) + "\n"


def write_live_report(report: dict, out: Path) -> Path:
    from shoal.bench import write_text

    stem = out / f"{report['started'][:10]}-{report['label']}-live"
    write_text(stem.with_suffix(".json"), json.dumps(report, indent=2) + "\n")
    write_text(stem.with_suffix(".md"), render_live_markdown(report))
    return stem
