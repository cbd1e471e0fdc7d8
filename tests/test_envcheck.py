"""The start-up environment check (shoal.envcheck) and the one-line import error, through the real CLI."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

from shoal.cli import EXIT_BROKEN_ENVIRONMENT
from shoal.envcheck import describe_import_failure, pollution, warn_if_polluted

from support import shoal_as_user as shoal

#: Another environment's numpy that defers to this one's, so shoal runs on: the leak is real (its site-packages
#: comes first on sys.path and holds a numpy), only the damage is spared.
DEFERRING_NUMPY = '''\
import importlib.machinery, importlib.util, os, sys
__version__ = "1.0"
_here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.machinery.PathFinder.find_spec(
    __name__, [p for p in sys.path if os.path.abspath(p or ".") != _here])
_real = importlib.util.module_from_spec(_spec)
sys.modules[__name__] = _real
_spec.loader.exec_module(_real)
'''
#: What a numpy built for another Python or ABI raises at `import numpy`.
BROKEN_NUMPY = '''\
raise ImportError("""

IMPORTANT: PLEASE READ THIS FOR ADVICE ON HOW TO SOLVE THIS ISSUE!

Importing the numpy C-extensions failed. This error can happen for
many reasons, often due to issues with your setup or how NumPy was
installed.
""")
'''


def foreign_site(root: Path, numpy_source: str) -> Path:
    """A conda-like environment's site-packages holding its own numpy."""
    site = root / "envs" / "other" / "lib" / "python3.11" / "site-packages"
    (site / "numpy").mkdir(parents=True)
    (site / "numpy" / "__init__.py").write_text(numpy_source)
    return site


def warnings_in(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("shoal: warning:")]


def assert_names_the_leak(line: str, site: Path) -> None:
    assert str(site) in line and "PYTHONPATH" in line and "numpy" in line
    assert "shoal doctor" in line and "unset PYTHONPATH" in line and "conda deactivate" in line


def test_say_warns_once_about_a_foreign_site_packages(tmp_path):
    site = foreign_site(tmp_path, DEFERRING_NUMPY)
    proc = shoal("say", "hi", "-o", str(tmp_path / "x.wav"), "--checkpoint", str(tmp_path / "none"),
                 cwd=tmp_path, pythonpath=site)
    assert proc.returncode == 3, proc.stderr  # then the missing checkpoint, as without the leak
    [warning] = warnings_in(proc.stderr)
    assert_names_the_leak(warning, site)
    assert "Traceback" not in proc.stderr


def test_serve_warns_before_it_starts(tmp_path):
    site = foreign_site(tmp_path, DEFERRING_NUMPY)
    proc = shoal("serve", "--print-config", cwd=tmp_path, pythonpath=site)
    assert proc.returncode == 0, proc.stderr
    [warning] = warnings_in(proc.stderr)
    assert_names_the_leak(warning, site)


def test_a_clean_environment_gives_no_warning(tmp_path):
    proc = shoal("serve", "--print-config", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""


def test_a_broken_foreign_numpy_is_one_line_and_exit_6(tmp_path):
    site = foreign_site(tmp_path, BROKEN_NUMPY)
    proc = shoal("say", "hi", "-o", str(tmp_path / "x.wav"), "--checkpoint", str(tmp_path / "none"),
                 cwd=tmp_path, pythonpath=site)
    assert proc.returncode == EXIT_BROKEN_ENVIRONMENT == 6, proc.stderr
    [line] = proc.stderr.splitlines()
    assert line.startswith("shoal: error: numpy cannot be imported: ImportError: Importing the numpy C-extensions")
    assert str(site / "numpy") in line
    assert "unset PYTHONPATH" in line and "shoal doctor" in line
    assert not (tmp_path / "x.wav").exists()


def test_debug_shows_the_traceback(tmp_path):
    site = foreign_site(tmp_path, BROKEN_NUMPY)
    proc = shoal("--debug", "say", "hi", "-o", str(tmp_path / "x.wav"), cwd=tmp_path, pythonpath=site)
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "numpy C-extensions failed" in proc.stderr


def test_doctor_still_runs_with_a_broken_numpy(tmp_path):
    # The one-line error sends the user to `shoal doctor`: it must not need numpy to start.
    site = foreign_site(tmp_path, BROKEN_NUMPY)
    proc = shoal("doctor", cwd=tmp_path, pythonpath=site)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "FAIL  sys.path" in proc.stdout and "FAIL  numpy" in proc.stdout


# -- in process ----------------------------------------------------------------------------------------------------
def test_the_check_finds_a_shadowing_site_packages_in_process(tmp_path, monkeypatch, caplog):
    site = foreign_site(tmp_path, BROKEN_NUMPY)
    monkeypatch.setattr(sys, "path", [str(site), *sys.path])
    before = set(sys.modules)
    with caplog.at_level(logging.WARNING, logger="shoal.test"):
        message = warn_if_polluted(logging.getLogger("shoal.test"), environ={"PYTHONPATH": str(site)})
    assert message is not None and caplog.messages == [message]
    assert_names_the_leak(message, site)
    assert "torch" not in message  # it holds no torch
    assert set(sys.modules) == before  # it imported nothing (the broken numpy least of all)


def test_the_check_is_silent_on_this_environment(capsys):
    assert pollution() is None
    assert warn_if_polluted() is None
    assert capsys.readouterr().err == ""


def test_the_check_prints_one_line_without_a_logger(tmp_path, monkeypatch, capsys):
    site = foreign_site(tmp_path, BROKEN_NUMPY)
    monkeypatch.setattr(sys, "path", [str(site), *sys.path])
    warn_if_polluted(environ={})
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("shoal: warning: ") and str(site) in line and "PYTHONPATH)" not in line


def test_import_failures_of_shoal_itself_are_not_blamed_on_the_environment():
    with pytest.raises(ImportError) as info:
        __import__("shoal.no_such_module")
    assert describe_import_failure(info.value) is None
    assert describe_import_failure(ValueError("not an import")) is None
