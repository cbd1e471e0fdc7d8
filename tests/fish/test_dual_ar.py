"""Parity of the dual-AR transformer and its sampling loop with the reference's captured internals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shoal.fish.checkpoint import normalise_model_keys, strict_load
from shoal.fish.dual_ar import DualARConfig, DualARTransformer, rope_table
from shoal.fish import generate as generate_module
from shoal.fish.generate import DecodeBatch, decode_one_token, generate, prefill, sample_frame
from shoal.fish.sampling import SamplingParams, params_tensor

from support import load_golden, load_requests

IM_END, SEMANTIC_BEGIN, SEMANTIC_END = 516, 527, 4622
CAPTURED = ["a", "b"]  # requests whose logits, noise and penalty windows were captured
ALL = ["a", "b", "c", "d"]


@pytest.fixture(scope="module")
def model(fixture_dir):
    config = DualARConfig.from_json(fixture_dir / "config.json")
    with torch.device("meta"):
        m = DualARTransformer(config, SEMANTIC_BEGIN, SEMANTIC_END)
    state = torch.load(fixture_dir / "model.pth", map_location="cpu", weights_only=True)
    strict_load(m, normalise_model_keys(state), fixture_dir / "model.pth")
    m.reset_rope()
    m = m.float().eval()
    m.setup_caches(batch=2)
    return m


@pytest.fixture(scope="module")
def requests_by_name(fixture_dir):
    return {r["name"]: r for r in load_requests(fixture_dir)}


def params_of(req) -> SamplingParams:
    return SamplingParams(req["temperature"], req["top_p"], req["repetition_penalty"])


def test_config_fills_fast_defaults_like_reference():
    c = DualARConfig(dim=64, n_head=4, head_dim=None, intermediate_size=None, n_fast_layer=1)
    assert c.head_dim == 16 and c.fast_head_dim == 16 and c.fast_dim == 64 and c.fast_n_head == 4
    assert c.n_local_heads == 4 and c.intermediate_size == 256  # 2/3 * 4 * dim, rounded up to 256


def test_config_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown config.json keys: wibble"):
        DualARConfig.from_dict({"model_type": "dual_ar", "wibble": 1})


def test_rope_tables_are_bf16_rounded():
    table = rope_table(16, 8, 1e6)
    assert table.dtype == torch.bfloat16 and table.shape == (16, 4, 2)
    assert float(table[0, 0, 0]) == 1.0 and float(table[0, 0, 1]) == 0.0


@pytest.mark.parametrize("name", ALL)
def test_generated_frames_identical(model, fixture_dir, requests_by_name, name):
    g, req = load_golden(fixture_dir, name), requests_by_name[name]
    generator = torch.Generator().manual_seed(req["seed"])
    frames = list(generate(model, torch.from_numpy(g["prompt"]), params_of(req), generator,
                           req["max_new_tokens"], IM_END))
    got = torch.stack(frames, dim=1).numpy()
    assert got.shape == g["generated"].shape
    np.testing.assert_array_equal(got, g["generated"])
    # The codec gets every frame but the last one.
    np.testing.assert_array_equal(got[1:, :-1], g["codes"])
    assert (got[0, -1] == IM_END) == req["stopped_by_im_end"]


def test_global_rng_does_not_leak_into_generation(model, fixture_dir, requests_by_name):
    """Same seed, same codes, however much the global generator is used in between."""
    g, req = load_golden(fixture_dir, "a"), requests_by_name["a"]
    generator = torch.Generator().manual_seed(req["seed"])
    frames = []
    for frame in generate(model, torch.from_numpy(g["prompt"]), params_of(req), generator,
                          req["max_new_tokens"], IM_END):
        torch.manual_seed(len(frames))
        torch.rand(1000)
        frames.append(frame)
    np.testing.assert_array_equal(torch.stack(frames, 1).numpy(), g["generated"])


@pytest.mark.parametrize("name", CAPTURED)
def test_teacher_forced_slow_and_fast_logits(model, fixture_dir, name):
    """Feed the golden frames back in and compare every logit the reference sampled from."""
    g = load_golden(fixture_dir, name)
    prompt = torch.from_numpy(g["prompt"]).long()
    generated = torch.from_numpy(g["generated"]).long()
    length = prompt.shape[1]
    inputs = [prompt] + [generated[:, t : t + 1] for t in range(generated.shape[1] - 1)]
    start = 0
    with torch.inference_mode():
        for t, inp in enumerate(inputs):
            pos = torch.arange(start, start + inp.shape[1])[None]
            start += inp.shape[1]
            logits, hidden = model.forward_slow(inp[None], pos)
            np.testing.assert_allclose(logits[0].numpy(), g["slow_logits"][t], atol=1e-4, rtol=0,
                                       err_msg=f"slow logits of frame {t}")
            model.forward_fast(hidden, 0)
            for k in range(1, 10):
                prev = generated[k, t : t + 1]  # code k-1 of frame t (row k)
                fast = model.forward_fast(model.fast_embeddings(prev), k)[0, :1024]
                np.testing.assert_allclose(fast.numpy(), g["fast_logits"][t, k - 1], atol=1e-4, rtol=0,
                                           err_msg=f"fast logits of frame {t}, codebook {k}")
    assert start == length + generated.shape[1] - 1


@pytest.mark.parametrize("name", CAPTURED)
def test_noise_stream_matches_reference(fixture_dir, model, requests_by_name, name):
    """Per frame: the slow draw over the vocabulary, then 9 draws of 1024 — from the request's generator."""
    g, req = load_golden(fixture_dir, name), requests_by_name[name]
    gen = torch.Generator().manual_seed(req["seed"])
    for t in range(g["generated"].shape[1]):
        slow = torch.empty(model.config.vocab_size).exponential_(1, generator=gen)
        np.testing.assert_array_equal(slow[:8].numpy(), g["slow_noise_head"][t])
        for k in range(9):
            fast = torch.empty(1024).exponential_(1, generator=gen)
            np.testing.assert_array_equal(fast[:8].numpy(), g["fast_noise_head"][t, k])


