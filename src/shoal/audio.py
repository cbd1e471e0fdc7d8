"""Audio in and out: reference uploads to float32 mono, engine output to wav/pcm/mp3/opus/aac/flac bytes.

Loading reproduces the reference's loader (torchaudio.load, then channel mean, then resample only if needed):
integer PCM becomes float by dividing by 2^(bits-1) (PCM16: int16 / 32768), so a 44.1 kHz file gives
bit-identical samples. No loudness normalisation, trimming or silence removal, as in the reference.
libsndfile reads what it can (wav, flac, ogg, mp3); FFmpeg, through PyAV, reads the rest (m4a, ADTS AAC, WebM).

Encoding goes through one path, `StreamEncoder`, for streamed responses and whole files alike: PyAV muxes
into a Python file object that is drained after every push. PCM16 outputs (wav, pcm, flac) quantise as
x * 32768, rounded and clipped, the inverse of the loader, so decoding and re-encoding a PCM16 clip is exact.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
from dataclasses import dataclass, field
from fractions import Fraction
from types import MappingProxyType
from typing import BinaryIO, Iterable, Iterator, Union

import av
import numpy as np
import soundfile as sf
import soxr

from shoal.errors import BadRequest, EngineFailure, NotFound
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
# What libsndfile reports as the length of a FLAC whose STREAMINFO has no total (SF_COUNT_MAX).
UNKNOWN_FRAMES = 2**63 - 1
# PyAV raises FFmpegError subclasses (some also ValueError or OSError) for data FFmpeg cannot read.
AV_ERRORS = (av.error.FFmpegError, *DECODE_ERRORS)
# The containers FFmpeg may open for an upload. Letting it probe every demuxer would let a crafted upload
# pick one that opens other files on the server (an ffconcat script names files beside the working directory).
UPLOAD_DEMUXERS = "mov,mp3,ogg,matroska,aac,wav,flac,aiff,caf,w64,asf,amr,wv"


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
    audio, sample_rate = decode(file, name, max_seconds)
    if len(audio) == 0:
        raise BadRequest(f"{name} has no samples")
    if not np.isfinite(audio).all():
        raise BadRequest(f"{name} contains NaN or infinite samples")
    return audio, sample_rate


def decode(file: io.BytesIO | str, name: str, max_seconds: float | None) -> tuple[np.ndarray, int]:
    """libsndfile first, FFmpeg for what libsndfile cannot open (m4a, ADTS AAC, WebM, ...). Data libsndfile
    does open stays with libsndfile, errors and all, so wav/flac/ogg behave as they always did, except a FLAC
    without a total length (a streamed one, ours included), which libsndfile opens but cannot read."""
    try:
        sound = sf.SoundFile(file)
    except DECODE_ERRORS as exc:
        return read_with_pyav(file, name, max_seconds, decode_reason(exc))
    if sound.frames == UNKNOWN_FRAMES:
        sound.close()
        return read_with_pyav(file, name, max_seconds, "unknown length")
    return read_with_soundfile(sound, name, max_seconds)


def frame_limit(max_seconds: float | None, sample_rate: int) -> int | None:
    return None if max_seconds is None else math.ceil(max_seconds * sample_rate)


def too_long(name: str, max_seconds: float | None) -> BadRequest:
    return BadRequest(f"{name} is longer than {max_seconds:g} seconds")


def read_with_soundfile(sound: sf.SoundFile, name: str, max_seconds: float | None) -> tuple[np.ndarray, int]:
    try:
        with sound:
            sample_rate, channels = sound.samplerate, sound.channels
            check_format(name, sample_rate, channels)
            limit = frame_limit(max_seconds, sample_rate)
            # Reading at most limit + 1 frames bounds memory even when the header under-states the length.
            audio = sound.read(frames=-1 if limit is None else limit + 1, dtype="float32", always_2d=True)
    except DECODE_ERRORS as exc:
        raise BadRequest(f"could not decode {name}: {decode_reason(exc)}") from exc
    if limit is not None and len(audio) > limit:
        raise too_long(name, max_seconds)
    return audio, sample_rate


def read_with_pyav(file: io.BytesIO | str, name: str, max_seconds: float | None,
                   soundfile_reason: str) -> tuple[np.ndarray, int]:
    """Decode the first audio stream with FFmpeg. Data FFmpeg does not recognise either keeps libsndfile's
    reason ("Format not recognised."), so garbage reads the same as before this fallback existed."""
    with readable(file, name) as f:
        try:
            container = av.open(f, "r", container_options={"format_whitelist": UPLOAD_DEMUXERS})
        except AV_ERRORS as exc:
            raise BadRequest(f"could not decode {name}: {soundfile_reason}") from exc
        with container:
            try:
                return decode_first_audio_stream(container, name, max_seconds)
            except AV_ERRORS as exc:
                raise BadRequest(f"could not decode {name}: {av_reason(exc)}") from exc


@contextlib.contextmanager
def readable(file: io.BytesIO | str, name: str) -> Iterator[BinaryIO]:
    """A file object for FFmpeg: a path is opened here so FFmpeg never reads it as a URL or protocol."""
    if isinstance(file, str):
        try:
            f = open(file, "rb")
        except OSError as exc:
            raise BadRequest(f"could not read {name}: {exc.strerror or exc}") from exc
        with f:
            yield f
    else:
        file.seek(0)  # soundfile's failed attempt moved it
        yield file


def decode_first_audio_stream(container, name: str, max_seconds: float | None) -> tuple[np.ndarray, int]:
    if not container.streams.audio:
        raise BadRequest(f"{name} has no audio stream")
    stream = container.streams.audio[0]
    parts: list[np.ndarray] = []
    shape = None  # (sample rate, channels) of the first frame; the header's can differ (HE-AAC's SBR).
    limit = None
    total = 0
    for frame in container.decode(stream):
        frame_shape = (frame.sample_rate, len(frame.layout.channels))
        if shape is None:
            check_format(name, *frame_shape)
            shape, limit = frame_shape, frame_limit(max_seconds, frame.sample_rate)
        elif frame_shape != shape:
            raise BadRequest(f"{name} changes sample rate or channel count part-way through")
        parts.append(frame_samples(frame))
        total += len(parts[-1])
        if limit is not None and total > limit:  # stop at once: memory stays bounded by the limit
            raise too_long(name, max_seconds)
    if shape is None:
        raise BadRequest(f"{name} has no samples")
    return np.concatenate(parts), shape[0]


def frame_samples(frame: av.AudioFrame) -> np.ndarray:
    """float32 `[samples, channels]` from any FFmpeg sample format; integers scale by 2^(bits-1) as
    libsndfile does, unsigned 8-bit is centred on 128."""
    data = frame.to_ndarray()
    channels = len(frame.layout.channels)
    data = data.T if frame.format.is_planar else data.reshape(-1, channels)
    if data.dtype == np.uint8:
        return (data.astype(np.float32) - np.float32(128)) / np.float32(128)
    if data.dtype.kind == "i":
        return data.astype(np.float32) / np.float32(2 ** (8 * data.dtype.itemsize - 1))
    return data.astype(np.float32)


def av_reason(exc: Exception) -> str:
    """FFmpeg's own words ("Invalid data found when processing input"), without PyAV's errno and file name."""
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


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


# --- encoding -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Encoding:
    """How one response format is made. `sample_format` is what the encoder is fed: "s16" for the PCM16
    formats (quantised here, so the result is exact and the same everywhere), the encoder's own float
    format for the lossy ones (no quantisation before a lossy encoder). Bitrates are FFmpeg's defaults
    (mono, 44.1 kHz: lame ~64 kb/s, aac ~69 kb/s, opus 64 kb/s); lame and opus scale theirs with the rate."""

    muxer: str
    encoder: str
    sample_format: str
    media_type: str
    muxer_options: dict = field(default_factory=dict)


ENCODINGS = MappingProxyType({
    # RIFF/WAVE, PCM16. Streamed: RIFF and data sizes are 0xFFFFFFFF ("unknown length"), which FFmpeg,
    # libsndfile and browsers read to the end of the stream. A whole file gets the real sizes.
    "wav": Encoding("wav", "pcm_s16le", "s16", "audio/wav"),
    # Raw signed 16-bit little-endian mono at the engine's sample rate, no header, as OpenAI's pcm is.
    "pcm": Encoding("s16le", "pcm_s16le", "s16", "audio/pcm"),
    # MPEG-1/2 layer III frames after a small ID3v2 tag. A whole file also gets the Xing/LAME frame, so
    # decoders trim the encoder's priming; a stream cannot (it is written once the length is known).
    "mp3": Encoding("mp3", "libmp3lame", "fltp", "audio/mpeg"),
    # Opus in Ogg, as OpenAI returns it. Ogg pages close every 40 ms (two Opus packets) rather than FFmpeg's
    # 1 s: ~6% more bytes, and the audio held back after a push drops from ~1.5 s to ~80 ms (the muxer keeps
    # the newest page until the next one starts).
    "opus": Encoding("ogg", "libopus", "flt", "audio/ogg", {"page_duration": "40000"}),
    # AAC-LC in ADTS frames: self-delimiting, so any concatenation of pushes plays.
    "aac": Encoding("adts", "aac", "fltp", "audio/aac"),
    # FLAC, PCM16. Streamed: STREAMINFO says "total samples unknown" (FFmpeg reads it; libsndfile does
    # not). A whole file gets the real total and the MD5. No 8 KiB PADDING block: nobody edits tags here.
    "flac": Encoding("flac", "flac", "s16", "audio/flac", {"metadata_header_padding": "0"}),
})
FORMATS = tuple(ENCODINGS)
MEDIA_TYPES = MappingProxyType({fmt: encoding.media_type for fmt, encoding in ENCODINGS.items()})
# Deterministic bytes (no "Lavf"/"Lavc" version strings, no random Ogg serial): the same audio always encodes
# the same, and nothing advertises the FFmpeg build. flush_packets hands every packet to the drain at once.
MUXER_OPTIONS = {"fflags": "+bitexact", "flush_packets": "1"}
ENCODER_OPTIONS = {"flags": "+bitexact"}
# The output rates a client may ask for where the encoder takes any (wav, pcm, flac): telephone to studio.
MIN_OUTPUT_RATE = 8_000
MAX_OUTPUT_RATE = 192_000
# Lossy encoders take a fixed set of rates (opus: 8/12/16/24/48 kHz only); other rates are resampled here,
# with soxr, to the one rate all three take.
FALLBACK_RATE = 48_000


def encoding_for(fmt: str) -> Encoding:
    try:
        return ENCODINGS[fmt]
    except (KeyError, TypeError):
        raise BadRequest(f"unknown audio format {fmt!r}; use one of: {', '.join(FORMATS)}") from None


def check_output_rate(fmt: str, rate: object) -> int:
    """A client's output sample rate, if `fmt`'s encoder takes it; else BadRequest listing what it takes."""
    encoder = encoding_for(fmt).encoder
    rates = av.Codec(encoder, "w").audio_rates
    ok = isinstance(rate, (int, np.integer)) and not isinstance(rate, bool)
    if ok and rates:
        ok = rate in rates
    elif ok:
        ok = MIN_OUTPUT_RATE <= rate <= MAX_OUTPUT_RATE
    if not ok:
        allowed = (", ".join(str(r) for r in sorted(rates)) if rates
                   else f"any integer from {MIN_OUTPUT_RATE} to {MAX_OUTPUT_RATE}")
        raise BadRequest(f"sample_rate {rate!r} is not one {fmt} can be encoded at; use {allowed}")
    return int(rate)


def encoder_rate(encoder: str, sample_rate: int) -> int:
    """The rate to encode at: the input's when the encoder takes it (PCM and FLAC take any)."""
    rates = av.Codec(encoder, "w").audio_rates
    return sample_rate if not rates or sample_rate in rates else FALLBACK_RATE


