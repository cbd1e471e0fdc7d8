"""The fish-s2-tiny fixture (tests/fixtures/fish-s2-tiny, made by tools/reference/s2/make_fixture.py) through
shoal's S2 loading: the checkpoint loads strictly, the config flattens as the reference flattened it, the tokenizer
gives the reference's prompt ids, and teacher-forced slow and first-frame fast logits match the reference's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from shoal.fish.checkpoint import (
    check_checkpoint_dir,
    load_dual_ar,
    load_tokenizer,
    read_config,
    s2_official_key,
)
from shoal.fish.tokenizer_s2 import S2Tokenizer
from shoal.layout import checkpoint_kind, s2_weight_shards

# Float32 on the CPU: shoal and the reference sum in different orders (attention over L keys vs the whole cache,
# one matmul vs per-row products), so logits agree to about 1e-5, not bit for bit.
LOGITS_ATOL = 1e-4
HIDDEN_ATOL = 1e-5
# The system message's text piece after the reference transcripts (fish_speech/models/text2semantic/inference.py).
SPEECH_HEADER = "\n\nSpeech:\n"


@pytest.fixture(scope="module")
def s2_fixture(s2_fixture_dir) -> Path:
    return s2_fixture_dir


@pytest.fixture(scope="module")
def summary(s2_fixture) -> dict:
    return json.loads((s2_fixture / "requests.json").read_text())


@pytest.fixture(scope="module")
def tokenizer(s2_fixture) -> S2Tokenizer:
    return load_tokenizer(s2_fixture)


@pytest.fixture(scope="module")
def model(s2_fixture, tokenizer):
    return load_dual_ar(s2_fixture, tokenizer, torch.device("cpu"), torch.float32)


def golden(s2_fixture, request: dict) -> dict[str, np.ndarray]:
    with np.load(s2_fixture / request["file"]) as data:
        return {k: data[k] for k in data.files}


def test_fixture_is_an_s2_checkpoint_and_loads_strictly(s2_fixture, summary, tokenizer, model):
    assert checkpoint_kind(s2_fixture) == "s2" and check_checkpoint_dir(s2_fixture) == s2_fixture
    assert tokenizer.im_end_id == summary["im_end_id"]
    assert tokenizer.semantic_begin_id == summary["semantic_begin_id"] and tokenizer.num_semantic == 4096
    stored = {}
    for shard in s2_weight_shards(s2_fixture):
        stored.update(load_file(s2_fixture / shard))
    assert len(stored) == summary["checkpoint"]["verified"]["model_keys"]
    for name, tensor in model.state_dict().items():  # every parameter is the file's tensor of its official name
        torch.testing.assert_close(tensor, stored.pop(s2_official_key(name)).float(), rtol=0, atol=0)
    assert not stored


def test_config_flattens_as_the_reference_flattened_it(s2_fixture, summary):
    reference = dict(summary["checkpoint"]["verified"]["flattened_config"])
    ours = read_config(s2_fixture).to_dict()
    assert {k: ours[k] for k in reference} == reference
    # What shoal's config has beyond the reference's flat fields: its defaults, inert at inference.
    assert set(ours) - set(reference) <= {"fast_attention_qk_norm", "is_reward_model"} | set(reference)


def text_runs(tokenizer: S2Tokenizer, row: list[int]) -> list[list[int]]:
    """The runs of ordinary (not added) token ids between added tokens in a prompt's row 0."""
    runs, run = [], []
    for token_id in row:
        if token_id in tokenizer.special_ids.values():
            if run:
                runs.append(run)
            run = []
        else:
            run.append(token_id)
    return runs + ([run] if run else [])


def test_tokenizer_reproduces_the_reference_prompts(s2_fixture, summary, tokenizer):
    """Every run of text ids between added tokens in every prompt the reference built is what shoal encodes for its
    text. The reference encodes its prompt piece by piece; the one piece boundary inside such a run is the system
    message's reference transcript followed by its own piece SPEECH_HEADER (fish's inference.py)."""
    checked = 0
    for request in summary["requests"]:
        data = golden(s2_fixture, request)
        for name in sorted(k for k in data if k.startswith("prompt")):
            for run in text_runs(tokenizer, data[name][0].tolist()):
                text = tokenizer.decode(run)
                if text.endswith(SPEECH_HEADER) and text != SPEECH_HEADER:
                    expected = tokenizer.encode(text[: -len(SPEECH_HEADER)]) + tokenizer.encode(SPEECH_HEADER)
                else:
                    expected = tokenizer.encode(text)
                assert run == expected, (request["name"], name, text)
                checked += 1
        first_turn = request["text"].split("<|speaker:")[0]  # the whole text unless it has speaker tags
        if first_turn:  # the user's text, as one piece of the first prompt
            row, piece = data["prompt"][0].tolist(), tokenizer.encode(first_turn)
            assert any(row[i:i + len(piece)] == piece for i in range(len(row) - len(piece) + 1)), request["name"]
    assert checked > 3 * len(summary["requests"])


def test_teacher_forced_slow_logits_match_the_reference(s2_fixture, summary, model):
    checked = 0
    for request in summary["requests"]:
        data = golden(s2_fixture, request)
        prompt = torch.from_numpy(data["prompt"])
        length = prompt.shape[1]
        model.setup_caches(batch=1, seq_len=length)
        positions = torch.arange(length)[None]
        with torch.inference_mode():
            logits, hidden = model.forward_slow(prompt[None], positions, all_positions=True)
            last_logits, last_hidden = model.forward_slow(prompt[None], positions)
        if "logits" in data:
            np.testing.assert_allclose(logits[0].numpy(), data["logits"], rtol=0, atol=LOGITS_ATOL)
            checked += 1
        np.testing.assert_allclose(hidden[0].numpy(), data["hidden"], rtol=0, atol=HIDDEN_ATOL)
        np.testing.assert_allclose(last_logits[0].numpy(), data["prefill_logits"], rtol=0, atol=LOGITS_ATOL)
        np.testing.assert_allclose(last_hidden[0].numpy(), data["prefill_hidden"], rtol=0, atol=HIDDEN_ATOL)
    assert checked >= 2  # the fixture keeps full logits for some requests only


def test_first_frame_fast_logits_match_the_reference(s2_fixture, summary, model):
    """Fast position 0 reads the slow stack's (normed) hidden state; position k reads the embedding of codebook k-1's
    code of the first generated frame (codebook 0's is clamp(token - semantic_begin))."""
    model.setup_caches(batch=1, seq_len=8)
    for request in summary["requests"]:
        data = golden(s2_fixture, request)
        codes = torch.from_numpy(data["frames"][1:, 0])
        x = torch.from_numpy(data["prefill_hidden"])[None]
        out = []
        with torch.inference_mode():
            for k in range(model.config.num_codebooks):
                out.append(model.forward_fast(x, k)[0])
                x = model.fast_embeddings(codes[k : k + 1])
        np.testing.assert_allclose(torch.stack(out).numpy(), data["fast_logits"], rtol=0, atol=LOGITS_ATOL)
