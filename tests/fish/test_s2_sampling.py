"""S2's sampling rules (fish-speech 2.0's decode_one_token_ar), one at a time, on hand-made tensors and a tiny
random model; the golden parity is in test_s2_generate.py."""

from __future__ import annotations

import math

import pytest
import torch

from shoal.fish.dual_ar import DualARConfig, DualARTransformer
from shoal.fish.generate import (RAS_WINDOW, DecodeBatch, decode_one_token, generate, prefill, s2_sampling,
                                 sample_frame_s2, semantic_bias)
from shoal.fish.sampling import S2_TOP_K, SamplingParams, apply_top_k_top_p, s2_params_tensor, sample_s2

VOCAB, CODEBOOK, CODEBOOKS = 96, 32, 4
BEGIN, END, IM_END = VOCAB - CODEBOOK, VOCAB - 1, 5


def tiny_s2_model(seed: int = 0) -> DualARTransformer:
    """A random dual-AR model whose config is an S2 one (S2's own switches on), semantic ids at the end of the
    vocabulary like the real one."""
    config = DualARConfig(vocab_size=VOCAB, n_layer=2, n_head=2, dim=32, head_dim=16, intermediate_size=64,
                          codebook_size=CODEBOOK, num_codebooks=CODEBOOKS, n_fast_layer=1, max_seq_len=128,
                          scale_codebook_embeddings=True, norm_fastlayer_input=True)
    torch.manual_seed(seed)
    model = DualARTransformer(config, BEGIN, END)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model.eval()


def test_top_k_and_top_p_are_one_mask_and_the_best_token_survives():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    assert apply_top_k_top_p(logits, torch.tensor([[1.0]]), 2).isfinite().tolist() == [[True, True, False, False,
                                                                                           False]]
    # top_p cuts before top_k does: probs 0.64, 0.24, 0.09, ... -> cumulative 0.64, 0.87 > 0.8 drops the 2nd on.
    assert apply_top_k_top_p(logits, torch.tensor([[0.8]]), 4).isfinite().tolist() == [[True, False, False, False,
                                                                                           False]]
    assert apply_top_k_top_p(logits, torch.tensor([[0.01]]), 0).isfinite().tolist() == [[True, False, False, False,
                                                                                            False]]
    # Unsorted input: the mask lands on the right ids, kept values are untouched.
    shuffled = torch.tensor([[1.0, 4.0, 0.0, 3.0]])
    out = apply_top_k_top_p(shuffled, torch.tensor([[1.0]]), 2)
    assert out.tolist() == [[-math.inf, 4.0, -math.inf, 3.0]]


def test_parameters_stay_in_the_model_dtype_without_bfloat16_rounding():
    p = s2_params_tensor([SamplingParams(0.8, 0.7)], torch.float32, "cpu")
    assert p.dtype == torch.float32
    assert p.tolist() == [[torch.tensor(0.8).item(), torch.tensor(0.7).item()]]  # not 0.80078125
    b = s2_params_tensor([SamplingParams(0.8, 0.7)], torch.bfloat16, "cpu")
    assert b.dtype == torch.bfloat16 and b[0, 0].item() == 0.80078125


def test_sample_is_argmax_of_probs_over_minus_log_uniform_from_the_rows_generator():
    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(0))
    temperature, top_p = torch.tensor([[0.7], [1.0]]), torch.tensor([[0.9], [0.5]])
    gens = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]
    torch.manual_seed(999)  # the global generator plays no part
    got = sample_s2(logits, temperature, top_p, S2_TOP_K, gens)
    for row, seed in enumerate((1, 2)):
        g = torch.Generator().manual_seed(seed)
        probs = torch.softmax(apply_top_k_top_p(logits[row : row + 1], top_p[row : row + 1], S2_TOP_K)
                              / temperature[row], dim=-1)[0]
        expected = torch.argmax(probs / -torch.log(torch.rand(50, generator=g)))
        assert int(got[row]) == int(expected)
        assert torch.equal(gens[row].get_state(), g.get_state())  # exactly 50 uniforms drawn
    # Row 1 alone gives what it gave in the batch.
    alone = sample_s2(logits[1:], temperature[1:], top_p[1:], S2_TOP_K, [torch.Generator().manual_seed(2)])
    assert alone.tolist() == got[1:].tolist()


def test_sample_follows_the_distribution():
    logits = torch.tensor([[0.0, math.log(3.0)]])
    one = torch.tensor([[1.0]])
    gen = torch.Generator().manual_seed(7)
    draws = [int(sample_s2(logits, one, one, S2_TOP_K, [gen])[0]) for _ in range(4000)]
    assert 0.72 < sum(draws) / len(draws) < 0.78  # P(id 1) = 3/4


def test_semantic_bias_allows_semantic_ids_and_im_end_only():
    bias = semantic_bias(tiny_s2_model(), IM_END)
    allowed = (bias == 0).nonzero().flatten().tolist()
    assert allowed == [IM_END, *range(BEGIN, END + 1)]
    assert torch.isinf(bias[torch.tensor([0, IM_END + 1, BEGIN - 1])]).all()


class Recorder:
    """A fast step that records which codebook positions it ran and returns fixed logits."""

    def __init__(self, logits: torch.Tensor):
        self.logits, self.calls = logits, []

    def __call__(self, x, k, rows):
        self.calls.append(k)
        return self.logits[k].expand(x.shape[0], -1)


