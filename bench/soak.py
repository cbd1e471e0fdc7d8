"""Load and soak a live `shoal serve` on loopback with a tiny random checkpoint.

    .venv/bin/python bench/soak.py --quick    # 1.5-2 minutes on 2 cores; prints the figures (--out DIR: files)
    .venv/bin/python bench/soak.py --full     # about 6 minutes; writes bench/results/<date>-load.md and .json
    .venv/bin/python bench/soak.py --quick --scenario disconnects   # one scenario

Three scenarios, each against a server process of its own (`shoal.testing.Server`, as the API tests use):

- concurrency: many clients posting short speech requests at once while a separate thread polls
  GET /v1/health; every answer must be 200, 429 with Retry-After, or 503, and health must keep answering;
- memory: after a warm-up, a long run of sequential requests (inline references of distinct clips through the
  bounded reference cache, bad requests, streams the client abandons) must grow the server's RSS by < 5%;
- disconnects: many clients open long streams and go away after the first chunk; the scheduler's rows and the
  dispatcher's queue must drain to zero right after. A second round of clients gives up before its first chunk
  (mostly while still queued), recording how long the server keeps working for clients that have gone.

Every loop here is bounded in count and in time. Only 127.0.0.1 is used. `tests/load/` runs the quick plan
and asserts the correctness properties; the timed figures (health p99 etc.) are recorded, not asserted, since
benchmarks are not tests.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import datetime as dt
import io
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psutil
import soundfile as sf

from shoal.testing import Server, write_tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]

RESULTS = REPO / "bench" / "results"
#: What a loaded server may answer a well-formed speech request with.
ALLOWED = (200, 429, 503)
#: The issue's target for health latency under load (recorded in the results, never asserted by tests).
HEALTH_P99_TARGET_MS = 100.0
#: The memory property (asserted by the tests, quick mode too).
RSS_GROWTH_LIMIT_PCT = 5.0
#: Longest a client waits after a 429 before retrying, whatever Retry-After says.
RETRY_CAP_S = 0.5


@dataclass(frozen=True)
class Plan:
    """How hard and how long each scenario pushes."""

    label: str
    # concurrency
    clients: int = 64
    concurrency_seconds: float = 15.0
    health_interval_s: float = 0.075
    health_timeout_s: float = 5.0  # the liveness bound: every poll must be answered within this
    # memory
    warmup_requests: int = 40
    soak_requests: int = 200
    rss_sample_every: int = 20
    clip_seconds: float = 1.5
    # disconnects
    disconnect_clients: int = 50
    disconnect_tokens: int = 200
    queued_clients: int = 24  # the second round: clients that give up after `abandon_after_s`
    abandon_after_s: float = 0.5
    free_timeout_s: float = 10.0
    # every request
    request_timeout_s: float = 60.0
    max_new_tokens: tuple[int, int] = (8, 16)


QUICK = Plan("quick")
FULL = Plan("full", concurrency_seconds=120.0, warmup_requests=50, soak_requests=1000, rss_sample_every=50,
            queued_clients=50)


# ---------------------------------------------------------------------------------------------------------------
# The server
# ---------------------------------------------------------------------------------------------------------------

def make_server(checkpoint: Path, root: Path, env: dict[str, str] | None = None) -> Server:
    """A `shoal serve --no-ui` on a free loopback port, not yet started."""
    return Server(checkpoint, root, "--no-ui", "--host", "127.0.0.1", env=env)


def rss_bytes(server: Server) -> int:
    return psutil.Process(server.proc.pid).memory_info().rss


def health(client: httpx.Client) -> dict:
    response = client.get("/v1/health", timeout=5)
    response.raise_for_status()
    return response.json()


# ---------------------------------------------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------------------------------------------

def tokens(rng: random.Random, plan: Plan) -> int:
    return rng.randint(*plan.max_new_tokens)


def speech_body(text: str, fmt: str, seed: int, max_new_tokens: int, voice: str = "default") -> dict:
    return {"input": text, "voice": voice, "response_format": fmt, "seed": seed, "max_new_tokens": max_new_tokens}


def tts_body(text: str, seed: int, max_new_tokens: int, references: list[dict] | None = None,
             **extra: Any) -> dict:
    body = {"text": text, "seed": seed, "max_new_tokens": max_new_tokens, **extra}
    if references:
        body.update(references=references, use_memory_cache="on")
    return body


def clip_wav(seed: int, seconds: float = 1.5, rate: int = 44100) -> bytes:
    """A distinct speech-like clip (noise shaped by a syllable-rate envelope), as 16-bit WAV bytes."""
    rng = np.random.default_rng(seed)
    n = int(seconds * rate)
    t = np.arange(n) / rate
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * (3 + rng.random() * 2) * t + rng.random() * 6.28)
    audio = (0.2 * envelope * rng.standard_normal(n)).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, audio, rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def reference(seed: int, seconds: float) -> dict:
    return {"audio": base64.b64encode(clip_wav(seed, seconds)).decode(), "text": f"Reference clip number {seed}."}


def percentiles_ms(values_s: list[float]) -> dict:
    if not values_s:
        return {"n": 0, "p50_ms": None, "p99_ms": None, "max_ms": None, "mean_ms": None}
    ms = np.asarray(values_s) * 1000
    return {"n": len(ms), "p50_ms": round(float(np.percentile(ms, 50)), 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 2), "max_ms": round(float(ms.max()), 2),
            "mean_ms": round(float(ms.mean()), 2)}


# ---------------------------------------------------------------------------------------------------------------
# a. Concurrency
# ---------------------------------------------------------------------------------------------------------------

class HealthPoller(threading.Thread):
    """GET /v1/health every `interval_s` from a thread of its own (own connection, own loop), recording each
    latency; a poll that fails or takes longer than `timeout_s` counts as unanswered. Stops by itself at
    `deadline` (monotonic) or when `stop()` is called."""

    def __init__(self, url: str, interval_s: float, timeout_s: float, deadline: float):
        super().__init__(name="soak-health", daemon=True)
        self.url, self.interval_s, self.timeout_s, self.deadline = url, interval_s, timeout_s, deadline
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self._halt = threading.Event()

    def stop(self) -> None:
        self._halt.set()

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=self.timeout_s) as client:
            while not self._halt.is_set() and time.monotonic() < self.deadline:
                start = time.perf_counter()
                try:
                    status = client.get("/v1/health").status_code
                    elapsed = time.perf_counter() - start
                    if status != 200:
                        self.failures.append(f"status {status}")
                    elif elapsed > self.timeout_s:
                        self.failures.append(f"slow: {elapsed:.2f} s")
                    self.latencies.append(elapsed)
                except httpx.HTTPError as exc:
                    self.failures.append(f"{type(exc).__name__}: {exc}")
                self._halt.wait(self.interval_s)


@dataclass
class Tally:
    statuses: dict[str, int] = field(default_factory=dict)
    by_endpoint: dict[str, dict[str, int]] = field(default_factory=dict)
    missing_retry_after: int = 0
    retry_after_values: dict[str, int] = field(default_factory=dict)
    unexpected: list[str] = field(default_factory=list)  # status and body of anything outside ALLOWED
    transport_errors: list[str] = field(default_factory=list)
    empty_200: int = 0
    latencies_200: list[float] = field(default_factory=list)

    def add(self, endpoint: str, response: httpx.Response, elapsed: float) -> None:
        code = str(response.status_code)
        self.statuses[code] = self.statuses.get(code, 0) + 1
        per = self.by_endpoint.setdefault(endpoint, {})
        per[code] = per.get(code, 0) + 1
        if response.status_code == 200:
            self.latencies_200.append(elapsed)
            if not response.content:
                self.empty_200 += 1
        elif response.status_code == 429:
            value = response.headers.get("retry-after")
            if value is None:
                self.missing_retry_after += 1
            else:
                self.retry_after_values[value] = self.retry_after_values.get(value, 0) + 1
        if response.status_code not in ALLOWED and len(self.unexpected) < 20:
            self.unexpected.append(f"{endpoint} {code}: {response.text[:300]}")


async def _concurrent_client(client: httpx.AsyncClient, index: int, plan: Plan, deadline: float,
                             tally: Tally) -> None:
    rng = random.Random(index)
    kinds = ("speech-pcm", "speech-wav", "tts")
    for k in range(100_000):  # bounded in count as well as in time
        if time.monotonic() >= deadline:
            return
        kind = kinds[(index + k) % len(kinds)]
        seed = index * 1000 + k
        text = f"Client {index} says hello, number {k}."
        if kind == "tts":
            path, body = "/v1/tts", tts_body(text, seed, tokens(rng, plan))
        else:
            path, body = "/v1/audio/speech", speech_body(text, kind.split("-")[1], seed, tokens(rng, plan))
        start = time.perf_counter()
        try:
            response = await client.post(path, json=body)
        except httpx.HTTPError as exc:
            tally.transport_errors.append(f"{kind}: {type(exc).__name__}: {exc}"[:300])
            await asyncio.sleep(0.2)
            continue
        tally.add(kind, response, time.perf_counter() - start)
        if response.status_code == 429:
            try:
                wait = float(response.headers.get("retry-after", RETRY_CAP_S))
            except ValueError:
                wait = RETRY_CAP_S
            await asyncio.sleep(min(wait, RETRY_CAP_S) * (0.5 + rng.random()))
        elif response.status_code != 200:
            await asyncio.sleep(0.1 + 0.1 * rng.random())


async def _concurrent_clients(url: str, plan: Plan, deadline: float, tally: Tally) -> None:
    limits = httpx.Limits(max_connections=plan.clients, max_keepalive_connections=plan.clients)
    async with httpx.AsyncClient(base_url=url, timeout=plan.request_timeout_s, limits=limits) as client:
        tasks = [asyncio.create_task(_concurrent_client(client, i, plan, deadline, tally))
                 for i in range(plan.clients)]
        # Each client stops at the deadline after its request in progress, which has its own timeout.
        done, pending = await asyncio.wait(tasks, timeout=deadline - time.monotonic() + plan.request_timeout_s + 5)
        for task in pending:
            task.cancel()
            tally.transport_errors.append("client task still running after the deadline: cancelled")
        for task in done:
            if task.exception() is not None:
                tally.transport_errors.append(f"client crashed: {task.exception()!r}"[:300])


def run_concurrency(server: Server, plan: Plan) -> dict:
    """`plan.clients` clients for `plan.concurrency_seconds`, with health polled alongside."""
    with httpx.Client(base_url=server.url) as c:
        before = health(c)
    tally = Tally()
    start = time.monotonic()
    deadline = start + plan.concurrency_seconds
    poller = HealthPoller(server.url, plan.health_interval_s, plan.health_timeout_s, deadline + 10)
    poller.start()
    try:
        asyncio.run(_concurrent_clients(server.url, plan, deadline, tally))
    finally:
        poller.stop()
        poller.join(plan.health_timeout_s + 5)
    elapsed = time.monotonic() - start
    drained = server.wait_idle(plan.free_timeout_s)
    with httpx.Client(base_url=server.url) as c:
        after = health(c)
    answered = sum(tally.statuses.values())
    ok = tally.statuses.get("200", 0)
    return {
        "clients": plan.clients, "seconds": round(elapsed, 1), "requests": answered,
        "statuses": dict(sorted(tally.statuses.items())), "by_endpoint": tally.by_endpoint,
        "missing_retry_after": tally.missing_retry_after, "unexpected": tally.unexpected,
        "retry_after_values": dict(sorted(tally.retry_after_values.items(), key=lambda kv: float(kv[0]))),
        "transport_errors": tally.transport_errors[:20], "transport_error_count": len(tally.transport_errors),
        "empty_200": tally.empty_200,
        "ok_per_second": round(ok / elapsed, 2), "latency_200": percentiles_ms(tally.latencies_200),
        "health": {**percentiles_ms(poller.latencies), "failures": poller.failures[:20],
                   "failure_count": len(poller.failures), "interval_ms": plan.health_interval_s * 1000,
                   "p99_target_ms": HEALTH_P99_TARGET_MS},
        "decode_steps": after["counters"].get("decode_steps", 0) - before["counters"].get("decode_steps", 0),
        "drained": {"idle": drained["idle"], "seconds": round(drained["seconds"], 3)},
        "server_alive": server.alive,
    }


# ---------------------------------------------------------------------------------------------------------------
# b. Memory
# ---------------------------------------------------------------------------------------------------------------

#: The sequential mix: (name, expected status). Each index of the run takes the next kind in turn.
MEMORY_MIX = (
    ("speech-pcm", 200),
    ("tts-distinct-reference", 200),  # a clip never seen before: encoded, cached, later evicted
    ("speech-wav", 200),
    ("unknown-voice", 400),
    ("tts-pooled-reference", 200),  # one of a few clips: cache hits
    ("empty-text", 400),
    ("cancelled-stream", 200),  # the client reads the first chunk and goes away
    ("tts-streaming", 200),
)
POOL_CLIPS = 4


def _memory_request(client: httpx.Client, index: int, plan: Plan, pool: list[dict]) -> tuple[str, int, int]:
    """One request of the mix; returns (kind, expected status, status)."""
    kind, expected = MEMORY_MIX[index % len(MEMORY_MIX)]
    rng = random.Random(index)
    n = tokens(rng, plan)
    text = f"Soak request number {index}."
    if kind in ("speech-pcm", "speech-wav"):
        response = client.post("/v1/audio/speech", json=speech_body(text, kind.split("-")[1], index, n))
    elif kind == "tts-distinct-reference":
        response = client.post("/v1/tts", json=tts_body(text, index, n, [reference(10_000 + index,
                                                                                   plan.clip_seconds)]))
    elif kind == "tts-pooled-reference":
        clip = pool[(index // len(MEMORY_MIX)) % len(pool)]  # each pooled clip in turn
        response = client.post("/v1/tts", json=tts_body(text, index, n, [clip]))
    elif kind == "unknown-voice":
        response = client.post("/v1/audio/speech", json=speech_body(text, "pcm", index, n, voice=f"nobody-{index}"))
    elif kind == "empty-text":
        if index % 2:
            response = client.post("/v1/tts", json=tts_body("", index, n))
        else:
            response = client.post("/v1/audio/speech", json=speech_body("", "pcm", index, n))
    elif kind == "cancelled-stream":
        body = speech_body(text, "pcm", index, plan.disconnect_tokens)
        with client.stream("POST", "/v1/audio/speech", json=body) as response:
            if response.status_code == 200:
                for chunk in response.iter_raw():
                    if chunk:
                        break  # leaving the block closes the connection mid-stream
            else:
                response.read()
    elif kind == "tts-streaming":
        response = client.post("/v1/tts", json=tts_body(text, index, n, streaming=True, format="pcm"))
    else:  # pragma: no cover
        raise AssertionError(kind)
    return kind, expected, response.status_code


def run_memory(server: Server, plan: Plan) -> dict:
    """Warm up, then `plan.soak_requests` sequential requests of MEMORY_MIX; RSS before, during and after."""
    pool = [reference(i, plan.clip_seconds) for i in range(POOL_CLIPS)]
    statuses: dict[str, dict[str, int]] = {}
    mismatches: list[str] = []
    samples: list[dict] = []
    t0 = time.monotonic()
    deadline = t0 + max(600.0, plan.soak_requests * 2.0)  # a hard stop far beyond the expected run time
    with httpx.Client(base_url=server.url, timeout=plan.request_timeout_s) as client:
        total = plan.warmup_requests + plan.soak_requests
        for i in range(total):
            if time.monotonic() > deadline:
                mismatches.append(f"stopped at request {i}: the run passed its time bound")
                break
            if i == plan.warmup_requests:
                settle = server.wait_idle(plan.free_timeout_s)
                baseline = rss_bytes(server)
                samples.append({"request": i, "seconds": round(time.monotonic() - t0, 1), "rss": baseline,
                                "idle": settle["idle"]})
            try:
                kind, expected, status = _memory_request(client, i, plan, pool)
            except httpx.HTTPError as exc:
                kind, expected, status = MEMORY_MIX[i % len(MEMORY_MIX)][0], 0, 0
                mismatches.append(f"request {i} ({kind}): {type(exc).__name__}: {exc}"[:300])
            per = statuses.setdefault(kind, {})
            per[str(status)] = per.get(str(status), 0) + 1
            if status != expected and expected and len(mismatches) < 20:
                mismatches.append(f"request {i} ({kind}): {status}, expected {expected}")
            done = i + 1 - plan.warmup_requests
            if done > 0 and done % plan.rss_sample_every == 0 and done < plan.soak_requests:
                samples.append({"request": i + 1, "seconds": round(time.monotonic() - t0, 1),
                                "rss": rss_bytes(server)})
        settle = server.wait_idle(plan.free_timeout_s)
        final = rss_bytes(server)
        samples.append({"request": plan.warmup_requests + plan.soak_requests,
                        "seconds": round(time.monotonic() - t0, 1), "rss": final, "idle": settle["idle"]})
        counters = health(client)["counters"]
    baseline = samples[0]["rss"]
    return {
        "warmup_requests": plan.warmup_requests, "requests": plan.soak_requests,
        "seconds": round(time.monotonic() - t0, 1),
        "rss_before": baseline, "rss_after": final, "rss_peak_sampled": max(s["rss"] for s in samples),
        "growth_pct": round(100.0 * (final - baseline) / baseline, 2), "growth_limit_pct": RSS_GROWTH_LIMIT_PCT,
        "rss_over_time": samples, "statuses": statuses, "mismatches": mismatches,
        "distinct_references": sum(1 for i in range(plan.warmup_requests + plan.soak_requests)
                                   if MEMORY_MIX[i % len(MEMORY_MIX)][0] == "tts-distinct-reference"),
        "counters": counters, "idle_at_end": settle["idle"], "server_alive": server.alive,
    }


# ---------------------------------------------------------------------------------------------------------------
# c. Disconnects
# ---------------------------------------------------------------------------------------------------------------

async def _disconnecting_client(client: httpx.AsyncClient, index: int, plan: Plan, t0: float,
                                abandon_after_s: float | None) -> dict:
    """One long stream, closed after its first chunk, or after `abandon_after_s` if that comes first (a client
    that gives up while its request is still queued)."""
    body = speech_body(f"Streaming until the client goes away, number {index}.", "pcm", index,
                       plan.disconnect_tokens)
    out: dict[str, Any] = {"index": index}
    try:
        async with asyncio.timeout(abandon_after_s):
            async with client.stream("POST", "/v1/audio/speech", json=body) as response:
                out["status"] = response.status_code
                if response.status_code == 200:
                    async for chunk in response.aiter_raw():
                        if chunk:
                            out["first_chunk_s"] = time.monotonic() - t0
                            out["first_chunk_bytes"] = len(chunk)
                            break
                else:
                    out["body"] = (await response.aread())[:300].decode(errors="replace")
                    out["retry_after"] = response.headers.get("retry-after")
    except TimeoutError:
        out["abandoned"] = True
    except httpx.HTTPError as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"[:300]
    out["disconnected_s"] = time.monotonic() - t0  # the connection is closed on leaving the blocks
    return out


async def _disconnecting_clients(url: str, plan: Plan, clients: int, t0: float,
                                 abandon_after_s: float | None) -> list[dict]:
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=plan.request_timeout_s, limits=limits) as client:
        tasks = [asyncio.create_task(_disconnecting_client(client, i, plan, t0, abandon_after_s))
                 for i in range(clients)]
        done, pending = await asyncio.wait(tasks, timeout=plan.request_timeout_s * 2)
        for task in pending:
            task.cancel()
    results = [t.result() for t in done if not t.cancelled() and t.exception() is None]
    results += [{"error": f"client crashed: {t.exception()!r}"[:300]} for t in done
                if not t.cancelled() and t.exception() is not None]
    results += [{"error": "did not finish in time"} for _ in pending]
    return results


def _disconnect_round(server: Server, plan: Plan, clients: int, abandon_after_s: float | None,
                      free_timeout_s: float) -> dict:
    with httpx.Client(base_url=server.url) as c:
        before = health(c)
    t0 = time.monotonic()
    results = asyncio.run(_disconnecting_clients(server.url, plan, clients, t0, abandon_after_s))
    gone = time.monotonic() - t0
    freed = server.wait_idle(free_timeout_s, interval=0.01)
    freed_at = time.monotonic() - t0
    with httpx.Client(base_url=server.url) as c:
        after = health(c)
    last_disconnect = max((r.get("disconnected_s", 0.0) for r in results), default=0.0)
    statuses: dict[str, int] = {}
    for r in results:
        key = "abandoned" if r.get("abandoned") else str(r.get("status", "error"))
        statuses[key] = statuses.get(key, 0) + 1
    streamed = [r for r in results if "first_chunk_s" in r]
    b, a = before["counters"], after["counters"]
    frames = a.get("generated_tokens", None)
    frames = None if frames is None else frames - b.get("generated_tokens", 0)
    last = freed["last"] or {}
    return {
        "clients": clients, "max_new_tokens": plan.disconnect_tokens, "abandon_after_s": abandon_after_s, "statuses": dict(sorted(statuses.items())),
        "first_chunk": percentiles_ms([r["first_chunk_s"] for r in streamed]),
        "errors": [r["error"] for r in results if "error" in r][:20],
        "unexpected": [f"{r['status']}: {r.get('body', '')}" for r in results
                       if r.get("status") not in (None, *ALLOWED)][:20],
        "missing_retry_after": sum(1 for r in results if r.get("status") == 429 and not r.get("retry_after")),
        "last_disconnect_s": round(last_disconnect, 3), "clients_done_s": round(gone, 3),
        "freed": freed["idle"], "free_timeout_s": free_timeout_s,
        # From the last client's disconnect to the first health answer with nothing in flight.
        "free_seconds": round(freed_at - last_disconnect, 3), "free_polls": freed["polls"],
        "free_steps": freed["steps"],
        "in_flight_after": last.get("counters", {}).get("in_flight"), "queue_depth_after": last.get("queue_depth"),
        "decode_steps": a.get("decode_steps", 0) - b.get("decode_steps", 0),
        "frames_generated": frames,
        "frames_per_request": None if frames is None else round(frames / max(1, len(results)), 1),
    }


def run_disconnects(server: Server, plan: Plan) -> dict:
    """`plan.disconnect_clients` long streams closed after their first chunk; then the time until every row and
    queue slot is free (asserted by the tests). Then `plan.queued_clients` more, each giving up after
    `plan.abandon_after_s`, most of them while still queued (recorded: how long the server keeps working for
    clients that have gone; eventually freed is asserted)."""
    result = _disconnect_round(server, plan, plan.disconnect_clients, None, plan.free_timeout_s)
    result["queued"] = _disconnect_round(server, plan, plan.queued_clients, plan.abandon_after_s,
                                         plan.request_timeout_s)
    result["server_alive"] = server.alive
    return result


# ---------------------------------------------------------------------------------------------------------------
# Running and reporting
# ---------------------------------------------------------------------------------------------------------------

#: The server settings of each scenario. Concurrency keeps the default queue (16) so that 64 clients meet 429s;
#: disconnects need a queue of at least 64 so that most of the 50 are admitted.
SCENARIO_ENV = {
    "concurrency": {},
    "memory": {},
    "disconnects": {"SHOAL_QUEUE_SIZE": "64"},
}
SCENARIOS = {"concurrency": run_concurrency, "memory": run_memory, "disconnects": run_disconnects}


def run_scenario(name: str, checkpoint: Path, root: Path, plan: Plan) -> dict:
    """Start a server for one scenario, run it, stop the server; the result says whether it was alive."""
    server = make_server(checkpoint, Path(root) / name, env=SCENARIO_ENV[name])
    try:
        server.start()  # inside the try: a server that never gets ready is stopped too
        started_rss = rss_bytes(server)
        result = SCENARIOS[name](server, plan)
        result["server_env"] = SCENARIO_ENV[name]
        result["rss_at_start"] = started_rss
        result["server_log_errors"] = log_errors(server)
        return result
    finally:
        code = server.stop()
        print(f"[soak] {name}: server stopped with exit code {code}; log {server.log}", file=sys.stderr)


def log_errors(server: Server, limit: int = 10) -> list[str]:
    """ERROR lines and tracebacks in the server log (a 500 logs one)."""
    try:
        lines = server.log.read_text(errors="replace").splitlines()
    except OSError:
        return []
    return [line[:300] for line in lines if " ERROR " in line or "Traceback" in line][:limit]


def environment() -> dict:
    import torch

    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None

    return {
        "date": dt.date.today().isoformat(), "time": dt.datetime.now().isoformat(timespec="seconds"),
        "cores": os.cpu_count(), "physical_cores": psutil.cpu_count(logical=False),
        "cpu": platform.processor() or platform.machine(), "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
        "commit": git("rev-parse", "--short", "HEAD"), "src_modified": bool(git("status", "--porcelain", "src")),
        # The tree under test may be someone's work in progress: which files differ from the commit.
        "src_modified_files": sorted(line.split(None, 1)[-1] for line in (git("status", "--porcelain", "src") or "").splitlines()),
        "load_average_before": [round(x, 2) for x in os.getloadavg()],
    }


def run(plan: Plan, scenarios: list[str] | None = None, work_dir: Path | None = None) -> dict:
    report = {"plan": asdict(plan), "environment": environment(), "scenarios": {}}
    with tempfile.TemporaryDirectory(prefix="shoal-soak-", dir=work_dir) as tmp:
        checkpoint = write_tiny_checkpoint(Path(tmp) / "tiny", seed=1)
        for name in scenarios or list(SCENARIOS):
            print(f"[soak] {name} ({plan.label}) ...", file=sys.stderr, flush=True)
            t = time.monotonic()
            report["scenarios"][name] = run_scenario(name, checkpoint, Path(tmp), plan)
            print(f"[soak] {name}: {time.monotonic() - t:.0f} s", file=sys.stderr, flush=True)
    report["environment"]["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    report["checks"] = checks(report)
    report["targets"] = targets(report)
    return report


def checks(report: dict) -> dict[str, bool]:
    """The correctness properties (what tests/load asserts), by name."""
    s = report["scenarios"]
    out = {}
    if "concurrency" in s:
        c = s["concurrency"]
        out["concurrency: only 200/429/503"] = not c["unexpected"] and set(c["statuses"]) <= {"200", "429", "503"}
        out["concurrency: every 429 has Retry-After"] = c["missing_retry_after"] == 0
        out["concurrency: no transport errors"] = c["transport_error_count"] == 0
        out["concurrency: every health poll answered"] = c["health"]["failure_count"] == 0 and c["health"]["n"] > 0
        out["concurrency: some requests succeeded"] = c["statuses"].get("200", 0) > 0
        out["concurrency: server alive"] = c["server_alive"]
    if "memory" in s:
        m = s["memory"]
        out["memory: every status as expected"] = not m["mismatches"]
        out[f"memory: RSS growth < {RSS_GROWTH_LIMIT_PCT:g}%"] = m["growth_pct"] < RSS_GROWTH_LIMIT_PCT
        out["memory: idle at the end"] = m["idle_at_end"]
        out["memory: server alive"] = m["server_alive"]
    if "disconnects" in s:
        d = s["disconnects"]
        out["disconnects: only 200/429/503"] = not d["unexpected"] and not d["errors"]
        out["disconnects: in_flight and queue_depth back to 0"] = d["freed"]
        out["disconnects: server alive"] = d["server_alive"]
        out["disconnects (given up while queued): no errors"] = not d["queued"]["unexpected"] and not d["queued"]["errors"]
        out["disconnects (given up while queued): eventually freed"] = d["queued"]["freed"]
    for name, result in s.items():
        out[f"{name}: no ERROR or traceback in the server log"] = not result.get("server_log_errors")
    return out


#: Timed targets: recorded and reported, never asserted (benchmarks are not tests).
FREE_TARGET_S = 1.0


def targets(report: dict) -> dict[str, dict]:
    s = report["scenarios"]
    out = {}
    if "concurrency" in s:
        p99 = s["concurrency"]["health"]["p99_ms"]
        out["health p99 under load"] = {"target": f"< {HEALTH_P99_TARGET_MS:g} ms", "value": f"{p99} ms",
                                        "met": p99 is not None and p99 < HEALTH_P99_TARGET_MS}
    if "disconnects" in s:
        for key, label in (("main", "after the first chunk"), ("queued", "given up while queued")):
            d = s["disconnects"] if key == "main" else s["disconnects"]["queued"]
            out[f"slots free after the last disconnect ({label})"] = {
                "target": f"< {FREE_TARGET_S:g} s", "value": f"{d['free_seconds']} s",
                "met": d["freed"] and d["free_seconds"] < FREE_TARGET_S}
        q = s["disconnects"]["queued"]["frames_per_request"]
        if q is not None:
            out["frames generated for a client that gave up while queued"] = {
                "target": "<= 12 (its first chunk at most)", "value": str(q), "met": q <= 12}
    return out


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f} MiB"


def markdown(report: dict) -> str:
    env, plan, s = report["environment"], report["plan"], report["scenarios"]
    lines = [f"# Load and soak: {env['date']} ({plan['label']})", "",
             f"`python bench/soak.py --{plan['label']}`: a live `shoal serve --no-ui` on 127.0.0.1 with the tiny "
             "random checkpoint (`shoal.testing.write_tiny_checkpoint(seed=1)`), CPU, float32; clients in the same "
             "machine, so they compete with the server for the cores.", "",
             f"- machine: {env['cores']} cores ({env['physical_cores']} physical), {env['cpu']}, "
             f"{env['memory_gb']} GB; {env['platform']}",
             f"- torch {env['torch']}, Python {env['python']}; commit {env['commit']}"
             + (f" with uncommitted changes in {', '.join(env.get('src_modified_files') or ['src/'])}"
                if env["src_modified"] else ""),
             f"- load average before {env['load_average_before']}, after {env.get('load_average_after')}", ""]
    if "concurrency" in s:
        c, h = s["concurrency"], s["concurrency"]["health"]
        target = "met" if h["p99_ms"] is not None and h["p99_ms"] < h["p99_target_ms"] else "missed"
        lines += ["## a. Concurrency", "",
                  f"{c['clients']} clients for {c['seconds']} s (default queue of 16, so most meet 429 and back "
                  f"off by Retry-After, capped at {RETRY_CAP_S} s), each posting short requests "
                  f"(`max_new_tokens` {plan['max_new_tokens'][0]}-{plan['max_new_tokens'][1]}) in turn: "
                  "/v1/audio/speech pcm (streamed), /v1/audio/speech wav, /v1/tts wav. GET /v1/health polled every "
                  f"{h['interval_ms']:g} ms from a thread of its own.", "",
                  "| figure | value |", "|---|---:|",
                  f"| requests answered | {c['requests']} |"]
        for code, n in c["statuses"].items():
            lines.append(f"| status {code} | {n} |")
        retry = c["retry_after_values"]
        lines += [f"| 429 without Retry-After | {c['missing_retry_after']} |",
                  f"| Retry-After values sent (s) | {', '.join(retry) if retry else '-'} |",
                  f"| other statuses / transport errors | {len(c['unexpected'])} / {c['transport_error_count']} |",
                  f"| successful requests per second | {c['ok_per_second']} |",
                  f"| latency of a 200, p50 / p99 | {c['latency_200']['p50_ms']} / {c['latency_200']['p99_ms']} ms |",
                  f"| health polls (unanswered) | {h['n']} ({h['failure_count']}) |",
                  f"| **health p50 / p99 / max** | **{h['p50_ms']} / {h['p99_ms']} / {h['max_ms']} ms** |",
                  f"| health p99 target < {h['p99_target_ms']:g} ms | {target} |",
                  f"| decode steps | {c['decode_steps']} |",
                  f"| server alive at the end | {c['server_alive']} |", ""]
        lines += ["By endpoint: " + "; ".join(f"{k} {v}" for k, v in c["by_endpoint"].items()), ""]
    if "memory" in s:
        m = s["memory"]
        lines += ["## b. Memory", "",
                  f"{m['warmup_requests']} warm-up requests, then {m['requests']} sequential ones cycling through: "
                  + ", ".join(f"{k} ({v})" for k, v in MEMORY_MIX)
                  + f". {m['distinct_references']} distinct inline clips of {plan['clip_seconds']} s at 44.1 kHz "
                  "with `use_memory_cache: on` (the cache keeps 16), plus 4 pooled clips. RSS of the server "
                  "process, sampled once idle.", "",
                  "| figure | value |", "|---|---:|",
                  f"| RSS after warm-up | {_mb(m['rss_before'])} |",
                  f"| RSS at the end | {_mb(m['rss_after'])} |",
                  f"| **growth** | **{m['growth_pct']} %** (limit {m['growth_limit_pct']:g} %) |",
                  f"| highest sample | {_mb(m['rss_peak_sampled'])} |",
                  f"| run time | {m['seconds']} s |",
                  f"| statuses not as expected | {len(m['mismatches'])} |",
                  f"| reference cache hits / misses / codec encodes | {m['counters'].get('reference_cache_hits', '-')} / "
                  f"{m['counters'].get('reference_cache_misses', '-')} / {m['counters'].get('codec_encodes', '-')} "
                  f"(one miss per distinct clip, {m['distinct_references']} + {POOL_CLIPS} pooled) |",
                  f"| server alive at the end | {m['server_alive']} |", "",
                  "Statuses: " + "; ".join(f"{k} {v}" for k, v in m["statuses"].items()), "",
                  "RSS over time: " + ", ".join(f"{x['request']}: {x['rss'] / 2**20:.1f}" for x in m["rss_over_time"])
                  + " (request: MiB)", ""]
    if "disconnects" in s:
        d, q = s["disconnects"], s["disconnects"]["queued"]
        lines += ["## c. Disconnects", "",
                  f"{d['clients']} clients open a streamed /v1/audio/speech (pcm, `max_new_tokens` "
                  f"{d['max_new_tokens']}) at once and close the connection after the first chunk "
                  f"(queue {d['server_env'].get('SHOAL_QUEUE_SIZE', 16)}, batch 4). Then GET /v1/health every 10 ms "
                  "until `counters.in_flight` and `queue_depth` are 0 (bounded). The second column: "
                  f"{q['clients']} more clients, each giving up after {q['abandon_after_s']:g} s (before its first "
                  "chunk), most while their request is still queued.", "",
                  "| figure | after the first chunk | given up while queued |", "|---|---:|---:|"]
        for code in sorted(set(d["statuses"]) | set(q["statuses"])):
            lines.append(f"| {code} | {d['statuses'].get(code, 0)} | {q['statuses'].get(code, 0)} |")
        lines += [f"| first chunk p50 / max (from the start) | {d['first_chunk']['p50_ms']} / "
                  f"{d['first_chunk']['max_ms']} ms | {q['first_chunk']['p50_ms']} / {q['first_chunk']['max_ms']} ms |",
                  f"| last client gone after | {d['last_disconnect_s']} s | {q['last_disconnect_s']} s |",
                  f"| **slots free after the last disconnect** | **{d['free_seconds']} s** | **{q['free_seconds']} s** |",
                  f"| decode steps while waiting for that | {d['free_steps']} | {q['free_steps']} |",
                  f"| freed (in_flight, queue_depth) | {d['freed']} ({d['in_flight_after']}, {d['queue_depth_after']}) "
                  f"| {q['freed']} ({q['in_flight_after']}, {q['queue_depth_after']}) |",
                  f"| frames generated per request | {d['frames_per_request']} | {q['frames_per_request']} |",
                  f"| decode steps in all | {d['decode_steps']} | {q['decode_steps']} |",
                  f"| server alive at the end | {d['server_alive']} | |", "",
                  "The first chunk needs 12 frames (`SHOAL_STREAM_FIRST_FRAMES` 11, plus the newest frame, "
                  "which is decoded with the next chunk), so ~12-14 frames per request means each "
                  "generation stopped at its first chunk.", ""]
    lines += ["## Timed targets (recorded, not asserted)", "", "| figure | target | value | |", "|---|---|---:|---|"]
    lines += [f"| {k} | {v['target']} | {v['value']} | {'met' if v['met'] else 'missed'} |"
              for k, v in report.get("targets", {}).items()] + [""]
    lines += ["## Checks (asserted by tests/load)", ""]
    lines += [f"- {'ok' if v else 'FAILED'}: {k}" for k, v in report["checks"].items()] + [""]
    errors = [e for sc in s.values() for e in sc.get("server_log_errors", [])]
    if errors:
        lines += ["Server log errors:", "", "```", *errors, "```", ""]
    return "\n".join(lines)


def write(report: dict, out: Path, label: str = "load") -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{report['environment']['date']}-{label}"
    md, js = stem.with_suffix(".md"), stem.with_suffix(".json")
    md.write_text(markdown(report))
    js.write_text(json.dumps(report, indent=2) + "\n")
    return md, js


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="the short plan (the default; what tests/load runs)")
    mode.add_argument("--full", action="store_true", help="the full plan; writes bench/results/<date>-load.*")
    parser.add_argument("--scenario", action="append", choices=list(SCENARIOS), help="run only these (repeatable)")
    parser.add_argument("--out", type=Path, help="write <date>-load.md/.json here (default with --full: "
                        "bench/results; --quick writes nothing unless given)")
    args = parser.parse_args(argv)
    plan = FULL if args.full else QUICK
    report = run(plan, args.scenario)
    print(markdown(report))
    out = args.out or (RESULTS if args.full else None)
    if out is not None:
        label = "load" if plan is FULL else "load-quick"
        for path in write(report, out, label):
            print(f"[soak] wrote {path}", file=sys.stderr)
    return 0 if all(report["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
