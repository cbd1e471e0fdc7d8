"""Fish Speech's own API, wire-compatible with its server and `tools/api_client.py`."""

from __future__ import annotations

import asyncio
import json

import ormsgpack
from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from pydantic import BaseModel, ValidationError

from shoal.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType
from shoal.server.audio_responses import audio_response
from shoal.server.deps import get_service
from shoal.server.schemas import (ReferenceIdBody, ReferenceRenameBody, validate_tts_request,
                                  validation_message)
from shoal.service import Service

router = APIRouter(tags=["fish"])

BODY_TYPES = ("application/json", "application/msgpack", "application/x-msgpack")
#: Lists the request fields shoal ignored (unknown to it), comma-separated.
IGNORED_FIELDS_HEADER = "X-Shoal-Ignored-Fields"


async def parse_body(request: Request) -> dict:
    """A JSON or msgpack object; anything else is a 4xx with a clear message."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type not in BODY_TYPES:
        raise UnsupportedMediaType(f"send the body as application/json or application/msgpack, not "
                                   f"{content_type or 'no content type'}")
    raw = await request.body()
    try:
        data = json.loads(raw) if content_type == "application/json" else ormsgpack.unpackb(raw)
    except RecursionError:  # json's decoder recurses per level: `[[[[...` a few thousand deep is a 500 otherwise
        raise BadRequest("the body is nested too deeply") from None
    except (ValueError, ormsgpack.MsgpackDecodeError, TypeError) as exc:
        kind = "JSON" if content_type == "application/json" else "msgpack"
        raise BadRequest(f"the body is not valid {kind}: {str(exc).splitlines()[0][:200]}") from None
    if not isinstance(data, dict):
        raise BadRequest("the body must be an object")
    return data


async def parse_model(request: Request, model: type[BaseModel]) -> BaseModel:
    """A JSON or msgpack body validated into `model` (see parse_body)."""
    data = await parse_body(request)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise BadRequest(validation_message(exc)) from None


@router.post("/v1/tts", summary="Text to speech (fish-speech's ServeTTSRequest or the Fish Audio API's "
             "TTSRequest, JSON or msgpack)")
async def tts(request: Request, service: Service = Depends(get_service)):
    body, ignored = validate_tts_request(await parse_body(request))
    header = request.headers.get("model")
    model = service.resolve_fish_model(header)
    output = body.output()
    job = await asyncio.to_thread(service.prepare, body.speech_params(model))
    headers = {IGNORED_FIELDS_HEADER: ", ".join(ignored)} if ignored else {}
    stream = body.streaming if body.streaming is not None else header is not None
    return await audio_response(request, service, job, output, stream=stream, headers=headers)


@router.post("/v1/references/add", summary="Save a voice (multipart: id, audio, text)")
async def add_reference(id: str = Form(...), audio: UploadFile = File(...), text: str = Form(...),
                        service: Service = Depends(get_service)):
    data = await read_upload(audio, service.settings.max_upload_bytes)
    voice = await asyncio.to_thread(service.add_voice, id, data, text)
    return {"success": True, "message": f"voice {voice.id} saved", "reference_id": voice.id}


@router.get("/v1/references/list", summary="List saved voices")
async def list_references(service: Service = Depends(get_service)):
    voices = await asyncio.to_thread(service.list_voices)
    return {"success": True, "message": "ok", "reference_ids": [v.id for v in voices]}


@router.post("/v1/references/delete", summary="Delete a saved voice")
async def delete_reference(request: Request, service: Service = Depends(get_service)):
    body: ReferenceIdBody = await parse_model(request, ReferenceIdBody)
    await asyncio.to_thread(service.delete_voice, body.reference_id)
    return {"success": True, "message": f"voice {body.reference_id} deleted", "reference_id": body.reference_id}


@router.post("/v1/references/update", summary="Rename a saved voice")
async def rename_reference(request: Request, service: Service = Depends(get_service)):
    body: ReferenceRenameBody = await parse_model(request, ReferenceRenameBody)
    voice = await asyncio.to_thread(service.rename_voice, body.old_reference_id, body.new_reference_id)
    return {"success": True, "message": f"voice {body.old_reference_id} renamed to {voice.id}",
            "old_reference_id": body.old_reference_id, "new_reference_id": voice.id}


async def read_upload(upload: UploadFile, limit: int, what: str = "the upload") -> bytes:
    """Read an uploaded file, refusing (413) as soon as it passes `limit` bytes; `what` names it in the error."""
    chunks, size = [], 0
    while chunk := await upload.read(1 << 20):
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"{what} is larger than the {limit} byte limit")
        chunks.append(chunk)
    return b"".join(chunks)

