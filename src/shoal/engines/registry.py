"""Which engines a process runs: fish when a checkpoint is found, the bundled piper voice always."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from shoal.errors import CheckpointError
from shoal.layout import HOW_TO_GET, checkpoint_search_paths

from .base import Engine

log = logging.getLogger("shoal.engines")

#: The Fish Audio model name of the S1 checkpoints the fish engine serves (openaudio-s1-mini and fine-tunes).
S1_MODEL = "s1"


@dataclass
class Engines:
    """The loaded engines by model name, the default one, and what a user should be told about it."""

    engines: dict[str, Engine] = field(default_factory=dict)
    default: str = ""
    notice: str | None = None  # shown in logs, /v1/health and the UI when the lite voice stands in
    checkpoint: Path | None = None
    #: The Fish Audio name of a served model, by model name: "fish" is `s1` when its checkpoint is an S1.
    fish_names: dict[str, str] = field(default_factory=dict)

    def get(self, name: str) -> Engine:
        return self.engines[name]

    def names(self) -> dict[str, str]:
        """Every name a served model answers to (its own and its Fish name) -> its model name."""
        return {**{name: name for name in self.engines}, **{fish: name for name, fish in self.fish_names.items()}}

    def close(self) -> None:
        """Stop every engine that runs threads of its own (the fish engine's scheduler)."""
        for engine in self.engines.values():
            close = getattr(engine, "close", None)
            if close is not None:
                close()


def find_checkpoint(configured: Path | None, data_dir: Path | None) -> tuple[Path | None, list[Path]]:
    """(the checkpoint directory to load or None, the places searched). A configured one is always used."""
    if configured:
        return Path(configured).expanduser(), [Path(configured)]
    candidates = checkpoint_search_paths(data_dir)
    return next((c for c in candidates if c.is_dir()), None), candidates


def load_engines(settings) -> Engines:
    """Load fish (if a checkpoint is found; a broken one is an error, never silently skipped) and piper.

    `default_model` "auto" picks fish when it loaded, else piper; naming an engine that cannot load is an error.
    """
    from .fish import FishEngine
    from .piper import PiperEngine

    if settings.torch_threads is not None:
        import torch

        torch.set_num_threads(settings.torch_threads)
    result = Engines()
    checkpoint, searched = find_checkpoint(settings.checkpoint, settings.data_dir)
    if checkpoint is not None:
        result.engines["fish"] = FishEngine.load(checkpoint, device=settings.device, precision=settings.precision,
                                                 compile=settings.compile, max_seq_len=settings.max_seq_len,
                                                 reference_cache_size=settings.reference_cache_size,
                                                 max_reference_seconds=settings.max_voice_seconds,
                                                 max_batch_size=settings.max_batch_size,
                                                 max_batch_tokens=settings.max_batch_tokens,
                                                 stream_first_frames=settings.stream_first_frames,
                                                 fault_injection=settings.fault_injection,
                                                 cuda_graphs=settings.cuda_graphs,
                                                 quantize=settings.quantize,
                                                 compile_cache_dir=settings.compile_cache
                                                 or Path(settings.data_dir) / "compile-cache")
        result.checkpoint = checkpoint
        result.fish_names["fish"] = S1_MODEL
    if checkpoint is None and not settings.lite_voice:
        raise CheckpointError(f"no Fish Speech checkpoint was found at {', '.join(str(p) for p in searched)} and "
                              f"the lite voice is off (lite_voice); {HOW_TO_GET}")
    if settings.lite_voice:
        result.engines["piper"] = PiperEngine.load()
    if checkpoint is None:
        result.notice = (f"no Fish Speech checkpoint was found at {', '.join(str(p) for p in searched)}; "
                         "serving the bundled lite voice (piper); `shoal download` gets openaudio-s1-mini")
    wanted = settings.default_model
    if wanted == "auto":
        result.default = "fish" if "fish" in result.engines else "piper"
    elif wanted not in result.engines:
        raise CheckpointError(f"default_model is {wanted!r} but it is not loaded: "
                              f"{result.notice or 'no checkpoint'}")
    else:
        result.default = wanted
    return result
