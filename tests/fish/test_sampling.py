"""The sampling rules, one at a time, on hand-made logits."""

from __future__ import annotations

import math

import torch

from shoal.fish.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    apply_top_p,
    params_tensor,
    reference_rounding,
    sample,
)


def test_parameters_are_rounded_to_bfloat16_like_the_reference():
    assert reference_rounding(0.8) == 0.80078125
    assert reference_rounding(1.1) == 1.1015625
    assert reference_rounding(0.6) == 0.6015625
    assert SamplingParams(0.5, 0.6, 1.3).effective() == (0.5, 0.6015625, 1.296875)


def test_repetition_penalty_divides_positive_and_multiplies_negative_once():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.0]])
    out = apply_repetition_penalty(logits, torch.tensor([[0, 1, 0, 0]]), torch.tensor([[2.0]]))
    assert out.tolist() == [[1.0, -4.0, 1.0, 0.0]]  # id 0 repeated three times, penalised once
    assert logits.tolist() == [[2.0, -2.0, 1.0, 0.0]]  # input untouched


def test_top_p_drops_the_token_that_crosses_and_keeps_the_best():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    kept = apply_top_p(logits, torch.tensor([[0.8]])).isfinite()
    # cumulative: 0.5, 0.8, 0.95, 1.0 -> "> 0.8" drops the 3rd and 4th; 0.8 itself is float-rounded, so
    # compare with a top_p clearly above and below.
    kept_hi = apply_top_p(logits, torch.tensor([[0.81]])).isfinite()
    kept_lo = apply_top_p(logits, torch.tensor([[0.79]])).isfinite()
    assert kept_hi.tolist() == [[True, True, False, False]]
    assert kept_lo.tolist() == [[True, False, False, False]]
    assert kept[0, 0]
    tiny = apply_top_p(logits, torch.tensor([[0.01]])).isfinite()
    assert tiny.tolist() == [[True, False, False, False]]  # the best token always survives


def test_sample_uses_only_the_rows_generator():
    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(0))
    params = params_tensor([SamplingParams(), SamplingParams(0.5, 0.9, 1.0)], "cpu")
    a = sample(logits, params, [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)])
    torch.manual_seed(999)
    b = sample(logits, params, [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)])
    assert a.tolist() == b.tolist()
    # Row 0 alone gives what it gave in the batch.
    c = sample(logits[:1], params[:1], [torch.Generator().manual_seed(1)])
    assert c.tolist() == a[:1].tolist()


def test_sample_is_argmax_of_probs_over_exponential_noise():
    logits = torch.tensor([[0.0, math.log(3.0)]])
    params = params_tensor([SamplingParams(temperature=1.0, top_p=1.0, repetition_penalty=1.0)], "cpu")
    gen = torch.Generator().manual_seed(7)
    draws = [int(sample(logits, params, [gen])[0]) for _ in range(4000)]
    share = sum(draws) / len(draws)
    assert 0.72 < share < 0.78  # P(id 1) = 3/4
