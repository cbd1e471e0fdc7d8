"""Text segmentation: short texts pass through untouched, long ones split at natural breaks."""

from __future__ import annotations

import pytest

from shoal.text import speaker_batches, speaker_turns, split_text

LONG = ('Hello there. This is a "quoted sentence." And here, with commas, is a much longer clause that goes '
        "on; and on: forever and ever without any end in sight whatsoever.")


@pytest.mark.parametrize("text", ["", "Hi.", "  spaced   out  ", LONG])
def test_text_within_chunk_length_is_returned_verbatim(text):
    assert split_text(text, 1000) == [text]
    assert split_text(text, 0) == [text]


@pytest.mark.parametrize("limit", [20, 40, 60, 100])
def test_segments_respect_the_limit_and_keep_every_word(limit):
    segments = split_text(LONG, limit)
    assert all(0 < len(s) <= limit for s in segments)
    assert " ".join(segments).split() == LONG.split()


def test_sentence_ends_are_preferred_and_closing_quotes_stay():
    assert split_text(LONG, 60)[0] == 'Hello there. This is a "quoted sentence."'


def test_cjk_splits_after_full_stops_without_spaces():
    assert split_text("你好。我是一个测试。这是第三句话，很长很长。", 8) == ["你好。", "我是一个测试。", "这是第三句话，", "很长很长。"]


def test_unbreakable_runs_are_cut_hard():
    assert split_text("a" * 25, 10) == ["a" * 10, "a" * 10, "a" * 5]


def test_min_length_joins_a_short_segment_to_its_neighbour():
    middle = "Then a sentence that is long enough. Hi. Ok. And one more that is long enough too."
    assert split_text(middle, 38) == ["Then a sentence that is long enough.", "Hi. Ok.",
                                      "And one more that is long enough too."]
    assert split_text(middle, 38, min_length=10) == ["Then a sentence that is long enough. Hi. Ok.",
                                                     "And one more that is long enough too."]
    first = "Ok. Then a sentence that is long enough. And one more that is long enough too."
    assert split_text(first, 38, min_length=10)[0].startswith("Ok. Then")  # the first joins the one after


# -- S2: speaker turns and batches (fish-speech 2.0's split_text_by_speaker / group_turns_into_batches) ----------

def test_speaker_turns_start_at_tags_and_drop_text_before_the_first():
    text = "lost words <|speaker:0|> Hi there. \n<|speaker:1|>Hello!<|speaker:0|>"
    assert speaker_turns(text) == ["<|speaker:0|> Hi there.", "<|speaker:1|>Hello!", "<|speaker:0|>"]
    assert speaker_turns("no tags at all") == []
    assert speaker_turns("<|speaker:x|> is no tag") == []


def test_text_without_tags_is_one_batch_verbatim():
    text = "  Plain text, " + "long " * 200
    assert speaker_batches(text, 100) == [text]


def test_batches_hold_at_most_five_turns():
    text = "".join(f"<|speaker:{i % 2}|>t{i}" for i in range(12))
    batches = speaker_batches(text, 1000)
    assert [b.count("<|speaker:") for b in batches] == [5, 5, 2]
    assert batches[0] == "<|speaker:0|>t0\n<|speaker:1|>t1\n<|speaker:0|>t2\n<|speaker:1|>t3\n<|speaker:0|>t4"


def test_batches_are_bounded_in_utf8_bytes_not_characters():
    turn = "<|speaker:0|>" + "你" * 10  # 13 + 30 bytes, 23 characters
    assert len(turn.encode("utf-8")) == 43
    assert speaker_batches(turn * 3, 86) == [turn + "\n" + turn, turn]  # the newline is not counted
    assert speaker_batches(turn * 3, 85) == [turn, turn, turn]
    assert speaker_batches(turn * 2, 10) == [turn, turn]  # a turn longer than the limit is a batch of its own


def test_chunk_length_zero_means_no_byte_limit():
    text = "".join(f"<|speaker:{i}|>" + "word " * 50 for i in range(7))
    assert [b.count("<|speaker:") for b in speaker_batches(text, 0)] == [5, 2]