def engine_rate(sample_rate: int) -> int:
    """The rate audio comes at: an engine's, so a bad one is a bug here, not a bad request."""
    if not isinstance(sample_rate, (int, np.integer)) or not MIN_SAMPLE_RATE <= sample_rate <= MAX_SAMPLE_RATE:
        raise ValueError(f"sample_rate must be an integer in {MIN_SAMPLE_RATE}..{MAX_SAMPLE_RATE}, got {sample_rate!r}")
    return int(sample_rate)


def to_int16(audio: np.ndarray) -> np.ndarray:
    """PCM16 as FFmpeg quantises and load_audio inverts (int16 / 32768): x * 32768, rounded, clipped."""
    return np.clip(np.rint(audio * np.float32(32768)), -32768, 32767).astype(np.int16)


class Pipe:
    """A write-only file for the muxer. With no seek or tell FFmpeg writes a stream that never goes back,
    so every byte written can leave at once."""

    def __init__(self):
        self.parts: list[bytes] = []

    def write(self, data) -> int:
        self.parts.append(bytes(data))
        return len(self.parts[-1])

    def take(self, final: bool = False) -> bytes:
        data = b"".join(self.parts)
        self.parts.clear()
        return data


class WholeFile(io.BytesIO):
    """A seekable buffer: the muxer goes back at the end to write real lengths (WAV sizes, FLAC STREAMINFO,
    mp3's Xing/LAME frame), so nothing leaves before the end."""

    def take(self, final: bool = False) -> bytes:
        return self.getvalue() if final else b""


