"""build_s2_prompt: the conversation fish-speech 2.0 encodes, piece by piece (a recording tokenizer), and
against the reference's own prompts (the golden fixture)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shoal.fish.conversation import build_s2_prompt

BEGIN = 5000


class RecordingTokenizer:
    """Encodes each character as its code point and records the pieces it was asked to encode, in order."""

    semantic_begin_id = BEGIN
    num_semantic = 64

    def __init__(self):
        self.pieces: list[str] = []

    def encode(self, text: str) -> list[int]:
        self.pieces.append(text)
        return [ord(ch) for ch in text]


def codes(frames: int, start: int, n: int = 10) -> np.ndarray:
    return (np.arange(n * frames).reshape(n, frames) + start) % 64


def test_without_references_the_system_message_is_the_plain_instruction():
    tok = RecordingTokenizer()
    prompt = build_s2_prompt(tok, "Hello")
    assert tok.pieces == ["<|im_start|>system\n", "convert the provided text to speech", "<|im_end|>\n",
                          "<|im_start|>user\n", "Hello", "<|im_end|>\n", "<|im_start|>assistant\n<|voice|>"]
    assert prompt.dtype == torch.int32 and prompt.shape[0] == 11
    assert prompt[0].tolist() == [ord(ch) for ch in "".join(tok.pieces)]
    assert not prompt[1:].any()


def test_references_are_speakers_in_order_and_their_codes_one_vq_piece():
    tok = RecordingTokenizer()
    a, b = codes(3, 0), codes(2, 7)
    prompt = build_s2_prompt(tok, "<|speaker:1|>Go.", [("First clip.", a), ("<|speaker:7|>Second.", b)])
    text_before = ["<|im_start|>system\n",
                   "convert the provided text to speech reference to the following:\n\nText:\n",
                   "<|speaker:0|>First clip.\n<|speaker:7|>Second.",  # a tagged transcript keeps its own tag
                   "\n\nSpeech:\n"]
    text_after = ["<|im_end|>\n", "<|im_start|>user\n", "<|speaker:1|>Go.", "<|im_end|>\n",
                  "<|im_start|>assistant\n<|voice|>"]
    assert tok.pieces == text_before + text_after
    n = sum(len(p) for p in text_before)
    both = np.concatenate([a, b], axis=1)
    assert prompt[0, n : n + 5].tolist() == (both[0] + BEGIN).tolist()
    assert np.array_equal(prompt[1:, n : n + 5].numpy(), both)
    assert not prompt[1:, :n].any() and not prompt[1:, n + 5 :].any()
    assert prompt.shape[1] == n + 5 + sum(len(p) for p in text_after)


def test_earlier_turns_are_user_and_assistant_messages_with_their_codes():
    tok = RecordingTokenizer()
    first, second = codes(4, 1), codes(0, 0)  # a turn may carry no frames at all
    first[3, 2] = 63  # residual codes past a 1024-entry codebook would pass as they are; here the top of 64
    prompt = build_s2_prompt(tok, "third", [], [("one", first), ("two", second)])
    assert tok.pieces == ["<|im_start|>system\n", "convert the provided text to speech", "<|im_end|>\n",
                          "<|im_start|>user\n", "one", "<|im_end|>\n", "<|im_start|>assistant\n<|voice|>",
                          "<|im_end|>\n",
                          "<|im_start|>user\n", "two", "<|im_end|>\n", "<|im_start|>assistant\n<|voice|>",
                          "<|im_end|>\n",
                          "<|im_start|>user\n", "third", "<|im_end|>\n", "<|im_start|>assistant\n<|voice|>"]
    n = sum(len(p) for p in tok.pieces[:7])
    assert prompt[0, n : n + 4].tolist() == (first[0] + BEGIN).tolist()
    assert np.array_equal(prompt[1:, n : n + 4].numpy(), first)
    assert prompt[1:].count_nonzero() == np.count_nonzero(first)


def test_codes_out_of_the_semantic_range_are_refused():
    with pytest.raises(ValueError):
        build_s2_prompt(RecordingTokenizer(), "x", [("t", codes(2, 0) + 64)])
    with pytest.raises(ValueError):
        build_s2_prompt(RecordingTokenizer(), "x", [], [("t", codes(2, 0, n=9))])
