"""Which engines a process runs: one fish engine per checkpoint (S1, S2-Pro, or both side by side) and the bundled
piper voice.

Each engine is served under its model name, the name Fish Audio's API gives that model (`s1`, `s2-pro`), decided
by the checkpoint's own files (`layout.checkpoint_kind`). `fish`, the name shoal used before it served more than
one Fish model, stays an alias of the first checkpoint's model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from shoal.errors import CheckpointError
from shoal.layout import HOW_TO_GET, MODEL_NAMES, checkpoint_kind, checkpoint_search_paths

from .base import Engine

log = logging.getLogger("shoal.engines")

#: The alias of the first checkpoint's model (requests, `default_model`, and `shoal say` say `fish`).
FISH_ALIAS = "fish"
PIPER = "piper"


@dataclass
class Engines:
    """The loaded engines by model name, the default one, and what a user should be told about it."""

    engines: dict[str, Engine] = field(default_factory=dict)
    default: str = ""
    notice: str | None = None  # shown in logs, /v1/health and the UI when the lite voice stands in
    #: The checkpoint directory of each fish model, by model name, in the order they were configured.
    checkpoints: dict[str, Path] = field(default_factory=dict)
    #: Other names a served model answers to -> its model name (`fish` -> the first checkpoint's model).
    aliases: dict[str, str] = field(default_factory=dict)
    #: Where the engines run on other processes (`shoal.cluster`): their replicas and state, for /v1/health.
    replicas: Callable[[], dict] | None = None

    def get(self, name: str) -> Engine:
        return self.engines[self.aliases.get(name, name)]

    def names(self) -> dict[str, str]:
        """Every name a served model answers to (its own and its aliases) -> its model name."""
        return {**{name: name for name in self.engines}, **self.aliases}

    @property
    def checkpoint(self) -> Path | None:
        """The first (primary) checkpoint, if any."""
        return next(iter(self.checkpoints.values()), None)

    def encoder(self) -> Engine | None:
        """The engine whose codec encodes saved voices: the first checkpoint's. A model whose codec differs gets
        the codes recomputed with its own on first use (`VoiceLibrary.codes` checks the codec checksum)."""
        return self.engines[self.aliases[FISH_ALIAS]] if FISH_ALIAS in self.aliases else None

    def close(self) -> None:
        """Stop every engine that runs threads of its own (the fish engines' schedulers)."""
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


def load_fish_engine(checkpoint: Path, settings) -> Engine:
    """One fish engine for `checkpoint` (S1 or S2-Pro, its files decide) with the settings' runtime knobs."""
    from .fish import FishEngine

    return FishEngine.load(checkpoint, device=settings.device, precision=settings.precision,
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


def load_engines(settings) -> Engines:
    """Load a fish engine per checkpoint (the found or configured one, then `extra_checkpoints`; a broken one is
    an error, never silently skipped) and piper.

    `default_model` "auto" picks the first checkpoint's model when one loaded, else piper; naming a model that is
    not loaded is an error. Two checkpoints of the same model are refused: they would share one name.
    """
    from .piper import PiperEngine

    if settings.torch_threads is not None:
        import torch

        torch.set_num_threads(settings.torch_threads)
    result = Engines()
    checkpoint, searched = find_checkpoint(settings.checkpoint, settings.data_dir)
    wanted_checkpoints = [c for c in [checkpoint] if c is not None]
    wanted_checkpoints += [Path(c).expanduser() for c in settings.extra_checkpoints]
    for directory in wanted_checkpoints:  # every name first: a clash is refused before anything loads
        name = MODEL_NAMES[checkpoint_kind(directory)]
        if name in result.checkpoints:
            raise CheckpointError(f"{directory} and {result.checkpoints[name]} are both {name} checkpoints; serve "
                                  f"one {name} per process (checkpoint, extra_checkpoints)")
        result.checkpoints[name] = directory
        result.aliases.setdefault(FISH_ALIAS, name)
    try:
        for name, directory in result.checkpoints.items():
            result.engines[name] = load_fish_engine(directory, settings)
    except BaseException:
        result.close()  # the engines that did load stop their threads
        raise
    if not result.checkpoints and not settings.lite_voice:
        raise CheckpointError(f"no Fish Speech checkpoint was found at {', '.join(str(p) for p in searched)} and "
                              f"the lite voice is off (lite_voice); {HOW_TO_GET}")
    if settings.lite_voice:
        result.engines[PIPER] = PiperEngine.load()
    if not result.checkpoints:
        result.notice = (f"no Fish Speech checkpoint was found at {', '.join(str(p) for p in searched)}; "
                         "serving the bundled lite voice (piper); `shoal download` gets openaudio-s1-mini")
    wanted = settings.default_model
    served = result.names()
    if wanted == "auto":
        result.default = served.get(FISH_ALIAS, PIPER)
    elif wanted not in served:
        raise CheckpointError(f"default_model is {wanted!r} but it is not loaded (loaded: "
                              f"{', '.join(result.engines) or 'none'}): {result.notice or 'no such checkpoint'}")
    else:
        result.default = served[wanted]
    return result
