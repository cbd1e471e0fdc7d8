"""The saved-voice library: codes made once at upload and never again, ids that cannot escape the library,
and a disk that holds whole voices or none whatever happens mid-write."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import psutil
import pytest
import soundfile as sf

from shoal.audio import load_audio
from shoal.errors import BadRequest, Conflict, InsufficientStorage, NotFound, PayloadTooLarge, ShoalError
from shoal.voices import VOICE_ID_PATTERN, Details, VoiceLibrary

from support import load_codec_golden, tone, tone_clip as wav, tree

TEXT = "A short test sentence."


class FakeEncoder:
    """Stands in for FishEngine: counts encodes and returns codes that depend on the audio, in the real shape."""

    def __init__(self, codec_checksum: str = "abc", sample_rate: int = 44100):
        self.codec_checksum = codec_checksum
        self.sample_rate = sample_rate
        self.encode_count = 0

    def encode_audio(self, audio: np.ndarray) -> np.ndarray:
        assert audio.dtype == np.float32 and audio.ndim == 1
        self.encode_count += 1
        frames = math.ceil(len(audio) / 2048)
        salt = int(np.abs(audio).sum() * 1000) % 997
        return (np.arange(10)[:, None] * 1000 + np.arange(frames)[None, :] + salt).astype(np.int64)


@pytest.fixture
def root(tmp_path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def lib(root) -> VoiceLibrary:
    return VoiceLibrary(root)


@pytest.fixture
def enc() -> FakeEncoder:
    return FakeEncoder()


def staging(root: Path) -> list[str]:
    return sorted(p.name for p in (root / ".staging").iterdir())


# -- the happy path ---------------------------------------------------------------------------------------------
def test_add_get_list_rename_delete_round_trip(lib, root, enc):
    data = wav(2.0)
    voice = lib.add("alice", data, f"  {TEXT}\n", enc)
    assert voice.id == "alice" and voice.text == TEXT and voice.clips[0].sample_rate == 44100
    assert voice.duration == pytest.approx(2.0, abs=1e-3)
    clip = voice.clips[0]
    assert (clip.original_format, clip.original_sample_rate, clip.original_channels) == ("wav", 44100, 1)
    assert clip.codec_checksum == "abc" and clip.codes_sha256 is not None
    assert voice.created.endswith("+00:00")
    json.dumps(voice.to_dict())  # JSON-safe for the API
    folder = root / "voices" / "alice"
    assert sorted(p.name for p in folder.iterdir()) == ["clip.wav", "codes.npy", "meta.json", "original.wav",
                                                         "transcript.txt"]
    assert (folder / "transcript.txt").read_text() == TEXT
    assert lib.get("alice") == voice and lib.list() == [voice]
    assert lib.original("alice") == (data, "alice.wav")
    assert lib.clip_path("alice") == folder / "clip.wav"

    lib.add("bob", wav(1.5, freq=220), "Bob speaks.", enc)
    assert [v.id for v in lib.list()] == ["alice", "bob"]

    renamed = lib.rename("alice", "carol")
    assert renamed == replace(voice, id="carol", details=Details(title="carol"))  # the default title follows
    assert lib.get("carol") == renamed
    assert json.loads((root / "voices" / "carol" / "meta.json").read_text())["id"] == "carol"
    with pytest.raises(NotFound):
        lib.get("alice")
    assert [v.id for v in lib.list()] == ["bob", "carol"]
    assert lib.rename("carol", "carol") == renamed

    lib.delete("carol")
    assert [v.id for v in lib.list()] == ["bob"]
    assert not (root / "voices" / "carol").exists() and staging(root) == []
    with pytest.raises(NotFound):
        lib.get("carol")


def test_voices_persist_across_library_instances(lib, root, enc):
    a = lib.add("a", wav(1.5), "one", enc)
    b = lib.add("b-2_x", wav(2.5, freq=330), "two", enc)
    reopened = VoiceLibrary(root)
    assert reopened.list() == [a, b]
    assert reopened.get("b-2_x") == b


# -- codes: once, then never again ------------------------------------------------------------------------------
def test_codes_are_computed_once_at_upload_and_never_again(lib, root, enc):
    lib.add("v", wav(2.0), TEXT, enc)
    assert enc.encode_count == 1
    expected = FakeEncoder().encode_audio(load_audio(lib.clip_path("v"), 44100))
    for _ in range(3):
        codes = lib.codes("v", enc)[0]
        assert codes.dtype == np.int64 and codes.shape == (10, math.ceil(88200 / 2048))
        assert np.array_equal(codes, expected)
    codes[:] = -1  # callers get a copy: scribbling on it cannot poison the cache
    assert np.array_equal(lib.codes("v", enc)[0], expected)
    assert np.array_equal(VoiceLibrary(root).codes("v", enc)[0], expected)  # from codes.npy this time
    assert enc.encode_count == 1


def test_another_codec_recomputes_once(lib, root, enc):
    lib.add("v", wav(2.0), TEXT, enc)
    other = FakeEncoder(codec_checksum="def")
    lib.codes("v", other)[0]
    lib.codes("v", other)[0]
    assert other.encode_count == 1 and lib.get("v").clips[0].codec_checksum == "def"
    VoiceLibrary(root).codes("v", other)[0]
    assert other.encode_count == 1
    lib.codes("v", enc)[0]  # and back: the stored codes now belong to "def"
    assert enc.encode_count == 2


def rewrite_codes(root: Path, codes: np.ndarray, *, fix_meta: bool) -> None:
    """Replace codes.npy; with `fix_meta` also its checksum in meta.json, so only the shape check can catch it."""
    folder = root / "voices" / "v"
    buf = io.BytesIO()
    np.save(buf, codes)
    (folder / "codes.npy").write_bytes(buf.getvalue())
    if fix_meta:
        meta = json.loads((folder / "meta.json").read_text())
        meta["clips"][0]["codes_sha256"] = hashlib.sha256(buf.getvalue()).hexdigest()
        (folder / "meta.json").write_text(json.dumps(meta))


DAMAGE = {
    "missing": lambda root, c: (root / "voices/v/codes.npy").unlink(),
    "corrupt": lambda root, c: (root / "voices/v/codes.npy").write_bytes(os.urandom(400)),
    "truncated": lambda root, c: (root / "voices/v/codes.npy").write_bytes(
        (root / "voices/v/codes.npy").read_bytes()[:200]),
    "flipped": lambda root, c: rewrite_codes(root, c + 1, fix_meta=False),
    "short": lambda root, c: rewrite_codes(root, c[:, :-1], fix_meta=True),
    "rows": lambda root, c: rewrite_codes(root, c[:9], fix_meta=True),
    "int32": lambda root, c: rewrite_codes(root, c.astype(np.int32), fix_meta=True),
    "float": lambda root, c: rewrite_codes(root, c.astype(np.float64), fix_meta=True),
    "garbage-header": lambda root, c: (root / "voices/v/codes.npy").write_bytes(b"\x93NUMPY\x01\x00garbage"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_codes_are_recomputed_never_served(root, enc, damage):
    VoiceLibrary(root).add("v", wav(2.0), TEXT, enc)
    original = np.load(root / "voices/v/codes.npy")
    DAMAGE[damage](root, original)
    lib = VoiceLibrary(root)  # a fresh process: nothing in memory
    assert np.array_equal(lib.codes("v", enc)[0], original)
    assert enc.encode_count == 2
    assert np.array_equal(VoiceLibrary(root).codes("v", enc)[0], original)
    assert enc.encode_count == 2  # repaired on disk


def test_voice_saved_without_an_encoder_gets_codes_on_first_use(lib, root, enc):
    voice = lib.add("lite", wav(1.5), TEXT)  # a server running only the lite engine
    assert voice.clips[0].codes_sha256 is None and voice.clips[0].codec_checksum is None
    assert not (root / "voices/lite/codes.npy").exists()
    codes = lib.codes("lite", enc)[0]
    assert enc.encode_count == 1 and codes.shape == (10, math.ceil(66150 / 2048))
    assert VoiceLibrary(root).get("lite").clips[0].codec_checksum == "abc"
    VoiceLibrary(root).codes("lite", enc)[0]
    assert enc.encode_count == 1


def test_codes_cache_is_bounded(lib, root, enc, monkeypatch):
    monkeypatch.setattr("shoal.voices.CODES_CACHE_SIZE", 2)
    for i, name in enumerate("abc"):
        lib.add(name, wav(1.5, freq=200 + 100 * i), TEXT, enc)
    for name in "ac":
        (root / "voices" / name / "codes.npy").unlink()
    lib.codes("c", enc)[0]  # still in memory: the missing file is never looked at
    assert enc.encode_count == 3
    lib.codes("a", enc)[0]  # evicted, so it went to disk, found nothing and recomputed
    assert enc.encode_count == 4


# -- ids --------------------------------------------------------------------------------------------------------
HOSTILE_IDS = ["..", ".", "../x", "a/b", "a\\b", "a\x00b", "", " ", "x" * 65, "x" * 10_000, "é", "\uff41",
               "a.b", "a b", "a\n", "\na", "/etc/passwd", "%2e%2e", "a\u200b", "\u0663", "a:b", "~", "a\tb",
               None, 7]


def test_hostile_ids_are_refused_and_touch_nothing(tmp_path, enc):
    lib = VoiceLibrary(tmp_path / "data")
    lib.add("good", wav(1.5), TEXT, enc)
    before = tree(tmp_path)
    calls = [
        lambda bad: lib.add(bad, wav(1.5), TEXT, enc),
        lambda bad: lib.add(bad, wav(1.5), TEXT, enc, overwrite=True),
        lib.get, lib.delete, lib.clip_path, lib.clip_bytes, lib.original, lib.cover,
        lambda bad: lib.save(bad, [(wav(1.5), TEXT), (wav(1.5), TEXT)], enc),
        lambda bad: lib.update(bad, title="x", cover=PNG),
        lambda bad: lib.codes(bad, enc)[0],
        lambda bad: lib.rename(bad, "fresh"),
        lambda bad: lib.rename("good", bad),
    ]
    for bad in HOSTILE_IDS:
        assert not (isinstance(bad, str) and VOICE_ID_PATTERN.fullmatch(bad))
        for call in calls:
            with pytest.raises(BadRequest, match="voice ids are 1 to 64 characters from A-Z, a-z, 0-9"):
                call(bad)
    assert tree(tmp_path) == before and enc.encode_count == 1
    assert [v.id for v in lib.list()] == ["good"]


def test_longest_and_odd_but_valid_ids_work(lib, enc):
    for name in ["x" * 64, "-", "_", "A-Z_0-9"]:
        assert lib.add(name, wav(1.5), TEXT).id == name
    assert len(lib.list()) == 4


def test_a_symlink_planted_in_voices_is_not_followed(lib, root, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "voices" / "evil").symlink_to(outside, target_is_directory=True)
    assert lib.list() == []
    with pytest.raises(ShoalError):
        lib.get("evil")
    with pytest.raises(ShoalError):
        lib.add("evil", wav(1.5), TEXT, overwrite=True)
    assert list(outside.iterdir()) == []


# -- conflicts and missing voices -------------------------------------------------------------------------------
def test_duplicate_id_conflicts_unless_overwrite(lib, root, enc):
    first = lib.add("v", wav(1.5), "first", enc)
    with pytest.raises(Conflict):
        lib.add("v", wav(2.0), "second", enc)
    assert enc.encode_count == 1 and lib.get("v") == first  # refused before decoding or encoding
    second = lib.add("v", wav(2.0, freq=880), "second", enc, overwrite=True)
    assert lib.get("v") == second and second.text == "second" and second.duration == pytest.approx(2.0, abs=1e-3)
    assert np.array_equal(lib.codes("v", enc)[0], FakeEncoder().encode_audio(load_audio(lib.clip_path("v"))))
    assert enc.encode_count == 2 and staging(root) == []


def test_rename_onto_a_taken_id_conflicts(lib, enc):
    lib.add("a", wav(1.5), "a", enc)
    lib.add("b", wav(1.5), "b", enc)
    with pytest.raises(Conflict):
        lib.rename("a", "b")
    assert lib.get("a").text == "a" and lib.get("b").text == "b"


def test_unknown_ids_are_not_found(lib, enc):
    for call in [lambda: lib.get("nope"), lambda: lib.delete("nope"), lambda: lib.rename("nope", "x"),
                 lambda: lib.codes("nope", enc)[0], lambda: lib.clip_path("nope"), lambda: lib.original("nope")]:
        with pytest.raises(NotFound, match="nope"):
            call()


# -- upload validation ------------------------------------------------------------------------------------------
def test_upload_over_the_limit_is_too_large(root, enc):
    lib = VoiceLibrary(root, max_upload_bytes=10_000)
    with pytest.raises(PayloadTooLarge, match="10000"):
        lib.add("v", wav(1.5), TEXT, enc)
    assert enc.encode_count == 0 and lib.list() == []


@pytest.mark.parametrize("seconds", [0.5, 3.5, 4.5])
def test_clip_outside_the_allowed_duration_is_refused(root, enc, seconds):
    lib = VoiceLibrary(root, min_seconds=1.0, max_seconds=3.0)
    with pytest.raises(BadRequest, match=rf"1 to 3 seconds long; this one is {seconds:.2f} seconds"):
        lib.add("v", wav(seconds), TEXT, enc)
    assert enc.encode_count == 0 and lib.list() == [] and staging(root) == []


def test_non_audio_is_refused(lib, enc):
    # What a text file renamed to .wav looks like by the time it reaches the library: just bytes.
    for data in [b"this is a transcript, not audio\n" * 20, b"", b"RIFF\x00\x00\x00\x00WAVEjunk"]:
        with pytest.raises(BadRequest):
            lib.add("v", data, TEXT, enc)
    assert enc.encode_count == 0 and lib.list() == []


@pytest.mark.parametrize("text", ["", "   \n\t", "x" * 2001])
def test_bad_transcripts_are_refused(lib, enc, text):
    with pytest.raises(BadRequest, match="transcript"):
        lib.add("v", wav(1.5), text, enc)
    assert lib.list() == []


def test_stereo_22k_upload_is_stored_as_mono_44k(lib, root, enc):
    data = wav(2.0, 22050, channels=2)
    voice = lib.add("st", data, TEXT, enc)
    clip = voice.clips[0]
    assert (clip.original_sample_rate, clip.original_channels, clip.sample_rate) == (22050, 2, 44100)
    info = sf.info(str(lib.clip_path("st")))
    assert (info.samplerate, info.channels, info.subtype) == (44100, 1, "PCM_16")
    assert abs(info.frames - 88200) <= 2 and voice.duration == pytest.approx(2.0, abs=1e-3)
    assert lib.original("st") == (data, "st.wav")
    assert lib.codes("st", enc)[0].shape == (10, math.ceil(info.frames / 2048)) and enc.encode_count == 1


def test_mp3_upload_keeps_its_format(lib, root, enc):
    if "MP3" not in sf.available_formats():
        pytest.skip("this libsndfile cannot write MP3")
    data = wav(2.0, format="MP3", subtype="MPEG_LAYER_III")
    voice = lib.add("m", data, TEXT, enc)
    assert voice.clips[0].original_format == "mp3" and (root / "voices/m/original.mp3").read_bytes() == data
    assert lib.original("m") == (data, "m.mp3")


def test_m4a_upload_is_probed_with_pyav(lib, root, enc):
    av = pytest.importorskip("av")
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=48000)
        stream.layout = "mono"
        mono = tone(2.0, 48000)
        frame = av.AudioFrame.from_ndarray(mono[None, :], format="flt", layout="mono")
        frame.sample_rate = 48000
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    try:
        voice = lib.add("m4", buf.getvalue(), TEXT, enc)
    except BadRequest as exc:
        pytest.skip(f"load_audio cannot decode m4a yet: {exc}")
    clip = voice.clips[0]
    assert (clip.original_format, clip.original_sample_rate, clip.original_channels) == ("m4a", 48000, 1)
    assert (root / "voices/m4/original.m4a").is_file()


# -- crashes and leftovers --------------------------------------------------------------------------------------
def test_init_removes_staging_leftovers_and_ignores_broken_voice_folders(lib, root, enc):
    lib.add("good", wav(1.5), TEXT, enc)
    good = {"version": 2, **lib.get("good").to_dict()}
    (root / ".staging" / "add-999999999-deadbeef").mkdir()
    (root / ".staging" / "add-999999999-deadbeef" / "clip.wav").write_bytes(b"half")
    (root / ".staging" / "stray-file").write_bytes(b"x")
    for name, meta in [("nometa", None), ("badjson", b"{not json"), ("partial", b'{"id": "partial"}'),
                       ("wrongtypes", json.dumps({**good, "clips": [{**good["clips"][0], "duration": "long"}]
                                                      }).encode()),
                           ("noclips", json.dumps({**good, "clips": []}).encode()),
                           ("future", json.dumps({**good, "version": 3}).encode()),
                           ("v1wrongtypes", json.dumps({**V1_META, "id": "v1wrongtypes", "duration": "long"}
                                                       ).encode())]:
        folder = root / "voices" / name
        folder.mkdir()
        shutil.copy(root / "voices/good/clip.wav", folder / "clip.wav")
        if meta is not None:
            (folder / "meta.json").write_bytes(meta)
    reopened = VoiceLibrary(root)
    assert staging(root) == []
    assert [v.id for v in reopened.list()] == ["good"]
    with pytest.raises(NotFound):
        reopened.get("badjson")
    assert reopened.add("badjson", wav(1.5), TEXT, enc).id == "badjson"  # a broken folder does not hold the id
    assert [v.id for v in reopened.list()] == ["badjson", "good"]


def test_init_leaves_a_live_process_staging_alone(root):
    (root / ".staging").mkdir(parents=True)
    parent = os.getppid()
    live = root / ".staging" / f"add-{parent}-{round(psutil.Process(parent).create_time() * 100)}-cafe"
    reused = root / ".staging" / f"add-{parent}-12345-cafe"  # same pid, another start time: a dead process
    live.mkdir()
    reused.mkdir()
    VoiceLibrary(root)
    assert live.is_dir() and not reused.exists()


def test_a_second_library_in_the_same_process_leaves_in_flight_work_alone(lib, root, enc, monkeypatch):
    """The server and another library object on one root: opening the second must not break the first's add."""
    real_stage = VoiceLibrary._stage

    def stage_then_open_another(self, files):
        staged = real_stage(self, files)
        VoiceLibrary(root)
        return staged

    monkeypatch.setattr(VoiceLibrary, "_stage", stage_then_open_another)
    assert lib.add("v", wav(1.5), TEXT, enc).id == "v"
    monkeypatch.undo()
    assert [v.id for v in VoiceLibrary(root).list()] == ["v"] and staging(root) == []


