"""Every checkpoint layout fish-speech itself loads (0.1.0 for S1, 2.0.0 for S2), each loaded by shoal to the same
model: S2 weights in one `model.safetensors` or in a `model.pth`, a Lightning checkpoint, what fish's LoRA-merge tool
writes, a flat config from fish-speech 2.0's own tools, and codecs in both fish-speech layouts. The codec's own
cases (wrapped, GAN-prefixed, derived buffers) are in test_codec.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from shoal.engines.fish import FishEngine
from shoal.errors import CheckpointError
from shoal.fish.checkpoint import (check_checkpoint_dir, load_checkpoint_codec, load_dual_ar, load_tokenizer,
                                   read_safetensors_shards, read_config)
from shoal.fish.codec import Codec, check_codec_state_dict, reference_codec_config
from shoal.layout import checkpoint_kind, missing_checkpoint_files, s2_weight_files
from shoal.testing import with_derived_buffers

from support import (as_request, as_s2_request, batch_outputs, load_golden, load_requests, other_codec_layout,
                     s2_requests, with_codec_layout)

LORA_MERGED = "lora-merged"
# Float32 on the CPU: shoal and the reference sum in different orders (as in test_s2_parity.py).
LOGITS_ATOL = 1e-4


def linked_copy(source: Path, dest: Path, skip: tuple[str, ...] = ()) -> Path:
    """`dest` with a symlink to each file of `source` but those named in `skip`."""
    dest.mkdir(parents=True, exist_ok=True)
    for entry in source.iterdir():
        if entry.is_file() and entry.name not in skip:
            (dest / entry.name).symlink_to(entry)
    return dest


def s2_without_weights(s2_fixture_dir: Path, dest: Path) -> Path:
    """The S2 fixture less its index and shards (the tokenizer, config and codec stay)."""
    skip = ("model.safetensors.index.json", *s2_weight_files(s2_fixture_dir))
    return linked_copy(s2_fixture_dir, dest, skip)


def model_state(directory: Path) -> dict[str, torch.Tensor]:
    model = load_dual_ar(directory, load_tokenizer(directory), torch.device("cpu"), torch.float32)
    return model.state_dict()


@pytest.fixture(scope="module")
def s2_state(s2_fixture_dir) -> dict[str, torch.Tensor]:
    return model_state(s2_fixture_dir)


def assert_same_model(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert list(state) == list(expected)
    for key, value in expected.items():
        assert torch.equal(state[key], value), key


# -- S2 weights in the other files fish-speech 2.0 reads --------------------------------------------------------


@pytest.mark.parametrize("names", ["official", "internal"])
def test_s2_weights_in_one_safetensors_file_load(s2_fixture_dir, s2_state, tmp_path, names):
    """fish-speech 2.0 reads a single `model.safetensors` when there is no index, under the official names or its
    own (it renames only the former)."""
    directory = s2_without_weights(s2_fixture_dir, tmp_path / "single")
    tensors = read_safetensors_shards(s2_fixture_dir)
    if names == "internal":
        tensors = {k: v.to(torch.float32) for k, v in s2_state.items() if not k.endswith("rope")}
    save_file(tensors, directory / "model.safetensors")
    assert checkpoint_kind(directory) == "s2" and s2_weight_files(directory) == ["model.safetensors"]
    check_checkpoint_dir(directory)
    assert_same_model(model_state(directory), s2_state)


def test_the_index_comes_before_a_single_file_and_a_torch_file(s2_fixture_dir, tmp_path):
    directory = linked_copy(s2_fixture_dir, tmp_path / "both")
    (directory / "model.safetensors").write_bytes(b"not read")
    (directory / "model.pth").write_bytes(b"not read either")
    assert s2_weight_files(directory)[0] == "model.safetensors.index.json"
    model_state(directory)  # the junk files are never opened
    (directory / "model.safetensors.index.json").unlink()
    assert s2_weight_files(directory) == ["model.safetensors"]
    with pytest.raises(CheckpointError, match=r"cannot read .*model\.safetensors"):
        model_state(directory)


def test_no_s2_weights_names_the_official_index(s2_fixture_dir, tmp_path):
    directory = s2_without_weights(s2_fixture_dir, tmp_path / "none")
    assert missing_checkpoint_files(directory, "s2") == ["model.safetensors.index.json"]
    with pytest.raises(CheckpointError, match=r"^S2 checkpoint .* missing model\.safetensors\.index\.json"):
        check_checkpoint_dir(directory)


@pytest.mark.parametrize("wrap", ["plain", "lightning"])
def test_s2_weights_in_a_torch_file_load(s2_fixture_dir, s2_state, tmp_path, wrap):
    """fish-speech 2.0 reads `model.pth` last, unwrapping a Lightning checkpoint ("state_dict", "model." keys) and
    dropping the audio projector's "audio_*" tensors, as fish-speech 0.1.0 does for S1."""
    directory = s2_without_weights(s2_fixture_dir, tmp_path / wrap)
    state = {k: v for k, v in s2_state.items() if not k.endswith("rope")}
    if wrap == "lightning":
        state = {"state_dict": {**{f"model.{k}": v for k, v in state.items()},
                                "model.audio_projector.weight": torch.zeros(2)}}
    torch.save(state, directory / "model.pth")
    assert checkpoint_kind(directory) == "s2" and s2_weight_files(directory) == ["model.pth"]
    assert_same_model(model_state(directory), s2_state)


