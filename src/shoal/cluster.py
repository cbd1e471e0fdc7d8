"""shoal on Ray Serve: one ingress (the same FastAPI app as `shoal serve`) in front of engine replicas.

Two deployments, both built from the one composition root:

- `ShoalEngine`, one replica per device: loads the engines once (`registry.load_engines`, as `shoal serve` does)
  and streams a request's events (`started`, `audio`, `segment`, `progress`, `error`, `end`) back through a
  `DeploymentHandle`. It also encodes clips with its codec (saved voices, live references) and reports its stats.
- `ShoalIngress`: `create_app(settings, loader)` exactly as `shoal serve` builds it, except that its engines
  loader returns `RemoteEngine`s. Routers, the Service and its Dispatcher, validation, the voice library, the UI
  and /metrics run unchanged in the ingress; only `Engine.submit` crosses to a replica.

A request that has not produced its first audio chunk when its replica dies is retried once (Serve routes it
to a live replica); after the first chunk the stream fails, and audio from two replicas is never spliced.

Nothing outside this module imports ray: `shoal serve` without `--replicas` stays Ray-free.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import pickle
import threading
import time
import uuid
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Iterator

import numpy as np

try:
    import ray
    from ray import serve
    from ray.exceptions import RayActorError
except ImportError as exc:  # pragma: no cover - exercised by the CLI without ray
    from shoal.cluster_config import NEEDS_RAY
    raise ImportError(f"shoal's cluster mode {NEEDS_RAY}") from exc

from shoal.cluster_config import (APP_NAME, ENGINE_DEPLOYMENT, Replicas, engine_options,
                                  ingress_options)
from shoal.engines.base import (EngineStats, Progress, Reference, Sink, Synthesis, SynthesisRequest,
                                run_blocking, synthesize_blocking)
from shoal.engines.registry import Engines, load_engines
from shoal.errors import EngineFailure, ShoalError, Timeout, Unavailable
from shoal.settings import Settings

log = logging.getLogger("shoal.cluster")

#: `shoal serve --replicas auto` on a machine without a GPU: at most this many CPU replicas.
CPU_AUTO_MAX_REPLICAS = 2
#: How often a replica's stats reach the ingress (/metrics, /v1/health): every stream carries them this often, and
#: the ingress polls the deployment as often (Serve routes a poll to the least busy replica, so idle replicas are
#: the ones polled, and busy ones report through their streams).
STATS_POLL_SECONDS = 2.0
#: A replica that has not reported for this long is dropped from /v1/health and /metrics (it is gone: an idle one
#: is polled every few seconds).
REPLICA_FORGET_SECONDS = 300.0
#: How long the ingress waits for the first engine replica to describe its models before giving up.
DESCRIBE_TIMEOUT_SECONDS = 600.0
#: Ray's object store on a single machine: small enough for Docker's 64 MB /dev/shm (audio chunks are tiny).
LOCAL_OBJECT_STORE_BYTES = 80 * 1024 * 1024


# -- what crosses between the ingress and a replica ------------------------------------------------------------
@dataclass(frozen=True)
class ModelInfo:
    """What the ingress needs to know of one engine to stand in for it."""

    name: str
    sample_rate: int
    supports_cloning: bool
    codec_checksum: str | None = None
    device: str | None = None
    precision: str | None = None


@dataclass(frozen=True)
class EnginesInfo:
    """A replica's `Engines`, less the engines themselves."""

    models: dict[str, ModelInfo]
    default: str
    notice: str | None
    checkpoints: dict[str, str]
    aliases: dict[str, str]


def portable(exc: BaseException) -> BaseException:
    """`exc` if it survives pickling (shoal's errors do), else an EngineFailure with its message."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return EngineFailure(str(exc) or type(exc).__name__)


class _QueueSink(Sink):
    """A replica-side sink: the engine thread posts its events onto the replica's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()

    def _post(self, event: tuple) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:
            pass  # the replica's loop is gone: nobody listens any more

    def audio(self, chunk: np.ndarray) -> None:
        self._post(("audio", np.ascontiguousarray(chunk, np.float32)))

    def segment(self, segment) -> None:
        self._post(("segment", segment))

    def end(self, error: BaseException | None = None) -> None:
        self._post(("end", error))


