"""Servers for the API tests (the process helper itself is tests/serverproc.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from serverproc import Server


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_checkpoint):
    srv = Server(tiny_checkpoint, tmp_path_factory.mktemp("server")).start()
    yield srv
    srv.stop()


@pytest.fixture
def make_server(tmp_path, tiny_checkpoint):
    """Start extra servers with their own flags/env (stopped at the end of the test)."""
    started: list[Server] = []

    def make(*extra: str, env: dict | None = None, checkpoint: Path | None = tiny_checkpoint) -> Server:
        srv = Server(checkpoint, tmp_path / f"srv{len(started)}", *extra, env=env)
        started.append(srv)
        return srv.start()

    yield make
    for srv in started:
        srv.stop()
