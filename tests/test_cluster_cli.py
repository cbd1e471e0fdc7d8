"""The plain server stays Ray-free, and `--replicas` without Ray says what to install (no Ray needed here)."""

from __future__ import annotations

import subprocess
import sys

import pytest

BLOCK_RAY = "import sys; sys.modules['ray'] = None\n"  # `import ray` raises ImportError, as if not installed


def run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_the_plain_server_never_imports_ray():
    result = run("import sys, shoal, shoal.cli, shoal.server.app, shoal.compose\n"
                 "from shoal.server.app import create_app\n"
                 "from shoal.settings import Settings\n"
                 "create_app(Settings.load(env={}))\n"
                 "assert 'ray' not in sys.modules, 'ray was imported'\n")
    assert result.returncode == 0, result.stderr


def test_replicas_without_ray_says_install_shoal_cluster(tmp_path):
    result = run(BLOCK_RAY + f"from shoal.cli import main; sys.exit(main(['serve', '--replicas', '2', "
                             f"'--data-dir', {str(tmp_path)!r}]))")
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "install shoal[cluster]" in result.stderr


@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_replicas_takes_a_positive_number_or_auto(value):
    result = run(f"from shoal.cli import main; main(['serve', '--replicas', {value!r}])")
    assert result.returncode == 2 and "--replicas" in result.stderr
