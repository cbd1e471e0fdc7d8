"""Hostile audio, built in memory: headers that lie, odd shapes, non-audio, and files that expand enormously."""

from __future__ import annotations

import functools
import gzip
import io
import struct
import zipfile

import numpy as np
import soundfile as sf

from support import tone, tone_clip

#: The suite's tone: 220 Hz, and 16 kHz by default, so a 2 s voice clip (~64 KB) fits the key server's upload limit.
FREQ, RATE = 220.0, 16000


def wav_header(*, channels: int = 1, rate: int = 44100, bits: int = 16, data_bytes: int, fmt_tag: int = 1,
               riff_size: int | None = None) -> bytes:
    """A canonical 44-byte RIFF/WAVE header, saying whatever it is told to."""
    block = channels * bits // 8
    fmt = struct.pack("<HHIIHH", fmt_tag, channels, rate & 0xFFFFFFFF, (rate * block) & 0xFFFFFFFF, block, bits)
    riff = riff_size if riff_size is not None else 36 + data_bytes
    return (b"RIFF" + struct.pack("<I", riff & 0xFFFFFFFF) + b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt
            + b"data" + struct.pack("<I", data_bytes & 0xFFFFFFFF))


def good_wav(seconds: float = 2.0, rate: int = RATE, channels: int = 1) -> bytes:
    """A valid voice clip: a tone, as a 16-bit WAV."""
    return tone_clip(seconds, rate, freq=FREQ, channels=channels)


def silent_flac(seconds: float, rate: int = 8000, *, unknown_length: bool = False) -> bytes:
    """Silence compresses to almost nothing in FLAC: an hour is ~90 KiB. `unknown_length` zeroes
    STREAMINFO's total-samples field, as a streamed FLAC has it, so no header says how long it is."""
    buf = io.BytesIO()
    with sf.SoundFile(buf, "w", samplerate=rate, channels=1, format="FLAC", subtype="PCM_16") as f:
        minute = np.zeros(rate * 60, np.int16)
        for _ in range(int(seconds // 60)):
            f.write(minute)
    data = bytearray(buf.getvalue())
    if unknown_length:
        # fLaC, a 4-byte block header, then STREAMINFO: the 36-bit total is the low bits of bytes 21..25.
        data[21] &= 0xF0
        data[22:26] = b"\0\0\0\0"
    return bytes(data)


def silence_wav_bytes(megabytes: int) -> bytes:
    return wav_header(data_bytes=megabytes << 20) + bytes(megabytes << 20)


def gzip_bomb(megabytes: int) -> bytes:
    """A gzip of `megabytes` MiB of silent WAV: a decompression bomb to anything that inflates it."""
    return gzip.compress(silence_wav_bytes(megabytes), compresslevel=9)


def zip_bomb(megabytes: int) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("hours.wav", silence_wav_bytes(megabytes))
    return buf.getvalue()


@functools.lru_cache(maxsize=1)
def hostile_clips() -> dict[str, tuple[bytes, bool]]:
    """name -> (upload bytes, whether a server may accept it as a voice). Most must be refused; the few
    that are odd but real audio (8 channels, 384 kHz, a mismatched transcript) may become valid voices."""
    ok = good_wav()
    pcm = (tone(2.0, RATE, FREQ) * 32767).astype("<i2").tobytes()
    half_second = pcm[:16000]
    refuse = {
        "zero-length": b"",
        "one-byte": b"R",
        "riff-only": b"RIFF",
        "header-only": wav_header(data_bytes=0),
        "truncated-header": ok[:30],
        "truncated-data": ok[:44 + 8000],  # the header promises 2 s, 0.25 s follow
        "0-channel": wav_header(channels=0, data_bytes=len(pcm)) + pcm,
        "100-channel": wav_header(channels=100, data_bytes=len(pcm)) + pcm,
        "65535-channel": wav_header(channels=65535, bits=8, data_bytes=len(pcm)) + pcm,
        "0-hz": wav_header(rate=0, data_bytes=len(pcm)) + pcm,
        "1-hz": wav_header(rate=1, data_bytes=len(pcm)) + pcm,
        "999-hz": wav_header(rate=999, data_bytes=len(pcm)) + pcm,
        "384-khz-too-short": wav_header(rate=384000, data_bytes=len(pcm)) + pcm,
        "768-khz": wav_header(rate=768000, data_bytes=len(pcm)) + pcm,
        "4-ghz": wav_header(rate=0xFFFFFFFF, data_bytes=len(pcm)) + pcm,
        "hours-claimed-by-header": wav_header(data_bytes=0xFFFFFFF0) + half_second,
        "riff-size-lies": wav_header(data_bytes=len(half_second), riff_size=4) + half_second,
        "bits-0": wav_header(bits=0, data_bytes=len(pcm)) + pcm,
        "bits-64-int": wav_header(bits=64, data_bytes=len(pcm)) + pcm,
        "format-tag-unknown": wav_header(fmt_tag=0x1234, data_bytes=len(pcm)) + pcm,
        "float-nan": wav_header(fmt_tag=3, bits=32, data_bytes=4 * 32000) + np.full(32000, np.nan, "<f4").tobytes(),
        "float-inf": wav_header(fmt_tag=3, bits=32, data_bytes=4 * 32000) + np.full(32000, np.inf, "<f4").tobytes(),
        "text-renamed-wav": b"this is a text file renamed .wav\n" * 40,
        "html": b"<!doctype html><html><body>" + b"<p>not audio</p>" * 50 + b"</body></html>",
        "json": b'{"audio": "not really"}',
        "pcm-without-header": pcm,
        "flac-magic-only": b"fLaC" + bytes(100),
        "ogg-magic-only": b"OggS" + bytes(100),
        "id3-tag-only": b"ID3\x04\x00\x00\x00\x00\x00\x00" + bytes(200),
        "ffconcat-script": b"ffconcat version 1.0\nfile /etc/passwd\n",
        "hls-playlist": b"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\nfile:///etc/passwd\n",
        "silent-flac-1-hour": silent_flac(3600),
        "silent-flac-hours-unknown-length": silent_flac(2 * 3600, unknown_length=True),
        "gzip-bomb-wav": gzip_bomb(64),
        "zip-bomb-wav": zip_bomb(64),
        "too-short": good_wav(0.2),
        "too-long": good_wav(30.0, rate=8000),
        "8-channel-too-short": good_wav(0.2, channels=8),
    }
    accept = {
        "8-channel": good_wav(2.0, channels=8),
        "384-khz": good_wav(1.5, rate=384000),
        "1-khz": good_wav(2.0, rate=1000),
        "stereo-flac": tone_clip(2.0, 22050, freq=FREQ, channels=2, format="FLAC"),
        "ogg-vorbis": tone_clip(2.0, 22050, freq=FREQ, format="OGG", subtype="VORBIS"),
    }
    return {**{k: (v, False) for k, v in refuse.items()}, **{k: (v, True) for k, v in accept.items()}}
