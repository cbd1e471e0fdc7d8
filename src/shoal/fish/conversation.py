"""The prompt tensor an S2 model continues: a ChatML conversation, built exactly as fish-speech 2.0's
`Conversation.encode_for_inference` builds it for its `generate_long`.

Pieces, in order (each text piece is tokenised on its own, with special tokens parsed inline, so BPE never merges
across pieces):

    <|im_start|>system\\n
      with references:    "convert the provided text to speech reference to the following:\\n\\nText:\\n"
                          the transcripts, each prefixed <|speaker:i|> (i: its place) unless it has a speaker
                          tag already, joined by "\\n"
                          "\\n\\nSpeech:\\n"
                          every reference's codes, concatenated along time (one VQ piece)
      without:            "convert the provided text to speech"
    <|im_end|>\\n
    for each earlier turn of the conversation:
      <|im_start|>user\\n   its text   <|im_end|>\\n
      <|im_start|>assistant\\n<|voice|>   its codes (a VQ piece)   <|im_end|>\\n
    <|im_start|>user\\n   text   <|im_end|>\\n
    <|im_start|>assistant\\n<|voice|>

A VQ piece of codes `[num_codebooks, F]` is F positions whose row 0 holds `semantic_begin_id + code0` and rows
1.. the codes (residual codes as they are, even past the codec's codebook); elsewhere rows 1.. are 0. This is
S1's layout (`prompt.assemble`). The reference's `audio_masks`/`audio_parts` are None for such prompts (they come
from audio-feature parts, which no TTS prompt has), so the tensor is the whole input: the model embeds it as S1
prompts are embedded (`DualARTransformer.embed`), scaling semantic positions when the config says so.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence

import numpy as np
from torch import Tensor

from .prompt import Codes, assemble, reference_codes
from .tokenizer import IM_END_TOKEN as IM_END

IM_START = "<|im_start|>"
VOICE = "<|voice|>"
SYSTEM_WITH_REFERENCES = "convert the provided text to speech reference to the following:\n\nText:\n"
REFERENCE_SPEECH = "\n\nSpeech:\n"
SYSTEM_PLAIN = "convert the provided text to speech"
#: A speaker tag anywhere in a transcript: such a transcript is not tagged again.
HAS_SPEAKER_TAG = re.compile(r"<\|speaker:\d+\|>")


def speaker_tag(index: int) -> str:
    return f"<|speaker:{index}|>"


def tagged_transcript(index: int, transcript: str) -> str:
    """The i-th reference's transcript as the system message shows it: speaker i's, unless it names a speaker."""
    return transcript if HAS_SPEAKER_TAG.search(transcript) else speaker_tag(index) + transcript


def conversation_pieces(references: Sequence[tuple[str, np.ndarray]], turns: Sequence[tuple[str, np.ndarray]],
                        text: str) -> Iterator[str | np.ndarray]:
    """The conversation's pieces in order: strings (text pieces) and codes arrays (VQ pieces)."""
    yield f"{IM_START}system\n"
    if references:
        yield SYSTEM_WITH_REFERENCES
        yield "\n".join(tagged_transcript(i, transcript) for i, (transcript, _) in enumerate(references))
        yield REFERENCE_SPEECH
        yield np.concatenate([codes for _, codes in references], axis=1)
    else:
        yield SYSTEM_PLAIN
    yield f"{IM_END}\n"
    for turn_text, codes in turns:
        yield from _user(turn_text)
        yield _assistant_start()
        yield codes
        yield f"{IM_END}\n"
    yield from _user(text)
    yield _assistant_start()


def _user(text: str) -> Iterator[str]:
    yield f"{IM_START}user\n"
    yield text
    yield f"{IM_END}\n"


def _assistant_start() -> str:
    return f"{IM_START}assistant\n{VOICE}"


def build_s2_prompt(
    tokenizer,
    text: str,
    references: Sequence[tuple[str, Codes]] = (),
    turns: Sequence[tuple[str, Codes]] = (),
    num_codebooks: int = 10,
) -> Tensor:
    """The int32 prompt `[num_codebooks + 1, L]` for `text`, after zero or more (transcript, codes) references
    (reference i is speaker i) and the conversation's earlier turns, each (text, codes it was spoken with: all
    frames but the last, as the reference carries them). Texts and transcripts are used verbatim.

    `tokenizer` is an S2 tokenizer: `encode(text)` parses special tokens inline, `semantic_begin_id`,
    `num_semantic`."""
    if not isinstance(text, str):
        raise TypeError(f"text must be str, got {type(text).__name__}")
    refs = [(transcript, reference_codes(codes, num_codebooks, tokenizer.num_semantic))
            for transcript, codes in references]
    earlier = [(turn_text, reference_codes(codes, num_codebooks, tokenizer.num_semantic))
               for turn_text, codes in turns]

    def ids(piece: str | np.ndarray) -> tuple[list[int], np.ndarray | None]:
        if isinstance(piece, str):
            return tokenizer.encode(piece), None
        return (piece[0] + tokenizer.semantic_begin_id).tolist(), piece

    return assemble((ids(piece) for piece in conversation_pieces(refs, earlier, text)), num_codebooks)
