"""The `shoal` command line.

Every error shoal raises on purpose becomes one line on stderr and the exit code of its class; `--debug`
shows the traceback as well. Exit codes: 0 success, 1 other failures (and `shoal doctor` finding one), 2 bad input,
3 missing checkpoint or file, 4 busy, 5 engine failure, 6 a dependency cannot be imported (a broken or shadowed
environment: numpy, torch, ... fail at import; the line names the module, where it came from and the fix),
7 no space left on the disk written to, 130 interrupted.

`serve`, `say` and `bench` first check that no other environment's site-packages leaks in (shoal.envcheck) and
warn in one line if one does; `doctor` reports that itself, and must run even when numpy cannot be imported.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from shoal import __version__
from shoal.envcheck import describe_import_failure, warn_if_polluted
from shoal.errors import BadRequest, CheckpointError, ShoalError

#: Exit code when a dependency cannot be imported (see describe_import_failure).
EXIT_BROKEN_ENVIRONMENT = 6
#: Commands that check the environment at start (doctor reports it in full itself).
CHECKED_COMMANDS = ("serve", "say", "bench")


def find_checkpoint(settings) -> Path:
    """The checkpoint to use: the configured one, else the first default location that exists."""
    from shoal.engines.registry import find_checkpoint as search

    found, searched = search(settings.checkpoint, settings.data_dir)
    if found is None:
        raise CheckpointError(f"no Fish Speech checkpoint found at {', '.join(str(p) for p in searched)}; pass "
                              "--checkpoint DIR or run `shoal download` to fetch openaudio-s1-mini "
                              "(`shoal download fishaudio/s2-pro` for S2-Pro)")
    return found


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
    from shoal.compose import build_service
    from shoal.params import PARAMS
    from shoal.service import SpeechParams

    output_format(args.output)  # fail before loading anything
    if len(args.reference_audio or []) != len(args.reference_text or []):
        raise BadRequest("give one --reference-text per --reference-audio, in the same order")
    references = list(zip(args.reference_audio or [], args.reference_text or []))
    params = SpeechParams(text=args.text, model="fish", references=references, seed=args.seed,
                          **{name: getattr(args, name) for name in PARAMS})
    settings = settings_from(args)
    checkpoint = find_checkpoint(settings)
    t0 = time.perf_counter()
    service = build_service(settings.model_copy(update={"checkpoint": checkpoint, "default_model": "fish",
                                                        "lite_voice": False}), warm_up=False)
    try:
        job = service.prepare(params)
        engine = job.engine
        print(f"loaded {checkpoint} ({engine.model_name}) on {engine.device} ({str(engine.precision).removeprefix('torch.')}) in "
              f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
        progress = ProgressLine(engine.sample_rate / engine.frame_length)
        result = service.run(job, progress=progress)
        progress.finish()
    finally:
        service.close(engines=True)

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


def settings_from(args: argparse.Namespace):
    """The one Settings object, with this command's flags on top of SHOAL_* variables and .env."""
    from shoal.settings import Settings

    names = Settings.model_fields
    return Settings.load(cli={k: v for k, v in vars(args).items() if k in names})


def _replicas(value: str) -> str | int:
    from shoal.cluster_config import Replicas
    from shoal.errors import BadRequest

    try:
        replicas = Replicas.parse(value)
    except BadRequest as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return "auto" if replicas.count is None else replicas.count


def cmd_serve(args: argparse.Namespace) -> int:
    settings = settings_from(args)
    if args.print_config:
        rows = settings.describe()
        width = max(len(name) for name, _, _ in rows)
        vwidth = max(len(value) for _, value, _ in rows)
        for name, value, source in rows:
            print(f"{name:<{width}}  {value:<{vwidth}}  ({source})")
        return 0
    if args.replicas is not None:  # Ray only here: the plain `shoal serve` never imports it
        try:
            from shoal.cluster import run_local
        except ImportError:
            from shoal.cluster_config import NEEDS_RAY
            print(f"shoal serve --replicas {NEEDS_RAY}", file=sys.stderr)
            return 2
        return run_local(settings, args.replicas)
    from shoal.server.app import serve

    return serve(settings)


