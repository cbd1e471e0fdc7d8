"""Turning a job's audio into an HTTP response: whole files, chunked streams, or OpenAI's SSE events."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from typing import AsyncIterator

import numpy as np
from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from shoal.audio import OutputEncoder, OutputOptions, StreamEncoder, encode_output
from shoal.errors import Cancelled, ShoalError
from shoal.service import Job, Service

log = logging.getLogger("shoal.server")

#: Names the model that generated the audio (its Fish Audio name where it has one).
MODEL_HEADER = "X-Shoal-Model"


async def audio_response(request: Request, service: Service, job: Job, output: OutputOptions, stream: bool,
                         headers: dict[str, str] | None = None) -> Response:
    """The job's audio as `output` asks, streamed or whole; `X-Shoal-Model` names the model that spoke."""
    request.state.job = job  # for the access log's audio seconds
    headers = {"Content-Disposition": f"attachment; filename=speech.{output.format}",
               MODEL_HEADER: job.model, **(headers or {})}
    if stream:
        chunks, source = await started(request, service, job)
        return JobStreamingResponse(encoded_stream(chunks, job, output), source, media_type=output.media_type,
                                    headers=headers)
    audio = await until_disconnect(request, service.synthesize(job))
    data = await asyncio.to_thread(encode_output, audio, job.engine.sample_rate, output)
    return Response(data, media_type=output.media_type, headers=headers)


async def until_disconnect(request: Request, work):
    """Await `work`, cancelling it (and so the generation) if the client goes away first."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=0.5)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                raise Cancelled("the client disconnected")
    finally:
        if not task.done():
            task.cancel()
            await asyncio.wait({task})  # let it unwind: the stream's own cleanup cancels the generation


class JobStreamingResponse(StreamingResponse):
    """A StreamingResponse that closes the job's chunk source when it ends, however it ends: a client that
    leaves mid-stream (even before the body's first read) cancels its generation now, not whenever the garbage
    collector finds the abandoned generator."""

    def __init__(self, content, source: AsyncIterator[np.ndarray], **kwargs):
        super().__init__(content, **kwargs)
        self.source = source

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.source.aclose()


async def started(request: Request, service: Service,
                  job: Job) -> tuple[AsyncIterator[np.ndarray], AsyncIterator[np.ndarray]]:
    """(the job's chunks with the first one already awaited, their source to close when the response ends).

    Waiting for the first chunk before answering means admission (429), bad references and early engine
    failures still get a real status and JSON body; after that the status is sent and cannot change. A client
    that goes away during that wait (often while its request is still queued) cancels it there and then.
    """
    chunks = service.stream(job)
    try:
        first = await until_disconnect(request, anext(chunks))
    except StopAsyncIteration:
        first = np.zeros(0, np.float32)

    async def resumed():
        yield first
        async for chunk in chunks:
            yield chunk

    return resumed(), chunks


async def encoded_stream(chunks: AsyncIterator[np.ndarray], job: Job,
                         output: OutputOptions) -> AsyncIterator[bytes]:
    """Encoded bytes as audio arrives, the container's header first.

    Once the response has started, an error can no longer change the status: it is logged and raised again, so
    the server breaks the body off (no final chunk) and the client can tell a cut stream from a finished one.
    """
    encoder = OutputEncoder(output, job.engine.sample_rate)
    try:
        async for chunk in chunks:
            data = await asyncio.to_thread(encoder.push, chunk)
            if data:
                yield data
        tail = encoder.finish()
        if tail:
            yield tail
    except ShoalError as exc:
        log.warning("stream ended early: %s", exc)
        raise
    finally:
        encoder.close()


async def sse_stream(chunks: AsyncIterator[np.ndarray], job: Job, fmt: str) -> AsyncIterator[bytes]:
    """OpenAI's streaming events: `speech.audio.delta` with base64 audio, then `speech.audio.done`."""
    encoder = StreamEncoder(fmt, job.engine.sample_rate)
    samples = 0

    def event(payload: dict) -> bytes:
        return f"data: {json.dumps(payload)}\n\n".encode()

    try:
        async for chunk in chunks:
            samples += len(chunk)
            data = await asyncio.to_thread(encoder.push, chunk)
            if data:
                yield event({"type": "speech.audio.delta", "audio": base64.b64encode(data).decode()})
        tail = encoder.finish()
        if tail:
            yield event({"type": "speech.audio.delta", "audio": base64.b64encode(tail).decode()})
        # What was spent, by its real units: shoal counts no OpenAI tokens (it used to report samples as such).
        yield event({"type": "speech.audio.done",
                     "usage": {"input_characters": len(job.request.text),
                               "output_audio_seconds": round(samples / job.engine.sample_rate, 3)}})
    except ShoalError as exc:
        log.warning("stream ended early: %s", exc)
        yield event({"type": "error", "error": {"message": str(exc), "code": exc.code}})
    finally:
        encoder.close()