class StreamEncoder:
    """Encode mono float32 audio pushed in chunks of any size into `fmt` ("wav", "pcm", "mp3", "opus",
    "aac", "flac"); the bytes of all pushes and `finish()`, concatenated, are one valid file.

    The header is written at construction and comes back with the first push, so a client sees a playable
    start at once. The audio decodable from what the pushes returned so far lags the audio pushed by (measured
    with 50 ms pushes, mean / worst, at 44.1 and 22.05 kHz):
      wav, pcm  nothing;
      flac      up to one block (4608 samples at 44.1 kHz, 2304 at 22.05 kHz): ~55 / ~120 ms;
      mp3       lame's 1152-sample frame (576 below 32 kHz) and its lookahead: ~120 / ~175 ms;
      aac       one 1024-sample frame and the encoder's lookahead: ~35-70 / ~125 ms;
      opus      the 20 ms frame, 6.5 ms lookahead, soxr's filter when resampling, and the Ogg page the
                muxer holds back: ~80-90 / ~135 ms.
    Decoders play the lossy encoders' priming and padding as extra silence: a streamed mp3 is ~30-55 ms longer,
    aac ~40-65 ms (ADTS cannot say how much to trim, so whole aac files too). A whole mp3 file's LAME tag
    and Ogg Opus's pre-skip and end granule tell decoders what to trim: those decode to the exact length.

    `whole_file=True` (what `encode_audio` uses) keeps every byte until `finish()` so the muxer can write
    real lengths at the end. Errors from FFmpeg become EngineFailure. Not thread-safe: one writer at a time.
    """

    def __init__(self, fmt: str, sample_rate: int, *, whole_file: bool = False, out_rate: int | None = None,
                 bitrate: int | None = None):
        self.fmt = fmt
        self.encoding = encoding_for(fmt)
        self.media_type = self.encoding.media_type
        self.sample_rate = engine_rate(sample_rate)
        if out_rate is None:
            self.encoded_rate = encoder_rate(self.encoding.encoder, self.sample_rate)
        else:
            self.encoded_rate = check_output_rate(fmt, out_rate)
        self.resampler = None
        if self.encoded_rate != self.sample_rate:
            self.resampler = soxr.ResampleStream(self.sample_rate, self.encoded_rate, 1, dtype="float32",
                                                 quality="VHQ")
        self.sink = WholeFile() if whole_file else Pipe()
        self.samples = 0  # encoded so far, at encoded_rate: the next frame's pts
        self.finished = False
        with self.ffmpeg_errors():
            self.container = av.open(self.sink, "w", format=self.encoding.muxer,
                                     container_options={**MUXER_OPTIONS, **self.encoding.muxer_options})
            self.stream = self.container.add_stream(self.encoding.encoder, rate=self.encoded_rate, layout="mono",
                                                    format=self.encoding.sample_format, options=ENCODER_OPTIONS)
            if bitrate is not None:
                self.stream.bit_rate = bitrate
            self.container.start_encoding()

    def push(self, chunk: np.ndarray) -> bytes:
        """Encode `chunk` (1-D float, clipped to [-1, 1]); the bytes ready so far, maybe b"" while the encoder
        fills a frame."""
        if self.finished:
            raise RuntimeError("push() after finish()")
        audio = np.asarray(chunk, dtype=np.float32)
        if audio.ndim != 1:
            raise ValueError(f"audio must be 1-D mono, got shape {audio.shape}")
        if self.resampler is not None:
            audio = self.resampler.resample_chunk(audio)
        with self.ffmpeg_errors():
            self.encode(audio)
        return self.sink.take()

    def finish(self) -> bytes:
        """Flush the resampler and the encoder and write the trailer; the last bytes (the whole file when
        `whole_file`). Calling it again returns b""."""
        if self.finished:
            return b""
        self.finished = True
        with self.ffmpeg_errors():
            if self.resampler is not None:
                self.encode(self.resampler.resample_chunk(np.zeros(0, np.float32), last=True))
            self.mux(self.stream.encode(None))
            self.container.close()
        return self.sink.take(final=True)

    def close(self) -> None:
        """Drop an unfinished stream (the client went away) without waiting for the garbage collector."""
        if not self.finished:
            self.finished = True
            self.container.close()

    def encode(self, audio: np.ndarray) -> None:
        if not len(audio):
            return  # FFmpeg rejects empty frames
        # A NaN from a broken model must become silence, not a full-scale click or an encoder error.
        audio = np.clip(np.nan_to_num(audio, nan=0.0), -1.0, 1.0)
        data = to_int16(audio) if self.encoding.sample_format == "s16" else audio
        frame = av.AudioFrame.from_ndarray(data[np.newaxis, :], format=self.encoding.sample_format, layout="mono")
        frame.sample_rate = self.encoded_rate
        frame.time_base = Fraction(1, self.encoded_rate)
        frame.pts = self.samples
        self.samples += len(audio)
        self.mux(self.stream.encode(frame))

    def mux(self, packets: Iterable[av.Packet]) -> None:
        for packet in packets:
            self.container.mux(packet)

    @contextlib.contextmanager
    def ffmpeg_errors(self) -> Iterator[None]:
        try:
            yield
        except av.error.FFmpegError as exc:
            raise EngineFailure(f"could not encode {self.fmt}: {av_reason(exc)}") from exc