# -- the engine deployment -------------------------------------------------------------------------------------
class EngineReplica:
    """One replica: the engines of `registry.load_engines`, warmed up, behind a streaming method."""

    def __init__(self, settings: Settings):
        from shoal.compose import warm_up_engines

        logging.basicConfig(level=settings.log_level.upper())
        self.settings = settings
        self.engines: Engines = load_engines(settings)
        warm_up_engines(self.engines)
        context = _replica_context()
        self.replica_id = context or f"local-{uuid.uuid4().hex[:8]}"
        self.pid = os.getpid()
        self.requests = 0

    def describe(self) -> EnginesInfo:
        models = {}
        for name, engine in self.engines.engines.items():
            checksum = engine.codec_checksum if hasattr(engine, "encode_audio") else None
            models[name] = ModelInfo(name, engine.sample_rate, engine.supports_cloning, checksum,
                                     _text(getattr(engine, "device", None)), _text(getattr(engine, "precision", None)))
        return EnginesInfo(models, self.engines.default, self.engines.notice,
                           {k: str(v) for k, v in self.engines.checkpoints.items()}, dict(self.engines.aliases))

    def stats(self) -> dict:
        return {"replica": self.replica_id, "pid": self.pid, "requests": self.requests, "seen": time.time(),
                "models": {name: asdict(engine.stats()) for name, engine in self.engines.engines.items()}}

    def encode_audio(self, model: str, audio: np.ndarray) -> np.ndarray:
        return self.engines.engines[model].encode_audio(audio)

    def encode_reference(self, model: str, reference: Reference) -> np.ndarray:
        return self.engines.engines[model].encode_reference(reference).numpy()

    async def synthesize(self, model: str, request: SynthesisRequest, stream: bool = True,
                         with_progress: bool = False):
        """The request's events: ("started", replica, pid) once the engine took it, ("stats", stats) then and
        every STATS_POLL_SECONDS, ("audio", chunk), ("segment", Segment), ("progress", done, total) as they come,
        and ("error", exc) or ("end", stats)."""
        loop = asyncio.get_running_loop()
        sink = _QueueSink(loop)
        cancel = threading.Event()
        progress = (lambda done, total: sink._post(("progress", done, total))) if with_progress else None
        engine = self.engines.engines[model]
        self.requests += 1
        try:
            await asyncio.to_thread(engine.submit, request, sink, cancel, stream, progress)
        except Exception as exc:
            yield ("error", portable(exc))
            return
        yield ("started", self.replica_id, self.pid)
        yield ("stats", self.stats())  # the ingress sees this request in flight here at once
        reported = time.monotonic()
        try:
            while True:
                try:
                    wait = max(0.0, reported + STATS_POLL_SECONDS - time.monotonic())
                    event = await asyncio.wait_for(sink.queue.get(), timeout=wait)
                except asyncio.TimeoutError:
                    event = None
                if time.monotonic() - reported >= STATS_POLL_SECONDS:
                    reported = time.monotonic()
                    yield ("stats", self.stats())
                if event is None:
                    continue
                if event[0] == "end":
                    if event[1] is not None:
                        yield ("error", portable(event[1]))
                    else:
                        yield ("end", self.stats())
                    return
                yield event
        finally:
            cancel.set()  # the ingress cancelled the stream (client gone) or it ended: stop generating

    def check_health(self) -> None:
        """Serve's health check: a replica whose engines' threads died is replaced."""
        for engine in self.engines.engines.values():
            scheduler = getattr(engine, "scheduler", None)
            thread = getattr(scheduler, "thread", None) or getattr(scheduler, "_thread", None)
            if isinstance(thread, threading.Thread) and not thread.is_alive():
                raise RuntimeError(f"the {engine.name} engine's thread has stopped")


def _text(value) -> str | None:
    return None if value is None else str(value)


def _replica_context() -> str | None:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:
        return None


