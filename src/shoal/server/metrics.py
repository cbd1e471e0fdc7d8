"""What operators watch: Prometheus metrics at /metrics and one structured access-log line per request.

The metrics live in a registry of the app's own (no process-global state, so two apps in one process, as in
tests, never share counters). Request-level figures are observed as requests end; engine and process figures
are read from the service when /metrics is scraped, so they cost nothing between scrapes.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Callable

import psutil
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.process_collector import ProcessCollector

from shoal.service import Job, Service

access_log = logging.getLogger("shoal.access")

#: Seconds: from a tenth of a second (the tiny model, a warm GPU) to the 600 s request timeout.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
#: Methods the request counter names; any other token (HTTP allows them all) counts as "other", so made-up
#: methods cannot add label sets without bound.
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT"})
#: Seconds a live WebSocket stays open: one short utterance to a long conversation.
SESSION_BUCKETS = (1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
#: The live WebSocket's route, as the access log names it.
LIVE_ROUTE = "/v1/tts/live"
#: Wall time over audio time: below 1 is faster than real time.
RTF_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 5.0, 10.0)


class Metrics:
    """The app's Prometheus registry and the observations that feed it."""

    def __init__(self, service: Callable[[], Service | None]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("shoal_http_requests", "HTTP requests by route, method and status",
                                ["route", "method", "status"], registry=r)
        self.speech = Counter("shoal_speech_requests", "Speech requests by model and how they ended "
                              "(ok, error, cancelled, timeout, busy)", ["model", "outcome"], registry=r)
        self.first_audio = Histogram("shoal_time_to_first_audio_seconds", "From admission to the first audio "
                                     "chunk", ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("shoal_speech_latency_seconds", "From admission to the last audio chunk of "
                                 "a completed speech request", ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.rtf = Histogram("shoal_real_time_factor", "Wall time over audio time of completed speech requests",
                             ["model"], buckets=RTF_BUCKETS, registry=r)
        self.audio_seconds = Counter("shoal_audio_seconds", "Seconds of audio generated", ["model"], registry=r)
        self.live_sessions = Counter("shoal_live_sessions", "Live WebSocket sessions by how they ended: closed, "
                                     "disconnected, idle, bad_input, limit, busy, server_error, or refused at the "
                                     "handshake (unauthorized, rate_limited, unavailable)", ["reason"], registry=r)
        self.live_active = Gauge("shoal_live_sessions_active", "Live WebSocket sessions open now", registry=r)
        self.live_duration = Histogram("shoal_live_session_duration_seconds", "How long accepted live WebSocket "
                                       "sessions stayed open", buckets=SESSION_BUCKETS, registry=r)
        self.live_segments = Counter("shoal_live_segments", "Text segments spoken on live WebSockets", registry=r)
        self.live_audio_seconds = Counter("shoal_live_audio_seconds", "Seconds of audio spoken on live WebSockets",
                                          registry=r)
        ProcessCollector(registry=r)  # process_* (CPU, open files, RSS) where /proc exists
        r.register(_ServiceCollector(service))

    def observe_job(self, job: Job) -> None:
        """A Dispatcher listener: called once per speech request, however it ended."""
        self.speech.labels(job.model, job.outcome).inc()
        if job.samples:
            self.audio_seconds.labels(job.model).inc(job.audio_seconds)
        if job.first_audio is not None:
            self.first_audio.labels(job.model).observe(job.first_audio)
        if job.outcome == "ok" and job.seconds is not None:
            self.latency.labels(job.model).observe(job.seconds)
            if job.samples:
                self.rtf.labels(job.model).observe(job.seconds / job.audio_seconds)

    def observe_live_segment(self, job: Job) -> None:
        """A LiveSession listener: one live segment has been spoken (counted as it happens, not when its
        session ends: a pooled socket may stay open for minutes)."""
        self.live_segments.inc()
        self.live_audio_seconds.inc(job.audio_seconds)

    def observe_live(self, request_id: str, reason: str, seconds: float | None = None, segments: int = 0,
                     audio_seconds: float = 0.0, close_code: int | None = None) -> None:
        """A live WebSocket session has ended (`seconds` None: refused at the handshake): its metrics and its
        access-log line, which never has the text or the audio."""
        self.live_sessions.labels(reason).inc()
        if seconds is not None:
            self.live_duration.observe(seconds)
        access_log.info("request_id=%s method=WEBSOCKET route=%s close_code=%s reason=%s segments=%d audio_s=%.2f "
                        "duration_ms=%.1f", request_id, LIVE_ROUTE, close_code if close_code is not None else "-",
                        reason, segments, audio_seconds, (seconds or 0.0) * 1000)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _ServiceCollector:
    """Gauges and counters read from the service at scrape time."""

    def __init__(self, service: Callable[[], Service | None]):
        self.service = service

    def describe(self):
        return []  # values depend on what is loaded; skip the registration-time dry run

    def collect(self):
        service = self.service()
        ready = GaugeMetricFamily("shoal_ready", "1 once the engines have loaded")
        ready.add_metric([], 1.0 if service is not None else 0.0)
        yield ready
        rss = GaugeMetricFamily("shoal_process_resident_memory_bytes", "Resident memory of this process")
        rss.add_metric([], float(psutil.Process().memory_info().rss))
        yield rss
        yield from _gpu_memory()
        if service is None:
            return
        yield _gauge("shoal_queue_depth", "Speech requests waiting or running (429 beyond the queue size)",
                     service.dispatcher.depth)
        counters = service.counters()
        yield _counter("shoal_codec_encodes", "Reference clips run through the codec encoder",
                       counters["codec_encodes"])
        yield _counter("shoal_codec_decoded_frames", "Frames run through the codec decoder (left context "
                       "included)", counters["codec_frames"])
        yield _counter("shoal_voice_cache_hits", "Saved-voice requests whose codes were in memory",
                       counters["voice_cache_hits"])
        yield _counter("shoal_voice_cache_misses", "Saved-voice requests whose codes were read from disk or "
                       "recomputed", counters["voice_cache_misses"])
        yield _gauge("shoal_engine_in_flight", "Requests submitted to the engines and not yet ended",
                     counters["in_flight"])
        yield _gauge("shoal_batch_size", "Rows in the running decode batch", counters["batch_size"])
        yield _counter("shoal_decode_steps", "Batched decode steps run", counters["decode_steps"])
        yield _counter("shoal_generated_tokens", "Frames (tokens) generated", counters["generated_tokens"])
        yield _gauge("shoal_generated_tokens_per_second", "Frames generated per second over the last 10 s",
                     counters["tokens_per_second"])
        yield _counter("shoal_isolated_faults", "Failed batched decode steps replayed row by row",
                       counters["isolated_faults"])
        yield _counter("shoal_codec_batched_calls", "Codec decoder calls that served more than one request",
                       counters["codec_batches"])
        yield _counter("shoal_reference_cache_hits", "Inline reference clips found in the in-memory cache",
                       counters["reference_cache_hits"])
        yield _counter("shoal_reference_cache_misses", "Inline reference clips not in the in-memory cache",
                       counters["reference_cache_misses"])
        if service.engines.replicas is not None:  # shoal.cluster: each engine replica, labelled by its id
            yield from _replica_metrics(service.engines.replicas())


def _replica_metrics(cluster: dict):
    requests = CounterMetricFamily("shoal_replica_requests", "Speech requests an engine replica has taken",
                                   labels=["replica"])
    in_flight = GaugeMetricFamily("shoal_replica_in_flight", "Requests running on an engine replica (as of its "
                                  "last report)", labels=["replica"])
    age = GaugeMetricFamily("shoal_replica_report_age_seconds", "Seconds since an engine replica last reported",
                            labels=["replica"])
    for replica in cluster["replicas"]:
        requests.add_metric([replica["id"]], float(replica["requests"]))
        in_flight.add_metric([replica["id"]], float(replica["in_flight"]))
        age.add_metric([replica["id"]], float(replica["seconds_since_report"]))
    yield from (requests, in_flight, age)
    yield _counter("shoal_replica_retries", "Requests retried on another replica after theirs died before the "
                   "first audio chunk", cluster["retries"])


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    metric = GaugeMetricFamily(name, doc)
    metric.add_metric([], float(value))
    return metric


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    metric = CounterMetricFamily(name, doc)
    metric.add_metric([], float(value))
    return metric


def _gpu_memory():
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return
    allocated = GaugeMetricFamily("shoal_gpu_memory_allocated_bytes", "GPU memory held by tensors", labels=["device"])
    reserved = GaugeMetricFamily("shoal_gpu_memory_reserved_bytes", "GPU memory held by the caching allocator",
                                 labels=["device"])
    for index in range(torch.cuda.device_count()):
        allocated.add_metric([str(index)], float(torch.cuda.memory_allocated(index)))
        reserved.add_metric([str(index)], float(torch.cuda.memory_reserved(index)))
    yield allocated
    yield reserved


class RequestLog:
    """ASGI middleware: one access-log line per request once its body has been sent (streams included), and
    the request counter. The line has the request id, method, route, status, audio seconds and latency; never
    the text or the audio."""

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        request_id = _request_id(dict(scope.get("headers") or []).get(b"x-request-id"))
        status = 500
        logged = False

        def log_once() -> None:
            nonlocal logged
            if logged:
                return
            logged = True
            route = route_label(scope)
            method = scope["method"] if scope["method"] in HTTP_METHODS else "other"  # any token is a method
            self.metrics.requests.labels(route, method, str(status)).inc()
            job = (scope.get("state") or {}).get("job")
            audio = job.audio_seconds if isinstance(job, Job) else 0.0
            access_log.info("request_id=%s method=%s route=%s status=%d audio_s=%.2f latency_ms=%.1f", request_id,
                            scope["method"], route, status, audio, (time.perf_counter() - start) * 1000)

        async def logged_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"x-request-id", request_id.encode())]}
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                log_once()

        try:
            await self.app(scope, receive, logged_send)
        finally:
            log_once()  # the client went away mid-stream, or nothing was sent


def request_id_of(headers) -> str:
    """A connection's request id (see _request_id) from its Starlette headers."""
    given = headers.get("x-request-id")
    return _request_id(given.encode("latin-1") if given is not None else None)


def _request_id(given: bytes | None) -> str:
    """The client's X-Request-Id when it is a short printable token (it goes into logs), else a fresh one."""
    if given and len(given) <= 64 and all(33 <= c < 127 for c in given):
        return given.decode()
    return uuid.uuid4().hex[:12]


def route_label(scope) -> str:
    """The matched route's template (bounded cardinality: never the raw path of a 404 or of the UI's assets)."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    if path is None:
        return "unmatched"
    if type(route).__name__ == "Mount":
        return "ui"
    return path
