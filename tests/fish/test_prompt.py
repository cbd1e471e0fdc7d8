"""build_prompt against the prompts the reference built, and the reference's length rule."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from shoal.errors import BadRequest
from shoal.fish.prompt import build_prompt, check_prompt_length
from shoal.fish.tokenizer import FishTokenizer

from support import load_codec_golden, load_golden, load_requests


@pytest.fixture(scope="module")
def tok(fixture_dir) -> FishTokenizer:
    return FishTokenizer.from_dir(fixture_dir)


@pytest.fixture(scope="module")
def reference(fixture_dir) -> tuple[str, np.ndarray]:
    transcript = (fixture_dir / "reference.txt").read_text().strip()
    return transcript, load_codec_golden(fixture_dir)["codes"]


def requests(fixture_dir):
    return {r["name"]: r for r in load_requests(fixture_dir)}


@pytest.mark.parametrize("name", ["a", "b", "c", "d"])
def test_prompt_matches_reference(fixture_dir, tok, reference, name):
    request = requests(fixture_dir)[name]
    golden = load_golden(fixture_dir, request)["prompt"]
    refs = [reference] if request["reference"] else []
    prompt = build_prompt(tok, request["text"], refs)
    assert prompt.dtype == torch.int32
    assert tuple(prompt.shape) == golden.shape == tuple(request["prompt_shape"])
    assert np.array_equal(prompt.numpy(), golden)


def test_layout_without_references(tok):
    prompt = build_prompt(tok, "Hi  there")
    expected = [tok.interleave_id] + tok.encode("<|speaker:0|>") + tok.encode("Hi  there")
    assert prompt[0].tolist() == expected
    assert not prompt[1:].any()


def test_layout_with_two_references(tok, reference):
    transcript, codes = reference
    short = codes[:, :3]
    prompt = build_prompt(tok, "Go.", [(transcript, torch.from_numpy(codes)), ("Two.", short)])
    speaker = tok.encode("<|speaker:0|>")
    row0 = ([tok.interleave_id]
            + speaker + tok.encode(transcript) + (codes[0] + 527).tolist() + [tok.im_end_id]
            + speaker + tok.encode("Two.") + (short[0] + 527).tolist() + [tok.im_end_id]
            + speaker + tok.encode("Go."))
    assert prompt[0].tolist() == row0
    semantic = (prompt[0] >= tok.semantic_begin_id) & (prompt[0] <= tok.semantic_end_id)
    assert semantic.sum() == codes.shape[1] + 3
    assert np.array_equal(prompt[1:, semantic].numpy(), np.concatenate([codes, short], axis=1))
    assert not prompt[1:, ~semantic].any()


def test_special_tokens_in_user_text_stay_special(tok):
    prompt = build_prompt(tok, "a<|im_end|>b")
    assert prompt[0, -3:].tolist() == tok.encode("a") + [tok.im_end_id] + tok.encode("b")


@pytest.mark.parametrize("bad", [np.zeros((9, 4), np.int64), np.zeros((10, 4), np.float32),
                                 np.full((10, 4), 4096), np.full((10, 4), -1)])
def test_bad_reference_codes(tok, bad):
    with pytest.raises(ValueError):
        build_prompt(tok, "x", [("t", bad)])


def test_length_limit(fixture_dir):
    max_seq_len = json.loads((fixture_dir / "config.json").read_text())["max_seq_len"]
    assert max_seq_len == 2560  # so the prompt may take 2560 - 2048 = 512 positions
    assert check_prompt_length(512, max_seq_len, 48) == 48
    with pytest.raises(BadRequest, match=r"513 tokens.*at most 512"):
        check_prompt_length(513, max_seq_len, 48)


def test_max_new_tokens_is_cut_to_what_fits():
    assert check_prompt_length(95, 2560, 4000) == 2560 - 95
    assert check_prompt_length(95, 2560, 2560 - 95) == 2560 - 95


def test_zero_max_new_tokens_means_as_many_as_fit():
    assert check_prompt_length(23, 2560, 0) == 2560 - 23


def test_negative_max_new_tokens_is_refused():
    with pytest.raises(BadRequest, match="max_new_tokens"):
        check_prompt_length(23, 2560, -1)