def encode_audio(audio: np.ndarray, sample_rate: int, fmt: str) -> bytes:
    """One whole file of `fmt` (see StreamEncoder) from mono float32 audio, clipped to [-1, 1]."""
    return encode_output(audio, sample_rate, OutputOptions(fmt))


# --- output options: what a Fish Audio request asks of the audio it gets back ---------------------------------

# Loudness normalisation: the level speech is brought to (RMS over the blocks that are not silence, in dBFS,
# about what broadcast speech measures), the block those are measured in, the level below which a block is
# silence, and the most gain it may add or take away.
LOUDNESS_TARGET_DBFS = -20.0
LOUDNESS_BLOCK_SECONDS = 0.02
LOUDNESS_GATE_DBFS = -50.0
LOUDNESS_MAX_GAIN_DB = 20.0


@dataclass(frozen=True)
class OutputOptions:
    """How a request wants its audio: the format, the sample rate (None: the engine's), the bitrate in bits per
    second (None: the encoder's default), a volume change in dB, and whether to normalise loudness."""

    format: str
    sample_rate: int | None = None
    bitrate: int | None = None
    volume_db: float = 0.0
    normalize_loudness: bool = False

    @property
    def media_type(self) -> str:
        return MEDIA_TYPES[self.format]


class Loudness:
    """Loudness normalisation that can run on a stream: the gain brings the RMS of the speech heard so far
    (blocks above the gate) to the target, and moves to each new value in a linear ramp across the chunk, so it
    never jumps. A whole file is one chunk: its gain is the exact integrated one."""

    def __init__(self, sample_rate: int):
        self.block = max(1, round(sample_rate * LOUDNESS_BLOCK_SECONDS))
        self.energy = 0.0  # sum of squares of the gated blocks so far
        self.samples = 0
        self.gain: float | None = None

    def __call__(self, audio: np.ndarray) -> np.ndarray:
        blocks = audio[: len(audio) // self.block * self.block].reshape(-1, self.block).astype(np.float64)
        if len(blocks):
            power = (blocks**2).mean(axis=1)
            loud = power > 10 ** (LOUDNESS_GATE_DBFS / 10)
            self.energy += float(power[loud].sum()) * self.block
            self.samples += int(loud.sum()) * self.block
        if not self.samples:
            return audio
        rms_db = 10 * math.log10(self.energy / self.samples)
        gain_db = min(max(LOUDNESS_TARGET_DBFS - rms_db, -LOUDNESS_MAX_GAIN_DB), LOUDNESS_MAX_GAIN_DB)
        target = 10 ** (gain_db / 20)
        start = target if self.gain is None else self.gain
        self.gain = target
        ramp = np.linspace(start, target, num=len(audio), dtype=np.float32) if start != target else target
        return (audio * ramp).astype(np.float32)


class OutputEncoder:
    """A StreamEncoder for `OutputOptions`: loudness, then volume, then the resampling and encoding it asks for."""

    def __init__(self, options: OutputOptions, sample_rate: int, *, whole_file: bool = False):
        self.options = options
        self.gain = 10 ** (options.volume_db / 20) if options.volume_db else None
        self.loudness = Loudness(sample_rate) if options.normalize_loudness else None
        self.encoder = StreamEncoder(options.format, sample_rate, whole_file=whole_file,
                                     out_rate=options.sample_rate, bitrate=options.bitrate)
        self.media_type = self.encoder.media_type

    def shape(self, audio: np.ndarray) -> np.ndarray:
        audio = np.asarray(audio, dtype=np.float32)
        if self.loudness is not None:
            audio = self.loudness(audio)
        if self.gain is not None:
            audio = audio * np.float32(self.gain)
        return audio

    def push(self, chunk: np.ndarray) -> bytes:
        return self.encoder.push(self.shape(chunk))

    def finish(self) -> bytes:
        return self.encoder.finish()

    def close(self) -> None:
        self.encoder.close()


def encode_output(audio: np.ndarray, sample_rate: int, options: OutputOptions) -> bytes:
    """One whole file as `options` ask (see OutputEncoder)."""
    encoder = OutputEncoder(options, sample_rate, whole_file=True)
    return encoder.push(audio) + encoder.finish()


# --- speed --------------------------------------------------------------------------------------------------

# atempo takes 0.5..100 per instance; below 0.5 instances are chained, and 0.25 (OpenAI's slowest, four times
# the length) is as far as that goes here.
MIN_SPEED = 0.25
MAX_SPEED = 100.0
# atempo loses up to about one window (sample_rate / 24, ~42 ms) at the end of its input, which at 0.25 and
# short segments is a quarter of the audio. Silence appended is lost instead, and the result is cut to length.
TEMPO_TAIL_SECONDS = 0.1


def change_speed(audio: np.ndarray, sample_rate: int, speed: float) -> np.ndarray:
    """Tempo change without pitch change, with FFmpeg's atempo (WSOLA). The result is exactly
    round(len(audio) / speed) samples long, so segment timings stay predictable; speed 1.0 returns `audio`
    itself."""
    if speed == 1.0:
        return audio
    if not MIN_SPEED <= speed <= MAX_SPEED:  # also NaN
        raise BadRequest(f"speed must be between {MIN_SPEED:g} and {MAX_SPEED:g}, got {speed}")
    audio = np.ascontiguousarray(audio, dtype=np.float32)
    if not len(audio):
        return audio
    tail = np.zeros(math.ceil(TEMPO_TAIL_SECONDS * sample_rate), np.float32)
    try:
        out = run_atempo(np.concatenate([audio, tail]), sample_rate, atempo_factors(speed))
    except av.error.FFmpegError as exc:
        raise EngineFailure(f"could not change speed: {av_reason(exc)}") from exc
    length = round(len(audio) / speed)
    return out[:length] if len(out) >= length else np.pad(out, (0, length - len(out)))


def atempo_factors(speed: float) -> list[float]:
    """0.3 -> [0.5, 0.6]: halvings while below atempo's 0.5 floor, then the remainder."""
    factors = []
    while speed < 0.5:
        factors.append(0.5)
        speed /= 0.5
    return factors + [speed]


def run_atempo(audio: np.ndarray, sample_rate: int, factors: list[float]) -> np.ndarray:
    graph = av.filter.Graph()
    time_base = Fraction(1, sample_rate)
    nodes = [graph.add_abuffer(format="flt", sample_rate=sample_rate, layout="mono", time_base=time_base)]
    nodes += [graph.add("atempo", f"tempo={factor!r}") for factor in factors]
    nodes.append(graph.add("abuffersink"))
    graph.link_nodes(*nodes).configure()
    frame = av.AudioFrame.from_ndarray(audio[np.newaxis, :], format="flt", layout="mono")
    frame.sample_rate, frame.time_base, frame.pts = sample_rate, time_base, 0
    graph.push(frame)
    graph.push(None)  # end of input: atempo flushes what it holds
    parts = []
    while True:
        try:
            parts.append(frame_samples(graph.pull())[:, 0])
        except (av.error.BlockingIOError, av.error.EOFError):
            break
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)


