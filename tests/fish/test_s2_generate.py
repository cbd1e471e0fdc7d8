"""S2 prompts and seeded generation against fish-speech 2.0's goldens (tests/fixtures/fish-s2-tiny), batch by batch:
speaker-turn batches, the conversation carried in each later prompt, one generator running on across batches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shoal.fish.checkpoint import load_dual_ar, load_tokenizer
from shoal.fish.conversation import build_s2_prompt
from shoal.fish.generate import DecodeBatch, decode_one_token, generate, is_last, prefill, s2_sampling
from shoal.fish.sampling import SamplingParams
from shoal.text import speaker_batches

from support import batch_outputs, reference_codes, s2_requests, transcript

NAMES = ["single", "noref", "two_speakers", "tags", "cjk", "multibatch"]


@pytest.fixture(scope="module")
def fixture_dir(s2_fixture_dir):
    return s2_fixture_dir


@pytest.fixture(scope="module")
def requests(fixture_dir) -> dict[str, dict]:
    return {r["name"]: r for r in s2_requests(fixture_dir)}


@pytest.fixture(scope="module")
def tok(fixture_dir):
    return load_tokenizer(fixture_dir)


@pytest.fixture(scope="module")
def model(fixture_dir, tok):
    model = load_dual_ar(fixture_dir, tok, torch.device("cpu"), torch.float32)
    model.setup_caches(batch=4, seq_len=1024)
    return model


def golden(fixture_dir, req):
    return np.load(fixture_dir / req["file"])


def references(fixture_dir, req) -> list[tuple[str, np.ndarray]]:
    return [(transcript(fixture_dir, k), reference_codes(fixture_dir, k)) for k in req["references"]]


def test_the_goldens_cover_what_they_claim(requests):
    assert sorted(requests) == sorted(NAMES)
    assert len(requests["multibatch"]["batches"]) >= 2
    assert any(b["ras_fallback_frames"] for r in requests.values() for b in r["batches"])  # RAS did replace
    assert all(b["residual_codes_ge_1024"] for r in requests.values() for b in r["batches"])


@pytest.mark.parametrize("name", NAMES)
def test_batches_and_prompts_match_the_reference(fixture_dir, requests, tok, name):
    """Every batch's prompt, the later ones carrying the earlier batches' text and codes (all frames but the last,
    as the reference's goldens show them)."""
    req = requests[name]
    g = golden(fixture_dir, req)
    prompts, frames = batch_outputs(g, "prompt"), batch_outputs(g, "frames")
    batches = speaker_batches(req["text"], req["chunk_length"])
    assert len(batches) == len(req["batches"]) == len(prompts)
    turns = []
    for text, expected, generated in zip(batches, prompts, frames):
        prompt = build_s2_prompt(tok, text, references(fixture_dir, req), turns)
        assert prompt.dtype == torch.int32
        assert prompt.shape == expected.shape
        np.testing.assert_array_equal(prompt.numpy(), expected)
        turns.append((text, generated[1:, :-1]))


@pytest.mark.parametrize("name", NAMES)
def test_seeded_frames_match_the_reference(fixture_dir, requests, model, tok, name):
    """generate() batch after batch with one generator, seeded once, as the reference's global one: every frame
    (slow token and all codes, the last frame included) equal."""
    assert s2_sampling(model)
    req = requests[name]
    g = golden(fixture_dir, req)
    generator = torch.Generator().manual_seed(req["seed"])
    params = SamplingParams(req["temperature"], req["top_p"])
    for prompt, expected in zip(batch_outputs(g, "prompt"), batch_outputs(g, "frames")):
        frames = list(generate(model, torch.from_numpy(prompt), params, generator, req["max_new_tokens"],
                               tok.im_end_id))
        np.testing.assert_array_equal(torch.stack(frames, dim=1).numpy(), expected)


def test_seeded_frames_match_the_reference_in_a_batch_of_four(fixture_dir, requests, model, tok):
    """Four different golden requests (their first batches) decoding side by side in one DecodeBatch, each row
    with its own generator, parameters and RAS window: each gets exactly its golden frames."""
    names = ["single", "two_speakers", "cjk", "multibatch"]
    reqs = [requests[n] for n in names]
    prompts = [torch.from_numpy(golden(fixture_dir, r)["prompt"]) for r in reqs]
    expected = [golden(fixture_dir, r)["frames"] for r in reqs]
    batch = DecodeBatch(model, 4)
    frames: list[list] = [[] for _ in reqs]
    active = []  # request index per slot
    for i, (req, prompt) in enumerate(zip(reqs, prompts)):
        slot = batch.add(prompt.shape[1], req["max_new_tokens"], SamplingParams(req["temperature"], req["top_p"]),
                         torch.Generator().manual_seed(req["seed"]), tok.im_end_id)
        frames[i].append(prefill(model, batch, slot, prompt))
        active.append(i)
    while active:
        step = decode_one_token(model, batch)
        done = []
        for slot, i in enumerate(active):
            frames[i].append(step[slot])
            if is_last(int(step[slot, 0]), batch.produced[slot], reqs[i]["max_new_tokens"], tok.im_end_id):
                done.append(slot)
        for slot in sorted(done, reverse=True):  # the last row moves into the freed slot, as the scheduler's
            moved = batch.remove(slot)
            if moved is not None:
                active[slot] = active[moved]
            active.pop()
    for name, got, want in zip(names, frames, expected):
        np.testing.assert_array_equal(torch.stack(got, dim=1).numpy(), want, err_msg=name)