def frame_by_hand(logits, fast_logits, temperature, top_p, bias, seed, window):
    """The reference's draw order written out: normal, fallback, then one draw per fast codebook."""
    g = torch.Generator().manual_seed(seed)
    one = torch.tensor([[1.0]])

    def draw(lg, t, p):
        probs = torch.softmax(apply_top_k_top_p(lg, p, S2_TOP_K) / t, dim=-1)[0]
        return int(torch.argmax(probs / -torch.log(torch.rand(lg.shape[-1], generator=g))))

    token = draw(logits + bias, temperature, top_p)
    fallback = draw(logits + bias, one, torch.tensor([[0.9]]))
    replaced = window is not None and BEGIN <= token <= END and token in window and fallback != token
    if window is not None and BEGIN <= token <= END and token in window:
        token = fallback
    codes = [min(max(token - BEGIN, 0), CODEBOOK - 1)]
    for k in range(1, CODEBOOKS):
        codes.append(draw(fast_logits[k][None], temperature, top_p))
    return [token, *codes], replaced


@pytest.mark.parametrize("with_window", [False, True])
def test_frame_draw_order_ras_and_full_codebook_fast_sampling(with_window):
    model = tiny_s2_model()
    bias = semantic_bias(model, IM_END)
    temperature, top_p = torch.tensor([[0.7]]), torch.tensor([[0.8]])
    params = torch.cat([temperature, top_p], dim=1)
    # Two semantic ids dominate the slow logits; the fast logits favour codes at the END of the codebook, which a
    # 1024-style slice would never reach.
    fast_logits = torch.randn(CODEBOOKS, CODEBOOK, generator=torch.Generator().manual_seed(3))
    fast_logits[:, -3:] += 6.0
    replaced = 0
    for seed in range(40):
        logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(100 + seed))
        logits[0, BEGIN + 3] += 5.0
        logits[0, BEGIN + 4] += 5.0
        window = torch.tensor([[BEGIN + 3] + [0] * (RAS_WINDOW - 1)]) if with_window else None
        fast = Recorder(fast_logits)
        g = torch.Generator().manual_seed(seed)
        frame = sample_frame_s2(model, logits, torch.zeros(1, 32), params, bias, [g], window, fast=fast)
        expected, was_replaced = frame_by_hand(logits, fast_logits, temperature, top_p, bias, seed,
                                               None if window is None else window[0].tolist())
        assert frame[0].tolist() == expected, seed
        assert fast.calls == list(range(CODEBOOKS))
        assert frame[0, 1:].max() < CODEBOOK
        replaced += was_replaced
    # The cases exercise what they claim: replacements happen with a window, and fast codes past 1024-style slices.
    assert (replaced > 0) == with_window


def test_window_token_not_semantic_is_never_replaced():
    model = tiny_s2_model()
    bias = semantic_bias(model, IM_END)
    logits = torch.full((1, VOCAB), -10.0)
    logits[0, IM_END] = 10.0  # <|im_end|> all but surely
    window = torch.tensor([[IM_END] * RAS_WINDOW])
    params = torch.tensor([[0.7, 0.8]])
    fast = Recorder(torch.zeros(CODEBOOKS, CODEBOOK))
    frame = sample_frame_s2(model, logits, torch.zeros(1, 32), params, bias, [torch.Generator().manual_seed(0)],
                            window, fast=fast)
    assert frame[0, 0] == IM_END
    assert frame[0, 1] == 0  # code 0 clamped at 0 below semantic_begin_id


def test_s2_batch_rows_do_not_depend_on_their_neighbours():
    model = tiny_s2_model()
    assert s2_sampling(model)
    model.setup_caches(batch=4, seq_len=128)
    prompts = [torch.randint(0, BEGIN, (1 + CODEBOOKS, n), generator=torch.Generator().manual_seed(n))
               for n in (7, 11, 5)]
    for p in prompts:
        p[1:] = 0
    params = [SamplingParams(0.7, 0.8), SamplingParams(1.0, 0.9), SamplingParams(0.5, 0.6)]
    max_new = 24

    def alone(i):
        frames = list(generate(model, prompts[i], params[i], torch.Generator().manual_seed(i), max_new, IM_END))
        return torch.stack(frames).tolist()

    expected = [alone(i) for i in range(3)]
    batch = DecodeBatch(model, 4)
    got = [[] for _ in range(3)]
    for i in range(3):
        slot = batch.add(prompts[i].shape[1], max_new, params[i], torch.Generator().manual_seed(i), IM_END)
        got[i].append(prefill(model, batch, slot, prompts[i]).tolist())
    active = [0, 1, 2]  # row per slot
    while active:
        frames = decode_one_token(model, batch)
        done = []
        for slot, row in enumerate(active):
            got[row].append(frames[slot].tolist())
            if frames[slot, 0] == IM_END or len(got[row]) >= max_new:
                done.append(slot)
        for slot in sorted(done, reverse=True):  # the last row moves into a freed slot, as the scheduler does
            moved = batch.remove(slot)
            if moved is not None:
                active[slot] = active[moved]
            active.pop()
    assert got == expected


def test_s1_model_keeps_s1_sampling():
    model = tiny_s2_model()
    model.config.norm_fastlayer_input = False
    assert not s2_sampling(model)
    assert DecodeBatch(model, 2).s2_params is None
