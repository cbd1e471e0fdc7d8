"""The saved-voice library on disk: a reference clip and its transcript stored once under an id, with the
clip's codec codes computed at upload and cached, so requests that name a voice never run the codec encoder.

Layout, one folder per voice:

    root/voices/<id>/original.<ext>   the upload as sent (ext from its content, never from a user's file name)
                     clip.wav         the upload as mono PCM16 at the codec's rate: what gets encoded
                     transcript.txt   the transcript, for people (meta.json holds the copy the code reads)
                     codes.npy        int64 [10, F] codec codes of clip.wav
                     meta.json        the Voice record; a folder without a valid one is not a voice
    root/.staging/                    voices being built, replaced or deleted; dead processes' leftovers are
                                      removed when a library opens

A voice folder is built whole in `.staging/` and renamed into place, and deletes rename it out before
removing it, so a crash at any point leaves either no voice or a whole one. Nothing here builds a path from an
id before `check_voice_id` has accepted it.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import re
import shutil
import threading
import uuid
from collections import OrderedDict
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Protocol

import numpy as np
import psutil
import soundfile as sf

from shoal.audio import DECODE_ERRORS, load_audio
from shoal.errors import BadRequest, Conflict, EngineFailure, NotFound, PayloadTooLarge, ShoalError
from shoal.files import atomic_write

VOICE_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
ID_RULE = "voice ids are 1 to 64 characters from A-Z, a-z, 0-9, '_' and '-'"

# The S1 codec's shape: codes are independent of the encoder object, so stored ones can be checked without it.
NUM_CODEBOOKS = 10
FRAME_LENGTH = 2048
DEFAULT_SAMPLE_RATE = 44100
# A 60 s clip is about 150 spoken words; twice that leaves room for fast talkers and long words.
MAX_TEXT_CHARS = 2000
CODES_CACHE_SIZE = 64
META_VERSION = 1

CLIP, TRANSCRIPT, CODES, META = "clip.wav", "transcript.txt", "codes.npy", "meta.json"
ORIGINAL_STEM = "original"


class VoiceEncoder(Protocol):
    """What the library needs from an engine to make codes (FishEngine satisfies it)."""

    sample_rate: int
    codec_checksum: str

    def encode_audio(self, audio: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class Voice:
    """A saved voice as meta.json records it. Sample rates in Hz, duration in seconds of the stored clip."""

    id: str
    text: str
    created: str
    duration: float
    sample_rate: int
    original_sample_rate: int
    original_channels: int
    original_format: str
    audio_sha256: str
    text_sha256: str
    codes_sha256: str | None = None
    codec_checksum: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


# meta.json is read back field by field against these, so a hand-edited or damaged file is refused whole.
META_TYPES: dict[str, tuple[type, ...]] = {
    "id": (str,), "text": (str,), "created": (str,), "duration": (int, float), "sample_rate": (int,),
    "original_sample_rate": (int,), "original_channels": (int,), "original_format": (str,),
    "audio_sha256": (str,), "text_sha256": (str,), "codes_sha256": (str, type(None)),
    "codec_checksum": (str, type(None)),
}


def check_voice_id(voice_id: object) -> str:
    """The id itself when it is safe as one folder name, else BadRequest saying what ids may contain."""
    if isinstance(voice_id, str) and VOICE_ID_PATTERN.fullmatch(voice_id):
        return voice_id
    shown = repr(voice_id[:40] + "..." if isinstance(voice_id, str) and len(voice_id) > 40 else voice_id)
    raise BadRequest(f"invalid voice id {shown}: {ID_RULE}")


def voice_from_meta(meta: object) -> Voice:
    """A Voice from parsed meta.json; ValueError when a field is missing or of the wrong type."""
    if not isinstance(meta, dict):
        raise ValueError("meta.json is not an object")
    values = {}
    for name, types in META_TYPES.items():
        value = meta.get(name)
        if name not in meta or isinstance(value, bool) or not isinstance(value, types):
            raise ValueError(f"meta.json field {name!r} is missing or not {types}")
        values[name] = value
    if not values["text"].strip() or values["sample_rate"] <= 0:
        raise ValueError("meta.json has an empty transcript or no sample rate")
    return Voice(**values)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def frames_for(samples: int) -> int:
    """Code frames for a clip of `samples` samples: the codec pads the audio up to whole frames."""
    return math.ceil(samples / FRAME_LENGTH)


# -- probing uploads -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Probe:
    """What the upload's header says: a format name that doubles as the stored file's extension, its rate,
    channels and length. 0 / "unknown" where no prober could tell."""

    format: str = "unknown"
    sample_rate: int = 0
    channels: int = 0
    seconds: float | None = None


# libsndfile's format (and, for Ogg, codec) names to file extensions.
SF_EXTENSIONS = {"WAV": "wav", "WAVEX": "wav", "RF64": "wav", "W64": "w64", "FLAC": "flac", "OGG": "ogg",
                 "MP3": "mp3", "AIFF": "aiff", "AU": "au", "CAF": "caf"}
# FFmpeg's demuxer names (av's container.format.name is a comma-separated list of them) to extensions.
AV_EXTENSIONS = {"mp3": "mp3", "m4a": "m4a", "mp4": "m4a", "mov": "m4a", "aac": "aac", "webm": "webm",
                 "matroska": "mka", "ogg": "ogg", "wav": "wav", "flac": "flac", "aiff": "aiff"}
SAFE_EXTENSION = re.compile(r"[a-z0-9]{1,8}")


def probe_audio(data: bytes) -> Probe:
    """Header facts of an upload, by libsndfile, else by FFmpeg (m4a, aac, webm). Never raises: whether the
    upload is audio at all is load_audio's call."""
    try:
        info = sf.info(io.BytesIO(data))
    except DECODE_ERRORS:
        return probe_with_av(data)
    name = "opus" if info.subtype == "OPUS" else SF_EXTENSIONS.get(info.format, "unknown")
    seconds = info.frames / info.samplerate if info.samplerate > 0 else None
    return Probe(name, int(info.samplerate), int(info.channels), seconds)


