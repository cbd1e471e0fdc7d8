"""The OpenAI-compatible API: what the openai SDK, Open WebUI, SillyTavern and Home Assistant speak."""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Depends, Request

from shoal.audio import OutputOptions
from shoal.errors import UnsupportedMediaType
from shoal.server.audio_responses import MODEL_HEADER, JobStreamingResponse, audio_response, sse_stream, started
from shoal.server.deps import get_service
from shoal.server.routes_fish import IGNORED_FIELDS_HEADER
from shoal.server.schemas import SpeechRequest
from shoal.service import Service, SpeechParams

router = APIRouter(tags=["openai"])
#: The listings OpenAI-style clients discover voices and models with (Open WebUI sends no key for them): the app
#: guards them with `discovery_key`, which the `public_discovery` setting opens.
discovery = APIRouter(tags=["openai"])
CREATED = int(time.time())


def json_content_type(request: Request) -> None:
    """415 for a body that is not JSON (`curl -d` sends form encoding), as /v1/tts answers, rather than
    FastAPI's 400 saying the body "should be a valid dictionary". Runs before the body is validated."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type != "application/json" and not (content_type.startswith("application/")
                                                  and content_type.endswith("+json")):
        raise UnsupportedMediaType(f"send the body as application/json, not {content_type or 'no content type'}")


@router.post("/v1/audio/speech", summary="Text to speech (OpenAI-compatible)",
             dependencies=[Depends(json_content_type)])
async def speech(body: SpeechRequest, request: Request, service: Service = Depends(get_service)):
    params = SpeechParams(
        text=body.input, model=body.model, voice=body.voice, seed=body.seed, temperature=body.temperature,
        top_p=body.top_p, repetition_penalty=body.repetition_penalty, max_new_tokens=body.max_new_tokens,
        chunk_length=body.chunk_length, speed=body.speed, instructions=body.instructions)
    job = await asyncio.to_thread(service.prepare, params)
    headers = {IGNORED_FIELDS_HEADER: ", ".join(job.ignored)} if job.ignored else {}
    if body.stream_format == "sse":
        request.state.job = job  # for the access log's audio seconds
        chunks, source = await started(request, service, job)
        return JobStreamingResponse(sse_stream(chunks, job, body.response_format), source,
                                    media_type="text/event-stream",
                                    headers={"Cache-Control": "no-cache",
                                             MODEL_HEADER: job.model, **headers})
    # Audio streams as it is produced (OpenAI's behaviour), except WAV: a streamed WAV header cannot state its
    # length, and many clients of this endpoint read WAVs with strict parsers.
    stream = body.response_format != "wav"
    return await audio_response(request, service, job, OutputOptions(body.response_format), stream=stream,
                                headers=headers)


@router.get("/v1/models", summary="The models this server runs")
async def models(service: Service = Depends(get_service)):
    data = [{"id": m["id"], "object": "model", "created": CREATED, "owned_by": "shoal", **m}
            for m in service.describe_models()]
    return {"object": "list", "data": data}


@discovery.get("/v1/audio/voices", summary="The voices a request may name")
async def voices(model: str | None = None, service: Service = Depends(get_service)):
    name, _ = service.resolve_model(model)
    return {"model": name, "voices": await asyncio.to_thread(service.describe_voices, name)}


@discovery.get("/v1/audio/models", summary="The speech models (Open WebUI's listing)")
async def audio_models(service: Service = Depends(get_service)):
    return {"models": service.describe_models()}


__all__ = ["router", "discovery"]
