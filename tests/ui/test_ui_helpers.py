"""The web UI's pieces that need no browser: status text, seeds, the file folder, the mount's path rules."""

from __future__ import annotations

import os
import time
from types import SimpleNamespace

import numpy as np
import pytest
from starlette.routing import Match

from shoal.errors import BadRequest, Unavailable
from shoal.server import ui


def state(service=None, load_error=None):
    return SimpleNamespace(service=service, load_error=load_error)


def test_header_while_loading_and_after_a_failure():
    assert "Loading the engines" in ui.header_markdown(state())
    failed = ui.header_markdown(state(load_error="model.pth is truncated"))
    assert "failed to load" in failed and "model.pth is truncated" in failed
    assert ui.notice_markdown(state()) == ""


def test_current_service_says_why_there_is_none():
    with pytest.raises(Unavailable, match="still loading"):
        ui.current_service(state())
    with pytest.raises(Unavailable, match="failed to load: boom"):
        ui.current_service(state(load_error="boom"))


@pytest.mark.parametrize("value, expected", [(None, None), ("", None), ("  ", None), (7, 7), (7.0, 7), ("42", 42),
                                             (" -3 ", -3)])
def test_optional_int(value, expected):
    assert ui.optional_int(value) == expected


@pytest.mark.parametrize("value", [1.5, "abc", "1e999", float("nan")])
def test_optional_int_refuses_what_is_not_a_whole_number(value):
    with pytest.raises(BadRequest, match="whole number"):
        ui.optional_int(value)


def test_problem_shows_our_errors_and_hides_others():
    assert ui.problem(BadRequest("voice ids are 1_to_64 chars")) == r"⚠️ voice ids are 1\_to\_64 chars"
    shown = ui.problem(KeyError("secret internals"))
    assert "KeyError" in shown and "secret internals" not in shown


def test_ui_files_are_pruned_by_count_and_age():
    files = ui.UIFiles(max_age=3600, max_count=3)
    paths = [files.write(np.zeros(100, np.float32), 16000, "wav") for _ in range(5)]
    assert sorted(p.name for p in files.root.iterdir()) == sorted(p.name for p in paths[-3:])
    old = time.time() - 7200
    os.utime(paths[-1], (old, old))
    files.write(np.zeros(100, np.float32), 16000, "mp3")
    assert not paths[-1].exists() and len(list(files.root.iterdir())) == 3


@pytest.mark.parametrize("path, ui_handles", [("/", True), ("/config", True), ("/gradio_api/queue/join", True),
                                              ("/v1", False), ("/v1/tts", False), ("/v1/nope", False),
                                              ("/docs", False), ("/openapi.json", False), ("/v1x", True)])
def test_the_ui_mount_leaves_api_paths_alone(path, ui_handles):
    mount = ui.UIMount("", app=lambda scope, receive, send: None)
    match, _ = mount.matches({"type": "http", "path": path, "root_path": "", "method": "GET"})
    assert (match != Match.NONE) == ui_handles
