"""The app factory and `shoal serve`."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Callable

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse

from shoal import __version__
from shoal.engines.registry import Engines, load_engines
from shoal.server import errors
from shoal.server.deps import require_api_key
from shoal.service import Service
from shoal.settings import Settings
from shoal.voices import VoiceLibrary

log = logging.getLogger("shoal.server")
access_log = logging.getLogger("shoal.access")


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
            return await self._refuse(send)
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
            await self._refuse(send)

    async def _refuse(self, send):
        response = errors.error_response(413, f"the request body is larger than the {self.limit} byte limit",
                                         "payload_too_large")
        await response({"type": "http"}, None, send)


class BodyTooLarge(Exception):
    pass


def create_app(settings: Settings, engines_loader: Callable[[Settings], Engines] = load_engines) -> FastAPI:
    """Build the app. Engines load in a background thread at start-up; until they are ready, /v1/health says
    "loading" (503) and the API answers 503."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        thread = threading.Thread(target=_load, args=(app, settings, engines_loader), name="shoal-load",
                                  daemon=True)
        thread.start()
        yield
        if app.state.service is not None:
            app.state.service.close()

    app = FastAPI(title="shoal", version=__version__, lifespan=lifespan,
                  description="A voice server for Fish Speech / OpenAudio S1 checkpoints.")
    app.state.settings = settings
    app.state.service = None
    app.state.load_error = None
    app.state.api_key = settings.api_key.get_secret_value() if settings.api_key else None
    errors.install(app)

    from shoal.server import routes_fish, routes_openai

    protected = [Depends(require_api_key)]
    app.include_router(routes_fish.router, dependencies=protected)
    app.include_router(routes_openai.router, dependencies=protected)

    @app.api_route("/v1/health", methods=["GET", "POST"], summary="Liveness and readiness")
    async def health(request: Request):
        state = request.app.state
        if state.load_error is not None:
            return JSONResponse({"status": "error", "error": state.load_error}, status_code=503)
        if state.service is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        service: Service = state.service
        return {"status": "ok", "models": service.model_names, "default_model": service.engines.default,
                "queue_depth": service.dispatcher.depth, "notice": service.engines.notice,
                "counters": service.counters()}

    @app.middleware("http")
    async def access(request: Request, call_next):
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex[:12]
        start = time.perf_counter()
        response = await call_next(request)
        response.headers["X-Request-Id"] = request_id
        access_log.info("request_id=%s method=%s path=%s status=%s latency_ms=%.1f", request_id, request.method,
                        request.url.path, response.status_code, (time.perf_counter() - start) * 1000)
        return response

    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    if settings.ui:
        from shoal.server.ui import mount_ui

        app = mount_ui(app, settings)
    return app


def _load(app: FastAPI, settings: Settings, loader: Callable[[Settings], Engines]) -> None:
    try:
        start = time.perf_counter()
        engines = loader(settings)
        voices = VoiceLibrary(Path(settings.data_dir), max_upload_bytes=settings.max_upload_bytes,
                              min_seconds=settings.min_voice_seconds, max_seconds=settings.max_voice_seconds)
        _warm_up(engines)
        app.state.service = Service(settings, engines, voices)
        if engines.notice:
            log.warning(engines.notice)
        log.info("ready in %.1f s: models %s (default %s)", time.perf_counter() - start,
                 ", ".join(engines.engines), engines.default)
    except Exception as exc:  # shown by /v1/health and the API's 503s; the process stays up to say so
        app.state.load_error = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        log.error("loading the engines failed: %s", app.state.load_error, exc_info=settings.log_level == "debug")


def _warm_up(engines: Engines) -> None:
    """One tiny synthesis per engine, so the first user request does not pay for lazy initialisation."""
    from shoal.engines.base import SynthesisRequest

    for name, engine in engines.engines.items():
        try:
            for _ in engine.synthesize(SynthesisRequest(text="Hi.", seed=0, max_new_tokens=2)):
                pass
        except Exception as exc:  # a warm-up failure is not fatal; the real request will report properly
            log.warning("warm-up of %s failed: %s", name, exc)


def serve(settings: Settings) -> int:
    """Run the server until interrupted (SIGINT/SIGTERM: stop accepting, finish in-flight requests)."""
    import uvicorn

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    Path(settings.data_dir).mkdir(parents=True, exist_ok=True)
    app = create_app(settings)
    print(f"shoal {__version__} listening on http://{settings.host}:{settings.port} (API docs at /docs)",
          flush=True)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level,
                access_log=False, timeout_graceful_shutdown=30)
    return 0
