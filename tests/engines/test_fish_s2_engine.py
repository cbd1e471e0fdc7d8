"""The fish engine on an S2 checkpoint (tests/fixtures/fish-s2-tiny) end to end: speaker-turn segments, the
conversation carried from batch to batch, rows independent of their neighbours, and the reference's goldens."""

from __future__ import annotations

import concurrent.futures
from pathlib import Path

import numpy as np
import pytest
import torch

from shoal.engines.base import Reference, SynthesisRequest
from shoal.errors import BadRequest
from shoal.engines.fish import FishEngine
from shoal.fish.conversation import build_s2_prompt
from shoal.text import speaker_batches

from support import as_s2_request, batch_outputs, reference_codes, s2_requests

CLIP_TEXT = "This is a short reference recording."
TWO_TURNS = ("<|speaker:0|>The first turn is long enough to fill most of one batch on its own, as you see."
             "<|speaker:1|>The second turn answers it with a few more words.<|speaker:0|>Then the first one ends.")


@pytest.fixture(scope="module")
def s2_dir(s2_fixture_dir) -> Path:
    return s2_fixture_dir


@pytest.fixture(scope="module")
def golden_requests(s2_dir) -> list[dict]:
    return s2_requests(s2_dir)


@pytest.fixture(scope="module")
def engine(s2_dir):
    engine = FishEngine.load(s2_dir, device="cpu", precision="float32")
    yield engine
    engine.close()


def clip(s2_dir: Path, name: str = "reference.wav") -> Reference:
    return Reference((s2_dir / name).read_bytes(), CLIP_TEXT)


def test_an_s2_checkpoint_makes_an_s2_engine(engine):
    assert engine.s2 and engine.model_name == "s2-pro"


def golden_codes(s2_dir: Path, req: dict) -> np.ndarray:
    """What the reference's codec got for a request: every batch's codes, in order."""
    return np.concatenate(batch_outputs(np.load(s2_dir / req["file"]), "codes"), axis=1)


def test_reference_clips_encode_to_the_reference_codes(engine, s2_dir):
    for key, name in (("a", "reference.wav"), ("b", "reference_b.wav")):
        np.testing.assert_array_equal(engine.encode_reference(clip(s2_dir, name)).numpy(),
                                      reference_codes(s2_dir, key))


def test_every_golden_request_gives_the_golden_codes_and_audio(engine, s2_dir, golden_requests):
    for req in golden_requests:
        g = np.load(s2_dir / req["file"])
        result = engine.run(as_s2_request(s2_dir, req))
        np.testing.assert_array_equal(result.codes, golden_codes(s2_dir, req), err_msg=req["name"])
        assert result.stopped_by_im_end == [b["stopped_by_im_end"] for b in req["batches"]]
        assert result.audio.shape == g["audio"].shape
        np.testing.assert_allclose(result.audio, g["audio"], atol=1e-4, rtol=0, err_msg=req["name"])


def test_golden_requests_side_by_side_give_the_golden_codes(engine, s2_dir, golden_requests):
    """All golden requests at once, four decoding side by side (the engine's max batch), their references given as
    the reference's codes: each gets its golden codes."""
    requests = [as_s2_request(s2_dir, req, codes=True) for req in golden_requests]
    engine.scheduler.max_seen_batch = 0
    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        results = list(pool.map(engine.run, requests))
    assert engine.scheduler.max_seen_batch == 4
    for req, result in zip(golden_requests, results):
        np.testing.assert_array_equal(result.codes, golden_codes(s2_dir, req), err_msg=req["name"])


def test_each_batch_prompt_is_the_conversation_so_far(engine, s2_dir, monkeypatch):
    prompts = []
    real = engine._prompt

    def spy(text, references, previous, *args, **kwargs):
        prompt, budget = real(text, references, previous, *args, **kwargs)
        prompts.append((text, list(previous), prompt))
        return prompt, budget

    monkeypatch.setattr(engine, "_prompt", spy)
    result = engine.run(SynthesisRequest(text=TWO_TURNS, references=(clip(s2_dir),), seed=6, max_new_tokens=16,
                                         chunk_length=100))
    first, second = prompts
    assert first[0] == TWO_TURNS[: TWO_TURNS.index("<|speaker:1|>")] and first[1] == []
    assert second[0] == "<|speaker:1|>The second turn answers it with a few more words.\n" \
                        "<|speaker:0|>Then the first one ends."
    (carried_text, carried_codes), = second[1]
    assert carried_text == first[0]
    n = carried_codes.shape[1]
    assert np.array_equal(carried_codes.numpy(), result.codes[:, :n])  # the first batch's codes, as decoded
    codes = engine.encode_reference(clip(s2_dir))
    expected = build_s2_prompt(engine.tokenizer, second[0], [(CLIP_TEXT, codes)], [(first[0], carried_codes)])
    assert torch.equal(second[2], expected)
    assert len(result.stopped_by_im_end) == 2


def test_reference_transcripts_are_used_verbatim(engine, s2_dir, monkeypatch):
    seen = []
    real = engine._prompt

    def spy(text, references, *args, **kwargs):
        seen.append([t for t, _ in references])
        return real(text, references, *args, **kwargs)

    monkeypatch.setattr(engine, "_prompt", spy)
    engine.run(SynthesisRequest(text="Hi.", references=(Reference(clip(s2_dir).audio, " Spoken text.\n"),), seed=1,
                                max_new_tokens=4))
    assert seen == [[" Spoken text.\n"]]


