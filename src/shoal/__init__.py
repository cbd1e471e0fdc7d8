"""shoal: a self-hosted voice server for Fish Speech / OpenAudio S1 checkpoints.

From Python, `shoal.load()` loads the engine once and returns a `shoal.TTS` to call (see `shoal.api`). Both
are imported on first use, so `import shoal` itself stays light (the CLI checks the environment before numpy
or torch are imported).
"""

__version__ = "0.1.0"
__all__ = ["TTS", "load", "__version__"]


def __getattr__(name: str):
    if name in ("load", "TTS"):
        from shoal import api

        return getattr(api, name)
    raise AttributeError(f"module 'shoal' has no attribute {name!r}")
