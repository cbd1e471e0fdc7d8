"""Loading a checkpoint directory of either kind (`shoal.layout`) with strict key checking.

- S1 (the layout openaudio-s1-mini ships): `config.json`, `model.pth`, `tokenizer.tiktoken`,
  `special_tokens.json`, `codec.pth`.
- S2 (the layout s2-pro ships): a nested `config.json`, safetensors shards named by
  `model.safetensors.index.json` (official key names: `text_model.model.*` for the slow stack, `audio_decoder.*`
  for the fast one and the codebook embeddings), `tokenizer.json`, `tokenizer_config.json`, `codec.pth`.

Either may add `codec_config.yaml` for a codec whose hyper-parameters differ from the real `modded_dac_vq` (the
tiny test fixtures carry one).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from shoal.errors import CheckpointError
from shoal.layout import (  # noqa: F401  (CHECKPOINT_FILES, S2_CHECKPOINT_FILES, CODEC_CONFIG_FILE re-exported)
    CHECKPOINT_FILES,
    CODEC_CONFIG_FILE,
    HOW_TO_GET,
    S2_CHECKPOINT_FILES,
    S2_WEIGHTS_INDEX,
    S2_WEIGHTS_PTH,
    checkpoint_kind,
    missing_checkpoint_files,
    s2_weight_files,
    s2_weight_map,
)

from .codec import Codec, CodecConfig, load_codec, reference_codec_config
from .dual_ar import DualARConfig, DualARTransformer
from .tokenizer import FishTokenizer
from .tokenizer_s2 import S2Tokenizer

#: Either kind's tokenizer; both have the surface the engine uses (encode, decode, the semantic range, im_end_id,
#: vocab_size, token_id, is_semantic).
AnyTokenizer = FishTokenizer | S2Tokenizer
#: The official S2 names of the slow stack's tensors and of the fast stack's (plus the codebook embeddings).
S2_SLOW_PREFIX = "text_model.model."
S2_FAST_PREFIX = "audio_decoder."


def check_checkpoint_dir(path: str | Path) -> Path:
    """Return the directory as a Path, or raise CheckpointError naming every file its kind (S1 or S2, from its own
    files: `shoal.layout.checkpoint_kind`) lacks, or saying in one line that it is neither kind."""
    path = Path(path).expanduser()
    kind = checkpoint_kind(path)
    missing = missing_checkpoint_files(path, kind)
    if missing:
        raise CheckpointError(f"{kind.upper()} checkpoint {path} is incomplete: missing {', '.join(missing)}; "
                              f"{HOW_TO_GET}")
    return path


def load_tokenizer(checkpoint_dir: str | Path) -> AnyTokenizer:
    """The tokenizer of the checkpoint's kind: `FishTokenizer` (S1, tiktoken) or `S2Tokenizer` (tokenizer.json)."""
    if checkpoint_kind(checkpoint_dir) == "s2":
        return S2Tokenizer.from_dir(checkpoint_dir)
    return FishTokenizer.from_dir(checkpoint_dir)


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """torch.load a weights file safely (weights only, memory-mapped), or raise CheckpointError."""
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt file; all mean the same to a user
        raise CheckpointError(f"cannot read {path}: {str(exc).splitlines()[0]}") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a state dict")
    return state


def normalise_model_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Accept the two other shapes fish's own tools save the text model in, each recognised explicitly:

    - a Lightning checkpoint: weights under "state_dict", keys prefixed "model.";
    - keys of the audio projector ("audio_*"), a module of fish's training code that text-to-speech never
      runs. The reference drops them too; every other key must match exactly.
    """
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if state and all(k.startswith("model.") for k in state):
        state = {k[len("model."):]: v for k, v in state.items()}
    return {k: v for k, v in state.items() if not k.startswith("audio_")}


def s2_official_key(name: str) -> str:
    """The official S2 checkpoint name of a `DualARTransformer` tensor: the inverse of the reference's renaming
    (fish's `_remap_fish_qwen3_omni_keys`), which strips `text_model.model.`, turns
    `audio_decoder.codebook_embeddings.*` into `codebook_embeddings.*` and every other `audio_decoder.X` into
    `fast_X`."""
    if name.startswith("codebook_embeddings."):
        return S2_FAST_PREFIX + name
    if name.startswith("fast_"):
        return S2_FAST_PREFIX + name[len("fast_"):]
    return S2_SLOW_PREFIX + name


def s2_key_names(state: Mapping[str, torch.Tensor]) -> Callable[[str], str]:
    """How the model's tensor names are spelt in `state`: the official S2 names when any key carries an official
    prefix, else the model's own (the reference renames only in the first case, too)."""
    if any(k.startswith(("text_model.", S2_FAST_PREFIX)) for k in state):
        return s2_official_key
    return str


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file, memory-mapped on the CPU, or CheckpointError."""
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except Exception as exc:  # safetensors raises its own error types for corrupt files; all mean the same
        raise CheckpointError(f"cannot read {path}: {str(exc).splitlines()[0]}") from exc


def read_s2_weights(checkpoint_dir: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """(state, source): an S2 checkpoint's tensors from the files fish-speech 2.0 would read (`s2_weight_files`:
    the index's shards, a single `model.safetensors`, or a `model.pth` as its LoRA merge writes, which gets the
    same unwrapping as S1's)."""
    first = s2_weight_files(checkpoint_dir)[0]
    source = checkpoint_dir / first
    if first == S2_WEIGHTS_INDEX:
        return read_safetensors_shards(checkpoint_dir), source
    if first == S2_WEIGHTS_PTH:
        return normalise_model_keys(read_state_dict(source)), source
    return read_safetensors(source), source


def read_safetensors_shards(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the shards `model.safetensors.index.json` names, memory-mapped on the CPU, under the names
    they are stored with; CheckpointError if a shard cannot be read or does not hold what the index says."""
    weight_map = s2_weight_map(checkpoint_dir)
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        tensors = read_safetensors(checkpoint_dir / shard)
        listed = {k for k, v in weight_map.items() if v == shard}
        if set(tensors) != listed:
            odd = sorted(set(tensors) ^ listed)[0]
            where = "lacks" if odd in listed else "holds the unlisted tensor"
            raise CheckpointError(f"{checkpoint_dir / shard} {where} {odd} ({S2_WEIGHTS_INDEX} disagrees with it)")
        state.update(tensors)
    return state


def state_dict_mismatch(module: nn.Module | Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor],
                        key_name: Callable[[str], str] = str) -> str | None:
    """What keeps `state` from loading strictly into `module` (or matching the tensors a mapping expects), as one
    short line (None if nothing). `state` is keyed by `key_name` of the module's names (default: the names
    themselves), and the line uses the state's names."""
    wanted = module.state_dict() if isinstance(module, nn.Module) else module
    expected = {key_name(k): v for k, v in wanted.items()}
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})"
             for k, v in expected.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
        if items:
            more = f" and {len(items) - 3} more" if len(items) > 3 else ""
            problems.append(f"{label}: {', '.join(items[:3])}{more}")
    return "; ".join(problems) or None


