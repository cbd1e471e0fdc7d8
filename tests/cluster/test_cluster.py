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
