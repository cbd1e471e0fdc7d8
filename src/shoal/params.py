"""The request parameters every entry point takes: the one place their defaults and ranges live.

The HTTP schemas, the web UI's controls, the CLI's flags, the Python API and the engines' own validation all
read these, so no entry point can offer a value that another refuses. The defaults and ranges are those of
fish-speech's `ServeTTSRequest` (the reference), plus OpenAI's `speed`. Kept free of torch and pydantic imports:
the settings and the CLI import it before anything heavy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from shoal.errors import BadRequest


@dataclass(frozen=True)
class Param:
    """One numeric request parameter: its default, its range (closed unless `low_open`/`high_open`), the step
    of its UI control, and what it means."""

    name: str
    default: float
    low: float
    high: float
    help: str
    step: float
    low_open: bool = False
    high_open: bool = False
    integer: bool = False

    def check(self, value: Any) -> None:
        """Raise BadRequest naming the parameter and its range if `value` is not a valid setting."""
        if self.integer:
            ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
        else:
            ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) \
                and math.isfinite(value)
        if ok:
            ok = (value > self.low if self.low_open else value >= self.low) and \
                 (value < self.high if self.high_open else value <= self.high)
        if not ok:
            kind = "an integer" if self.integer else "a number"
            raise BadRequest(f"{self.name} must be {kind} in {self.range_text}, got {value!r}")

    @property
    def range_text(self) -> str:
        lo, hi = ("(" if self.low_open else "["), (")" if self.high_open else "]")
        return f"{lo}{self.low:g}, {self.high:g}{hi}"

    @property
    def bounds(self) -> dict[str, float]:
        """The range as pydantic's Field keywords (ge/gt, le/lt)."""
        return {("gt" if self.low_open else "ge"): self.low, ("lt" if self.high_open else "le"): self.high}

    @property
    def ui_range(self) -> tuple[float, float]:
        """The (lowest, highest) value a UI control may offer: an open end is kept out by one step."""
        return (self.low + self.step if self.low_open else self.low,
                self.high - self.step if self.high_open else self.high)


TEMPERATURE = Param("temperature", 0.8, 0.1, 1.0, "sampling temperature: higher is more varied", 0.05)
TOP_P = Param("top_p", 0.8, 0.1, 1.0, "nucleus sampling: keep the likeliest tokens up to this probability", 0.01)
# Fish's schema says <= 2.0, but its sampler (and ours) asserts < 2.
REPETITION_PENALTY = Param("repetition_penalty", 1.1, 0.9, 2.0, "penalty on codes repeated within the recent "
                           "window", 0.01, high_open=True)
MAX_NEW_TOKENS = Param("max_new_tokens", 1024, 0, 8192, "cap on generated frames per text segment, ~21.5 per "
                       "second of audio; 0 = as many as fit", 64, integer=True)
CHUNK_LENGTH = Param("chunk_length", 200, 0, 1000, "texts longer than this many characters are generated in "
                     "sentence-sized segments; 0 = never split", 10, integer=True)
SPEED = Param("speed", 1.0, 0.25, 4.0, "playback speed (tempo without pitch change); 1 leaves the audio as "
              "generated", 0.05)

#: Every parameter above, by name, in the order the UI and the docs list them.
PARAMS: dict[str, Param] = {p.name: p for p in (TEMPERATURE, TOP_P, REPETITION_PENALTY, MAX_NEW_TOKENS,
                                                 CHUNK_LENGTH, SPEED)}
