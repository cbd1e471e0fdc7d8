"""Run the S2 reference engine, fish-speech 2.0.0, over a list of requests and report what a benchmark needs.

    VENV/bin/python run_reference.py --checkpoint DIR --requests requests.jsonl [--out report.json]
        [--codes-dir DIR] [--device cpu] [--precision float32|bfloat16|float16] [--compile]

VENV is the venv this folder's setup.sh builds. The contract, and the code that keeps it, are the S1 harness's
(tools/reference/s1/run_reference.py: the same requests.jsonl fields, the same JSON report, the reference's own
stderr untouched for the bench's per-step timings), so `shoal bench` runs either one the same way. Only the
loading differs: the model, the codec and the request object are fish-speech 2.0.0's (s2ref.py).
`repetition_penalty` is passed on and, as in the reference, has no effect on S2's sampling.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import s2ref  # noqa: E402

#: The request fields handed to ServeTTSRequest as they are (the rest of a request: its text and reference).
FIELDS = ("seed", "temperature", "top_p", "repetition_penalty", "max_new_tokens", "chunk_length", "streaming")


def s1_runner():
    """The S1 harness's run_reference module, loaded by path (this file has the same name)."""
    spec = importlib.util.spec_from_file_location("s1_run_reference", HERE.parent / "s1" / "run_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_engine(checkpoint: Path, device: str, precision, compile: bool):
    return s2ref.load_engine(checkpoint, device, precision, compile)[0]


def tts_request(spec: dict):
    references = ([(Path(spec["reference_audio"]), spec.get("reference_text") or "")]
                  if spec.get("reference_audio") else [])
    return s2ref.tts_request(spec["text"], references, **{k: spec[k] for k in FIELDS if k in spec})


if __name__ == "__main__":
    s1_runner().main(load_engine=load_engine, tts_request=tts_request, engine_name="fish-speech 2.0.0 (reference)")
