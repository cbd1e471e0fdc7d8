"""Where checkpoints live and what they hold; torch-free so that light commands start fast.

Two kinds of checkpoint directory are served, told apart by their own files (`checkpoint_kind`):

- "s1" (OpenAudio S1, fish-speech 0.1.0): a flat `config.json` (`model_type: dual_ar`), `model.pth`, a tiktoken
  tokenizer (`tokenizer.tiktoken` + `special_tokens.json`) and `codec.pth`;
- "s2" (Fish Audio S2-Pro, fish-speech 2.0): a nested `config.json` (`model_type: fish_qwen3_omni`), safetensors
  shards named by `model.safetensors.index.json`, a Hugging Face tokenizer (`tokenizer.json` +
  `tokenizer_config.json`) and `codec.pth`. fish-speech 2.0 also loads the weights from a single
  `model.safetensors` or from `model.pth` (`s2_weight_files`), and its own tools save a flat `dual_ar` config.json
  beside the Hugging Face tokenizer (its LoRA merge does); both are S2 too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from shoal.errors import CheckpointError

CHECKPOINT_FILES = ("config.json", "model.pth", "tokenizer.tiktoken", "special_tokens.json", "codec.pth")
S2_WEIGHTS_INDEX = "model.safetensors.index.json"
#: The official S2 layout (what `shoal download` fetches); the weights may come in other files too (`s2_weight_files`).
S2_CHECKPOINT_FILES = ("config.json", S2_WEIGHTS_INDEX, "tokenizer.json", "tokenizer_config.json", "codec.pth")
#: The weight files fish-speech 2.0 looks for after the index, in its order: one safetensors file, then a torch file.
S2_WEIGHTS_SINGLE = "model.safetensors"
S2_WEIGHTS_PTH = "model.pth"
CODEC_CONFIG_FILE = "codec_config.yaml"
#: config.json's `model_type` of each kind.
S1_MODEL_TYPE = "dual_ar"
S2_MODEL_TYPE = "fish_qwen3_omni"
MODEL_TYPES = {S1_MODEL_TYPE: "s1", S2_MODEL_TYPE: "s2"}
CheckpointKind = Literal["s1", "s2"]
#: The files each kind must hold (S2's shards come on top: `checkpoint_files`, `missing_checkpoint_files`).
FILES_BY_KIND: dict[str, tuple[str, ...]] = {"s1": CHECKPOINT_FILES, "s2": S2_CHECKPOINT_FILES}
#: A kind's model name: the name Fish Audio's API gives the model, and the one shoal serves it under.
MODEL_NAMES = {"s1": "s1", "s2": "s2-pro"}
#: The reference refuses a prompt longer than max_seq_len minus this, leaving room to generate (shoal.fish.prompt;
#: here, torch-free, so that the settings can check max_seq_len without importing torch).
GENERATION_HEADROOM = 2048
HOW_TO_GET = ("run `shoal download` to fetch openaudio-s1-mini (`shoal download fishaudio/s2-pro` for S2-Pro), or "
              "pass --checkpoint DIR")
#: Folder names under `checkpoints/` looked for when no checkpoint is configured, in order (what `shoal download`
#: names the two official repositories' folders).
DEFAULT_CHECKPOINT_NAMES = ("openaudio-s1-mini", "s2-pro")


def checkpoint_files(path: str | Path, kind: CheckpointKind) -> list[str]:
    """Every file a checkpoint of `kind` needs: S1's fixed set; for S2 the fixed set and the weight files it has
    (`s2_weight_files`; just the index while that cannot be read: `missing_checkpoint_files` says what is wrong)."""
    if kind == "s1":
        return list(CHECKPOINT_FILES)
    try:
        weights = s2_weight_files(path)
    except CheckpointError:
        weights = [S2_WEIGHTS_INDEX]
    at = S2_CHECKPOINT_FILES.index(S2_WEIGHTS_INDEX)
    return [*S2_CHECKPOINT_FILES[:at], *weights, *S2_CHECKPOINT_FILES[at + 1:]]


def checkpoint_search_paths(data_dir: str | Path | None) -> list[Path]:
    """Where a checkpoint is looked for when none is configured, in order."""
    paths = [Path("checkpoints") / name for name in DEFAULT_CHECKPOINT_NAMES]
    if data_dir is not None:
        paths += [Path(data_dir).expanduser() / path for path in paths]
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
        if model_type == S1_MODEL_TYPE and (path / "tokenizer.json").is_file() \
                and not (path / "tokenizer.tiktoken").is_file():
            return "s2"  # the flat config fish-speech 2.0's own tools save (its LoRA merge) beside S2's tokenizer
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


def s2_weight_files(path: str | Path) -> list[str]:
    """The files an S2 checkpoint's weights are read from, chosen as fish-speech 2.0 chooses: the index and the
    shards it names, else a single `model.safetensors`, else `model.pth`; the index (missing) when there is none."""
    path = Path(path)
    if (path / S2_WEIGHTS_INDEX).is_file():
        return [S2_WEIGHTS_INDEX, *s2_weight_shards(path)]
    for name in (S2_WEIGHTS_SINGLE, S2_WEIGHTS_PTH):
        if (path / name).is_file():
            return [name]
    return [S2_WEIGHTS_INDEX]


def missing_checkpoint_files(path: str | Path, kind: CheckpointKind) -> list[str]:
    """The files of that kind the directory lacks, S2's shards included once its index is readable."""
    path = Path(path)
    return [name for name in checkpoint_files(path, kind) if not (path / name).is_file()]
