"""Helpers shared by the tests: the golden fixture's files, test clips, decoding, directory snapshots, the CLI as a
subprocess, and server factories. One place for each, so the tests cannot drift apart.

Importable as `from support import ...` from any test: pytest's default ("prepend") import mode puts the directory
of the rootdir conftest (tests/) on sys.path, as for `asr`. The server process itself is `shoal.testing.Server`,
in the package, because `bench/soak.py` drives it too.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import av
import numpy as np
import soundfile as sf

from shoal.engines.base import Reference, SynthesisRequest
from shoal.testing import Server

# -- the golden fixture (tests/fixtures/fish-s1-tiny, the `fixture_dir` fixture) ----------------------------------


def load_requests(fixture_dir: Path) -> list[dict]:
    """The golden requests of requests.json, in order (each names its outputs' file, `gen_<name>.npz`)."""
    return json.loads((fixture_dir / "requests.json").read_text())["requests"]


def load_request(fixture_dir: Path, name: str) -> dict:
    return next(r for r in load_requests(fixture_dir) if r["name"] == name)


def load_golden(fixture_dir: Path, request: dict | str):
    """The reference's outputs for one golden request (a request dict or its name), as `np.load` gives them:
    `prompt`, `generated`, `codes`, `audio`, and for the captured requests their sampling internals."""
    file = f"gen_{request}.npz" if isinstance(request, str) else request["file"]
    return np.load(fixture_dir / file)


#: Each fixture's codec as fish-speech wrote it ("0.1": with the RoPE tables and masks, the S1 fixture's; "2.0":
#: the weights alone, the S2 fixture's) and in the other layout.
CODEC_LAYOUTS = {"s1": "0.1", "s2": "2.0"}


def with_codec_layout(fixture_dir: Path, layout: str, dest: Path) -> Path:
    """`dest`: the fixture checkpoint with its codec.pth re-saved in the fish-speech `layout` ("0.1" or "2.0"),
    the same weights; every other file is a symlink to the fixture's. The fixture's own layout gives the fixture."""
    import torch

    from shoal.fish.checkpoint import read_codec_config
    from shoal.fish.codec import Codec
    from shoal.testing import with_derived_buffers, without_derived_buffers

    dest.mkdir(parents=True, exist_ok=True)
    for entry in fixture_dir.iterdir():
        if entry.name != "codec.pth" and not (dest / entry.name).exists():
            (dest / entry.name).symlink_to(entry)
    weights = without_derived_buffers(torch.load(fixture_dir / "codec.pth", map_location="cpu", weights_only=True))
    if layout == "0.1":
        with torch.device("meta"):
            model = Codec(read_codec_config(fixture_dir))
        weights = with_derived_buffers(model, weights)
    torch.save(weights, dest / "codec.pth")
    return dest


def other_codec_layout(kind: str) -> str:
    return "2.0" if CODEC_LAYOUTS[kind] == "0.1" else "0.1"


def load_codec_golden(fixture_dir: Path) -> dict[str, np.ndarray]:
    """The reference codec on the fixture's reference.wav (codec.npz): its `audio` as loaded, its `codes`, and
    those codes `decoded`."""
    return dict(np.load(fixture_dir / "codec.npz"))


def as_request(fixture_dir: Path, req: dict) -> SynthesisRequest:
    """A golden request as the engines take it."""
    refs = ()
    if req["reference"]:
        refs = (Reference((fixture_dir / req["reference"]).read_bytes(), req["reference_text"]),)
    return SynthesisRequest(text=req["text"], references=refs, seed=req["seed"], temperature=req["temperature"],
                            top_p=req["top_p"], repetition_penalty=req["repetition_penalty"],
                            max_new_tokens=req["max_new_tokens"], chunk_length=req["chunk_length"])


# -- the S2 golden fixture (tests/fixtures/fish-s2-tiny, the `s2_fixture_dir` fixture) ----------------------------
#: The requests' reference keys: the clip, its transcript file and its codes in codec.npz.
CLIPS = {"a": ("reference.wav", "reference.txt", "codes"), "b": ("reference_b.wav", "reference_b.txt", "codes_b")}


def s2_requests(fixture_dir: Path) -> list[dict]:
    return json.loads((fixture_dir / "requests.json").read_text())["requests"]


def transcript(fixture_dir: Path, key: str) -> str:
    """A clip's transcript as the reference was given it: its file's text without the file's final newline."""
    return (fixture_dir / CLIPS[key][1]).read_text(encoding="utf-8").removesuffix("\n")


def reference_codes(fixture_dir: Path, key: str) -> np.ndarray:
    """A clip's codes as the reference's codec encoded them (codec.npz)."""
    return np.load(fixture_dir / "codec.npz")[CLIPS[key][2]]


def batch_outputs(golden, key: str) -> list[np.ndarray]:
    """`key` of every batch of a golden request, in order: `key`, `key_1`, `key_2`, ..."""
    out = [golden[key]]
    while f"{key}_{len(out)}" in golden.files:
        out.append(golden[f"{key}_{len(out)}"])
    return out


def as_s2_request(fixture_dir: Path, req: dict, codes: bool = False) -> SynthesisRequest:
    """A golden request as the engine takes it: its clips as audio bytes (encoded by the engine's codec) or, with
    `codes`, as the reference's codes."""
    refs = tuple(Reference(None if codes else (fixture_dir / CLIPS[k][0]).read_bytes(), transcript(fixture_dir, k),
                           codes=reference_codes(fixture_dir, k) if codes else None)
                 for k in req["references"])
    return SynthesisRequest(text=req["text"], references=refs, seed=req["seed"], temperature=req["temperature"],
                            top_p=req["top_p"], max_new_tokens=req["max_new_tokens"],
                            chunk_length=req["chunk_length"])


# -- clips ------------------------------------------------------------------------------------------------------


def tone(seconds: float, rate: int = 44100, freq: float = 440.0, amplitude: float = 0.3) -> np.ndarray:
    """A sine, mono float32."""
    n = int(round(seconds * rate))
    return (amplitude * np.sin(2 * np.pi * freq * np.arange(n) / rate)).astype(np.float32)


def audio_file(audio: np.ndarray, rate: int, format: str = "WAV", subtype: str | None = None) -> bytes:
    """`audio` (`[n]` or `[n, channels]`) written by libsndfile in `format` (its default subtype unless given:
    PCM_16 for WAV and FLAC)."""
    buf = io.BytesIO()
    sf.write(buf, audio, rate, format=format, subtype=subtype)
    return buf.getvalue()


def tone_clip(seconds: float = 2.0, rate: int = 44100, *, freq: float = 440.0, channels: int = 1,
              format: str = "WAV", subtype: str | None = "PCM_16") -> bytes:
    """A tone as an audio file; with several channels, channel c carries it at (c + 1) / channels of the level,
    so no two channels are alike."""
    mono = tone(seconds, rate, freq)
    return audio_file(np.stack([mono * (c + 1) / channels for c in range(channels)], axis=1), rate, format, subtype)


def noise_clip(seconds: float, seed: int = 0, rate: int = 44100) -> bytes:
    """White noise (std 0.1) as a 16-bit WAV, the same bytes for the same seed."""
    noise = 0.1 * np.random.default_rng(seed).standard_normal(int(rate * seconds))
    return audio_file(noise.astype(np.float32), rate)


def pyav_decode(data: bytes, fmt: str | None = None, rate: int | None = None) -> tuple[np.ndarray, int | None]:
    """(float32 samples `[channels, n]`, sample rate) as FFmpeg decodes `data` through PyAV; 16-bit samples scaled
    by 1/32768. `fmt="pcm"` has no header: raw 16-bit mono, at `rate` (what it claims to be)."""
    if fmt == "pcm":
        assert len(data) % 2 == 0, f"a pcm body of {len(data)} bytes: not whole 16-bit samples"
        return (np.frombuffer(data, "<i2").astype(np.float32) / 32768)[None], rate
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        rate = stream.rate
        chunks = []
        for frame in container.decode(stream):
            samples, channels = frame.to_ndarray(), len(frame.layout.channels)
            chunks.append(samples.reshape(channels, -1) if frame.format.is_planar else samples.reshape(-1, channels).T)
            rate = frame.sample_rate
        channels = stream.codec_context.channels
    samples = np.concatenate(chunks, axis=1) if chunks else np.zeros((channels, 0), np.float32)
    if samples.dtype == np.int16:
        samples = samples.astype(np.float32) / 32768
    return samples.astype(np.float32), rate


# -- the disk -----------------------------------------------------------------------------------------------------


def tree(*roots: Path, ignore: str | None = None) -> dict[str, tuple]:
    """Every path under `roots` (named `<root name>/<relative path>`) with its kind and, for files, a hash of the
    contents: what a test compares before and after. Names at a root's top matching the glob `ignore` are left
    out (a server's log, which grows); a root that does not exist contributes nothing."""
    out = {}
    for root in map(Path, roots):
        for p in sorted(root.rglob("*")):
            if ignore is not None and p.parent == root and fnmatch.fnmatch(p.name, ignore):
                continue
            rel = f"{root.name}/{p.relative_to(root)}"
            if p.is_symlink():
                out[rel] = ("link", str(p.readlink()))
            elif p.is_dir():
                out[rel] = ("dir",)
            else:
                out[rel] = ("file", hashlib.sha256(p.read_bytes()).hexdigest())
    return out


# -- processes ----------------------------------------------------------------------------------------------------

#: Environment variables of this machine that a run "as a user" must not see: its shoal settings and any
#: PYTHONPATH (which would also decide which shoal is imported).
MACHINE_SETTINGS = ("SHOAL_", "PYTHONPATH")


def shoal(*args: str, cwd: Path | None = None, drop: tuple[str, ...] = (), env: dict[str, str | None] | None = None,
          timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m shoal ARGS` as a user runs it: a real subprocess, its output captured as text. Variables whose
    names start with one of `drop` are left out of its environment, then `env` is laid over it (None: unset)."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith(drop)} if drop else dict(os.environ)
    for key, value in (env or {}).items():
        if value is None:
            environ.pop(key, None)
        else:
            environ[key] = value
    return subprocess.run([sys.executable, "-m", "shoal", *args], cwd=cwd, env=environ, capture_output=True,
                          text=True, timeout=timeout)


def shoal_as_user(*args: str, cwd: Path, pythonpath: Path | str | None = None, env: dict[str, str] | None = None,
                  timeout: float = 300) -> subprocess.CompletedProcess:
    """`shoal` as a user runs it in the folder `cwd`, away from this machine's settings (MACHINE_SETTINGS): its
    data dir at cwd/data, a PYTHONPATH only if one is given, then `env`."""
    return shoal(*args, cwd=cwd, drop=MACHINE_SETTINGS, timeout=timeout,
                 env={"SHOAL_DATA_DIR": str(Path(cwd) / "data"),
                      "PYTHONPATH": None if pythonpath is None else str(pythonpath), **(env or {})})


@contextlib.contextmanager
def server_factory(root: Path, checkpoint: Path | None) -> Iterator[Callable[..., Server]]:
    """`make(*flags, env=None, checkpoint=<checkpoint>, wait=True)` starts a server under `root/srvN` (`wait=False`:
    spawned, not waited for); every one started is stopped on leaving the block."""
    started: list[Server] = []
    default = checkpoint

    def make(*extra: str, env: dict | None = None, checkpoint: Path | None = default, wait: bool = True) -> Server:
        srv = Server(checkpoint, root / f"srv{len(started)}", *extra, env=env).spawn()
        started.append(srv)
        return srv.wait_ready() if wait else srv

    try:
        yield make
    finally:
        for srv in started:
            srv.stop()


# -- the live WebSocket (/v1/tts/live) ------------------------------------------------------------------------------

#: Seconds a test waits for the server's next live message before it fails (a hang, never a speed check).
LIVE_RECEIVE_TIMEOUT = 120.0


@contextlib.contextmanager
def live_socket(url: str, headers: dict | None = None):
    """A client WebSocket on the server's `/v1/tts/live` (httpx-ws, what the fishaudio SDK uses)."""
    import httpx
    from httpx_ws import connect_ws

    with httpx.Client(base_url=url, timeout=LIVE_RECEIVE_TIMEOUT) as client:
        with connect_ws("/v1/tts/live", client=client, headers=dict(headers or {})) as ws:  # it adds to them
            yield ws


def live_send(ws, event: str, **fields) -> None:
    import ormsgpack

    ws.send_bytes(ormsgpack.packb({"event": event, **fields}))


def live_receive(ws) -> dict:
    """The next server event (msgpack map)."""
    import ormsgpack

    return ormsgpack.unpackb(ws.receive_bytes(timeout=LIVE_RECEIVE_TIMEOUT))


def live_until_finish(ws) -> tuple[bytes, dict]:
    """(the audio bytes of every `audio` event, the `finish` event that ended them)."""
    audio = []
    while (event := live_receive(ws))["event"] != "finish":
        assert event["event"] == "audio" and isinstance(event["audio"], bytes), event
        audio.append(event["audio"])
    return b"".join(audio), event


def live_close_code(ws) -> int:
    """Read until the server closes the socket; its close code."""
    from httpx_ws import WebSocketDisconnect

    try:
        while True:
            ws.receive(timeout=LIVE_RECEIVE_TIMEOUT)
    except WebSocketDisconnect as exc:
        return exc.code


def wait_healthy(url: str, timeout: float = 180.0) -> None:
    """Until `url`/v1/health answers 200 (a server or a Serve application coming up); fails the test after
    `timeout` seconds."""
    import httpx
    import pytest

    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{url}/v1/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"{url} did not become healthy in {timeout:g} s")
        time.sleep(0.5)
