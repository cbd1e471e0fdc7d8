"""A real `shoal serve` process with the web UI, and headless Chromium (Debian's) driven by Playwright."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from shoal.testing import Server

from support import server_factory

CHROMIUM = os.environ.get("SHOAL_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--autoplay-policy=no-user-gesture-required"]


def pytest_configure(config):
    # Registered here too, so --strict-markers passes before pyproject.toml lists it.
    config.addinivalue_line("markers", "browser: drives the web UI in headless Chromium")


@pytest.fixture(scope="module")
def ui_server(tmp_path_factory, tiny_checkpoint):
    with Server(tiny_checkpoint, tmp_path_factory.mktemp("ui-server")) as srv:
        yield srv.start()


@pytest.fixture
def make_ui_server(tmp_path, tiny_checkpoint):
    """Start servers with their own flags (stopped at the end of the test; `wait=False`: not waited for)."""
    with server_factory(tmp_path, tiny_checkpoint) as make:
        yield make


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
