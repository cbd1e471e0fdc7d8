"""Where checkpoints live and what they hold; torch-free so that light commands start fast."""

from __future__ import annotations

import json
from pathlib import Path

from shoal.errors import CheckpointError

CHECKPOINT_FILES = ("config.json", "model.pth", "tokenizer.tiktoken", "special_tokens.json", "codec.pth")
#: An S2-Pro checkpoint (fishaudio/s2-pro): the weights are the shards its index names.
S2_CHECKPOINT_FILES = ("config.json", "model.safetensors.index.json", "tokenizer.json", "codec.pth")
#: config.json's model_type -> the checkpoint's kind.
KINDS = {"dual_ar": "s1", "fish_qwen3_omni": "s2"}
#: A kind's model name: the name Fish Audio's API gives the model, and the one shoal serves it under.
MODEL_NAMES = {"s1": "s1", "s2": "s2-pro"}
CODEC_CONFIG_FILE = "codec_config.yaml"
#: The reference refuses a prompt longer than max_seq_len minus this, leaving room to generate (shoal.fish.prompt;
#: here, torch-free, so that the settings can check max_seq_len without importing torch).
GENERATION_HEADROOM = 2048
HOW_TO_GET = ("run `shoal download` to fetch openaudio-s1-mini (`shoal download fishaudio/s2-pro` for S2-Pro), or "
              "pass --checkpoint DIR")
#: Folder names under `checkpoints/` looked for when no checkpoint is configured, in order (what `shoal download`
#: names the two official repositories' folders).
DEFAULT_CHECKPOINT_NAMES = ("openaudio-s1-mini", "s2-pro")


def checkpoint_kind(path: str | Path) -> str:
    """"s1" or "s2", from the directory's own config.json (its model_type); CheckpointError when it is neither."""
    config = Path(path).expanduser() / "config.json"
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except FileNotFoundError:
        raise CheckpointError(f"{config} does not exist: not a Fish Speech checkpoint; {HOW_TO_GET}") from None
    except (OSError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"cannot read {config}: {exc}") from None
    if model_type not in KINDS:
        raise CheckpointError(f"{config} has model_type {model_type!r}; shoal runs "
                              f"{' and '.join(repr(t) for t in KINDS)} (S1 and S2-Pro) checkpoints")
    return KINDS[model_type]


def checkpoint_files(path: str | Path, kind: str) -> list[str]:
    """Every file a checkpoint of `kind` needs: S1's fixed set; S2's fixed set plus the weight shards its
    `model.safetensors.index.json` names (just the fixed set while the index cannot be read)."""
    if kind == "s1":
        return list(CHECKPOINT_FILES)
    index = Path(path).expanduser() / S2_CHECKPOINT_FILES[1]
    try:
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        shards = []
    return [*S2_CHECKPOINT_FILES, *shards]


def checkpoint_search_paths(data_dir: str | Path | None) -> list[Path]:
    """Where a checkpoint is looked for when none is configured, in order."""
    paths = [Path("checkpoints") / name for name in DEFAULT_CHECKPOINT_NAMES]
    if data_dir is not None:
        paths += [Path(data_dir).expanduser() / path for path in paths]
    return paths
