"""shoal on Ray Serve: spread, shared voices, parity with the plain engine (see shoal.cluster)."""

from __future__ import annotations

import concurrent.futures
import io
import time

import httpx
import numpy as np
import pytest
import soundfile as sf

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

SPEECH = {"text": "Hello there.", "seed": 7, "max_new_tokens": 12, "format": "wav"}


def tts(url: str, **body) -> httpx.Response:
    return httpx.post(f"{url}/v1/tts", json={**SPEECH, **body}, timeout=120)


def health(url: str) -> dict:
    response = httpx.get(f"{url}/v1/health", timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def test_requests_spread_over_both_replicas(cluster):
    url = cluster["url"]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda i: tts(url, seed=i), range(16)))
    assert [r.status_code for r in responses] == [200] * 16, [r.text for r in responses if r.status_code != 200]
    deadline = time.monotonic() + 15  # stats come with each finished stream and every few seconds
    while True:
        replicas = health(url)["cluster"]["replicas"]
        if len([r for r in replicas if r["requests"] > 0]) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert len({r["pid"] for r in replicas if r["requests"] > 0}) == 2, replicas
    metrics = httpx.get(f"{url}/metrics", timeout=10).text  # the ingress's /metrics, labelled by replica
    assert metrics.count('shoal_replica_requests_total{replica="') >= 2, metrics


def replica_stats(url: str) -> dict:
    return {r["pid"]: r for r in health(url)["cluster"]["replicas"]}


def test_a_busy_replica_reports_through_its_stream(cluster):
    """/v1/health and /metrics show the request in flight on the replica that serves it while it runs: the
    ingress's polls go to the idle replica (Serve routes them to the least busy), so the busy one's figures come
    with its stream."""
    url = cluster["url"]
    body = {"input": "Never ends. " * 30, "voice": "default", "response_format": "pcm", "seed": 4,
            "max_new_tokens": 3000, "chunk_length": 0}
    with httpx.stream("POST", f"{url}/v1/audio/speech", json=body, timeout=120) as response:
        assert response.status_code == 200
        chunks = response.iter_bytes()
        next(chunks)
        deadline = time.monotonic() + 15
        while True:
            busy = [r for r in health(url)["cluster"]["replicas"]
                    if r["in_flight"] > 0 and r["seconds_since_report"] < 5]
            if busy or time.monotonic() > deadline:
                break
            next(chunks, None)  # keep reading, so the replica is not held back by a full pipe
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
    assert len(busy) == 1, health(url)["cluster"]
    replica = busy[0]["id"]
    assert f'shoal_replica_in_flight{{replica="{replica}"}} 1.0' in metrics, metrics


def test_a_voice_saved_through_one_replica_is_used_by_the_other(cluster):
    from support import tone_clip

    url = cluster["url"]
    encodes_before = health(url)["counters"]["codec_encodes"]
    saved = httpx.post(f"{url}/v1/references/add", data={"id": "shared", "text": "A shared voice."},
                       files={"audio": ("clip.wav", tone_clip(2.0), "audio/wav")}, timeout=120)
    assert saved.status_code == 200, saved.text
    before = {pid: r["requests"] for pid, r in replica_stats(url).items()}
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(lambda i: tts(url, seed=i, reference_id="shared"), range(12)))
    assert [r.status_code for r in responses] == [200] * 12, [r.text for r in responses if r.status_code != 200]
    own_voice = tts(url, seed=0)
    assert responses[0].content != own_voice.content  # the voice was used
    deadline = time.monotonic() + 15
    while True:
        after = replica_stats(url)
        served = [pid for pid, r in after.items() if r["requests"] > before.get(pid, 0)]
        if len(served) >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert len(served) == 2, after  # both replicas served the voice ...
    assert health(url)["counters"]["codec_encodes"] == encodes_before + 1  # ... encoded once, by one replica


def test_a_seeded_request_sounds_the_same_as_through_the_plain_server(cluster):
    from fastapi.testclient import TestClient

    from shoal.server.app import create_app

    body = {**SPEECH, "seed": 1234, "format": "wav"}
    through_cluster = httpx.post(f"{cluster['url']}/v1/tts", json=body, timeout=120)
    assert through_cluster.status_code == 200, through_cluster.text
    settings = cluster["settings"].model_copy(update={"data_dir": cluster["data_dir"] / "plain"})
    with TestClient(create_app(settings)) as client:
        deadline = time.monotonic() + 120
        while client.get("/v1/health").status_code != 200:
            assert time.monotonic() < deadline, client.get("/v1/health").text
            time.sleep(0.2)
        plain = client.post("/v1/tts", json=body)
    assert plain.status_code == 200, plain.text
    a, _ = sf.read(io.BytesIO(through_cluster.content), dtype="float32")
    b, _ = sf.read(io.BytesIO(plain.content), dtype="float32")
    assert len(a) > 0 and np.array_equal(a, b)


def test_the_live_websocket_speaks_through_the_ingress_with_a_saved_voice(cluster):
    """Serve's proxy carries the WebSocket; each segment is a request to some replica, the previous segment's
    codes travel with the next one."""
    from support import live_send, live_socket, live_until_finish, tone_clip

    url = cluster["url"]
    saved = httpx.post(f"{url}/v1/references/add", data={"id": "live-voice", "text": "A live voice."},
                       files={"audio": ("clip.wav", tone_clip(2.0), "audio/wav")}, timeout=120)
    assert saved.status_code == 200, saved.text
    with live_socket(url) as ws:
        live_send(ws, "start", request={"text": "", "format": "pcm", "reference_id": "live-voice",
                                        "seed": 5, "max_new_tokens": 16, "min_chunk_length": 0})
        live_send(ws, "text", text="The first sentence. ")
        live_send(ws, "flush")
        live_send(ws, "text", text="And the second one.")
        live_send(ws, "stop")
        data, finish = live_until_finish(ws)
    assert finish == {"event": "finish", "reason": "stop"} and len(data) > 0


def test_a_client_that_goes_away_stops_the_generation_on_its_replica(cluster):
    url = cluster["url"]
    body = {"input": "Never ends. " * 30, "voice": "default", "response_format": "pcm", "seed": 3,
            "max_new_tokens": 3000, "chunk_length": 0}
    with httpx.stream("POST", f"{url}/v1/audio/speech", json=body, timeout=120) as response:
        assert response.status_code == 200
        next(response.iter_bytes())  # under way on a replica; then the client leaves
    deadline = time.monotonic() + 20
    while True:
        state = health(url)
        busy = sum(r["in_flight"] for r in state["cluster"]["replicas"] if r["seconds_since_report"] < 3)
        if (busy == 0 and state["queue_depth"] == 0) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert busy == 0 and state["queue_depth"] == 0, state