def test_encoder_failure_mid_add_leaves_nothing(lib, root):
    class Broken(FakeEncoder):
        def encode_audio(self, audio):
            raise RuntimeError("GPU fell over")

    before = tree(root)
    with pytest.raises(RuntimeError):
        lib.add("v", wav(1.5), TEXT, Broken())
    assert tree(root) == before and lib.list() == []


def test_failed_overwrite_keeps_the_old_voice(lib, root, enc, monkeypatch):
    old = lib.add("v", wav(1.5), "old", enc)
    real_rename = os.rename
    calls = []

    def flaky(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the new folder's rename into place
            raise OSError("disk full")
        real_rename(src, dst)

    monkeypatch.setattr("shoal.voices.os.rename", flaky)
    with pytest.raises(OSError):
        lib.add("v", wav(2.0), "new", enc, overwrite=True)
    monkeypatch.undo()
    assert lib.get("v") == old and staging(root) == []
    assert VoiceLibrary(root).list() == [old]


# A process that dies at a chosen point: die_on(obj, name, nth) ends the process on the nth call of obj.name
# (os._exit: no finally blocks, no cleanup), as a kill -9 or a power cut would.
CRASH_PRELUDE = """
import os, shutil, sys
from pathlib import Path
import shoal.voices as voices

def die_on(obj, name, nth=1):
    real, calls = getattr(obj, name), []
    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == nth:
            os._exit(17)
        return real(*args, **kwargs)
    setattr(obj, name, wrapper)

lib = voices.VoiceLibrary(Path(sys.argv[1]))
clip = Path(sys.argv[2]).read_bytes()
PNG = b"\\x89PNG\\r\\n\\x1a\\n" + bytes(64)
"""

CRASHES = {
    "while writing the staged files": 'die_on(voices, "write_durably", 3); lib.add("new", clip, "t")',
    # a two-clip voice writes clip 1's four files, then clip 2's: the 6th write is inside clip 2
    "while writing a second clip": 'die_on(voices, "write_durably", 6); lib.save("new", [(clip, "t"), (clip, "u")])',
    "between a two-clip overwrite's renames": 'die_on(os, "rename", 2); lib.save("old", [(clip, "t"), (clip, "u")], '
                                             'overwrite=True)',
    "mid-update, after the cover, before meta.json": 'die_on(voices, "atomic_write", 2); '
                                                     'lib.update("old", title="T", cover=PNG)',
    "just before publishing": 'die_on(os, "rename"); lib.add("new", clip, "t")',
    "between the overwrite's renames": 'die_on(os, "rename", 2); lib.add("old", clip, "t", overwrite=True)',
    "in the middle of a delete": 'die_on(shutil, "rmtree"); lib.delete("old")',
    "mid-rename, before meta.json": 'die_on(voices, "atomic_write"); lib.rename("old", "new")',
}


@pytest.mark.parametrize("point", sorted(CRASHES))
def test_a_process_killed_mid_write_leaves_whole_voices_or_none(root, tmp_path, enc, point):
    lib = VoiceLibrary(root)
    lib.add("old", wav(1.5), "old", enc)
    clip = tmp_path / "clip.wav"
    clip.write_bytes(wav(2.0, freq=880))
    script = CRASH_PRELUDE + CRASHES[point] + "\nsys.exit(0)\n"
    result = subprocess.run([sys.executable, "-c", script, str(root), str(clip)], capture_output=True, text=True)
    assert result.returncode == 17, result.stderr
    for library in (lib, VoiceLibrary(root)):  # the survivor, and the next process to open the library
        # Whole voices or none: the old one (perhaps under its new name), never the new upload or half of one.
        assert [v.text for v in library.list()] in ([], ["old"])
    assert staging(root) == []
    assert sorted(p.name for p in (root / "voices").iterdir()) == [v.id for v in lib.list()]
    if lib.list():
        assert np.array_equal(lib.codes(lib.list()[0].id, enc)[0], np.load(root / "voices" / lib.list()[0].id /
                                                                        "codes.npy"))
        assert enc.encode_count == 1


def test_crash_between_rename_steps_trusts_the_folder_name(lib, root, enc):
    voice = lib.add("old", wav(1.5), TEXT, enc)
    os.rename(root / "voices/old", root / "voices/new")  # the folder moved, meta.json not yet rewritten
    reopened = VoiceLibrary(root)
    assert reopened.list() == [replace(voice, id="new")]  # the title, written with meta.json, is still "old"
    assert json.loads((root / "voices/new/meta.json").read_text())["id"] == "new"  # fixed lazily
    reopened.codes("new", enc)[0]
    assert enc.encode_count == 1


# -- the real codec ---------------------------------------------------------------------------------------------
def test_real_codec_codes_are_stored_and_served_without_encoding(tmp_path, fixture_dir):
    from shoal.engines.fish import FishEngine

    engine = FishEngine.load(fixture_dir, device="cpu", precision="float32")
    seen = []  # what the one encode got and gave: a spy, so the test needs no second (slow on CPU) encode
    real_encode = engine.encode_audio

    def spy(audio):
        codes = real_encode(audio)
        seen.append((audio.copy(), codes))
        return codes

    engine.encode_audio = spy
    lib = VoiceLibrary(tmp_path)
    voice = lib.add("ref", (fixture_dir / "reference.wav").read_bytes(),
                    (fixture_dir / "reference.txt").read_text(), engine)
    assert engine.encode_count == 1 and voice.clips[0].codec_checksum == engine.codec_checksum
    (audio, expected), = seen
    assert np.array_equal(audio, load_audio(lib.clip_path("ref"), engine.sample_rate))  # it encoded clip.wav
    assert np.array_equal(expected, load_codec_golden(fixture_dir)["codes"])  # as the reference does
    assert np.array_equal(np.load(tmp_path / "voices/ref/codes.npy"), expected)
    assert np.array_equal(lib.codes("ref", engine)[0], expected)
    assert np.array_equal(VoiceLibrary(tmp_path).codes("ref", engine)[0], expected)
    assert engine.encode_count == 1


# -- several clips, details, covers ---------------------------------------------------------------------------
PNG = b"\x89PNG\r\n\x1a\n" + bytes(64)
JPEG = b"\xff\xd8\xff\xe0" + bytes(64)
WEBP = b"RIFF" + (68).to_bytes(4, "little") + b"WEBPVP8 " + bytes(56)


def test_a_voice_of_several_clips_keeps_each_clip_with_its_own_codes(lib, root, enc):
    first, second = wav(1.5, freq=220), wav(2.5, freq=660)
    details = Details(title="Narrator", description="calm", tags=("en", "calm"), visibility="public")
    voice = lib.save("duo", [(first, "One clip."), (second, " Two clips. ")], enc, details=details, cover=PNG)
    assert [c.text for c in voice.clips] == ["One clip.", "Two clips."] and enc.encode_count == 2
    assert voice.duration == pytest.approx(4.0, abs=1e-3) and voice.text == "One clip.\nTwo clips."
    cover = f"cover-{hashlib.sha256(PNG).hexdigest()[:16]}.png"
    assert voice.details == details and voice.cover == cover and voice.created == voice.updated
    folder = root / "voices" / "duo"
    assert sorted(p.name for p in folder.iterdir()) == sorted([
        "clip-2.wav", "clip.wav", "codes-2.npy", "codes.npy", cover, "meta.json", "original-2.wav",
        "original.wav", "transcript-2.txt", "transcript.txt"])
    assert (folder / "transcript-2.txt").read_text() == "Two clips."
    assert lib.original("duo", 1) == (second, "duo-2.wav") and lib.clip_path("duo", 1) == folder / "clip-2.wav"
    assert lib.cover("duo") == (PNG, "image/png")
    assert lib.clip_bytes("duo", 1) == (folder / "clip-2.wav").read_bytes()
    for call in (lib.clip_path, lib.clip_bytes, lib.original):
        with pytest.raises(NotFound, match="no clip 3"):
            call("duo", 2)
    expected = [FakeEncoder().encode_audio(load_audio(folder / name, 44100)) for name in ("clip.wav", "clip-2.wav")]
    for library in (lib, VoiceLibrary(root)):  # from memory, then from the two codes files
        codes = library.codes("duo", enc)
        assert len(codes) == 2 and all(np.array_equal(c, e) for c, e in zip(codes, expected))
    assert enc.encode_count == 2
    assert VoiceLibrary(root).get("duo") == voice


def test_each_clip_recomputes_its_own_codes_only(root, enc):
    VoiceLibrary(root).save("duo", [(wav(1.5), "one"), (wav(2.0, freq=880), "two")], enc)
    (root / "voices/duo/codes-2.npy").write_bytes(b"damaged")
    lib = VoiceLibrary(root)
    codes = lib.codes("duo", enc)
    assert enc.encode_count == 3  # clip 2 again, clip 1 read from codes.npy
    assert np.array_equal(codes[1], np.load(root / "voices/duo/codes-2.npy"))
    other = FakeEncoder(codec_checksum="new")
    lib.codes("duo", other)
    VoiceLibrary(root).codes("duo", other)
    assert other.encode_count == 2  # a new codec: both clips once, then never again
    assert [c.codec_checksum for c in VoiceLibrary(root).get("duo").clips] == ["new", "new"]


def test_clip_counts_and_details_are_checked_before_anything_is_written(lib, root, enc):
    lib.max_clips = 2
    before = tree(root)
    for clips, details, cover, error in [
        ([], None, None, "at least one clip"),
        ([(wav(1.5), "a")] * 3, None, None, "at most 2 clips"),
        ([(wav(1.5), "a"), (wav(1.5), " ")], None, None, "transcript"),
        ([(wav(1.5), "a")], Details(title=" "), None, "title"),
        ([(wav(1.5), "a")], Details(title="t", visibility="secret"), None, "visibility"),
        ([(wav(1.5), "a")], Details(title="t", tags=("x" * 65,)), None, "tags"),
        ([(wav(1.5), "a")], None, b"GIF89a" + bytes(64), "PNG, JPEG or WebP"),
        ([(wav(1.5), "a")], None, b"", "empty"),
    ]:
        with pytest.raises(BadRequest, match=error):
            lib.save("v", clips, enc, details=details, cover=cover)
    lib.max_cover_bytes = 100
    with pytest.raises(PayloadTooLarge, match="max_cover_bytes"):
        lib.save("v", [(wav(1.5), "a")], enc, cover=PNG + bytes(100))
    assert tree(root) == before and enc.encode_count == 0


def test_update_changes_details_and_cover_and_keeps_the_clips(lib, root, enc):
    voice = lib.add("v", wav(1.5), TEXT, enc)
    assert voice.details == Details(title="v") and voice.cover is None
    changed = lib.update("v", title=" New ", tags=["a", "b", "a"], cover=JPEG)
    assert changed.details == Details(title="New", tags=("a", "b")) and changed.cover.endswith(".jpeg")
    assert changed.clips == voice.clips and changed.created == voice.created and changed.updated >= voice.updated
    assert lib.update("v", description="d", cover=WEBP).details.description == "d"
    assert lib.cover("v") == (WEBP, "image/webp")
    assert [p.name for p in (root / "voices/v").glob("cover*")] == [lib.get("v").cover]  # the jpeg is gone
    assert lib.get("v").cover.endswith(".webp")
    assert VoiceLibrary(root).get("v") == lib.get("v")
    assert lib.rename("v", "w").details.title == "New" and lib.rename("w", "v").details.title == "New"
    with pytest.raises(BadRequest, match="visibility"):
        lib.update("v", visibility="everyone")
    with pytest.raises(NotFound):
        lib.update("nope", title="x")
    assert enc.encode_count == 1


#: meta.json as shoal wrote it before voices had several clips (version 1: one clip's fields at the top level).
V1_META = {"version": 1, "id": "old", "text": TEXT, "created": "2026-01-02T03:04:05+00:00", "duration": 2.0,
           "sample_rate": 44100, "original_sample_rate": 44100, "original_channels": 1, "original_format": "wav",
           "audio_sha256": "0" * 64, "text_sha256": "1" * 64, "codes_sha256": None, "codec_checksum": None}


def test_the_one_clip_layout_of_earlier_versions_is_still_read(root, enc):
    folder = root / "voices" / "old"
    folder.mkdir(parents=True)
    data = wav(2.0)
    for name in ("clip.wav", "original.wav"):
        (folder / name).write_bytes(data)
    (folder / "transcript.txt").write_text(TEXT)
    codes = FakeEncoder().encode_audio(load_audio(data, 44100))
    buf = io.BytesIO()
    np.save(buf, codes)
    (folder / "codes.npy").write_bytes(buf.getvalue())
    meta = {**V1_META, "codes_sha256": hashlib.sha256(buf.getvalue()).hexdigest(), "codec_checksum": "abc"}
    (folder / "meta.json").write_text(json.dumps(meta))
    lib = VoiceLibrary(root)
    voice = lib.get("old")
    assert [v.id for v in lib.list()] == ["old"] and voice.text == TEXT and len(voice.clips) == 1
    assert voice.details == Details(title="old") and voice.created == voice.updated == V1_META["created"]
    assert np.array_equal(lib.codes("old", enc)[0], codes) and enc.encode_count == 0  # its codes.npy, as it is
    assert lib.original("old") == (data, "old.wav")
    lib.update("old", title="Old voice")  # rewritten as the current version, clips untouched
    assert json.loads((folder / "meta.json").read_text())["version"] == 2
    assert VoiceLibrary(root).get("old").clips == voice.clips


# -- a full disk -------------------------------------------------------------------------------------------------
def fill_disk_after(monkeypatch, free: int) -> None:
    """os.write (what write_durably stages every voice file with) accepts `free` more bytes, then fails as a
    full disk does."""
    real_write, left = os.write, [free]

    def write(fd, data):
        if len(data) > left[0]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        left[0] -= len(data)
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)


