"""Token sampling exactly as the references sample, batched, with one `torch.Generator` per row.

S1 (fish-speech 0.1.0), in the reference's order, which the parity fixtures pin down:
1. repetition penalty over a window of ids: a logit < 0 is multiplied by the penalty, else divided by it;
2. top-p on the penalised logits, *before* temperature; the token that crosses top_p is dropped too, the best
   token is always kept;
3. divide by max(temperature, 1e-5) and softmax;
4. argmax(probs / q) with q ~ Exp(1) drawn from the row's generator: a sample from `probs` without
   `torch.multinomial` (and without a device sync).

S2 (fish-speech 2.0, `decode_one_token_ar`), `sample_s2`: no repetition penalty; top-k (`S2_TOP_K` sorted places)
and top-p in one mask before temperature; softmax(logits / max(temperature, 1e-5)); argmax(probs / -log(u)) with
u ~ U[0, 1) drawn from the row's generator. Everything runs in the MODEL's dtype: the logits, temperature and
top_p (`s2_params_tensor`, no bfloat16 rounding of a float32 model) and the uniform draws.
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


#: S2's top-k: fish-speech 2.0's `generate_long` default, which its inference engine never overrides.
S2_TOP_K = 30


def s2_params_tensor(params: list[SamplingParams], dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """S2's per-row `[B, 2]` (temperature, top_p), each made as the reference makes it: a tensor of the model's
    dtype straight from the request's float (so a float32 model samples with float32(0.8), a bfloat16 one with
    bfloat16(0.8)). The 1e-5 floor on temperature is applied where it divides, as in the reference."""
    rows = [torch.stack([torch.tensor(float(p.temperature), dtype=dtype), torch.tensor(float(p.top_p), dtype=dtype)])
            for p in params]
    return torch.stack(rows).to(device)


def apply_top_k_top_p(logits: Tensor, top_p: Tensor, top_k: int) -> Tensor:
    """Mask (to -inf) every token outside both the `top_k` best and the nucleus, in one mask over the sorted
    logits (S2's rule); logits `[B, V]`, top_p `[B, 1]`. The best token always survives."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    cumulative = torch.cumsum(torch.softmax(sorted_logits, dim=-1), dim=-1)
    beyond_k = torch.arange(sorted_logits.shape[-1], device=logits.device) >= top_k
    drop_sorted = (cumulative > top_p) | beyond_k
    drop_sorted[..., 0] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return torch.where(drop, float("-inf"), logits)


def uniform_noise(shape: tuple[int, int], dtype: torch.dtype, generators: list[torch.Generator], device) -> Tensor:
    """-log(u), u ~ U[0, 1) of `dtype`: `shape[1]` draws per row, each row from its own generator (S2's noise,
    the reference's `-log(rand_like(probs))`)."""
    rows = [torch.rand(shape[1], dtype=dtype, device=device, generator=g) for g in generators]
    return -torch.log(torch.stack(rows))


def sample_s2(logits: Tensor, temperature: Tensor, top_p: Tensor, top_k: int,
              generators: list[torch.Generator]) -> Tensor:
    """Sample one id per row by S2's rule (module docstring). logits `[B, V]` in the model's dtype, temperature
    and top_p `[B, 1]` (or broadcastable) in that dtype. Draws `V` uniforms from each row's generator.
    Returns `[B]` int64."""
    logits = apply_top_k_top_p(logits, top_p, top_k)
    probs = torch.softmax(logits / torch.clamp(temperature, min=1e-5), dim=-1)
    noise = uniform_noise(tuple(probs.shape), probs.dtype, generators, probs.device)
    return torch.argmax(probs / noise, dim=-1)
