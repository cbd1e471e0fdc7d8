"""Speech recognition for tests: is the audio we make intelligible English?

PocketSphinx (PyPI `pocketsphinx`, with its bundled US English model) runs offline on any CPU in well under a
second per sentence. It is a weak recogniser, so tests compare word error rates with generous bounds and always
check that noise scores badly too, so the bound means something.

Importable as `from asr import transcribe, word_error_rate` from any test: pytest's default ("prepend") import
mode puts the directory of the rootdir conftest (tests/) on sys.path. It lives here rather than in
`shoal.testing` because it needs a test-only dependency.
"""

from __future__ import annotations

import re
from functools import lru_cache

import numpy as np
import soxr

ASR_SAMPLE_RATE = 16000


@lru_cache(maxsize=1)
def _decoder():
    from pocketsphinx import Decoder

    return Decoder(samprate=ASR_SAMPLE_RATE, loglevel="FATAL")


def transcribe(audio: np.ndarray, sample_rate: int) -> str:
    """Lower-case words PocketSphinx hears in float mono audio at `sample_rate` (resampled to 16 kHz int16)."""
    audio = np.asarray(audio, dtype=np.float32).reshape(-1)
    if sample_rate != ASR_SAMPLE_RATE:
        audio = soxr.resample(audio, sample_rate, ASR_SAMPLE_RATE)
    pcm = (np.clip(audio, -1.0, 1.0) * 32767).astype(np.int16)
    decoder = _decoder()
    decoder.start_utt()
    decoder.process_raw(pcm.tobytes(), full_utt=True)
    decoder.end_utt()
    hyp = decoder.hyp()
    return hyp.hypstr if hyp is not None else ""


def words(text: str) -> list[str]:
    """Lower-case words without punctuation, so "Dog." and "dog" match."""
    return re.findall(r"[a-z0-9']+", text.lower())


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Word-level edit distance (substitutions + insertions + deletions) over the number of reference words."""
    ref, hyp = words(reference), words(hypothesis)
    if not ref:
        return float(bool(hyp))
    previous = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, start=1):
        current = [i]
        for j, h in enumerate(hyp, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (r != h)))
        previous = current
    return previous[-1] / len(ref)
