"""`shoal doctor`: passes on a healthy install, catches a foreign environment on sys.path, checks checkpoints."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from shoal.doctor import (FAIL, OK, WARN, Check, check_checkpoint, check_data_dir, check_port, collect_checks,
                          format_table)
from shoal.settings import Settings
from shoal.testing import write_tiny_checkpoint

from support import shoal_as_user

NAMES = {"python", "environment", "sys.path", "numpy", "torch", "soundfile", "tiktoken", "tokenizers", "safetensors",
         "device", "memory", "checkpoint", "piper voice", "data dir", "port", "audio encoders"}


def shoal_doctor(*args: str, cwd: Path, pythonpath: str | None = None) -> subprocess.CompletedProcess:
    """Run `shoal doctor` as a user would, away from this machine's SHOAL_* settings and any .env file."""
    # SHOAL_PORT 0: any free port, so the port check does not depend on what else runs here.
    return shoal_as_user("doctor", *args, cwd=cwd, pythonpath=pythonpath or None, env={"SHOAL_PORT": "0"},
                         timeout=120)


def settings(checkpoint: Path, tmp_path: Path) -> Settings:
    return Settings.load(cli={"checkpoint": checkpoint, "data_dir": tmp_path / "data"}, env={}, dotenv=None)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """One tiny checkpoint per module (writing it takes seconds on a busy machine); tests change copies."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", seed=0)


@pytest.fixture
def checkpoint(tiny, tmp_path) -> Path:
    return Path(shutil.copytree(tiny, tmp_path / "ckpt"))


def by_name(checks) -> dict[str, Check]:
    return {c.name: c for c in checks}


def test_doctor_passes_on_this_machine(tmp_path):
    proc = shoal_doctor(cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    lines = {line.split()[1]: line.split()[0] for line in proc.stdout.splitlines()[:3]}
    assert lines == {"python": OK, "environment": OK, "sys.path": OK}
    assert "WARN  checkpoint" in proc.stdout and "shoal download" in proc.stdout  # no checkpoint here
    assert not (tmp_path / "data").exists()  # checked, not created


def test_json_lists_every_check(tmp_path):
    proc = shoal_doctor("--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    checks = json.loads(proc.stdout)
    assert NAMES <= {c["name"] for c in checks}
    assert all(set(c) == {"name", "status", "detail", "hint"} and c["status"] in (OK, WARN, FAIL) for c in checks)
    found = {c["name"]: c for c in checks}
    assert found["checkpoint"]["status"] == WARN and "shoal download" in found["checkpoint"]["hint"]
    for name in ("numpy", "torch", "soundfile", "tiktoken"):
        assert found[name]["status"] == OK and sys.prefix in found[name]["detail"]


def test_another_environment_on_pythonpath_fails_without_crashing(tmp_path):
    # The seed's breakage: conda base's site-packages (here a stub numpy 1.26.4) ahead of the venv's own.
    site = tmp_path / "other-env" / "lib" / "python3.11" / "site-packages"
    (site / "numpy").mkdir(parents=True)
    (site / "numpy" / "__init__.py").write_text('__version__ = "1.26.4"\n')
    proc = shoal_doctor("--json", cwd=tmp_path, pythonpath=str(site))
    assert proc.returncode == 1, proc.stderr  # a failure, not a crash (a segfault would be 139 or -11)
    assert "Traceback" not in proc.stderr
    found = {c["name"]: c for c in json.loads(proc.stdout)}
    assert found["sys.path"]["status"] == FAIL and str(site) in found["sys.path"]["detail"]
    assert "PYTHONPATH" in found["sys.path"]["hint"]
    assert found["numpy"]["status"] == FAIL and "1.26.4" in found["numpy"]["detail"]
    assert str(site) in found["numpy"]["detail"]
    assert found["torch"]["status"] == FAIL  # torch cannot import a stub numpy: reported, not raised


def test_a_tiny_checkpoint_passes_every_checkpoint_check(checkpoint, tmp_path):
    checks = check_checkpoint(settings(checkpoint, tmp_path))
    assert [c.name for c in checks] == ["checkpoint", "checkpoint config", "model.pth", "codec.pth"]
    assert all(c.status == OK for c in checks), checks
    assert checks[-1].detail.endswith("RoPE tables stored in codec.pth (the fish-speech 0.1.0 layout); block sizes "
                                      "1024 (encoder/decoder), 512 (quantizer)"), checks[-1].detail


def test_a_missing_codec_fails_naming_it(checkpoint, tmp_path):
    (checkpoint / "codec.pth").unlink()
    checks = by_name(check_checkpoint(settings(checkpoint, tmp_path)))
    assert checks["checkpoint"].status == FAIL and "codec.pth is missing" in checks["checkpoint"].detail
    assert checks["model.pth"].status == OK and "codec.pth" not in checks


def test_weights_of_another_architecture_fail_strictly(checkpoint, tmp_path):
    import torch

    state = torch.load(checkpoint / "model.pth", weights_only=True)
    state["norm.weight"] = torch.ones(state["norm.weight"].shape[0] + 1)
    del state["embeddings.weight"]
    torch.save(state, checkpoint / "model.pth")
    checks = by_name(check_checkpoint(settings(checkpoint, tmp_path)))
    assert checks["model.pth"].status == FAIL and "does not match" in checks["model.pth"].detail
    assert checks["codec.pth"].status == OK


def test_lfs_pointers_and_truncated_weights_are_named(checkpoint, tmp_path):
    (checkpoint / "model.pth").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 1\n")
    data = (checkpoint / "codec.pth").read_bytes()
    (checkpoint / "codec.pth").write_bytes(data[: len(data) // 2])
    checks = by_name(check_checkpoint(settings(checkpoint, tmp_path)))
    assert checks["checkpoint"].status == FAIL and "model.pth is a Git LFS pointer" in checks["checkpoint"].detail
    assert checks["codec.pth"].status == FAIL and "codec.pth" in checks["codec.pth"].detail


@pytest.fixture
def s2_checkpoint(s2_fixture_dir, tmp_path) -> Path:
    return Path(shutil.copytree(s2_fixture_dir, tmp_path / "s2"))


def test_an_s2_checkpoint_passes_every_checkpoint_check(s2_checkpoint, tmp_path):
    checks = check_checkpoint(settings(s2_checkpoint, tmp_path))
    assert [c.name for c in checks] == ["checkpoint", "checkpoint config", "2 weight shards", "codec.pth"]
    assert all(c.status == OK for c in checks), checks
    assert "(s2-pro)" in checks[0].detail and "model-00002-of-00002.safetensors" in checks[0].detail
    assert checks[-1].detail.endswith("RoPE tables derived from the config (the fish-speech 2.x layout: not in "
                                      "codec.pth); block sizes 512 (encoder/decoder), 256 (quantizer)"), checks[-1].detail


def test_an_s2_shard_missing_or_an_lfs_pointer_is_named(s2_checkpoint, tmp_path):
    first, second = sorted(s2_checkpoint.glob("model-*.safetensors"))
    second.unlink()
    first.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 1\n")
    checks = by_name(check_checkpoint(settings(s2_checkpoint, tmp_path)))
    detail = checks["checkpoint"].detail
    assert checks["checkpoint"].status == FAIL
    assert f"{second.name} is missing" in detail and f"{first.name} is a Git LFS pointer" in detail
    assert "2 weight shards" not in checks and checks["codec.pth"].status == OK


def test_s2_weights_that_do_not_fit_fail_strictly(s2_checkpoint, tmp_path):
    """A shard whose tensors lack one the config needs: the loader's strict check, with the official name."""
    from safetensors.torch import load_file, save_file

    shard = sorted(s2_checkpoint.glob("model-*.safetensors"))[0]
    state = load_file(shard)
    dropped = sorted(state)[0]
    del state[dropped]
    save_file(state, shard, metadata={"format": "pt"})
    checks = by_name(check_checkpoint(settings(s2_checkpoint, tmp_path)))
    assert checks["2 weight shards"].status == FAIL and dropped in checks["2 weight shards"].detail