def strict_load(module: nn.Module, state: dict[str, torch.Tensor], source: Path,
                key_name: Callable[[str], str] = str) -> None:
    """`load_state_dict(strict=True)`, with a one-line CheckpointError naming what does not match. `state` may be
    keyed by another spelling of the module's names (`key_name`, e.g. `s2_official_key`); errors use that one."""
    problems = state_dict_mismatch(module, state, key_name)
    if problems:
        raise CheckpointError(f"{source} does not match the architecture in config.json ({problems})")
    module.load_state_dict({k: state[key_name(k)] for k in module.state_dict()}, strict=True, assign=True)


def read_config(checkpoint_dir: Path) -> DualARConfig:
    try:
        return DualARConfig.from_json(checkpoint_dir / "config.json")
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{checkpoint_dir / 'config.json'}: {exc}") from exc


def check_vocabulary(config: DualARConfig, tokenizer: AnyTokenizer, kind: str) -> None:
    """The tokenizer and config.json must describe one checkpoint. S1: the same vocabulary size. S2: every token id
    has an embedding row (the real model has spare rows), and config.json's semantic range, when stated, is the
    tokenizer's (the model takes it from the tokenizer, as the reference does)."""
    if kind == "s1":
        if tokenizer.vocab_size != config.vocab_size:
            raise CheckpointError(f"tokenizer has {tokenizer.vocab_size} tokens but config.json says vocab_size "
                                  f"{config.vocab_size}")
        return
    if tokenizer.vocab_size > config.vocab_size:
        raise CheckpointError(f"tokenizer has ids up to {tokenizer.vocab_size - 1} but config.json's text_config "
                              f"says vocab_size {config.vocab_size}")
    stated = (config.semantic_begin_id, config.semantic_end_id)
    actual = (tokenizer.semantic_begin_id, tokenizer.semantic_end_id)
    if any(s is not None and s != a for s, a in zip(stated, actual)):
        raise CheckpointError(f"config.json's semantic tokens {stated[0]}..{stated[1]} are not the tokenizer's "
                              f"<|semantic:0|>..<|semantic:{tokenizer.num_semantic - 1}|> = {actual[0]}..{actual[1]}")


def load_dual_ar(checkpoint_dir: Path, tokenizer: AnyTokenizer, device: torch.device,
                 dtype: torch.dtype) -> DualARTransformer:
    """Build the transformer of either kind on the meta device (no random init of billions of weights) and load it
    strictly: S1 from `model.pth`, S2 from its weight files (`read_s2_weights`) under the official names or the
    model's own."""
    kind = checkpoint_kind(checkpoint_dir)
    config = read_config(checkpoint_dir)
    check_vocabulary(config, tokenizer, kind)
    with torch.device("meta"):
        model = DualARTransformer(config, tokenizer.semantic_begin_id, tokenizer.semantic_end_id)
    if kind == "s2":
        state, source = read_s2_weights(checkpoint_dir)
        strict_load(model, state, source, s2_key_names(state))
    else:
        strict_load(model, normalise_model_keys(read_state_dict(checkpoint_dir / "model.pth")),
                    checkpoint_dir / "model.pth")
    model.reset_rope()  # the loaded weights are real now; the RoPE buffers are still meta
    return model.to(device=device, dtype=dtype).eval()


def read_codec_config(checkpoint_dir: Path) -> CodecConfig:
    """The checkpoint's `codec_config.yaml`, else the codec its kind's reference builds (`reference_codec_config`)."""
    yaml_path = checkpoint_dir / CODEC_CONFIG_FILE
    if yaml_path.is_file():
        return CodecConfig.from_yaml(yaml_path)
    return reference_codec_config(checkpoint_kind(checkpoint_dir))


def load_checkpoint_codec(checkpoint_dir: Path, device: str | torch.device = "cpu",
                          dtype: torch.dtype = torch.float32) -> Codec:
    """The checkpoint's `codec.pth`, loaded strictly against `read_codec_config` and read the way the checkpoint's
    kind's reference reads it (`shoal.fish.codec.split_derived_buffers`)."""
    return load_codec(checkpoint_dir / "codec.pth", read_codec_config(checkpoint_dir), device=device, dtype=dtype,
                      kind=checkpoint_kind(checkpoint_dir))
