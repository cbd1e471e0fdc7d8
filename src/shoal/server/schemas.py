"""Request bodies of the APIs, with Fish's and OpenAI's field names and defaults.

OpenAI's body and the voice routes' refuse unknown fields (400): a field that is accepted must do something.
`/v1/tts` takes what Fish Audio's clients send, whose releases add fields: there unknown fields are ignored and
reported back in a header (`Lenient`).
"""

from __future__ import annotations

import base64
import binascii
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from shoal.audio import FORMATS, OutputOptions, check_output_rate
from shoal.errors import BadRequest
from shoal.service import SpeechParams
from shoal.params import CHUNK_LENGTH, MAX_NEW_TOKENS, REPETITION_PENALTY, SPEED, TEMPERATURE, TOP_P, Param

AudioFormat = Literal["wav", "pcm", "mp3", "opus", "aac", "flac"]
assert set(AudioFormat.__args__) == set(FORMATS)
#: Fish Audio's opus bitrates: automatic, or these in kbit/s (LiveKit sends them in bit/s).
OPUS_AUTO = -1000
OPUS_KBPS = (24, 32, 48, 64)


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


class Lenient(BaseModel):
    """A body whose unknown fields are accepted and ignored, and reported (`ignored_fields`), never dropped
    silently: a client release that adds a field must not break the fields it already sent."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    def ignored_fields(self, prefix: str = "") -> list[str]:
        return [prefix + name for name in (self.model_extra or {})]


class Prosody(Lenient):
    """Fish Audio's `prosody`: speed as a multiplier, volume as a change in dB, loudness normalisation."""

    speed: float = Field(1.0, ge=0.5, le=2.0, description="speech speed (tempo without pitch change)")
    volume: float = Field(0.0, ge=-20.0, le=20.0, description="volume change in dB")
    normalize_loudness: bool = Field(False, description="bring the speech to about -20 dBFS RMS (see README)")

    @field_validator("speed", "volume", "normalize_loudness", mode="before")
    @classmethod
    def _null_is_default(cls, value, info):
        """Pipecat's settings are Optional and send null for "unset": that means the default."""
        return cls.model_fields[info.field_name].default if value is None else value


