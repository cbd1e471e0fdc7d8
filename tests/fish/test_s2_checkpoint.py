"""S2 checkpoints in shoal.fish: the nested config, the norm_fastlayer_input switch, detection of the kind, strict
loading of the safetensors shards under the official names, and the full-size S2-Pro shape on the meta device."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from shoal.errors import CheckpointError
from shoal.fish.checkpoint import (
    check_checkpoint_dir,
    load_dual_ar,
    load_tokenizer,
    s2_official_key,
    strict_load,
)
from shoal.fish.dual_ar import DualARConfig, DualARTransformer
from shoal.fish.tokenizer import FishTokenizer
from shoal.fish.tokenizer_s2 import S2Tokenizer
from shoal.layout import S2_CHECKPOINT_FILES, checkpoint_kind
from shoal.testing import S1_MINI_CONFIG, S2_PRO_CONFIG, S2_SHARDS, write_tiny_s2_checkpoint

CPU = torch.device("cpu")
# S2-Pro's semantic tokens (config.json's semantic_start/end_token_id): <|semantic:0|>..<|semantic:4095|>.
S2_PRO_SEMANTIC = (151678, 155773)
# The published S2-Pro transformer: 4,561,852,416 parameters in 358 tensors (slow 36 layers with qk-norm, fast 4
# without, tied head, no fast_project_in since both stacks are 2560 wide).
S2_PRO_PARAMETERS = 4_561_852_416
S2_PRO_TENSORS = 358


@pytest.fixture(scope="module")
def s2_dir(tmp_path_factory):
    return write_tiny_s2_checkpoint(tmp_path_factory.mktemp("s2") / "tiny", seed=3)


@pytest.fixture
def s2_copy(s2_dir, tmp_path):
    """A private copy of the tiny S2 checkpoint for tests that damage it."""
    return shutil.copytree(s2_dir, tmp_path / "copy")


def nested(**changes) -> dict:
    """S2_PRO_CONFIG with `section.key=value` changes (`text_config__dim=...`), a deep copy."""
    data = copy.deepcopy(S2_PRO_CONFIG)
    for path, value in changes.items():
        *sections, key = path.split("__")
        target = data
        for section in sections:
            target = target[section]
        if value is None:
            target.pop(key)
        else:
            target[key] = value
    return data


# -- config ----------------------------------------------------------------------------------------------------
def test_s2_pro_config_flattens_like_the_reference():
    c = DualARConfig.from_dict(nested())
    assert (c.model_type, c.vocab_size, c.n_layer, c.n_head, c.n_local_heads, c.head_dim, c.dim) == \
        ("dual_ar", 155776, 36, 32, 8, 128, 2560)
    assert (c.intermediate_size, c.rope_base, c.norm_eps, c.max_seq_len, c.tie_word_embeddings) == \
        (9728, 1000000, 1e-6, 32768, True)
    assert c.attention_qk_norm and not c.attention_qkv_bias and not c.attention_o_bias
    assert (c.codebook_size, c.num_codebooks, c.n_fast_layer) == (4096, 10, 4)
    assert (c.fast_dim, c.fast_n_head, c.fast_n_local_heads, c.fast_head_dim, c.fast_intermediate_size) == \
        (2560, 32, 8, 128, 9728)
    assert not c.fast_attention_qk_norm and not c.fast_attention_qkv_bias and not c.fast_attention_o_bias
    # Forced by the reference whatever config.json says; the semantic range is kept for the load-time check.
    assert c.scale_codebook_embeddings and c.norm_fastlayer_input
    assert (c.semantic_begin_id, c.semantic_end_id) == S2_PRO_SEMANTIC


def test_s2_absent_values_take_the_reference_defaults():
    c = DualARConfig.from_dict(nested(text_config__head_dim=None, text_config__intermediate_size=None,
                                      text_config__norm_eps=None, text_config__rope_base=None,
                                      audio_decoder_config__norm_eps=None, audio_decoder_config__rope_base=None,
                                      audio_decoder_config__dim=None, audio_decoder_config__head_dim=None,
                                      audio_decoder_config__attention_qk_norm=None))
    # The reference drops None values, so head_dim falls to the dataclass default 64 (not dim // n_head) and the
    # fast stack to the slow one's values.
    assert c.head_dim == 64 and c.fast_head_dim == 64 and c.fast_dim == 2560
    assert c.intermediate_size == 6912  # 2/3 * 4 * 2560 rounded up to a multiple of 256
    assert (c.norm_eps, c.rope_base) == (1e-5, 10000)
    assert c.fast_attention_qk_norm  # inherited from the slow stack


@pytest.mark.parametrize("where, path", [
    ("", "wibble"),
    (" in text_config", "text_config__wibble"),
    (" in audio_decoder_config", "audio_decoder_config__wibble"),
    ("", "n_layer"),  # a flat key at the top of a nested config is not read by the reference either
])
def test_s2_unknown_keys_are_named(where, path):
    key = path.rsplit("__", 1)[-1]
    with pytest.raises(ValueError, match=f"unknown config.json keys{where}: {key}$"):
        DualARConfig.from_dict(nested(**{path: 1}))


@pytest.mark.parametrize("changes, message", [
    ({"text_config__use_moe": True}, "text_config describes a mixture-of-experts model"),
    ({"audio_decoder_config__rope_base": 10000}, r"audio_decoder_config.rope_base \(10000\) differs"),
    ({"audio_decoder_config__norm_eps": 1e-5}, r"audio_decoder_config.norm_eps \(1e-05\) differs"),
    ({"text_config__n_layer": None}, "text_config lacks n_layer"),
    ({"audio_decoder_config__num_codebooks": None}, "audio_decoder_config lacks num_codebooks"),
    ({"text_config": None}, "text_config must be an object"),
])
def test_s2_configs_shoal_cannot_run_exactly_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        DualARConfig.from_dict(nested(**changes))


def test_s1_configs_are_unchanged():
    c = DualARConfig.from_dict(dict(S1_MINI_CONFIG))
    assert not c.norm_fastlayer_input and c.semantic_begin_id is None and c.model_type == "dual_ar"
    assert DualARConfig.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError, match="unsupported model_type 'llama'"):
        DualARConfig.from_dict({**S1_MINI_CONFIG, "model_type": "llama"})


# -- the fast stack's input ------------------------------------------------------------------------------------
def tiny_model(norm_fastlayer_input: bool, fast_dim: int) -> DualARTransformer:
    config = DualARConfig(vocab_size=64, n_layer=1, n_head=2, dim=16, head_dim=8, intermediate_size=32,
                          codebook_size=8, num_codebooks=2, n_fast_layer=1, fast_dim=fast_dim, max_seq_len=16,
                          norm_fastlayer_input=norm_fastlayer_input)
    torch.manual_seed(0)
    model = DualARTransformer(config, 40, 47)
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)  # a norm that is not the identity
    model.setup_caches(batch=1, seq_len=16)
    return model.eval()


def tiny_prompt() -> torch.Tensor:
    """[1, 3, 5]: text tokens and two semantic frames (ids 41, 45) with their codes."""
    inp = torch.randint(0, 8, (1, 3, 5), generator=torch.Generator().manual_seed(1))
    inp[0, 0] = torch.tensor([1, 41, 2, 3, 45])
    return inp


@pytest.mark.parametrize("fast_dim", [16, 24])
def test_norm_fastlayer_input_feeds_the_projected_final_norm(fast_dim):
    """S2: the fast stack gets fast_project_in(norm(h)); S1 gets fast_project_in(h). Same weights, same logits."""
    inp = tiny_prompt()
    pos = torch.arange(5)[None]
    captured = {}
    results = {}
    for switch in (False, True):
        model = tiny_model(switch, fast_dim)
        hook = model.norm.register_forward_hook(lambda m, args, out: captured.update(normed=out, raw=args[0]))
        with torch.no_grad():
            results[switch] = model.forward_slow(inp, pos)
            expected = model.fast_project_in(captured["normed" if switch else "raw"])
        hook.remove()
        torch.testing.assert_close(results[switch][1], expected, rtol=0, atol=0)
    torch.testing.assert_close(results[True][0], results[False][0], rtol=0, atol=0)
    assert not torch.allclose(results[True][1], results[False][1])


def test_all_positions_gives_every_position():
    model = tiny_model(True, 16)
    inp = tiny_prompt()
    pos = torch.arange(5)[None]
    with torch.no_grad():
        logits, hidden = model.forward_slow(inp, pos, all_positions=True)
        last_logits, last_hidden = model.forward_slow(inp, pos)
    assert logits.shape == (1, 5, 64) and hidden.shape == (1, 5, 16)
    # Equal up to the matmul's summation order over 5 rows instead of 1.
    torch.testing.assert_close(logits[:, -1], last_logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(hidden[:, -1], last_hidden, rtol=0, atol=1e-5)


# -- detection -------------------------------------------------------------------------------------------------
def test_kind_is_read_from_the_directory(fixture_dir, s2_dir, tmp_path):
    assert checkpoint_kind(fixture_dir) == "s1" and checkpoint_kind(s2_dir) == "s2"
    assert check_checkpoint_dir(fixture_dir) == fixture_dir and check_checkpoint_dir(s2_dir) == s2_dir
    assert isinstance(load_tokenizer(fixture_dir), FishTokenizer)
    assert isinstance(load_tokenizer(s2_dir), S2Tokenizer)
    # Without a config.json, the kind's own weights or tokenizer files decide, so the missing file is named.
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(s2_dir / "tokenizer.json", partial)
    assert checkpoint_kind(partial) == "s2"
    with pytest.raises(CheckpointError, match=r"^S2 checkpoint .* missing config.json, model.safetensors.index.json"
                                              r", tokenizer_config.json, codec.pth;"):
        check_checkpoint_dir(partial)


def test_a_directory_of_neither_kind_says_so(tmp_path):
    with pytest.raises(CheckpointError, match="is not a Fish Speech checkpoint"):
        check_checkpoint_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    with pytest.raises(CheckpointError, match="model_type 'qwen3': shoal serves 'dual_ar' .S1. and "
                                              "'fish_qwen3_omni' .S2."):
        check_checkpoint_dir(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot read .*config.json"):
        checkpoint_kind(tmp_path)


@pytest.mark.parametrize("name", [*S2_CHECKPOINT_FILES[1:], S2_SHARDS[1]])
def test_missing_s2_files_are_named(s2_copy, name):
    (s2_copy / name).unlink()
    with pytest.raises(CheckpointError, match=f"S2 checkpoint .* is incomplete: missing {name};"):
        check_checkpoint_dir(s2_copy)


# -- weights ---------------------------------------------------------------------------------------------------
def test_tiny_s2_checkpoint_loads_strictly(s2_dir):
    tokenizer = load_tokenizer(s2_dir)
    model = load_dual_ar(s2_dir, tokenizer, CPU, torch.float32)
    assert model.config.norm_fastlayer_input and model.config.scale_codebook_embeddings
    assert (model.semantic_begin_id, model.semantic_end_id) == (tokenizer.semantic_begin_id,
                                                                 tokenizer.semantic_end_id)
    stored = {}
    for shard in S2_SHARDS:
        stored.update(load_file(s2_dir / shard))
    for name, tensor in model.state_dict().items():  # every parameter comes from the file of its official name
        torch.testing.assert_close(tensor, stored.pop(s2_official_key(name)).float(), rtol=0, atol=0)
    assert not stored
    assert model.rope.device == CPU and model.rope.shape[0] == model.config.max_seq_len


def rewrite_shard(directory, shard, edit) -> None:
    """Apply `edit` to a shard's tensors and keep the index in step (so only the model check can object)."""
    tensors = dict(load_file(directory / shard))
    edit(tensors)
    save_file(tensors, str(directory / shard), metadata={"format": "pt"})
    index_path = directory / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard}
    index["weight_map"].update(dict.fromkeys(tensors, shard))
    index_path.write_text(json.dumps(index))


