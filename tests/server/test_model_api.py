"""The Fish Audio model API (`/model`) against a real server: voices of several clips made, listed, read,
changed and deleted over HTTP; spoken from at once by both speech APIs; the same voices as /v1/references;
errors the SDK can read; and a full data dir answered with 507, never a 500."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import uuid

import httpx
import pytest
import soundfile as sf

from support import noise_clip, tree

PNG = b"\x89PNG\r\n\x1a\n" + bytes(64)  # the signature is what the server checks
JPEG = b"\xff\xd8\xff\xe0" + bytes(64)
MAX_COVER_BYTES = 2 * 2**20  # the default SHOAL_MAX_COVER_BYTES
FAST = {"seed": 1, "max_new_tokens": 6}


def create(c: httpx.Client, title: str, clips: list[tuple[bytes, str]], *, tags=(), cover: bytes | None = None,
           **fields) -> httpx.Response:
    """POST /model as the SDK's voices.create sends it: repeated `voices` files, `texts` and `tags` fields."""
    files = [("voices", (f"clip{n}.wav", audio, "audio/wav")) for n, (audio, _) in enumerate(clips)]
    if cover is not None:
        files.append(("cover_image", ("cover", cover, "application/octet-stream")))
    data = {"title": title, "texts": [text for _, text in clips], "tags": list(tags), "type": "tts",
            "train_mode": "fast", "visibility": "private", "enhance_audio_quality": "true", **fields}
    return c.post("/model", data=data, files=files)


def check_sdk_error(r: httpx.Response, status: int, *words: str) -> str:
    """A `status` error in the house shape that also carries its message as the top-level `detail`, where
    both Fish Audio SDKs read it; the message contains every one of `words`."""
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error", "detail"} and body["detail"] == body["error"]["message"], body
    for word in words:
        assert word in body["detail"], body
    return body["detail"]


def test_create_read_change_and_delete_a_voice_of_two_clips(server):
    tag = f"t-{uuid.uuid4().hex[:8]}"
    with server.client() as c:
        r = create(c, "Two clips", [(noise_clip(1.5, 1), "The first clip."), (noise_clip(2.0, 2), "The second.")],
                   tags=[tag, "calm"], cover=PNG, description="a test voice")
        assert r.status_code == 200, r.text
        voice = r.json()
        voice_id = voice["_id"]
        assert re.fullmatch(r"[0-9a-f]{32}", voice_id)
        assert (voice["title"], voice["description"], voice["tags"]) == ("Two clips", "a test voice", [tag, "calm"])
        assert (voice["type"], voice["state"], voice["train_mode"], voice["visibility"]) == (
            "tts", "trained", "fast", "private")
        assert [s["text"] for s in voice["samples"]] == ["The first clip.", "The second."]
        assert [s["duration"] for s in voice["samples"]] == pytest.approx([1.5, 2.0], abs=1e-3)
        assert voice["cover_image"] == f"/model/{voice_id}/cover" and voice["created_at"] == voice["updated_at"]

        assert c.get(f"/model/{voice_id}").json() == voice
        cover = c.get(voice["cover_image"])
        assert cover.content == PNG and cover.headers["content-type"] == "image/png"
        sample = c.get(voice["samples"][1]["audio"])
        assert sample.headers["content-type"] == "audio/wav"
        assert sf.info(io.BytesIO(sample.content)).duration == pytest.approx(2.0, abs=1e-3)
        assert voice_id in c.get("/v1/references/list").json()["reference_ids"]  # one library, two APIs

        r = c.patch(f"/model/{voice_id}", data={"title": "Renamed", "visibility": "unlist"})  # form, no files
        assert r.status_code == 200, r.text
        r = c.patch(f"/model/{voice_id}", data={"tags": ["new"]}, files=[("cover_image", ("c", JPEG))])
        assert r.status_code == 200, r.text
        changed = c.get(f"/model/{voice_id}").json()
        assert (changed["title"], changed["visibility"], changed["tags"]) == ("Renamed", "unlist", ["new"])
        assert changed["samples"] == voice["samples"] and changed["created_at"] == voice["created_at"]
        assert c.get(changed["cover_image"]).content == JPEG
        assert c.patch(f"/model/{voice_id}", data={"tags": ""}).json()["tags"] == []  # one empty field clears

        assert c.delete(f"/model/{voice_id}").status_code == 200
        check_sdk_error(c.get(f"/model/{voice_id}"), 404, voice_id)
        assert voice_id not in c.get("/v1/references/list").json()["reference_ids"]


