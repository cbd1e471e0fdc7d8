"""The in-process Python API (`shoal.load` -> `shoal.TTS`): the README's examples, parity through it, threads
batching together, errors, voices and closing."""

from __future__ import annotations

import concurrent.futures
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

import shoal
from shoal.errors import BadRequest, Conflict, NotFound, ShoalError, Unavailable

from support import load_golden, load_requests

REPO = Path(__file__).resolve().parents[1]

CHECKPOINT_FILES = ("config.json", "model.pth", "tokenizer.tiktoken", "special_tokens.json", "codec.pth",
                    "codec_config.yaml")


@pytest.fixture(scope="module")
def tts(fixture_dir, tmp_path_factory):
    with shoal.load(fixture_dir, device="cpu", precision="float32", ui=False,
                    data_dir=tmp_path_factory.mktemp("data")) as tts:
        yield tts


@pytest.fixture(scope="module")
def golden(fixture_dir):
    return load_requests(fixture_dir)


def golden_kwargs(fixture_dir, req) -> dict:
    kwargs = {k: req[k] for k in ("seed", "temperature", "top_p", "repetition_penalty", "max_new_tokens",
                                  "chunk_length")}
    if req["reference"]:
        kwargs.update(speaker_wav=fixture_dir / req["reference"], prompt_text=req["reference_text"])
    return kwargs


def readme_python_blocks() -> list[str]:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Use it from Python", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def test_readme_examples_run_as_written(fixture_dir, tmp_path, monkeypatch):
    """Every Python block of the README's "Use it from Python" section, run as written, in a folder laid out
    as the README assumes: the checkpoint at checkpoints/openaudio-s1-mini and a clip me.wav."""
    checkpoint = tmp_path / "checkpoints" / "openaudio-s1-mini"
    checkpoint.mkdir(parents=True)
    for name in CHECKPOINT_FILES:
        shutil.copy(fixture_dir / name, checkpoint / name)
    shutil.copy(fixture_dir / "reference.wav", tmp_path / "me.wav")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SHOAL_DATA_DIR", str(tmp_path / "data"))
    blocks = readme_python_blocks()
    assert len(blocks) >= 2
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "README.md", "exec"), namespace)
    # What the examples promise: audio from a clone, chunks from the stream, a saved voice, a written file.
    assert namespace["sr"] == 44100 and namespace["audio"].dtype == np.float32 and len(namespace["audio"])
    assert (tmp_path / "hello.wav").stat().st_size > 44
    assert (tmp_path / "data" / "voices" / "me" / "codes.npy").is_file()  # saved, with its codes
    assert namespace["tts"]._closed  # the `with` block (or close()) closed it


def test_golden_requests_through_the_api_give_the_golden_audio(tts, fixture_dir, golden):
    for req in golden:
        sr, audio = tts(req["text"], **golden_kwargs(fixture_dir, req))
        expected = load_golden(fixture_dir, req)["audio"]
        assert sr == 44100 and audio.dtype == np.float32 and audio.shape == expected.shape
        np.testing.assert_allclose(audio, expected, atol=1e-4, rtol=0, err_msg=req["name"])


def test_threads_calling_at_once_batch_together_and_keep_their_audio(tts, fixture_dir, golden):
    fish = tts.service.engines.get("fish")
    fish.scheduler.max_seen_batch = 0
    steps_before, frames_before = fish.scheduler.steps, fish.scheduler.frames_generated
    with concurrent.futures.ThreadPoolExecutor(len(golden)) as pool:
        results = list(pool.map(lambda req: tts(req["text"], **golden_kwargs(fixture_dir, req)), golden))
    assert fish.scheduler.max_seen_batch >= 2  # rows from different threads shared decode steps
    assert fish.scheduler.steps - steps_before < fish.scheduler.frames_generated - frames_before
    for req, (_, audio) in zip(golden, results):
        np.testing.assert_allclose(audio, load_golden(fixture_dir, req)["audio"], atol=1e-4, rtol=0,
                                   err_msg=req["name"])