# -- what fish-speech 2.0's LoRA-merge tool writes -----------------------------------------------------------


@pytest.fixture(scope="module")
def lora_merged(s2_fixture_dir, tmp_path_factory) -> Path:
    """tests/fixtures/fish-s2-tiny/lora-merged, written by fish's `tools/llama/merge_lora.py` (config.json, model.pth;
    the tokenizer files it copied unchanged are the fixture's own), with the fixture's codec beside it, as a user
    who merged a fine-tune puts it."""
    directory = linked_copy(s2_fixture_dir / LORA_MERGED, tmp_path_factory.mktemp("merged"), ("logits.npz",))
    summary = json.loads((s2_fixture_dir / "requests.json").read_text())["checkpoint"]["lora_merged"]
    for name in [*summary["left_out_as_identical_to_the_checkpoints"], "codec.pth", "codec_config.yaml"]:
        (directory / name).symlink_to(s2_fixture_dir / name)
    assert sorted(p.name for p in directory.iterdir()) == sorted(
        {*summary["files_written"], "codec.pth", "codec_config.yaml"} - {"logits.npz"})
    return directory


def test_a_lora_merged_s2_checkpoint_is_s2_with_a_flat_config(lora_merged, s2_fixture_dir):
    assert json.loads((lora_merged / "config.json").read_text())["model_type"] == "dual_ar"
    assert checkpoint_kind(lora_merged) == "s2"
    check_checkpoint_dir(lora_merged)
    # fish's flat args are the nested config flattened: the same architecture, fast stack included
    assert read_config(lora_merged) == read_config(s2_fixture_dir)


def test_a_lora_merged_model_gives_the_references_logits(lora_merged, s2_fixture_dir, s2_state):
    """The merged weights (every targeted matrix changed by the LoRA) through shoal give the logits fish-speech
    2.0.0 computes for the merged checkpoint it loads back."""
    merged = load_dual_ar(lora_merged, load_tokenizer(lora_merged), torch.device("cpu"), torch.float32)
    assert not torch.equal(merged.state_dict()["layers.0.attention.wqkv.weight"],
                           s2_state["layers.0.attention.wqkv.weight"])
    data = np.load(s2_fixture_dir / LORA_MERGED / "logits.npz")
    prompt = torch.from_numpy(data["prompt"])
    merged.setup_caches(batch=1, seq_len=prompt.shape[-1])
    with torch.inference_mode():
        logits, _ = merged.forward_slow(prompt[None], torch.arange(prompt.shape[-1])[None], all_positions=True)
    np.testing.assert_allclose(logits[0, data["positions"]].numpy(), data["logits"], rtol=0, atol=LOGITS_ATOL)


def test_a_lora_merged_checkpoint_speaks(lora_merged, s2_fixture_dir):
    engine = FishEngine.load(lora_merged, device="cpu", precision="float32")
    try:
        assert engine.s2 and engine.model_name == "s2-pro"
        req = next(r for r in s2_requests(s2_fixture_dir) if r["name"] == "noref")
        result = engine.run(as_s2_request(s2_fixture_dir, req))
        assert result.codes.shape[0] == 10 and result.codes.shape[1] > 0 and np.isfinite(result.audio).all()
    finally:
        engine.close()


# -- S1 -----------------------------------------------------------------------------------------------------------


