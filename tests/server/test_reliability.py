"""Faults, shutdown, crashes mid-upload, rate limits and observability, against real server processes."""

from __future__ import annotations

import json
import random
import signal
import threading
import time

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from shoal.server.ratelimit import RateLimiter
from shoal.errors import RateLimited
from shoal.testing import Server

from support import noise_clip

FAULTS = {"SHOAL_FAULT_INJECTION": "true"}
# seed 7 runs ~450 frames on the tiny checkpoint (seed 1) before <|im_end|>: a few seconds of generation.
LONG = {"input": "A long one. " * 20, "voice": "default", "response_format": "pcm", "seed": 7,
        "max_new_tokens": 3000, "chunk_length": 0}


def speech(c: httpx.Client, text: str, seed: int, tokens: int = 40, **extra) -> httpx.Response:
    return c.post("/v1/audio/speech", json={"input": text, "voice": "default", "response_format": "pcm",
                                            "seed": seed, "max_new_tokens": tokens, "chunk_length": 0, **extra})


#: PCM16 samples may differ by this much between a request decoded alone and beside others: streamed chunks of
#: requests that decode in step share codec calls, which splits the codec's sums differently (1 LSB seen). Audio
#: of the wrong row, or a lost frame, differs by thousands.
BATCHED_CODEC_LSB = 2


def same_audio(a: bytes, b: bytes) -> bool:
    """The same streamed PCM16 audio, to the codec's float rounding."""
    x, y = np.frombuffer(a, "<i2").astype(np.int32), np.frombuffer(b, "<i2").astype(np.int32)
    return x.shape == y.shape and int(np.abs(x - y).max(initial=0)) <= BATCHED_CODEC_LSB


def counters(srv: Server) -> dict:
    return httpx.get(srv.url + "/v1/health", timeout=10).json()["counters"]


def assert_idle(srv: Server, timeout: float = 30) -> None:
    idle = srv.wait_idle(timeout, interval=0.05)
    assert idle["idle"], f"the server did not go idle: {idle['last']}"


def metrics(srv: Server, **kwargs) -> dict[tuple[str, tuple], float]:
    """/metrics parsed by prometheus-client's own parser: {(sample name, sorted labels): value}."""
    r = httpx.get(srv.url + "/metrics", timeout=10, **kwargs)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


# -- faults inside generation ------------------------------------------------------------------------------------

def test_a_fault_in_one_request_fails_only_that_request(make_server):
    srv = make_server(env=FAULTS)
    seeds = [11, 12, 13]
    with srv.client() as c:
        alone = {seed: speech(c, "Beside a fault.", seed).content for seed in seeds}
    results: dict = {}

    def run(key, text, seed):
        with srv.client() as c:
            results[key] = speech(c, text, seed)

    threads = [threading.Thread(target=run, args=(seed, "Beside a fault.", seed)) for seed in seeds]
    threads.append(threading.Thread(target=run, args=("fault", "Beside a [[fault:error]] fault.", 14)))
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    fault = results["fault"]
    assert fault.status_code == 500, fault.text
    assert fault.json()["error"]["code"] == "engine_failure" and "Traceback" not in fault.text
    for seed in seeds:  # the rows beside the failed one finished, with their solo audio
        assert results[seed].status_code == 200 and same_audio(results[seed].content, alone[seed])
    assert_idle(srv)
    with srv.client() as c:
        assert speech(c, "Still serving.", 1, tokens=8).status_code == 200
    assert srv.proc.poll() is None


def test_cuda_out_of_memory_is_a_503_for_that_request(make_server):
    srv = make_server(env=FAULTS)
    with srv.client() as c:
        r = speech(c, "Too big [[fault:oom]] for the GPU.", 1)
        assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable"
        assert "out of memory" in r.json()["error"]["message"]
        assert speech(c, "Fine again.", 1, tokens=8).status_code == 200
    assert_idle(srv)


