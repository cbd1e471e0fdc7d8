"""int8 weights (SHOAL_QUANTIZE=int8): fidelity against float32 on the golden fixture, and where it may run.

The fidelity figures are teacher-forced: the golden frames of every fixture request are fed back in, and at every
step the float32 and the int8 model's logits are compared (the slow transformer's over the whole vocabulary, the
fast transformer's over the residual codebook, as sampled), by the KL divergence KL(float32 || int8) of their
softmaxes and by whether their argmax agrees. The fixture has random weights and tiny dimensions (dim 32), so
these figures say the kernels and the wiring are right, not how real speech sounds.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from shoal.engines.fish import FishEngine
from shoal.errors import BadRequest
from shoal.fish.checkpoint import load_dual_ar
from shoal.fish.generate import RESIDUAL_CODEBOOK_SIZE
from shoal.fish.quant import is_quantized, quantize_int8, weight_bytes
from shoal.fish.tokenizer import FishTokenizer

from support import load_golden, load_requests

#: Measured on the fixture (2026-12-02, torch 2.13 x86/fbgemm; all four requests, 122 slow and 1098 fast
#: positions): mean KL 2.3e-3 (slow) and 1.3e-3 (fast) nats, the worst single position 9.6e-3 and 1.3e-2; top-1
#: agreement 0.975 and 0.957. Unrelated logits (each position against the one before) give ~6 nats and 0.00. The
#: bounds leave 4x on the mean KL and a few points of top-1 for another CPU's rounding, while a broken kernel (wrong
#: scales, a transposed or skipped layer) moves the KL by orders of magnitude.
MAX_MEAN_KL = 1e-2
MIN_TOP1 = 0.9


def teacher_forced_logits(model, prompt: torch.Tensor, generated: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(slow logits `[T, vocab]`, fast logits `[T, num_codebooks - 1, RESIDUAL_CODEBOOK_SIZE]`) with the golden
    frames `generated` `[11, T]` fed back in after `prompt` `[11, L]`."""
    c = model.config
    inputs = [prompt] + [generated[:, t : t + 1] for t in range(generated.shape[1] - 1)]
    model.setup_caches(batch=1, seq_len=prompt.shape[1] + generated.shape[1])
    slow, fast, start = [], [], 0
    with torch.inference_mode():
        for t, inp in enumerate(inputs):
            pos = torch.arange(start, start + inp.shape[1])[None]
            start += inp.shape[1]
            logits, hidden = model.forward_slow(inp[None], pos)
            slow.append(logits[0])
            model.forward_fast(hidden, 0)
            fast.append(torch.stack([
                model.forward_fast(model.fast_embeddings(generated[k, t : t + 1]), k)[0, :RESIDUAL_CODEBOOK_SIZE]
                for k in range(1, c.num_codebooks)]))
    return torch.stack(slow), torch.stack(fast)


def divergence(reference: torch.Tensor, other: torch.Tensor) -> tuple[float, float]:
    """(mean KL(softmax(reference) || softmax(other)) in nats, top-1 agreement) over the last dimension."""
    ref, oth = reference.flatten(0, -2).double(), other.flatten(0, -2).double()
    kl = F.kl_div(F.log_softmax(oth, -1), F.log_softmax(ref, -1), log_target=True, reduction="none").sum(-1)
    return float(kl.mean()), float((ref.argmax(-1) == oth.argmax(-1)).double().mean())


@pytest.fixture(scope="module")
def fidelity(fixture_dir):
    tokenizer = FishTokenizer.from_dir(fixture_dir)
    f32 = load_dual_ar(fixture_dir, tokenizer, torch.device("cpu"), torch.float32)
    int8 = quantize_int8(load_dual_ar(fixture_dir, tokenizer, torch.device("cpu"), torch.float32))
    requests = load_requests(fixture_dir)
    logits = {"f32": ([], []), "int8": ([], [])}
    for req in requests:
        g = load_golden(fixture_dir, req)
        prompt, generated = torch.from_numpy(g["prompt"]).long(), torch.from_numpy(g["generated"]).long()
        for name, model in (("f32", f32), ("int8", int8)):
            slow, fast = teacher_forced_logits(model, prompt, generated)
            logits[name][0].append(slow)
            logits[name][1].append(fast)
    out = {}
    for i, part in enumerate(("slow", "fast")):
        a, b = torch.cat(logits["f32"][i]), torch.cat(logits["int8"][i])
        out[part] = divergence(a, b)
        out[part + "_positions"] = int(a.flatten(0, -2).shape[0])
    return out