def test_a_full_disk_is_insufficient_storage_and_leaves_nothing_behind(lib, root, enc, monkeypatch):
    kept = [lib.add("a", wav(1.5), "a", enc), lib.save("b", [(wav(1.5), "b"), (wav(1.5, freq=330), "c")], enc)]
    before = tree(root)
    fill_disk_after(monkeypatch, 300_000)  # room for clip 1's files of the next voice, not for clip 2's
    with pytest.raises(InsufficientStorage, match=f"the data dir {root} is out of space"):
        lib.save("c", [(wav(1.5, freq=550), "one"), (wav(1.5, freq=770), "two")], enc)
    monkeypatch.undo()
    assert tree(root) == before and staging(root) == []
    for library in (lib, VoiceLibrary(root)):
        assert library.list() == kept
        assert all(len(library.codes(v.id, enc)) == len(v.clips) for v in kept)
    assert enc.encode_count == 5  # the 3 kept clips, and the 2 of the voice that found no room; none since


def test_a_full_disk_during_an_update_changes_nothing(lib, root, enc, monkeypatch):
    voice = lib.add("v", wav(1.5), TEXT, enc)
    before = tree(root)

    def fsync(fd):  # where a delayed-allocation file system reports that the blocks never got a place
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(InsufficientStorage, match=f"the data dir {root} is out of space"):
        lib.update("v", title="New", cover=PNG)
    monkeypatch.undo()
    assert tree(root) == before and VoiceLibrary(root).get("v") == voice


