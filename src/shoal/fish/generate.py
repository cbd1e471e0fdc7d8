"""Frame-by-frame generation with the dual-AR transformer.

One *frame* is `[slow token, code0, ..., code9]`: the slow transformer samples the token, the fast transformer
then samples codebooks 1..9 (code0 comes from the token). The loop reproduces the reference's quirks, which the
parity fixtures pin down:

- the first frame (prefill) is sampled without repetition penalty;
- later frames are penalised with a 16-column window of a history that holds decode-loop frames only (never the
  prefill frame) and starts as zeros, so early windows contain not-yet-written zero columns;
- the slow token is penalised with the window's FIRST COLUMN across all 11 rows; fast code k with row k+1;
- generation stops after a decode-loop frame whose slow token is `<|im_end|>` (the prefill frame is not
  checked), and the last generated frame is never handed to the codec.

Everything here works on a batch of rows, each with its own position, sampling parameters and generator.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import Tensor

from .dual_ar import DualARTransformer
from .sampling import SamplingParams, params_tensor, sample

PENALTY_WINDOW = 16
# The fast head has codebook_size outputs but residual codebooks have 1024 entries; the reference samples from
# the first 1024 logits only.
RESIDUAL_CODEBOOK_SIZE = 1024


def sample_frame(
    model: DualARTransformer,
    logits: Tensor,
    hidden: Tensor,
    params: Tensor,
    generators: list[torch.Generator],
    window: Tensor | None,
    rows: Tensor | None = None,
    fast: Callable[[Tensor, int, Tensor | None], Tensor] | None = None,
) -> Tensor:
    """Sample one frame per row from the slow model's output. Returns `[B, 1 + num_codebooks]` int64.

    logits `[B, vocab]`, hidden `[B, fast_dim]`, window `[B, 1 + num_codebooks, W]` or None (prefill).
    `fast(x, pos, rows)` runs one fast-transformer step (default `model.forward_fast`; a compiled runner's
    otherwise).
    """
    num_codebooks = model.config.num_codebooks
    fast = fast or model.forward_fast
    token = sample(logits, params, generators, None if window is None else window[:, :, 0])
    codes = [(token - model.semantic_begin_id).clamp(min=0)]

    fast(hidden, 0, rows)  # position 0 only fills the fast cache; its logits are unused
    for k in range(1, num_codebooks):
        fast_logits = fast(model.fast_embeddings(codes[-1]), k, rows)[:, :RESIDUAL_CODEBOOK_SIZE]
        codes.append(sample(fast_logits, params, generators, None if window is None else window[:, k + 1]))
    return torch.stack([token, *codes], dim=1)


@dataclass
class GenerationState:
    """What one row carries between decode steps."""

    prompt_len: int
    max_new_tokens: int
    params: SamplingParams
    generator: torch.Generator
    frames: list[Tensor] = field(default_factory=list)  # every generated frame, `[1 + num_codebooks]` each
    history: Tensor | None = None  # decode-loop frames `[1 + num_codebooks, max(max_new_tokens, 16)]`
    stopped_by_im_end: bool = False

    @property
    def done(self) -> bool:
        return self.stopped_by_im_end or len(self.frames) >= self.max_new_tokens

    def window(self) -> Tensor:
        """The repetition-penalty window for the next decode-loop frame (loop index = frames so far - 1)."""
        i = len(self.frames) - 1
        start = max(0, i - PENALTY_WINDOW)
        return self.history[:, start : start + PENALTY_WINDOW]


@torch.inference_mode()
def generate(
    model: DualARTransformer,
    prompt: Tensor,
    params: SamplingParams,
    generator: torch.Generator,
    max_new_tokens: int,
    im_end_id: int,
) -> Iterator[Tensor]:
    """Generate frames for one prompt `[1 + num_codebooks, L]`, yielding each frame `[1 + num_codebooks]`
    (int64, on the model's device) as soon as it is sampled.

    The caller decides what to keep: by the reference's rule the codec gets every frame but the last.
    Stopping iteration early cancels generation. Needs caches set up for at least 1 row and
    `L + max_new_tokens` positions.
    """
    device = model.embeddings.weight.device
    n_rows = 1 + model.config.num_codebooks
    if prompt.dim() != 2 or prompt.shape[0] != n_rows:
        raise ValueError(f"prompt must be [{n_rows}, L], got {tuple(prompt.shape)}")
    length = prompt.shape[1]
    if length + max_new_tokens > model.cache_seq_len:
        raise ValueError(f"prompt ({length}) + max_new_tokens ({max_new_tokens}) exceed the KV cache "
                         f"({model.cache_seq_len} positions)")
    state = GenerationState(length, max_new_tokens, params, generator)
    state.history = torch.zeros(n_rows, max(max_new_tokens, PENALTY_WINDOW), dtype=torch.long, device=device)
    param_t = params_tensor([params], device)

    input_pos = torch.arange(length, device=device)[None]
    logits, hidden = model.forward_slow(prompt.to(device)[None].long(), input_pos)
    frame = sample_frame(model, logits, hidden, param_t, [generator], window=None)[0]
    state.frames.append(frame)
    yield frame

    while not state.done:
        pos = torch.tensor([[length + len(state.frames) - 1]], device=device)
        logits, hidden = model.forward_slow(frame[None, :, None], pos)
        frame = sample_frame(model, logits, hidden, param_t, [generator], window=state.window()[None])[0]
        state.history[:, len(state.frames) - 1] = frame
        state.frames.append(frame)
        state.stopped_by_im_end = bool(frame[0] == im_end_id)
        yield frame
