"""The saved-voice library on disk: one or more reference clips, each with its transcript, stored once under
an id, with each clip's codec codes computed at upload and cached, so requests that name a voice never run the
codec encoder. A voice also carries details for people and the Fish Audio model API (title, description, tags,
visibility, a cover image); they never change what the voice sounds like.

Layout, one folder per voice. Clip 1's files keep the names a one-clip voice has always had; clip n > 1 adds
`-n` to each stem (clip-2.wav, codes-2.npy, ...):

    root/voices/<id>/original.<ext>   clip 1 as uploaded (ext from its content, never from a user's file name)
                     clip.wav         clip 1 as mono PCM16 at the codec's rate: what gets encoded
                     transcript.txt   clip 1's transcript, for people (meta.json holds the copy the code reads)
                     codes.npy        int64 [10, F] codec codes of clip.wav
                     original-2.<ext>, clip-2.wav, transcript-2.txt, codes-2.npy   clip 2, and so on
                     cover-<hash>.<png|jpeg|webp>   the cover image, if the voice has one (named by its
                                      content, so a new cover never overwrites the one meta.json names)
                     meta.json        the Voice record; a folder without a valid one is not a voice
    root/.staging/                    voices being built, replaced or deleted; dead processes' leftovers are
                                      removed when a library opens

meta.json version 2 lists the clips; version 1 (written before voices had several clips) holds one clip's
fields at the top level and is still read, as a one-clip voice titled by its id.

A voice folder is built whole in `.staging/` and renamed into place, and deletes rename it out before
removing it, so a crash at any point leaves either no voice or a whole one. Changing a voice's details
writes the new cover beside the old one, then rewrites meta.json atomically, then removes the old cover. Nothing here builds a path from an id before
`check_voice_id` has accepted it. A write that finds the disk full is InsufficientStorage naming the data dir,
and leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import math
import os
import re
import shutil
import threading
import uuid
from collections import OrderedDict
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Protocol, Sequence

import numpy as np
import psutil
import soundfile as sf

from shoal.audio import DECODE_ERRORS, load_audio
from shoal.errors import (BadRequest, Conflict, EngineFailure, InsufficientStorage, NotFound, PayloadTooLarge,
                          ShoalError, UnsupportedMediaType)
from shoal.files import atomic_write, out_of_space

log = logging.getLogger("shoal.voices")

VOICE_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
ID_RULE = "voice ids are 1 to 64 characters from A-Z, a-z, 0-9, '_' and '-'"

# The S1 codec's shape: codes are independent of the encoder object, so stored ones can be checked without it.
NUM_CODEBOOKS = 10
FRAME_LENGTH = 2048
DEFAULT_SAMPLE_RATE = 44100
# A 60 s clip is about 150 spoken words; twice that leaves room for fast talkers and long words.
MAX_TEXT_CHARS = 2000
CODES_CACHE_SIZE = 64
META_VERSION = 2
# Every clip's codes go into each prompt, so a voice's clips share the model's context with the text.
MAX_CLIPS = 8
MAX_COVER_BYTES = 2 * 2**20
# Details are for people and listings: generous for any real title, small enough to keep meta.json small.
MAX_TITLE_CHARS = 200
MAX_DESCRIPTION_CHARS = 5000
MAX_TAGS = 32
MAX_TAG_CHARS = 64
VISIBILITIES = ("public", "unlist", "private")
DEFAULT_VISIBILITY = "private"

CLIP, TRANSCRIPT, CODES, META = "clip.wav", "transcript.txt", "codes.npy", "meta.json"
ORIGINAL_STEM, COVER_STEM = "original", "cover"
#: Cover image formats by their first bytes (WebP: "RIFF", 4 bytes of size, "WEBP"), and their media types.
COVER_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
#: Hex digits of the cover's sha256 in its file name: enough that two covers of one voice never share a name.
COVER_HASH_CHARS = 16
COVER_NAME = re.compile(rf"{COVER_STEM}-[0-9a-f]{{{COVER_HASH_CHARS}}}\.({'|'.join(COVER_TYPES)})")


def cover_format(data: bytes) -> str | None:
    """"png", "jpeg" or "webp" by the image's magic bytes; None for anything else."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def cover_name(data: bytes, image_format: str) -> str:
    """The file name of a cover image: `cover-<hash>.<format>`."""
    return f"{COVER_STEM}-{sha256(data)[:COVER_HASH_CHARS]}.{image_format}"


