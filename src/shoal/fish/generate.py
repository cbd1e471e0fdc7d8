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

An S2 model (`s2_sampling`) samples by fish-speech 2.0's `decode_one_token_ar` instead (`sample_frame_s2`):

- the slow logits get a bias that allows only semantic ids and `<|im_end|>`; no repetition penalty;
- every slow step draws twice from the row's generator, in this order: the token (the request's temperature and
  top_p) and a fallback (temperature `RAS_TEMPERATURE`, top_p `RAS_TOP_P`); in a decode step the fallback
  replaces a semantic token that is among the row-0 tokens of the last `RAS_WINDOW` decode-loop frames
  (Repetition Aware Sampling; the window starts as zeros, the prefill frame is never in it, and the prefill
  frame draws the fallback without ever using it);
- code 0 is the token minus semantic_begin_id clamped to [0, codebook_size - 1]; codebooks 1.. are drawn over the
  fast head's full codebook_size logits, with the same temperature, top_p and top-k;
- the stop rule is S1's.

A frame is made in exactly two places, in the gpt-fast manner: `prefill` (a prompt into its cache slot, then
its first frame) and `decode_one_token` (one batched step for the rows of a `DecodeBatch`); `is_last` is the stop
rule. The engine's scheduler and the offline `generate()` both call them. Every row keeps its own position,
sampling parameters, penalty history and generator, so its frames do not depend on what runs beside it.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch import Tensor

from .dual_ar import DualARTransformer
from .sampling import S2_TOP_K, SamplingParams, s2_params_tensor, sample, sample_s2

PENALTY_WINDOW = 16
#: S2's Repetition Aware Sampling: how many of the latest decode-loop tokens the window holds, and the fallback
#: draw's temperature and top_p (fish-speech 2.0's RAS_WIN_SIZE, RAS_HIGH_TEMP, RAS_HIGH_TOP_P).
RAS_WINDOW = 10
RAS_TEMPERATURE = 1.0
RAS_TOP_P = 0.9
# The fast head has codebook_size outputs but residual codebooks have 1024 entries; the reference samples from
# the first 1024 logits only.
RESIDUAL_CODEBOOK_SIZE = 1024

#: slow(x `[B, 11, 1]`, pos `[B, 1]`, start, n_keys) -> (logits, hidden); fast(x, k, start) -> logits.
SlowStep = Callable[[Tensor, Tensor, "int | None", int], "tuple[Tensor, Tensor]"]
FastStep = Callable[[Tensor, int, "int | None"], Tensor]