class ServeTTSRequest(Lenient):
    """`POST /v1/tts`: fish-speech 0.1.0's `ServeTTSRequest` and the Fish Audio API's `TTSRequest` (what the
    fishaudio SDK and LiveKit send) in one body. Field names, defaults and ranges are theirs.

    Extensions: `format` also takes aac/flac; `chunk_length` 0 never splits the text. `normalize` is accepted
    for wire compatibility and, exactly like fish-speech 0.1.0, does not rewrite the text. `early_stop_threshold`
    is checked and has no effect: every request's rows end on their own here (see README). Unknown fields are
    ignored and listed in the `X-Shoal-Ignored-Fields` response header.
    """

    text: str
    chunk_length: int = Field(CHUNK_LENGTH.default, description=CHUNK_LENGTH.help)
    format: AudioFormat = "wav"
    references: list[ServeReferenceAudio] = Field(default_factory=list, max_length=8)
    reference_id: str | None = None
    seed: int | None = None
    use_memory_cache: Literal["on", "off"] = "off"
    normalize: bool = True
    streaming: bool | None = Field(None, description="stream the audio as it is generated (default: yes for a "
                                   "Fish Audio request, one with a `model` header; no otherwise, as fish-speech)")
    max_new_tokens: int = field(MAX_NEW_TOKENS)
    top_p: float = field(TOP_P)
    repetition_penalty: float = field(REPETITION_PENALTY)
    temperature: float = field(TEMPERATURE)
    # The Fish Audio API's own fields
    sample_rate: int | None = Field(None, description="output sample rate (default: the model's)")
    mp3_bitrate: Literal[64, 128, 192] | None = Field(None, description="mp3 bitrate in kbit/s")
    opus_bitrate: int | None = Field(None, description="opus bitrate: -1000 (automatic), 24, 32, 48 or 64 "
                                     "kbit/s, or the same in bit/s (24000 ...)")
    latency: Literal["normal", "balanced", "low"] = Field("balanced", description="how soon streamed audio "
                                                          "starts: normal ~1 s, balanced ~0.5 s, low ~0.25 s of "
                                                          "audio in the first chunk")
    prosody: Prosody | None = None
    min_chunk_length: int | None = Field(None, ge=0, le=100, description="segments shorter than this are joined "
                                         "to a neighbour (default 0 over HTTP; the live WebSocket's is 50)")
    condition_on_previous_chunks: bool = Field(True, description="each segment's prompt carries the previous "
                                               "segment's codes, so the voice continues")
    early_stop_threshold: float = Field(1.0, ge=0.0, le=1.0, description="accepted; no effect here")

    @field_validator("chunk_length")
    @classmethod
    def _chunk_length(cls, value: int) -> int:
        if value != 0 and not 100 <= value <= 300:
            raise ValueError("chunk_length must be between 100 and 300 (or 0: never split)")
        return value

    @field_validator("opus_bitrate")
    @classmethod
    def _opus_bitrate(cls, value: int | None) -> int | None:
        if value is not None and value != OPUS_AUTO and value not in OPUS_KBPS \
                and value not in {k * 1000 for k in OPUS_KBPS}:
            raise ValueError(f"opus_bitrate must be {OPUS_AUTO} (automatic) or one of "
                             f"{', '.join(map(str, OPUS_KBPS))} kbit/s (or the same in bit/s)")
        return value

    def ignored_fields(self, prefix: str = "") -> list[str]:
        return super().ignored_fields(prefix) + (self.prosody.ignored_fields("prosody.") if self.prosody else [])

    def speech_params(self, model: str | None, min_chunk_length: int = 0) -> SpeechParams:
        """What this body asks the service for; `min_chunk_length` is the default when the body has none."""
        prosody = self.prosody or Prosody()
        return SpeechParams(
            text=self.text, model=model, voice=self.reference_id,
            references=[(ref.audio, ref.text) for ref in self.references],
            use_memory_cache=self.use_memory_cache == "on", seed=self.seed, temperature=self.temperature,
            top_p=self.top_p, repetition_penalty=self.repetition_penalty, max_new_tokens=self.max_new_tokens,
            chunk_length=self.chunk_length, speed=prosody.speed, latency=self.latency,
            condition_on_previous=self.condition_on_previous_chunks,
            min_chunk_length=min_chunk_length if self.min_chunk_length is None else self.min_chunk_length)

    def output(self) -> OutputOptions:
        """The audio this body asks for: format, rate, bitrate, volume and loudness."""
        bitrate = None
        if self.format == "mp3" and self.mp3_bitrate is not None:
            bitrate = self.mp3_bitrate * 1000
        elif self.format == "opus" and self.opus_bitrate not in (None, OPUS_AUTO):
            bitrate = self.opus_bitrate * 1000 if self.opus_bitrate in OPUS_KBPS else self.opus_bitrate
        prosody = self.prosody or Prosody()
        if self.sample_rate is not None:
            check_output_rate(self.format, self.sample_rate)  # a clear 400 before any generation
        return OutputOptions(self.format, sample_rate=self.sample_rate, bitrate=bitrate, volume_db=prosody.volume,
                             normalize_loudness=prosody.normalize_loudness)


def validate_tts_request(data: object) -> tuple[ServeTTSRequest, list[str]]:
    """A `/v1/tts` (or live `start`) body, validated: (the request, the fields it ignores). BadRequest names the
    first invalid field."""
    if not isinstance(data, dict):
        raise BadRequest("the request must be an object")
    try:
        body = ServeTTSRequest.model_validate(data)
    except ValidationError as exc:
        raise BadRequest(validation_message(exc)) from None
    return body, body.ignored_fields()


def read_tts_request(data: object, model: str | None, min_chunk_length: int = 0) -> tuple[SpeechParams, OutputOptions]:
    """A live `start` event's request (`shoal.live.ReadRequest`): what to speak and how to encode it."""
    body, _ = validate_tts_request(data)
    return body.speech_params(model, min_chunk_length), body.output()


def validation_message(exc: ValidationError) -> str:
    """pydantic's first error as one line: `field.path: what is wrong`."""
    first = exc.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "body"
    return f"{loc}: {first['msg']}"


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
    instructions: str | None = Field(None, max_length=500, description="gpt-4o-mini-tts's delivery instructions: "
                                     "a leading inline tag on S2-Pro; other models ignore them (named in "
                                     "X-Shoal-Ignored-Fields)")
    # Fish extensions
    seed: int | None = None
    temperature: float = field(TEMPERATURE)
    top_p: float = field(TOP_P)
    repetition_penalty: float = field(REPETITION_PENALTY)
    max_new_tokens: int = field(MAX_NEW_TOKENS)
    chunk_length: int = field(CHUNK_LENGTH)