def side_by_side_requests(s2_dir: Path) -> list[SynthesisRequest]:
    return [
        SynthesisRequest(text=TWO_TURNS, references=(clip(s2_dir),), seed=6, max_new_tokens=16, chunk_length=100),
        SynthesisRequest(text="The quick brown fox jumps over the lazy dog.", seed=2, temperature=0.7, top_p=0.9,
                         max_new_tokens=24),
        SynthesisRequest(text="<|speaker:0|>Good morning.<|speaker:1|>Fine, thanks.", seed=3, top_p=0.95,
                         references=(clip(s2_dir), clip(s2_dir, "reference_b.wav")), max_new_tokens=24),
        SynthesisRequest(text="你好，世界。こんにちは。", seed=5, temperature=0.6, max_new_tokens=24),
    ]


def test_requests_side_by_side_give_the_codes_they_give_alone(engine, s2_dir):
    requests = side_by_side_requests(s2_dir)
    alone = [engine.run(r) for r in requests]
    engine.scheduler.max_seen_batch = 0
    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        together = list(pool.map(engine.run, requests))
    assert engine.scheduler.max_seen_batch >= 2  # they really decoded side by side
    for a, b in zip(alone, together):
        np.testing.assert_array_equal(a.codes, b.codes)
        np.testing.assert_array_equal(a.audio, b.audio)
    # S2 samples residual codes over the model's whole codebook: codes past the codec's 1024 entries occur, reach
    # the codec (which clamps them) and the next batch's prompt as they are.
    assert max(int(r.codes[1:].max()) for r in alone) >= engine.codec.config.codebook_size


def test_previous_is_an_earlier_turn_of_the_conversation(engine, s2_dir, golden_requests, monkeypatch):
    """`previous` (what an earlier request spoke, as the live socket carries it) enters the prompt as the
    reference's later batches carry theirs: the golden multibatch's first batch as `previous` and its second
    batch's text give the golden second prompt, residual codes past the codec's codebook included."""
    req = next(r for r in golden_requests if r["name"] == "multibatch")
    g = np.load(s2_dir / req["file"])
    first, second = speaker_batches(req["text"], req["chunk_length"])
    assert int(g["codes"][1:].max()) >= engine.codec.config.codebook_size
    prompts = []
    real = engine._prompt

    def spy(*args, **kwargs):
        prompt, budget = real(*args, **kwargs)
        prompts.append(prompt)
        return prompt, budget

    monkeypatch.setattr(engine, "_prompt", spy)
    base = as_s2_request(s2_dir, req, codes=True)
    engine.run(SynthesisRequest(text=second, references=base.references, seed=1, max_new_tokens=4,
                                previous=(first, g["codes"])))
    np.testing.assert_array_equal(prompts[0].numpy(), g["prompt_1"])


def test_a_streamed_multibatch_request_matches_its_one_shot_audio(engine, s2_dir, golden_requests):
    req = next(r for r in golden_requests if r["name"] == "multibatch")
    request = as_s2_request(s2_dir, req, codes=True)
    streamed = np.concatenate(list(engine.synthesize(request)))
    whole = engine.run(request).audio
    assert streamed.shape == whole.shape
    assert float(np.linalg.norm(streamed - whole) / np.linalg.norm(whole)) < 1e-4


def test_carried_turns_that_no_longer_fit_are_dropped_oldest_first(engine, s2_dir, monkeypatch):
    """The prompt may take max_seq_len - 2048 positions (the reference refuses more). A carried turn that makes it
    too long is left out rather than failing the request; the reference has no such case (it never carries
    another request's turn), so this is shoal's rule, as S1's carried segment."""
    limit = engine.model.config.max_seq_len - 2048
    seen = []
    real = engine._prompt

    def spy(text, references, previous, *args, **kwargs):
        seen.append(sum(codes.shape[1] for _, codes in previous))
        return real(text, references, previous, *args, **kwargs)

    monkeypatch.setattr(engine, "_prompt", spy)
    long_codes = np.zeros((10, limit), dtype=np.int64)
    engine.run(SynthesisRequest(text="Short.", seed=1, max_new_tokens=4, previous=("Long.", long_codes)))  # no error
    assert seen == [limit, 0]


@pytest.mark.parametrize("condition", [True, False])
def test_condition_on_previous_decides_whether_batches_carry_the_conversation(engine, monkeypatch, condition):
    carried = []
    real = engine._prompt

    def spy(text, references, previous, *args, **kwargs):
        carried.append([turn_text for turn_text, _ in previous])
        return real(text, references, previous, *args, **kwargs)

    monkeypatch.setattr(engine, "_prompt", spy)
    text = "<|speaker:0|>One.<|speaker:1|>Two.<|speaker:0|>Three."
    engine.run(SynthesisRequest(text=text, seed=3, max_new_tokens=6, chunk_length=20,
                                condition_on_previous=condition))
    if condition:
        assert carried == [[], ["<|speaker:0|>One."], ["<|speaker:0|>One.", "<|speaker:1|>Two."]]
    else:
        assert carried == [[], [], []]


def test_text_before_the_first_speaker_tag_is_refused_not_dropped(engine):
    """fish-speech 2.0 drops it silently; shoal says so before anything is queued. Leading whitespace is fine."""
    with pytest.raises(BadRequest, match="before the first <|speaker:N|> tag"):
        engine.run(SynthesisRequest(text="Hello. <|speaker:0|>Hi.", seed=1, max_new_tokens=4))
    assert engine.run(SynthesisRequest(text="  <|speaker:0|>Hi.", seed=1, max_new_tokens=4)).frames_generated
