"""Fish Audio's live WebSocket, `/v1/tts/live`: the handshake's checks, then a `shoal.live.LiveSession`."""

from __future__ import annotations

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from shoal.errors import ShoalError
from shoal.live import LiveLimits, LiveSession
from shoal.server.deps import get_service, rate_limit, require_api_key
from shoal.server.errors import shoal_error_response
from shoal.server.metrics import LIVE_ROUTE, Metrics, request_id_of
from shoal.server.schemas import read_tts_request

router = APIRouter(tags=["fish"])

#: A close frame's reason is at most 123 bytes of UTF-8 (RFC 6455); the finish event carries the whole message.
MAX_CLOSE_REASON_BYTES = 123


class WebSocketTransport:
    """A `shoal.live.Transport` over Starlette's WebSocket."""

    def __init__(self, websocket: WebSocket):
        self.websocket = websocket

    async def receive(self) -> bytes | str | None:
        message = await self.websocket.receive()
        if message["type"] == "websocket.disconnect":
            return None
        data = message.get("bytes")
        return data if data is not None else message.get("text", "")

    async def send(self, data: bytes) -> None:
        try:
            await self.websocket.send_bytes(data)
        except (WebSocketDisconnect, RuntimeError, OSError) as exc:  # the client has gone
            raise ConnectionError("the client has gone") from exc

    async def close(self, code: int, reason: str) -> None:
        reason = reason.encode()[:MAX_CLOSE_REASON_BYTES].decode(errors="ignore")
        try:
            await self.websocket.close(code, reason)
        except (RuntimeError, OSError):  # the client has gone already
            pass


@router.websocket(LIVE_ROUTE)
async def live(websocket: WebSocket):
    """Fish Audio's live TTS protocol (see README, "The live WebSocket"). The API key, the rate limit and
    readiness are checked on the handshake: a refusal is an HTTP answer with the API's JSON error body."""
    metrics: Metrics = websocket.app.state.metrics
    request_id = request_id_of(websocket.headers)
    try:
        service = get_service(websocket)
        require_api_key(websocket)
        rate_limit(websocket)
    except ShoalError as exc:
        metrics.observe_live(request_id, exc.code)
        return await websocket.send_denial_response(shoal_error_response(exc))
    await websocket.accept(headers=[(b"x-request-id", request_id.encode())])
    session = LiveSession(service, read_tts_request, websocket.headers.get("model"), LiveLimits.from_settings(service.settings),
                          on_segment=metrics.observe_live_segment)
    metrics.live_active.inc()
    try:
        await session.run(WebSocketTransport(websocket))
    finally:
        metrics.live_active.dec()
        metrics.observe_live(request_id, session.close_reason, session.seconds, session.segments,
                             session.audio_seconds, session.close_code)
