"""`--replicas auto` scales from 1 to 2 engine replicas under load by itself, with the shipped autoscaling config
(cluster_config.engine_options: target one under max_batch_size, upscale after 5 s), as a second Serve
application under its own route prefix on the session's Ray."""

from __future__ import annotations

import concurrent.futures
import threading
import time

import httpx
import pytest

from shoal.cluster_config import ENGINE_DEPLOYMENT, UPSCALE_DELAY_S, autoscaling_target

from support import wait_healthy

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

APP = "shoal-autoscale"
PREFIX = "/autoscale"
#: How long a second replica may take to be RUNNING once the load is on: the 5 s upscale delay, Serve's metric
#: look-back, then a replica that loads the tiny checkpoint. A deadline for something that must happen.
SCALE_UP_DEADLINE_S = 90.0
#: Streams kept going at once: well above the target (1 per replica with max_batch_size 2).
CONCURRENT_STREAMS = 4


def running_replicas() -> int:
    from ray import serve

    app = serve.status().applications.get(APP)
    if app is None or ENGINE_DEPLOYMENT not in app.deployments:
        return 0
    return app.deployments[ENGINE_DEPLOYMENT].replica_states.get("RUNNING", 0)


def health(url: str) -> dict:
    response = httpx.get(f"{url}/v1/health", timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def reported_running(url: str) -> int:
    """What the app's own /v1/health says of its engine deployment (the ingress polls serve.status for it)."""
    deployment = health(url)["cluster"].get("deployment") or {}
    return deployment.get("replica_states", {}).get("RUNNING", 0)


def long_stream(url: str, seed: int, stop: threading.Event) -> list[str]:
    """Keep a long streamed request going, one after another, until `stop`; each one's outcome."""
    body = {"input": "Never ends. " * 30, "voice": "default", "response_format": "pcm", "seed": seed,
            "max_new_tokens": 3000, "chunk_length": 0}
    outcomes = []
    while not stop.is_set():
        try:
            with httpx.stream("POST", f"{url}/v1/audio/speech", json=body, timeout=180) as response:
                if response.status_code != 200:
                    outcomes.append(f"status {response.status_code}")
                    time.sleep(0.5)
                    continue
                for _ in response.iter_bytes():
                    if stop.is_set():
                        break
            outcomes.append("ok")
        except httpx.HTTPError as exc:
            outcomes.append(f"broken: {type(exc).__name__}")
    return outcomes


@pytest.fixture
def autoscaled_app(cluster, tiny_checkpoint, tmp_path):
    """A second application on the session's Ray and Serve proxy: replicas="auto" (1..2 on CPU), the shipped
    autoscaling options, max_batch_size 2 (target 1 ongoing request per replica); deleted afterwards."""
    from ray import serve

    from shoal import cluster as shoal_cluster
    from shoal.settings import Settings

    settings = Settings.load(cli={"checkpoint": tiny_checkpoint, "data_dir": tmp_path / "data", "device": "cpu",
                                  "torch_threads": 1, "ui": False, "lite_voice": False, "max_batch_size": 2},
                             env={})
    assert autoscaling_target(settings) == 1
    try:
        serve.run(shoal_cluster.application(settings, replicas="auto", app_name=APP), name=APP,
                  route_prefix=PREFIX)
        url = cluster["url"] + PREFIX
        wait_healthy(url)
        yield url
    finally:
        serve.delete(APP)


def test_auto_replicas_scale_from_one_to_two_under_load(autoscaled_app):
    url = autoscaled_app
    options = serve_options()
    assert options["min_replicas"] == 1 and options["max_replicas"] == 2, options
    assert options["upscale_delay_s"] == UPSCALE_DELAY_S and options["target_ongoing_requests"] == 1, options

    # idle, it stays at one replica (longer than the upscale delay): the scale-up below is the load's doing
    idle_until = time.monotonic() + 2 * UPSCALE_DELAY_S
    while time.monotonic() < idle_until:
        assert running_replicas() == 1, "a second replica started without load"
        time.sleep(1.0)
    deadline = time.monotonic() + 15  # the ingress polls serve.status every few seconds
    while reported_running(url) != 1 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert reported_running(url) == 1, health(url)["cluster"]
    # the app works under its route prefix (Serve passes it as the ASGI root_path)
    spoken = httpx.post(f"{url}/v1/tts", json={"text": "Hello there.", "seed": 1, "max_new_tokens": 8,
                                                "format": "wav"}, timeout=120)
    assert spoken.status_code == 200 and spoken.content[:4] == b"RIFF", spoken.text

    stop = threading.Event()
    with concurrent.futures.ThreadPoolExecutor(CONCURRENT_STREAMS) as pool:
        streams = [pool.submit(long_stream, url, seed, stop) for seed in range(CONCURRENT_STREAMS)]
        loaded_at = time.monotonic()
        try:
            while running_replicas() < 2 and time.monotonic() - loaded_at < SCALE_UP_DEADLINE_S:
                time.sleep(1.0)
            scaled_after = time.monotonic() - loaded_at
            running = running_replicas()
        finally:
            stop.set()
        outcomes = [o for f in streams for o in f.result()]
    assert running == 2, f"still {running} RUNNING replica(s) {SCALE_UP_DEADLINE_S:g} s into the load"
    print(f"second replica RUNNING {scaled_after:.1f} s after the load began; stream outcomes: {outcomes}")
    assert all(o == "ok" for o in outcomes), outcomes

    deadline = time.monotonic() + 15  # ... and the app's own health block says so (its own app's status)
    while reported_running(url) != 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    state = health(url)["cluster"]
    assert (state.get("deployment") or {}).get("replica_states", {}).get("RUNNING") == 2, state


def serve_options() -> dict:
    """The engine deployment's autoscaling config as Serve holds it for the application."""
    from ray import serve

    status = serve.status().applications[APP]
    assert ENGINE_DEPLOYMENT in status.deployments, status
    from ray.serve.context import _get_global_client

    details = _get_global_client().get_serve_details()
    config = details["applications"][APP]["deployments"][ENGINE_DEPLOYMENT]["deployment_config"]
    return config["autoscaling_config"]
