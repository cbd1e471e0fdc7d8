"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURE_DIR = REPO.parent / "shared" / "fixtures" / "fish-s1-tiny"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A random tiny S1 checkpoint (shoal.testing), shared by the server, UI and bench tests."""
    from shoal.testing import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", seed=1)


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    """The reference's golden fixture set. In CI (CI set) its absence is a failure, never a skip."""
    if not FIXTURE_DIR.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"golden fixtures missing at {FIXTURE_DIR}: CI must have ../shared beside the clone")
        pytest.skip(f"golden fixtures not found at {FIXTURE_DIR}")
    return FIXTURE_DIR
