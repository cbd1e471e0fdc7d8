"""The container image: built by deploy/container/build-offline (no registry), then run as built, with the
image's own entrypoint, command, user, environment and working directory, under buildah's chroot isolation
(the host's network, so the servers listen on 127.0.0.1 only). One image for the whole module."""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import psutil
import pytest
import soundfile as sf
import yaml

from shoal.testing import free_port

REPO = Path(__file__).resolve().parents[1]
BUILD_OFFLINE = REPO / "deploy" / "container" / "build-offline"
FIXTURE = REPO / "tests" / "fixtures" / "fish-s1-tiny"
TAG = os.environ.get("SHOAL_CONTAINER_TAG", "localhost/shoal:test")
START_TIMEOUT = 300  # torch and the piper voice load on 2 busy cores

pytestmark = [pytest.mark.container, pytest.mark.slow]


def buildah_unusable() -> str | None:
    """Why the image cannot be built here, or None."""
    if shutil.which("buildah") is None:
        return "buildah is not installed (apt-get install buildah debootstrap, as .ci/run does)"
    if os.geteuid() != 0:
        return "build-offline needs root (debootstrap, buildah's chroot isolation)"
    proc = subprocess.run(["buildah", "images", "-q"], capture_output=True, text=True)
    if proc.returncode != 0:
        return f"buildah is unusable here: {(proc.stderr.strip().splitlines() or ['?'])[-1]}"
    return None