@pytest.mark.parametrize("shard, edit, message", [
    (S2_SHARDS[1], lambda t: t.pop("audio_decoder.output.weight"), r"missing: audio_decoder\.output\.weight"),
    (S2_SHARDS[0], lambda t: t.update({"text_model.model.output.weight": torch.zeros(4390, 32)}),
     r"unexpected: text_model\.model\.output\.weight"),
    (S2_SHARDS[0], lambda t: t.update({"text_model.model.layers.1.attention.wqkv.weight": torch.zeros(3, 32)}),
     r"wrong shape: text_model\.model\.layers\.1\.attention\.wqkv\.weight \(3, 32\) \(expected \(64, 32\)\)"),
])
def test_strict_load_names_official_keys(s2_copy, shard, edit, message):
    rewrite_shard(s2_copy, shard, edit)
    tokenizer = load_tokenizer(s2_copy)
    with pytest.raises(CheckpointError, match=r"model.safetensors.index.json does not match the architecture in "
                                              r"config.json \(" + message):
        load_dual_ar(s2_copy, tokenizer, CPU, torch.float32)


def test_index_and_shards_must_agree(s2_copy):
    index_path = s2_copy / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["audio_decoder.norm.weight"] = S2_SHARDS[0]
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"{S2_SHARDS[0]} lacks audio_decoder.norm.weight"):
        load_dual_ar(s2_copy, load_tokenizer(s2_copy), CPU, torch.float32)


