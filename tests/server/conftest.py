"""A real `shoal serve` process on loopback, with a tiny checkpoint, for the API tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from shoal.testing import write_tiny_checkpoint


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m shoal serve ...` in a subprocess; `url`, `client()`, `restart()`, `stop()`."""

    def __init__(self, checkpoint: Path | None, data_dir: Path, *extra: str, env: dict | None = None):
        self.checkpoint, self.data_dir, self.extra = checkpoint, data_dir, extra
        self.env = {**os.environ, **(env or {})}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = data_dir.parent / f"server-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 120.0) -> "Server":
        args = [sys.executable, "-m", "shoal", "serve", "--port", str(self.port), "--data-dir", str(self.data_dir),
                *self.extra]
        if self.checkpoint:
            args += ["--checkpoint", str(self.checkpoint)]
        self.proc = subprocess.Popen(args, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, env=self.env,
                                     cwd=self.data_dir.parent)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(self.url + "/v1/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server not ready in {timeout} s:\n{self.log.read_text()[-3000:]}")

    def client(self, **kwargs) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=120, **kwargs)

    def stop(self) -> int | None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode if self.proc else None

    def restart(self) -> "Server":
        self.stop()
        return self.start()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", seed=1)


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_checkpoint):
    root = tmp_path_factory.mktemp("server")
    srv = Server(tiny_checkpoint, root / "data").start()
    yield srv
    srv.stop()


@pytest.fixture
def make_server(tmp_path, tiny_checkpoint):
    """Start extra servers with their own flags/env (stopped at the end of the test)."""
    started: list[Server] = []

    def make(*extra: str, env: dict | None = None, checkpoint: Path | None = tiny_checkpoint) -> Server:
        srv = Server(checkpoint, tmp_path / f"data{len(started)}", *extra, env=env)
        started.append(srv)
        return srv.start()

    yield make
    for srv in started:
        srv.stop()
