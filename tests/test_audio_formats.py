"""Output formats (one-shot and streamed), speed changes, and uploads only FFmpeg can read."""

from __future__ import annotations

import io
import struct

import av
import numpy as np
import pytest
import soundfile as sf

from shoal.audio import (FORMATS, MEDIA_TYPES, StreamEncoder, change_speed, encode_audio, load_audio,
                         output_format, write_audio)
from shoal.errors import BadRequest

from support import pyav_decode, tone

LOSSLESS = ("wav", "pcm", "flac")
LOSSY = ("mp3", "opus", "aac")
# First bytes of each format's stream: RIFF....WAVE, an ID3v2 tag or an MPEG frame sync, OggS, ADTS sync, fLaC.
MAGIC = {
    "wav": lambda b: b[:4] == b"RIFF" and b[8:12] == b"WAVE",
    "mp3": lambda b: b[:3] == b"ID3" or (b[0] == 0xFF and b[1] & 0xE0 == 0xE0),
    "opus": lambda b: b[:4] == b"OggS",
    "aac": lambda b: b[0] == 0xFF and b[1] & 0xF0 == 0xF0,
    "flac": lambda b: b[:4] == b"fLaC",
}
# Lossy codecs add priming and padding (mp3, aac) of a few thousand samples at most.
LOSSY_SLACK_SECONDS = 0.1


def pcm16(audio: np.ndarray) -> np.ndarray:
    """The quantisation the PCM16 formats promise: x * 32768, rounded, clipped."""
    return np.clip(np.rint(audio.astype(np.float64) * 32768), -32768, 32767).astype(np.int16)


def decode(data: bytes, fmt: str, sample_rate: int) -> tuple[np.ndarray, int]:
    """(mono samples, sample rate) as FFmpeg decodes them; pcm has no header, so it is read as what it claims."""
    samples, rate = pyav_decode(data, fmt, sample_rate)
    assert samples.shape[0] == 1, f"{samples.shape[0]} channels"
    return samples[0], rate


def dominant_frequency(audio: np.ndarray, sample_rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(audio * np.hanning(len(audio))))
    return float(np.argmax(spectrum)) * sample_rate / len(audio)


def rms(audio: np.ndarray) -> float:
    return float(np.sqrt(np.mean(audio.astype(np.float64) ** 2)))


def check_decodes_to(data: bytes, fmt: str, audio: np.ndarray, sample_rate: int) -> None:
    out, out_rate = decode(data, fmt, sample_rate)
    seconds, expected = len(out) / out_rate, len(audio) / sample_rate
    if fmt in LOSSLESS:
        assert out_rate == sample_rate and len(out) == len(audio)
        assert np.array_equal(pcm16(out), pcm16(audio))
        return
    assert expected - 0.01 <= seconds <= expected + LOSSY_SLACK_SECONDS
    middle = out[int(0.2 * out_rate):int((expected - 0.2) * out_rate)]  # past priming and edge effects
    assert abs(rms(middle) - rms(audio)) < 0.2 * rms(audio)
    assert abs(dominant_frequency(middle, out_rate) - 440) < 0.02 * 440


def test_formats_and_media_types():
    assert FORMATS == ("wav", "pcm", "mp3", "opus", "aac", "flac")
    assert dict(MEDIA_TYPES) == {"wav": "audio/wav", "pcm": "audio/pcm", "mp3": "audio/mpeg", "opus": "audio/ogg",
                                 "aac": "audio/aac", "flac": "audio/flac"}


@pytest.mark.parametrize("sample_rate", [44100, 22050])
@pytest.mark.parametrize("fmt", FORMATS)
def test_one_shot(fmt, sample_rate):
    audio = tone(1.5, sample_rate)
    data = encode_audio(audio, sample_rate, fmt)
    if fmt in MAGIC:
        assert MAGIC[fmt](data)
    check_decodes_to(data, fmt, audio, sample_rate)


@pytest.mark.parametrize("fmt", FORMATS)
def test_rates_an_encoder_lacks_are_resampled(fmt):
    audio = tone(1.0, 37000)  # not a rate lame, aac or opus takes
    check_decodes_to(encode_audio(audio, 37000, fmt), fmt, audio, 37000)


def test_whole_files_carry_real_lengths():
    """A one-shot file is seekable while written, so the muxers go back for the sizes a stream cannot have."""
    audio = tone(1.5, 44100)
    wav = encode_audio(audio, 44100, "wav")
    riff, data_size = struct.unpack("<I", wav[4:8])[0], struct.unpack("<I", wav[40:44])[0]
    assert wav[36:40] == b"data" and (riff, data_size) == (len(wav) - 8, 2 * len(audio))
    for fmt in ("wav", "flac"):
        read, rate = sf.read(io.BytesIO(encode_audio(audio, 44100, fmt)), dtype="int16")
        assert rate == 44100 and np.array_equal(read, pcm16(audio))
    # The LAME tag tells the decoder how much priming and padding to drop.
    mp3, _ = decode(encode_audio(audio, 44100, "mp3"), "mp3", 44100)
    assert abs(len(mp3) - len(audio)) < 1152