def numbered(name: str, index: int) -> str:
    """The file `name` of clip `index` (0-based): clip 1 keeps the plain name, clip n > 1 is `<stem>-n.<ext>`."""
    if index == 0:
        return name
    stem, dot, ext = name.partition(".")
    return f"{stem}-{index + 1}{dot}{ext}"


def new_voice_id() -> str:
    """A fresh id for a voice made without one: 32 hex digits, as Fish Audio's model ids."""
    return uuid.uuid4().hex


class VoiceEncoder(Protocol):
    """What the library needs from an engine to make codes (FishEngine satisfies it)."""

    sample_rate: int
    codec_checksum: str

    def encode_audio(self, audio: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class Clip:
    """One reference clip of a voice. Sample rates in Hz, duration in seconds of the stored clip."""

    text: str
    duration: float
    sample_rate: int
    original_sample_rate: int
    original_channels: int
    original_format: str
    audio_sha256: str
    text_sha256: str
    codes_sha256: str | None = None
    codec_checksum: str | None = None


@dataclass(frozen=True)
class Details:
    """What a voice says about itself, for people and listings; none of it changes the voice's sound."""

    title: str = ""
    description: str = ""
    tags: tuple[str, ...] = ()
    visibility: str = DEFAULT_VISIBILITY


@dataclass(frozen=True)
class Voice:
    """A saved voice as meta.json records it: its clips in prompt order, its details, times in ISO 8601 UTC,
    and its cover image's file name (None without one)."""

    id: str
    clips: tuple[Clip, ...]
    created: str
    updated: str
    details: Details = field(default_factory=Details)
    cover: str | None = None

    @property
    def text(self) -> str:
        """Every clip's transcript, one per line."""
        return "\n".join(clip.text for clip in self.clips)

    @property
    def duration(self) -> float:
        """Seconds of reference audio, all clips together."""
        return sum(clip.duration for clip in self.clips)

    def to_dict(self) -> dict:
        return asdict(self)


# meta.json is read back field by field against these, so a hand-edited or damaged file is refused whole.
CLIP_TYPES: dict[str, tuple[type, ...]] = {
    "text": (str,), "duration": (int, float), "sample_rate": (int,), "original_sample_rate": (int,),
    "original_channels": (int,), "original_format": (str,), "audio_sha256": (str,), "text_sha256": (str,),
    "codes_sha256": (str, type(None)), "codec_checksum": (str, type(None)),
}
VOICE_TYPES: dict[str, tuple[type, ...]] = {
    "id": (str,), "clips": (list,), "created": (str,), "updated": (str,), "details": (dict,),
    "cover": (str, type(None)),
}
DETAILS_TYPES: dict[str, tuple[type, ...]] = {
    "title": (str,), "description": (str,), "tags": (list,), "visibility": (str,),
}


def check_voice_id(voice_id: object) -> str:
    """The id itself when it is safe as one folder name, else BadRequest saying what ids may contain."""
    if isinstance(voice_id, str) and VOICE_ID_PATTERN.fullmatch(voice_id):
        return voice_id
    shown = repr(voice_id[:40] + "..." if isinstance(voice_id, str) and len(voice_id) > 40 else voice_id)
    raise BadRequest(f"invalid voice id {shown}: {ID_RULE}")


def typed_fields(record: object, types: dict[str, tuple[type, ...]], what: str) -> dict:
    """The fields of `record` named in `types`, each checked; ValueError naming the first that is off."""
    if not isinstance(record, dict):
        raise ValueError(f"{what} is not an object")
    values = {}
    for name, allowed in types.items():
        value = record.get(name)
        if name not in record or isinstance(value, bool) or not isinstance(value, allowed):
            raise ValueError(f"{what} field {name!r} is missing or not {allowed}")
        values[name] = value
    return values


def clip_from_meta(record: object) -> Clip:
    clip = Clip(**typed_fields(record, CLIP_TYPES, "clip"))
    if not clip.text.strip() or clip.sample_rate <= 0:
        raise ValueError("meta.json has a clip with an empty transcript or no sample rate")
    return clip


def details_from_meta(record: object) -> Details:
    values = typed_fields(record, DETAILS_TYPES, "details")
    tags = values["tags"]
    if not all(isinstance(tag, str) for tag in tags) or values["visibility"] not in VISIBILITIES:
        raise ValueError("meta.json has tags that are not strings or an unknown visibility")
    return Details(**{**values, "tags": tuple(tags)})


def voice_from_meta(meta: object) -> Voice:
    """A Voice from parsed meta.json (version 2, or version 1's one clip); ValueError when a field is missing
    or of the wrong type."""
    if isinstance(meta, dict) and meta.get("version") == 1:
        values = typed_fields(meta, {"id": (str,), "created": (str,)}, "meta.json")
        return Voice(id=values["id"], clips=(clip_from_meta(meta),), created=values["created"],
                     updated=values["created"], details=Details(title=values["id"]))
    if not isinstance(meta, dict) or meta.get("version") != META_VERSION:
        raise ValueError(f"meta.json is not an object of version 1 or {META_VERSION}")
    values = typed_fields(meta, VOICE_TYPES, "meta.json")
    if not values["clips"] or not (values["cover"] is None or COVER_NAME.fullmatch(values["cover"])):
        raise ValueError("meta.json lists no clips, or a cover file of another name")
    return Voice(id=values["id"], clips=tuple(clip_from_meta(c) for c in values["clips"]),
                 created=values["created"], updated=values["updated"],
                 details=details_from_meta(values["details"]), cover=values["cover"])


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
    """Create `path` with `data` and fsync it, so a renamed folder never holds files the disk has not seen.
    Plain os.write calls, so a full disk surfaces here as the OSError it is."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


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
    """meta.json for `voice`: always the current version."""
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
                 max_seconds: float = 60.0, max_text_chars: int = MAX_TEXT_CHARS, max_clips: int = MAX_CLIPS,
                 max_cover_bytes: int = MAX_COVER_BYTES):
        if not 0 <= min_seconds <= max_seconds:
            raise ValueError(f"need 0 <= min_seconds <= max_seconds, got {min_seconds} and {max_seconds}")
        self.root = Path(root)
        self.max_upload_bytes = max_upload_bytes
        self.min_seconds = min_seconds
        self.max_seconds = max_seconds
        self.max_text_chars = max_text_chars
        self.max_clips = max_clips
        self.max_cover_bytes = max_cover_bytes
        self._voices = self.root / "voices"
        self._staging = self.root / ".staging"
        self._voices.mkdir(parents=True, exist_ok=True)
        self._staging.mkdir(parents=True, exist_ok=True)
        self._voices_real = self._voices.resolve()
        self._lock = threading.Lock()
        self._owner = process_tag(os.getpid()) or f"{os.getpid()}-0"
        self._codes: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()
        #: Requests whose saved voice's codes were all in memory (hits) or not (misses: read or recomputed).
        self.codes_hits = 0
        self.codes_misses = 0
        self._clear_staging()

    # -- public API --------------------------------------------------------------------------------------------
    def add(self, voice_id: str, audio: bytes, text: str, encoder: VoiceEncoder | None = None, *,
            overwrite: bool = False) -> Voice:
        """Save a one-clip voice titled by its id (see `save`)."""
        return self.save(voice_id, [(audio, text)], encoder, overwrite=overwrite)

    def save(self, voice_id: str, clips: Sequence[tuple[bytes, str]], encoder: VoiceEncoder | None = None, *,
             details: Details | None = None, cover: bytes | None = None, overwrite: bool = False) -> Voice:
        """Save a voice of one or more (audio, transcript) clips, in prompt order: validate, convert, encode
        each clip once (when an encoder is given), then publish the folder in one rename. `details` default to
        the id as title. Raises BadRequest, PayloadTooLarge, UnsupportedMediaType (cover), Conflict when the id
        is taken and not `overwrite`, InsufficientStorage when the data dir is full."""
        voice_id = check_voice_id(voice_id)
        target = self._folder(voice_id)
        if not clips:
            raise BadRequest("a voice needs at least one clip")
        if len(clips) > self.max_clips:
            raise BadRequest(f"a voice holds at most {self.max_clips} clips; got {len(clips)}")
        checked = [(self._check_upload(audio), self._check_text(text)) for audio, text in clips]
        details = self.check_details(details or Details(title=voice_id))
        cover_file = cover_name(cover, self.check_cover(cover)) if cover is not None else None
        if not overwrite:
            with self._lock:
                self._check_free(voice_id, target)  # fail before the expensive part; checked again at publish
        now = now_iso()
        files: dict[str, bytes] = {}
        prepared = []
        for index, (data, text) in enumerate(checked):
            clip, clip_files, codes = self._prepare(index, data, text, encoder)
            files.update(clip_files)
            prepared.append((clip, codes))
        voice = Voice(id=voice_id, clips=tuple(clip for clip, _ in prepared), created=now, updated=now,
                      details=details, cover=cover_file)
        if cover_file is not None:
            files[cover_file] = cover
        files[META] = meta_bytes(voice)
        with self._space():
            staged = self._stage(files)
        try:
            self._publish(staged, voice_id, target, overwrite)
        finally:
            shutil.rmtree(staged, ignore_errors=True)  # gone already unless publishing failed
        with self._lock:
            for clip, codes in prepared:
                if codes is not None:
                    self._remember(voice_id, clip.codes_sha256, codes)
        return voice

    def update(self, voice_id: str, *, title: str | None = None, description: str | None = None,
               tags: Sequence[str] | None = None, visibility: str | None = None,
               cover: bytes | None = None) -> Voice:
        """Change a voice's details and cover (None: unchanged); the clips stay as they are. A new cover is
        written beside the old one, then meta.json is rewritten atomically (the commit), then the old cover is
        removed: a crash or a full disk (InsufficientStorage) at any point leaves the voice as it was or as
        asked, never a mix."""
        voice_id = check_voice_id(voice_id)
        folder = self._folder(voice_id)
        cover_file = cover_name(cover, self.check_cover(cover)) if cover is not None else None
        with self._lock:
            voice = self._require(voice_id)
            old = voice.details
            details = self.check_details(Details(
                title=old.title if title is None else title,
                description=old.description if description is None else description,
                tags=old.tags if tags is None else tuple(tags),
                visibility=old.visibility if visibility is None else visibility))
            changed = replace(voice, details=details, updated=now_iso(), cover=cover_file or voice.cover)
            try:
                with self._space():
                    if cover_file is not None and cover_file != voice.cover:
                        with atomic_write(folder / cover_file) as f:
                            f.write(cover)
                    self._write_meta(folder, changed)
            except BaseException:
                if cover_file is not None and cover_file != voice.cover:
                    (folder / cover_file).unlink(missing_ok=True)
                raise
            for entry in folder.glob(f"{COVER_STEM}-*"):  # the cover replaced, or one a crash left unnamed
                if entry.name != changed.cover:
                    entry.unlink(missing_ok=True)
        return changed

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
        and if a crash comes between the two, reading trusts the folder name and fixes meta.json. A title that
        is the old id (the default) becomes the new id."""
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
            details = voice.details
            if details.title == old_id:
                details = replace(details, title=new_id)
            voice = replace(voice, id=new_id, details=details)
            try:
                self._write_meta(target, voice)
            except ShoalError:
                pass  # the rename is done; reading trusts the folder name and retries this
            self._forget(old_id)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
        return voice

    def codes(self, voice_id: str, encoder: VoiceEncoder) -> list[np.ndarray]:
        """Each clip's codes, int64 [10, F], in clip order, made with `encoder`'s codec: from memory, else the
        clip's codes file when it checks out, else recomputed from its clip file and stored again (missing,
        damaged, or another codec's)."""
        voice_id = check_voice_id(voice_id)
        # One lock for the rare recompute too: it is a few encodes, and it keeps a concurrent rename or
        # delete from racing the rewrite of the codes files and meta.json.
        with self._lock:
            voice = self._require(voice_id)
            folder = self._folder(voice_id)
            result, missed = [], False
            for index, clip in enumerate(voice.clips):
                usable = clip.codes_sha256 is not None and clip.codec_checksum == encoder.codec_checksum
                codes = self._recall(voice_id, clip.codes_sha256) if usable else None
                missed = missed or codes is None
                if codes is None and usable:
                    codes = self._load_codes(folder, index, clip, encoder.sample_rate)
                if codes is None:
                    codes, voice = self._recompute(folder, voice, index, encoder)
                    clip = voice.clips[index]
                self._remember(voice_id, clip.codes_sha256, codes)
                result.append(codes.copy())
            if missed:
                self.codes_misses += 1
            else:
                self.codes_hits += 1
            return result

    def cache_counters(self) -> dict[str, int]:
        return {"voice_cache_hits": self.codes_hits, "voice_cache_misses": self.codes_misses}

    def clip_path(self, voice_id: str, index: int = 0) -> Path:
        """A stored mono clip (PCM16 wav at the codec's rate), for playback; clip 1 unless `index` says."""
        voice_id = check_voice_id(voice_id)
        with self._lock:
            self._require_clip(self._require(voice_id), index)
            return self._folder(voice_id) / numbered(CLIP, index)

    def clip_bytes(self, voice_id: str, index: int = 0) -> bytes:
        """A stored clip's WAV bytes (see `clip_path`), read under the lock so a concurrent delete cannot
        pull the file away mid-read."""
        voice_id = check_voice_id(voice_id)
        with self._lock:
            self._require_clip(self._require(voice_id), index)
            try:
                return (self._folder(voice_id) / numbered(CLIP, index)).read_bytes()
            except OSError as exc:
                raise NotFound(f"clip {index + 1} of voice {voice_id!r} is missing") from exc

    def original(self, voice_id: str, index: int = 0) -> tuple[bytes, str]:
        """A clip's upload as sent (clip 1 unless `index` says), and a download name for it, `<id>.<ext>`
        (`<id>-n.<ext>` for clip n > 1)."""
        voice_id = check_voice_id(voice_id)
        with self._lock:
            clip = self._require_clip(self._require(voice_id), index)
            ext = extension_for(clip.original_format)
            name = numbered(f"{ORIGINAL_STEM}.{ext}", index)
            try:
                data = (self._folder(voice_id) / name).read_bytes()
            except OSError as exc:
                raise NotFound(f"the original upload of voice {voice_id!r} is missing") from exc
        return data, numbered(f"{voice_id}.{ext}", index)

    def cover(self, voice_id: str) -> tuple[bytes, str]:
        """The voice's cover image and its media type; NotFound when it has none."""
        voice_id = check_voice_id(voice_id)
        with self._lock:
            voice = self._require(voice_id)
            if voice.cover is None:
                raise NotFound(f"voice {voice_id!r} has no cover image")
            try:
                data = (self._folder(voice_id) / voice.cover).read_bytes()
            except OSError as exc:
                raise NotFound(f"the cover image of voice {voice_id!r} is missing") from exc
        return data, COVER_TYPES[voice.cover.rpartition(".")[2]]

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

    def check_details(self, details: Details) -> Details:
        """`details` with title and tags stripped, or BadRequest saying which is off."""
        title = details.title.strip()
        if not title or len(title) > MAX_TITLE_CHARS:
            raise BadRequest(f"a voice's title must be 1 to {MAX_TITLE_CHARS} characters")
        if len(details.description) > MAX_DESCRIPTION_CHARS:
            raise BadRequest(f"a voice's description is at most {MAX_DESCRIPTION_CHARS} characters")
        tags = tuple(dict.fromkeys(tag.strip() for tag in details.tags if tag.strip()))
        if len(tags) > MAX_TAGS or any(len(tag) > MAX_TAG_CHARS for tag in tags):
            raise BadRequest(f"a voice has at most {MAX_TAGS} tags of at most {MAX_TAG_CHARS} characters each")
        if details.visibility not in VISIBILITIES:
            raise BadRequest(f"visibility must be one of {', '.join(VISIBILITIES)}, not {details.visibility!r}")
        return replace(details, title=title, tags=tags)

    def check_cover(self, data: bytes) -> str:
        """The cover's format ("png", "jpeg", "webp"), or PayloadTooLarge / UnsupportedMediaType / BadRequest."""
        if not data:
            raise BadRequest("the cover image is empty")
        if len(data) > self.max_cover_bytes:
            raise PayloadTooLarge(f"the cover image is {len(data)} bytes; the limit is {self.max_cover_bytes} "
                                  "bytes (max_cover_bytes)")
        ext = cover_format(data)
        if ext is None:
            raise UnsupportedMediaType("the cover image must be a PNG, JPEG or WebP file")
        return ext

    def _duration_error(self, seconds: float) -> BadRequest:
        return BadRequest(f"voice clips must be {self.min_seconds:g} to {self.max_seconds:g} seconds long; "
                          f"this one is {seconds:.2f} seconds")

    def _prepare(self, index: int, data: bytes, text: str, encoder: VoiceEncoder | None
                 ) -> tuple[Clip, dict[str, bytes], np.ndarray | None]:
        """Everything clip `index` adds to a new voice folder, by file name, computed in memory: the slow part
        of `save`, done outside the lock."""
        sample_rate = encoder.sample_rate if encoder is not None else DEFAULT_SAMPLE_RATE
        probe = probe_audio(data)
        if probe.seconds is not None and probe.seconds > self.max_seconds:
            raise self._duration_error(probe.seconds)  # before decoding what could be an hour of audio
        wav, samples = self._convert(data, sample_rate)
        codes = checked_codes(encoder.encode_audio(samples), len(samples)) if encoder is not None else None
        codes_raw = npy_bytes(codes) if codes is not None else None
        clip = Clip(
            text=text, duration=len(samples) / sample_rate, sample_rate=sample_rate,
            original_sample_rate=probe.sample_rate, original_channels=probe.channels,
            original_format=probe.format, audio_sha256=sha256(data), text_sha256=sha256(text.encode()),
            codes_sha256=sha256(codes_raw) if codes_raw is not None else None,
            codec_checksum=encoder.codec_checksum if encoder is not None else None)
        files = {numbered(f"{ORIGINAL_STEM}.{extension_for(probe.format)}", index): data,
                 numbered(CLIP, index): wav, numbered(TRANSCRIPT, index): text.encode()}
        if codes_raw is not None:
            files[numbered(CODES, index)] = codes_raw
        return clip, files, codes

    def _convert(self, data: bytes, sample_rate: int) -> tuple[bytes, np.ndarray]:
        """The upload decoded, checked for length, and stored-clip-ready: (wav bytes, the samples they hold)."""
        # One second of slack so load_audio's own limit does not pre-empt our message about the allowed range.
        audio = load_audio(data, target_sr=sample_rate, max_seconds=self.max_seconds + 1)
        seconds = len(audio) / sample_rate
        if not self.min_seconds <= seconds <= self.max_seconds:
            raise self._duration_error(seconds)
        return pcm16_wav(audio, sample_rate)

    # -- folders -----------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _space(self) -> Iterator[None]:
        """Turn a full disk met inside the block into InsufficientStorage naming the data dir."""
        try:
            yield
        except (OSError, InsufficientStorage) as exc:
            if isinstance(exc, OSError) and not out_of_space(exc):
                raise
            raise InsufficientStorage(f"the data dir {self.root} is out of space: nothing was saved; free some "
                                      "space there or move SHOAL_DATA_DIR") from exc

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
        if not all((folder / numbered(CLIP, index)).is_file() for index in range(len(voice.clips))):
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

    @staticmethod
    def _require_clip(voice: Voice, index: int) -> Clip:
        if not 0 <= index < len(voice.clips):
            raise NotFound(f"voice {voice.id!r} has {len(voice.clips)} clips; there is no clip {index + 1}")
        return voice.clips[index]

    def _write_meta(self, folder: Path, voice: Voice) -> None:
        with atomic_write(folder / META) as f:
            f.write(meta_bytes(voice))

    # -- codes -------------------------------------------------------------------------------------------------
    def _load_codes(self, folder: Path, index: int, clip: Clip, sample_rate: int) -> np.ndarray | None:
        """Clip `index`'s codes file if it is exactly what meta.json recorded and fits its clip, else None."""
        try:
            raw = (folder / numbered(CODES, index)).read_bytes()
            if sha256(raw) != clip.codes_sha256:
                return None
            codes = np.load(io.BytesIO(raw), allow_pickle=False)
            info = sf.info(str(folder / numbered(CLIP, index)))
        except Exception:  # whatever a damaged file makes numpy or libsndfile raise: recompute, never serve it
            return None
        if info.samplerate != sample_rate:
            return None  # the clip must be at the codec's rate; recomputing converts it
        if codes.dtype != np.int64 or codes.shape != (NUM_CODEBOOKS, frames_for(info.frames)):
            return None
        return codes

    def _recompute(self, folder: Path, voice: Voice, index: int, encoder: VoiceEncoder
                   ) -> tuple[np.ndarray, Voice]:
        """Encode clip `index` again and store its codes. The codes file is written before meta.json: a crash
        between leaves a checksum mismatch, which only means one more recompute. A full disk keeps the codes
        from being stored, not from being used: the voice still speaks, and recomputes until there is room."""
        sample_rate = encoder.sample_rate
        clip_file, clip = folder / numbered(CLIP, index), voice.clips[index]
        try:
            clip_rate = sf.info(str(clip_file)).samplerate
            audio = load_audio(clip_file, target_sr=sample_rate, max_seconds=None)
        except (ShoalError, *DECODE_ERRORS) as exc:
            raise ShoalError(f"saved voice {voice.id!r} is damaged ({exc}); upload it again") from exc
        wav = None
        if clip_rate != sample_rate:
            wav, audio = pcm16_wav(audio, sample_rate)  # a codec at another rate: keep clip and codes in step
        codes = checked_codes(encoder.encode_audio(audio), len(audio))
        raw = npy_bytes(codes)
        clips = list(voice.clips)
        clips[index] = replace(clip, sample_rate=sample_rate, duration=len(audio) / sample_rate,
                               codes_sha256=sha256(raw), codec_checksum=encoder.codec_checksum)
        voice = replace(voice, clips=tuple(clips))
        try:
            if wav is not None:
                with atomic_write(clip_file) as f:
                    f.write(wav)
            with atomic_write(folder / numbered(CODES, index)) as f:
                f.write(raw)
            self._write_meta(folder, voice)
        except InsufficientStorage as exc:  # the codes are good; only caching them failed
            log.warning("saved voice %r: codes recomputed but not stored, the data dir %s is full (%s)",
                        voice.id, self.root, exc)
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
