"""The prompt tensor the S1 model continues, built exactly as the reference builds it.

Layout (each piece is tokenised on its own, so BPE never merges across pieces):

    <|interleave|>
    for each reference:  <|speaker:0|>  transcript  <semantic token per codec frame>  <|im_end|>
    <|speaker:0|>  text

and nothing else: no `<|im_start|>`, no role marker, no trailing newline; generation starts right after `text`.
`<|speaker:0|>` is not a special token of the S1 vocabulary, so it goes through BPE like ordinary text.

The tensor is int32 `[1 + num_codebooks, L]`: row 0 holds token ids; at a codec frame row 0 holds
`semantic_begin_id + code0` and rows 1.. hold the frame's codes; elsewhere rows 1.. are 0.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

from shoal.errors import BadRequest
from shoal.layout import GENERATION_HEADROOM

from .tokenizer import IM_END_TOKEN, INTERLEAVE_TOKEN, FishTokenizer

SPEAKER = "<|speaker:0|>"

Codes = Tensor | np.ndarray


def reference_codes(codes: Codes, num_codebooks: int, num_semantic: int) -> np.ndarray:
    """Validate one reference's codes `[num_codebooks, F]` and return them as int32 numpy.

    The reference would silently wrap, broadcast or KeyError on bad codes; codes come from our own codec, so a
    bad array here is a programming error (ValueError), not a user error."""
    if isinstance(codes, Tensor):
        codes = codes.detach().cpu().numpy()
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[0] != num_codebooks:
        raise ValueError(f"reference codes must be [{num_codebooks}, frames], got {list(codes.shape)}")
    if not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"reference codes must be integers, got {codes.dtype}")
    if codes.size and (codes.min() < 0 or codes.max() >= num_semantic):
        raise ValueError(f"reference codes must lie in [0, {num_semantic}), got {codes.min()}..{codes.max()}")
    return codes.astype(np.int32)


def prompt_pieces(tokenizer: FishTokenizer, text: str, references: Sequence[tuple[str, np.ndarray]]):
    """Yield (row-0 ids, codes or None) for each piece, in order. Text pieces are encoded one by one with the
    same `encode` the reference uses, special tokens included (`<|interleave|>`, `<|im_end|>`)."""
    yield tokenizer.encode(INTERLEAVE_TOKEN), None
    for transcript, codes in references:
        yield tokenizer.encode(SPEAKER), None
        yield tokenizer.encode(transcript), None
        yield (codes[0] + tokenizer.semantic_begin_id).tolist(), codes
        yield tokenizer.encode(IM_END_TOKEN), None
    yield tokenizer.encode(SPEAKER), None
    yield tokenizer.encode(text), None


def build_prompt(
    tokenizer: FishTokenizer,
    text: str,
    references: Sequence[tuple[str, Codes]] = (),
    num_codebooks: int = 10,
) -> Tensor:
    """The int32 prompt `[num_codebooks + 1, L]` for `text` after zero or more (transcript, codes) references.

    `text` and transcripts are used verbatim (callers strip transcripts, as the reference's caller does)."""
    if not isinstance(text, str):
        raise TypeError(f"text must be str, got {type(text).__name__}")
    refs = [(transcript, reference_codes(codes, num_codebooks, tokenizer.num_semantic))
            for transcript, codes in references]
    return assemble(prompt_pieces(tokenizer, text, refs), num_codebooks)


def assemble(pieces: Iterable[tuple[list[int], np.ndarray | None]], num_codebooks: int) -> Tensor:
    """The int32 prompt `[num_codebooks + 1, L]` from (row-0 ids, codes or None) pieces, in order: a piece with
    codes `[num_codebooks, F]` fills rows 1.. under its ids, elsewhere rows 1.. are 0."""
    pieces = list(pieces)
    length = sum(len(ids) for ids, _ in pieces)
    prompt = np.zeros((num_codebooks + 1, length), dtype=np.int32)
    pos = 0
    for ids, codes in pieces:
        prompt[0, pos : pos + len(ids)] = ids
        if codes is not None:
            prompt[1:, pos : pos + len(ids)] = codes
        pos += len(ids)
    return torch.from_numpy(prompt)


def check_prompt_length(prompt_len: int, max_seq_len: int, max_new_tokens: int) -> int:
    """The number of frames to generate for a prompt of `prompt_len` tokens, or BadRequest.

    The reference's rules, in its order:
    - the prompt may take at most `max_seq_len - 2048` positions (else "Prompt is too long");
    - `max_new_tokens == 0` means "as many as fit": `max_seq_len - prompt_len`;
    - otherwise it is cut so that prompt + generated frames fit in `max_seq_len`.
    A negative `max_new_tokens` is refused here; the reference would quietly generate a single frame.
    S2's reference (fish-speech 2.0's `generate_long` and `generate`) has the same rules, on the whole
    conversation prompt of each batch.
    """
    if prompt_len < 1:
        raise ValueError(f"prompt_len must be positive, got {prompt_len}")
    limit = max_seq_len - GENERATION_HEADROOM
    if prompt_len > limit:
        raise BadRequest(
            f"prompt is too long: {prompt_len} tokens (text, reference transcripts and reference audio frames), "
            f"but this model accepts at most {limit} (max_seq_len {max_seq_len} minus {GENERATION_HEADROOM} kept "
            f"for generation); use shorter text or shorter references"
        )
    if max_new_tokens < 0:
        raise BadRequest(f"max_new_tokens must be >= 0 (0 means as many as fit), got {max_new_tokens}")
    room = max_seq_len - prompt_len
    if max_new_tokens == 0 or max_new_tokens > room:
        return room
    return max_new_tokens