@pytest.mark.parametrize("part", ["slow", "fast"])
def test_int8_logits_stay_close_to_float32(fidelity, part):
    kl, top1 = fidelity[part]
    print(f"{part}: mean KL {kl:.3g} nats, top-1 agreement {top1:.4f} over {fidelity[part + '_positions']} "
          "positions (random weights)")
    assert 0 < kl < MAX_MEAN_KL  # 0 would mean nothing was quantized
    assert top1 >= MIN_TOP1


def test_quantize_swaps_every_transformer_linear_and_keeps_embeddings_float32(fixture_dir):
    model = load_dual_ar(fixture_dir, FishTokenizer.from_dir(fixture_dir), torch.device("cpu"), torch.float32)
    before = weight_bytes(model)
    quantize_int8(model)
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert is_quantized(model)
    for table in (model.embeddings, model.codebook_embeddings, model.fast_embeddings):
        assert table.weight.dtype == torch.float32
    linear = sum(m.in_features * m.out_features for m in model.modules() if hasattr(m, "in_features"))
    assert weight_bytes(model) < before - 2.5 * linear  # ~4 bytes -> ~1 byte per linear weight


def test_quantize_refuses_a_non_float32_model(fixture_dir):
    model = load_dual_ar(fixture_dir, FishTokenizer.from_dir(fixture_dir), torch.device("cpu"), torch.bfloat16)
    with pytest.raises(ValueError, match="float32"):
        quantize_int8(model)


def test_engine_default_is_float32_and_unquantized(fixture_dir):
    engine = FishEngine.load(fixture_dir, device="cpu")
    try:
        assert engine.quantize == "none" and not is_quantized(engine.model)
        assert engine.precision == torch.float32
        assert any(isinstance(m, torch.nn.Linear) for m in engine.model.modules())
    finally:
        engine.close()


def test_the_setting_reaches_the_engine(fixture_dir, tmp_path):
    from shoal.engines.registry import load_engines
    from shoal.settings import Settings

    assert Settings.load(env={}, dotenv=None).quantize == "none"
    settings = Settings.load(cli={"checkpoint": str(fixture_dir), "device": "cpu", "data_dir": str(tmp_path),
                                  "lite_voice": False}, env={"SHOAL_QUANTIZE": "int8"}, dotenv=None)
    engines = load_engines(settings)
    try:
        engine = engines.get("fish")
        assert engine.quantize == "int8" and is_quantized(engine.model)
        assert engine.codec.config is not None and next(engine.codec.parameters()).dtype == torch.float32
    finally:
        engines.close()


def test_an_unknown_quantize_value_names_the_setting():
    from shoal.settings import Settings

    with pytest.raises(BadRequest, match="SHOAL_QUANTIZE"):
        Settings.load(env={"SHOAL_QUANTIZE": "int4"}, dotenv=None)


@pytest.mark.parametrize("device", ["cuda", "mps"])
def test_int8_on_a_non_cpu_device_is_refused(fixture_dir, monkeypatch, device):
    """Refused before anything loads, naming the setting (faked availability: no GPU is needed to check it)."""
    import shoal.engines.fish as fish

    monkeypatch.setattr(fish, "resolve_device", lambda _: torch.device(device))
    with pytest.raises(BadRequest, match=r"quantize=int8 \(SHOAL_QUANTIZE\) runs on the CPU only"):
        FishEngine.load(fixture_dir, device=device, precision="float32", quantize="int8")


def test_int8_with_bfloat16_is_refused(fixture_dir):
    with pytest.raises(BadRequest, match="needs precision float32"):
        FishEngine.load(fixture_dir, device="cpu", precision="bfloat16", quantize="int8")
