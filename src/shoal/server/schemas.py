"""Request bodies of the two APIs, with Fish's and OpenAI's field names and defaults.

Unknown fields are rejected (400) rather than ignored: a field that is accepted must do something.
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from shoal.audio import FORMATS

AudioFormat = Literal["wav", "pcm", "mp3", "opus", "aac", "flac"]
assert set(AudioFormat.__args__) == set(FORMATS)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class ServeReferenceAudio(Strict):
    """An inline reference clip. In JSON bodies `audio` is base64, as Fish's schema accepts it."""

    audio: bytes
    text: str

    @field_validator("audio", mode="before")
    @classmethod
    def _base64(cls, value):
        if isinstance(value, str):
            try:
                return base64.b64decode(value, validate=True)
            except (binascii.Error, ValueError):
                raise ValueError("audio must be base64-encoded bytes in a JSON body") from None
        return value


class ServeTTSRequest(Strict):
    """Fish Speech's `ServeTTSRequest`: same field names, defaults and ranges.

    Extensions: `format` also takes opus/aac/flac; `chunk_length` 0 never splits the text. `normalize` is
    accepted for wire compatibility and, exactly like fish-speech 0.1.0, does not rewrite the text.
    """

    text: str
    chunk_length: int = Field(200, description="split texts longer than this many characters; 0 = never")
    format: AudioFormat = "wav"
    references: list[ServeReferenceAudio] = Field(default_factory=list, max_length=8)
    reference_id: str | None = None
    seed: int | None = None
    use_memory_cache: Literal["on", "off"] = "off"
    normalize: bool = True
    streaming: bool = False
    max_new_tokens: int = Field(1024, ge=0, le=8192)
    top_p: Annotated[float, Field(ge=0.1, le=1.0)] = 0.8
    # Fish's schema says le=2.0, but its sampler (and ours) asserts < 2: say so here, where the error names
    # the field and the OpenAPI schema tells clients, instead of accepting 2.0 and refusing it later.
    repetition_penalty: Annotated[float, Field(ge=0.9, lt=2.0)] = 1.1
    temperature: Annotated[float, Field(ge=0.1, le=1.0)] = 0.8

    @field_validator("chunk_length")
    @classmethod
    def _chunk_length(cls, value: int) -> int:
        if value != 0 and not 100 <= value <= 300:
            raise ValueError("chunk_length must be between 100 and 300 (or 0: never split)")
        return value


class ReferenceIdBody(Strict):
    reference_id: str


class ReferenceRenameBody(Strict):
    old_reference_id: str
    new_reference_id: str


class SpeechRequest(Strict):
    """OpenAI's `POST /v1/audio/speech`, plus Fish's sampling fields."""

    model: str | None = None
    input: str
    voice: str | None = None
    response_format: AudioFormat = "mp3"
    speed: Annotated[float, Field(ge=0.25, le=4.0)] = 1.0
    stream_format: Literal["audio", "sse"] = "audio"
    instructions: str | None = None
    # Fish extensions
    seed: int | None = None
    temperature: Annotated[float, Field(ge=0.1, le=1.0)] = 0.8
    top_p: Annotated[float, Field(ge=0.1, le=1.0)] = 0.8
    repetition_penalty: Annotated[float, Field(ge=0.9, lt=2.0)] = 1.1  # < 2, as ServeTTSRequest's
    max_new_tokens: int = Field(1024, ge=0, le=8192)
    chunk_length: int = Field(200, ge=0, le=1000)

    @field_validator("instructions")
    @classmethod
    def _no_instructions(cls, value: str | None) -> str | None:
        if value:
            raise ValueError("instructions are not supported by S1 models; leave them out")
        return value