def test_both_checkpoints_are_checked_when_served_side_by_side(checkpoint, s2_checkpoint, tmp_path):
    both = Settings.load(cli={"checkpoint": checkpoint, "extra_checkpoints": [s2_checkpoint],
                              "data_dir": tmp_path / "data"}, env={}, dotenv=None)
    checks = check_checkpoint(both)
    assert [c.name for c in checks] == ["checkpoint", "checkpoint config", "model.pth", "codec.pth",
                                        "checkpoint", "checkpoint config", "2 weight shards", "codec.pth"]
    assert all(c.status == OK for c in checks), checks


def test_a_configured_checkpoint_that_does_not_exist_fails(tmp_path):
    checks = check_checkpoint(settings(tmp_path / "nowhere", tmp_path))
    assert [(c.name, c.status) for c in checks] == [("checkpoint", FAIL)]


def test_a_busy_port_is_reported(tmp_path):
    with socket.create_server(("127.0.0.1", 0)) as busy:
        check = check_port("127.0.0.1", busy.getsockname()[1])
    assert check.status == WARN and "--port" in check.hint
    assert check_port("127.0.0.1", 0).status == OK


def test_the_data_dir_check_creates_nothing(tmp_path):
    check = check_data_dir(tmp_path / "a" / "b", 0)
    assert check.status == OK and "not created yet" in check.detail
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "file").write_text("x")
    assert check_data_dir(tmp_path / "file" / "data", 0).status == FAIL


def test_a_data_dir_short_of_space_is_a_warning(tmp_path, monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=100 * 2**20))
    check = check_data_dir(tmp_path, 500)
    assert check.status == WARN and "100 MiB free" in check.detail and "500 MiB" in check.detail
    assert str(tmp_path) in check.detail and "SHOAL_DATA_DIR" in check.hint
    assert check_data_dir(tmp_path, 50).status == OK
    settings = Settings.load(cli={"data_dir": tmp_path, "min_free_disk_mb": 500}, env={}, dotenv=None)
    assert [c.status for c in collect_checks(settings) if c.name == "data dir"] == [WARN]


def test_the_table_shows_hints_only_for_problems():
    table = format_table([Check("a", OK, "fine", "never shown"), Check("bb", FAIL, "broken", "do this")])
    assert "never shown" not in table and "fix: do this" in table and "FAIL  bb" in table
    assert table.endswith("1 ok, 0 warnings, 1 failures")