def test_codes_recomputed_on_a_full_disk_are_used_though_not_stored(root, enc, monkeypatch):
    VoiceLibrary(root).add("v", wav(1.5), TEXT, enc)
    expected = np.load(root / "voices/v/codes.npy")
    (root / "voices/v/codes.npy").unlink()
    before = tree(root)
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left")))
    assert np.array_equal(VoiceLibrary(root).codes("v", enc)[0], expected)  # the voice still speaks
    monkeypatch.undo()
    assert tree(root) == before and enc.encode_count == 2  # nothing written, not even a temporary file


def test_a_full_disk_between_the_new_cover_and_meta_json_keeps_the_old_cover(lib, root, enc, monkeypatch):
    voice = lib.save("v", [(wav(1.5), TEXT)], enc, cover=PNG)
    before = tree(root)
    real_fsync, calls = os.fsync, []

    def fsync(fd):  # the new cover's file gets its blocks; meta.json's temporary file finds none
        calls.append(fd)
        if len(calls) > 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(InsufficientStorage, match=f"the data dir {root} is out of space"):
        lib.update("v", title="New", cover=JPEG)
    monkeypatch.undo()
    assert len(calls) == 2  # it failed at meta.json, after the cover was written
    assert tree(root) == before and lib.get("v") == voice and lib.cover("v") == (PNG, "image/png")


def test_libraries_sharing_a_root_never_serve_stale_codes(root, enc):
    """Two ingresses (or servers) on one shared data dir, each with its own in-memory codes: what one saves,
    replaces or deletes, the other sees on its next use, though it still holds the old codes in memory."""
    one, other = VoiceLibrary(root), VoiceLibrary(root)
    one.add("v", wav(1.5), TEXT, enc)
    first = other.codes("v", enc)
    assert np.array_equal(other.codes("v", enc)[0], first[0]) and other.codes_hits == 1  # now cached there
    one.add("v", wav(2.5, freq=330.0), "A new take.", enc, overwrite=True)
    replaced = other.codes("v", enc)
    assert not np.array_equal(replaced[0], first[0])
    assert np.array_equal(replaced[0], one.codes("v", enc)[0])
    assert enc.encode_count == 2  # each take encoded once, by the library that saved it
    one.delete("v")
    with pytest.raises(NotFound):
        other.codes("v", enc)
    one.add("v", wav(1.5), TEXT, enc)  # the first take again, under the same id: the same codes, served afresh
    assert np.array_equal(other.codes("v", enc)[0], first[0])
