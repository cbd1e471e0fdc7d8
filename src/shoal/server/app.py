"""The app factory and `shoal serve`."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Callable

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from shoal import __version__
from shoal.compose import build_service
from shoal.engines.registry import Engines, load_engines
from shoal.server import errors
from shoal.server.errors import BodyTooLarge
from shoal.server.deps import discovery_key, rate_limit, require_api_key, service_of
from shoal.server.metrics import Metrics, RequestLog
from shoal.server.ratelimit import RateLimiter
from shoal.service import Service
from shoal.settings import Settings

log = logging.getLogger("shoal.server")

#: uvicorn reads live WebSocket messages up to this many times `live_max_message_bytes`: one over the limit is
#: still read, and refused with a finish event and close 1009; a larger one uvicorn cuts off itself (1009 only).
WS_READ_LIMIT_FACTOR = 2


class BodyLimit:
    """ASGI middleware: refuse bodies over `limit` bytes with 413, by Content-Length or while streaming in."""

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await self._refuse(scope, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge()
            return message

        try:
            await self.app(scope, limited_receive, send)
        except BodyTooLarge:
            await self._refuse(scope, send)

    async def _refuse(self, scope, send):
        response = errors.error_response(413, f"the request body is larger than the {self.limit} byte limit",
                                         "payload_too_large", path=scope.get("path", ""))
        await response({"type": "http"}, None, send)


def create_app(settings: Settings, engines_loader: Callable[[Settings], Engines] = load_engines) -> FastAPI:
    """Build the app. Engines load in a background thread at start-up; until they are ready, /v1/health says
    "loading" (503) and the API answers 503."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        wyoming = None
        if settings.wyoming_port is not None:  # Home Assistant's protocol, on this loop, over the same service
            from shoal.live import LiveLimits
            from shoal.wyoming import WyomingServer

            wyoming = WyomingServer(lambda: service_of(app.state), LiveLimits.from_settings(settings), settings.host,
                                    settings.wyoming_port, zeroconf=settings.wyoming_zeroconf)
            try:
                await wyoming.start()
            except OSError as exc:
                log.error("cannot serve Wyoming on %s:%d: %s", settings.host, settings.wyoming_port, exc)
                raise
            app.state.wyoming = wyoming
        # after the Wyoming port is bound: a start-up that fails there leaves no loading thread behind
        thread = threading.Thread(target=_load, args=(app, settings, engines_loader), name="shoal-load",
                                  daemon=True)
        thread.start()
        yield
        if wyoming is not None:
            await wyoming.stop()
        if app.state.service is not None:
            app.state.service.close()

    app = FastAPI(title="shoal", version=__version__, lifespan=lifespan,
                  description="A voice server for Fish Speech / OpenAudio S1 checkpoints.")
    app.state.settings = settings
    app.state.service = None
    app.state.wyoming = None  # the Wyoming server, while one runs (settings.wyoming_port)
    app.state.load_error = None
    app.state.api_key = settings.api_key.get_secret_value() if settings.api_key else None
    app.state.rate_limiter = (RateLimiter(settings.rate_limit, settings.rate_limit_burst)
                              if settings.rate_limit > 0 else None)
    app.state.metrics = metrics = Metrics(lambda: app.state.service)
    errors.install(app)

    from shoal.server import routes_fish, routes_live, routes_model, routes_openai

    protected = [Depends(require_api_key), Depends(rate_limit)]
    app.include_router(routes_fish.router, dependencies=protected)
    app.include_router(routes_openai.router, dependencies=protected)
    app.include_router(routes_openai.discovery, dependencies=[Depends(discovery_key), Depends(rate_limit)])
    app.include_router(routes_model.router, dependencies=protected)
    app.include_router(routes_live.router)  # checks the key and the rate on its handshake

    @app.api_route("/v1/health", methods=["GET", "POST"], summary="Liveness and readiness")
    async def health(request: Request):
        state = request.app.state
        if state.load_error is not None:
            return JSONResponse({"status": "error", "error": state.load_error}, status_code=503)
        if state.service is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        service: Service = state.service
        body = {"status": "ok", "models": service.model_names, "default_model": service.engines.default,
                "queue_depth": service.dispatcher.depth, "notice": service.engines.notice,
                "counters": service.counters(), "threads": service.thread_layout(),
                "warnings": service.disk_warnings()}
        if service.engines.replicas is not None:  # shoal.cluster: the engine replicas behind this ingress
            body["cluster"] = service.engines.replicas()
        return body

    @app.get("/metrics", summary="Prometheus metrics", dependencies=[Depends(require_api_key)],
             response_class=Response)
    async def prometheus_metrics():
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    app.add_middleware(RequestLog, metrics=metrics)  # outermost: it sees the 413s too
    if settings.ui:
        from shoal.server.ui import mount_ui

        app = mount_ui(app, settings)
    return app


