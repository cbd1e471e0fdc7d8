"""Two servers for the whole hostile suite (each start costs seconds): one open with the default body and text
limits, one behind an API key with every size limit lowered so "too large" stays cheap."""

from __future__ import annotations

import httpx
import pytest

from shoal.testing import Server

from hostile_checks import ANCHOR, API_KEY, check_alive, snapshot, stray_files
from hostile_media import good_wav

# The tiny checkpoint's codec encodes at most ~12 s at once; voice clips and inline references stay below.
OPEN_ENV = {"SHOAL_MAX_VOICE_SECONDS": "10"}
SMALL_ENV = {"SHOAL_MAX_BODY_BYTES": str(256 * 1024), "SHOAL_MAX_UPLOAD_BYTES": str(64 * 1024),
             "SHOAL_MAX_TEXT_LENGTH": "300", "SHOAL_MAX_VOICE_SECONDS": "5", "SHOAL_REQUEST_TIMEOUT": "60",
             "SHOAL_LIVE_MAX_MESSAGE_BYTES": "4096", "SHOAL_LIVE_MAX_BUFFERED_CHARS": "100",
             "SHOAL_LIVE_MAX_TEXT_CHARS": "200"}

STARTED: list[Server] = []


def start(tmp_path_factory, checkpoint, name: str, *flags: str, env: dict) -> Server:
    srv = Server(checkpoint, tmp_path_factory.mktemp(name), *flags, env=env).start()
    srv.watched = (srv.root, checkpoint)
    # One client per server: building an httpx.Client (its SSL context) costs more than most cases here.
    srv.http = httpx.Client(base_url=srv.url, timeout=120)
    STARTED.append(srv)
    return srv


def finish(srv: Server) -> None:
    try:
        check_alive(srv)
        assert snapshot(*srv.watched) == srv.baseline, "the run changed files under the server's root"
        assert not stray_files(srv)
    finally:
        STARTED.remove(srv)
        srv.http.close()
        srv.stop()


@pytest.fixture(scope="package")
def open_server(tmp_path_factory, tiny_checkpoint):
    """No API key; one saved voice, `anchor`, that hostile renames and deletes must leave alone."""
    srv = start(tmp_path_factory, tiny_checkpoint, "hostile-open", env=OPEN_ENV)
    with srv.client() as c:
        r = c.post("/v1/references/add", data={"id": ANCHOR, "text": "An anchor voice."},
                   files={"audio": ("anchor.wav", good_wav(), "audio/wav")})
        assert r.status_code == 200, r.text
    srv.baseline = snapshot(*srv.watched)
    yield srv
    finish(srv)


@pytest.fixture(scope="package")
def key_server(tmp_path_factory, tiny_checkpoint):
    # No UI here: the open server covers the API behind the UI's mount, and this one starts seconds sooner.
    srv = start(tmp_path_factory, tiny_checkpoint, "hostile-key", "--api-key", API_KEY, "--no-ui", env=SMALL_ENV)
    srv.baseline = snapshot(*srv.watched)
    yield srv
    finish(srv)


@pytest.fixture(scope="module", autouse=True)
def module_leaves_no_trace():
    """Whatever a module sends, the servers' trees are as they were before it (or at start) afterwards."""
    before = {id(s): snapshot(*s.watched) for s in STARTED}
    yield
    for srv in STARTED:
        assert snapshot(*srv.watched) == before.get(id(srv), srv.baseline), f"files changed under {srv.root}"
        assert not stray_files(srv), stray_files(srv)
