"""What every engine takes and gives: the request, the reference clips, the engine interface."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Protocol

import numpy as np

from shoal.errors import BadRequest, NotFound
from shoal.params import CHUNK_LENGTH, MAX_NEW_TOKENS, PARAMS, REPETITION_PENALTY, SPEED, TEMPERATURE, TOP_P

# Seeds as the reference normalises them: negative seeds are mirrored, large ones capped at 2**31.
SEED_CAP = 1 << 31

#: Called as progress(done, total) while frames are generated; total is an upper bound.
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Reference:
    """A voice to clone: a clip (encoded audio bytes or a path) and what is said in it.

    `codes` (int64 `[num_codebooks, F]`), when given, are the clip already encoded by this engine's codec (a
    saved voice): the engine then uses them as they are and never runs the encoder. `audio` may be None then.
    """

    audio: bytes | str | os.PathLike | None
    text: str
    codes: np.ndarray | None = None
    #: Whether the engine may keep this clip's codes in its in-memory cache (Fish's `use_memory_cache`).
    cache: bool = True

    def read_bytes(self) -> bytes:
        if self.audio is None:
            raise BadRequest("reference has neither audio nor codes")
        if isinstance(self.audio, (bytes, bytearray, memoryview)):
            return bytes(self.audio)
        path = Path(self.audio)
        try:
            return path.read_bytes()
        except FileNotFoundError as exc:
            raise NotFound(f"reference audio file {path} does not exist") from exc
        except OSError as exc:
            raise BadRequest(f"cannot read reference audio {path}: {exc.strerror or exc}") from exc


@dataclass(frozen=True)
class SynthesisRequest:
    """One text-to-speech request. Defaults and ranges are `shoal.params`' (those of Fish Speech's
    `ServeTTSRequest`); `seed`: same seed and request give the same audio, None draws a fresh seed."""

    text: str
    references: tuple[Reference, ...] = ()
    seed: int | None = None
    temperature: float = TEMPERATURE.default
    top_p: float = TOP_P.default
    repetition_penalty: float = REPETITION_PENALTY.default
    max_new_tokens: int = MAX_NEW_TOKENS.default
    chunk_length: int = CHUNK_LENGTH.default
    speed: float = SPEED.default

    def __post_init__(self) -> None:
        object.__setattr__(self, "references", tuple(self.references))
        self.validate()

    def validate(self) -> None:
        """Raise BadRequest for anything the engine cannot honour, with the field's name and range."""
        if not isinstance(self.text, str) or not self.text.strip():
            raise BadRequest("text is empty")
        check_speakable("text", self.text)
        for param in PARAMS.values():
            param.check(getattr(self, param.name))
        if self.max_new_tokens == 1:
            raise BadRequest("max_new_tokens must be 0 (as many as fit) or at least 2: the last generated frame "
                             "is never decoded")
        if self.seed is not None and not _is_int(self.seed):
            raise BadRequest("seed must be an integer")
        for ref in self.references:
            if not isinstance(ref, Reference):
                raise BadRequest("references must be Reference(audio, text) items")
            if not isinstance(ref.text, str) or not ref.text.strip():
                raise BadRequest("a reference needs the transcript of its clip (reference text is empty)")

    def effective_seed(self) -> int:
        """The seed generation runs with: the caller's, normalised like the reference, or a fresh one."""
        if self.seed is None:
            return int.from_bytes(os.urandom(4), "little") % SEED_CAP
        seed = -self.seed if self.seed < 0 else self.seed
        return min(seed, SEED_CAP)


def check_speakable(name: str, text: str) -> None:
    """Text every engine can take. JSON's `\\ud800` escapes decode to lone surrogates, which are no Unicode
    text (piper cannot encode them to UTF-8 for espeak), and espeak refuses NUL: both used to fail inside
    generation as a 500."""
    if "\x00" in text:
        raise BadRequest(f"{name} must not contain NUL characters")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise BadRequest(f"{name} is not valid Unicode: lone surrogate at character {exc.start}") from None


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


@dataclass
class Synthesis:
    """Everything one request produced, for callers that want more than audio (CLI stats, tests, server)."""

    sample_rate: int
    audio: np.ndarray
    codes: np.ndarray  # int64 [num_codebooks, T]: what the codec decoded, all segments concatenated
    seed: int
    frames_generated: int
    stopped_by_im_end: list[bool]
    seconds: float

    @property
    def duration(self) -> float:
        return len(self.audio) / self.sample_rate

    @property
    def real_time_factor(self) -> float:
        """Wall time over audio time: below 1 is faster than real time."""
        return self.seconds / self.duration if self.duration else float("inf")


class Engine(Protocol):
    """What the service layer, the CLI and the UI rely on."""

    name: str
    sample_rate: int
    #: Whether references (inline clips or saved voices) can be used; engines that cannot reject them.
    supports_cloning: bool

    def synthesize(self, request: SynthesisRequest, progress: Progress | None = None,
                   cancel: threading.Event | None = None, stream: bool = True) -> Iterator[np.ndarray]:
        """Yield float32 mono audio chunks at `sample_rate` as they become available (`stream=False`: the
        caller wants the whole audio, so the engine may decode in larger pieces). Setting `cancel` stops
        generation at the next step (the iterator then ends early)."""
        ...

    def run(self, request: SynthesisRequest, progress: Progress | None = None,
            cancel: threading.Event | None = None) -> Synthesis:
        """Synthesize the whole request and return it with its codes and statistics (Cancelled if `cancel`
        is set before the end)."""
        ...
