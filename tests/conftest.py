"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURE_DIR = REPO / "tests" / "fixtures" / "fish-s1-tiny"  # regenerate: bash tools/reference/s1/regenerate.sh


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A random tiny S1 checkpoint (shoal.testing), used by the server, UI and bench tests."""
    from shoal.testing import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", seed=1)


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    """The reference's golden fixture set, committed in the repository. Its absence is a failure, never a skip."""
    if not (FIXTURE_DIR / "requests.json").is_file():
        pytest.fail(f"golden fixtures missing at {FIXTURE_DIR}: they are part of the repository "
                    "(bash tools/reference/s1/regenerate.sh rebuilds them)")
    return FIXTURE_DIR
