"""The `shoal` command line.

Every error shoal raises on purpose becomes one line on stderr and the exit code of its class; `--debug`
shows the traceback as well.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from shoal import __version__
from shoal.errors import BadRequest, CheckpointError, ShoalError

DEFAULT_CHECKPOINT_DIRS = (Path("checkpoints/openaudio-s1-mini"),)


def find_checkpoint(explicit: str | None) -> Path:
    """The checkpoint to use: the one given, else the first default location that exists."""
    if explicit:
        return Path(explicit)
    for candidate in DEFAULT_CHECKPOINT_DIRS:
        if candidate.is_dir():
            return candidate
    searched = ", ".join(str(p) for p in DEFAULT_CHECKPOINT_DIRS)
    raise CheckpointError(f"no Fish Speech checkpoint found (searched {searched}); pass --checkpoint DIR or run "
                          "`shoal download` to fetch openaudio-s1-mini")


class ProgressLine:
    """A one-line progress display on stderr: redrawn in place on a terminal, a line per second otherwise."""

    def __init__(self, frames_per_second: float, stream=sys.stderr):
        self.fps = frames_per_second
        self.stream = stream
        self.tty = stream.isatty()
        self.start = time.perf_counter()
        self.last = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if not self.tty and now - self.last < 1.0:
            return
        self.last = now
        line = (f"generating: {done} frames ({done / self.fps:.1f} s of audio) of at most {total}, "
                f"{done / max(now - self.start, 1e-9):.1f} frames/s")
        self.stream.write(f"\r{line}\033[K" if self.tty else line + "\n")
        self.stream.flush()

    def finish(self) -> None:
        if self.tty:
            self.stream.write("\n")


def cmd_say(args: argparse.Namespace) -> int:
    import numpy as np

    from shoal.audio import output_format, write_audio
    from shoal.engines.base import Reference, SynthesisRequest
    from shoal.engines.fish import FishEngine

    output_format(args.output)  # fail before loading anything
    if (args.reference_audio is None) != (args.reference_text is None):
        raise BadRequest("--reference-audio and --reference-text go together: a clip and what is said in it")
    references = (Reference(args.reference_audio, args.reference_text),) if args.reference_audio else ()
    request = SynthesisRequest(
        text=args.text, references=references, seed=args.seed, temperature=args.temperature, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty, max_new_tokens=args.max_new_tokens,
        chunk_length=args.chunk_length,
    )
    checkpoint = find_checkpoint(args.checkpoint)
    t0 = time.perf_counter()
    engine = FishEngine.load(checkpoint, device=args.device, precision=args.precision)
    print(f"loaded {checkpoint} on {engine.device} ({str(engine.precision).removeprefix('torch.')}) in "
          f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
    progress = ProgressLine(engine.sample_rate / engine.frame_length)
    result = engine.run(request, progress=progress)
    progress.finish()

    write_audio(args.output, result.audio, result.sample_rate)
    if args.codes_out:
        _save_npy(args.codes_out, result.codes.astype(np.int64))
    stop = "end of speech" if all(result.stopped_by_im_end) else "max_new_tokens reached"
    print(f"wrote {args.output}: {result.duration:.2f} s of audio in {result.seconds:.2f} s "
          f"(real-time factor {result.real_time_factor:.2f}; {result.frames_generated} frames, {stop}; "
          f"seed {result.seed})", file=sys.stderr)
    return 0


def _save_npy(path: str, array) -> None:
    import numpy as np

    from shoal.files import atomic_write

    with atomic_write(path) as f:
        np.save(f, array)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shoal", description="A self-hosted voice server for Fish Speech / "
                                     "OpenAudio S1 checkpoints.")
    parser.add_argument("--version", action="version", version=f"shoal {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    say = sub.add_parser("say", help="speak a text into an audio file")
    say.add_argument("text", help="what to say")
    say.add_argument("-o", "--output", required=True, help="output file (.wav, .flac or .ogg)")
    say.add_argument("--checkpoint", help="S1 checkpoint directory (default: checkpoints/openaudio-s1-mini)")
    say.add_argument("--reference-audio", help="a clip of the voice to clone")
    say.add_argument("--reference-text", help="the transcript of --reference-audio")
    say.add_argument("--seed", type=int, help="same seed, same audio (default: random)")
    say.add_argument("--temperature", type=float, default=0.8)
    say.add_argument("--top-p", type=float, default=0.8)
    say.add_argument("--repetition-penalty", type=float, default=1.1)
    say.add_argument("--max-new-tokens", type=int, default=1024,
                     help="cap on generated frames, ~21.5 per second of audio; 0 = as many as fit")
    say.add_argument("--chunk-length", type=int, default=200,
                     help="split texts longer than this many characters at sentence ends; 0 = never")
    say.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps")
    say.add_argument("--precision", default="auto", help="auto (bf16 on cuda, else float32), float32, bfloat16")
    say.add_argument("--codes-out", help="also save the generated codes as int64 [10, T] .npy")
    say.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors")
    say.set_defaults(func=cmd_say)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ShoalError as exc:
        if args.debug:
            raise
        print(f"shoal: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("shoal: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