def test_clipping_and_non_finite_samples():
    audio = np.array([2.0, -2.0, 1.0, -1.0, np.nan, 0.5], np.float32)
    pcm = np.frombuffer(encode_audio(audio, 44100, "pcm"), "<i2")
    assert pcm.tolist() == [32767, -32768, 32767, -32768, 0, 16384]


def uneven_chunks(audio: np.ndarray) -> list[np.ndarray]:
    return np.array_split(audio, [7, 1500, 1500, 20011])  # one of them empty


@pytest.mark.parametrize("sample_rate", [44100, 22050])
@pytest.mark.parametrize("fmt", FORMATS)
def test_streaming(fmt, sample_rate):
    audio = tone(1.5, sample_rate)
    encoder = StreamEncoder(fmt, sample_rate)
    assert encoder.media_type == MEDIA_TYPES[fmt]
    parts = [encoder.push(chunk) for chunk in uneven_chunks(audio)] + [encoder.finish()]
    first = next(part for part in parts if part)
    if fmt in MAGIC:
        assert MAGIC[fmt](first)
    else:
        assert len(parts[0]) == 2 * 7  # pcm: the first seven samples, no header
    check_decodes_to(b"".join(parts), fmt, audio, sample_rate)


def test_streamed_wav_has_unknown_lengths_and_reads_everywhere():
    audio = tone(1.5, 44100)
    encoder = StreamEncoder("wav", 44100)
    first = encoder.push(audio[:100])
    assert first[:4] == b"RIFF" and first[4:8] == b"\xff\xff\xff\xff" and first[8:16] == b"WAVEfmt "
    assert first[36:44] == b"data\xff\xff\xff\xff" and len(first) == 44 + 200
    data = first + encoder.push(audio[100:]) + encoder.finish()
    read, rate = sf.read(io.BytesIO(data), dtype="int16")
    assert rate == 44100 and np.array_equal(read, pcm16(audio))


def test_header_comes_with_the_first_push_even_when_it_is_empty():
    for fmt in ("wav", "mp3", "opus", "flac"):
        assert MAGIC[fmt](StreamEncoder(fmt, 44100).push(np.zeros(0, np.float32)))


def test_stream_lifecycle():
    encoder = StreamEncoder("mp3", 44100)
    encoder.push(tone(0.1, 44100))
    assert encoder.finish()
    assert encoder.finish() == b""
    with pytest.raises(RuntimeError):
        encoder.push(tone(0.1, 44100))
    abandoned = StreamEncoder("opus", 44100)
    abandoned.push(tone(0.1, 44100))
    abandoned.close()
    with pytest.raises(ValueError, match="1-D"):
        StreamEncoder("wav", 44100).push(np.zeros((2, 10), np.float32))


@pytest.mark.parametrize("fmt", ["ogg", "MP3", "", None])
def test_unknown_format(fmt):
    with pytest.raises(BadRequest, match="wav, pcm, mp3, opus, aac, flac"):
        encode_audio(tone(0.1, 44100), 44100, fmt)
    with pytest.raises(BadRequest):
        StreamEncoder(fmt, 44100)


@pytest.mark.parametrize("speed", [2.0, 0.5, 0.25, 0.3, 1.5, 4.0])
@pytest.mark.parametrize("seconds", [1.0, 0.1])
def test_change_speed_keeps_pitch(speed, seconds):
    audio = tone(seconds, 44100)
    out = change_speed(audio, 44100, speed)
    assert out.dtype == np.float32 and out.ndim == 1 and len(out) == round(len(audio) / speed)
    assert abs(dominant_frequency(out, 44100) - 440) < 0.02 * 440
    # The whole tone is there, not lost in atempo's last window (which took a quarter of a short clip at 0.25):
    # what silence the cut to length leaves at the end is tens of ms at most.
    assert np.flatnonzero(np.abs(out) > 0.1)[-1] > len(out) - 0.05 * 44100


def test_change_speed_edges():
    audio = tone(0.5, 44100)
    assert change_speed(audio, 44100, 1.0) is audio
    assert len(change_speed(np.zeros(0, np.float32), 44100, 2.0)) == 0
    for bad in (0.1, 0.0, -1.0, float("nan"), 1000.0):
        with pytest.raises(BadRequest, match="speed"):
            change_speed(audio, 44100, bad)


