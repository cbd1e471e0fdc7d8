"""Run the reference engine, fish-speech 0.1.0, over a list of requests and report what a benchmark needs.

    VENV/bin/python run_reference.py --checkpoint DIR --requests requests.jsonl [--out report.json]
        [--codes-dir DIR] [--device cpu] [--precision float32|bfloat16|float16] [--compile]

VENV is the venv setup.sh builds. `shoal bench` runs this script and parses its output; the contract is:

- requests.jsonl holds one JSON object per line: "text" (required), and optionally "reference_audio" (a path,
  relative to the current directory), "reference_text", "seed", "temperature", "top_p", "repetition_penalty",
  "max_new_tokens", "chunk_length", "streaming". Absent fields keep ServeTTSRequest's defaults.
- The model and codec are loaded once, through the reference's own loaders (fishref.load_engine), and the
  requests run one after another through `TTSInferenceEngine.inference`, as fish's API server runs them.
- stdout gets one JSON report (also written to --out): engine, torch, device, precision, load_s, peak_rss_mb, and
  per request in order: index, wall_s, first_audio_s (first "segment" or "final" result), tokens (code frames
  handed to the codec decoder), audio_s, error (repr of the engine's error, else null).
- With --codes-dir, request i's decoder codes are saved as codes_<i>.npy (int64 [num_codebooks, frames]).
- stderr is the reference's own logging (loguru lines and the tqdm bar of its decode loop), untouched: the bench
  time-stamps it to get per-step timings.
- The codec's hyper-parameters come from DIR/codec_config.yaml when the checkpoint has one, else from the
  reference's modded_dac_vq.yaml.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import fishref  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", type=Path, required=True, help="checkpoint folder")
    ap.add_argument("--requests", type=Path, required=True, help="one JSON request per line")
    ap.add_argument("--out", type=Path, help="also write the JSON report here")
    ap.add_argument("--codes-dir", type=Path, help="save request i's decoder codes as codes_<i>.npy")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="float32", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--compile", action="store_true")
    return ap.parse_args(argv)


def run_one(engine, request) -> tuple[dict, list[np.ndarray]]:
    """One request through the engine: its timings and the codes its decoder calls received."""
    seen: list[np.ndarray] = []
    decode = engine.decode_vq_tokens

    def decode_and_keep(codes):
        seen.append(codes.detach().cpu().numpy().astype(np.int64))
        return decode(codes)

    engine.decode_vq_tokens = decode_and_keep
    try:
        started = time.perf_counter()
        first_audio = None
        sample_rate = audio = error = None
        for result in engine.inference(request):
            if result.code in ("segment", "final") and first_audio is None:
                first_audio = time.perf_counter() - started
            if result.code == "final":
                sample_rate, audio = result.audio
            elif result.code == "error":
                error = repr(result.error)
                break
        wall = time.perf_counter() - started
    finally:
        engine.decode_vq_tokens = decode
    return {
        "wall_s": wall,
        "first_audio_s": first_audio,
        "tokens": sum(int(c.shape[-1]) for c in seen),
        "audio_s": len(audio) / sample_rate if audio is not None else 0.0,
        "error": error,
    }, seen


def load_s1_engine(checkpoint: Path, device: str, precision: torch.dtype, compile: bool):
    return fishref.load_engine(checkpoint, device, precision, compile)[0]


def main(argv=None, load_engine=load_s1_engine, tts_request=fishref.tts_request,
         engine_name: str = "fish-speech 0.1.0 (reference)") -> None:
    """Load the engine once, run every request, print and write the report. The S2 harness calls this with its
    own `load_engine(checkpoint, device, precision, compile) -> TTSInferenceEngine` and `tts_request(spec)`."""
    args = parse_args(argv)
    precision = getattr(torch, args.precision)
    specs = [json.loads(line) for line in args.requests.read_text().splitlines() if line.strip()]

    t0 = time.perf_counter()
    engine = load_engine(args.checkpoint, args.device, precision, args.compile)
    load_s = time.perf_counter() - t0

    results = []
    for index, spec in enumerate(specs):
        figures, codes = run_one(engine, tts_request(spec))
        if args.codes_dir is not None:
            args.codes_dir.mkdir(parents=True, exist_ok=True)
            joined = np.concatenate(codes, axis=-1) if codes else np.zeros((0, 0), np.int64)
            np.save(args.codes_dir / f"codes_{index}.npy", joined)
        results.append({"index": index, **figures})

    report = {
        "engine": engine_name,
        "torch": torch.__version__,
        "device": args.device,
        "precision": args.precision,
        "load_s": load_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "requests": results,
    }
    text = json.dumps(report, indent=2)
    if args.out is not None:
        args.out.write_text(text + "\n")
    print(text, flush=True)
    sys.stderr.flush()
    # fish's generation worker is a daemon thread blocked on its queue; letting the interpreter tear it down
    # aborts the process ("terminate called without an active exception", exit 134). Everything is written.
    os._exit(0)


if __name__ == "__main__":
    main()
