"""What every hostile case asserts: an error is a 4xx in the one JSON shape, no traceback leaves the server,
the server lives on, and nothing appears on disk that is not a valid voice."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import httpx
import numpy as np

from shoal.voices import numbered
from support import pyav_decode, tree

REPO = Path(__file__).resolve().parents[2]
API_KEY = "hostile-Key_0123456789abcdefXYZ"  # the key server's
ANCHOR = "anchor"  # the one saved voice of the open server, which no hostile request may touch
VOICE_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
VOICE_FILES = {"clip.wav", "transcript.txt", "codes.npy", "meta.json"}
# What a leaked traceback or internal detail looks like in a body.
LEAKS = ("Traceback", 'File "', '.py", line', "site-packages", "Exception in ASGI", str(REPO / "src"))
ERROR_TYPES = {"invalid_request_error", "authentication_error", "permission_error", "not_found_error",
               "conflict_error", "rate_limit_error"}


def no_leaks(server, text: str) -> None:
    for marker in (*LEAKS, str(server.root)):
        assert marker not in text, f"{marker!r} leaked into the response: {text[:500]}"


def error_keys(path: str) -> set[str]:
    """The top-level keys of an error body on `path`."""
    return {"error", "detail"} if path == "/model" or path.startswith("/model/") else {"error"}


def check_error(server, r: httpx.Response, statuses: set[int] | None = None) -> dict:
    """A 4xx (one of `statuses` if given) whose body is exactly {"error": {"message", "type", "code"}}, plus the
    message again as `detail` on the Fish Audio model API's routes (/model), where the SDKs read it."""
    assert 400 <= r.status_code < 500, f"{r.status_code}: {r.text[:500]}"
    if statuses is not None:
        assert r.status_code in statuses, f"{r.status_code} not in {statuses}: {r.text[:500]}"
    assert r.headers.get("content-type", "").startswith("application/json"), r.headers.get("content-type")
    no_leaks(server, r.text)
    body = r.json()
    assert isinstance(body, dict) and set(body) == error_keys(r.request.url.path), body
    err = body["error"]
    assert body.get("detail", err["message"]) == err["message"], body
    assert isinstance(err, dict) and set(err) == {"message", "type", "code"}, err
    assert all(isinstance(err[k], str) and err[k] for k in err), err
    assert err["type"] in ERROR_TYPES, err
    return err


def check_alive(server) -> None:
    assert server.proc.poll() is None, f"server exited with {server.proc.returncode}"
    r = server.http.get("/v1/health", timeout=30)
    assert r.status_code == 200 and r.json()["status"] == "ok", r.text[:500]


def decoded_samples(data: bytes, fmt: str) -> int:
    """How many samples an audio body decodes to (pcm: raw int16, so bytes / 2)."""
    return pyav_decode(data, fmt)[0].shape[1]


def check_audio(server, r: httpx.Response, fmt: str = "wav") -> int:
    """A 2xx whose body is real audio of the asked format (SSE: its events carry it)."""
    assert r.status_code == 200, f"{r.status_code}: {r.text[:500]}"
    ctype = r.headers.get("content-type", "")
    if ctype.startswith("text/event-stream"):
        events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
        assert events and events[-1]["type"] == "speech.audio.done", events[-1:]
        data = b"".join(base64.b64decode(e["audio"]) for e in events if e["type"] == "speech.audio.delta")
    else:
        assert ctype.startswith("audio/"), ctype
        data = r.content
    no_leaks(server, data.decode("latin-1"))
    samples = decoded_samples(data, fmt)
    assert samples > 0, f"{fmt} body of {len(data)} bytes decodes to no audio"
    return samples


# -- the disk -------------------------------------------------------------------------------------------------

def snapshot(*roots: Path) -> dict[str, tuple]:
    """Every path under `roots` with its kind and content hash; servers' logs excluded (they grow)."""
    return tree(*roots, ignore="server-*.log")


def stray_files(server) -> list[str]:
    """Anything under the server's root that is not its log, a valid voice's file, or the empty staging dir."""
    stray = []
    for p in server.root.iterdir():
        if p == server.data_dir or (p.name.startswith("server-") and p.suffix == ".log"):
            continue
        stray.append(str(p))
    for p in server.data_dir.iterdir():
        if p.name == ".staging":
            stray += [str(q) for q in p.iterdir()]
        elif p.name != "voices":
            stray.append(str(p))
    voices = server.data_dir / "voices"
    for folder in voices.iterdir() if voices.is_dir() else ():
        if not (VOICE_ID.fullmatch(folder.name) and folder.is_dir() and not folder.is_symlink()):
            stray.append(str(folder))
            continue
        names = {q.name for q in folder.iterdir()}
        try:
            meta = json.loads((folder / "meta.json").read_text())
        except (OSError, ValueError):
            stray.append(f"{folder}: no readable meta.json")
            continue
        clips = len(meta["clips"]) if meta.get("version") == 2 else 1
        expected = {numbered(name, i) for name in VOICE_FILES - {"meta.json"} for i in range(clips)} | {"meta.json"}
        if meta.get("cover"):
            expected.add(meta["cover"])
        originals = {n for n in names if re.fullmatch(r"original(-\d+)?\.[a-z0-9]+", n)}
        if names - originals != expected or len(originals) != clips:
            stray.append(f"{folder}: {sorted(names)}")
            continue
        if meta.get("id") != folder.name:
            stray.append(f"{folder}: meta.json names {meta.get('id')!r}")
    return stray


def check_valid_voice(server, voice_id: str) -> None:
    folder = server.data_dir / "voices" / voice_id
    assert folder.is_dir() and not stray_files(server), stray_files(server)
    codes = np.load(folder / "codes.npy", allow_pickle=False)
    assert codes.dtype == np.int64 and codes.ndim == 2 and codes.shape[0] == 10 and codes.shape[1] > 0