def test_an_s1_config_with_fish_2_fields_loads(fixture_dir, tmp_path):
    """fish-speech 2.0's tools save the flat args with fields 0.1.0 lacks (its LoRA merge of an S1 base writes
    config.json and model.pth before failing on the tiktoken tokenizer, which the user copies in)."""
    directory = linked_copy(fixture_dir, tmp_path / "s1", ("config.json",))
    config = json.loads((fixture_dir / "config.json").read_text())
    config.update(semantic_begin_id=0, semantic_end_id=0, audio_embed_dim=None, norm_fastlayer_input=False)
    (directory / "config.json").write_text(json.dumps(config, indent=4, sort_keys=True))
    assert checkpoint_kind(directory) == "s1"
    assert_same_model(model_state(directory), model_state(fixture_dir))


# -- codecs at full size: both fish-speech layouts, on the meta device -----------------------------------------


def test_a_full_size_codec_of_either_layout_passes_the_strict_check():
    """S2-Pro's codec as fish-speech 2.0.0 writes it (2.0.0's yaml, no tables or masks) and as 0.1.0 would have
    (0.1.0's block sizes, tables and masks stored): S2 takes both, S1 only its own (0.1.0 refuses misshapen
    buffers)."""
    for kind in ("s1", "s2"):
        with torch.device("meta"):
            model = Codec(reference_codec_config(kind))
        check_codec_state_dict(model, model.state_dict(), kind)  # the weights alone
    with torch.device("meta"):  # shapes are all that matters (a 16384² mask is 256 MiB)
        fish2 = Codec(reference_codec_config("s2"))
        fish01 = Codec(reference_codec_config("s1"))
        stored = with_derived_buffers(fish01, fish01.state_dict())
    check_codec_state_dict(fish2, stored, "s2")
    with pytest.raises(CheckpointError, match=r"wrong shape: encoder\.block\.4\.block\.5\.freqs_cis \(16384, 32, 2\) "
                                              r"\(expected \(8192, 32, 2\)\)"):
        check_codec_state_dict(fish2, stored, "s1")


def test_the_engine_and_doctor_name_the_codec_layout(fixture_dir, s2_fixture_dir):
    assert load_checkpoint_codec(fixture_dir, device="meta").tables == "stored"
    assert load_checkpoint_codec(s2_fixture_dir, device="meta").tables == "derived"


@pytest.mark.parametrize("kind", ["s1", "s2"])
def test_the_other_codec_layout_gives_every_golden_through_the_engine(kind, fixture_dir, s2_fixture_dir, tmp_path):
    """The S1 fixture's codec without its tables and masks (as fish-speech 2.x would save it), and the S2 fixture's
    with them (as 0.1.0 would): every golden request still gives the reference's codes and audio."""
    fixture = fixture_dir if kind == "s1" else s2_fixture_dir
    directory = with_codec_layout(fixture, other_codec_layout(kind), tmp_path / kind)
    engine = FishEngine.load(directory, device="cpu", precision="float32")
    try:
        assert engine.codec.tables == ("derived" if kind == "s1" else "ignored")
        for req in load_requests(fixture) if kind == "s1" else s2_requests(fixture):
            if kind == "s1":
                golden = load_golden(fixture, req)
                codes, audio = golden["codes"], golden["audio"]
                result = engine.run(as_request(fixture, req))
            else:
                data = np.load(fixture / req["file"])
                codes, audio = np.concatenate(batch_outputs(data, "codes"), axis=1), data["audio"]
                result = engine.run(as_s2_request(fixture, req))
            np.testing.assert_array_equal(result.codes, codes, err_msg=req["name"])
            np.testing.assert_allclose(result.audio, audio, atol=1e-4, rtol=0, err_msg=req["name"])
    finally:
        engine.close()


def test_a_folder_quantized_by_fish_is_refused_in_one_line(fixture_dir, tmp_path):
    """fish's `tools/llama/quantize.py` int8 mode stores int8 weights with `scales` beside them (and its loader
    switches on "int8" in the folder's name); shoal's strict load names the first odd keys instead."""
    directory = linked_copy(fixture_dir, tmp_path / "checkpoint-int8", ("model.pth",))
    state = torch.load(fixture_dir / "model.pth", weights_only=True)
    weight = state["layers.0.attention.wqkv.weight"]
    state["layers.0.attention.wqkv.weight"] = weight.to(torch.int8)
    state["layers.0.attention.wqkv.scales"] = torch.ones(weight.shape[0])
    torch.save(state, directory / "model.pth")
    with pytest.raises(CheckpointError, match=r"model\.pth does not match the architecture in config\.json "
                                              r"\(unexpected: layers\.0\.attention\.wqkv\.scales\)$"):
        model_state(directory)
