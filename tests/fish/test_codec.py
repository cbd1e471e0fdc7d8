"""Parity of the codec with the reference's golden outputs, its config parsing, and strict checkpoint loading."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from shoal.errors import CheckpointError
from shoal.fish.codec import Codec, CodecConfig, load_codec, rope_table, window_mask
from shoal.testing import random_codec_state_dict, tiny_codec_config, write_tiny_codec

from support import load_codec_golden


@pytest.fixture(scope="module")
def codec(fixture_dir) -> Codec:
    return load_codec(fixture_dir / "codec.pth", CodecConfig.from_yaml(fixture_dir / "codec_config.yaml"))


@pytest.fixture(scope="module")
def golden(fixture_dir):
    return load_codec_golden(fixture_dir)


@pytest.fixture(scope="module")
def fixture_state(fixture_dir) -> dict[str, torch.Tensor]:
    return torch.load(fixture_dir / "codec.pth", map_location="cpu", weights_only=True)


# -- config --------------------------------------------------------------------------------------------------


def test_tiny_yaml_gives_tiny_config(fixture_dir):
    c = CodecConfig.from_yaml(fixture_dir / "codec_config.yaml")
    assert c == tiny_codec_config()
    assert (c.encoder_dim, c.decoder_dim, c.latent_dim, c.encoder_transformer_layers) == (8, 64, 128, (0, 0, 0, 1))
    assert c.transformer_block_size == 1024 and c.transformer_norm_eps == 1e-5  # yaml `1e-5` is a str to pyyaml
    qt = c.quantizer_transformer
    assert (qt.n_layer, qt.n_head, qt.dim, qt.head_dim, qt.intermediate_size) == (1, 2, 128, 64, 384)
    assert (qt.window_size, qt.block_size) == (16, 512)
    assert (c.hop_length, c.frame_length, c.num_codebooks) == (512, 2048, 10)


def test_defaults_are_the_real_modded_dac_vq(fixture_dir):
    c = CodecConfig()
    assert c == CodecConfig.from_yaml(fixture_dir / "reference_modded_dac_vq.yaml")
    assert (c.hop_length, c.frame_length, c.num_codebooks, c.latent_dim) == (512, 2048, 10, 1024)
    assert c.quantizer_transformer.window_size == 128 and c.transformer_block_size == 16384


@pytest.mark.parametrize("config", [CodecConfig(), tiny_codec_config()], ids=["real", "tiny"])
def test_config_dict_round_trip(config):
    assert CodecConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(wibble=1), "unknown keys in codec: wibble"),
    (lambda d: d["quantizer"].update(wobble=2), r"unknown keys in codec.quantizer: wobble"),
    (lambda d: d["quantizer"]["pre_module"]["config"].update(n_kv=1), r"pre_module.config: n_kv"),
    (lambda d: d.update(causal=False), r"codec.causal = False is not supported"),
    (lambda d: d["transformer_general_config"].update(n_layer=3), r"n_layer is not supported"),
    (lambda d: d["quantizer"]["post_module"]["config"].update(n_local_heads=4), r"n_local_heads = 4"),
    (lambda d: d["quantizer"].update(_target_="x.ResidualVectorQuantize"), r"only fish's DownsampleResidual"),
    (lambda d: d["quantizer"]["post_module"].update(window_size=64), "must have the same configuration"),
    (lambda d: d.update(encoder_rates="2,4"), r"encoder_rates must be a list of integers"),
    (lambda d: d.update(encoder_dim=16), r"must equal the encoder's latent width"),
])
def test_config_rejects_unknown_or_unsupported(edit, message):
    data = CodecConfig().to_dict()
    edit(data)
    with pytest.raises(ValueError, match=message):
        CodecConfig.from_dict(data)


def test_config_ignores_training_only_keys():
    data = CodecConfig().to_dict()
    data["quantizer"]["quantizer_dropout"] = 0.5
    data["transformer_general_config"].update(dropout_rate=0.1, attn_dropout_rate=0.1, _partial_=True)
    assert CodecConfig.from_dict(data) == CodecConfig()


# -- loading -------------------------------------------------------------------------------------------------


def test_strict_load_of_fixture(codec, fixture_state):
    ours = codec.state_dict()
    assert list(ours) == list(fixture_state)  # same names, same order as the reference's DAC.state_dict()
    for key, value in fixture_state.items():
        assert torch.equal(ours[key].to(value.dtype), value), key
    # The stored RoPE tables are the bf16-rounded float32 angles we compute; the mask is plain tril.
    assert torch.equal(fixture_state["quantizer.pre_module.freqs_cis"], rope_table(512, 64, 10000.0))
    assert torch.equal(fixture_state["encoder.block.4.block.5.freqs_cis"], rope_table(1024, 64, 10000.0))
    assert torch.equal(fixture_state["quantizer.post_module.causal_mask"], torch.ones(512, 512).tril().bool())


@pytest.mark.parametrize("corrupt, message", [
    (lambda s: s.pop("quantizer.quantizer.quantizers.3.in_proj.weight_g"),
     r"missing: quantizer\.quantizer\.quantizers\.3\.in_proj\.weight_g"),
    (lambda s: s.update({"decoder.model.9.weight": torch.zeros(1)}), r"unexpected: decoder\.model\.9\.weight"),
    (lambda s: s.update({"quantizer.semantic_quantizer.quantizers.0.codebook.weight": torch.zeros(1024, 8)}),
     r"wrong shape: quantizer\.semantic_quantizer\.quantizers\.0\.codebook\.weight \(1024, 8\) "
     r"\(expected \(4096, 8\)\)"),
    (lambda s: s.pop("quantizer.pre_module.causal_mask"), r"missing: quantizer\.pre_module\.causal_mask"),
])
def test_mismatched_checkpoint_raises(tmp_path, fixture_state, corrupt, message):
    state = dict(fixture_state)
    corrupt(state)
    torch.save(state, tmp_path / "codec.pth")
    with pytest.raises(CheckpointError, match=message):
        load_codec(tmp_path / "codec.pth", tiny_codec_config())


def test_wrong_config_and_unreadable_file_raise(tmp_path, fixture_dir):
    with pytest.raises(CheckpointError, match="missing: .*wrong shape: "):
        load_codec(fixture_dir / "codec.pth")  # the real-size config: more layers, wider tensors
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_codec(tmp_path / "junk.pth", tiny_codec_config())
    with pytest.raises(CheckpointError, match="not found"):
        load_codec(tmp_path / "absent.pth", tiny_codec_config())


@pytest.mark.parametrize("wrap", [
    lambda s: {"state_dict": s},
    lambda s: {**{f"generator.{k}": v for k, v in s.items()}, "discriminator.conv.weight": torch.zeros(2)},
], ids=["lightning", "gan"])
def test_wrapped_checkpoints_load_like_the_reference(tmp_path, wrap):
    state = random_codec_state_dict(seed=3)
    torch.save(wrap(dict(state)), tmp_path / "codec.pth")
    loaded = load_codec(tmp_path / "codec.pth", tiny_codec_config()).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


# -- parity --------------------------------------------------------------------------------------------------


def test_encode_matches_reference_codes(codec, golden):
    codes = codec.encode(torch.from_numpy(golden["audio"]))
    assert codes.dtype == torch.int64 and codes.shape == (10, 52)
    mismatches = np.argwhere(codes.numpy() != golden["codes"])
    assert len(mismatches) == 0, f"codes differ at [codebook, frame] {mismatches[:10].tolist()}"


def test_decode_matches_reference_audio(codec, golden):
    audio = codec.decode(torch.from_numpy(golden["codes"])).numpy()
    expected = golden["decoded"]
    assert audio.dtype == np.float32 and audio.shape == expected.shape == (52 * 2048,)
    rel = np.linalg.norm(audio - expected) / np.linalg.norm(expected)
    max_abs = np.abs(audio - expected).max()
    assert rel < 1e-4, f"relative L2 error {rel:.3g}, max abs diff {max_abs:.3g}"


@pytest.mark.parametrize("pushes", [[1] * 52, [11, 22, 19], [52], [5, 3, 40, 4]])
def test_incremental_decode_is_the_one_shot_decode(codec, golden, pushes):
    """Pushed a few frames at a time (single frames included), the stream keeps every convolution's and the
    window-limited transformers' past: the audio is the reference's one-shot decode to float rounding, though
    the clip (52 frames) is several times the tiny codec's attention window (16)."""
    codes = torch.from_numpy(golden["codes"])
    stream, pieces, start = codec.stream(), [], 0
    for n in pushes:
        pieces.append(stream.push(codes[:, start : start + n]))
        assert pieces[-1].shape == (n * 2048,)
        start += n
    audio = torch.cat(pieces).numpy()
    expected = golden["decoded"]
    assert np.linalg.norm(audio - expected) / np.linalg.norm(expected) < 1e-4
    assert stream.frames == 52


