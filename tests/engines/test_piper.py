"""The bundled piper voice: loads offline, speaks intelligibly, honours speed, seed, cancel and its limits."""

from __future__ import annotations

import shutil
import threading

import numpy as np
import pytest

from asr import transcribe, word_error_rate
from shoal.engines.base import Reference, SynthesisRequest
from shoal.engines.piper import PiperEngine, bundled_voice
from shoal.errors import BadRequest, Cancelled, CheckpointError

FOX = "The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def engine() -> PiperEngine:
    return PiperEngine.load()


def test_bundled_voice_speaks_a_sentence(engine):
    rate, audio = engine.tts(FOX, seed=0)
    assert engine.name == "piper" and not engine.supports_cloning
    assert rate == engine.sample_rate == 22050
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert 1.5 < len(audio) / rate < 5.0  # nine words at a normal pace
    assert np.sqrt(np.mean(audio ** 2)) > 0.02  # not silence
    assert np.abs(audio).max() <= 1.0


def test_run_reports_a_synthesis_without_codes(engine):
    result = engine.run(SynthesisRequest(FOX, seed=-7))
    assert result.seed == 7 and result.codes.shape == (0, 0) and result.codes.dtype == np.int64
    assert result.frames_generated == 0 and result.stopped_by_im_end == []
    assert result.seconds > 0 and result.real_time_factor < 1.0


def test_one_chunk_per_sentence_with_progress(engine):
    seen = []
    chunks = list(engine.synthesize(SynthesisRequest("Hello there. How are you today?", seed=1),
                                    progress=lambda done, total: seen.append((done, total))))
    assert len(chunks) == 2 and all(c.dtype == np.float32 and len(c) > 0 for c in chunks)
    assert seen == [(1, 2), (2, 2)]


def test_seeded_output_is_deterministic(engine):
    first = engine.run(SynthesisRequest(FOX, seed=42)).audio
    second = engine.run(SynthesisRequest(FOX, seed=42)).audio
    np.testing.assert_array_equal(first, second)


def test_unseeded_output_varies_and_temperature_drives_the_noise(engine):
    cold = engine.settings_for(SynthesisRequest(FOX, temperature=0.4))
    default = engine.settings_for(SynthesisRequest(FOX))
    assert default.noise_scale == pytest.approx(engine.voice.config.noise_scale)
    assert cold.noise_scale == pytest.approx(default.noise_scale / 2)
    assert cold.noise_w_scale == pytest.approx(default.noise_w_scale / 2)
    seeded = engine.settings_for(SynthesisRequest(FOX, seed=3))
    assert seeded.noise_scale == seeded.noise_w_scale == 0.0


def test_speed_two_roughly_halves_the_duration(engine):
    def duration(speed: float) -> float:
        return engine.run(SynthesisRequest(FOX, seed=0, speed=speed)).duration

    normal, fast = duration(1.0), duration(2.0)
    # Not exactly half: piper rounds every phoneme up to whole frames (see PiperEngine); 0.61 measured.
    assert 0.45 < fast / normal < 0.7
    assert duration(4.0) < fast and duration(0.5) > 1.5 * normal


def test_references_are_refused_with_a_pointer_to_fish(engine):
    request = SynthesisRequest(FOX, references=(Reference(b"RIFF", "hello"),))
    with pytest.raises(BadRequest, match="cannot clone voices.*fish"):
        engine.synthesize(request)


def test_empty_and_unpronounceable_text_are_bad_requests(engine):
    with pytest.raises(BadRequest, match="empty"):
        engine.tts("   ")
    with pytest.raises(BadRequest, match="pronounce"):
        engine.tts("...")


def test_cancel_stops_after_the_sentence_in_progress(engine):
    """The engine thread runs ahead of its reader, so the sentence it is on when the cancel comes may still be
    delivered; nothing after it is."""
    cancel = threading.Event()
    chunks = []
    text = " ".join(f"Sentence number {n}." for n in range(1, 11))
    for chunk in engine.synthesize(SynthesisRequest(text, seed=0), cancel=cancel):
        chunks.append(chunk)
        cancel.set()
    assert 1 <= len(chunks) <= 3
    with pytest.raises(Cancelled):
        engine.run(SynthesisRequest(FOX, seed=0), cancel=cancel)


def test_the_voice_is_intelligible_and_noise_is_not(engine):
    rate, audio = engine.tts(FOX, seed=0)
    heard = transcribe(audio, rate)
    assert word_error_rate(FOX, heard) < 0.5, heard
    noise = np.random.default_rng(0).uniform(-0.5, 0.5, len(audio)).astype(np.float32)
    assert word_error_rate(FOX, transcribe(noise, rate)) > 0.8


def test_word_error_rate_counts_edits_per_reference_word():
    assert word_error_rate("the lazy dog.", "The lazy dog") == 0.0
    assert word_error_rate("a b c d", "a x c") == 0.5  # one substitution, one deletion
    assert word_error_rate("a b", "") == 1.0


def test_missing_or_corrupt_voice_files_are_checkpoint_errors(tmp_path, engine):
    with pytest.raises(CheckpointError, match="does not exist"):
        PiperEngine.load(tmp_path / "nope.onnx")
    model, config = tmp_path / "bad.onnx", tmp_path / "bad.onnx.json"
    model.write_bytes(b"not an onnx model")
    config.write_text("{not json")
    with pytest.raises(CheckpointError, match="config .* is not valid"):
        PiperEngine.load(model)
    shutil.copy(bundled_voice()[1], config)
    with pytest.raises(CheckpointError, match="cannot load piper voice"):
        PiperEngine.load(model, config)
