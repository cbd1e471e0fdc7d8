"""A real `shoal serve` process on loopback, for the API, UI and out-of-the-box tests.

Importable as `from serverproc import Server` (tests/ is on sys.path in pytest's default import mode, as for
`asr`).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m shoal serve` with its data dir at `root/data`, its log at `root/server-PORT.log`, run from
    `root` (so no ./checkpoints or .env of the repo is seen). `start()` = `spawn()` + `wait_ready()`."""

    def __init__(self, checkpoint: Path | None, root: Path, *extra: str, env: dict | None = None):
        self.checkpoint, self.root, self.extra = checkpoint, Path(root), extra
        self.root.mkdir(parents=True, exist_ok=True)
        self.data_dir = self.root / "data"
        self.env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", **(env or {})}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = self.root / f"server-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    def spawn(self) -> "Server":
        args = [sys.executable, "-m", "shoal", "serve", "--port", str(self.port), "--data-dir", str(self.data_dir),
                *self.extra]
        if self.checkpoint is not None:
            args += ["--checkpoint", str(self.checkpoint)]
        self.proc = subprocess.Popen(args, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, env=self.env,
                                     cwd=self.root)
        return self

    def wait_ready(self, timeout: float = 120.0) -> "Server":
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

    def start(self, timeout: float = 120.0) -> "Server":
        return self.spawn().wait_ready(timeout)

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
