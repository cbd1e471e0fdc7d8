"""`shoal download`: fails fast and clearly without a hub, and only ever leaves complete checkpoints behind.

The real hub is never contacted. The failure cases run against this offline machine (or with HF_HUB_OFFLINE=1);
the success and refusal cases run against a small fake hub on loopback (HF_ENDPOINT), which answers the three
requests huggingface_hub makes: model info, file HEAD and file GET.
"""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from shoal.download import default_directory, explain_hub_error, next_step, run_download, verify_checkpoint_files
from shoal.errors import BadRequest, CheckpointError, Unavailable
from shoal.layout import CHECKPOINT_FILES

from support import shoal

REPO = "fishaudio/openaudio-s1-mini"
S2_REPO = "fishaudio/s2-pro"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
FILES = {name: f"contents of {name}\n".encode() * 50 for name in (*CHECKPOINT_FILES, "codec_config.yaml")}
S2_SHARDS = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
S2_FILES = {**{name: f"contents of {name}\n".encode() * 50
               for name in ("tokenizer.json", "tokenizer_config.json", "codec.pth", "README.md", *S2_SHARDS)},
            "config.json": json.dumps({"model_type": "fish_qwen3_omni"}).encode(),
            "model.safetensors.index.json": json.dumps({"weight_map": {"a": S2_SHARDS[0], "b": S2_SHARDS[1]}}).encode()}


def shoal_download(*args: str, cwd: Path, env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess,
                                                                                        float]:
    start = time.perf_counter()
    proc = shoal("download", *args, cwd=cwd, drop=("HF_", "SHOAL_"), timeout=60,
                 env={"HF_HOME": str(cwd / ".hf-home"), "HF_HUB_DISABLE_TELEMETRY": "1", **(env or {})})
    return proc, time.perf_counter() - start