def test_stream_yields_chunks_that_match_the_whole_audio(tts, fixture_dir, golden):
    req = golden[0]
    chunks = list(tts.stream(req["text"], **golden_kwargs(fixture_dir, req)))
    assert len(chunks) >= 2 and all(c.dtype == np.float32 for c in chunks)
    streamed, whole = np.concatenate(chunks), load_golden(fixture_dir, req)["audio"]
    assert streamed.shape == whole.shape
    assert np.linalg.norm(streamed - whole) / np.linalg.norm(whole) < 1e-2


def test_leaving_a_stream_early_frees_its_slot(tts):
    fish = tts.service.engines.get("fish")
    for chunk in tts.stream("A sentence that would go on for a while.", seed=3, max_new_tokens=400):
        break
    deadline = threading.Event()
    for _ in range(100):
        if fish.stats().in_flight == 0 and tts.service.dispatcher.depth == 0:
            break
        deadline.wait(0.05)
    assert fish.stats().in_flight == 0 and tts.service.dispatcher.depth == 0


def test_saved_voice_gives_the_same_audio_as_its_clip_without_encoding(tts, fixture_dir, golden):
    req = next(r for r in golden if r["reference"])
    kwargs = golden_kwargs(fixture_dir, req)
    clip, text = kwargs.pop("speaker_wav"), kwargs.pop("prompt_text")
    tts.save_voice("narrator", clip, text)
    assert "narrator" in tts.voices()
    fish = tts.service.engines.get("fish")
    encodes = fish.encode_count
    _, audio = tts(req["text"], voice="narrator", **kwargs)
    assert fish.encode_count == encodes
    np.testing.assert_allclose(audio, load_golden(fixture_dir, req)["audio"], atol=1e-4, rtol=0)
    with pytest.raises(Conflict):
        tts.save_voice("narrator", clip, text)
    tts.delete_voice("narrator")
    assert "narrator" not in tts.voices()
    with pytest.raises(NotFound):
        tts.delete_voice("narrator")


@pytest.mark.parametrize("call, error, words", [
    (lambda t: t(""), BadRequest, "empty"),
    (lambda t: t("Hi.", temperature=1.5), BadRequest, "temperature must be a number in [0.1, 1]"),
    (lambda t: t("Hi.", speaker_wav="missing.wav", prompt_text="x"), NotFound, "does not exist"),
    (lambda t: t("Hi.", speaker_wav=b"RIFF"), BadRequest, "go together"),
    (lambda t: t("Hi.", voice="nobody"), BadRequest, "unknown voice 'nobody'"),
    (lambda t: t("Hi.", model="s9"), BadRequest, "valid models: s1, piper, fish"),
    (lambda t: t("Hi.", speaker_wav=b"not audio at all", prompt_text="x"), BadRequest, ""),
])
def test_bad_input_raises_the_documented_errors(tts, call, error, words):
    with pytest.raises(error) as info:
        call(tts)
    assert isinstance(info.value, ShoalError) and words in str(info.value)


def test_unknown_setting_is_refused_with_the_valid_names():
    with pytest.raises(BadRequest, match="unknown setting 'max_batch'"):
        shoal.load("nowhere", max_batch=3)


def test_closed_tts_refuses_calls_and_stops_its_threads(fixture_dir, tmp_path):
    before = {t.name for t in threading.enumerate()}
    tts = shoal.load(fixture_dir, device="cpu", data_dir=tmp_path, warm_up=False)
    tts("Hello.", seed=1, max_new_tokens=4)
    tts.close()
    tts.close()  # idempotent
    with pytest.raises(Unavailable):
        tts("Hello again.")
    left = {t.name for t in threading.enumerate() if t.is_alive()} - before
    assert not [name for name in left if name.startswith("shoal")], left