def cmd_doctor(args: argparse.Namespace) -> int:
    from shoal.doctor import run_doctor

    return run_doctor(settings_from(args), as_json=args.json)


def cmd_download(args: argparse.Namespace) -> int:
    from shoal.download import run_download

    return run_download(args.repo, args.dir)


def cmd_bench(args: argparse.Namespace) -> int:
    from shoal.bench import run_bench

    return run_bench(args)


def cmd_cluster_config(args: argparse.Namespace) -> int:
    from shoal.cluster_config import Replicas, build_config, notes, write_config

    replicas = Replicas.parse(args.replicas, args.min_replicas, args.max_replicas)
    settings = settings_from(args)
    config = build_config(settings, replicas, gpus_per_replica=args.gpus_per_replica,
                          cpus_per_replica=args.cpus_per_replica)
    write_config(config, args.output)
    for note in notes(settings):
        print(f"shoal: note: {note}", file=sys.stderr)
    if args.output not in (None, "-"):
        print(f"wrote {args.output}: deploy it with `serve deploy {args.output}`", file=sys.stderr)
    return 0


def add_cluster_arguments(cluster: argparse.ArgumentParser) -> None:
    actions = cluster.add_subparsers(dest="action", required=True, metavar="ACTION")
    config = actions.add_parser("config", help="write a Ray Serve config (for `serve deploy` or a RayService's "
                                "serveConfigV2) from shoal's settings", description="Write a Ray Serve config "
                                "for shoal.cluster:build_app from shoal's settings (flags, SHOAL_* variables, .env). "
                                "Paths are the cluster nodes' paths.")
    config.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors")
    config.set_defaults(func=cmd_cluster_config)
    config.add_argument("--checkpoint", help="checkpoint directory on the cluster's nodes")
    config.add_argument("--data-dir", help="data dir on the cluster's nodes, shared by every replica (voices)")
    config.add_argument("--device", help="auto, cuda, cpu: cpu means no GPU per replica")
    config.add_argument("--replicas", default="auto", help="engine replicas: a number, or auto (autoscaling "
                        "between --min-replicas and --max-replicas; default)")
    config.add_argument("--min-replicas", type=int, help="with --replicas auto: fewest engine replicas (default 1)")
    config.add_argument("--max-replicas", type=int, help="with --replicas auto: most engine replicas (default 4)")
    config.add_argument("--gpus-per-replica", type=float, help="GPUs per engine replica (default 1, 0 with "
                        "--device cpu; fractions share a GPU)")
    config.add_argument("--cpus-per-replica", type=float, help="CPUs per engine replica (default "
                        "SHOAL_TORCH_THREADS, else 1)")
    config.add_argument("--host", help="address Serve's proxy listens on (default 0.0.0.0)")
    config.add_argument("--port", type=int, help="port Serve's proxy listens on (default 8000)")
    config.add_argument("-o", "--output", help="file to write (default: standard output)")


