"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURE_DIR = REPO / "tests" / "fixtures" / "fish-s1-tiny"  # regenerate: bash tools/reference/s1/regenerate.sh
S2_FIXTURE_DIR = REPO / "tests" / "fixtures" / "fish-s2-tiny"  # regenerate: bash tools/reference/s2/regenerate.sh


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A random tiny S1 checkpoint (shoal.testing), used by the server, UI and bench tests."""
    from shoal.testing import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", seed=1)


@pytest.fixture(scope="session")
def fixture_dir() -> Path:
    """The reference's golden fixture set, committed in the repository. Its absence is a failure, never a skip."""
    return committed_fixture(FIXTURE_DIR, "s1")


@pytest.fixture(scope="session")
def s2_fixture_dir() -> Path:
    """The S2 reference's golden fixture set: a tiny S2-Pro-layout checkpoint and its goldens."""
    return committed_fixture(S2_FIXTURE_DIR, "s2")


def committed_fixture(directory: Path, harness: str) -> Path:
    """A golden fixture set committed in the repository. Its absence is a failure, never a skip."""
    if not (directory / "requests.json").is_file():
        pytest.fail(f"golden fixtures missing at {directory}: they are part of the repository "
                    f"(bash tools/reference/{harness}/regenerate.sh rebuilds them)")
    return directory
