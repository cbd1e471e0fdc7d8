"""One JSON error shape for every failure: `{"error": {"message", "type", "code"}}`. No tracebacks leave."""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from shoal.errors import Busy, ShoalError

log = logging.getLogger("shoal.server")

HTTP_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
              404: "not_found_error", 405: "invalid_request_error", 409: "conflict_error",
              413: "invalid_request_error", 415: "invalid_request_error", 429: "rate_limit_error",
              499: "cancelled", 503: "server_error", 504: "timeout_error", 507: "storage_error"}


#: The Fish Audio model API's routes. The Fish Audio SDKs read an error's text from the body's top level: the
#: current one from `message` or else `detail`, the legacy `fish_audio_sdk` from `detail` only. Errors of
#: these routes carry a copy of the message as `detail`, beside the house shape, so both SDKs show it.
MODEL_PREFIX = "/model"


def error_response(status: int, message: str, code: str, headers: dict | None = None,
                   path: str = "") -> JSONResponse:
    """The house error body; for a request to `path` under MODEL_PREFIX, also the top-level `detail`."""
    body: dict = {"error": {"message": message, "type": HTTP_TYPES.get(status, "server_error"), "code": code}}
    if path == MODEL_PREFIX or path.startswith(MODEL_PREFIX + "/"):
        body["detail"] = message
    return JSONResponse(body, status_code=status, headers=headers)


def shoal_error_response(exc: ShoalError, path: str = "") -> JSONResponse:
    headers = {"Retry-After": str(max(1, round(exc.retry_after)))} if isinstance(exc, Busy) else None
    if exc.http_status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    return error_response(exc.http_status, str(exc), exc.code, headers, path)


def describe_validation(exc: RequestValidationError) -> str:
    """Pydantic's errors as one readable line: `field: problem; field: problem`."""
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path"))
        parts.append(f"{loc or 'body'}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


class BodyTooLarge(Exception):
    """Raised by the app's BodyLimit middleware when a streamed-in body passes the limit."""


def cut_off_by_body_limit(exc: Exception) -> bool:
    """Whether FastAPI's 400 "error parsing the body" is the body limit stopping a chunked body mid-read.
    FastAPI turns any exception from reading a JSON or form body into that 400, so the limit's own exception
    never reaches its middleware; only a handler route that reads the body itself (/v1/tts) got the 413."""
    return isinstance(exc.__cause__, BodyTooLarge)


def allowed_methods(request: Request, exc: StarletteHTTPException) -> list[str]:
    """Every method the API takes on the request's path. Starlette's own Allow header (in `exc`) names only the
    first route whose path matches, and /model/{id} is three routes (GET, PATCH, DELETE), so the methods the
    OpenAPI schema lists for every path template that matches are added to it."""
    methods = {m.strip() for m in (exc.headers or {}).get("Allow", "").split(",") if m.strip()}
    for template, operations in request.app.openapi()["paths"].items():
        if re.fullmatch(re.sub(r"\{[^/]+\}", "[^/]+", template), request.url.path):
            methods |= {method.upper() for method in operations}
    return sorted(methods)


def install(app: FastAPI) -> None:
    @app.exception_handler(ShoalError)
    async def _shoal(request: Request, exc: ShoalError):
        return shoal_error_response(exc, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return error_response(400, describe_validation(exc), "invalid_request", path=request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        if cut_off_by_body_limit(exc):
            limit = request.app.state.settings.max_body_bytes
            return error_response(413, f"the request body is larger than the {limit} byte limit",
                                  "payload_too_large", path=request.url.path)
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:
            headers = {**(headers or {}), "Allow": ", ".join(allowed_methods(request, exc))}
        return error_response(exc.status_code, message, code, headers, request.url.path)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return error_response(500, "internal server error", "internal_error", path=request.url.path)