def add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", help="checkpoint directory, S1 or S2-Pro: its files say which (default: "
                   "checkpoints/openaudio-s1-mini, then checkpoints/s2-pro, then the same under the data dir)")
    p.add_argument("--device", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N, mps")
    p.add_argument("--precision", help="auto (bf16 on cuda, else float32), float32, bfloat16")


def build_parser(lenient: bool = False) -> argparse.ArgumentParser:
    """The parser. shoal.params imports numpy: with `lenient`, a numpy that cannot be imported leaves out say's
    parameter flags instead of failing, so that `shoal doctor` still runs to explain it."""
    try:
        from shoal.params import PARAMS
    except Exception:
        if not lenient:
            raise
        PARAMS = {}
    parser = argparse.ArgumentParser(prog="shoal", description="A self-hosted voice server for Fish Speech / "
                                     "OpenAudio S1 and Fish Audio S2-Pro checkpoints.")
    parser.add_argument("--version", action="version", version=f"shoal {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, func) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors")
        if func is not None:
            p.set_defaults(func=func)
        return p

    serve = command("serve", "run the HTTP server (Fish and OpenAI APIs, web UI)", cmd_serve)
    add_model_flags(serve)
    serve.add_argument("--extra-checkpoint", dest="extra_checkpoints", action="append", metavar="DIR",
                       help="another checkpoint to serve side by side under its model name (e.g. S2-Pro beside "
                       "S1); repeatable")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default 8080)")
    serve.add_argument("--api-key", help="require `Authorization: Bearer KEY` on the API")
    serve.add_argument("--data-dir", help="saved voices and caches (default: the per-user data dir)")
    serve.add_argument("--no-ui", dest="ui", action="store_const", const=False, help="do not serve the web UI")
    serve.add_argument("--replicas", type=_replicas, metavar="N|auto",
                       help="serve through Ray Serve with N engine replicas (auto: one per GPU, or 1..2 on CPU); "
                            "needs shoal[cluster]")
    serve.add_argument("--wyoming-port", type=int, metavar="PORT", help="also serve the Wyoming protocol (Home "
                       "Assistant) on this TCP port, same process and voices (default: off; 10200 is usual)")
    serve.add_argument("--wyoming-zeroconf", action="store_const", const=True, help="advertise the Wyoming server "
                       "over mDNS (_wyoming._tcp) for Home Assistant's discovery; needs the zeroconf package")
    serve.add_argument("--print-config", action="store_true", help="show the effective settings and exit")

    say = command("say", "speak a text into an audio file", cmd_say)
    say.add_argument("text", help="what to say")
    say.add_argument("-o", "--output", required=True,
                     help="output file: .wav, .flac, .ogg, .mp3, .opus, .aac or .pcm")
    add_model_flags(say)
    say.add_argument("--reference-audio", action="append", help="a clip of the voice to clone; repeat it for "
                     "S2-Pro's speakers (the n-th clip is <|speaker:n-1|>)")
    say.add_argument("--reference-text", action="append", help="the transcript of the --reference-audio in the "
                     "same place")
    say.add_argument("--seed", type=int, help="same seed, same audio (default: random)")
    for param in PARAMS.values():
        say.add_argument(f"--{param.name.replace('_', '-')}", type=int if param.integer else float,
                         default=param.default, help=f"{param.help} (default {param.default:g}, "
                         f"range {param.range_text})")
    say.add_argument("--codes-out", help="also save the generated codes as int64 [10, T] .npy")

    doctor = command("doctor", "check the environment, the checkpoint and the runtime", cmd_doctor)
    add_model_flags(doctor)
    doctor.add_argument("--data-dir", help="data dir to check (default: the configured one)")
    doctor.add_argument("--port", type=int, help="port to check (default: the configured one)")
    doctor.add_argument("--json", action="store_true", help="print the checks as JSON")

    download = command("download", "download an S1 or S2-Pro checkpoint from the Hugging Face hub", cmd_download)
    download.add_argument("repo", nargs="?", default="fishaudio/openaudio-s1-mini",
                          help="hub repository: fishaudio/openaudio-s1-mini (default) or fishaudio/s2-pro (both "
                          "gated: accept the licence, set HF_TOKEN)")
    download.add_argument("--dir", help="where to put it (default checkpoints/<repo name>)")
    cluster = command("cluster", "run shoal on a Ray cluster: `shoal cluster config` writes its Serve config",
                      None)
    add_cluster_arguments(cluster)
    bench = command("bench", "benchmark shoal (and the reference engine side by side)", cmd_bench)
    from shoal.bench import add_bench_arguments

    add_bench_arguments(bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), None)  # the top-level options take no values
    debug = "--debug" in argv
    try:
        # The parser imports numpy (through shoal.params): a broken one is reported once, as the error below,
        # rather than as a warning and then that error.
        parser = build_parser(lenient=command == "doctor")
        if command in CHECKED_COMMANDS:
            warn_if_polluted()
        args = parser.parse_args(argv)
        debug = args.debug
        return args.func(args)
    except ShoalError as exc:
        if debug:
            raise
        print(f"shoal: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("shoal: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        message = describe_import_failure(exc)
        if message is None or debug:
            raise
        print(f"shoal: error: {message}", file=sys.stderr)
        return EXIT_BROKEN_ENVIRONMENT


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
