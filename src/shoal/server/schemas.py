"""Request bodies of the two APIs, with Fish's and OpenAI's field names and defaults.

Unknown fields are rejected (400) rather than ignored: a field that is accepted must do something.
"""

from __future__ import annotations

import base64
import binascii
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from shoal.audio import FORMATS
from shoal.params import CHUNK_LENGTH, MAX_NEW_TOKENS, REPETITION_PENALTY, SPEED, TEMPERATURE, TOP_P, Param

AudioFormat = Literal["wav", "pcm", "mp3", "opus", "aac", "flac"]
assert set(AudioFormat.__args__) == set(FORMATS)


def field(param: Param):
    """A pydantic field with the parameter's default, range and description (shoal.params is the one source)."""
    return Field(param.default, description=param.help, **param.bounds)


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
    chunk_length: int = Field(CHUNK_LENGTH.default, description=CHUNK_LENGTH.help)
    format: AudioFormat = "wav"
    references: list[ServeReferenceAudio] = Field(default_factory=list, max_length=8)
    reference_id: str | None = None
    seed: int | None = None
    use_memory_cache: Literal["on", "off"] = "off"
    normalize: bool = True
    streaming: bool = False
    max_new_tokens: int = field(MAX_NEW_TOKENS)
    top_p: float = field(TOP_P)
    repetition_penalty: float = field(REPETITION_PENALTY)
    temperature: float = field(TEMPERATURE)

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
    speed: float = field(SPEED)
    stream_format: Literal["audio", "sse"] = "audio"
    instructions: str | None = None
    # Fish extensions
    seed: int | None = None
    temperature: float = field(TEMPERATURE)
    top_p: float = field(TOP_P)
    repetition_penalty: float = field(REPETITION_PENALTY)
    max_new_tokens: int = field(MAX_NEW_TOKENS)
    chunk_length: int = field(CHUNK_LENGTH)

    @field_validator("instructions")
    @classmethod
    def _no_instructions(cls, value: str | None) -> str | None:
        if value:
            raise ValueError("instructions are not supported by S1 models; leave them out")
        return value