def _load(app: FastAPI, settings: Settings, loader: Callable[[Settings], Engines]) -> None:
    try:
        start = time.perf_counter()
        service = build_service(settings, loader)
        service.dispatcher.listeners.append(app.state.metrics.observe_job)
        app.state.service = service
        engines = service.engines
        if engines.notice:
            log.warning(engines.notice)
        log.info("ready in %.1f s: models %s (default %s)", time.perf_counter() - start,
                 ", ".join(engines.engines), engines.default)
    except Exception as exc:  # shown by /v1/health and the API's 503s; the process stays up to say so
        app.state.load_error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        log.error("loading the engines failed: %s", app.state.load_error, exc_info=settings.log_level == "debug")


def serve(settings: Settings) -> int:
    """Run the server until SIGINT/SIGTERM, then stop accepting, let in-flight requests finish for up to
    `shutdown_grace` seconds, and exit 0."""
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    Path(settings.data_dir).mkdir(parents=True, exist_ok=True)
    if settings.wyoming_port is not None:
        check_port_free(settings.host, settings.wyoming_port, "the Wyoming port (--wyoming-port)")
    app = create_app(settings)
    wyoming = f", Wyoming on tcp://{settings.host}:{settings.wyoming_port}" if settings.wyoming_port else ""
    print(f"shoal {__version__} listening on http://{settings.host}:{settings.port} (API docs at /docs){wyoming}",
          flush=True)
    # h11 and asyncio, named: uvicorn's "auto" takes httptools and uvloop when they are installed (the cluster
    # extra brings them), and httptools answers a made-up method with a bare 400 instead of the app's JSON 405.
    server = GracefulServer(uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                                           access_log=False, timeout_graceful_shutdown=settings.shutdown_grace,
                                           ws_max_size=settings.live_max_message_bytes * WS_READ_LIMIT_FACTOR,
                                           http="h11", loop="asyncio"))
    logging.getLogger("uvicorn.error").addFilter(no_websocket_access_lines)  # after uvicorn's logging setup
    server.run()
    return 0 if server.started else 1


def check_port_free(host: str, port: int, what: str) -> None:
    """One clear error before anything starts when `port` cannot be bound (in use, or not ours to take)."""
    import socket

    from shoal.errors import ShoalError

    try:
        with socket.create_server((host, port), reuse_port=False) as probe:
            probe.close()
    except OSError as exc:
        raise ShoalError(f"cannot listen on {host}:{port} for {what}: {exc.strerror or exc}") from None


def no_websocket_access_lines(record: logging.LogRecord) -> bool:
    """uvicorn logs three lines per WebSocket of its own (`"WebSocket /path" [accepted]`, `connection open`,
    `connection closed`), even with its access log off; shoal's access log has one line per session."""
    message = record.getMessage()
    return '"WebSocket ' not in message and message not in ("connection open", "connection closed")


class GracefulServer(uvicorn.Server):
    """uvicorn's Server, except that the signal which stopped it gracefully is not raised again afterwards:
    uvicorn re-raises it, so the process would die by SIGTERM instead of exiting 0 after a clean stop."""

    @contextlib.contextmanager
    def capture_signals(self):
        with super().capture_signals():
            yield
            if self._captured_signals:
                log.info("stopped by signal %s after in-flight requests finished (grace period %g s)",
                         self._captured_signals[0], self.config.timeout_graceful_shutdown)
            self._captured_signals.clear()
