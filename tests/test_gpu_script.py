"""bench/gpu.sh, the prepared GPU check: it parses, refuses a machine without a GPU at once, and its CPU dry run
goes through the same steps (setup, `shoal bench --one-process`, results, summary) on the tiny fixture.

What it measures on a GPU cannot be tested here; these keep the script from rotting between GPU sessions.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu.sh"


def gpu_sh(*args: str, timeout: float, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "PYTHON": sys.executable, **env}
    environ.pop("OUT", None)
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout, env=environ,
                          cwd=REPO)


def test_the_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_it_fails_fast_and_says_why(tmp_path):
    proc = gpu_sh(timeout=120, SHOAL_GPU_WORK=str(tmp_path / "work"), SHOAL_GPU_OUT=str(tmp_path / "out"))
    assert proc.returncode == 2, proc.stderr
    assert "sees no CUDA GPU" in proc.stderr and "--dry-run" in proc.stderr
    assert not (tmp_path / "work").exists() and not (tmp_path / "out").exists()  # nothing written, nothing run


def test_an_unknown_option_is_refused():
    proc = gpu_sh("--fast", timeout=30)
    assert proc.returncode == 2 and "unknown option --fast" in proc.stderr


def test_the_dry_run_benches_eager_on_the_cpu_and_prints_the_compiled_commands(fixture_dir, s2_fixture_dir, tmp_path):
    proc = gpu_sh("--dry-run", timeout=600, SHOAL_GPU_OUT=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    [md] = tmp_path.glob("*-gpu-eager.md")
    assert md.with_suffix(".json").is_file()
    assert "one process for every level" in md.read_text()
    assert "| throughput, 2 concurrent |" in md.read_text()
    for config in ("cuda-graphs", "compiled", "s2-cuda-graphs"):
        assert f"--label gpu-{config}" in proc.stderr and not list(tmp_path.glob(f"*-gpu-{config}.md"))
    [s2] = tmp_path.glob("*-gpu-s2-eager.md")  # S2 runs eager on the CPU: fish-s2-tiny and fish-speech 2.0's rows
    assert "fish-s2-tiny" in s2.read_text() and "| throughput, 2 concurrent |" in s2.read_text()
    assert "--compile --cuda-graphs" in proc.stderr
    assert "== " in proc.stdout and "decode per token" in proc.stdout  # the summary
    [log] = tmp_path.glob("*-gpu.log")
    assert "eager: done" in log.read_text() and "s2-eager: done" in log.read_text()