def test_decode_streams_are_independent_and_bounded(codec, golden):
    codes = torch.from_numpy(golden["codes"])
    a, b = codec.stream(), codec.stream()
    interleaved = [a.push(codes[:, :20]), b.push(codes[:, 30:40]), a.push(codes[:, 20:52])]
    alone = codec.stream()
    np.testing.assert_allclose(torch.cat(interleaved[::2]).numpy(),
                               torch.cat([alone.push(codes[:, :20]), alone.push(codes[:, 20:52])]).numpy(),
                               rtol=0, atol=1e-6)
    limit = codec.config.quantizer_transformer.block_size
    long = codes.repeat(1, -(-limit // 52))[:, :limit]
    full = codec.stream()
    full.push(long)
    with pytest.raises(ValueError, match="at most"):
        full.push(codes[:, :1])


def test_batch_equals_one_at_a_time(codec, golden):
    a = torch.from_numpy(golden["audio"][:40000])
    b = torch.from_numpy(golden["audio"][30000:70000]) * 0.5
    batch = codec.encode(torch.stack([a, b]))
    assert batch.shape == (2, 10, 20)
    assert torch.equal(batch[0], codec.encode(a)) and torch.equal(batch[1], codec.encode(b))
    audio = codec.decode(batch)
    assert audio.shape == (2, 20 * 2048)
    for row in range(2):  # batching changes float32 reduction blocking in the convs: ~1e-5 differences
        torch.testing.assert_close(audio[row], codec.decode(batch[row]), rtol=1e-4, atol=1e-4)


def test_causal_zero_padding_keeps_leading_codes(codec, golden):
    """A clip padded with zeros to a batch's length encodes its own frames exactly as alone (causality)."""
    a = torch.from_numpy(golden["audio"][:10000])  # 5 frames, the last one partial
    padded = torch.cat([a, torch.zeros(20000)])
    assert torch.equal(codec.encode(padded)[:, :5], codec.encode(a))


def test_decode_clamps_like_the_reference_and_rejects_bad_codes(codec, golden):
    codes = torch.from_numpy(golden["codes"][:, :4]).clone()
    big = codes.clone()
    big[0, 0], big[5, 1] = 9999, 4000  # beyond the semantic (4096) / residual (1024) books
    clamped = codes.clone()
    clamped[0, 0], clamped[5, 1] = 4095, 1023
    assert torch.equal(codec.decode(big), codec.decode(clamped))
    assert torch.equal(codec.decode(big.int()), codec.decode(clamped))
    with pytest.raises(ValueError, match="non-negative"):
        codec.decode(-big)
    with pytest.raises(ValueError, match="expected codes"):
        codec.decode(codes[:9])
    with pytest.raises(ValueError, match="expected audio"):
        codec.encode(torch.zeros(2, 1, 100))


def test_window_mask_sees_itself_and_previous_window_minus_one():
    mask = window_mask(6, 3, torch.device("cpu"))[0, 0]
    i, j = np.indices((6, 6))
    assert np.array_equal(mask.numpy(), (j <= i) & (j > i - 3))
    assert torch.equal(window_mask(4, None, torch.device("cpu"))[0, 0], torch.ones(4, 4).tril().bool())


def test_bfloat16_runs_with_float32_output(fixture_dir, golden):
    codec = load_codec(fixture_dir / "codec.pth", tiny_codec_config(), dtype=torch.bfloat16)
    assert codec.dtype == torch.bfloat16
    codes = codec.encode(torch.from_numpy(golden["audio"][:8192]))
    assert codes.shape == (10, 4) and codes.dtype == torch.int64
    audio = codec.decode(codes)
    assert audio.dtype == torch.float32 and audio.shape == (8192,) and torch.isfinite(audio).all()


# -- full size -----------------------------------------------------------------------------------------------


def _layerless(key: str) -> str:
    return re.sub(r"\blayers\.\d+\.", "layers.N.", key)


def test_full_size_builds_on_meta_with_the_fixture_structure(fixture_state):
    with torch.device("meta"):
        codec = Codec(CodecConfig())
    state = codec.state_dict()
    assert {_layerless(k) for k in state} == {_layerless(k) for k in fixture_state}
    assert len(state) == 541  # 535 weights + 3 bf16 RoPE tables + 3 bool masks, as in the released codec.pth
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    expected = {
        "quantizer.semantic_quantizer.quantizers.0.codebook.weight": (4096, 8),
        "quantizer.quantizer.quantizers.8.codebook.weight": (1024, 8),
        "quantizer.quantizer.quantizers.0.in_proj.weight_v": (8, 1024, 1),
        "encoder.block.0.conv.parametrizations.weight.original1": (64, 1, 7),
        "encoder.block.6.conv.parametrizations.weight.original1": (1024, 1024, 3),
        "encoder.block.4.block.5.layers.3.attention.wqkv.weight": (3072, 1024),
        "encoder.block.4.block.5.layers.3.feed_forward.w1.weight": (3072, 1024),
        "encoder.block.4.block.5.freqs_cis": (16384, 32, 2),
        "encoder.block.4.block.5.causal_mask": (16384, 16384),
        "quantizer.pre_module.layers.7.attention.wqkv.weight": (3072, 1024),
        "quantizer.post_module.layers.7.attention.wo.weight": (1024, 1024),
        "quantizer.post_module.layers.7.feed_forward.w2.weight": (1024, 3072),
        "quantizer.pre_module.freqs_cis": (4096, 32, 2),
        "quantizer.downsample.1.1.pwconv1.weight": (4096, 1024),
        "decoder.model.0.conv.parametrizations.weight.original1": (1536, 1024, 7),
        "decoder.model.1.block.1.conv.parametrizations.weight.original0": (1536, 1, 1),  # g per input channel
        "decoder.model.1.block.1.conv.parametrizations.weight.original1": (1536, 768, 16),
        "decoder.model.6.conv.parametrizations.weight.original1": (1, 96, 7),
    }
    assert {k: shapes[k] for k in expected} == expected


# -- random checkpoints --------------------------------------------------------------------------------------


def test_write_tiny_codec_round_trip(tmp_path):
    path = write_tiny_codec(tmp_path / "codec.pth", seed=7)
    again = write_tiny_codec(tmp_path / "again.pth", seed=7)
    other = random_codec_state_dict(seed=8)
    a, b = (torch.load(p, weights_only=True) for p in (path, again))
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["decoder.model.0.conv.bias"], other["decoder.model.0.conv.bias"])
    assert a["quantizer.pre_module.freqs_cis"].dtype == torch.bfloat16
    assert a["quantizer.pre_module.causal_mask"].dtype == torch.bool

    codec = load_codec(path, tiny_codec_config())
    audio = torch.sin(torch.arange(5000) * 0.05) * 0.3
    codes = codec.encode(audio)
    assert codes.shape == (10, 3)
    assert int(codes[0].max()) < 4096 and int(codes[1:].max()) < 1024
    assert torch.equal(codes, load_codec(again, tiny_codec_config()).encode(audio))
    decoded = codec.decode(codes)
    assert decoded.shape == (3 * 2048,) and 0.01 < float(decoded.std()) < 0.9
