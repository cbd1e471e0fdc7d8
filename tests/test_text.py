"""Text segmentation: short texts pass through untouched, long ones split at natural breaks."""

from __future__ import annotations

import pytest

from shoal.text import split_text

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
