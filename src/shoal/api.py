"""The in-process Python API: load the engine once, then call it from your own program.

    import shoal

    with shoal.load("checkpoints/openaudio-s1-mini") as tts:
        sr, audio = tts("Hello!", speaker_wav="me.wav", prompt_text="What I say in me.wav.", seed=7)

`shoal.load` builds everything through the same composition root as `shoal serve` and `shoal say`
(`shoal.compose`), so the settings mean the same here: keyword arguments first, then `SHOAL_*` environment
variables, then `.env`, then the defaults. Requests go through the same service as the server's: the same
validation, the same saved voices, the same admission limit and timeout, and the same engine, whose scheduler
batches the requests of several threads into shared decode steps.

The service is asynchronous; a `TTS` runs it on an event loop of its own, in one background thread, and each
call blocks its caller until its audio is ready (or, for `stream`, yields chunks as they are decoded).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from shoal.errors import BadRequest, NotFound, Unavailable
from shoal.params import CHUNK_LENGTH, MAX_NEW_TOKENS, REPETITION_PENALTY, SPEED, TEMPERATURE, TOP_P
from shoal.service import DEFAULT_VOICE, Service, SpeechParams
from shoal.voices import Voice

AudioSource = str | os.PathLike | bytes

__all__ = ["TTS", "load"]


def load(checkpoint: str | os.PathLike | None = None, *, device: str = "auto", precision: str = "auto",
         data_dir: str | os.PathLike | None = None, warm_up: bool = True, **settings: Any) -> "TTS":
    """Load the engines once and return a `TTS` to call.

    - `checkpoint`: an S1 checkpoint directory; None searches where `shoal serve` does
      (`checkpoints/openaudio-s1-mini`, then the data dir's). With none found, the bundled lite voice (piper)
      speaks and `TTS.notice` says why.
    - `device`: `auto` (cuda > mps > cpu), `cpu`, `cuda`, `cuda:N` or `mps`; `precision`: `auto` (bf16 on CUDA,
      float32 elsewhere), `float32`, `bfloat16`.
    - `data_dir`: where saved voices live (default: the per-user data dir, shared with `shoal serve`).
    - any other setting of the README's configuration table by its lower-case name, e.g. `max_batch_size=8`,
      `compile=True`, `max_seq_len=4096`, `request_timeout=60`.

    Raises CheckpointError for a missing or broken checkpoint and BadRequest for an invalid setting.
    """
    from shoal.compose import build_service
    from shoal.envcheck import warn_if_polluted
    from shoal.settings import Settings

    warn_if_polluted(logging.getLogger("shoal"))  # one warning line if another environment leaks in
    given = {"checkpoint": checkpoint, "device": device, "precision": precision, "data_dir": data_dir, **settings}
    unknown = sorted(set(given) - set(Settings.model_fields))
    if unknown:
        raise BadRequest(f"unknown setting {unknown[0]!r}; settings are: {', '.join(Settings.model_fields)}")
    service = build_service(Settings.load(cli=given), warm_up=warm_up)
    return TTS(service)


class TTS:
    """A loaded engine. Thread-safe: several threads may call it at once, and their requests are batched.

    Every method raises the documented `shoal.errors` exceptions: BadRequest for invalid input (with the valid
    choices where there are some), NotFound for a missing file or voice, Busy when `queue_size` requests are
    already in flight, Timeout past `request_timeout`, EngineFailure when generation fails, Unavailable once
    closed.
    """

    def __init__(self, service: Service):
        self.service = service
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="shoal-api", daemon=True)
        self._thread.start()
        self._closed = False

    # -- what is loaded ------------------------------------------------------------------------------------------
    @property
    def models(self) -> list[str]:
        """The loaded models (`fish` with a checkpoint, `piper` always); the first call argument `model` picks."""
        return self.service.model_names

    @property
    def default_model(self) -> str:
        return self.service.engines.default

    @property
    def sample_rate(self) -> int:
        """The default model's output sample rate (each call also returns the rate of the model it used)."""
        return self.service.engines.get(self.default_model).sample_rate

    @property
    def notice(self) -> str | None:
        """Why the lite voice stands in, when no checkpoint was found; None otherwise."""
        return self.service.engines.notice

    # -- speech --------------------------------------------------------------------------------------------------
    def __call__(self, text: str, speaker_wav: AudioSource | Sequence[AudioSource] | None = None,
                 prompt_text: str | Sequence[str] | None = None, *,
                 voice: str | None = None, model: str | None = None, seed: int | None = None,
                 temperature: float = TEMPERATURE.default, top_p: float = TOP_P.default,
                 repetition_penalty: float = REPETITION_PENALTY.default,
                 max_new_tokens: int = MAX_NEW_TOKENS.default, chunk_length: int = CHUNK_LENGTH.default,
                 speed: float = SPEED.default) -> tuple[int, np.ndarray]:
        """Speak `text` and return `(sample_rate, audio)`, the audio float32 mono in [-1, 1].

        Clone a voice with `speaker_wav` (a path or the bytes of an audio file: wav, flac, mp3, ogg, m4a) and
        `prompt_text` (what is said in it), or with `voice`, the id of a saved voice. For S2-Pro's speakers, give
        lists: clip i (with its text) is `<|speaker:i|>`. `seed` makes the output
        repeatable. The sampling parameters, their defaults and ranges are the server's (`shoal.params`);
        non-streamed audio is decoded in one piece per segment, exactly as the reference decodes it.
        """
        job = self.service.prepare(self._params(text, speaker_wav, prompt_text, voice, model, seed, temperature,
                                                top_p, repetition_penalty, max_new_tokens, chunk_length, speed))
        audio = self._run(self.service.synthesize(job))
        return job.engine.sample_rate, audio

    def stream(self, text: str, speaker_wav: AudioSource | Sequence[AudioSource] | None = None,
               prompt_text: str | Sequence[str] | None = None, *,
               voice: str | None = None, model: str | None = None, seed: int | None = None,
               temperature: float = TEMPERATURE.default, top_p: float = TOP_P.default,
               repetition_penalty: float = REPETITION_PENALTY.default,
               max_new_tokens: int = MAX_NEW_TOKENS.default, chunk_length: int = CHUNK_LENGTH.default,
               speed: float = SPEED.default) -> Iterator[np.ndarray]:
        """Yield float32 audio chunks at `sample_rate_of(model)` Hz as they are generated (the first after about
        half a second of audio). Same arguments as calling the object. Leaving the loop early (break, an
        exception, or closing the iterator) stops the generation at the engine's next step."""
        job = self.service.prepare(self._params(text, speaker_wav, prompt_text, voice, model, seed, temperature,
                                                top_p, repetition_penalty, max_new_tokens, chunk_length, speed))
        chunks = self.service.stream(job)
        try:
            while True:
                try:
                    yield self._run(chunks.__anext__())
                except StopAsyncIteration:
                    return
        finally:
            if not self._closed:
                self._run(chunks.aclose())

    def sample_rate_of(self, model: str | None = None) -> int:
        """The output sample rate of `model` (None: the default model)."""
        return self.service.resolve_model(model)[1].sample_rate

    # -- saved voices --------------------------------------------------------------------------------------------
    def save_voice(self, voice_id: str, speaker_wav: AudioSource, prompt_text: str,
                   overwrite: bool = False) -> Voice:
        """Save a voice under `voice_id` (`[A-Za-z0-9_-]{1,64}`): the clip and its transcript, with its codes
        computed now, once, so later calls with `voice=voice_id` run no encoder. Conflict if it exists and
        `overwrite` is False. Saved voices are shared with `shoal serve` when the data dir is the same."""
        self._check_open()
        return self.service.add_voice(voice_id, read_audio_source(speaker_wav), prompt_text, overwrite=overwrite)

    def voices(self) -> list[str]:
        """The ids of the saved voices."""
        return [v.id for v in self.service.list_voices()]

    def delete_voice(self, voice_id: str) -> None:
        """Delete a saved voice (NotFound if there is none by that id)."""
        self.service.delete_voice(voice_id)

    # -- lifetime ------------------------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop the engines and the background thread. Calls after this raise Unavailable. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.service.close(engines=True)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> "TTS":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"models {', '.join(self.models)}"
        return f"<shoal.TTS {state}, default {self.default_model}>"

    # -- helpers -------------------------------------------------------------------------------------------------
    def _params(self, text, speaker_wav, prompt_text, voice, model, seed, temperature, top_p, repetition_penalty,
                max_new_tokens, chunk_length, speed) -> SpeechParams:
        self._check_open()
        references: Sequence[tuple[bytes, str]] = ()
        if speaker_wav is not None or prompt_text is not None:
            if speaker_wav is None or not prompt_text:
                raise BadRequest("speaker_wav and prompt_text go together: a clip of the voice and what is said "
                                 "in it")
            if voice not in (None, DEFAULT_VOICE):
                raise BadRequest("give either speaker_wav and prompt_text, or voice, not both")
            several = isinstance(speaker_wav, (list, tuple))
            if several != isinstance(prompt_text, (list, tuple)) or (several and len(speaker_wav) != len(prompt_text)):
                raise BadRequest("a list of speaker_wav takes a list of prompt_text of the same length (what is "
                                 "said in each clip), and one clip one text")
            pairs = list(zip(speaker_wav, prompt_text)) if several else [(speaker_wav, prompt_text)]
            if not all(isinstance(text, str) and text for _, text in pairs):
                raise BadRequest("every speaker_wav needs its prompt_text (what is said in it)")
            references = [(read_audio_source(clip), text) for clip, text in pairs]
        return SpeechParams(text=text, model=model, voice=voice, references=references, seed=seed,
                            temperature=temperature, top_p=top_p, repetition_penalty=repetition_penalty,
                            max_new_tokens=max_new_tokens, chunk_length=chunk_length, speed=speed)

    def _run(self, awaitable):
        """Run an awaitable on the API's loop and wait for it; an interrupted caller cancels it."""
        future = asyncio.run_coroutine_threadsafe(_awaited(awaitable), self._loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()
            raise

    def _check_open(self) -> None:
        if self._closed:
            raise Unavailable("this shoal.TTS is closed; load another with shoal.load()")


async def _awaited(awaitable):
    """Any awaitable as a coroutine (run_coroutine_threadsafe takes only coroutines; an async generator's
    __anext__ and aclose give other awaitables)."""
    return await awaitable


def read_audio_source(source: AudioSource) -> bytes:
    """The bytes of an audio file given by path or as bytes; a missing file is NotFound."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    if not isinstance(source, (str, os.PathLike)):
        raise BadRequest(f"an audio clip must be a file path or the file's bytes, got {type(source).__name__}")
    path = Path(source).expanduser()
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise NotFound(f"audio file {path} does not exist") from None
    except OSError as exc:
        raise BadRequest(f"cannot read audio file {path}: {exc.strerror or exc}") from None