def test_a_new_voice_speaks_at_once_through_both_apis_from_all_its_clips(server):
    first, second = (noise_clip(1.5, 11), "Clip one."), (noise_clip(1.5, 12), "Clip two.")
    with server.client() as c:
        both = create(c, "Speaker", [first, second]).json()["_id"]
        only_first = create(c, "Speaker, first clip", [first]).json()["_id"]
        encodes = c.get("/v1/health").json()["counters"]["codec_encodes"]
        fish = c.post("/v1/tts", json={"text": "Hello there.", "reference_id": both, **FAST})
        openai = c.post("/v1/audio/speech", json={"input": "Hello there.", "voice": both, "response_format": "wav",
                                                  **FAST})
        alone = c.post("/v1/tts", json={"text": "Hello there.", "reference_id": only_first, **FAST})
        assert fish.status_code == openai.status_code == alone.status_code == 200, (fish.text, openai.text)
        assert fish.content == openai.content  # the same voice through either API
        assert fish.content != alone.content  # the second clip is part of the prompt
        assert c.get("/v1/health").json()["counters"]["codec_encodes"] == encodes  # codes made at upload only
        listed = {v["id"]: v for v in c.get("/v1/audio/voices").json()["voices"]}
        assert listed[both]["name"] == "Speaker" and len(listed[both]["clips"]) == 2
    # and a voice saved through /v1/references is a /model voice too
    with server.client() as c:
        r = c.post("/v1/references/add", data={"id": "from-references", "text": "Hello."},
                   files={"audio": ("a.wav", noise_clip(1.5, 13), "audio/wav")})
        assert r.status_code == 200, r.text
        voice = c.get("/model/from-references").json()
        assert voice["title"] == "from-references" and [s["text"] for s in voice["samples"]] == ["Hello."]
        assert c.delete("/model/from-references").status_code == 200


def test_listing_pages_filters_and_sorts(server):
    tag = f"page-{uuid.uuid4().hex[:8]}"
    with server.client() as c:
        ids = [create(c, title, [(noise_clip(1.2, n), "Words.")], tags=[tag, f"n{n}"]).json()["_id"]
               for n, title in enumerate(["Alpha voice", "Beta VOICE", "Gamma"])]

        def listing(**params) -> dict:
            r = c.get("/model", params={"tag": tag, **params})
            assert r.status_code == 200, r.text
            return r.json()

        everything = listing(page_size=10)
        assert everything["total"] == 3 and sorted(v["_id"] for v in everything["items"]) == sorted(ids)
        newest = sorted(everything["items"], key=lambda v: (v["created_at"], v["_id"]), reverse=True)
        assert everything["items"] == newest  # task_count, the SDK's default order: newest first here
        pages = [listing(page_size=2, page_number=n) for n in (1, 2, 3)]
        assert [p["total"] for p in pages] == [3, 3, 3] and [len(p["items"]) for p in pages] == [2, 1, 0]
        assert [v["_id"] for p in pages for v in p["items"]] == [v["_id"] for v in newest]
        assert {v["title"] for v in listing(title="voice")["items"]} == {"Alpha voice", "Beta VOICE"}
        assert [v["title"] for v in listing(tag=[tag, "n2"])["items"]] == ["Gamma"]  # every tag must match
        assert listing(sort_by="created_at", self="true")["total"] == 3
        r = c.get("/model", params={"tag": tag, "language": "en", "author_id": "x"})
        assert r.headers["x-shoal-ignored-fields"] == "author_id, language" and r.json()["total"] == 3

        for params, word in [({"page_size": 0}, "page_size"), ({"page_size": 101}, "page_size"),
                             ({"page_number": 0}, "page_number"), ({"page_number": "two"}, "page_number"),
                             ({"sort_by": "likes"}, "sort_by")]:
            check_sdk_error(c.get("/model", params=params), 400, word)
        for voice_id in ids:
            assert c.delete(f"/model/{voice_id}").status_code == 200


def test_bad_uploads_are_refused_with_messages_and_save_nothing(server):
    clip = noise_clip(1.2, 21)
    before = tree(server.data_dir)
    with server.client() as c:
        check_sdk_error(c.post("/model", data={"title": "x", "texts": ["a"]}), 400, "voices")
        check_sdk_error(create(c, "x", [(clip, "a"), (clip, "b")], texts=["a"]), 400, "one transcript",
                        "1 for 2")
        r = c.post("/model", data={"title": "x"}, files=[("voices", ("a.wav", clip))])
        check_sdk_error(r, 400, "does not transcribe")
        check_sdk_error(create(c, "x", [(clip, "a")], cover=b"GIF89a" + bytes(64)), 415, "PNG, JPEG or WebP")
        check_sdk_error(create(c, "x", [(clip, "a")], cover=PNG + bytes(MAX_COVER_BYTES)), 413, "cover image")
        check_sdk_error(create(c, "x", [(clip, "a")], type="svc"), 400, "type")
        check_sdk_error(create(c, "x", [(clip, "a")], visibility="everyone"), 400, "visibility")
        check_sdk_error(create(c, " ", [(clip, "a")]), 400, "title")
        check_sdk_error(create(c, "x", [(b"not audio at all" * 20, "a")]), 400)
        unknown = uuid.uuid4().hex
        check_sdk_error(c.get(f"/model/{unknown}"), 404, unknown)
        check_sdk_error(c.patch(f"/model/{unknown}", data={"title": "y"}), 404, unknown)
        check_sdk_error(c.delete(f"/model/{unknown}"), 404, unknown)
        check_sdk_error(c.get(f"/model/{unknown}/cover"), 404, unknown)
        check_sdk_error(c.get("/model/bad.id"), 400, "voice ids")
    assert tree(server.data_dir) == before


