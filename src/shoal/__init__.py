"""shoal: a self-hosted voice server for Fish Speech / OpenAudio S1 checkpoints."""

__version__ = "0.1.0"