def sample_frame(
    model: DualARTransformer,
    logits: Tensor,
    hidden: Tensor,
    params: Tensor,
    generators: list[torch.Generator],
    window: Tensor | None,
    rows: int | None = None,
    fast: FastStep | None = None,
) -> Tensor:
    """Sample one frame per row from the slow model's output. Returns `[B, 1 + num_codebooks]` int64.

    logits `[B, vocab]`, hidden `[B, fast_dim]`, window `[B, 1 + num_codebooks, W]` or None (prefill).
    `rows` is the first cache slot of the batch (None: 0). `fast(x, k, rows)` runs one fast-transformer step
    (default `model.forward_fast`; a compiled runner's otherwise).
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


def s2_sampling(model: DualARTransformer) -> bool:
    """Whether `model` samples by S2's rule (module docstring): it is an S2 checkpoint. S2 configs, and only they,
    switch `norm_fastlayer_input` on (`DualARConfig.from_dict` forces it when it flattens one), so that switch
    names the family. The rule follows from the model, never from a request."""
    return model.config.norm_fastlayer_input


def semantic_bias(model: DualARTransformer, im_end_id: int) -> Tensor:
    """S2's slow-logit bias `[vocab]` in the model's dtype: 0 on semantic ids and `<|im_end|>`, -inf elsewhere."""
    weight = model.embeddings.weight
    bias = torch.full((model.config.vocab_size,), float("-inf"), dtype=weight.dtype, device=weight.device)
    bias[model.semantic_begin_id : model.semantic_end_id + 1] = 0.0
    bias[im_end_id] = 0.0
    return bias


def sample_frame_s2(
    model: DualARTransformer,
    logits: Tensor,
    hidden: Tensor,
    params: Tensor,
    bias: Tensor,
    generators: list[torch.Generator],
    window: Tensor | None,
    rows: int | None = None,
    fast: FastStep | None = None,
) -> Tensor:
    """S2's `sample_frame` (module docstring). params `[B, 2]` (temperature, top_p) in the model's dtype, bias
    `[vocab]` from `semantic_bias`, window `[B, RAS_WINDOW]` row-0 ids or None (prefill: no replacement).
    Returns `[B, 1 + num_codebooks]` int64."""
    c = model.config
    fast = fast or model.forward_fast
    temperature, top_p = params[:, 0:1], params[:, 1:2]
    ras_temperature = torch.tensor(RAS_TEMPERATURE, dtype=params.dtype, device=params.device)
    ras_top_p = torch.tensor(RAS_TOP_P, dtype=params.dtype, device=params.device)
    biased = logits + bias
    token = sample_s2(biased, temperature, top_p, S2_TOP_K, generators)
    fallback = sample_s2(biased, ras_temperature, ras_top_p, S2_TOP_K, generators)
    if window is not None:
        semantic = (token >= model.semantic_begin_id) & (token <= model.semantic_end_id)
        repeated = (window == token[:, None]).any(dim=-1)
        token = torch.where(semantic & repeated, fallback, token)
    codes = [(token - model.semantic_begin_id).clamp(0, c.codebook_size - 1)]

    fast(hidden, 0, rows)  # position 0 only fills the fast cache; its logits are unused
    for k in range(1, c.num_codebooks):
        fast_logits = fast(model.fast_embeddings(codes[-1]), k, rows)
        codes.append(sample_s2(fast_logits, temperature, top_p, S2_TOP_K, generators))
    return torch.stack([token, *codes], dim=1)


class DecodeBatch:
    """The decode state of up to `slots` rows, slot-indexed, on the model's device, updated in place (the
    persistent batch of vLLM v1's InputBatch).

    Active rows hold slots 0..n-1, contiguous: the decode step reads `[:n]` views of these tensors and of the
    KV caches, never a gather, and a row that leaves is replaced by the last one (`remove`). Per slot: the last
    frame (the next input), its position, the effective sampling parameters, the history of decode-loop frames
    (S1's repetition-penalty windows, S2's RAS windows) and the loop index into it, the generator. An S2 batch
    (`s2_sampling`) also keeps its rows' (temperature, top_p) in the model's dtype and the semantic bias. The
    host keeps the positions and frame counts too, so a step needs no device-to-host copy to know how far to
    attend.
    """

    def __init__(self, model: DualARTransformer, slots: int, history_len: int | None = None):
        device = model.embeddings.weight.device
        c = model.config
        self.model = model
        self.slots = slots
        self.n_rows = 1 + c.num_codebooks
        self.history_len = max(history_len or c.max_seq_len, PENALTY_WINDOW)
        self.last = torch.zeros(slots, self.n_rows, dtype=torch.long, device=device)
        self.positions = torch.zeros(slots, 1, dtype=torch.long, device=device)
        self.params = torch.zeros(slots, 3, dtype=torch.float32, device=device)
        self.history = torch.zeros(slots, self.n_rows, self.history_len, dtype=torch.long, device=device)
        self.loop_index = torch.zeros(slots, dtype=torch.long, device=device)
        self.window_offsets = torch.arange(PENALTY_WINDOW, device=device)
        self.generators: list[torch.Generator | None] = [None] * slots
        self.host_positions = [0] * slots  # position of each slot's next input
        self.produced = [0] * slots  # frames generated, prefill frame included
        self.n = 0
        self.s2 = s2_sampling(model)
        self.model_dtype = model.embeddings.weight.dtype
        self.s2_params = torch.zeros(slots, 2, dtype=self.model_dtype, device=device) if self.s2 else None
        self.ras_offsets = torch.arange(RAS_WINDOW, device=device)
        self.bias: Tensor | None = None  # S2: semantic_bias, made at the first add
        self._bias_im_end: int | None = None

    def add(self, prompt_len: int, max_new_tokens: int, params: SamplingParams, generator: torch.Generator,
            im_end_id: int | None = None) -> int:
        """Take the next slot for a new row; `prefill` then fills it. Returns the slot. An S2 batch needs the
        `<|im_end|>` id (the semantic bias allows it)."""
        if self.n >= self.slots:
            raise RuntimeError("no free slot in the decode batch")
        if max_new_tokens > self.history_len:
            raise ValueError(f"max_new_tokens {max_new_tokens} exceeds the batch's history ({self.history_len})")
        if self.s2:
            self._set_bias(im_end_id)
        s = self.n
        self.n += 1
        self.params[s] = torch.tensor(params.effective(), dtype=torch.float32)
        if self.s2:
            self.s2_params[s] = s2_params_tensor([params], self.model_dtype, self.s2_params.device)[0]
        # The reference's history starts as zeros, which early windows read: clear what this row can reach.
        self.history[s, :, : max(max_new_tokens, PENALTY_WINDOW)] = 0
        self.loop_index[s] = 0
        self.positions[s] = prompt_len
        self.generators[s] = generator
        self.host_positions[s] = prompt_len
        self.produced[s] = 0
        return s

    def _set_bias(self, im_end_id: int | None) -> None:
        if im_end_id is None:
            raise ValueError("an S2 batch needs the <|im_end|> id of each row")
        if self.bias is None:
            self.bias, self._bias_im_end = semantic_bias(self.model, im_end_id), im_end_id
        elif im_end_id != self._bias_im_end:
            raise ValueError(f"rows of one batch disagree on <|im_end|> ({im_end_id} != {self._bias_im_end})")

    def remove(self, slot: int) -> int | None:
        """Free `slot`. The last active row moves into it (tensors and KV-cache rows); returns the slot that
        row came from, or None when `slot` was the last."""
        last = self.n - 1
        self.n -= 1
        if slot == last:
            self.generators[last] = None
            return None
        for t in (self.last, self.positions, self.params, self.history, self.loop_index, self.s2_params):
            if t is not None:
                t[slot] = t[last]
        self.model.move_cache_row(last, slot, self.host_positions[last])
        self.generators[slot], self.generators[last] = self.generators[last], None
        self.host_positions[slot] = self.host_positions[last]
        self.produced[slot] = self.produced[last]
        return last

    def windows(self, lo: int, hi: int) -> Tensor:
        """The repetition-penalty windows `[hi - lo, 1 + num_codebooks, PENALTY_WINDOW]` of slots lo..hi-1: columns
        max(0, i - W) .. +W of each row's history, i being the index of the decode-loop frame about to be sampled.
        """
        start = (self.loop_index[lo:hi] - PENALTY_WINDOW).clamp(min=0)
        index = (start[:, None] + self.window_offsets)[:, None, :].expand(-1, self.n_rows, -1)
        return self.history[lo:hi].gather(2, index)

    def ras_windows(self, lo: int, hi: int) -> Tensor:
        """S2's RAS windows `[hi - lo, RAS_WINDOW]` of slots lo..hi-1: row 0 of history columns
        max(0, i - RAS_WINDOW) .. +RAS_WINDOW, i being the loop index of the frame about to be sampled. Before
        RAS_WINDOW frames exist the window also reads not-yet-written zero columns, as the reference's
        zero-filled window does (0 is no semantic id, so it never triggers a replacement)."""
        start = (self.loop_index[lo:hi] - RAS_WINDOW).clamp(min=0)
        return self.history[lo:hi, 0].gather(1, start[:, None] + self.ras_offsets)

    def record_prefill(self, slot: int, frame: Tensor) -> None:
        """The prefill frame: the next input, but not part of the history (the reference keeps it out)."""
        self.last[slot] = frame
        self.produced[slot] = 1

    def record(self, lo: int, hi: int, frames: Tensor) -> None:
        """Decode-loop frames `[hi - lo, 1 + num_codebooks]` of slots lo..hi-1: into the history at each row's loop
        index, as the next inputs, one position further."""
        slots = torch.arange(lo, hi, device=frames.device)
        self.history[slots, :, self.loop_index[lo:hi]] = frames
        self.last[lo:hi] = frames
        self.loop_index[lo:hi] += 1
        self.positions[lo:hi] += 1
        for s in range(lo, hi):
            self.host_positions[s] += 1
            self.produced[s] += 1

    def snapshot(self, lo: int, hi: int) -> list[Tensor]:
        """The generator states of slots lo..hi-1, to replay a failed step row by row with the same draws."""
        return [g.get_state() for g in self.generators[lo:hi]]

    def restore(self, lo: int, states: list[Tensor]) -> None:
        for g, state in zip(self.generators[lo : lo + len(states)], states):
            g.set_state(state)


@torch.inference_mode()
def prefill(model: DualARTransformer, batch: DecodeBatch, slot: int, prompt: Tensor) -> Tensor:
    """Run a row's prompt `[1 + num_codebooks, L]` through the slow model into its cache slot and sample its first
    frame (without repetition penalty or RAS replacement). Returns the frame `[1 + num_codebooks]` on the model's
    device."""
    length = prompt.shape[1]
    positions = torch.arange(length, device=prompt.device)[None]
    logits, hidden = model.forward_slow(prompt[None], positions, rows=slot, n_keys=length)
    if batch.s2:
        frame = sample_frame_s2(model, logits, hidden, batch.s2_params[slot : slot + 1], batch.bias,
                                [batch.generators[slot]], window=None, rows=slot)[0]
    else:
        frame = sample_frame(model, logits, hidden, batch.params[slot : slot + 1], [batch.generators[slot]],
                             window=None, rows=slot)[0]
    batch.record_prefill(slot, frame)
    return frame


StepHook = Callable[[int, int], None]


@torch.inference_mode()
def decode_one_token(model: DualARTransformer, batch: DecodeBatch, lo: int = 0, hi: int | None = None,
                     slow: SlowStep | None = None, fast: FastStep | None = None,
                     hook: StepHook | None = None) -> Tensor:
    """One decode step for slots lo..hi-1 (default: every active row): the slow model at each row's position,
    sampling with its penalty (S1) or RAS (S2) window, the fast model for the codebooks. Returns the frames
    `[hi - lo, 1 + num_codebooks]` on the model's device and records them in the batch.

    `slow(x, pos, start, n_keys)` and `fast(x, k, start)` default to the model's own forwards (a compiled
    runner's otherwise); `hook(lo, hi)` runs inside the step, after the slow forward (fault injection in tests).
    """
    hi = batch.n if hi is None else hi
    n_keys = max(batch.host_positions[lo:hi]) + 1
    start = None if lo == 0 else lo
    if slow is None:
        logits, hidden = model.forward_slow(batch.last[lo:hi, :, None], batch.positions[lo:hi], rows=start,
                                            n_keys=n_keys)
    else:
        logits, hidden = slow(batch.last[lo:hi, :, None], batch.positions[lo:hi], start, n_keys)
    if hook is not None:
        hook(lo, hi)
    if batch.s2:
        frames = sample_frame_s2(model, logits, hidden, batch.s2_params[lo:hi], batch.bias, batch.generators[lo:hi],
                                 batch.ras_windows(lo, hi), rows=start, fast=fast)
    else:
        frames = sample_frame(model, logits, hidden, batch.params[lo:hi], batch.generators[lo:hi],
                              batch.windows(lo, hi), rows=start, fast=fast)
    batch.record(lo, hi, frames)
    return frames


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
    (int64, on the model's device) as soon as it is sampled: `prefill`, then `decode_one_token` on a batch of one
    until the stop rule says so. The engine's scheduler runs the very same two functions on its batch.

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
    batch = DecodeBatch(model, 1, history_len=max_new_tokens)
    slot = batch.add(length, max_new_tokens, params, generator, im_end_id)
    frame = prefill(model, batch, slot, prompt.to(device).long())
    yield frame
    if is_last(int(frame[0]), batch.produced[slot], max_new_tokens, im_end_id, loop_frame=False):
        return
    while True:
        frame = decode_one_token(model, batch)[0]
        yield frame
        if is_last(int(frame[0]), batch.produced[slot], max_new_tokens, im_end_id):
            return


def is_last(token: int, produced: int, max_new_tokens: int, im_end_id: int, loop_frame: bool = True) -> bool:
    """The reference's stop rule, after a row's `produced`-th frame whose slow token is `token`: the budget is
    spent, or a decode-loop frame (never the prefill frame) sampled `<|im_end|>`."""
    return produced >= max_new_tokens or (loop_frame and token == im_end_id)