def test_patch_refuses_bad_details_and_keeps_the_voice(server):
    with server.client() as c:
        voice = create(c, "Keep me", [(noise_clip(1.2, 31), "Words.")]).json()
        path = f"/model/{voice['_id']}"
        check_sdk_error(c.patch(path, data={"visibility": "world"}), 400, "visibility")
        check_sdk_error(c.patch(path, files=[("cover_image", ("c", b"BM" + bytes(64)))]), 415, "PNG")
        check_sdk_error(c.patch(path, data={"title": "x" * 201}), 400, "title")
        assert c.get(path).json() == voice
        assert c.delete(path).status_code == 200


# -- a full data dir ---------------------------------------------------------------------------------------------
@pytest.fixture
def small_data_dir(tmp_path):
    """A 3 MiB tmpfs where the first extra server (make_server's srv0) keeps its data dir; unmounted after."""
    data_dir = tmp_path / "srv0" / "data"
    data_dir.mkdir(parents=True)
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(data_dir)], capture_output=True,
                           text=True)
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({mount.stderr.strip() or mount.returncode}); "
                    "test_voices.py's simulated full disk covers the library")
    try:
        yield data_dir
    finally:
        subprocess.run(["umount", "-l", str(data_dir)], check=False)


def test_a_full_data_dir_is_507_naming_it_and_keeps_the_voices_whole(small_data_dir, make_server):
    srv = make_server("--no-ui")
    assert srv.data_dir == small_data_dir
    try:
        saved, answer = [], None
        with srv.client() as c:
            for n in range(10):  # 5 s clips of about 0.9 MB stored each: the third or so finds no room
                if n % 2:
                    r = c.post("/v1/references/add", data={"id": f"ref-{n}", "text": "Five seconds of noise."},
                               files={"audio": ("a.wav", noise_clip(5.0, n), "audio/wav")})
                else:
                    r = create(c, f"voice {n}", [(noise_clip(5.0, n), "Five seconds of noise.")])
                if r.status_code != 200:
                    answer = r
                    break
                saved.append(r.json().get("reference_id") or r.json()["_id"])
            assert answer is not None and saved, "the disk never filled"
            assert answer.status_code == 507, answer.text
            error = answer.json()["error"]
            assert error["code"] == "insufficient_storage" and str(small_data_dir) in error["message"]
            check_sdk_error(create(c, "one more", [(noise_clip(5.0, 99), "Noise.")]), 507, str(small_data_dir))
            r = c.post("/v1/references/add", data={"id": "one-more", "text": "Noise."},
                       files={"audio": ("a.wav", noise_clip(5.0, 98), "audio/wav")})
            assert r.status_code == 507 and str(small_data_dir) in r.json()["error"]["message"], r.text
            # an update that needs room it cannot get: a cover larger than what is left
            free = shutil.disk_usage(small_data_dir).free
            r = c.patch(f"/model/{saved[0]}", files=[("cover_image", ("c", PNG + bytes(free + 4096)))])
            check_sdk_error(r, 507, str(small_data_dir))
            health = c.get("/v1/health").json()  # under the default min_free_disk_mb of 500
            assert health["status"] == "ok" and any(str(small_data_dir) in w for w in health["warnings"])

            listed = c.get("/v1/references/list").json()["reference_ids"]
            assert sorted(listed) == sorted(saved)
            for voice_id in saved:  # every earlier voice whole, and spoken from
                assert c.get(f"/model/{voice_id}").json()["cover_image"] == ""
                r = c.post("/v1/tts", json={"text": "Still here.", "reference_id": voice_id, **FAST})
                assert r.status_code == 200, r.text
        staging = small_data_dir / ".staging"
        assert list(staging.iterdir()) == []
        assert sorted(p.name for p in (small_data_dir / "voices").iterdir()) == sorted(saved)
        assert not list(small_data_dir.rglob("*.part")) and not list(small_data_dir.rglob("cover*"))
    finally:
        srv.stop()


def test_health_warns_when_the_data_dir_is_short_of_space(make_server):
    srv = make_server("--no-ui", env={"SHOAL_MIN_FREE_DISK_MB": str(10**12)})
    health = httpx.get(srv.url + "/v1/health").json()
    assert health["status"] == "ok"
    [warning] = health["warnings"]
    assert str(srv.data_dir) in warning and "min_free_disk_mb" in warning