def m4a(audio: np.ndarray, sample_rate: int, channels: int = 2) -> bytes:
    """AAC in an MP4 (iPhone voice memo style): a container libsndfile cannot read."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="ipod") as container:
        layout = "stereo" if channels == 2 else "mono"
        stream = container.add_stream("aac", rate=sample_rate, layout=layout)
        frame = av.AudioFrame.from_ndarray(np.tile(audio, (channels, 1)), format="fltp", layout=layout)
        frame.sample_rate = sample_rate
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    return buf.getvalue()


def check_tone(audio: np.ndarray, seconds: float, sample_rate: int = 44100) -> None:
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(len(audio) - seconds * sample_rate) < LOSSY_SLACK_SECONDS * sample_rate
    assert abs(dominant_frequency(audio, sample_rate) - 440) < 0.02 * 440
    assert abs(rms(audio[sample_rate // 5:-sample_rate // 5]) - rms(tone(1.0, 44100))) < 0.2 * 0.3


def test_load_m4a_falls_back_to_ffmpeg(tmp_path):
    data = m4a(tone(1.0, 48000), 48000)
    with pytest.raises(sf.SoundFileError):
        sf.read(io.BytesIO(data))  # the point: libsndfile cannot
    check_tone(load_audio(data), 1.0)
    (tmp_path / "memo.m4a").write_bytes(data)
    check_tone(load_audio(tmp_path / "memo.m4a"), 1.0)
    check_tone(load_audio(data, 22050), 1.0, 22050)


@pytest.mark.parametrize("fmt", LOSSY)
def test_load_our_own_lossy_outputs(fmt):
    check_tone(load_audio(encode_audio(tone(1.0, 44100), 44100, fmt)), 1.0)


@pytest.mark.parametrize("fmt", ["wav", "flac"])
def test_load_our_own_streams(fmt):
    """A saved stream can come back as a reference: libsndfile cannot read a FLAC with no total length."""
    audio = tone(1.0, 44100)
    encoder = StreamEncoder(fmt, 44100)
    data = encoder.push(audio) + encoder.finish()
    assert np.array_equal(pcm16(load_audio(data)), pcm16(audio))
    with pytest.raises(BadRequest, match="longer than 0.5 seconds"):
        load_audio(data, max_seconds=0.5)


@pytest.mark.parametrize("data", [
    b"definitely not audio" * 50,
    b"RIFF\x00\x00",
    b"\xff\xf1" + bytes(200),
])
def test_garbage_keeps_libsndfile_words(data):
    with pytest.raises(BadRequest, match="could not decode reference audio"):
        load_audio(data)


def test_truncated_m4a():
    data = m4a(tone(1.0, 44100), 44100)
    with pytest.raises(BadRequest, match="could not decode|no samples"):
        load_audio(data[: len(data) // 3])


def test_long_compressed_upload_is_refused():
    data = m4a(np.zeros(8000 * 5, np.float32), 8000, channels=1)
    assert len(data) < 20_000  # five seconds of silence is small: the limit is on decoded length
    with pytest.raises(BadRequest, match="longer than 2 seconds"):
        load_audio(data, max_seconds=2)
    # AAC's priming and padding, 2048 samples at most, are a quarter of a second at 8 kHz.
    assert 5 * 44100 <= len(load_audio(data, max_seconds=None)) < 5.3 * 44100


def test_ffmpeg_path_keeps_the_format_guards(monkeypatch):
    monkeypatch.setattr("shoal.audio.MAX_CHANNELS", 1)
    with pytest.raises(BadRequest, match="2 channels; at most 1"):
        load_audio(m4a(tone(0.2, 44100), 44100))
    # ADTS frames are self-delimiting, so two files back to back are one stream whose rate changes.
    spliced = encode_audio(tone(0.2, 44100), 44100, "aac") + encode_audio(tone(0.2, 22050), 22050, "aac")
    with pytest.raises(BadRequest, match="changes sample rate"):
        load_audio(spliced)


def test_ffmpeg_never_opens_other_files(tmp_path, monkeypatch):
    """An ffconcat script is audio to FFmpeg's prober, made of files on the server: only audio demuxers run."""
    (tmp_path / "secret.wav").write_bytes(encode_audio(tone(1.0, 44100), 44100, "wav"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BadRequest, match="could not decode"):
        load_audio(b"ffconcat version 1.0\nfile secret.wav\n")


@pytest.mark.parametrize("ext", [".wav", ".flac", ".ogg", ".mp3", ".opus", ".aac", ".pcm"])
def test_write_audio(tmp_path, ext):
    path = tmp_path / f"out{ext}"
    write_audio(path, tone(1.0, 44100), 44100)
    data = path.read_bytes()
    if ext == ".pcm":
        assert len(data) == 2 * 44100
    else:
        check_tone(load_audio(path), 1.0)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_output_format():
    assert output_format("a/b.MP3") == "mp3" and output_format("x.ogg") == "vorbis"
    with pytest.raises(BadRequest, match=r"cannot write x\.m4a: use one of \.wav, \.flac"):
        output_format("x.m4a")
