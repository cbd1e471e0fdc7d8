"""FishTokenizer against the fixture's vocabulary. Expected ids come from an independent BPE over the ranks."""

from __future__ import annotations

import base64
import json
import logging

import pytest

from shoal.errors import CheckpointError
from shoal.fish.tokenizer import MAX_ENCODE_CHARS, FishTokenizer


@pytest.fixture(scope="module")
def tok(fixture_dir) -> FishTokenizer:
    return FishTokenizer.from_dir(fixture_dir)


@pytest.fixture(scope="module")
def ranks(fixture_dir) -> dict[bytes, int]:
    lines = (fixture_dir / "tokenizer.tiktoken").read_text().splitlines()
    return {base64.b64decode(t): int(r) for t, r in (line.split() for line in lines if line)}


def bpe(piece: str, ranks: dict[bytes, int]) -> list[int]:
    """Textbook byte-level BPE: repeatedly merge the adjacent pair whose concatenation has the lowest rank."""
    parts = [bytes([b]) for b in piece.encode()]
    while True:
        candidates = [(ranks[a + b], i) for i, (a, b) in enumerate(zip(parts, parts[1:])) if a + b in ranks]
        if not candidates:
            return [ranks[p] for p in parts]
        _, i = min(candidates)
        parts[i : i + 2] = [parts[i] + parts[i + 1]]


def pieces_ids(pieces: list[str], ranks) -> list[int]:
    return [i for p in pieces for i in bpe(p, ranks)]


def test_special_ids_match_the_reference(tok):
    assert tok.im_end_id == 516
    assert tok.interleave_id == 523
    assert tok.semantic_begin_id == 527
    assert tok.semantic_end_id == 4622
    assert tok.num_semantic == 4096
    assert tok.vocab_size == 4623
    assert tok.token_id("<|semantic:17|>") == 527 + 17


def test_ordinary_text_is_plain_bpe(tok, ranks):
    assert tok.encode("Hello world, this is a test.") == pieces_ids(
        ["Hello", " world", ",", " this", " is", " a", " test", "."], ranks)


def test_double_space_quirk(tok, ranks):
    # fish's `\s+(\?!\S)` branch does not exclude the last space: "  " is a piece and "world" loses its space.
    assert tok.encode("hello  world") == pieces_ids(["hello", "  ", "world"], ranks)
    gpt4_style = pieces_ids(["hello", " ", " world"], ranks)
    assert tok.encode("hello  world") != gpt4_style
    assert tok.encode("hello world") == pieces_ids(["hello", " world"], ranks)


def test_special_tokens_are_recognised_inside_text(tok, ranks):
    ids = tok.encode("x<|im_end|>y <|semantic:5|><|interleave|>")
    assert ids == bpe("x", ranks) + [516] + bpe("y", ranks) + bpe(" ", ranks) + [532, 523]


def test_speaker_tag_is_not_special(tok, ranks):
    ids = tok.encode("<|speaker:0|>")
    assert len(ids) > 1 and all(i < 512 for i in ids)
    assert tok.decode(ids) == "<|speaker:0|>"
    with pytest.raises(KeyError):
        tok.token_id("<|speaker:0|>")


@pytest.mark.parametrize("text", ["", "Hello  world!\n\n  tabs\there", "naïve café – 東京 🐟",
                                  "On March 3rd, 2024: 98.6%<|im_end|><|semantic:4095|>"])
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_long_text_is_encoded_in_slices(tok, ranks):
    # The reference encodes 400,000-character slices separately: " he" straddling the cut is two pieces.
    head = "a " * ((MAX_ENCODE_CHARS - 4) // 2) + "ab h"
    assert len(head) == MAX_ENCODE_CHARS
    ids = tok.encode(head + "e")
    assert ids[-2:] == bpe(" h", ranks) + bpe("e", ranks)
    assert bpe(" he", ranks) != ids[-2:]


def test_decode_rejects_unknown_ids(tok):
    with pytest.raises(ValueError, match="4623"):
        tok.decode([4623])


def test_missing_files_raise_checkpoint_error(tmp_path, fixture_dir):
    with pytest.raises(CheckpointError, match="tokenizer.tiktoken"):
        FishTokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.tiktoken").write_bytes((fixture_dir / "tokenizer.tiktoken").read_bytes())
    with pytest.raises(CheckpointError, match="special_tokens.json"):
        FishTokenizer.from_dir(tmp_path)


def test_corrupt_files_raise_checkpoint_error(tmp_path, fixture_dir):
    (tmp_path / "tokenizer.tiktoken").write_text("AA== 0\nnot a rank line at all\n")
    (tmp_path / "special_tokens.json").write_bytes((fixture_dir / "special_tokens.json").read_bytes())
    with pytest.raises(CheckpointError, match="tokenizer.tiktoken"):
        FishTokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.tiktoken").write_bytes((fixture_dir / "tokenizer.tiktoken").read_bytes())
    (tmp_path / "special_tokens.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="special_tokens.json"):
        FishTokenizer.from_dir(tmp_path)


def test_special_ids_follow_position_not_json_values(tmp_path, fixture_dir, caplog):
    specials = json.loads((fixture_dir / "special_tokens.json").read_text())
    (tmp_path / "tokenizer.tiktoken").write_bytes((fixture_dir / "tokenizer.tiktoken").read_bytes())
    (tmp_path / "special_tokens.json").write_text(json.dumps({k: v + 1000 for k, v in specials.items()}))
    with caplog.at_level(logging.WARNING):
        tok = FishTokenizer.from_dir(tmp_path)
    assert tok.im_end_id == 516 and tok.semantic_begin_id == 527
    assert "position" in caplog.text