def assert_one_line_failure(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("shoal: error: ") and "Traceback" not in proc.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def nothing_complete_under(root: Path) -> bool:
    """No directory under `root` holds all five checkpoint files."""
    return not any(all((d / name).is_file() for name in CHECKPOINT_FILES) for d in [root, *root.rglob("*")]
                   if d.is_dir())


# -- without a hub -------------------------------------------------------------------------------------------------
def test_offline_flag_fails_fast_with_one_line(tmp_path):
    proc, seconds = shoal_download(cwd=tmp_path, env={"HF_HUB_OFFLINE": "1"})
    assert_one_line_failure(proc, "HF_HUB_OFFLINE", "checkpoints/openaudio-s1-mini")
    assert seconds < 30
    assert not (tmp_path / "checkpoints").exists() and nothing_complete_under(tmp_path)


def test_unreachable_hub_fails_fast_with_one_line(tmp_path):
    # A real attempt: this machine has no route to huggingface.co.
    proc, seconds = shoal_download(REPO, "--dir", "ckpt", cwd=tmp_path)
    assert_one_line_failure(proc, "cannot reach the Hugging Face hub", "ckpt")
    assert seconds < 30
    assert not (tmp_path / "ckpt").exists() and nothing_complete_under(tmp_path)


def test_a_refused_connection_is_a_network_error(tmp_path):
    proc, seconds = shoal_download("--dir", "ckpt", cwd=tmp_path, env={"HF_ENDPOINT": "http://127.0.0.1:9"})
    assert_one_line_failure(proc, "cannot reach the Hugging Face hub")
    assert seconds < 30


@pytest.mark.slow
def test_a_hub_that_never_answers_times_out_within_30_seconds(tmp_path):
    # The kernel completes the handshake on a listening socket that nobody serves: the request then hangs.
    with socket.create_server(("127.0.0.1", 0)) as silent:
        env = {"HF_ENDPOINT": f"http://127.0.0.1:{silent.getsockname()[1]}"}
        proc, seconds = shoal_download("--dir", "ckpt", cwd=tmp_path, env=env)
    assert_one_line_failure(proc, "cannot reach the Hugging Face hub")
    assert seconds < 30
    assert not (tmp_path / "ckpt").exists()


def test_a_malformed_repo_name_is_a_bad_request(tmp_path):
    with pytest.raises(BadRequest, match="owner/name"):
        run_download("not a repo", tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()


# -- the verification ----------------------------------------------------------------------------------------------
def write_files(directory: Path, files: dict[str, bytes]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return directory


def test_verification_passes_a_complete_directory(tmp_path):
    directory = write_files(tmp_path / "ckpt", FILES)
    assert verify_checkpoint_files(directory) == directory
    assert verify_checkpoint_files(directory, {n: len(d) for n, d in FILES.items()}) == directory


def test_verification_names_missing_empty_and_short_files(tmp_path):
    directory = write_files(tmp_path / "ckpt", FILES)
    (directory / "codec.pth").unlink()
    (directory / "special_tokens.json").write_bytes(b"")
    with pytest.raises(CheckpointError) as info:
        verify_checkpoint_files(directory, {"model.pth": len(FILES["model.pth"]) + 1})
    message = str(info.value)
    assert "codec.pth is missing" in message and "special_tokens.json is empty" in message
    assert "model.pth has" in message and "config.json" not in message


def test_defaults_and_next_step(tmp_path, monkeypatch):
    """Plain `shoal serve` only when it would find the target: the first default place that exists."""
    monkeypatch.chdir(tmp_path)
    assert default_directory(REPO) == Path("checkpoints/openaudio-s1-mini")
    assert default_directory(S2_REPO) == Path("checkpoints/s2-pro")
    s1, s2 = Path("checkpoints/openaudio-s1-mini"), Path("checkpoints/s2-pro")
    s2.mkdir(parents=True)
    assert next_step(s2).startswith("next: shoal serve ")
    s1.mkdir()
    assert next_step(s1).startswith("next: shoal serve ")
    assert next_step(s2) == f"next: shoal serve --checkpoint {s2}"
    assert next_step(Path("/somewhere/else")) == "next: shoal serve --checkpoint /somewhere/else"


def test_a_full_disk_is_reported_as_such(tmp_path):
    error = explain_hub_error(OSError(28, "No space left on device"), REPO, tmp_path / "ckpt")
    assert "No space left on device" in str(error) and "--dir" in str(error)
    error = explain_hub_error(ConnectionResetError(104, "Connection reset by peer"), REPO, tmp_path / "x",
                              partial=tmp_path / ".x.partial")
    assert isinstance(error, Unavailable) and "resume" in str(error)


# -- against a fake hub on loopback --------------------------------------------------------------------------------
class FakeHub(BaseHTTPRequestHandler):
    """model info, HEAD and GET of files, and the hub's error headers for gated and unknown repositories."""

    files: dict[str, bytes] = FILES
    repo = REPO
    gated = False

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:
        self._answer(body=True)

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def _answer(self, body: bool) -> None:
        path = self.path.split("?")[0]
        if path.startswith("/api/models/"):
            if not path.startswith(f"/api/models/{self.repo}"):
                return self._error(404, "RepoNotFound")
            siblings = [{"rfilename": n, "size": len(d)} for n, d in self.files.items()]
            return self._send(200, json.dumps({"id": self.repo, "sha": COMMIT, "siblings": siblings}).encode(),
                              {"Content-Type": "application/json"}, body)
        prefix = f"/{self.repo}/resolve/{COMMIT}/"
        if not path.startswith(prefix) or path[len(prefix):] not in self.files:
            return self._error(404, "EntryNotFound")
        if self.gated:
            return self._error(403, "GatedRepo")
        data = self.files[path[len(prefix):]]
        headers = {"X-Repo-Commit": COMMIT, "ETag": f'"{hashlib.sha1(data).hexdigest()}"',
                   "Content-Type": "application/octet-stream"}
        self._send(200, data, headers, body)

    def _error(self, status: int, code: str) -> None:
        self._send(status, json.dumps({"error": code}).encode(), {"X-Error-Code": code,
                                                                 "Content-Type": "application/json"}, True)

    def _send(self, status: int, data: bytes, headers: dict[str, str], body: bool) -> None:
        self.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(data))}.items():
            self.send_header(key, value)
        self.end_headers()
        if body:
            self.wfile.write(data)


@pytest.fixture
def fake_hub():
    handler = type("Hub", (FakeHub,), {})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield handler, {"HF_ENDPOINT": f"http://127.0.0.1:{server.server_address[1]}", "HF_HUB_DISABLE_XET": "1"}
    server.shutdown()
    server.server_close()


def test_download_from_the_hub_lands_complete_in_the_default_place(tmp_path, fake_hub):
    _, env = fake_hub
    proc, _ = shoal_download(cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    target = tmp_path / "checkpoints" / "openaudio-s1-mini"
    for name, data in FILES.items():
        assert (target / name).read_bytes() == data
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["openaudio-s1-mini"]  # no partial
    assert not (target / ".cache").exists()
    assert f"to {Path('checkpoints/openaudio-s1-mini')}" in proc.stdout and "next: shoal serve" in proc.stdout
    again, _ = shoal_download(cwd=tmp_path, env=env)
    assert again.returncode == 0 and "nothing to download" in again.stdout


def test_codec_config_is_optional_and_other_files_in_the_target_stay(tmp_path, fake_hub):
    hub, env = fake_hub
    hub.files = {k: v for k, v in FILES.items() if k != "codec_config.yaml"}
    write_files(tmp_path / "mine", {"notes.txt": b"keep me", "model.pth": b"old"})
    proc, _ = shoal_download("--dir", "mine", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "mine" / "notes.txt").read_bytes() == b"keep me"
    assert (tmp_path / "mine" / "model.pth").read_bytes() == FILES["model.pth"]
    assert not (tmp_path / "mine" / "codec_config.yaml").exists()
    assert "next: shoal serve --checkpoint mine" in proc.stdout


def test_gated_repo_says_accept_the_licence_and_set_hf_token(tmp_path, fake_hub):
    hub, env = fake_hub
    hub.gated = True
    proc, _ = shoal_download(cwd=tmp_path, env=env)
    assert_one_line_failure(proc, "gated", "HF_TOKEN", "licence")
    assert not (tmp_path / "checkpoints").exists()


def test_unknown_repo_says_so(tmp_path, fake_hub):
    _, env = fake_hub
    proc, _ = shoal_download("someone/no-such-model", cwd=tmp_path, env=env)
    assert_one_line_failure(proc, "no repository someone/no-such-model")
    assert proc.returncode == 3


def test_a_repo_without_the_checkpoint_files_is_refused(tmp_path, fake_hub):
    hub, env = fake_hub
    hub.files = {"config.json": b"{}", "README.md": b"hi"}
    proc, _ = shoal_download(cwd=tmp_path, env=env)
    assert_one_line_failure(proc, "neither an S1 checkpoint", "model.pth", "nor an S2-Pro one",
                            "model.safetensors.index.json")
    assert not (tmp_path / "checkpoints").exists()


def test_an_s2_pro_repository_lands_with_every_shard_its_index_names(tmp_path, fake_hub):
    hub, env = fake_hub
    hub.files, hub.repo = S2_FILES, S2_REPO
    proc, _ = shoal_download(S2_REPO, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    target = tmp_path / "checkpoints" / "s2-pro"
    for name, data in S2_FILES.items():
        if name != "README.md":  # not a checkpoint file: left on the hub
            assert (target / name).read_bytes() == data
    assert not (target / "README.md").exists()
    assert "an s2-pro checkpoint" in proc.stdout and "next: shoal serve" in proc.stdout


def test_an_s2_pro_download_missing_a_shard_is_not_complete(tmp_path):
    """The index names the shards: one that did not arrive fails verification, whatever the hub listed."""
    write_files(tmp_path, {k: v for k, v in S2_FILES.items() if k != S2_SHARDS[1]})
    with pytest.raises(CheckpointError, match=f"{S2_SHARDS[1]} is missing"):
        verify_checkpoint_files(tmp_path, kind="s2")
