"""A CPU stand-in for the few torchaudio entry points fish-speech 0.1.0 uses at inference time.

Installed by ../setup.sh in place of PyPI's torchaudio, whose x86_64 wheels are CUDA builds that fail to load next to
a CPU-only torch (and whose recent releases dropped `list_audio_backends`, which fish 0.1.0 still calls).
Decoding goes through libsndfile (soundfile), resampling through libsoxr (soxr). Only `load` matters for the
golden fixtures: their clip is already 44100 Hz, so nothing is ever resampled.
"""

from __future__ import annotations

import io
import os

import numpy as np
import soundfile
import torch

from . import functional, transforms

__all__ = ["functional", "transforms", "load", "list_audio_backends", "info"]
__version__ = "0.0.0+shoal-cpu-stand-in"


def list_audio_backends() -> list[str]:
    return ["soundfile"]


def _source(uri):
    if isinstance(uri, (bytes, bytearray, memoryview)):
        return io.BytesIO(bytes(uri))
    if isinstance(uri, os.PathLike):
        return os.fspath(uri)
    return uri  # a path string or a file-like object: soundfile takes both


def load(uri, frame_offset: int = 0, num_frames: int = -1, normalize: bool = True, channels_first: bool = True,
         format=None, buffer_size: int = 4096, backend=None):
    """(waveform float32 [channels, frames], sample_rate), like torchaudio.load with normalize=True.

    libsndfile scales integer PCM by 1/32768 (PCM16) exactly as torchaudio's backends do."""
    if not normalize:
        raise NotImplementedError("this torchaudio stand-in only loads normalised float32 audio")
    stop = None if num_frames is None or num_frames < 0 else frame_offset + num_frames
    data, rate = soundfile.read(_source(uri), start=frame_offset, stop=stop, dtype="float32", always_2d=True)
    wave = torch.from_numpy(np.ascontiguousarray(data.T if channels_first else data))
    return wave, rate


class _Info:
    def __init__(self, sample_rate, num_frames, num_channels):
        self.sample_rate, self.num_frames, self.num_channels = sample_rate, num_frames, num_channels


def info(uri, format=None, backend=None):
    meta = soundfile.info(_source(uri))
    return _Info(meta.samplerate, meta.frames, meta.channels)
