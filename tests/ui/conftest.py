"""A real `shoal serve` process with the web UI, and headless Chromium (Debian's) driven by Playwright."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from shoal.testing import write_tiny_checkpoint

CHROMIUM = os.environ.get("SHOAL_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--autoplay-policy=no-user-gesture-required"]


def pytest_configure(config):
    # Registered here too, so --strict-markers passes before pyproject.toml lists it.
    config.addinivalue_line("markers", "browser: drives the web UI in headless Chromium")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class UIServer:
    """`python -m shoal serve ...` on loopback; `url`, `stop()`."""

    def __init__(self, checkpoint: Path | None, root: Path, *extra: str, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.root = root
        self.log = root / f"server-{self.port}.log"
        args = [sys.executable, "-m", "shoal", "serve", "--port", str(self.port), "--data-dir",
                str(root / "data"), *extra]
        if checkpoint is not None:
            args += ["--checkpoint", str(checkpoint)]
        self.proc = subprocess.Popen(args, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, cwd=root,
                                     env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", **(env or {})})

    def wait_ready(self, timeout: float = 120.0) -> "UIServer":
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

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", seed=1)


@pytest.fixture(scope="module")
def ui_server(tmp_path_factory, tiny_checkpoint):
    srv = UIServer(tiny_checkpoint, tmp_path_factory.mktemp("ui-server")).wait_ready()
    yield srv
    srv.stop()


@pytest.fixture
def make_ui_server(tmp_path, tiny_checkpoint):
    """Start servers with their own flags (stopped at the end of the test)."""
    started: list[UIServer] = []

    def make(*extra: str, checkpoint: Path | None = tiny_checkpoint, env: dict | None = None,
             wait: bool = True) -> UIServer:
        root = tmp_path / f"srv{len(started)}"
        root.mkdir()
        srv = UIServer(checkpoint, root, *extra, env=env)
        started.append(srv)
        return srv.wait_ready() if wait else srv

    yield make
    for srv in started:
        srv.stop()


@pytest.fixture(scope="session")
def browser():
    """Headless Debian chromium. Missing in CI (CI set) is a failure; elsewhere the browser tests skip."""
    if not Path(CHROMIUM).is_file():
        if os.environ.get("CI"):
            pytest.fail(f"chromium not found at {CHROMIUM}: CI installs Debian's chromium (apt-get install chromium)")
        pytest.skip(f"chromium not found at {CHROMIUM}")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1360, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(60_000)
    yield page
    context.close()
