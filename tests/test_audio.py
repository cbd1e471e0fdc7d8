"""load_audio: bit-exact on the fixture's reference clip, sane on everything else."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf

from shoal.audio import load_audio
from shoal.errors import BadRequest, NotFound

from support import audio_file, load_codec_golden, tone


def test_reference_clip_is_bit_exact(fixture_dir):
    golden = load_codec_golden(fixture_dir)["audio"]
    audio = load_audio((fixture_dir / "reference.wav").read_bytes())
    assert audio.dtype == np.float32 and audio.shape == golden.shape
    assert np.array_equal(audio, golden)


def test_path_input(fixture_dir):
    path = fixture_dir / "reference.wav"
    golden = load_codec_golden(fixture_dir)["audio"]
    assert np.array_equal(load_audio(path), golden)
    assert np.array_equal(load_audio(str(path)), golden)


def test_stereo_is_averaged():
    rng = np.random.default_rng(0)
    pcm = rng.integers(-32768, 32767, size=(1000, 2), dtype=np.int16)
    audio = load_audio(audio_file(pcm, 44100, subtype="PCM_16"))
    left, right = (pcm.astype(np.float32) / np.float32(32768)).T
    assert np.array_equal(audio, (left + right) / np.float32(2))


def test_resampling_from_22050():
    n = 22050
    audio = load_audio(audio_file(tone(1.0, 22050), 22050, subtype="FLOAT"))
    assert audio.dtype == np.float32 and abs(len(audio) - 2 * n) <= 2
    assert np.allclose(audio[2000:-2000], tone(1.0, 44100)[2000:-2000], atol=1e-3)


@pytest.mark.parametrize("format,subtype", [("FLAC", "PCM_16"), ("OGG", "VORBIS"), ("MP3", "MPEG_LAYER_III")])
def test_compressed_formats(format, subtype):
    if format not in sf.available_formats():
        pytest.skip(f"this libsndfile has no {format} support")
    audio = load_audio(audio_file(tone(1.0, 44100), 44100, format, subtype))
    assert audio.dtype == np.float32 and audio.ndim == 1 and abs(len(audio) - 44100) <= 2048


@pytest.mark.parametrize("data,message", [
    (b"", "empty"),
    (b"definitely not audio" * 50, "could not decode"),
    (b"RIFF\x00\x00", "could not decode"),
])
def test_undecodable_bytes(data, message):
    with pytest.raises(BadRequest, match=message):
        load_audio(data)


def test_no_frames():
    with pytest.raises(BadRequest, match="no samples"):
        load_audio(audio_file(np.zeros((0, 1), np.float32), 44100, subtype="FLOAT"))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_samples(bad):
    audio = tone(1000 / 44100, 44100)
    audio[10] = bad
    with pytest.raises(BadRequest, match="NaN or infinite"):
        load_audio(audio_file(audio, 44100, subtype="FLOAT"))


def test_absurd_sample_rate():
    with pytest.raises(BadRequest, match="sample rate 500"):
        load_audio(audio_file(tone(2.0, 500), 500, subtype="PCM_16"))


def test_duration_limit():
    data = audio_file(tone(2.0, 44100), 44100, subtype="PCM_16")
    with pytest.raises(BadRequest, match="longer than 1 seconds"):
        load_audio(data, max_seconds=1)
    assert len(load_audio(data, max_seconds=None)) == 88200


def test_missing_and_empty_paths(tmp_path):
    with pytest.raises(NotFound):
        load_audio(tmp_path / "nope.wav")
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(BadRequest, match="empty"):
        load_audio(tmp_path / "empty.wav")


@pytest.mark.parametrize("level_db", [-40.0, -20.0, -8.0])
def test_loudness_normalisation_reaches_the_target_whole_and_streamed(level_db):
    from shoal.audio import LOUDNESS_TARGET_DBFS, Loudness

    rate = 44100
    t = np.arange(rate * 2) / rate
    speech = (np.sin(2 * np.pi * 220 * t) * np.sqrt(2) * 10 ** (level_db / 20)).astype(np.float32)
    audio = np.concatenate([np.zeros(rate // 2, np.float32), speech])  # silence is gated out
    whole = Loudness(rate)(audio)
    stream = Loudness(rate)
    streamed = np.concatenate([stream(audio[i:i + 4096]) for i in range(0, len(audio), 4096)])

    def speech_db(x):
        return 10 * np.log10(np.mean(x[rate // 2:].astype(np.float64) ** 2))

    assert abs(speech_db(whole) - LOUDNESS_TARGET_DBFS) < 0.01
    assert abs(speech_db(streamed[-rate:]) - LOUDNESS_TARGET_DBFS) < 0.1  # converged once it has heard enough
    assert np.max(np.abs(np.diff(streamed))) < 0.1  # ramped, no jumps