# -- the ingress side --------------------------------------------------------------------------------------------
class ReplicaBoard:
    """The latest stats each engine replica reported (with each finished stream, and polled), for /v1/health
    and /metrics."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.replicas: dict[str, dict] = {}
        self.retries = 0
        self.deployment_state: dict | None = None

    def update(self, stats: dict) -> None:
        with self._lock:
            known = self.replicas.get(stats["replica"])
            if known is None or known["seen"] <= stats["seen"]:
                self.replicas[stats["replica"]] = stats

    def forget(self, replica: str) -> None:
        """A replica seen to die: its last report no longer describes anything."""
        with self._lock:
            self.replicas.pop(replica, None)

    def _current(self) -> list[dict]:
        """The reports of replicas heard from within REPLICA_FORGET_SECONDS (the caller holds the lock)."""
        now = time.time()
        for replica in [r for r, stats in self.replicas.items() if now - stats["seen"] > REPLICA_FORGET_SECONDS]:
            del self.replicas[replica]
        return list(self.replicas.values())

    def model_stats(self, model: str) -> EngineStats:
        total = EngineStats()
        with self._lock:
            reports = [r["models"].get(model) for r in self._current()]
        for report in reports:
            if report:
                for f in fields(EngineStats):
                    setattr(total, f.name, getattr(total, f.name) + report.get(f.name, 0))
        return total

    def describe(self) -> dict:
        now = time.time()
        with self._lock:
            replicas = [{"id": r["replica"], "pid": r["pid"], "requests": r["requests"],
                         "seconds_since_report": round(now - r["seen"], 1),
                         "in_flight": sum(m.get("in_flight", 0) for m in r["models"].values())}
                        for r in self._current()]
        return {"replicas": sorted(replicas, key=lambda r: r["id"]), "retries": self.retries,
                "deployment": self.deployment_state}


class RemoteEngine:
    """The Engine protocol over a `DeploymentHandle` to the engine replicas: `submit` streams the request from a
    replica (`handle.options(stream=True)`) and feeds the sink from this engine's own event-loop thread."""

    def __init__(self, handle, info: ModelInfo, board: ReplicaBoard, loop: asyncio.AbstractEventLoop,
                 start_timeout: float = 600.0):
        self.handle = handle
        #: How long `submit` waits for a replica to take the request (Serve queues it while all are full).
        self.start_timeout = start_timeout
        self.name = info.name
        self.sample_rate = info.sample_rate
        self.supports_cloning = info.supports_cloning
        self.device = info.device
        self.precision = info.precision
        self._codec_checksum = info.codec_checksum
        self.board = board
        self.loop = loop

    @property
    def codec_checksum(self) -> str:
        if self._codec_checksum is None:
            raise AttributeError("codec_checksum")
        return self._codec_checksum

    # -- Engine --------------------------------------------------------------------------------------------------
    def submit(self, request: SynthesisRequest, sink: Sink, cancel: threading.Event | None = None,
               stream: bool = True, progress: Progress | None = None) -> None:
        request = _portable_request(request)
        cancel = cancel if cancel is not None else threading.Event()
        started: concurrent.futures.Future = concurrent.futures.Future()
        asyncio.run_coroutine_threadsafe(self._pump(request, sink, cancel, stream, progress, started), self.loop)
        try:  # the replica took it, or its refusal (BadRequest...) is raised here, like a local submit
            started.result(timeout=self.start_timeout)
        except concurrent.futures.TimeoutError:
            cancel.set()  # the pump's watcher cancels the queued Serve request
            raise Timeout(f"no engine replica took the request within {self.start_timeout:g} s") from None

    async def _pump(self, request, sink, cancel, stream, progress, started) -> None:
        retried = False
        while True:
            got_audio, replica = False, None
            responses = self.handle.options(stream=True).synthesize.remote(
                self.name, request, stream, progress is not None)
            watcher = asyncio.ensure_future(_cancel_when_set(cancel, responses))
            try:
                async for event in responses:
                    kind = event[0]
                    if kind == "audio":
                        got_audio = True
                        sink.audio(event[1])
                    elif kind == "segment":
                        sink.segment(event[1])
                    elif kind == "progress" and progress is not None:
                        progress(event[1], event[2])
                    elif kind == "started":
                        replica = event[1]
                        if not started.done():
                            started.set_result(replica)
                    elif kind == "error":
                        return _fail(started, sink, event[1])
                    elif kind in ("stats", "end"):
                        self.board.update(event[1])
                    if cancel.is_set():
                        break
                return _fail(started, sink, None)
            except BaseException as exc:
                if cancel.is_set():  # the caller cancelled (client gone, timeout): a quiet end
                    return _fail(started, sink, None)
                if isinstance(exc, RayActorError):
                    if replica is not None:
                        self.board.forget(replica)
                    if not got_audio and not retried:
                        retried = True
                        self.board.retries += 1
                        log.warning("engine replica died before the first audio chunk; retrying once: %s",
                                    str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
                        continue
                    return _fail(started, sink, EngineFailure("the engine replica serving this request stopped "
                                                              "mid-stream"))
                if isinstance(exc, asyncio.CancelledError):
                    _fail(started, sink, Unavailable("the ingress is shutting down"))
                    raise
                if isinstance(exc, ShoalError):
                    return _fail(started, sink, exc)
                log.error("streaming from an engine replica failed: %s", exc)
                return _fail(started, sink, EngineFailure(f"the engine replica failed: {type(exc).__name__}"))
            finally:
                watcher.cancel()

    def synthesize(self, request: SynthesisRequest, progress: Progress | None = None,
                   cancel: threading.Event | None = None, stream: bool = True) -> Iterator[np.ndarray]:
        return synthesize_blocking(self, request, progress=progress, cancel=cancel, stream=stream)

    def run(self, request: SynthesisRequest, progress: Progress | None = None,
            cancel: threading.Event | None = None) -> Synthesis:
        if request.seed is None:  # one seed for the whole request, reported back as run_blocking does
            from dataclasses import replace

            request = replace(request, seed=request.effective_seed())
        return run_blocking(self, request, progress=progress, cancel=cancel)

    def stats(self) -> EngineStats:
        return self.board.model_stats(self.name)

    def close(self) -> None:
        pass

    # -- the codec, for voices and live references ----------------------------------------------------------------
    def encode_audio(self, audio: np.ndarray) -> np.ndarray:
        """A clip's codes, computed by one replica (the voice library stores them for every other)."""
        return self.handle.encode_audio.remote(self.name, np.ascontiguousarray(audio, np.float32)).result()

    def encode_reference(self, reference: Reference):
        import torch

        codes = self.handle.encode_reference.remote(self.name, _portable_reference(reference)).result()
        return torch.from_numpy(codes)


def _fail(started: concurrent.futures.Future, sink: Sink, error: BaseException | None) -> None:
    """End the request: before `started`, through submit (which raises `error`, or returns if None);
    after it, through the sink."""
    if not started.done():
        if error is None:
            started.set_result(None)
            sink.end(None)
        else:
            started.set_exception(error)  # submit raises it; the Dispatcher ends the sink itself
    else:
        sink.end(error)


async def _cancel_when_set(cancel: threading.Event, responses) -> None:
    """Cancel the Serve stream (and so the replica's generation) as soon as the caller sets `cancel`, even while
    the request still waits in Serve's queue or for its next chunk."""
    while not cancel.is_set():
        await asyncio.sleep(0.05)
    responses.cancel()


def _portable_reference(ref: Reference) -> Reference:
    """Paths are the ingress's: a replica may run elsewhere, so the clip travels as bytes."""
    if ref.audio is None or isinstance(ref.audio, bytes):
        return ref
    return Reference(ref.read_bytes(), ref.text, codes=ref.codes, cache=ref.cache)


def _portable_request(request: SynthesisRequest) -> SynthesisRequest:
    from dataclasses import replace

    if all(r.audio is None or isinstance(r.audio, bytes) for r in request.references):
        return request
    return replace(request, references=tuple(_portable_reference(r) for r in request.references))


class _LoopThread:
    """An event loop on a daemon thread: the RemoteEngines' streams run there."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="shoal-remote", daemon=True)
        self.thread.start()


def remote_engines_loader(handle, board: ReplicaBoard, app_name: str = APP_NAME):
    """The ingress's `EnginesLoader`: Engines whose engines are RemoteEngines over `handle`."""

    def load(settings: Settings) -> Engines:
        deadline = time.monotonic() + DESCRIBE_TIMEOUT_SECONDS
        while True:
            try:
                info: EnginesInfo = handle.describe.remote().result(timeout_s=60)
                break
            except Exception as exc:
                if time.monotonic() > deadline:
                    raise
                log.info("waiting for an engine replica: %s", exc)
                time.sleep(1.0)
        loop = _LoopThread().loop
        engines = Engines(engines={name: RemoteEngine(handle, model, board, loop, settings.request_timeout)
                                   for name, model in
                                   info.models.items()},
                          default=info.default, notice=info.notice,
                          checkpoints={k: Path(v) for k, v in info.checkpoints.items()}, aliases=info.aliases,
                          replicas=board.describe)
        threading.Thread(target=_poll_stats, args=(handle, board, app_name), name="shoal-replica-stats",
                         daemon=True).start()
        return engines

    return load


def _poll_stats(handle, board: ReplicaBoard, app_name: str) -> None:
    while True:
        try:
            board.update(handle.stats.remote().result(timeout_s=10))
        except Exception as exc:
            log.debug("replica stats: %s", exc)
        try:
            status = serve.status().applications[app_name].deployments[ENGINE_DEPLOYMENT]
            board.deployment_state = {"status": str(status.status.value if hasattr(status.status, "value")
                                                    else status.status),
                                      "replica_states": {str(getattr(k, "value", k)): v
                                                         for k, v in status.replica_states.items()}}
        except Exception as exc:
            log.debug("serve status: %s", exc)
        time.sleep(STATS_POLL_SECONDS)


class Ingress:
    """The ingress deployment: `create_app` with remote engines, built on the replica (nothing is pickled)."""

    def __init__(self, engine_handle, settings: Settings, app_name: str = APP_NAME):
        self.engine_handle = engine_handle
        self.settings = settings
        self.app_name = app_name
        self.board = ReplicaBoard()

    def __serve_build_asgi_app__(self):
        from shoal.server.app import create_app

        logging.basicConfig(level=self.settings.log_level.upper())
        Path(self.settings.data_dir).mkdir(parents=True, exist_ok=True)
        return create_app(self.settings, remote_engines_loader(self.engine_handle, self.board, self.app_name))


# -- building the application -----------------------------------------------------------------------------------
def count_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:
        return 0


def local_replicas(replicas: int | str | None, gpus: int | None = None) -> Replicas:
    """`--replicas N|auto` on this machine: a number is fixed; `auto` autoscales from 1 to the number of GPUs,
    or to 2 on a CPU-only machine. BadRequest on anything else."""
    if replicas is None or str(replicas).strip().lower() == "auto":
        gpus = count_gpus() if gpus is None else gpus
        return Replicas(minimum=1, maximum=gpus or CPU_AUTO_MAX_REPLICAS)
    return Replicas.parse(replicas)


def application(settings: Settings, replicas: int | str | Replicas | None = "auto", app_name: str = APP_NAME):
    """The Serve application: the ingress bound to the engine deployment, with the options that
    `shoal cluster config` writes (cluster_config.engine_options / ingress_options) for these settings."""
    spec = replicas if isinstance(replicas, Replicas) else local_replicas(replicas)
    gpus = 1 if settings.device not in ("cpu", "mps") and count_gpus() > 0 else 0
    engine = serve.deployment(**engine_options(settings, spec, gpus=gpus, cpus=settings.torch_threads or 1))(
        EngineReplica)
    ingress = serve.deployment(**ingress_options(settings, spec))(serve.ingress()(Ingress))
    return ingress.bind(engine.bind(settings), settings, app_name)


def build_app(args: dict) -> "serve.Application":
    """`serve run shoal.cluster:build_app checkpoint=DIR replicas=2` and a Serve config's `import_path`: the
    application from shoal settings overrides (any Settings field, as strings or values) plus `replicas`."""
    args = dict(args or {})
    replicas = args.pop("replicas", "auto")
    app_name = args.pop("app_name", APP_NAME)
    settings = Settings.load(cli={k: v for k, v in args.items() if v is not None})
    return application(settings, replicas, app_name)


def start_local_ray(settings: Settings) -> None:
    """A Ray of this machine only, with an object store that fits Docker's 64 MB /dev/shm."""
    if ray.is_initialized():
        return
    # Ray's minimum store is 75 MB; where /dev/shm is smaller (Docker: 64 MB) Ray puts it under /tmp itself.
    # address="local": a Ray of its own, even where another runs on this machine (ray.init() would join that
    # one); an existing cluster is what `serve run shoal.cluster:build_app` and `serve deploy` are for.
    ray.init(address="local", include_dashboard=False, object_store_memory=LOCAL_OBJECT_STORE_BYTES,
             namespace="shoal", logging_level=logging.WARNING)


def run_local(settings: Settings, replicas: int | str) -> int:
    """`shoal serve --replicas N|auto`: a local Ray, the application on settings' host and port, until stopped."""
    from shoal import __version__

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    Path(settings.data_dir).mkdir(parents=True, exist_ok=True)
    start_local_ray(settings)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    spec = local_replicas(replicas)
    serve.run(application(settings, spec), name=APP_NAME, route_prefix="/", blocking=False)
    count = spec.count if spec.count is not None else f"{spec.minimum}..{spec.maximum}"
    print(f"shoal {__version__} listening on http://{settings.host}:{settings.port} through Ray Serve "
          f"({count} engine replicas; API docs at /docs)", flush=True)
    stop = threading.Event()
    import signal

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()
    ray.shutdown()
    return 0
