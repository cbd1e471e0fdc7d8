"""Servers for the API tests (the process itself is shoal.testing.Server, the factory tests/support.py's)."""

from __future__ import annotations

import pytest

from shoal.testing import Server

from support import server_factory


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_checkpoint):
    with Server(tiny_checkpoint, tmp_path_factory.mktemp("server")) as srv:
        yield srv.start()


@pytest.fixture
def make_server(tmp_path, tiny_checkpoint):
    """Start extra servers with their own flags/env (stopped at the end of the test)."""
    with server_factory(tmp_path, tiny_checkpoint) as make:
        yield make