# --- files --------------------------------------------------------------------------------------------------

# Output files by extension: the encode_audio format each is written in. Ogg Vorbis is no response format and
# this PyAV has no Vorbis encoder, so soundfile writes .ogg, as it always has.
FILE_FORMATS = MappingProxyType({".wav": "wav", ".flac": "flac", ".mp3": "mp3", ".opus": "opus",
                                 ".aac": "aac", ".pcm": "pcm", ".ogg": "vorbis"})


def output_format(path: str | os.PathLike) -> str:
    """The format an output file name asks for, or BadRequest naming the extensions that work."""
    target = os.fspath(path)
    ext = os.path.splitext(target)[1].lower()
    if ext not in FILE_FORMATS:
        raise BadRequest(f"cannot write {target}: use one of {', '.join(FILE_FORMATS)}")
    return FILE_FORMATS[ext]


def write_audio(path: str | os.PathLike, audio: np.ndarray, sample_rate: int) -> None:
    """Write float32 audio to `path`, its format chosen by extension (see FILE_FORMATS), atomically. Encoding
    happens first, so a failure leaves no file behind."""
    fmt = output_format(path)
    data = encode_vorbis(audio, sample_rate) if fmt == "vorbis" else encode_audio(audio, sample_rate, fmt)
    with atomic_write(path) as f:
        f.write(data)


def encode_vorbis(audio: np.ndarray, sample_rate: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, np.clip(audio, -1.0, 1.0), sample_rate, format="OGG", subtype="VORBIS")
    return buf.getvalue()