def test_import_shoal_stays_light():
    """`import shoal` must not import numpy or torch: the CLI checks the environment before they load."""
    code = "import sys, shoal; print(sorted(m for m in ('numpy', 'torch') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_load_warns_once_when_another_environment_leaks_in(fixture_dir, tmp_path, monkeypatch, caplog):
    """shoal.load runs the same start-up check as the CLI: a foreign site-packages ahead on sys.path holding a
    core package is named in one warning line."""
    foreign = tmp_path / "envs" / "other" / "lib" / "python3.11" / "site-packages"
    (foreign / "numpy").mkdir(parents=True)
    (foreign / "numpy" / "__init__.py").write_text("__version__ = '1.0'\n")
    monkeypatch.syspath_prepend(str(foreign))
    with caplog.at_level("WARNING", logger="shoal"):
        shoal.load(fixture_dir, device="cpu", data_dir=tmp_path / "data", warm_up=False, lite_voice=False).close()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and str(foreign) in r.getMessage()]
    assert len(warnings) == 1 and "shoal doctor" in warnings[0]


def test_without_the_lite_voice_only_fish_loads_and_no_checkpoint_is_an_error(fixture_dir, tmp_path, monkeypatch):
    from shoal.errors import CheckpointError

    with shoal.load(fixture_dir, device="cpu", data_dir=tmp_path, warm_up=False, lite_voice=False) as tts:
        assert tts.models == ["s1"]
    monkeypatch.chdir(tmp_path)  # no ./checkpoints here, and none in the data dir
    with pytest.raises(CheckpointError, match="lite_voice"):
        shoal.load(data_dir=tmp_path / "empty", warm_up=False, lite_voice=False)


def test_the_compile_cache_setting_reaches_the_engine(fixture_dir, tmp_path, monkeypatch):
    """SHOAL_COMPILE_CACHE (default <data dir>/compile-cache) is where load_engines tells the engine to keep
    compiled kernels."""
    from shoal.engines import fish, registry
    from shoal.settings import Settings

    seen = []
    monkeypatch.setattr(fish.FishEngine, "load", classmethod(lambda cls, *a, **kw: seen.append(kw) or object()))
    base = {"checkpoint": fixture_dir, "data_dir": tmp_path / "data", "lite_voice": False}
    registry.load_engines(Settings.load(cli=base, env={}, dotenv=None))
    registry.load_engines(Settings.load(cli={**base, "compile_cache": tmp_path / "kernels"}, env={}, dotenv=None))
    assert [kw["compile_cache_dir"] for kw in seen] == [tmp_path / "data" / "compile-cache", tmp_path / "kernels"]


def test_s2_pro_speakers_from_lists_of_clips_give_the_golden_audio(s2_fixture_dir, tmp_path):
    """An S2 checkpoint through the Python API: the two-speaker golden request, its clips given as lists (clip i
    is <|speaker:i|>), gives fish-speech 2.0's audio; mismatched lists are refused before anything runs."""
    from support import CLIPS, s2_requests, transcript

    req = next(r for r in s2_requests(s2_fixture_dir) if r["name"] == "two_speakers")
    with shoal.load(s2_fixture_dir, device="cpu", precision="float32", data_dir=tmp_path, warm_up=False,
                    lite_voice=False) as tts:
        assert tts.models == ["s2-pro"] and tts.default_model == "s2-pro"
        sr, audio = tts(req["text"], [s2_fixture_dir / CLIPS[k][0] for k in req["references"]],
                        [transcript(s2_fixture_dir, k) for k in req["references"]], seed=req["seed"],
                        temperature=req["temperature"], top_p=req["top_p"], max_new_tokens=req["max_new_tokens"],
                        chunk_length=req["chunk_length"])
        expected = np.load(s2_fixture_dir / req["file"])["audio"]
        assert sr == 44100 and audio.shape == expected.shape
        np.testing.assert_allclose(audio, expected, atol=1e-4, rtol=0)
        with pytest.raises(BadRequest, match="same length"):
            tts("Hi.", [s2_fixture_dir / "reference.wav"], ["one", "two"])
        with pytest.raises(BadRequest, match="same length"):
            tts("Hi.", [s2_fixture_dir / "reference.wav"], "not a list")