def test_out_of_memory_in_a_batch_is_retried_in_halves_and_every_request_keeps_its_audio(make_server):
    """`[[fault:oom-batched]]` runs out of memory inside any decode step of more than one row: the scheduler halves
    the batch until the steps fit, and every request, that one included, gets its solo audio."""
    srv = make_server(env=FAULTS)
    texts = {11: "Beside a tight squeeze.", 12: "Squeezed [[fault:oom-batched]] in.", 13: "Another one beside."}
    with srv.client() as c:
        alone = {seed: speech(c, text, seed).content for seed, text in texts.items()}
    results: dict = {}

    def run(seed):
        with srv.client() as c:
            results[seed] = speech(c, texts[seed], seed)

    threads = [threading.Thread(target=run, args=(seed,)) for seed in texts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for seed in texts:
        assert results[seed].status_code == 200 and same_audio(results[seed].content, alone[seed]), seed
    with srv.client() as c:
        assert c.get("/v1/health").json()["counters"]["isolated_faults"] >= 1  # the batched step did fail
    assert_idle(srv)


def test_a_stream_cut_by_a_fault_breaks_its_body_off(make_server):
    """After the status and the first audio went out, a failure can no longer be a 500: the chunked body is
    broken off (no final chunk), so the client can tell a cut stream from a finished one."""
    srv = make_server("--no-ui", env={**FAULTS, "SHOAL_STREAM_FIRST_FRAMES": "1"})  # audio out before the fault
    received = b""
    with pytest.raises(httpx.RemoteProtocolError):
        with srv.client() as c, c.stream("POST", "/v1/tts", json={
                "text": "Cut [[fault:error]] short.", "streaming": True, "format": "pcm", "seed": 1,
                "max_new_tokens": 40, "chunk_length": 0}) as response:
            assert response.status_code == 200
            for chunk in response.iter_bytes():
                received += chunk
    assert len(received) > 0  # the audio before the fault arrived
    with srv.client() as c:  # and the server goes on serving
        assert speech(c, "After the cut.", 1, tokens=8).status_code == 200


def test_fault_markers_do_nothing_without_the_setting(server):
    with server.client() as c:
        assert speech(c, "Harmless [[fault:error]] text.", 1, tokens=8).status_code == 200


# -- shutdown ----------------------------------------------------------------------------------------------------

def test_sigterm_finishes_the_in_flight_stream_then_exits_0(make_server):
    srv = make_server()
    with srv.client() as c:
        expected = c.post("/v1/audio/speech", json=LONG).content
    received = bytearray()
    with httpx.Client(base_url=srv.url, timeout=120) as c:
        with c.stream("POST", "/v1/audio/speech", json=LONG) as r:
            assert r.status_code == 200
            chunks = r.iter_bytes()
            received += next(chunks)
            srv.proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            with pytest.raises(httpx.TransportError):  # no longer accepting
                httpx.get(srv.url + "/v1/health", timeout=2)
            for chunk in chunks:
                received += chunk
    assert bytes(received) == expected  # the in-flight request finished whole
    assert srv.proc.wait(30) == 0


def test_sigterm_grace_period_bounds_the_wait(make_server):
    srv = make_server(env={"SHOAL_SHUTDOWN_GRACE": "1"})
    body = {**LONG, "max_new_tokens": 1500, "seed": 2, "input": "Never ends. " * 30}
    with httpx.Client(base_url=srv.url, timeout=120) as c:
        with c.stream("POST", "/v1/audio/speech", json=body) as r:
            next(r.iter_bytes())
            start = time.monotonic()
            srv.proc.send_signal(signal.SIGTERM)
            code = srv.proc.wait(30)
    assert code == 0 and time.monotonic() - start < 15


# -- crashes mid-upload ------------------------------------------------------------------------------------------

def test_kill_9_during_uploads_leaves_only_whole_voices(tmp_path, tiny_checkpoint):
    """SIGKILL the server at random points while voices upload; after each restart every listed voice is whole
    and usable without an encode, and no half-written folder is left anywhere."""
    rng = random.Random(20261202)
    srv = Server(tiny_checkpoint, tmp_path / "srv", "--no-ui").start()
    uploaded = 0
    try:
        for round_ in range(4):
            stop = threading.Event()

            def upload_loop():
                nonlocal uploaded
                i = 0
                with httpx.Client(base_url=srv.url, timeout=30) as c:
                    while not stop.is_set() and i < 50:
                        try:
                            c.post("/v1/references/add", data={"id": f"v{round_}-{i}", "text": "Some words."},
                                   files={"audio": ("a.wav", noise_clip(3.0, i), "audio/wav")})
                            uploaded += 1
                        except httpx.TransportError:
                            return
                        i += 1

            thread = threading.Thread(target=upload_loop)
            thread.start()
            time.sleep(rng.uniform(0.2, 1.5))
            srv.proc.send_signal(signal.SIGKILL)
            srv.proc.wait(10)
            stop.set()
            thread.join(30)
            srv.start()
            with srv.client() as c:
                listed = c.get("/v1/references/list").json()["reference_ids"]
                voices_dir = srv.data_dir / "voices"
                on_disk = sorted(p.name for p in voices_dir.iterdir()) if voices_dir.exists() else []
                assert sorted(listed) == on_disk, "a folder on disk is not a listed (whole) voice"
                staging = srv.data_dir / ".staging"
                assert not staging.exists() or not any(staging.iterdir())
                for voice_id in listed:
                    folder = voices_dir / voice_id
                    meta = json.loads((folder / "meta.json").read_text())
                    assert meta["id"] == voice_id and (folder / "codes.npy").is_file()
                    assert (folder / "clip.wav").is_file() and (folder / "transcript.txt").is_file()
                if listed:
                    before = counters(srv)["codec_encodes"]
                    r = c.post("/v1/tts", json={"text": "Whole.", "reference_id": listed[-1], "seed": 1,
                                                "max_new_tokens": 6})
                    assert r.status_code == 200 and counters(srv)["codec_encodes"] == before
    finally:
        srv.stop()
    assert uploaded > 0, "no upload completed: the kill points never met a finished voice"


def test_damaged_codes_are_recomputed_by_the_server_never_served(make_server):
    srv = make_server("--no-ui")
    with srv.client() as c:
        assert c.post("/v1/references/add", data={"id": "narrator", "text": "Some words."},
                      files={"audio": ("a.wav", noise_clip(2.0, 5), "audio/wav")}).status_code == 200
        body = {"text": "My saved voice.", "reference_id": "narrator", "seed": 3, "max_new_tokens": 10}
        good = c.post("/v1/tts", json=body).content
    codes = srv.data_dir / "voices" / "narrator" / "codes.npy"
    for damage in (lambda: codes.write_bytes(codes.read_bytes()[:100]), codes.unlink):
        srv.stop()
        damage()
        srv.start()
        with srv.client() as c:
            r = c.post("/v1/tts", json=body)
            assert r.status_code == 200 and r.content == good
            assert counters(srv)["codec_encodes"] == 1  # recomputed once from the clip
            assert c.post("/v1/tts", json=body).content == good and counters(srv)["codec_encodes"] == 1


# -- rate limit --------------------------------------------------------------------------------------------------

def test_rate_limiter_refills_at_its_rate():
    now = [0.0]
    limiter = RateLimiter(per_minute=60, burst=2, max_keys=3, clock=lambda: now[0])
    limiter.take("a")
    limiter.take("a")
    with pytest.raises(RateLimited) as err:
        limiter.take("a")
    assert err.value.retry_after == pytest.approx(1.0)
    limiter.take("b")  # other keys have their own bucket
    now[0] = 1.0
    limiter.take("a")
    for key in "cdefg":
        limiter.take(key)
    assert len(limiter) == 3  # bounded: the least recently used buckets are forgotten


def test_rate_limit_per_key_is_429_with_retry_after(make_server):
    srv = make_server("--no-ui", "--api-key", "k1", env={"SHOAL_RATE_LIMIT": "6", "SHOAL_RATE_LIMIT_BURST": "2"})
    auth = {"Authorization": "Bearer k1"}
    with srv.client(headers=auth) as c:
        codes = [c.get("/v1/models").status_code for _ in range(3)]
        assert codes == [200, 200, 429]
        r = c.get("/v1/models")
        assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limited"
        assert 1 <= int(r.headers["retry-after"]) <= 10
        assert c.get("/v1/health").status_code == 200  # health is never limited
    with srv.client() as c:  # a wrong key is refused before it can spend anyone's tokens
        assert c.get("/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401


# -- observability -----------------------------------------------------------------------------------------------

def test_metrics_parse_and_move_as_requests_run(make_server, fixture_dir):
    srv = make_server("--no-ui", env=FAULTS)
    m0 = metrics(srv)
    assert m0[("shoal_ready", ())] == 1.0 and m0[("shoal_queue_depth", ())] == 0.0
    assert m0[("shoal_process_resident_memory_bytes", ())] > 10e6
    ref = {"audio": __import__("base64").b64encode((fixture_dir / "reference.wav").read_bytes()).decode(),
           "text": "This is a short reference recording."}
    with srv.client() as c:
        assert speech(c, "Counted.", 1, tokens=12).status_code == 200
        for _ in range(2):  # the second use of the same clip is a cache hit
            assert c.post("/v1/tts", json={"text": "Cached.", "references": [ref], "use_memory_cache": "on",
                                           "max_new_tokens": 6, "seed": 1}).status_code == 200
        assert speech(c, "Broken [[fault:error]] one.", 1).status_code == 500
        assert speech(c, "", 1).status_code == 400
    m1 = metrics(srv)

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return m1.get(key, 0.0) - m0.get(key, 0.0)

    assert delta("shoal_http_requests_total", route="/v1/audio/speech", method="POST", status="200") == 1
    assert delta("shoal_http_requests_total", route="/v1/audio/speech", method="POST", status="500") == 1
    assert delta("shoal_http_requests_total", route="/v1/audio/speech", method="POST", status="400") == 1
    assert delta("shoal_http_requests_total", route="/v1/tts", method="POST", status="200") == 2
    assert delta("shoal_speech_requests_total", model="s1", outcome="ok") == 3
    assert delta("shoal_speech_requests_total", model="s1", outcome="error") == 1
    assert delta("shoal_time_to_first_audio_seconds_count", model="s1") >= 3
    assert delta("shoal_speech_latency_seconds_count", model="s1") == 3
    assert delta("shoal_real_time_factor_count", model="s1") == 3
    assert delta("shoal_audio_seconds_total", model="s1") > 0
    assert delta("shoal_generated_tokens_total") >= 12 + 2 * 6
    assert delta("shoal_codec_encodes_total") == 1
    assert delta("shoal_reference_cache_hits_total") == 1 and delta("shoal_reference_cache_misses_total") == 1


def test_saved_voice_cache_hits_and_misses_are_counted(make_server):
    srv = make_server("--no-ui")
    with srv.client() as c:
        assert c.post("/v1/references/add", data={"id": "v", "text": "Some words."},
                      files={"audio": ("a.wav", noise_clip(2.0, 1), "audio/wav")}).status_code == 200
        m0 = metrics(srv)
        for _ in range(2):
            assert c.post("/v1/tts", json={"text": "Hi.", "reference_id": "v", "max_new_tokens": 4}).status_code == 200
    m1 = metrics(srv)
    hits = m1[("shoal_voice_cache_hits_total", ())] - m0[("shoal_voice_cache_hits_total", ())]
    assert hits == 2  # codes kept in memory since the upload


def test_metrics_need_the_api_key_when_one_is_set(make_server):
    srv = make_server("--no-ui", "--api-key", "k2")
    assert httpx.get(srv.url + "/metrics").status_code == 401
    assert metrics(srv, headers={"Authorization": "Bearer k2"})[("shoal_ready", ())] == 1.0


def test_access_log_has_one_line_per_request_and_never_the_text(make_server):
    srv = make_server("--no-ui")
    secret = "Zanzibar-quokka-4471"
    with srv.client() as c:
        r = c.post("/v1/audio/speech", json={"input": f"The word is {secret}.", "voice": "default",
                                             "response_format": "wav", "max_new_tokens": 12, "seed": 1},
                   headers={"X-Request-Id": "req-abc123"})
        assert r.status_code == 200 and r.headers["x-request-id"] == "req-abc123"
        with c.stream("POST", "/v1/audio/speech", json={**LONG, "input": secret}) as s:
            next(s.iter_bytes())  # and go away mid-stream
    srv.stop()
    log = srv.log.read_text()
    assert secret not in log
    line = next(l for l in log.splitlines() if "request_id=req-abc123" in l)
    assert "route=/v1/audio/speech" in line and "status=200" in line and "latency_ms=" in line
    assert float(line.split("audio_s=")[1].split()[0]) == pytest.approx(11 * 2048 / 44100, abs=0.05)
    assert sum("route=/v1/audio/speech" in l for l in log.splitlines() if "shoal.access" in l) == 2


def test_clients_that_give_up_while_queued_never_reach_the_model(make_server):
    """With one decode slot busy, requests whose clients leave before their first chunk are dropped from the
    queue: they generate no frame at all (they used to run until their first chunk once admitted)."""
    srv = make_server("--no-ui", env={"SHOAL_MAX_BATCH_SIZE": "1"})
    before = counters(srv)["generated_tokens"]
    pcm = bytearray()

    def long_one():
        with httpx.Client(base_url=srv.url, timeout=120) as c:
            pcm.extend(c.post("/v1/audio/speech", json=LONG).content)

    def gives_up(i):
        with pytest.raises(httpx.ReadTimeout):
            with httpx.Client(base_url=srv.url, timeout=httpx.Timeout(10, read=0.5)) as c:
                c.post("/v1/audio/speech", json={**LONG, "seed": 100 + i})

    first = threading.Thread(target=long_one)
    first.start()
    deadline = time.monotonic() + 60  # the quitters come once the long one holds the only slot, not before
    while counters(srv)["generated_tokens"] == before:
        assert time.monotonic() < deadline and first.is_alive(), "the long request never started decoding"
        time.sleep(0.02)
    quitters = [threading.Thread(target=gives_up, args=(i,)) for i in range(5)]
    for t in quitters:
        t.start()
    for t in quitters + [first]:
        t.join(120)
    assert_idle(srv)
    assert pcm, "the long request failed"
    frames_of_long = len(pcm) // (2 * 2048) + 1  # the last generated frame is never decoded
    assert counters(srv)["generated_tokens"] - before == frames_of_long