@pytest.mark.parametrize("name", CAPTURED)
def test_penalty_windows_match_reference(model, fixture_dir, requests_by_name, monkeypatch, name):
    """The windows the serving path samples with are the reference's, frame by frame. They are caught where the
    decode step hands them to `sample`, while the request runs as the scheduler runs it: `prefill` into slot 1 of
    a `DecodeBatch` beside another row, then batched `decode_one_token` steps."""
    g, req = load_golden(fixture_dir, name), requests_by_name[name]
    beside = requests_by_name[next(n for n in CAPTURED if n != name)]
    caught = []  # per sample() call: the window of the last row of the call (slot 1 in a step), or None

    def sample(logits, params, generators, window=None):
        caught.append(None if window is None else window[-1].clone())
        return real_sample(logits, params, generators, window)

    real_sample = generate_module.sample
    monkeypatch.setattr(generate_module, "sample", sample)
    batch = DecodeBatch(model, slots=2)
    for r in (beside, req):  # the other row first: the request under test takes slot 1
        prompt = torch.from_numpy(load_golden(fixture_dir, r)["prompt"]).long()
        slot = batch.add(prompt.shape[1], r["max_new_tokens"], params_of(r), torch.Generator().manual_seed(r["seed"]))
        caught.clear()  # only the request under test's draws count
        frames = [prefill(model, batch, slot, prompt)]
    assert slot == 1 and batch.n == 2
    n = g["generated"].shape[1]
    for _ in range(1, n):
        frames.append(decode_one_token(model, batch)[slot])
    np.testing.assert_array_equal(torch.stack(frames, dim=1).numpy(), g["generated"])
    per_frame = model.config.num_codebooks  # one slow draw, then one per residual codebook
    assert len(caught) == n * per_frame
    assert (g["slow_prev_ids"][0] == -1).all() and (g["fast_prev_ids"][0] == -1).all()
    assert all(w is None for w in caught[:per_frame])  # the prefill frame: no penalty
    for t in range(1, n):
        slow, *fast = caught[t * per_frame : (t + 1) * per_frame]
        np.testing.assert_array_equal(slow.numpy(), g["slow_prev_ids"][t], err_msg=f"slow window of frame {t}")
        np.testing.assert_array_equal(torch.stack(fast).numpy(), g["fast_prev_ids"][t],
                                      err_msg=f"fast windows of frame {t}")
    assert batch.host_positions[slot] == g["prompt"].shape[1] + n - 1


def test_batched_rows_equal_single_rows(model, fixture_dir, requests_by_name):
    """Two prompts of different lengths decoded side by side give each row's single-row logits."""
    prompts = [torch.from_numpy(load_golden(fixture_dir, n)["prompt"]).long() for n in ("a", "b")]
    singles = []
    with torch.inference_mode():
        for p in prompts:
            logits, _ = model.forward_slow(p[None], torch.arange(p.shape[1])[None])
            singles.append(logits[0])
        # Prefill each prompt into its own cache row, then run one batched decode step.
        for row, p in enumerate(prompts):
            model.forward_slow(p[None, :, :-1], torch.arange(p.shape[1] - 1)[None], rows=row)
        last = torch.stack([p[:, -1:] for p in prompts])
        pos = torch.tensor([[p.shape[1] - 1] for p in prompts])
        logits, _ = model.forward_slow(last, pos)
    for row in range(2):
        torch.testing.assert_close(logits[row], singles[row], atol=1e-5, rtol=0)


def test_prefill_frame_is_sampled_without_penalty(model, fixture_dir, requests_by_name):
    g, req = load_golden(fixture_dir, "a"), requests_by_name["a"]
    prompt = torch.from_numpy(g["prompt"]).long()
    gen = torch.Generator().manual_seed(req["seed"])
    with torch.inference_mode():
        logits, hidden = model.forward_slow(prompt[None], torch.arange(prompt.shape[1])[None])
        frame = sample_frame(model, logits, hidden, params_tensor([params_of(req)], "cpu"), [gen], window=None)
    np.testing.assert_array_equal(frame[0].numpy(), g["generated"][:, 0])
