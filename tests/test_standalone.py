"""The repository stands alone: nothing in it reaches for a `shared` folder beside the checkout.

The golden fixture (tests/fixtures/fish-s1-tiny) and the reference harness (tools/reference/s1) live in the
repository; a clone has nothing next to it. bench/results/ is exempt: those files are historical records.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCANNED = ("src/", "tests/", "bench/", "docs/", "tools/", "README.md")
EXEMPT = ("bench/results/",)

# Built from parts so that this file does not match its own patterns.
SHARED = "sha" + "red"
PATTERNS = [
    re.compile(re.escape(".." + "/" + SHARED)),  # a relative path to the sibling folder
    re.compile(r"parents\[\d+\]\s*/\s*['\"]" + SHARED + r"['\"]"),  # Path(__file__).parents[N] / "<that folder>"
    re.compile(r"\.parent\s*/\s*['\"]" + SHARED + r"['\"]"),  # REPO.parent / "<that folder>"
]


def tracked_files() -> list[str]:
    proc = subprocess.run(["git", "ls-files", "-z", "--", *SCANNED], cwd=REPO, capture_output=True)
    assert proc.returncode == 0, f"git ls-files failed: {proc.stderr.decode(errors='replace')}"
    return [name for name in proc.stdout.decode().split("\0") if name and not name.startswith(EXEMPT)]


def test_patterns_catch_what_they_are_meant_to():
    assert PATTERNS[0].search("see .." + "/" + SHARED + "/fixtures")
    assert PATTERNS[1].search('Path(__file__).resolve().parents[3] / "' + SHARED + '"')
    assert PATTERNS[2].search("REPO.parent / '" + SHARED + "' / 'fixtures'")
    assert not any(p.search('tests / "fixtures" / "fish-s1-tiny"') for p in PATTERNS)


def test_no_tracked_file_reaches_outside_the_repository():
    files = tracked_files()
    assert "tests/conftest.py" in files and "src/shoal/bench.py" in files  # the scan really covers the tree
    offenders = []
    for name in files:
        path = REPO / name
        if not path.is_file():  # deleted in the work tree but still in the index
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:  # binary: weights, audio, arrays
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if any(p.search(line) for p in PATTERNS):
                offenders.append(f"{name}:{number}: {line.strip()[:120]}")
    assert not offenders, "files that reach for a folder outside the repository:\n" + "\n".join(offenders)


def test_fixture_and_reference_harness_are_in_the_repository():
    fixture = REPO / "tests" / "fixtures" / "fish-s1-tiny"
    for name in ("config.json", "model.pth", "tokenizer.tiktoken", "special_tokens.json", "codec.pth",
                 "codec_config.yaml", "codec.npz", "requests.json", "reference.wav", "README.md"):
        assert (fixture / name).is_file(), name
    harness = REPO / "tools" / "reference" / "s1"
    for name in ("setup.sh", "run_reference.py", "make_fixture.py", "regenerate.sh", "README.md",
                 "requirements.txt", "torchaudio/__init__.py"):
        assert (harness / name).is_file(), name
    from shoal import bench

    assert bench.DEFAULT_FIXTURE == fixture and bench.DEFAULT_REFERENCE_DIR == harness