def test_fish_named_safetensors_load_too(s2_dir):
    """The reference renames only when official prefixes are present; shards in fish's own names load as they are."""
    tokenizer = load_tokenizer(s2_dir)
    model = load_dual_ar(s2_dir, tokenizer, CPU, torch.float32)
    with torch.device("meta"):
        fresh = DualARTransformer(model.config, tokenizer.semantic_begin_id, tokenizer.semantic_end_id)
    strict_load(fresh, model.state_dict(), s2_dir)


def test_corrupt_shard_is_a_checkpoint_error(s2_copy):
    (s2_copy / S2_SHARDS[0]).write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match=f"cannot read .*{S2_SHARDS[0]}"):
        load_dual_ar(s2_copy, load_tokenizer(s2_copy), CPU, torch.float32)


@pytest.mark.parametrize("key, value, message", [
    ("semantic_start_token_id", 7, r"config.json's semantic tokens 7\.\.\d+ are not the tokenizer's"),
    ("text_config", "small", "tokenizer has ids up to"),
])
def test_config_and_tokenizer_must_agree(s2_copy, key, value, message):
    config = json.loads((s2_copy / "config.json").read_text())
    if value == "small":
        config["text_config"]["vocab_size"] = 300
    else:
        config[key] = value
    (s2_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message):
        load_dual_ar(s2_copy, load_tokenizer(s2_copy), CPU, torch.float32)


