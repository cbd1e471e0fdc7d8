"""shoal: a self-hosted voice server for Fish Speech / OpenAudio S1 checkpoints.

From Python, `shoal.load()` loads the engine once and returns a `shoal.TTS` to call (see `shoal.api`). Both
are imported on first use, so `import shoal` itself stays light (the CLI checks the environment before numpy
or torch are imported).
"""

import os

__version__ = "0.1.0"

#: How torch's OpenMP workers wait between parallel regions, unless the environment says otherwise. The default,
#: spinning, kept a second core busy beside the engine thread and, on a loaded 2-core machine, made a served request
#: 5-10x slower (docs/architecture.md, section 4). OpenMP reads it when torch is imported, so it is set here, before.
OMP_WAIT_POLICY = "PASSIVE"
os.environ.setdefault("OMP_WAIT_POLICY", OMP_WAIT_POLICY)
__all__ = ["TTS", "load", "__version__"]


def __getattr__(name: str):
    if name in ("load", "TTS"):
        from shoal import api

        return getattr(api, name)
    raise AttributeError(f"module 'shoal' has no attribute {name!r}")
