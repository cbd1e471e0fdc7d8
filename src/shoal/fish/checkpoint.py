"""Loading an S1 checkpoint directory (the layout openaudio-s1-mini ships) with strict key checking.

A checkpoint directory holds `config.json`, `model.pth`, `tokenizer.tiktoken`, `special_tokens.json` and
`codec.pth`, plus optionally `codec_config.yaml` for a codec whose hyper-parameters differ from the real
`modded_dac_vq` (the tiny test fixtures carry one).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import torch
from torch import nn

from shoal.errors import CheckpointError
from shoal.layout import CHECKPOINT_FILES, CODEC_CONFIG_FILE, HOW_TO_GET  # noqa: F401  (re-exported)

from .dual_ar import DualARConfig, DualARTransformer

if TYPE_CHECKING:
    from .tokenizer import FishTokenizer



def check_checkpoint_dir(path: str | Path) -> Path:
    """Return the directory as a Path, or raise CheckpointError naming every missing file."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist; {HOW_TO_GET}")
    missing = [name for name in CHECKPOINT_FILES if not (path / name).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: missing {', '.join(missing)}; {HOW_TO_GET}")
    return path


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


def state_dict_mismatch(module: nn.Module, state: Mapping[str, torch.Tensor]) -> str | None:
    """What keeps `state` from loading strictly into `module`, as one short line (None if nothing)."""
    expected = module.state_dict()
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


def strict_load(module: nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """`load_state_dict(strict=True)`, with a one-line CheckpointError naming what does not match."""
    problems = state_dict_mismatch(module, state)
    if problems:
        raise CheckpointError(f"{source} does not match the architecture in config.json ({problems})")
    module.load_state_dict(state, strict=True, assign=True)


def load_dual_ar(checkpoint_dir: Path, tokenizer: FishTokenizer, device: torch.device,
                 dtype: torch.dtype) -> DualARTransformer:
    """Build the transformer on the meta device (no random init of 0.5 B weights) and load it strictly."""
    try:
        config = DualARConfig.from_json(checkpoint_dir / "config.json")
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{checkpoint_dir / 'config.json'}: {exc}") from exc
    if tokenizer.vocab_size != config.vocab_size:
        raise CheckpointError(f"tokenizer has {tokenizer.vocab_size} tokens but config.json says vocab_size "
                              f"{config.vocab_size}")
    with torch.device("meta"):
        model = DualARTransformer(config, tokenizer.semantic_begin_id, tokenizer.semantic_end_id)
    strict_load(model, normalise_model_keys(read_state_dict(checkpoint_dir / "model.pth")),
                checkpoint_dir / "model.pth")
    model.reset_rope()  # the loaded weights are real now; the RoPE buffers are still meta
    return model.to(device=device, dtype=dtype).eval()
