"""Parity of the codec with the reference's golden outputs, its config parsing, and strict checkpoint loading."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from shoal.errors import CheckpointError
from shoal.fish.checkpoint import load_checkpoint_codec
from shoal.fish.codec import (FISH2_BLOCK_SIZES, Codec, CodecConfig, load_codec, reference_codec_config, rope_table,
                              window_mask)
from shoal.testing import (random_codec_state_dict, tiny_codec_config, with_derived_buffers, without_derived_buffers,
                           write_tiny_codec)

from support import load_codec_golden, other_codec_layout, with_codec_layout

#: Each fixture's codec as fish-speech wrote it, and re-saved in the other layout: the goldens hold for all four.
#: S1 follows fish-speech 0.1.0 (the stored tables are used, missing ones derived); S2 follows 2.0.0 (stored
#: tables are never read).
VARIANTS = {"s1-as-written": ("s1", "stored"), "s1-without-buffers": ("s1", "derived"),
            "s2-as-written": ("s2", "derived"), "s2-with-buffers": ("s2", "ignored")}


@pytest.fixture(scope="module", params=list(VARIANTS))
def variant(request, fixture_dir, s2_fixture_dir, tmp_path_factory) -> tuple[str, Path, Path]:
    """(tables, checkpoint, fixture): where the loaded codec's RoPE tables must come from, a checkpoint holding the
    variant's codec.pth, and the fixture whose goldens it must reproduce."""
    kind, tables = VARIANTS[request.param]
    fixture = fixture_dir if kind == "s1" else s2_fixture_dir
    checkpoint = fixture
    if request.param.endswith(("without-buffers", "with-buffers")):
        checkpoint = with_codec_layout(fixture, other_codec_layout(kind), tmp_path_factory.mktemp(request.param))
    return tables, checkpoint, fixture


@pytest.fixture(scope="module")
def layout_codec(variant) -> Codec:
    return load_checkpoint_codec(variant[1])


@pytest.fixture(scope="module")
def layout_golden(variant):
    return load_codec_golden(variant[2])


@pytest.fixture(scope="module")
def codec(fixture_dir) -> Codec:
    return load_checkpoint_codec(fixture_dir)


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


def test_strict_load_of_fixture(fixture_dir, fixture_state):
    codec = load_checkpoint_codec(fixture_dir)
    ours = codec.state_dict()
    assert not any(k.rpartition(".")[2] in ("freqs_cis", "causal_mask") for k in ours)  # the weights alone
    # Same names, same order as the reference's DAC.state_dict() of fish-speech 0.1.0, buffers put back.
    assert list(with_derived_buffers(codec, ours)) == list(fixture_state)
    for key, value in ours.items():
        assert torch.equal(value.to(fixture_state[key].dtype), fixture_state[key]), key
    # The stored RoPE tables are the bf16-rounded float32 angles we compute; the mask is plain tril.
    assert torch.equal(fixture_state["quantizer.pre_module.freqs_cis"], rope_table(512, 64, 10000.0))
    assert torch.equal(fixture_state["encoder.block.4.block.5.freqs_cis"], rope_table(1024, 64, 10000.0))
    assert torch.equal(fixture_state["quantizer.post_module.causal_mask"], torch.ones(512, 512).tril().bool())
    assert codec.tables == "stored"


def test_the_codec_reads_its_tables_as_its_reference_does(layout_codec, variant):
    tables, checkpoint, _ = variant
    assert layout_codec.tables == tables
    assert not any("causal_mask" in name for name, _ in layout_codec.named_buffers())  # no mask is ever allocated
    for transformer in layout_codec.transformers().values():
        c = transformer.config
        assert torch.equal(transformer.freqs_cis, rope_table(c.block_size, c.head_dim, c.rope_base).float())


def test_s1_uses_the_stored_table_and_s2_ignores_it(tmp_path, fixture_state):
    """fish-speech 0.1.0 rotates with the table codec.pth stores; 2.0 builds its own and never reads the file's."""
    state = dict(fixture_state)
    state["quantizer.pre_module.freqs_cis"] = state["quantizer.pre_module.freqs_cis"].flip(0)
    torch.save(state, tmp_path / "codec.pth")
    s1 = load_codec(tmp_path / "codec.pth", tiny_codec_config(), kind="s1")
    s2 = load_codec(tmp_path / "codec.pth", tiny_codec_config(), kind="s2")
    assert torch.equal(s1.quantizer.pre_module.freqs_cis, state["quantizer.pre_module.freqs_cis"].float())
    assert torch.equal(s2.quantizer.pre_module.freqs_cis, rope_table(512, 64, 10000.0).float())
    assert (s1.tables, s2.tables) == ("stored", "ignored")


