"""The composition root: the one place that turns settings into shoal's running objects.

`shoal serve` (the HTTP app), `shoal say`, `shoal bench` and the Python API (`shoal.load`) all build their
engines, voice library and service here, so every entry point honours the same settings in the same way
(device, precision, compile, max_seq_len, batching, streaming, limits).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

from shoal.engines.registry import Engines, load_engines
from shoal.service import Service
from shoal.settings import Settings
from shoal.voices import VoiceLibrary

log = logging.getLogger("shoal")

EnginesLoader = Callable[[Settings], Engines]

#: What the warm-up synthesizes: a couple of frames, enough to touch every lazily initialised path.
WARM_UP_TEXT = "Hi."
WARM_UP_FRAMES = 2


def build_voices(settings: Settings) -> VoiceLibrary:
    """The saved-voice library under the data dir, with the configured upload limits."""
    return VoiceLibrary(Path(settings.data_dir), max_upload_bytes=settings.max_upload_bytes,
                        min_seconds=settings.min_voice_seconds, max_seconds=settings.max_voice_seconds,
                        max_clips=settings.max_voice_clips, max_cover_bytes=settings.max_cover_bytes)


def build_service(settings: Settings, engines_loader: EnginesLoader = load_engines, *,
                  engines: Engines | None = None, warm_up: bool = True) -> Service:
    """Load the engines (or take already loaded ones), open the voice library and build the service.

    `warm_up` runs one tiny synthesis per engine so that the first real request does not pay for lazy
    initialisation."""
    if engines is None:
        engines = engines_loader(settings)
    voices = build_voices(settings)
    if warm_up:
        warm_up_engines(engines)
    return Service(settings, engines, voices)


def warm_up_engines(engines: Engines) -> None:
    """One tiny synthesis per engine; a failure is logged, never fatal (the real request reports properly)."""
    from shoal.engines.base import SynthesisRequest

    for name, engine in engines.engines.items():
        try:
            for _ in engine.synthesize(SynthesisRequest(text=WARM_UP_TEXT, seed=0, max_new_tokens=WARM_UP_FRAMES)):
                pass
        except Exception as exc:
            log.warning("warm-up of %s failed: %s", name, exc)
