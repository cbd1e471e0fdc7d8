"""The README's two set-up commands stay true: one speaks, one tests, and CI runs the test command."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def quick_start_commands() -> list[str]:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, re.S)]


def test_readme_has_exactly_two_setup_commands():
    commands = quick_start_commands()
    assert len(commands) == 2, commands
    assert all("\n" not in c for c in commands), "each set-up command is one line"
    assert "shoal say" in commands[0] or "shoal serve" in commands[0]
    assert "pytest" in commands[1]


def test_ci_runs_the_readme_test_command():
    ci = (REPO / ".ci" / "run").read_text().splitlines()
    assert quick_start_commands()[1] in ci


def test_no_fish_speech_import_anywhere():
    pattern = re.compile(r"^\s*(import|from)\s+fish_speech\b", re.M)
    offenders = [str(p) for root in ("src", "tests", "bench") if (REPO / root).is_dir()
                 for p in (REPO / root).rglob("*.py") if pattern.search(p.read_text())]
    assert offenders == []


def test_every_setting_is_in_the_configuration_table():
    from shoal.settings import Settings

    readme = (REPO / "README.md").read_text()
    table = readme.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    missing = [name for name in Settings.model_fields if f"`SHOAL_{name.upper()}`" not in table]
    assert missing == []