def probe_with_av(data: bytes) -> Probe:
    try:
        import av

        with av.open(io.BytesIO(data)) as container:
            stream = next(s for s in container.streams if s.type == "audio")
            names = container.format.name.split(",")
            name = next((AV_EXTENSIONS[n] for n in names if n in AV_EXTENSIONS), "unknown")
            seconds = container.duration / av.time_base if container.duration else None
            layout = getattr(stream.codec_context, "layout", None)
            channels = getattr(layout, "nb_channels", 0) or getattr(stream.codec_context, "channels", 0) or 0
            return Probe(name, int(stream.codec_context.sample_rate or 0), int(channels), seconds)
    except Exception:  # av missing, or FFmpeg cannot read it either: load_audio will say why
        return Probe()


def extension_for(format_name: str) -> str:
    return format_name if SAFE_EXTENSION.fullmatch(format_name) and format_name != "unknown" else "bin"


# -- small file helpers ----------------------------------------------------------------------------------------
def write_durably(path: Path, data: bytes) -> None:
    """Create `path` with `data` and fsync it, so a renamed folder never holds files the disk has not seen."""
    with open(path, "xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable. Best effort: some platforms cannot open directories."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def pcm16_wav(audio: np.ndarray, sample_rate: int) -> tuple[bytes, np.ndarray]:
    """The clip as PCM16 wav bytes, and the float32 samples those bytes decode to: the codes are made from
    the stored clip exactly, so recomputing them from clip.wav later gives the same codes."""
    buf = io.BytesIO()
    sf.write(buf, np.clip(audio, -1.0, 1.0), sample_rate, format="WAV", subtype="PCM_16")
    wav = buf.getvalue()
    samples, _ = sf.read(io.BytesIO(wav), dtype="float32")
    return wav, np.ascontiguousarray(samples, dtype=np.float32)


def npy_bytes(codes: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, codes, allow_pickle=False)
    return buf.getvalue()


def meta_bytes(voice: Voice) -> bytes:
    return json.dumps({"version": META_VERSION, **voice.to_dict()}, indent=2, ensure_ascii=False).encode()


def checked_codes(codes: np.ndarray, samples: int) -> np.ndarray:
    """The encoder's output as int64 [10, F] for a clip of `samples` samples, or EngineFailure: codes of any
    other shape would be refused (and recomputed) on every later request."""
    codes = np.asarray(codes)
    expected = (NUM_CODEBOOKS, frames_for(samples))
    if codes.shape != expected or not np.issubdtype(codes.dtype, np.integer):
        raise EngineFailure(f"the codec returned codes of shape {codes.shape} ({codes.dtype}); "
                            f"expected integer {expected}")
    return np.ascontiguousarray(codes, dtype=np.int64)


def process_tag(pid: int) -> str | None:
    """`<pid>-<start time in centiseconds>`: names a process uniquely even where pids are reused, as in a
    container whose server is pid 1 after every restart. None if there is no such process."""
    try:
        return f"{pid}-{round(psutil.Process(pid).create_time() * 100)}"
    except (psutil.Error, OSError):
        return None


def staging_owner_alive(name: str) -> bool:
    """Whether the process that made a staging entry (`<kind>-<pid>-<start>-<hex>`) still runs: another
    library opening the same root (a CLI beside the server, a second object in this process) must not sweep
    away a voice being built. Entries of dead processes, or named otherwise, are leftovers."""
    parts = name.split("-")
    if len(parts) != 4 or not parts[1].isdigit():
        return False
    return process_tag(int(parts[1])) == f"{parts[1]}-{parts[2]}"


class VoiceLibrary:
    """Saved voices under `root`. Thread-safe within a process through one lock; safe against crashes at any
    point through whole-folder renames. Two processes may share a root, but only renames order them."""

    def __init__(self, root: Path, *, max_upload_bytes: int = 20 * 2**20, min_seconds: float = 1.0,
                 max_seconds: float = 60.0, max_text_chars: int = MAX_TEXT_CHARS):
        if not 0 <= min_seconds <= max_seconds:
            raise ValueError(f"need 0 <= min_seconds <= max_seconds, got {min_seconds} and {max_seconds}")
        self.root = Path(root)
        self.max_upload_bytes = max_upload_bytes
        self.min_seconds = min_seconds
        self.max_seconds = max_seconds
        self.max_text_chars = max_text_chars
        self._voices = self.root / "voices"
        self._staging = self.root / ".staging"
        self._voices.mkdir(parents=True, exist_ok=True)
        self._staging.mkdir(parents=True, exist_ok=True)
        self._voices_real = self._voices.resolve()
        self._lock = threading.Lock()
        self._owner = process_tag(os.getpid()) or f"{os.getpid()}-0"
        self._codes: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()
        #: Requests whose saved voice's codes were in memory (hits) or had to be read or recomputed (misses).
        self.codes_hits = 0
        self.codes_misses = 0
        self._clear_staging()

    # -- public API --------------------------------------------------------------------------------------------
    def add(self, voice_id: str, audio: bytes, text: str, encoder: VoiceEncoder | None = None, *,
            overwrite: bool = False) -> Voice:
        """Save a voice: validate, convert, encode once (when an encoder is given), then publish the folder in
        one rename. Raises BadRequest, PayloadTooLarge, or Conflict when the id is taken and not `overwrite`."""
        voice_id = check_voice_id(voice_id)
        target = self._folder(voice_id)
        data = self._check_upload(audio)
        text = self._check_text(text)
        if not overwrite:
            with self._lock:
                self._check_free(voice_id, target)  # fail before the expensive part; checked again at publish
        voice, files, codes = self._prepare(voice_id, data, text, encoder)
        staged = self._stage(files)
        try:
            self._publish(staged, voice_id, target, overwrite)
        finally:
            shutil.rmtree(staged, ignore_errors=True)  # gone already unless publishing failed
        if codes is not None:
            with self._lock:
                self._remember(voice_id, voice.codes_sha256, codes)
        return voice

    def get(self, voice_id: str) -> Voice:
        """The voice saved as `voice_id`, or NotFound."""
        voice_id = check_voice_id(voice_id)
        with self._lock:
            return self._require(voice_id)

    def list(self) -> list[Voice]:
        """Every valid voice, sorted by id. Folders without a valid meta.json are not voices and are skipped."""
        with self._lock:
            voices = []
            for entry in self._voices.iterdir():
                if VOICE_ID_PATTERN.fullmatch(entry.name) and entry.is_dir() and not entry.is_symlink():
                    voice = self._read_voice(entry)
                    if voice is not None:
                        voices.append(voice)
        return sorted(voices, key=lambda v: v.id)

    def delete(self, voice_id: str) -> None:
        """Remove a voice: renamed out of voices/ first, so a crash mid-delete never leaves half a voice."""
        voice_id = check_voice_id(voice_id)
        folder = self._folder(voice_id)
        with self._lock:
            self._require(voice_id)
            aside = self._staging_path("del")
            os.rename(folder, aside)
            fsync_dir(self._voices)
            self._forget(voice_id)
        shutil.rmtree(aside, ignore_errors=True)

    def rename(self, old_id: str, new_id: str) -> Voice:
        """Move a voice to a new id (Conflict if taken). The folder rename is the commit; meta.json follows,
        and if a crash comes between the two, reading trusts the folder name and fixes meta.json."""
        old_id, new_id = check_voice_id(old_id), check_voice_id(new_id)
        source, target = self._folder(old_id), self._folder(new_id)
        aside = None
        with self._lock:
            voice = self._require(old_id)
            if new_id == old_id:
                return voice
            self._check_free(new_id, target)
            aside = self._move_aside(target)
            try:
                os.rename(source, target)
            except OSError as exc:
                if os.path.lexists(target):  # another process took the id between the check and the rename
                    raise Conflict(f"voice {new_id!r} exists already") from exc
                raise
            fsync_dir(self._voices)
            voice = replace(voice, id=new_id)
            try:
                self._write_meta(target, voice)
            except ShoalError:
                pass  # the rename is done; reading trusts the folder name and retries this
            self._forget(old_id)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
        return voice

    def codes(self, voice_id: str, encoder: VoiceEncoder) -> np.ndarray:
        """The voice's codes, int64 [10, F], made with `encoder`'s codec: from memory, else codes.npy when it
        checks out, else recomputed from clip.wav and stored again (missing, damaged, or another codec's)."""
        voice_id = check_voice_id(voice_id)
        # One lock for the rare recompute too: it is a single encode, and it keeps a concurrent rename or
        # delete from racing the rewrite of codes.npy and meta.json.
        with self._lock:
            voice = self._require(voice_id)
            folder = self._folder(voice_id)
            usable = voice.codes_sha256 is not None and voice.codec_checksum == encoder.codec_checksum
            codes = self._recall(voice_id, voice.codes_sha256) if usable else None
            if codes is None:
                self.codes_misses += 1
            else:
                self.codes_hits += 1
            if codes is None and usable:
                codes = self._load_codes(folder, voice, encoder.sample_rate)
            if codes is None:
                codes, voice = self._recompute(folder, voice, encoder)
            self._remember(voice_id, voice.codes_sha256, codes)
            return codes.copy()

    def cache_counters(self) -> dict[str, int]:
        return {"voice_cache_hits": self.codes_hits, "voice_cache_misses": self.codes_misses}

    def clip_path(self, voice_id: str) -> Path:
        """The stored mono clip (PCM16 wav at the codec's rate), for playback."""
        voice_id = check_voice_id(voice_id)
        with self._lock:
            self._require(voice_id)
            return self._folder(voice_id) / CLIP

    def original(self, voice_id: str) -> tuple[bytes, str]:
        """The upload's bytes as sent, and a download name for them, `<id>.<ext>`."""
        voice_id = check_voice_id(voice_id)
        with self._lock:
            voice = self._require(voice_id)
            ext = extension_for(voice.original_format)
            try:
                data = (self._folder(voice_id) / f"{ORIGINAL_STEM}.{ext}").read_bytes()
            except OSError as exc:
                raise NotFound(f"the original upload of voice {voice_id!r} is missing") from exc
        return data, f"{voice_id}.{ext}"

    # -- validation --------------------------------------------------------------------------------------------
    def _check_upload(self, audio: bytes) -> bytes:
        if not isinstance(audio, (bytes, bytearray, memoryview)):
            raise BadRequest(f"voice audio must be bytes, got {type(audio).__name__}")
        if len(audio) > self.max_upload_bytes:
            raise PayloadTooLarge(f"voice clip is {len(audio)} bytes; the limit is {self.max_upload_bytes} bytes")
        return bytes(audio)

    def _check_text(self, text: str) -> str:
        if not isinstance(text, str) or not text.strip():
            raise BadRequest("the transcript of a voice clip must not be empty: it tells the model what the clip "
                             "says")
        text = text.strip()
        if len(text) > self.max_text_chars:
            raise BadRequest(f"transcript is {len(text)} characters; the limit is {self.max_text_chars}")
        return text

    def _duration_error(self, seconds: float) -> BadRequest:
        return BadRequest(f"voice clips must be {self.min_seconds:g} to {self.max_seconds:g} seconds long; "
                          f"this one is {seconds:.2f} seconds")

    def _prepare(self, voice_id: str, data: bytes, text: str, encoder: VoiceEncoder | None
                 ) -> tuple[Voice, dict[str, bytes], np.ndarray | None]:
        """Everything a new voice folder holds, by file name, computed in memory: the slow part of `add`, done
        outside the lock."""
        sample_rate = encoder.sample_rate if encoder is not None else DEFAULT_SAMPLE_RATE
        probe = probe_audio(data)
        if probe.seconds is not None and probe.seconds > self.max_seconds:
            raise self._duration_error(probe.seconds)  # before decoding what could be an hour of audio
        wav, clip = self._convert(data, sample_rate)
        codes = checked_codes(encoder.encode_audio(clip), len(clip)) if encoder is not None else None
        codes_raw = npy_bytes(codes) if codes is not None else None
        voice = Voice(
            id=voice_id, text=text, created=now_iso(), duration=len(clip) / sample_rate, sample_rate=sample_rate,
            original_sample_rate=probe.sample_rate, original_channels=probe.channels,
            original_format=probe.format, audio_sha256=sha256(data), text_sha256=sha256(text.encode()),
            codes_sha256=sha256(codes_raw) if codes_raw is not None else None,
            codec_checksum=encoder.codec_checksum if encoder is not None else None)
        files = {f"{ORIGINAL_STEM}.{extension_for(probe.format)}": data, CLIP: wav,
                 TRANSCRIPT: text.encode(), META: meta_bytes(voice)}
        if codes_raw is not None:
            files[CODES] = codes_raw
        return voice, files, codes

    def _convert(self, data: bytes, sample_rate: int) -> tuple[bytes, np.ndarray]:
        """The upload decoded, checked for length, and stored-clip-ready: (wav bytes, the samples they hold)."""
        # One second of slack so load_audio's own limit does not pre-empt our message about the allowed range.
        audio = load_audio(data, target_sr=sample_rate, max_seconds=self.max_seconds + 1)
        seconds = len(audio) / sample_rate
        if not self.min_seconds <= seconds <= self.max_seconds:
            raise self._duration_error(seconds)
        return pcm16_wav(audio, sample_rate)

    # -- folders -----------------------------------------------------------------------------------------------
    def _folder(self, voice_id: str) -> Path:
        """voices/<id> for a checked id, refused if it resolves anywhere else (a symlink planted there)."""
        folder = self._voices / check_voice_id(voice_id)
        if folder.resolve().parent != self._voices_real:
            raise ShoalError(f"voice folder {voice_id!r} points outside the voice library; remove it by hand")
        return folder

    def _staging_path(self, kind: str) -> Path:
        return self._staging / f"{kind}-{self._owner}-{uuid.uuid4().hex}"

    def _clear_staging(self) -> None:
        for entry in self._staging.iterdir():
            if staging_owner_alive(entry.name):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)

    def _stage(self, files: dict[str, bytes]) -> Path:
        """A complete voice folder in staging, every file fsynced, ready to be renamed into place."""
        folder = self._staging_path("add")
        folder.mkdir()
        try:
            for name, content in files.items():
                write_durably(folder / name, content)
            fsync_dir(folder)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return folder

    def _check_free(self, voice_id: str, target: Path) -> None:
        """Conflict if `target` holds a valid voice. A folder there without a valid meta.json is no voice, so it
        does not block the id."""
        if os.path.lexists(target) and self._read_voice(target) is not None:
            raise Conflict(f"voice {voice_id!r} exists already; delete or rename it first, or overwrite it")

    def _move_aside(self, target: Path) -> Path | None:
        """Rename whatever is at `target` into staging and return where it went, for removal after the commit."""
        if not os.path.lexists(target):
            return None
        aside = self._staging_path("old")
        os.rename(target, aside)
        return aside

    def _publish(self, staged: Path, voice_id: str, target: Path, overwrite: bool) -> None:
        """Rename the staged folder to voices/<id>. With `overwrite`, the old folder goes aside first and is
        removed after; a crash between the two renames leaves no voice, never a mix of two."""
        with self._lock:
            if not overwrite:
                self._check_free(voice_id, target)
            aside = self._move_aside(target)
            try:
                os.rename(staged, target)
            except OSError as exc:
                if aside is not None and not os.path.lexists(target):
                    os.rename(aside, target)  # put the old voice back, then report what went wrong
                    raise
                if os.path.lexists(target):  # another process published the id meanwhile
                    raise Conflict(f"voice {voice_id!r} exists already") from exc
                raise
            fsync_dir(self._voices)
            self._forget(voice_id)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)

    def _read_voice(self, folder: Path) -> Voice | None:
        """The voice in `folder`, or None when it is not one. The folder name is the id: after a crash between
        a rename's two steps meta.json may still hold the old id, and is fixed here."""
        if folder.is_symlink():
            return None  # voice folders are real directories; anything else was put there by hand
        try:
            voice = voice_from_meta(json.loads((folder / META).read_bytes()))
        except (OSError, ValueError):  # missing, unreadable, not JSON (JSONDecodeError), wrong fields
            return None
        if not (folder / CLIP).is_file():
            return None
        if voice.id != folder.name:
            voice = replace(voice, id=folder.name)
            try:
                self._write_meta(folder, voice)
            except ShoalError:
                pass  # read-only disk: the next read fixes it
        return voice

    def _require(self, voice_id: str) -> Voice:
        voice = self._read_voice(self._folder(voice_id))
        if voice is None:
            raise NotFound(f"no saved voice {voice_id!r}")
        return voice

    def _write_meta(self, folder: Path, voice: Voice) -> None:
        with atomic_write(folder / META) as f:
            f.write(meta_bytes(voice))

    # -- codes -------------------------------------------------------------------------------------------------
    def _load_codes(self, folder: Path, voice: Voice, sample_rate: int) -> np.ndarray | None:
        """codes.npy if it is exactly what meta.json recorded and fits clip.wav, else None."""
        try:
            raw = (folder / CODES).read_bytes()
            if sha256(raw) != voice.codes_sha256:
                return None
            codes = np.load(io.BytesIO(raw), allow_pickle=False)
            info = sf.info(str(folder / CLIP))
        except Exception:  # whatever a damaged file makes numpy or libsndfile raise: recompute, never serve it
            return None
        if info.samplerate != sample_rate:
            return None  # the clip must be at the codec's rate; recomputing converts it
        if codes.dtype != np.int64 or codes.shape != (NUM_CODEBOOKS, frames_for(info.frames)):
            return None
        return codes

    def _recompute(self, folder: Path, voice: Voice, encoder: VoiceEncoder) -> tuple[np.ndarray, Voice]:
        """Encode clip.wav again and store the codes. codes.npy is written before meta.json: a crash between
        leaves a checksum mismatch, which only means one more recompute."""
        sample_rate = encoder.sample_rate
        try:
            clip_rate = sf.info(str(folder / CLIP)).samplerate
            audio = load_audio(folder / CLIP, target_sr=sample_rate, max_seconds=None)
        except (ShoalError, *DECODE_ERRORS) as exc:
            raise ShoalError(f"saved voice {voice.id!r} is damaged ({exc}); upload it again") from exc
        if clip_rate != sample_rate:
            wav, audio = pcm16_wav(audio, sample_rate)  # a codec at another rate: keep clip and codes in step
            with atomic_write(folder / CLIP) as f:
                f.write(wav)
        codes = checked_codes(encoder.encode_audio(audio), len(audio))
        raw = npy_bytes(codes)
        with atomic_write(folder / CODES) as f:
            f.write(raw)
        voice = replace(voice, sample_rate=sample_rate, duration=len(audio) / sample_rate,
                        codes_sha256=sha256(raw), codec_checksum=encoder.codec_checksum)
        self._write_meta(folder, voice)
        return codes, voice

    def _recall(self, voice_id: str, codes_sha: str | None) -> np.ndarray | None:
        codes = self._codes.get((voice_id, codes_sha))
        if codes is not None:
            self._codes.move_to_end((voice_id, codes_sha))
        return codes

    def _remember(self, voice_id: str, codes_sha: str | None, codes: np.ndarray) -> None:
        """Keep codes in the bounded LRU (the caller holds the lock)."""
        if codes_sha is None:
            return
        self._codes[(voice_id, codes_sha)] = codes
        self._codes.move_to_end((voice_id, codes_sha))
        while len(self._codes) > CODES_CACHE_SIZE:
            self._codes.popitem(last=False)

    def _forget(self, voice_id: str) -> None:
        for key in [k for k in self._codes if k[0] == voice_id]:
            del self._codes[key]
