"""Token sampling exactly as the reference samples, batched, with one `torch.Generator` per row.

Order of operations (the reference's, which the parity fixtures pin down):
1. repetition penalty over a window of ids: a logit < 0 is multiplied by the penalty, else divided by it;
2. top-p on the penalised logits, *before* temperature; the token that crosses top_p is dropped too, the best
   token is always kept;
3. divide by max(temperature, 1e-5) and softmax;
4. argmax(probs / q) with q ~ Exp(1) drawn from the row's generator: a sample from `probs` without
   `torch.multinomial` (and without a device sync).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from shoal.params import REPETITION_PENALTY, TEMPERATURE, TOP_P


def reference_rounding(value: float) -> float:
    """The value the reference actually samples with: it turns each parameter into a float32 tensor and then
    re-creates it as a bfloat16 tensor, so 0.8 becomes 0.80078125 and 1.1 becomes 1.1015625."""
    return float(torch.tensor(float(value), dtype=torch.float32).to(torch.bfloat16))


@dataclass(frozen=True)
class SamplingParams:
    """Sampling knobs of one request, as given by the caller (rounding happens in `effective`)."""

    temperature: float = TEMPERATURE.default
    top_p: float = TOP_P.default
    repetition_penalty: float = REPETITION_PENALTY.default

    def effective(self) -> tuple[float, float, float]:
        """(temperature, top_p, repetition_penalty) as the reference applies them."""
        temperature = max(reference_rounding(self.temperature), reference_rounding(1e-5))
        return temperature, reference_rounding(self.top_p), reference_rounding(self.repetition_penalty)


def params_tensor(params: list[SamplingParams], device: torch.device | str) -> Tensor:
    """Stack the effective values of a batch into a float32 `[B, 3]` tensor (temperature, top_p, penalty)."""
    return torch.tensor([p.effective() for p in params], dtype=torch.float32, device=device)


def apply_repetition_penalty(logits: Tensor, window: Tensor, penalty: Tensor) -> Tensor:
    """logits `[B, V]`, window `[B, W]` ids, penalty `[B, 1]`. A repeated id is penalised once."""
    window = window.long()
    score = logits.gather(-1, window)
    score = torch.where(score < 0, score * penalty, score / penalty)
    return logits.scatter(-1, window, score)


def apply_top_p(logits: Tensor, top_p: Tensor) -> Tensor:
    """Mask (to -inf) every token outside the nucleus; logits `[B, V]`, top_p `[B, 1]`."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    cumulative = torch.cumsum(torch.softmax(sorted_logits, dim=-1), dim=-1)
    drop_sorted = cumulative > top_p
    drop_sorted[..., 0] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def exponential_noise(shape: tuple[int, int], generators: list[torch.Generator], device) -> Tensor:
    """One Exp(1) draw of `shape[1]` float32 values per row, each from that row's generator."""
    rows = [torch.empty(shape[1], dtype=torch.float32, device=device).exponential_(1, generator=g)
            for g in generators]
    return torch.stack(rows)


def sample(
    logits: Tensor,
    params: Tensor,
    generators: list[torch.Generator],
    window: Tensor | None = None,
) -> Tensor:
    """Sample one id per row. logits `[B, V]` (float32), params `[B, 3]` from `params_tensor`,
    window `[B, W]` ids for the repetition penalty, or None for no penalty. Returns `[B]` int64."""
    logits = logits.float()
    temperature, top_p, penalty = params[:, 0:1], params[:, 1:2], params[:, 2:3]
    if window is not None:
        logits = apply_repetition_penalty(logits, window, penalty)
    logits = apply_top_p(logits, top_p)
    probs = torch.softmax(logits / temperature, dim=-1)
    noise = exponential_noise(tuple(probs.shape), generators, probs.device)
    return torch.argmax(probs / noise, dim=-1)
