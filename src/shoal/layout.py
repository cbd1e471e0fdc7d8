"""Where checkpoints live and what they hold; torch-free so that light commands start fast.

Two kinds of checkpoint directory are served, told apart by their own files (`checkpoint_kind`):

- "s1" (OpenAudio S1, fish-speech 0.1.0): a flat `config.json` (`model_type: dual_ar`), `model.pth`, a tiktoken
  tokenizer (`tokenizer.tiktoken` + `special_tokens.json`) and `codec.pth`;
- "s2" (Fish Audio S2-Pro, fish-speech 2.0): a nested `config.json` (`model_type: fish_qwen3_omni`), safetensors
  shards named by `model.safetensors.index.json`, a Hugging Face tokenizer (`tokenizer.json` +
  `tokenizer_config.json`) and `codec.pth`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from shoal.errors import CheckpointError

CHECKPOINT_FILES = ("config.json", "model.pth", "tokenizer.tiktoken", "special_tokens.json", "codec.pth")
S2_WEIGHTS_INDEX = "model.safetensors.index.json"
S2_CHECKPOINT_FILES = ("config.json", S2_WEIGHTS_INDEX, "tokenizer.json", "tokenizer_config.json", "codec.pth")
CODEC_CONFIG_FILE = "codec_config.yaml"
#: config.json's `model_type` of each kind.
S1_MODEL_TYPE = "dual_ar"
S2_MODEL_TYPE = "fish_qwen3_omni"
MODEL_TYPES = {S1_MODEL_TYPE: "s1", S2_MODEL_TYPE: "s2"}
CheckpointKind = Literal["s1", "s2"]
#: The files each kind must hold (S2's shards come on top: `missing_checkpoint_files`).
FILES_BY_KIND: dict[str, tuple[str, ...]] = {"s1": CHECKPOINT_FILES, "s2": S2_CHECKPOINT_FILES}
#: The reference refuses a prompt longer than max_seq_len minus this, leaving room to generate (shoal.fish.prompt;
#: here, torch-free, so that the settings can check max_seq_len without importing torch).
GENERATION_HEADROOM = 2048
HOW_TO_GET = "run `shoal download` to fetch openaudio-s1-mini, or pass --checkpoint DIR"


def checkpoint_search_paths(data_dir: str | Path | None) -> list[Path]:
    """Where a checkpoint is looked for when none is configured, in order."""
    paths = [Path("checkpoints/openaudio-s1-mini")]
    if data_dir is not None:
        paths.append(Path(data_dir).expanduser() / "checkpoints" / "openaudio-s1-mini")
    return paths


def checkpoint_kind(path: str | Path) -> CheckpointKind:
    """"s1" or "s2", from the directory's `config.json` (`model_type`); without a config.json, from the weights and
    tokenizer files that only one kind has. CheckpointError (one line) when the directory is neither."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist; {HOW_TO_GET}")
    config = path / "config.json"
    if config.is_file():
        try:
            model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
        except (OSError, UnicodeDecodeError, ValueError, AttributeError) as exc:
            raise CheckpointError(f"cannot read {config}: {str(exc).splitlines()[0]}") from exc
        if model_type not in MODEL_TYPES:
            raise CheckpointError(f"{config} has model_type {model_type!r}: shoal serves "
                                  + " and ".join(f"{t!r} ({k.upper()})" for t, k in MODEL_TYPES.items()))
        return MODEL_TYPES[model_type]
    kinds = {kind for kind, files in FILES_BY_KIND.items()
             if any((path / name).is_file() for name in files if name not in ("config.json", "codec.pth"))}
    if len(kinds) != 1:
        raise CheckpointError(f"{path} is not a Fish Speech checkpoint: no config.json, and neither S1's model.pth "
                              f"/ tokenizer.tiktoken nor S2's {S2_WEIGHTS_INDEX} / tokenizer.json alone; {HOW_TO_GET}")
    return kinds.pop()


def s2_weight_map(path: str | Path) -> dict[str, str]:
    """`model.safetensors.index.json`'s weight_map (official tensor name -> shard file in the same directory), or
    CheckpointError if the index cannot be read."""
    index = Path(path) / S2_WEIGHTS_INDEX
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"cannot read {index} (a json object with a weight_map): "
                              f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(shard, str) and shard and Path(shard).name == shard for shard in weight_map.values()):
        raise CheckpointError(f"{index}: the weight_map must map tensor names to shard files in the same directory")
    return weight_map


def s2_weight_shards(path: str | Path) -> list[str]:
    """The shard files the index names, sorted (the order the reference loads them in)."""
    return sorted(set(s2_weight_map(path).values()))


def missing_checkpoint_files(path: str | Path, kind: CheckpointKind) -> list[str]:
    """The files of that kind the directory lacks, S2's shards included once its index is readable."""
    path = Path(path)
    missing = [name for name in FILES_BY_KIND[kind] if not (path / name).is_file()]
    if kind == "s2" and S2_WEIGHTS_INDEX not in missing:
        missing += [name for name in s2_weight_shards(path) if not (path / name).is_file()]
    return missing
