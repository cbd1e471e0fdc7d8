"""The Fish Audio model API (`/model`), as the official SDK's `client.voices` (and the older
`Session.list_models` & co.) call it: saved voices listed, made from several clips, read, changed and deleted.

These are the saved voices of `/v1/references/*` and the web UI, under the same ids, shown in the SDK's
`Voice` shape. shoal has no users, likes or training: every voice is the server's own, `state` is "trained" as
soon as it is saved, and the counters are 0.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends, File, Form, Query, Response, UploadFile

from shoal.errors import BadRequest
from shoal.server.deps import get_service
from shoal.server.errors import MODEL_PREFIX
from shoal.server.routes_fish import IGNORED_FIELDS_HEADER, read_upload
from shoal.service import Service
from shoal.voices import DEFAULT_VISIBILITY, Details, Voice

router = APIRouter(prefix=MODEL_PREFIX, tags=["fish model"])

#: Who made every voice, in the SDK's Author shape: the server itself.
AUTHOR = {"_id": "shoal", "nickname": "shoal", "avatar": ""}
#: List filters of the Fish Audio cloud that have no meaning here (no authors, no language detection); when
#: sent, they are named in the X-Shoal-Ignored-Fields header. `self` needs no mention: every voice is yours.
IGNORED_FILTERS = ("author_id", "language", "title_language")
#: A sample's `duration` is given in seconds to the millisecond.
DURATION_DIGITS = 3


def voice_body(voice: Voice) -> dict:
    """A saved voice in the SDK's `Voice` shape; `samples` are its clips in prompt order, with paths on this
    server that play them, and `cover_image` is the path of its cover ("" without one)."""
    path = f"{MODEL_PREFIX}/{voice.id}"
    details = voice.details
    return {
        "_id": voice.id, "type": "tts", "title": details.title, "description": details.description,
        "cover_image": f"{path}/cover" if voice.cover else "", "train_mode": "fast", "state": "trained",
        "tags": list(details.tags),
        "samples": [{"title": f"clip {n}", "text": clip.text, "task_id": f"{voice.id}-{n}",
                     "audio": f"{path}/samples/{n}", "duration": round(clip.duration, DURATION_DIGITS)}
                    for n, clip in enumerate(voice.clips, start=1)],
        "created_at": voice.created, "updated_at": voice.updated, "languages": [],
        "visibility": details.visibility, "lock_visibility": False, "like_count": 0, "mark_count": 0,
        "shared_count": 0, "task_count": 0, "liked": False, "marked": False, "author": AUTHOR,
    }


@router.get("", summary="List saved voices, a page at a time (the Fish Audio SDK's voices.list)")
async def list_models(response: Response, page_size: int = 10, page_number: int = 1, title: str | None = None,
                      tag: list[str] = Query([]), sort_by: str = "task_count", author_id: str | None = None,
                      language: list[str] = Query([]), title_language: list[str] = Query([]),
                      service: Service = Depends(get_service)):
    total, voices = await asyncio.to_thread(service.find_voices, title=title, tags=tag, sort_by=sort_by,
                                            page_size=page_size, page_number=page_number)
    sent = {"author_id": author_id, "language": language, "title_language": title_language}
    ignored = [name for name in IGNORED_FILTERS if sent[name]]
    if ignored:
        response.headers[IGNORED_FIELDS_HEADER] = ", ".join(ignored)
    return {"total": total, "items": [voice_body(v) for v in voices]}


@router.post("", summary="Save a voice from one or more clips and their transcripts (voices.create)")
async def create_model(title: str = Form(...), voices: list[UploadFile] | None = File(None),
                       texts: list[str] = Form([]), description: str = Form(""), tags: list[str] = Form([]),
                       visibility: str = Form(DEFAULT_VISIBILITY), model_type: str = Form("tts", alias="type"),
                       train_mode: str = Form("fast"), enhance_audio_quality: bool = Form(True),
                       cover_image: UploadFile | None = File(None), service: Service = Depends(get_service)):
    if model_type != "tts":
        raise BadRequest(f"type must be 'tts': shoal makes text-to-speech voices, not {model_type!r} models")
    if train_mode != "fast":
        raise BadRequest(f"train_mode must be 'fast' (a saved voice needs no training), not {train_mode!r}")
    if not voices:
        raise BadRequest("send at least one audio file as `voices`")
    if len(texts) != len(voices):
        raise BadRequest(f"send one transcript in `texts` per audio file in `voices` (got {len(texts)} for "
                         f"{len(voices)}): shoal does not transcribe clips on the server")
    limits = service.settings
    clips = [(await read_upload(upload, limits.max_upload_bytes, f"voice file {n}"), text)
             for n, (upload, text) in enumerate(zip(voices, texts), start=1)]
    cover = await read_upload(cover_image, limits.max_cover_bytes, "the cover image") if cover_image else None
    details = Details(title=title, description=description, tags=tuple(tags), visibility=visibility)
    voice = await asyncio.to_thread(service.create_voice, clips, details, cover)
    return voice_body(voice)


@router.get("/{voice_id}", summary="One saved voice (voices.get)")
async def get_model(voice_id: str, service: Service = Depends(get_service)):
    return voice_body(await asyncio.to_thread(service.voices.get, voice_id))


@router.patch("/{voice_id}", summary="Change a voice's title, description, tags, visibility or cover "
              "(voices.update; form or multipart)")
async def update_model(voice_id: str, title: str | None = Form(None), description: str | None = Form(None),
                       tags: list[str] | None = Form(None), visibility: str | None = Form(None),
                       cover_image: UploadFile | None = File(None), service: Service = Depends(get_service)):
    cover = (await read_upload(cover_image, service.settings.max_cover_bytes, "the cover image")
             if cover_image else None)
    voice = await asyncio.to_thread(service.update_voice, voice_id, title=title, description=description,
                                    tags=tags, visibility=visibility, cover=cover)
    return voice_body(voice)


@router.delete("/{voice_id}", summary="Delete a saved voice (voices.delete)")
async def delete_model(voice_id: str, service: Service = Depends(get_service)):
    await asyncio.to_thread(service.delete_voice, voice_id)
    return {"success": True, "message": f"voice {voice_id} deleted", "_id": voice_id}


@router.get("/{voice_id}/cover", summary="A voice's cover image", response_class=Response)
async def get_cover(voice_id: str, service: Service = Depends(get_service)):
    data, media_type = await asyncio.to_thread(service.voice_cover, voice_id)
    return Response(data, media_type=media_type)


@router.get("/{voice_id}/samples/{number}", summary="One of a voice's clips as stored (WAV)",
            response_class=Response)
async def get_sample(voice_id: str, number: int, service: Service = Depends(get_service)):
    return Response(await asyncio.to_thread(service.voices.clip_bytes, voice_id, number - 1),
                    media_type="audio/wav")
