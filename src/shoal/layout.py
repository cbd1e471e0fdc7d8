"""Where checkpoints live and what they hold; torch-free so that light commands start fast."""

from __future__ import annotations

from pathlib import Path

CHECKPOINT_FILES = ("config.json", "model.pth", "tokenizer.tiktoken", "special_tokens.json", "codec.pth")
CODEC_CONFIG_FILE = "codec_config.yaml"
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