# -- full size -------------------------------------------------------------------------------------------------
def test_full_size_s2_pro_builds_on_meta_with_the_official_names():
    config = DualARConfig.from_dict(nested())
    with torch.device("meta"):
        model = DualARTransformer(config, *S2_PRO_SEMANTIC)
    state = {s2_official_key(k): tuple(v.shape) for k, v in model.state_dict().items()}
    assert len(state) == S2_PRO_TENSORS
    assert sum(p.numel() for p in model.parameters()) == S2_PRO_PARAMETERS
    assert state["text_model.model.embeddings.weight"] == (155776, 2560)
    assert state["text_model.model.layers.35.attention.wqkv.weight"] == ((32 + 2 * 8) * 128, 2560)
    assert state["text_model.model.layers.35.attention.wo.weight"] == (2560, 32 * 128)
    assert state["text_model.model.layers.0.attention.q_norm.weight"] == (128,)
    assert state["text_model.model.layers.0.feed_forward.w1.weight"] == (9728, 2560)
    assert state["audio_decoder.codebook_embeddings.weight"] == (10 * 4096, 2560)
    assert state["audio_decoder.embeddings.weight"] == (4096, 2560)
    assert state["audio_decoder.layers.3.attention.wqkv.weight"] == (6144, 2560)
    assert state["audio_decoder.output.weight"] == (4096, 2560)
    assert state["audio_decoder.norm.weight"] == (2560,)
    assert "text_model.model.output.weight" not in state  # tied head
    assert not any("project_in" in k for k in state)  # both stacks 2560 wide
    assert not any(k.startswith("audio_decoder.layers.") and "q_norm" in k for k in state)
    assert model.rope.shape == (32768, 64, 2) and model.fast_rope.shape == (10, 64, 2)