def test_derived_tables_are_bit_identical_to_the_references():
    """fish-speech 2.0 builds every codec table for 327,680 positions; 0.1.0 for block_size. The first block_size
    rows of the long table are the short one, bit for bit, at any thread count, so the tables shoal derives for
    its block sizes are the reference's for every position used."""
    long = rope_table(327680, 64, 10000.0)
    threads = torch.get_num_threads()
    try:
        for n in (1, threads):
            torch.set_num_threads(n)
            for block in (256, 512, 1024, *FISH2_BLOCK_SIZES.values(), 4096, 16384):
                assert torch.equal(long[:block], rope_table(block, 64, 10000.0)), (n, block)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("corrupt, message", [
    (lambda s: s.pop("quantizer.quantizer.quantizers.3.in_proj.weight_g"),
     r"missing: quantizer\.quantizer\.quantizers\.3\.in_proj\.weight_g"),
    (lambda s: s.update({"decoder.model.9.weight": torch.zeros(1)}), r"unexpected: decoder\.model\.9\.weight"),
    (lambda s: s.update({"quantizer.semantic_quantizer.quantizers.0.codebook.weight": torch.zeros(1024, 8)}),
     r"wrong shape: quantizer\.semantic_quantizer\.quantizers\.0\.codebook\.weight \(1024, 8\) "
     r"\(expected \(4096, 8\)\)"),
    (lambda s: s.update({"quantizer.freqs_cis": torch.zeros(512, 32, 2)}), r"unexpected: quantizer\.freqs_cis"),
])
def test_mismatched_checkpoint_raises(tmp_path, fixture_state, corrupt, message):
    state = dict(fixture_state)
    corrupt(state)
    torch.save(state, tmp_path / "codec.pth")
    for kind in ("s1", "s2"):
        with pytest.raises(CheckpointError, match=r"^\S+codec\.pth: codec weights do not match the codec config \("
                                                  + message):
            load_codec(tmp_path / "codec.pth", tiny_codec_config(), kind=kind)


def test_tables_of_another_block_size_fail_for_s1_and_are_ignored_for_s2(tmp_path, fixture_state):
    """A codec.pth whose stored tables follow another block_size (fish-speech 0.1.0 code, 2.0.0's yaml): 0.1.0's
    load_state_dict refuses a misshapen buffer, 2.0.0 never reads it."""
    state = dict(fixture_state)
    for name in ("pre_module", "post_module"):
        state[f"quantizer.{name}.freqs_cis"] = rope_table(256, 64, 10000.0)
        state[f"quantizer.{name}.causal_mask"] = torch.ones(256, 256, dtype=torch.bool).tril()
    torch.save(state, tmp_path / "codec.pth")
    with pytest.raises(CheckpointError, match=r"wrong shape: quantizer\.pre_module\.freqs_cis \(256, 32, 2\) "
                                              r"\(expected \(512, 32, 2\)\), quantizer\.pre_module\.causal_mask"):
        load_codec(tmp_path / "codec.pth", tiny_codec_config(), kind="s1")
    codec = load_codec(tmp_path / "codec.pth", tiny_codec_config(), kind="s2")
    assert codec.tables == "ignored"
    assert torch.equal(codec.quantizer.pre_module.freqs_cis, rope_table(512, 64, 10000.0).float())


def test_a_codec_without_tables_loads_and_keeps_the_weights(tmp_path, fixture_state):
    torch.save(without_derived_buffers(fixture_state), tmp_path / "codec.pth")
    codec = load_codec(tmp_path / "codec.pth", tiny_codec_config())
    assert codec.tables == "derived"
    assert all(torch.equal(v, fixture_state[k].float()) for k, v in codec.state_dict().items())


def test_each_kind_defaults_to_its_references_yaml(fixture_dir, s2_fixture_dir):
    """No codec_config.yaml: S1 gets fish-speech 0.1.0's modded_dac_vq.yaml, S2 2.0.0's (block sizes halved)."""
    assert reference_codec_config("s1") == CodecConfig.from_yaml(fixture_dir / "reference_modded_dac_vq.yaml")
    s2 = CodecConfig.from_yaml(s2_fixture_dir / "reference_modded_dac_vq.yaml")
    assert reference_codec_config("s2") == s2
    assert (s2.transformer_block_size, s2.quantizer_transformer.block_size) == (8192, 2048)
    assert CodecConfig.from_yaml(s2_fixture_dir / "codec_config.yaml").quantizer_transformer.block_size == 256


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
@pytest.mark.parametrize("layout", ["0.1", "2.0"])
def test_wrapped_checkpoints_load_like_the_reference(tmp_path, wrap, layout):
    state = random_codec_state_dict(seed=3, layout=layout)
    torch.save(wrap(dict(state)), tmp_path / "codec.pth")
    loaded = load_codec(tmp_path / "codec.pth", tiny_codec_config()).state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in loaded)


# -- parity --------------------------------------------------------------------------------------------------


def test_encode_matches_reference_codes(layout_codec, layout_golden):
    """Each fixture's codec, as fish-speech wrote it and re-saved in the other layout, gives its goldens."""
    codec, golden = layout_codec, layout_golden
    codes = codec.encode(torch.from_numpy(golden["audio"]))
    assert codes.dtype == torch.int64 and codes.shape == (10, 52)
    mismatches = np.argwhere(codes.numpy() != golden["codes"])
    assert len(mismatches) == 0, f"codes differ at [codebook, frame] {mismatches[:10].tolist()}"


def test_decode_matches_reference_audio(layout_codec, layout_golden):
    codec, golden = layout_codec, layout_golden
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
    codec = load_checkpoint_codec(fixture_dir, dtype=torch.bfloat16)
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
    assert len(codec.state_dict()) == 535  # the weights; fish-speech 2.x saves these alone
    state = with_derived_buffers(codec, codec.state_dict())  # 0.1.0's layout, released with S1
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
    fish2 = random_codec_state_dict(seed=7, layout="2.0")
    assert list(fish2) == list(without_derived_buffers(a)) and all(torch.equal(fish2[k], a[k]) for k in fish2)

    codec = load_codec(path, tiny_codec_config())
    audio = torch.sin(torch.arange(5000) * 0.05) * 0.3
    codes = codec.encode(audio)
    assert codes.shape == (10, 3)
    assert int(codes[0].max()) < 4096 and int(codes[1:].max()) < 1024
    assert torch.equal(codes, load_codec(again, tiny_codec_config()).encode(audio))
    decoded = codec.decode(codes)
    assert decoded.shape == (3 * 2048,) and 0.01 < float(decoded.std()) < 0.9