def buildah(*args: str, check: bool = True) -> str:
    proc = subprocess.run(["buildah", *args], capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"buildah {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout.strip()


class Image:
    def __init__(self, tag: str, build_seconds: float):
        self.tag = tag
        self.build_seconds = build_seconds
        info = json.loads(buildah("inspect", "--type", "image", tag))
        self.config = info["Docker"]["config"]  # docker format: it keeps HEALTHCHECK
        self.size_text = buildah("images", "--format", "{{.Size}}", tag)


@pytest.fixture(scope="session")
def image(tmp_path_factory) -> Image:
    reason = buildah_unusable()
    if reason:
        pytest.skip(reason)
    log = tmp_path_factory.mktemp("build") / "build-offline.log"
    start = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.run([sys.executable, str(BUILD_OFFLINE), "--tag", TAG], stdout=out,
                              stderr=subprocess.STDOUT, timeout=1800)
    if proc.returncode != 0:
        pytest.fail(f"build-offline failed ({proc.returncode}):\n" + log.read_text()[-4000:])
    return Image(TAG, time.monotonic() - start)


class Container:
    """One `buildah from` container of the image, run as the image says: ENTRYPOINT + CMD, as its USER."""

    def __init__(self, image: Image, data: Path, *, checkpoints: Path | None = None, env: dict | None = None):
        self.image = image
        self.port = free_port()
        self.name = f"shoal-test-{uuid.uuid4().hex[:8]}"
        self.data = data
        self.checkpoints = checkpoints
        self.env = {"SHOAL_HOST": "127.0.0.1", "SHOAL_PORT": str(self.port), **(env or {})}
        self.log = data.parent / f"{self.name}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def run_args(self, *command: str) -> list[str]:
        volumes = ["--volume", f"{self.data}:/data"]
        if self.checkpoints:
            volumes += ["--volume", f"{self.checkpoints}:/checkpoints:ro"]
        return ["buildah", "run", "--isolation", "chroot", "--user", self.image.config["User"], *volumes,
                self.name, "--", *command]

    def create(self) -> "Container":
        buildah("from", "--pull=never", "--name", self.name, self.image.tag)
        # buildah 1.28's `run --isolation chroot` leaves the image's VOLUME paths empty instead of bind-mounting
        # over them when it is given two --volume mounts; the working container drops its VOLUME entries so that
        # the mounts land there, as `docker run -v` mounts over them. The image itself keeps them.
        volumes = [a for path in self.image.config.get("Volumes") or {} for a in ("--volume", f"{path}-")]
        buildah("config", *volumes, *(a for k, v in self.env.items() for a in ("--env", f"{k}={v}")), self.name)
        return self

    def start(self) -> "Container":
        self.create()
        command = [*(self.image.config.get("Entrypoint") or []), *(self.image.config.get("Cmd") or [])]
        self.proc = subprocess.Popen(self.run_args(*command), stdout=open(self.log, "ab"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"the container exited ({self.proc.returncode}):\n{self.tail()}"
            try:
                if httpx.get(self.url + "/v1/health", timeout=5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(1)
        raise AssertionError(f"/v1/health did not answer 200 within {START_TIMEOUT} s:\n{self.tail()}")

    def server_process(self) -> psutil.Process:
        """The process that listens on the port: the entrypoint, as the container's PID 1 would be."""
        for child in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                if any(c.laddr.port == self.port and c.status == psutil.CONN_LISTEN for c in child.net_connections()):
                    return child
            except psutil.Error:
                continue
        raise AssertionError("no process of the container listens on its port")

    def exec(self, *command: str) -> subprocess.CompletedProcess:
        """Another command in the same container (as HEALTHCHECK runs), as the image's user."""
        return subprocess.run(self.run_args(*command), capture_output=True, text=True, timeout=120)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""

    def stop(self) -> int:
        """SIGTERM to the server, as `docker stop` sends it; its exit status as the container's."""
        self.server_process().send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)

    def remove(self) -> None:
        if self.proc and self.proc.poll() is None:
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                child.kill()
            self.proc.wait(timeout=30)
        buildah("rm", self.name, check=False)


@pytest.fixture
def data_dir(tmp_path) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    os.chown(data, 1000, 1000)  # a host directory the image's user owns, as a docker named volume would be
    return data


# -- the image as built ---------------------------------------------------------------------------------------
def test_image_config(image):
    config = image.config
    user = config["User"]
    assert user.split(":")[0] not in ("", "0", "root") and user.split(":")[0].isdigit(), user  # numeric: k8s runAsNonRoot
    assert config["Entrypoint"] == ["shoal"] and config["Cmd"] == ["serve"]
    assert {"8080/tcp", "10200/tcp"} <= set(config["ExposedPorts"])
    assert {"/data", "/checkpoints"} <= set(config["Volumes"])
    assert config["Healthcheck"]["Test"] == ["CMD", "shoal-healthcheck"]
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["SHOAL_DATA_DIR"] == "/data" and env["SHOAL_HOST"] == "0.0.0.0" and env["SHOAL_PORT"] == "8080"
    assert env["HF_HOME"].startswith("/data/") and env["XDG_CACHE_HOME"].startswith("/data/")
    print(f"\nimage {image.tag}: {image.size_text}, "
          f"build-offline took {image.build_seconds:.0f} s", file=sys.__stderr__)


def test_image_holds_cpu_torch_and_nothing_of_the_hosts_pip(image, tmp_path):
    name = f"shoal-test-{uuid.uuid4().hex[:8]}"
    buildah("from", "--pull=never", "--name", name, image.tag)
    try:
        proc = subprocess.run(["buildah", "run", "--isolation", "chroot", name, "--", "python", "-c",
                               "import torch, sys; print(torch.__version__, torch.version.cuda)"],
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        version, cuda = proc.stdout.split()
        assert version.startswith("2.13.0") and cuda == "None", proc.stdout  # the CPU build, not PyPI's CUDA one
        login = subprocess.run(["buildah", "run", "--isolation", "chroot", "--user", image.config["User"], name, "--",
                                "bash", "-lc", "command -v shoal"], capture_output=True, text=True)
        assert login.stdout.strip() == "/usr/local/bin/shoal", login.stdout + login.stderr  # KubeRay's bash -lc
        pip = subprocess.run(["buildah", "run", "--isolation", "chroot", name, "--", "pip", "config", "list"],
                             capture_output=True, text=True)
        assert pip.returncode == 0 and pip.stdout.strip() == "", pip.stdout + pip.stderr
        root = Path(buildah("mount", name))
        try:
            for path in ("run/host-pip", "etc/pip.conf", "etc/xdg/pip", "root/.config/pip", "root/.pip",
                         "opt/wheels", "opt/pypi", "opt/pypi-more", "root/.cache/pip", "src"):
                assert not (root / path).exists(), f"/{path} is in the image"
            for tool in ("gcc", "cc", "make", "apt-get.real"):
                assert not (root / "usr/bin" / tool).exists(), f"build tool {tool} is in the image"
            host_ca = Path("/etc/ssl/certs/ca-certificates.crt")
            image_ca = root / "etc/ssl/certs/ca-certificates.crt"
            assert image_ca.is_file()  # Debian's own bundle: `shoal download` reaches the hub over TLS
            if host_ca.is_file() and host_ca.read_bytes().count(b"BEGIN CERT") > image_ca.read_bytes().count(b"BEGIN CERT"):
                assert hashlib.sha256(host_ca.read_bytes()).digest() != hashlib.sha256(image_ca.read_bytes()).digest()
        finally:
            buildah("umount", name, check=False)
    finally:
        buildah("rm", name, check=False)


# -- the image running ----------------------------------------------------------------------------------------
def test_serves_speech_as_non_root_and_stops_with_0_on_sigterm(image, data_dir):
    box = Container(image, data_dir).start()
    try:
        health = httpx.get(box.url + "/v1/health").json()
        assert health["status"] == "ok" and health["default_model"] == "piper", health
        server = box.server_process()
        assert server.uids().real != 0 and server.uids().effective == int(image.config["User"].split(":")[0])
        assert Path(server.cmdline()[0]).name.startswith("python") and server.cmdline()[1].endswith("shoal")

        r = httpx.post(box.url + "/v1/audio/speech", json={"model": "tts-1", "voice": "default",
                       "input": "Hello from inside the container.", "response_format": "wav"}, timeout=120)
        assert r.status_code == 200, r.text
        audio, rate = sf.read(io.BytesIO(r.content), dtype="float32")
        assert len(audio) / rate > 1.0 and float((audio ** 2).mean()) ** 0.5 > 0.01  # speech, not silence

        check = box.exec(*image.config["Healthcheck"]["Test"][1:])
        assert check.returncode == 0, check.stdout + check.stderr

        assert box.stop() == 0, box.tail()
        assert "stopped by signal" in box.tail()
    finally:
        box.remove()


def test_saved_voice_survives_a_restart_through_the_data_volume(image, data_dir, tmp_path):
    clip = (FIXTURE / "reference.wav").read_bytes()
    first = Container(image, data_dir).start()
    try:
        r = httpx.post(first.url + "/v1/references/add", data={"id": "narrator", "text": "Some words."},
                       files={"audio": ("ref.wav", clip, "audio/wav")}, timeout=60)
        assert r.status_code == 200, r.text
        assert first.stop() == 0, first.tail()
    finally:
        first.remove()
    owners = {p.stat().st_uid for p in data_dir.rglob("*")}
    assert owners == {1000}, owners  # written by the image's user, not root

    # A new container (the first one's own file system is gone), the same /data, and a checkpoint in the
    # checkpoints volume, found there without configuration (checkpoints/openaudio-s1-mini from the working dir).
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    shutil.copytree(FIXTURE, checkpoints / "openaudio-s1-mini")
    second = Container(image, data_dir, checkpoints=checkpoints, env={"SHOAL_DEVICE": "cpu"}).start()
    try:
        assert httpx.get(second.url + "/v1/references/list").json()["reference_ids"] == ["narrator"]
        health = httpx.get(second.url + "/v1/health").json()
        assert "s1" in health["models"], health
        assert second.stop() == 0, second.tail()
    finally:
        second.remove()


def test_shoal_download_inside_sees_hf_token(image, data_dir):
    """`shoal download` runs in the image (its arguments replace CMD) and HF_TOKEN reaches huggingface_hub. No
    network here: the hub is unreachable, and the command says so in one line instead of writing anything."""
    box = Container(image, data_dir, env={"HF_TOKEN": "hf_container_test", "HF_HUB_OFFLINE": "1"}).create()
    try:
        token = box.exec("python", "-c", "from huggingface_hub import get_token; print(get_token())")
        assert token.stdout.strip() == "hf_container_test", token.stdout + token.stderr
        proc = box.exec(*image.config["Entrypoint"], "download", "--dir", "/data/checkpoints/s1")
        assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stdout + proc.stderr
        assert not (data_dir / "checkpoints" / "s1").exists()
    finally:
        buildah("rm", box.name, check=False)


# -- compose.yaml and the KubeRay example ---------------------------------------------------------------------
def test_compose_file_matches_the_image():
    compose = yaml.safe_load((REPO / "compose.yaml").read_text())
    services = compose["services"]
    cpu, gpu = services["shoal"], services["shoal-gpu"]
    assert "profiles" not in cpu and gpu["profiles"] == ["gpu"]  # `docker compose up` starts the CPU one only
    for service in (cpu, gpu):
        assert {"8080:8080", "10200:10200"} <= set(service["ports"])
        env = service["environment"]
        assert "HF_TOKEN" in env and "SHOAL_WYOMING_PORT=10200" in env
        assert {v.split(":")[1] for v in service["volumes"]} == {"/data", "/checkpoints"}
        grace = float(next((e.split("=")[1] for e in env if e.startswith("SHOAL_SHUTDOWN_GRACE=")), 30))
        assert float(service["stop_grace_period"].rstrip("s")) > grace  # SIGTERM's grace ends before SIGKILL
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert "TORCH_INDEX_URL" in gpu["build"]["args"] and "args" not in cpu["build"]


def test_build_offline_rejects_a_bad_flag_in_one_line():
    proc = subprocess.run([sys.executable, str(BUILD_OFFLINE), "--tga", "x"], capture_output=True, text=True)
    assert proc.returncode != 0 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "--tga" in proc.stderr, proc.stderr
