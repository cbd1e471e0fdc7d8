"""Request dependencies: the service (503 while the engines load) and the API key check. They take any
connection, so the live WebSocket's handshake runs the same checks."""

from __future__ import annotations

import hashlib
import hmac

from starlette.requests import HTTPConnection

from shoal.errors import Unauthorized, Unavailable
from shoal.service import Service


def get_service(request: HTTPConnection) -> Service:
    return service_of(request.app.state)


def service_of(state) -> Service:
    """The app's service (`app.state`), or Unavailable while the engines load or after they failed to."""
    if state.load_error is not None:
        raise Unavailable(f"the engines failed to load: {state.load_error}")
    if state.service is None:
        raise Unavailable("the engines are still loading; retry in a few seconds")
    return state.service


def require_api_key(request: HTTPConnection) -> None:
    """With an API key configured, every API route needs `Authorization: Bearer <key>` (constant-time check)."""
    expected = request.app.state.api_key
    if expected is None:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected.encode()):
        raise Unauthorized("a valid API key is required: send `Authorization: Bearer <key>`")


def discovery_key(request: HTTPConnection) -> None:
    """The voice and model listings: the API key, unless the `public_discovery` setting opens them."""
    if not request.app.state.settings.public_discovery:
        require_api_key(request)


def rate_limit(request: HTTPConnection) -> None:
    """With a rate limit configured, each API key (each client address without a key) gets a token bucket;
    past it, 429 with Retry-After. Runs after the key check, so wrong keys never reach a bucket."""
    limiter = request.app.state.rate_limiter
    if limiter is None:
        return
    if request.app.state.api_key is not None:
        token = request.headers.get("authorization", "").partition(" ")[2].strip()
        key = "key:" + hashlib.sha256(token.encode()).hexdigest()[:16]  # never keep the key itself around
    else:
        key = "addr:" + (request.client.host if request.client else "unknown")
    limiter.take(key)
