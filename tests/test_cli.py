"""`shoal say` as a user runs it: a real subprocess, real files."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import soundfile as sf

from support import load_golden, load_request, other_codec_layout, shoal, with_codec_layout


@pytest.mark.parametrize("codec", ["as-written", "without-buffers"])
def test_say_with_the_golden_request_writes_the_golden_codes(fixture_dir, tmp_path, codec):
    """Also with the codec re-saved without its RoPE tables and masks, as fish-speech 2.x saves one."""
    checkpoint = fixture_dir
    if codec == "without-buffers":
        checkpoint = with_codec_layout(fixture_dir, other_codec_layout("s1"), tmp_path / "ckpt")
    req = load_request(fixture_dir, "b")
    out, codes = tmp_path / "b.wav", tmp_path / "b.npy"
    proc = shoal("say", req["text"], "-o", str(out), "--checkpoint", str(checkpoint),
                 "--reference-audio", str(fixture_dir / req["reference"]),
                 "--reference-text", req["reference_text"], "--seed", str(req["seed"]),
                 "--temperature", str(req["temperature"]), "--top-p", str(req["top_p"]),
                 "--repetition-penalty", str(req["repetition_penalty"]),
                 "--max-new-tokens", str(req["max_new_tokens"]), "--device", "cpu", "--precision", "float32",
                 "--codes-out", str(codes))
    assert proc.returncode == 0, proc.stderr
    golden = load_golden(fixture_dir, req)
    saved = np.load(codes)
    assert saved.dtype == np.int64 and saved.shape == golden["codes"].shape
    np.testing.assert_array_equal(saved, golden["codes"])
    audio, sr = sf.read(out, dtype="float32")
    assert sr == 44100 and audio.shape == golden["audio"].shape
    np.testing.assert_allclose(audio, golden["audio"], atol=2 / 32768 + 1e-4)  # PCM16 quantisation
    assert "real-time factor" in proc.stderr and "generating:" in proc.stderr


@pytest.mark.parametrize("codec", ["as-written", "with-buffers"])
def test_say_speaks_s2_pro_s_two_speakers_as_the_reference_does(s2_fixture_dir, tmp_path, codec):
    """An S2 checkpoint, its two-speaker golden request: a --reference-audio/--reference-text pair per speaker. Also
    with the codec re-saved with RoPE tables and masks, as fish-speech 0.1.0 saved one."""
    from support import CLIPS, s2_requests, transcript

    checkpoint = s2_fixture_dir
    if codec == "with-buffers":
        checkpoint = with_codec_layout(s2_fixture_dir, other_codec_layout("s2"), tmp_path / "ckpt")
    req = next(r for r in s2_requests(s2_fixture_dir) if r["name"] == "two_speakers")
    out, codes = tmp_path / "two.wav", tmp_path / "two.npy"
    refs = [arg for k in req["references"] for arg in ("--reference-audio", str(s2_fixture_dir / CLIPS[k][0]),
                                                       "--reference-text", transcript(s2_fixture_dir, k))]
    proc = shoal("say", req["text"], "-o", str(out), "--checkpoint", str(checkpoint), *refs,
                 "--seed", str(req["seed"]), "--temperature", str(req["temperature"]), "--top-p", str(req["top_p"]),
                 "--max-new-tokens", str(req["max_new_tokens"]), "--device", "cpu", "--precision", "float32",
                 "--codes-out", str(codes))
    assert proc.returncode == 0, proc.stderr
    assert "(s2-pro)" in proc.stderr
    golden = np.load(s2_fixture_dir / req["file"])
    np.testing.assert_array_equal(np.load(codes), golden["codes"])
    audio, sr = sf.read(out, dtype="float32")
    assert sr == 44100 and audio.shape == golden["audio"].shape
    np.testing.assert_allclose(audio, golden["audio"], atol=2 / 32768 + 1e-4)  # PCM16 quantisation


def test_missing_codec_is_one_line_naming_the_file(fixture_dir, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(fixture_dir, ckpt)
    (ckpt / "codec.pth").unlink()
    proc = shoal("say", "hi", "-o", str(tmp_path / "x.wav"), "--checkpoint", str(ckpt))
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "codec.pth" in lines[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "x.wav").exists()

    debug = shoal("--debug", "say", "hi", "-o", str(tmp_path / "x.wav"), "--checkpoint", str(ckpt))
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_no_checkpoint_anywhere_says_how_to_get_one(tmp_path):
    proc = shoal("say", "hi", "-o", "x.wav", cwd=tmp_path)
    assert proc.returncode == 3
    assert "no Fish Speech checkpoint found" in proc.stderr and "shoal download" in proc.stderr


@pytest.mark.parametrize("args, needle", [
    (["say", "", "-o", "x.wav"], "text is empty"),
    (["say", "hi", "-o", "x.wav", "--reference-audio", "a.wav"], "one --reference-text per --reference-audio"),
    (["say", "hi", "-o", "x.mp9"], "use one of"),
    (["say", "hi", "-o", "x.wav", "--top-p", "7"], "top_p"),
])
def test_bad_input_is_one_line_and_exit_2(fixture_dir, tmp_path, args, needle):
    proc = shoal(*args, "--checkpoint", str(fixture_dir), "--max-new-tokens", "4", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr and "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []  # nothing half-written
