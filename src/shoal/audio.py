"""Reference-audio loading: any file libsndfile reads, to float32 mono at the codec's sample rate.

Reproduces the reference's loader (torchaudio.load, then channel mean, then resample only if needed):
integer PCM becomes float by dividing by 2^(bits-1) (PCM16: int16 / 32768), so a 44.1 kHz file gives
bit-identical samples. No loudness normalisation, trimming or silence removal, as in the reference.
"""

from __future__ import annotations

import io
import math
import os
from typing import Union

import numpy as np
import soundfile as sf
import soxr

from shoal.errors import BadRequest, NotFound
from shoal.files import atomic_write

AudioSource = Union[bytes, bytearray, memoryview, str, os.PathLike]

# Rates outside this range are either corrupt headers or nothing a voice clip is recorded at.
MIN_SAMPLE_RATE = 1_000
MAX_SAMPLE_RATE = 384_000
MAX_CHANNELS = 64
# Compressed formats can expand a small upload into hours of samples; a reference clip is seconds long.
DEFAULT_MAX_SECONDS = 600.0
# libsndfile and soundfile raise these for unreadable or truncated data.
DECODE_ERRORS = (sf.SoundFileError, RuntimeError, ValueError, TypeError, EOFError)


def load_audio(source: AudioSource, target_sr: int = 44100, *,
               max_seconds: float | None = DEFAULT_MAX_SECONDS) -> np.ndarray:
    """Decode `source` (encoded bytes, or a path) to a 1-D float32 mono array at `target_sr`.

    Raises BadRequest for empty, undecodable, silent-by-absence (zero frames), non-finite or absurd audio,
    NotFound for a path that does not exist. `max_seconds=None` lifts the duration limit."""
    if target_sr <= 0:
        raise ValueError(f"target_sr must be positive, got {target_sr}")
    audio, sample_rate = read_audio(source, max_seconds)
    mono = downmix(audio)
    if sample_rate != target_sr:
        mono = resample(mono, sample_rate, target_sr)
    return mono


def open_source(source: AudioSource) -> tuple[io.BytesIO | str, str]:
    """A file object or path for soundfile, plus how to name it in messages."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise BadRequest("reference audio is empty")
        return io.BytesIO(data), "reference audio"
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise NotFound(f"reference audio file {path} does not exist")
        if os.path.getsize(path) == 0:
            raise BadRequest(f"reference audio is empty: {path}")
        return path, f"reference audio {path}"
    raise TypeError(f"audio source must be bytes or a path, got {type(source).__name__}")


def read_audio(source: AudioSource, max_seconds: float | None) -> tuple[np.ndarray, int]:
    """float32 `[frames, channels]` and the file's sample rate, checked for sanity."""
    file, name = open_source(source)
    try:
        with sf.SoundFile(file) as f:
            sample_rate, channels = f.samplerate, f.channels
            check_format(name, sample_rate, channels)
            limit = None if max_seconds is None else math.ceil(max_seconds * sample_rate)
            # Reading at most limit + 1 frames bounds memory even when the header under-states the length.
            audio = f.read(frames=-1 if limit is None else limit + 1, dtype="float32", always_2d=True)
    except DECODE_ERRORS as exc:
        raise BadRequest(f"could not decode {name}: {decode_reason(exc)}") from exc
    if limit is not None and len(audio) > limit:
        raise BadRequest(f"{name} is longer than {max_seconds:g} seconds")
    if len(audio) == 0:
        raise BadRequest(f"{name} has no samples")
    if not np.isfinite(audio).all():
        raise BadRequest(f"{name} contains NaN or infinite samples")
    return audio, sample_rate


def check_format(name: str, sample_rate: int, channels: int) -> None:
    if channels < 1:
        raise BadRequest(f"{name} has no channels")
    if channels > MAX_CHANNELS:
        raise BadRequest(f"{name} has {channels} channels; at most {MAX_CHANNELS} are accepted")
    if not MIN_SAMPLE_RATE <= sample_rate <= MAX_SAMPLE_RATE:
        raise BadRequest(f"{name} has sample rate {sample_rate} Hz; accepted: {MIN_SAMPLE_RATE}.."
                         f"{MAX_SAMPLE_RATE} Hz")


def decode_reason(exc: Exception) -> str:
    """libsndfile's own words ("Format not recognised."), without soundfile's "<BytesIO object at 0x...>"."""
    return getattr(exc, "error_string", None) or str(exc) or type(exc).__name__


def downmix(audio: np.ndarray) -> np.ndarray:
    """Mean over channels, summed channel by channel in float32 then divided, as torch.mean(dim=0) does for
    the reference's [channels, frames] tensor, so multi-channel input matches it bit for bit."""
    if audio.shape[1] == 1:
        return np.ascontiguousarray(audio[:, 0])
    total = audio[:, 0].copy()
    for c in range(1, audio.shape[1]):
        total += audio[:, c]
    total /= np.float32(audio.shape[1])
    return total


def resample(audio: np.ndarray, from_sr: int, to_sr: int) -> np.ndarray:
    """Band-limited resampling with soxr at its very-high-quality setting.

    The reference uses torchaudio.transforms.Resample (windowed sinc, different filter and output length
    rounding), so resampled audio is close to, but not bit-identical with, the reference's."""
    out = soxr.resample(audio, from_sr, to_sr, quality="VHQ")
    return np.ascontiguousarray(out, dtype=np.float32)


# Output containers soundfile writes, by file extension.
WRITE_FORMATS = {".wav": ("WAV", "PCM_16"), ".flac": ("FLAC", "PCM_16"), ".ogg": ("OGG", "VORBIS")}


def output_format(path: str | os.PathLike) -> tuple[str, str]:
    """(container, subtype) for an output file name, or BadRequest naming the extensions that work."""
    target = os.fspath(path)
    ext = os.path.splitext(target)[1].lower()
    if ext not in WRITE_FORMATS:
        raise BadRequest(f"cannot write {target}: use one of {', '.join(WRITE_FORMATS)}")
    return WRITE_FORMATS[ext]


def write_audio(path: str | os.PathLike, audio: np.ndarray, sample_rate: int) -> None:
    """Write float32 audio to `path`, its format chosen by extension (.wav, .flac, .ogg), atomically."""
    container, subtype = output_format(path)
    with atomic_write(path) as f:
        sf.write(f, np.clip(audio, -1.0, 1.0), sample_rate, format=container, subtype=subtype)
