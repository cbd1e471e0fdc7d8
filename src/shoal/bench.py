"""`shoal bench`: shoal and the reference engine (fish-speech 0.1.0 for S1, 2.0.0 for S2-Pro) on one checkpoint,
one machine, one run.

Two kinds of process take part besides the reference's own, and this one file holds both:

- the orchestrator (`run_bench`, in the `shoal` process): prepares the checkpoint and the requests, measures
  the machine's memory bandwidth, starts the others one at a time, and writes `bench/results/<date>-<label>.md`
  and `.json`. It stays small (no torch), because a child's `ru_maxrss`, which the reference reports as its
  peak RSS, starts at its parent's peak;
- shoal workers (`python -m shoal.bench worker SPEC OUT`): one fresh process per configuration, so that load
  times and peak RSS are per configuration and nothing warm carries over. They go through `FishEngine` for the
  per-step decode timing and through `Service` (its Dispatcher, under asyncio) for everything a client sees.

The reference runs as `REFERENCE_VENV/bin/python run_reference.py`, unchanged, on the same requests (texts,
seeds, sampling parameters, max_new_tokens, reference clip), one after another as its server runs them. Its report
has per-request wall times only, so its per-step times come from its own stderr, time-stamped as it arrives (the
tqdm bar of its decode loop). Top-level imports stay within the standard library: `shoal.cli` imports this module
at start-up.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from shoal.layout import GENERATION_HEADROOM

SCHEMA_VERSION = 1
#: A request's timeout inside the bench: full-size CPU runs take minutes; only a hang should end one.
BENCH_TIMEOUT_SECONDS = 7 * 86400.0
# The tiny fixture and the reference harness live in the repository, not in the installed package: they are found
# from a checkout or an editable install (src/shoal/bench.py -> the repository root), else named with --fixture /
# --checkpoint and --reference-dir.
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_FIXTURE = REPO_ROOT / "tests" / "fixtures" / "fish-s1-tiny"
DEFAULT_REFERENCE_DIR = REPO_ROOT / "tools" / "reference" / "s1"
DEFAULT_REFERENCE_VENV = Path("~/.cache/shoal-reference")
#: Per model (a checkpoint's kind, `shoal.layout.checkpoint_kind`): the tiny fixture, the reference harness and
#: its venv, the folder name of the random full-size checkpoint under --work-dir, and how to describe that one.
MODELS = {
    "s1": {"fixture": DEFAULT_FIXTURE, "reference_dir": DEFAULT_REFERENCE_DIR, "reference_venv": DEFAULT_REFERENCE_VENV,
           "full_size": "openaudio-s1-mini-random-seed0",
           "full_size_what": "openaudio-s1-mini shape, random bf16 weights, real-size codec and vocabulary",
           "full_size_writing": "~3.3 GB, a minute or two", "reference": "fish-speech 0.1.0"},
    "s2": {"fixture": REPO_ROOT / "tests" / "fixtures" / "fish-s2-tiny",
           "reference_dir": REPO_ROOT / "tools" / "reference" / "s2",
           "reference_venv": Path("~/.cache/shoal-reference-s2"), "full_size": "s2-pro-random-seed0",
           "full_size_what": "S2-Pro shape (fish_qwen3_omni, 4.6 B), random bf16 weights, real-size codec and "
                             "vocabulary", "full_size_writing": "~9 GB, several minutes",
           "reference": "fish-speech 2.0.0"},
}
DEFAULT_WORK_DIR = Path("~/.cache/shoal-bench")
DEFAULT_OUT = Path("bench/results")
READY_MARKER = ".reference-ready"  # what the reference's setup.sh leaves in a finished venv

DEFAULTS = {  # per checkpoint kind: (max_new_tokens per request, concurrency levels)
    "tiny": (215, (1, 4, 8)),
    "full-size": (32, (1, 4)),
    "checkpoint": (215, (1, 4, 8)),
    "quick": (16, (1, 4)),
}

# The requests. All texts are under 200 characters, so shoal (chunk_length 200) and the reference (which never
# splits) generate each of them as one segment: the same work on both sides.
# Each process warms up with one request as long as the measured ones: the first codec decode of a new, larger
# length costs several times a later one (allocations growing), a start-up cost the steady state never pays.
WARMUP = {"text": "Warming up.", "seed": 0}
UTTERANCE = ("The lighthouse keeper climbed the spiral stairs every evening, lit the great lamp, and watched the "
             "fishing boats find their way home through the narrow channel.")  # about 10 s spoken
UTTERANCE_SEED = 7
TEXTS = (
    "Hello world, this is a test of the speech server.",
    "The quick brown fox jumps over the lazy dog.",
    "Please leave a message after the tone, and we will call you back.",
    "Tomorrow will be sunny in the morning, with showers in the afternoon.",
    "Benchmarks are not tests, but they keep everyone honest.",
    "Turn left at the next corner, then continue for two hundred metres.",
    "Your order has shipped and should arrive on Thursday.",
    "Reading aloud is a skill that improves with practice.",
)
#: `--repeat` given bare: the issue's "the same request, repeated 20 times on a warm server".
REPEAT_DEFAULT = 20
THROUGHPUT_SEED = 100  # request i of a burst uses seed 100 + i; request 0 is also the decode-timing request
VOICE_ID = "bench-voice"
VOICE_CLIP_TEXT = "This is a short reference recording."
VOICE_REQUEST = {"text": "Saved voices are encoded once, when they are saved.", "seed": 11}
VOICE_CLIP_SECONDS = 3.0


class BenchError(Exception):
    """A failure the orchestrator reports as one line (mapped to a ShoalError in run_bench)."""


# -----------------------------------------------------------------------------------------------------------
# Command line
# -----------------------------------------------------------------------------------------------------------


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--tiny", action="store_true",
                       help=f"bench the fish-s1-tiny fixture (the default; at {DEFAULT_FIXTURE})")
    which.add_argument("--full-size", action="store_true",
                       help="bench a random checkpoint of openaudio-s1-mini's shape (written once under --work-dir: "
                            "~3.3 GB, a minute or two; nothing is downloaded)")
    which.add_argument("--checkpoint", metavar="DIR", help="bench an existing checkpoint directory, S1 or S2-Pro "
                       "(its files say which; the reference harness follows)")
    which.add_argument("--quick", action="store_true", help="a smoke run: the tiny fixture, shoal only, 16 tokens, "
                       "concurrency 1,4 (well under two minutes; CI runs it so the bench cannot rot)")
    parser.add_argument("--s2", action="store_true", help="S2-Pro instead of S1: the fish-s2-tiny fixture with "
                        "--tiny and --quick, an S2-Pro-shaped random checkpoint with --full-size, and fish-speech "
                        "2.0.0 (tools/reference/s2) as the reference")
    parser.add_argument("--fixture", metavar="DIR", help=f"where --tiny looks (default {DEFAULT_FIXTURE}, or "
                        "fish-s2-tiny beside it with --s2)")
    parser.add_argument("--work-dir", metavar="DIR", default=str(DEFAULT_WORK_DIR),
                        help=f"cache for the --full-size checkpoint (default {DEFAULT_WORK_DIR})")
    parser.add_argument("--tokens", type=int, metavar="N",
                        help="max_new_tokens of every request (default 215, about 10 s of audio; 32 with "
                             "--full-size)")
    parser.add_argument("--concurrency", metavar="LIST",
                        help="concurrent request counts, comma-separated (default 1,4,8; 1,4 with --full-size)")
    parser.add_argument("--threads", type=int, metavar="N", help="torch threads for both engines "
                        "(default: torch's own choice)")
    parser.add_argument("--device", default="cpu", help="device for both engines (default cpu, where the "
                        "reference is meant to run)")
    parser.add_argument("--precision", default="float32", choices=("float32", "bfloat16", "float16"),
                        help="precision for both engines (default float32)")
    parser.add_argument("--reference-venv", metavar="DIR",
                        help=f"venv of the reference engine (default {DEFAULT_REFERENCE_VENV}, "
                             f"{MODELS['s2']['reference_venv']} for S2-Pro)")
    parser.add_argument("--reference-dir", metavar="DIR",
                        help="folder holding the reference's setup.sh and run_reference.py (default: "
                             "tools/reference/s1 of this checkout, tools/reference/s2 for S2-Pro)")
    parser.add_argument("--setup-reference", action="store_true",
                        help="build the reference venv with setup.sh if it is missing (~2.5 GB, a few minutes)")
    parser.add_argument("--no-reference", action="store_true", help="bench shoal only")
    parser.add_argument("--compile", action="store_true", help="shoal with its compiled decode step (torch.compile; "
                        "the warm-up request pays for compiling)")
    parser.add_argument("--cuda-graphs", action="store_true", help="with --compile on CUDA: capture the compiled "
                        "decode step as CUDA graphs")
    parser.add_argument("--max-seq-len", type=int, metavar="N", help="shoal's SHOAL_MAX_SEQ_LEN: cap the positions "
                        "per request, which shrinks the KV caches (default: the checkpoint's own)")
    parser.add_argument("--max-batch-size", type=int, metavar="N", help="shoal's SHOAL_MAX_BATCH_SIZE: rows decoded "
                        "together (default: the setting's default, 4; concurrency above it queues)")
    parser.add_argument("--quantize", choices=("none", "int8"), default="none", help="shoal's SHOAL_QUANTIZE: int8 "
                        "weights for the transformers' linear layers (CPU, float32 only; default none)")
    parser.add_argument("--one-process", action="store_true", help="run shoal's single stream and every "
                        "concurrency level in one process: one load and one compile in all (peak RSS is then "
                        "cumulative); bench/gpu.sh uses it to fit its time")
    parser.add_argument("--live", action="store_true", help="bench the live WebSocket (/v1/tts/live): flush to "
                        "first audio with text streamed in a few words every 50 ms, the gaps between segments, beside "
                        "HTTP streaming (shoal only; see shoal/bench_live.py)")
    parser.add_argument("--wyoming", action="store_true", help="bench shoal's Wyoming server on the bundled "
                        "piper voice beside wyoming-piper on the same voice file, both modes, measured by "
                        "wyoming-bench (see shoal/bench_wyoming.py); needs --wyoming-piper-python")
    parser.add_argument("--wyoming-piper-python", metavar="PYTHON", help="with --wyoming: the python of a "
                        "virtual environment with wyoming-piper installed (its piper-tts pin may clash with shoal's)")
    parser.add_argument("--wyoming-rounds", type=int, default=5, metavar="N", help="with --wyoming: rounds over "
                        "wyoming-bench's four texts (default 5)")
    parser.add_argument("--replicas", metavar="LIST", help="bench shoal on Ray Serve: the plain server, then "
                        "`shoal serve --replicas N` for each N in LIST (e.g. 1,2), one torch thread per engine: "
                        "aggregate throughput at --concurrency (default 16) and the first byte Serve adds "
                        "(shoal only, needs shoal[cluster]; see shoal/bench_cluster.py)")
    parser.add_argument("--label", help="name of this run in the result files (default: the checkpoint kind)")
    parser.add_argument("--out", metavar="DIR", default=str(DEFAULT_OUT),
                        help=f"where the .md and .json go (default {DEFAULT_OUT})")
    parser.add_argument("--bandwidth-mib", type=int, default=1024, metavar="MIB",
                        help="size of the array copied to measure memory bandwidth (default 1024)")
    parser.add_argument("--repeat", type=int, nargs="?", const=REPEAT_DEFAULT, metavar="N",
                        help=f"instead of the side-by-side: one request sent N times (default {REPEAT_DEFAULT}) to a "
                             "real `shoal serve` at the default thread settings, then to one with OMP_NUM_THREADS=1; "
                             "later requests against the first, CPU seconds per request against the 1-thread "
                             "server's (shoal only)")


def run_bench(args: argparse.Namespace) -> int:
    from shoal.errors import BadRequest, EngineFailure

    if getattr(args, "wyoming", False):
        return run_wyoming(args)
    try:
        options = resolve_options(args)
    except BenchError as exc:
        raise BadRequest(str(exc)) from None
    try:
        if options["live"]:
            run_live(options)
        elif options["replicas"]:
            run_replicas(options)
        else:
            (RepeatBench if options["repeat"] else Bench)(options).run()
    except BenchError as exc:
        raise EngineFailure(str(exc)) from None
    return 0


def run_wyoming(args: argparse.Namespace) -> int:
    """`--wyoming`: bench_wyoming (no checkpoint: the bundled piper voice on both servers)."""
    from shoal.errors import BadRequest, EngineFailure

    if not args.wyoming_piper_python:
        raise BadRequest("--wyoming needs --wyoming-piper-python: the python of a venv with wyoming-piper "
                         "(python -m venv /tmp/wp-venv && /tmp/wp-venv/bin/pip install wyoming-piper)")
    if args.wyoming_rounds < 1:
        raise BadRequest("--wyoming-rounds must be at least 1")
    try:
        from shoal.bench_wyoming import render_markdown, run_wyoming_bench
    except ImportError as exc:
        raise BadRequest(f"--wyoming needs wyoming-bench (the test extra): {exc}") from None
    try:
        report = run_wyoming_bench(args.wyoming_rounds, args.wyoming_piper_python, Path(args.out))
    except RuntimeError as exc:
        raise EngineFailure(str(exc)) from None
    print(render_markdown(report))
    return 0


def run_live(options: dict) -> None:
    """`--live`: bench_live on this run's checkpoint; the report goes where the other runs' go."""
    from shoal.bench_live import render_live_markdown, run_live_bench, write_live_report

    options["out"].mkdir(parents=True, exist_ok=True)
    try:
        report = run_live_bench(options, Bench(options).checkpoint(), TEXTS)
    except RuntimeError as exc:
        raise BenchError(str(exc)) from None
    print(render_live_markdown(report))
    progress(f"wrote {write_live_report(report, options['out'])}.md and .json")


def run_replicas(options: dict) -> None:
    """`--replicas`: bench_cluster on this run's checkpoint; the report goes where the other runs' go."""
    from shoal.bench_cluster import render_cluster_markdown, run_cluster_bench, write_cluster_report

    options["out"].mkdir(parents=True, exist_ok=True)
    try:
        report = run_cluster_bench(options, Bench(options).checkpoint())
    except RuntimeError as exc:
        raise BenchError(str(exc)) from None
    print(render_cluster_markdown(report))
    progress(f"wrote {write_cluster_report(report, options['out'])}.md and .json")


def resolve_options(args: argparse.Namespace) -> dict:
    kind = ("full-size" if args.full_size else "checkpoint" if args.checkpoint else
            "quick" if getattr(args, "quick", False) else "tiny")
    tokens, levels = DEFAULTS[kind]
    tokens = args.tokens if args.tokens is not None else tokens
    if tokens < 2:
        raise BenchError("--tokens must be at least 2: the last generated frame is never decoded")
    if args.concurrency is not None:
        try:
            levels = tuple(int(v) for v in args.concurrency.split(",") if v.strip())
        except ValueError:
            raise BenchError(f"--concurrency must be comma-separated integers, got {args.concurrency!r}") from None
        if not levels or min(levels) < 1:
            raise BenchError("--concurrency needs at least one level, each >= 1")
    if args.threads is not None and args.threads < 1:
        raise BenchError("--threads must be at least 1")
    if args.bandwidth_mib < 1:
        raise BenchError("--bandwidth-mib must be at least 1")
    if args.max_batch_size is not None and args.max_batch_size < 1:
        raise BenchError("--max-batch-size must be at least 1")
    if args.max_seq_len is not None and args.max_seq_len <= GENERATION_HEADROOM:
        raise BenchError(f"--max-seq-len must be more than {GENERATION_HEADROOM} (the positions a prompt leaves "
                         "free for generation)")
    repeat = getattr(args, "repeat", None)
    if repeat is not None:
        if repeat < 2:
            raise BenchError("--repeat needs at least 2 requests: the later ones are compared with the first")
        clashing = [flag for flag, given in (("--concurrency", args.concurrency is not None),
                                             ("--one-process", args.one_process),
                                             ("--setup-reference", args.setup_reference)) if given]
        if clashing:
            raise BenchError(f"{clashing[0]} does not apply to --repeat (one request, one at a time, shoal only)")
        args.no_reference = True
    live = getattr(args, "live", False)
    if live:
        clashing = [flag for flag, given in (("--concurrency", args.concurrency is not None),
                                             ("--one-process", args.one_process), ("--repeat", repeat is not None),
                                             ("--setup-reference", args.setup_reference)) if given]
        if clashing:
            raise BenchError(f"{clashing[0]} does not apply to --live (live sessions one after another, shoal only)")
        args.no_reference = True
    replicas = None
    if getattr(args, "replicas", None) is not None:
        from shoal.bench_cluster import DEFAULT_CONCURRENCY, parse_replicas

        clashing = [flag for flag, given in (("--one-process", args.one_process), ("--repeat", repeat is not None),
                                             ("--live", live), ("--setup-reference", args.setup_reference))
                    if given]
        if clashing:
            raise BenchError(f"{clashing[0]} does not apply to --replicas (shoal only, one server at a time)")
        try:
            replicas = parse_replicas(args.replicas)
        except ValueError as exc:
            raise BenchError(str(exc)) from None
        if args.concurrency is None:
            levels = (DEFAULT_CONCURRENCY,)
        args.no_reference = True
    model = bench_model(args)
    defaults = MODELS[model]
    label = args.label or (Path(args.checkpoint).name if args.checkpoint else
                           kind if model == "s1" else f"{model}-{kind}")
    if repeat is not None and not args.label:  # --quick --repeat is the tiny fixture with 16 tokens
        label = f"{'tiny' if kind == 'quick' else label}-repeat"
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,80}", label):
        raise BenchError(f"--label may only use A-Z, a-z, 0-9, '.', '_' and '-', got {label!r}")
    if kind == "quick":
        args.no_reference = True
        kind = "tiny"
        label = args.label or label
    return {
        "kind": kind,
        "model": model,
        "checkpoint": args.checkpoint,
        "fixture": Path(args.fixture or defaults["fixture"]).expanduser(),
        "work_dir": Path(args.work_dir).expanduser(),
        "tokens": tokens,
        "concurrency": sorted(set(levels)),
        "threads": args.threads,
        "device": args.device,
        "precision": args.precision,
        "compile": args.compile or args.cuda_graphs,
        "cuda_graphs": args.cuda_graphs,
        "max_seq_len": args.max_seq_len,
        "max_batch_size": args.max_batch_size,
        "quantize": args.quantize,
        "one_process": args.one_process,
        "reference_venv": Path(args.reference_venv or defaults["reference_venv"]).expanduser(),
        "reference_dir": Path(args.reference_dir or defaults["reference_dir"]).expanduser(),
        "setup_reference": args.setup_reference,
        "no_reference": args.no_reference,
        "label": label,
        "out": Path(args.out).expanduser(),
        "bandwidth_mib": args.bandwidth_mib,
        "repeat": repeat,
        "live": live,
        "replicas": replicas,
        # --replicas: requests at once in the throughput rounds (the largest --concurrency level)
        "cluster_concurrency": max(levels),
        "debug": getattr(args, "debug", False),
    }


def bench_model(args: argparse.Namespace) -> str:
    """"s1" or "s2": a --checkpoint's own kind (its config.json), else --s2."""
    from shoal.errors import ShoalError
    from shoal.layout import checkpoint_kind

    if args.checkpoint:
        try:
            kind = checkpoint_kind(args.checkpoint)
        except ShoalError as exc:
            raise BenchError(str(exc)) from None
        if args.s2 and kind != "s2":
            raise BenchError(f"--s2 was given but {args.checkpoint} is an {kind} checkpoint")
        return kind
    return "s2" if args.s2 else "s1"


def progress(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


# -----------------------------------------------------------------------------------------------------------
# The orchestrator
# -----------------------------------------------------------------------------------------------------------


class Bench:
    def __init__(self, options: dict):
        self.o = options

    def run(self) -> dict:
        o = self.o
        started = datetime.datetime.now().astimezone()
        load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
        o["out"].mkdir(parents=True, exist_ok=True)
        checkpoint = self.checkpoint()
        reference_venv = self.reference_venv()
        with tempfile.TemporaryDirectory(prefix="shoal-bench-") as tmp:
            tmp = Path(tmp)
            clip = write_voice_clip(tmp / "voice.wav")
            plan = request_plan(o["tokens"], max(o["concurrency"]))
            progress(f"measuring memory bandwidth ({o['bandwidth_mib']} MiB array copy, best of 5)")
            bandwidth = self.bandwidth()
            progress(f"memory bandwidth {bandwidth['gbps']:.1f} GB/s")

            if o["one_process"]:
                single = self.shoal_worker(tmp, "all", checkpoint, plan, clip)
                shoal = {"single": single, "concurrency": single.pop("concurrency")}
                reference = self.reference(tmp, reference_venv, checkpoint, plan, clip)
            else:
                # Shoal and the reference alternate: shoal's single-stream run, the reference, then shoal's bursts.
                shoal = {"single": self.shoal_worker(tmp, "single", checkpoint, plan, clip), "concurrency": {}}
                reference = self.reference(tmp, reference_venv, checkpoint, plan, clip)
                for n in o["concurrency"]:
                    shoal["concurrency"][str(n)] = self.shoal_worker(tmp, "concurrent", checkpoint, plan, clip, n)

        load_after = os.getloadavg() if hasattr(os, "getloadavg") else None
        report = assemble(o, started, checkpoint, bandwidth, plan, shoal, reference, load_before, load_after)
        md = render_markdown(report)
        stem = o["out"] / f"{started.date().isoformat()}-{o['label']}"
        write_text(stem.with_suffix(".json"), json.dumps(report, indent=2) + "\n")
        write_text(stem.with_suffix(".md"), md)
        print(md)
        progress(f"wrote {stem}.md and {stem}.json")
        if reference.get("status") == "failed":
            raise BenchError(f"the reference engine failed: {reference['error']} (its log: "
                             f"{o['work_dir'] / 'reference-last.log'}; shoal's results are in {stem}.md)")
        return report

    # -- inputs ------------------------------------------------------------------------------------------------
    def checkpoint(self) -> dict:
        o = self.o
        if o["kind"] == "tiny":
            path = o["fixture"]
            if not path.is_dir():
                raise BenchError(f"the tiny fixture is not at {path} (it ships with a checkout of the shoal "
                                 "repository, not with an installed package); pass --fixture DIR, --checkpoint DIR "
                                 "or --full-size")
            description = f"{path.name} fixture (random weights, tiny dims)"
        elif o["kind"] == "full-size":
            model = MODELS[o["model"]]
            path = o["work_dir"] / model["full_size"]
            if not path.is_dir():
                o["work_dir"].mkdir(parents=True, exist_ok=True)
                progress(f"writing the full-size random checkpoint to {path} (once: {model['full_size_writing']})")
                t0 = time.perf_counter()
                proc = subprocess.run([sys.executable, "-m", "shoal.bench", "write-full-size", str(path), "0",
                                       o["model"]], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                if proc.returncode:
                    raise BenchError(f"writing the full-size checkpoint failed: {last_line(proc.stderr)}")
                progress(f"wrote it in {time.perf_counter() - t0:.0f} s")
            description = model["full_size_what"]
        else:
            path = Path(o["checkpoint"]).expanduser()
            description = "user checkpoint"
        check_checkpoint(path)
        return {"path": str(path.resolve()), "kind": o["kind"], "description": description,
                "bytes_on_disk": sum(f.stat().st_size for f in path.iterdir() if f.is_file())}

    def reference_venv(self) -> Path | str:
        """The reference's python, or why the reference column says "not run"."""
        o = self.o
        if o["no_reference"]:
            return "not run (--no-reference)"
        venv, ref_dir = o["reference_venv"], o["reference_dir"]
        if not (ref_dir / "run_reference.py").is_file():
            raise BenchError(f"the reference harness is not at {ref_dir} (run_reference.py and setup.sh ship with a "
                             "checkout of the shoal repository, in tools/reference/s1); pass --reference-dir DIR, "
                             "or --no-reference to bench shoal alone")
        if not (venv / READY_MARKER).is_file():
            if not o["setup_reference"]:
                return f"not run (no reference venv at {venv}; --setup-reference builds it)"
            progress(f"building the reference venv at {venv} with setup.sh (~2.5 GB, a few minutes)")
            proc = subprocess.run(["bash", str(ref_dir / "setup.sh"), str(venv)], stdout=sys.stderr,
                                  stderr=subprocess.PIPE, text=True)
            if proc.returncode or not (venv / READY_MARKER).is_file():
                raise BenchError(f"setup.sh failed to build the reference venv: {last_line(proc.stderr)}")
        python = venv / "bin" / "python"
        if not python.is_file():
            raise BenchError(f"{venv} has no bin/python; delete it and rerun with --setup-reference")
        return python

    def bandwidth(self) -> dict:
        """Measured in a process of its own, so that its 2 x MIB of arrays never count in anyone's peak RSS."""
        device = self.o["device"] if self.o["device"].startswith("cuda") else "cpu"
        proc = subprocess.run([sys.executable, "-m", "shoal.bench", "bandwidth", str(self.o["bandwidth_mib"]), device],
                              capture_output=True, text=True)
        if proc.returncode:
            raise BenchError(f"measuring memory bandwidth failed: {last_line(proc.stderr)}")
        return json.loads(proc.stdout)

    def env(self) -> dict:
        env = dict(os.environ)
        if self.o["threads"]:
            for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
                env[name] = str(self.o["threads"])
        return env

    # -- shoal -------------------------------------------------------------------------------------------------
    def shoal_worker(self, tmp: Path, task: str, checkpoint: dict, plan: dict, clip: Path, n: int = 1) -> dict:
        o = self.o
        name = {"single": "single stream", "all": "single stream, then each concurrency level"}.get(
            task, f"{n} concurrent")
        progress(f"shoal: {name} (fresh process)")
        spec = {
            "task": task, "n": n, "checkpoint": checkpoint["path"], "device": o["device"],
            "precision": o["precision"], "threads": o["threads"], "plan": plan, "voice_clip": str(clip),
            "data_dir": str(tmp / f"data-{task}-{n}"), "debug": o["debug"], "compile": o["compile"],
            "cuda_graphs": o["cuda_graphs"], "compile_cache": str(o["work_dir"] / "compile-cache"),
            "max_seq_len": o["max_seq_len"], "max_batch_size": o["max_batch_size"], "quantize": o["quantize"],
            "levels": o["concurrency"],
        }
        spec_path, out_path = tmp / f"spec-{task}-{n}.json", tmp / f"out-{task}-{n}.json"
        spec_path.write_text(json.dumps(spec))
        proc = subprocess.run([sys.executable, "-m", "shoal.bench", "worker", str(spec_path), str(out_path)],
                              env=self.env(), stdout=subprocess.DEVNULL)
        result = json.loads(out_path.read_text()) if out_path.is_file() else None
        if result is None or "error" in result:
            why = result["error"] if result else f"it died with exit code {proc.returncode}" + (
                " (killed: out of memory?)" if proc.returncode in (-9, 137) else "")
            raise BenchError(f"shoal {name} failed: {why}")
        return result

    # -- the reference -----------------------------------------------------------------------------------------
    def reference(self, tmp: Path, python, checkpoint: dict, plan: dict, clip: Path) -> dict:
        if not isinstance(python, Path):
            return {"status": python}
        o = self.o
        requests = reference_requests(plan, clip)
        roles = [role for role, _ in requests]
        jsonl = tmp / "requests.jsonl"
        jsonl.write_text("".join(json.dumps(r) + "\n" for _, r in requests))
        out = tmp / "reference.json"
        log_path = o["work_dir"] / "reference-last.log"
        o["work_dir"].mkdir(parents=True, exist_ok=True)
        progress(f"reference: {len(requests)} requests one after another (fresh process; its stderr, time-stamped, "
                 f"goes to {log_path})")
        cmd = [str(python), str(o["reference_dir"] / "run_reference.py"), "--checkpoint", checkpoint["path"],
               "--requests", str(jsonl), "--out", str(out), "--device", o["device"], "--precision", o["precision"]]
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=self.env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            with open(log_path, "w") as log:
                lines = read_stamped(proc, log, roles, t0)
            proc.wait()
        except BaseException:  # interrupted: do not leave a 9 GB process behind
            proc.kill()
            proc.wait()
            raise
        wall = time.perf_counter() - t0
        if proc.returncode or not out.is_file():
            why = last_line("\n".join(text for _, text in lines)) or f"exit code {proc.returncode}"
            return {"status": "failed", "error": why}
        report = json.loads(out.read_text())
        report["order"], report["wall_s"] = roles, wall
        timing = parse_reference_log(lines)
        report["log"] = {"requests": timing} if len(timing) == len(roles) else None
        errors = [f"request {r['index']} ({roles[r['index']]}): {r['error']}"
                  for r in report["requests"] if r.get("error")]
        if errors:
            return {"status": "failed", "error": errors[0], "raw": report}
        if report["log"] is None:
            progress(f"reference: its log shows {len(timing)} requests, not {len(roles)}: no per-step figures")
        progress(f"reference: done in {wall:.0f} s")
        return {"status": "ok", "raw": report}


def read_stamped(proc: subprocess.Popen, log, roles: list[str], t0: float) -> list[tuple[float, str]]:
    """The process's stderr as (seconds since t0, line) pairs, also written to `log`. Says which request the
    reference is on as each one starts."""
    lines: list[tuple[float, str]] = []
    splitter, started = LineStamper(), 0
    while True:
        chunk = proc.stderr.read1(1 << 16)
        now = time.perf_counter() - t0
        new = splitter.feed(chunk, now) if chunk else splitter.close(now)
        for t, text in new:
            lines.append((t, text))
            log.write(f"{t:10.4f}  {text}\n")
            if SEED_LINE in text and started < len(roles):
                started += 1
                progress(f"reference: request {started} of {len(roles)} ({roles[started - 1]}) started after "
                         f"{t:.0f} s")
        if not chunk:
            return lines


class LineStamper:
    """Splits a byte stream at newlines and carriage returns, stamping each line with the arrival time of its
    last byte. tqdm starts each redraw with a carriage return instead of ending it with a newline, so a redraw
    is complete only when the next one arrives; stamping it then would shift every redraw by one."""

    def __init__(self):
        self.pending, self.pending_at = b"", 0.0

    def feed(self, chunk: bytes, now: float) -> list[tuple[float, str]]:
        *complete, rest = re.split(rb"[\r\n]", chunk)
        out = []
        if complete:
            first, *whole = complete
            out.append((now if first else self.pending_at, self.pending + first))
            out += [(now, line) for line in whole]
            self.pending, self.pending_at = rest, now
        else:
            self.pending += rest
            self.pending_at = now
        return [(t, line.decode("utf-8", "replace").rstrip()) for t, line in out if line.strip()]

    def close(self, now: float) -> list[tuple[float, str]]:
        rest, self.pending = self.pending, b""
        return [(self.pending_at, rest.decode("utf-8", "replace").rstrip())] if rest.strip() else []


def check_checkpoint(path: Path) -> None:
    """CheckpointError, one line, when the directory or one of its files is missing (the workers check the rest).
    shoal.layout is torch-free, so the orchestrator may use it."""
    from shoal.errors import CheckpointError
    from shoal.layout import checkpoint_files, checkpoint_kind

    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    missing = [name for name in checkpoint_files(path, checkpoint_kind(path)) if not (path / name).is_file()]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: missing {', '.join(missing)}")


def last_line(text: str) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1][:400] if lines else ""


def write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(text)
    os.replace(tmp, path)


# -----------------------------------------------------------------------------------------------------------
# Requests, the voice clip, the machine
# -----------------------------------------------------------------------------------------------------------


def request_plan(tokens: int, burst: int) -> dict:
    """Every request of the run; both engines get exactly these."""
    common = {"temperature": 0.8, "top_p": 0.8, "repetition_penalty": 1.1}
    return {
        "tokens": tokens,
        "warmup": {**common, **WARMUP, "max_new_tokens": tokens},
        "throughput": [{**common, "text": TEXTS[i % len(TEXTS)], "seed": THROUGHPUT_SEED + i,
                        "max_new_tokens": tokens} for i in range(burst)],
        "utterance": {**common, "text": UTTERANCE, "seed": UTTERANCE_SEED, "max_new_tokens": tokens},
        "voice": {**common, **VOICE_REQUEST, "max_new_tokens": tokens, "clip_text": VOICE_CLIP_TEXT},
    }


def reference_requests(plan: dict, clip: Path) -> list[tuple[str, dict]]:
    """(role, run_reference request) in the order the reference runs them."""
    def req(spec: dict, **extra) -> dict:
        keys = ("text", "seed", "temperature", "top_p", "repetition_penalty", "max_new_tokens")
        return {**{k: spec[k] for k in keys}, "chunk_length": 200, "streaming": False, **extra}

    voice = req(plan["voice"], reference_audio=str(clip), reference_text=plan["voice"]["clip_text"])
    return ([("warmup", req(plan["warmup"]))]
            + [(f"throughput-{i}", req(r)) for i, r in enumerate(plan["throughput"])]
            + [("utterance", req(plan["utterance"], streaming=True))]
            + [("voice-1", voice), ("voice-2", voice)])


def write_voice_clip(path: Path, seconds: float = VOICE_CLIP_SECONDS, sample_rate: int = 44100) -> Path:
    """A deterministic voice-like clip (harmonics of a gliding 120 Hz tone, syllable-rate amplitude), PCM16."""
    import wave

    import numpy as np

    t = np.arange(int(seconds * sample_rate)) / sample_rate
    f0 = 120 + 15 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sample_rate
    voice = sum(np.sin(k * phase) / k for k in range(1, 12))
    envelope = 0.5 - 0.5 * np.cos(2 * np.pi * 4 * t)
    noise = np.random.default_rng(0).standard_normal(t.shape) * 0.01
    audio = 0.25 * voice * envelope / 3 + noise
    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm.tobytes())
    return path


def measure_bandwidth(size: int, repeats: int = 5) -> dict:
    """Memory bandwidth of one large array copy (numpy, one thread), best of `repeats`, counted STREAM's way:
    bytes read plus bytes written, per second."""
    import numpy as np

    src = np.ones(size, dtype=np.uint8)
    dst = np.empty_like(src)
    dst.fill(0)  # both written once before the timing, so that no page faults fall inside it
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    del src, dst
    return {"method": f"numpy copy of {size / 2**20:.0f} MiB, best of {repeats}, (read + write bytes) / s",
            "bytes": size, "best_s": best, "gbps": 2 * size / best / 1e9}


def measure_device_bandwidth(size: int, device: str, repeats: int = 5) -> dict:
    """The same copy on a CUDA device (torch), best of `repeats`: the floor of a GPU decode step reads weights
    from the GPU's memory, not the host's."""
    import torch

    src = torch.ones(size, dtype=torch.uint8, device=device)
    dst = torch.zeros_like(src)
    dst.copy_(src)  # once untimed: the copy kernel's first launch
    best = math.inf
    for _ in range(repeats):
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return {"method": f"torch copy of {size / 2**20:.0f} MiB on {torch.cuda.get_device_name(device)}, best of "
            f"{repeats}, (read + write bytes) / s", "bytes": size, "best_s": best, "gbps": 2 * size / best / 1e9}


def machine() -> dict:
    info = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "platform": platform.platform(), "python": platform.python_version()}
    if hasattr(os, "sched_getaffinity"):
        info["cores_usable"] = len(os.sched_getaffinity(0))
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import psutil

        info["ram_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
        info["ram_available_gib_at_start"] = round(psutil.virtual_memory().available / 2**30, 1)
    except ImportError:  # pragma: no cover - psutil is a dependency of shoal
        pass
    return info


# -----------------------------------------------------------------------------------------------------------
# Turning raw measurements into the report
# -----------------------------------------------------------------------------------------------------------


def median(values) -> float | None:
    values = list(values)
    return statistics.median(values) if values else None


def reference_figures(reference: dict, plan: dict) -> dict:
    """The reference's report and log -> the same figures shoal's workers give."""
    raw = reference["raw"]
    by_role = {role: r for role, r in zip(raw["order"], raw["requests"])}
    timing = dict(zip(raw["order"], raw["log"]["requests"])) if raw.get("log") else {}
    figures = {"load_s": raw["load_s"], "peak_rss_mb": raw["peak_rss_mb"], "torch": raw.get("torch"),
               "total_wall_s": raw.get("wall_s")}
    steps = (timing.get("throughput-0") or {}).get("steps") or []
    figures["decode"] = {"median_step_s": median(steps), "steps": len(steps),
                         "tokens": by_role["throughput-0"]["tokens"],
                         "prefill_s": (timing.get("throughput-0") or {}).get("prefill_s")}
    figures["concurrency"] = {}
    for n in plan["levels"]:
        done = [by_role[f"throughput-{i}"] for i in range(n)]
        wall = sum(r["wall_s"] for r in done)
        tokens, audio = sum(r["tokens"] for r in done), sum(r["audio_s"] for r in done)
        figures["concurrency"][str(n)] = {
            "sequential": True, "wall_s": wall, "tokens": tokens, "audio_s": audio,
            "tokens_per_s": tokens / wall, "audio_s_per_s": audio / wall,
            "per_request_tokens": [r["tokens"] for r in done], "peak_rss_mb": raw["peak_rss_mb"],
        }
    u = by_role["utterance"]
    figures["utterance"] = {"first_audio_s": u["first_audio_s"], "total_s": u["wall_s"], "tokens": u["tokens"],
                            "audio_s": u["audio_s"]}
    v2 = timing.get("voice-2") or {}
    figures["voice"] = {
        "first_request_s": by_role["voice-1"]["wall_s"], "second_request_s": by_role["voice-2"]["wall_s"],
        "tokens": by_role["voice-2"]["tokens"], "encodes_second_request": v2.get("encodes"),
        "encode_s_second_request": sum(v2["encode_s"]) if v2.get("encode_s") else None,
    }
    return figures


# What the reference writes to stderr, and what each line says about timing. Its log lines are loguru's
# ("... | WARNING | ...:inference:62 - set seed: 100"); its decode loop is wrapped in a tqdm bar
# ("  3%|▎         | 1/31 [00:02<01:15,  2.50s/it]"), redrawn after each step at most every 0.1 s.
SEED_LINE = " - set seed: "  # logged by every request that has a seed (all of ours), after its clip is encoded
TEXT_LINE = " - Encoded text: "  # just before generation starts (prefill, then the decode loop's bar)
ENCODE_START, ENCODE_END = " - Loaded audio with ", " - Encoded prompt: "  # around each reference encode
TQDM_RE = re.compile(r"\| *(\d+)/(\d+) \[")


def parse_reference_log(lines: list[tuple[float, str]]) -> list[dict]:
    """Per request (in order): decode-step times, prefill time, and the reference encodes it did, from the
    reference's stderr stamped as it arrived.

    Step times come from the decode loop's tqdm bar: between two redraws at (t0, n0) and (t1, n1), each of the
    n1 - n0 steps took (t1 - t0) / (n1 - n0). The bar is first drawn when the loop starts, right after the
    prefill frame, so the first gap is the first decode step, as in shoal's measurement. An encode belongs to
    the request whose "set seed" comes next (the reference encodes clips before seeding).
    """
    requests: list[dict] = []
    encodes: list[float] = []
    encode_start = None
    for t, text in lines:
        if SEED_LINE in text:
            requests.append({"updates": [], "encode_s": encodes, "text_at": None})
            encodes = []
        elif ENCODE_START in text:
            encode_start = t
        elif ENCODE_END in text:
            encodes.append(t - encode_start if encode_start is not None else 0.0)
        elif requests and TEXT_LINE in text:
            requests[-1]["text_at"] = t
        elif requests and (m := TQDM_RE.search(text)):
            requests[-1]["updates"].append((t, int(m.group(1))))
    out = []
    for r in requests:
        steps: list[float] = []
        for (t0, n0), (t1, n1) in zip(r["updates"], r["updates"][1:]):
            if n1 > n0:
                steps += [(t1 - t0) / (n1 - n0)] * (n1 - n0)
        first = r["updates"][0][0] if r["updates"] else None
        prefill = first - r["text_at"] if first is not None and r["text_at"] is not None else None
        out.append({"steps": steps, "prefill_s": prefill, "encodes": len(r["encode_s"]),
                    "encode_s": r["encode_s"]})
    return out


def assemble(o, started, checkpoint, bandwidth, plan, shoal, reference, load_before, load_after) -> dict:
    plan = {**plan, "levels": o["concurrency"]}
    single = shoal["single"]
    weights = single["decode_bytes"]["weights"]
    floor_s = weights / (bandwidth["gbps"] * 1e9)
    ref_status = reference.get("status")
    ref = reference_figures(reference, plan) if ref_status == "ok" else None
    report = {
        "schema": SCHEMA_VERSION,
        "label": o["label"],
        "date": started.date().isoformat(),
        "started": started.isoformat(timespec="seconds"),
        "machine": {**machine(), "loadavg_before": load_before, "loadavg_after": load_after},
        # the floor under every child's ru_maxrss, so under the reference's reported peak
        "orchestrator_peak_rss_mb": peak_rss_mb(),
        "options": {"tokens": o["tokens"], "concurrency": o["concurrency"], "threads": o["threads"],
                    "device": o["device"], "precision": o["precision"], "compile": o["compile"],
                    "cuda_graphs": o["cuda_graphs"], "max_seq_len": o["max_seq_len"],
                    "max_batch_size": o["max_batch_size"], "quantize": o["quantize"],
                    "one_process": o["one_process"]},
        "checkpoint": {**checkpoint, "model": o["model"]},
        "requests": plan,
        "bandwidth": bandwidth,
        "floor": {"weights_bytes_per_step": weights, "kv_bytes_per_step_mid": single["decode_bytes"]["kv_mid"],
                  "floor_s": floor_s},
        "shoal": {"torch": single["torch"], "threads": single["threads"], "device": single["device"],
                  "precision": single["precision"], **shoal},
        "reference": ({"status": "ok", "figures": ref, "raw": reference["raw"]} if ref else reference),
    }
    report["summary"] = summary(report)
    return report


def summary(report: dict) -> list[dict]:
    """The table's rows: metric, unit, shoal, reference, ratio (above 1: shoal is better), note."""
    s = report["shoal"]
    single = s["single"]
    ref = report["reference"].get("figures")
    floor_s = report["floor"]["floor_s"]
    rows = []

    def row(metric, unit, mine, theirs, better, note=""):
        ratio = None
        if isinstance(mine, (int, float)) and isinstance(theirs, (int, float)) and mine > 0 and theirs > 0:
            ratio = theirs / mine if better == "lower" else mine / theirs if better == "higher" else None
        rows.append({"metric": metric, "unit": unit, "shoal": mine, "reference": theirs, "ratio": ratio,
                     "note": note})

    def r(*keys):
        value = ref
        for k in keys:
            if value is None:
                return None
            value = value.get(k)
        return value

    row("model load", "s", single["load_s"], r("load_s"), "lower")
    d = single["decode"]
    row("decode per token, batch 1 (median)", "ms", d["median_step_s"] * 1e3,
        r("decode", "median_step_s") and r("decode", "median_step_s") * 1e3, "lower",
        f"median of {d['steps']} steps" + (f" (reference {r('decode', 'steps')})" if ref else ""))
    row("decode per token / bandwidth floor", "x", d["median_step_s"] / floor_s,
        r("decode", "median_step_s") and r("decode", "median_step_s") / floor_s, None,
        f"floor {floor_s * 1e3:.1f} ms = {report['floor']['weights_bytes_per_step'] / 1e9:.2f} GB of weights "
        f"/ {report['bandwidth']['gbps']:.1f} GB/s")
    for n, c in s["concurrency"].items():
        rc = r("concurrency", n)
        note = "reference: sequential" if rc else ""
        row(f"throughput, {n} concurrent", "tokens/s", c["tokens_per_s"], rc and rc["tokens_per_s"], "higher",
            note)
        row(f"audio, {n} concurrent", "audio s/s", c["audio_s_per_s"], rc and rc["audio_s_per_s"], "higher", note)
    u = single["utterance"]
    note = f"{u['tokens']} tokens, {u['audio_s']:.1f} s of audio (max_new_tokens {report['requests']['tokens']})"
    ref_tokens = r("utterance", "tokens")
    if ref_tokens is not None and ref_tokens != u["tokens"]:
        note += f"; reference {ref_tokens} tokens"
    late = [name for name, f in (("shoal", u), ("reference", r("utterance")))
            if f and f["first_audio_s"] > 0.9 * f["total_s"]]
    first_note = note + (f"; {' and '.join(late)}: first audio came with the whole utterance (audio is streamed "
                         "per text segment)" if late else "")
    row("utterance: time to first audio", "s", u["first_audio_s"], r("utterance", "first_audio_s"), "lower",
        first_note)
    row("utterance: total", "s", u["total_s"], r("utterance", "total_s"), "lower", note)
    if "unstreamed_total_s" in u:
        row("utterance: streamed total / unstreamed total", "x", u["total_s"] / u["unstreamed_total_s"], None, None,
            f"the same request unstreamed took {u['unstreamed_total_s']:.2f} s (target <= 1.1x); first audio came "
            f"at {u['first_audio_s'] / u['total_s']:.3f} of the streamed total (target <= 0.1)")
    if "codec_frames" in u:  # the streamed decode's work: about the frames generated, each decoded once
        row("utterance: frames through the codec", "frames", u["codec_frames"], None, None,
            f"{u['codec_frames'] / max(u['tokens'], 1):.2f}x the {u['tokens']} decoded frames (target <= 1.1x)")
    v = single["voice"]
    row("saved voice, 2nd request: latency", "s", v["second_request_s"], r("voice", "second_request_s"), "lower",
        "reference: no saved voices, the clip is sent and re-encoded each time" if ref else "")
    encode_s = r("voice", "encode_s_second_request")
    row("saved voice, 2nd request: codec encodes", "count", v["encodes_second_request"],
        r("voice", "encodes_second_request"), None,
        ("shoal must do 0: the voice was encoded once, when saved"
         if v["encodes_second_request"] == 0 else "SHOAL RE-ENCODED A SAVED VOICE")
        + (f"; the reference's encode took {encode_s:.2f} s" if encode_s else ""))
    row("peak RSS, single stream", "MB", single["peak_rss_mb"], r("peak_rss_mb"), "lower",
        "reference: one process for all its requests" if ref else "")
    for n, c in s["concurrency"].items():
        row(f"peak RSS, {n} concurrent", "MB", c["peak_rss_mb"], r("peak_rss_mb"), "lower")
    return rows


def fmt(value, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, int) or unit == "count":
        return str(int(value))
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"


def render_markdown(report: dict) -> str:
    m, o, ck = report["machine"], report["options"], report["checkpoint"]
    s, ref = report["shoal"], report["reference"]
    ref_status = ref.get("status", "")
    if ref_status == "failed":
        ref_status = f"failed ({ref['error']})"
    ref_torch = ref["figures"]["torch"] if ref.get("figures") else None
    lines = [
        f"# shoal bench: {report['label']} ({report['date']})",
        "",
        f"- checkpoint: `{ck['path']}`: {ck['description']} ({ck['bytes_on_disk'] / 1e9:.2f} GB on disk)",
        f"- requests: max_new_tokens {o['tokens']} each; concurrency {', '.join(map(str, o['concurrency']))}; "
        f"{o['device']}, {o['precision']}"
        + (f"; shoal compiled{' with CUDA graphs' if o.get('cuda_graphs') else ''}" if o.get("compile") else "")
        + (f"; shoal max_seq_len {o['max_seq_len']}" if o.get("max_seq_len") else "")
        + (f"; shoal max_batch_size {o['max_batch_size']}" if o.get("max_batch_size") else "")
        + ("; shoal with int8 weights (SHOAL_QUANTIZE=int8)" if o.get("quantize") == "int8" else "")
        + ("; shoal in one process for every level (--one-process: its peak RSS rows are cumulative)"
           if o.get("one_process") else ""),
        f"- machine: {m['cpu']}, {m['cores']} cores ({m.get('cores_usable', m['cores'])} usable), "
        f"{m.get('ram_gib', '?')} GiB RAM; {m['platform']}; load average {fmt_load(m['loadavg_before'])} before, "
        f"{fmt_load(m['loadavg_after'])} after",
        f"- shoal: torch {s['torch']}, {s['threads']} threads, {s['device']} {s['precision']}; reference: "
        + (f"{MODELS[ck.get('model', 's1')]['reference']}, torch {ref_torch}, "
           + (f"{o['threads']} threads" if o["threads"] else "torch's default threads") if ref_torch else ref_status),
        f"- memory bandwidth: {report['bandwidth']['gbps']:.1f} GB/s ({report['bandwidth']['method']})",
        "",
        "| metric | unit | shoal | reference | ratio | notes |",
        "|---|---|---:|---:|---:|---|",
    ]
    for row in report["summary"]:
        theirs = fmt(row["reference"], row["unit"]) if ref.get("figures") else ref_status.split(" (")[0]
        ratio = f"{row['ratio']:.2f}" if row["ratio"] else ""
        lines.append(f"| {row['metric']} | {row['unit']} | {fmt(row['shoal'], row['unit'])} | {theirs} | {ratio} "
                     f"| {row['note']} |")
    lines += [
        "",
        "Ratio: reference time / shoal time, shoal rate / reference rate, reference RSS / shoal RSS, so above 1 "
        "means shoal is better.",
        "",
        "- Tokens are generated frames handed to the codec (each request's last frame never is), counted the same "
        "way for both engines; audio seconds are the returned audio.",
        "- Decode per token: the median time between consecutive frames of one request (prefill excluded): shoal "
        "from `FishEngine.run` progress callbacks, the reference from the tqdm bar of its decode loop as its "
        "stderr arrives (redrawn at most every 0.1 s, so on fast models one gap spans several steps). The floor "
        "is the bytes of weights one decode step reads (slow stack + output head + the fast stack once per "
        "codebook) over the measured bandwidth.",
        "- shoal's concurrent figures go through `Service` and its Dispatcher under asyncio (N requests at "
        "once); the reference runs requests one after another as its server does, so its concurrent figures "
        "are its sequential throughput over the first N of the same requests.",
        "- Time to first audio: the first chunk out of `Service.stream` (shoal) and the first `segment` of a "
        "streaming request (reference).",
        "- Saved voice: shoal saves the clip once (one encode at save time) and the request names the voice; the "
        "reference gets the clip with each request (its `use_memory_cache` is off by default).",
        "- Peak RSS: shoal runs each configuration in a fresh process (its VmHWM); the reference runs all its "
        "requests in one (its own ru_maxrss report; this orchestrator's peak, "
        f"{report['orchestrator_peak_rss_mb']:.0f} MB, is the least a child can report).",
    ]
    parity = parity_note(report)
    if parity:
        lines.append(f"- {parity}")
    return "\n".join(lines) + "\n"


def parity_note(report: dict) -> str:
    ref = report["reference"].get("figures")
    if not ref:
        return ""
    mine = report["shoal"]["concurrency"]
    n = str(max(int(k) for k in mine))
    a = mine[n]["per_request_tokens"]
    b = ref["concurrency"][n]["per_request_tokens"]
    same = "the same" if a == b else "DIFFERENT"
    return f"Tokens per request of the {n}-request burst: shoal {a}, reference {b} ({same} work)."


def fmt_load(load) -> str:
    return "/".join(f"{v:.2f}" for v in load) if load else "?"


# -----------------------------------------------------------------------------------------------------------
# --repeat: the same request, again and again, to a real `shoal serve`
# -----------------------------------------------------------------------------------------------------------

#: The issue's targets: every later request within ±10% of the first's wall time, and no more CPU per request
#: than a server started with OMP_NUM_THREADS=1.
REPEAT_WALL_TOLERANCE = 0.10
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
#: After each response the CPU window stays open this long: worker threads still spinning (OpenMP teams wait
#: busily for a while after a parallel region) count against the request that woke them.
CPU_SETTLE_S = 0.25
#: A thread counts as busy in a request when it used at least this share of the request's wall time.
BUSY_THREAD_SHARE = 0.10
SERVER_READY_TIMEOUT_S = 600.0
#: A single-threaded server given a whole core keeps it busy for nearly all of a request; below this share of
#: a core other work was competing for it, and the summary says the machine was busy.
QUIET_CORES_BUSY = 0.9
THREAD_PROBE = """import json, torch
info = torch.__config__.parallel_info().splitlines()
print(json.dumps({"torch": torch.__version__, "intra_op_threads": torch.get_num_threads(),
                  "inter_op_threads": torch.get_num_interop_threads(),
                  "backend": next((l.split(":", 1)[1].strip() for l in info if "parallel backend" in l), None)}))
"""


def start_server(server) -> dict:
    """Start a `shoal.testing.Server` and return its health answer; a server that fails is a BenchError naming
    the last line it logged."""
    import httpx

    try:
        server.start(SERVER_READY_TIMEOUT_S)
    except RuntimeError:
        raise BenchError(f"shoal serve did not become ready: "
                         f"{last_line(server.log.read_text(errors='replace')) or 'it wrote nothing'}") from None
    return httpx.get(server.url + "/v1/health", timeout=30).json()


class RepeatBench(Bench):
    """`shoal bench --repeat N`: one request (fixed text and seed, a non-streamed WAV from /v1/tts) sent N times,
    one after another, to a fresh `shoal serve` at the default thread settings, then N times to a fresh one
    started with OMP_NUM_THREADS=MKL_NUM_THREADS=1. Per request: its wall time (client side) and the server
    process's CPU time (user + system of all its threads, psutil). The server's own warm-up has run before the
    first request (it is ready only after it), and nothing else is sent first: request 1 is the first a user's
    would be."""

    def run(self) -> dict:
        o = self.o
        started = datetime.datetime.now().astimezone()
        load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
        o["out"].mkdir(parents=True, exist_ok=True)
        checkpoint = self.checkpoint()
        request = repeat_request(o["tokens"])
        servers = {}
        with tempfile.TemporaryDirectory(prefix="shoal-bench-") as tmp:
            for name, env in (("default", self.default_env()), ("omp1", self.one_thread_env())):
                servers[name] = self.serve_repeatedly(Path(tmp) / name, name, env, checkpoint, request)
        load_after = os.getloadavg() if hasattr(os, "getloadavg") else None
        report = assemble_repeat(o, started, checkpoint, request, servers, load_before, load_after)
        stem = o["out"] / f"{started.date().isoformat()}-{o['label']}"
        write_text(stem.with_suffix(".json"), json.dumps(report, indent=2) + "\n")
        write_text(stem.with_suffix(".md"), render_repeat_markdown(report))
        print(render_repeat_summary(report))
        progress(f"wrote {stem}.md and {stem}.json")
        return report

    def default_env(self) -> dict:
        """The environment as it is, less any thread count inherited from this shell, so that "default" is torch's
        own choice; --threads N sets both variables instead."""
        env = {k: v for k, v in os.environ.items() if k not in THREAD_VARIABLES}
        if self.o["threads"]:
            env.update({name: str(self.o["threads"]) for name in THREAD_VARIABLES})
        return self.shoal_env(env)

    def one_thread_env(self) -> dict:
        return self.shoal_env({**os.environ, **{name: "1" for name in THREAD_VARIABLES}})

    def shoal_env(self, env: dict) -> dict:
        """The bench's shoal options, as the SHOAL_* variables `shoal serve` reads."""
        o = self.o
        env = {**env, "SHOAL_REQUEST_TIMEOUT": str(BENCH_TIMEOUT_SECONDS), "GRADIO_ANALYTICS_ENABLED": "False"}
        for name, value in (("SHOAL_COMPILE", o["compile"]), ("SHOAL_CUDA_GRAPHS", o["cuda_graphs"])):
            if value:
                env[name] = "true"
        if o["compile"]:
            env["SHOAL_COMPILE_CACHE"] = str(o["work_dir"] / "compile-cache")
        for name, value in (("SHOAL_MAX_SEQ_LEN", o["max_seq_len"]), ("SHOAL_MAX_BATCH_SIZE", o["max_batch_size"])):
            if value is not None:
                env[name] = str(value)
        if o["quantize"] != "none":
            env["SHOAL_QUANTIZE"] = o["quantize"]
        return env

    def serve_repeatedly(self, root: Path, name: str, env: dict, checkpoint: dict, request: dict) -> dict:
        import httpx
        import psutil

        from shoal.testing import Server

        o = self.o
        threads_env = {k: env.get(k) for k in THREAD_VARIABLES}
        title = "default threads" if name == "default" else "OMP_NUM_THREADS=1"
        server = Server(Path(checkpoint["path"]), root, "--host", "127.0.0.1", "--no-ui", "--device", o["device"],
                        "--precision", o["precision"], env=env, inherit_env=False)
        progress(f"{title}: starting shoal serve on port {server.port} "
                 f"({', '.join(f'{k}={v}' for k, v in threads_env.items() if v) or 'no thread variables'})")
        t0 = time.perf_counter()
        try:
            health = start_server(server)
            ready_s = time.perf_counter() - t0
            proc = psutil.Process(server.proc.pid)
            out = {"env": threads_env, "ready_s": ready_s, "threads_at_ready": proc.num_threads(),
                   "threads_reported": health.get("threads"), "torch_probe": probe_threads(env),
                   "requests": []}
            progress(f"{title}: ready in {ready_s:.1f} s; {o['repeat']} requests one after another")
            with httpx.Client(base_url=server.url, timeout=BENCH_TIMEOUT_SECONDS) as client:
                for i in range(o["repeat"]):
                    one = timed_request(client, proc, request)
                    out["requests"].append(one)
                    progress(f"{title}: request {i + 1}: {one['wall_s']:.2f} s, {one['cpu_s']:.2f} CPU s, "
                             f"{one['busy_threads']} busy threads of {one['threads']}")
            out["rss_mb_end"] = proc.memory_info().rss / 2**20
        except BaseException:
            server.stop()
            raise
        server.stop()
        out["exit_code"] = server.proc.returncode
        return out


def repeat_request(tokens: int) -> dict:
    """The /v1/tts body: the ~10 s utterance with its fixed seed, as one non-streamed WAV."""
    spec = request_plan(tokens, 1)["utterance"]
    return {**request_fields(spec), "format": "wav", "streaming": False}


def probe_threads(env: dict) -> dict | None:
    """What torch chooses in a fresh interpreter with the server's environment: its intra-op and inter-op thread
    counts at start-up (the server does not report its own; shoal sets none)."""
    proc = subprocess.run([sys.executable, "-c", THREAD_PROBE], env=env, capture_output=True, text=True)
    if proc.returncode:
        progress(f"the torch thread probe failed: {last_line(proc.stderr)}")
        return None
    return json.loads(proc.stdout)


def timed_request(client, proc, body: dict) -> dict:
    """One request: its wall time, the server's CPU seconds over it (and over CPU_SETTLE_S after), its threads."""
    import hashlib
    import io
    import wave

    def cpu() -> float:
        t = proc.cpu_times()
        return t.user + t.system + t.children_user + t.children_system

    def per_thread() -> dict:
        return {t.id: t.user_time + t.system_time for t in proc.threads()}

    threads0, cpu0 = per_thread(), cpu()
    t0 = time.perf_counter()
    response = client.post("/v1/tts", json=body)
    wall = time.perf_counter() - t0
    cpu_at_response = cpu()
    time.sleep(CPU_SETTLE_S)
    cpu1, threads1 = cpu(), per_thread()
    if response.status_code != 200:
        raise BenchError(f"/v1/tts answered {response.status_code}: {response.text[:300]}")
    audio = response.content
    with wave.open(io.BytesIO(audio)) as w:
        audio_s = w.getnframes() / w.getframerate()
    used = sorted(((threads1[tid] - threads0.get(tid, 0.0), tid) for tid in threads1), reverse=True)
    return {"wall_s": wall, "cpu_s": cpu1 - cpu0, "cpu_after_response_s": cpu1 - cpu_at_response,
            "threads": len(threads1), "busy_threads": sum(u >= BUSY_THREAD_SHARE * wall for u, _ in used),
            # [thread id, CPU s] of its busiest threads: the same ids request after request when one thread
            # runs torch; new ids when each request brings threads (and OpenMP teams) of its own
            "thread_cpu_s": [[tid, round(u, 3)] for u, tid in used[:6] if u >= 0.01],
            "audio_s": audio_s, "bytes": len(audio), "sha256": hashlib.sha256(audio).hexdigest()}


def repeat_figures(server: dict) -> dict:
    """One server's requests -> the figures the targets are judged on."""
    reqs = server["requests"]
    walls = [r["wall_s"] for r in reqs]
    ratios = [w / walls[0] for w in walls[1:]]
    digests = {r["sha256"] for r in reqs}
    return {"first_wall_s": walls[0], "later_wall_median_s": median(walls[1:]), "wall_median_s": median(walls),
            "later_over_first": ratios, "later_over_first_max": max(ratios),
            "later_over_first_min": min(ratios), "later_over_first_median": median(ratios),
            "within_tolerance": all(abs(r - 1) <= REPEAT_WALL_TOLERANCE for r in ratios),
            "cpu_median_s": median(r["cpu_s"] for r in reqs), "cpu_first_s": reqs[0]["cpu_s"],
            "cpu_later_median_s": median(r["cpu_s"] for r in reqs[1:]),
            "cores_busy_median": median(r["cpu_s"] / r["wall_s"] for r in reqs),
            "busy_threads_median": median(r["busy_threads"] for r in reqs),
            "threads_max": max(r["threads"] for r in reqs),
            "identical": len(digests) == 1, "distinct_responses": len(digests), "audio_s": reqs[0]["audio_s"]}


def assemble_repeat(o, started, checkpoint, request, servers, load_before, load_after) -> dict:
    for server in servers.values():
        server["figures"] = repeat_figures(server)
    d, one = servers["default"]["figures"], servers["omp1"]["figures"]
    cpu_ratio = d["cpu_median_s"] / one["cpu_median_s"]
    targets = [
        {"target": f"first vs later ±{REPEAT_WALL_TOLERANCE:.0%}", "hit": d["within_tolerance"],
         "figure": f"later / first: median {d['later_over_first_median']:.2f}, range "
                   f"{d['later_over_first_min']:.2f}-{d['later_over_first_max']:.2f} over requests 2-{o['repeat']}"},
        {"target": "CPU per request ≤ OMP_NUM_THREADS=1", "hit": cpu_ratio <= 1.0,
         "figure": f"median {d['cpu_median_s']:.2f} CPU s against {one['cpu_median_s']:.2f} ({cpu_ratio:.2f}x)"},
    ]
    return {
        "schema": SCHEMA_VERSION,
        "mode": "repeat",
        "label": o["label"],
        "date": started.date().isoformat(),
        "started": started.isoformat(timespec="seconds"),
        "machine": {**machine(), "loadavg_before": load_before, "loadavg_after": load_after},
        "options": {"tokens": o["tokens"], "repeat": o["repeat"], "threads": o["threads"], "device": o["device"],
                    "precision": o["precision"], "compile": o["compile"], "cuda_graphs": o["cuda_graphs"],
                    "max_seq_len": o["max_seq_len"], "max_batch_size": o["max_batch_size"],
                    "quantize": o["quantize"]},
        "checkpoint": checkpoint,
        "request": {"path": "/v1/tts", "body": request},
        "method": {"cpu": "psutil cpu_times of the server process (user + system, all its threads), from just "
                          f"before the request to {CPU_SETTLE_S} s after its response",
                   "busy_thread": f"a thread that used at least {BUSY_THREAD_SHARE:.0%} of the request's wall time",
                   "wall": "client side, from sending the request to the whole WAV received"},
        "servers": servers,
        "ratios": {"cpu_default_over_omp1": cpu_ratio,
                   "wall_default_over_omp1": d["wall_median_s"] / one["wall_median_s"],
                   "same_audio_both_servers": servers["default"]["requests"][0]["sha256"]
                   == servers["omp1"]["requests"][0]["sha256"]},
        "targets": targets,
    }


def thread_setting(server: dict) -> str:
    env = ", ".join(f"{k}={v}" for k, v in server["env"].items() if v) or "no OMP/MKL_NUM_THREADS"
    probe = server.get("torch_probe")
    seen = (f"; torch chooses {probe['intra_op_threads']} intra-op, {probe['inter_op_threads']} inter-op threads "
            f"({probe['backend']})" if probe else "")
    reported = f"; the server reports {server['threads_reported']}" if server.get("threads_reported") else ""
    return env + seen + reported


def render_repeat_summary(report: dict) -> str:
    """The targets and the per-server figures: what stdout shows, and the head of the .md."""
    s, ratios = report["servers"], report["ratios"]
    lines = [f"# shoal bench --repeat {report['options']['repeat']}: {report['label']} ({report['date']})", ""]
    lines += [f"- **{t['target']}: {'hit' if t['hit'] else 'miss'}** ({t['figure']})" for t in report["targets"]]
    busy = s["omp1"]["figures"]["cores_busy_median"]
    if busy < QUIET_CORES_BUSY:
        lines.append(f"- **the machine was busy**: the 1-thread server had {busy:.2f} of a core per request (median "
                     "CPU s / wall s), so other work took the rest; its own later / first is the noise to expect")
    for name in ("default", "omp1"):
        f = s[name]["figures"]
        if not f["identical"]:
            lines.append(f"- **{name}: the responses DIFFER** ({f['distinct_responses']} distinct WAVs in "
                         f"{len(s[name]['requests'])})")
    lines += [
        "",
        "| | unit | default threads | OMP_NUM_THREADS=1 | default / 1 thread |",
        "|---|---|---:|---:|---:|",
    ]
    d, one = s["default"]["figures"], s["omp1"]["figures"]

    def row(label, unit, key, ratio=True):
        a, b = d[key], one[key]
        lines.append(f"| {label} | {unit} | {fmt(a, unit)} | {fmt(b, unit)} | "
                     f"{f'{a / b:.2f}' if ratio and a and b else ''} |")

    row("request 1: wall", "s", "first_wall_s")
    row("requests 2-N: wall (median)", "s", "later_wall_median_s")
    row("later / first (median)", "x", "later_over_first_median", False)
    row("later / first (max)", "x", "later_over_first_max", False)
    row("CPU per request (median)", "CPU s", "cpu_median_s")
    row("request 1: CPU", "CPU s", "cpu_first_s")
    row("cores busy (median CPU s / wall s)", "x", "cores_busy_median", False)
    row("busy threads per request (median)", "count", "busy_threads_median", False)
    row("server threads (max)", "count", "threads_max", False)
    lines.append(f"| responses identical | | {'yes' if d['identical'] else 'NO'} | "
                 f"{'yes' if one['identical'] else 'NO'} | "
                 f"{'same audio' if ratios['same_audio_both_servers'] else 'different audio'} |")
    return "\n".join(lines) + "\n"


def render_repeat_markdown(report: dict) -> str:
    m, o, ck, s = report["machine"], report["options"], report["checkpoint"], report["servers"]
    body = report["request"]["body"]
    lines = [render_repeat_summary(report).rstrip("\n"), ""]
    lines += [
        f"- checkpoint: `{ck['path']}`: {ck['description']}",
        f"- request: `POST /v1/tts`, {len(body['text'])} characters, seed {body['seed']}, max_new_tokens "
        f"{body['max_new_tokens']}, WAV, not streamed; {s['default']['figures']['audio_s']:.2f} s of audio; "
        f"{o['device']}, {o['precision']}",
        f"- default server: {thread_setting(s['default'])}",
        f"- 1-thread server: {thread_setting(s['omp1'])}",
        f"- machine: {m['cpu']}, {m['cores']} cores ({m.get('cores_usable', m['cores'])} usable), "
        f"{m.get('ram_gib', '?')} GiB RAM; {m['platform']}; load average {fmt_load(m['loadavg_before'])} before, "
        f"{fmt_load(m['loadavg_after'])} after",
        "",
        "| request | default: wall s | / first | CPU s | busy threads | 1 thread: wall s | / first | CPU s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    a, b = s["default"]["requests"], s["omp1"]["requests"]
    for i, (x, y) in enumerate(zip(a, b)):
        lines.append(f"| {i + 1} | {x['wall_s']:.2f} | {x['wall_s'] / a[0]['wall_s']:.2f} | {x['cpu_s']:.2f} | "
                     f"{x['busy_threads']} | {y['wall_s']:.2f} | {y['wall_s'] / b[0]['wall_s']:.2f} | "
                     f"{y['cpu_s']:.2f} |")
    lines += [
        "",
        f"- Each server is a fresh `shoal serve` (its own warm-up done before it reports ready); the {o['repeat']} "
        "requests go one after another, nothing sent before the first. The default server runs first, then the "
        "1-thread one, never both at once.",
        f"- Wall: {report['method']['wall']}. CPU: {report['method']['cpu']}. Busy thread: "
        f"{report['method']['busy_thread']}.",
        f"- First vs later: every request 2-{o['repeat']} must be within ±{REPEAT_WALL_TOLERANCE:.0%} of request 1 "
        "(the 1-thread column is the control: when it misses too, the machine was not quiet). CPU per request: "
        "the default server's median against the 1-thread server's.",
    ]
    return "\n".join(lines) + "\n"


# -----------------------------------------------------------------------------------------------------------
# The shoal worker (a fresh process per configuration)
# -----------------------------------------------------------------------------------------------------------


def worker_main(spec_path: str, out_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    try:
        text = json.dumps(run_worker(spec))
    except Exception as exc:  # reported to the orchestrator as one line
        if spec.get("debug"):
            import traceback

            traceback.print_exc()
        message = str(exc).splitlines()[0] if str(exc) else ""
        Path(out_path).write_text(json.dumps({"error": f"{type(exc).__name__}: {message}" if message
                                              else type(exc).__name__}))
        return 1
    Path(out_path).write_text(text)
    return 0


def run_worker(spec: dict) -> dict:
    import asyncio

    import torch

    from shoal.compose import build_service
    from shoal.settings import Settings

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    plan = spec["plan"]
    t0 = time.perf_counter()
    # The composition root every entry point uses, with the bench's settings only (no environment, no .env).
    settings = Settings.load(cli={
        "checkpoint": spec["checkpoint"], "device": spec["device"], "precision": spec["precision"],
        "compile": spec.get("compile", False), "cuda_graphs": spec.get("cuda_graphs", False),
        "compile_cache": spec.get("compile_cache"), "max_seq_len": spec.get("max_seq_len"),
        "max_batch_size": spec.get("max_batch_size"), "quantize": spec.get("quantize", "none"),
        "data_dir": spec["data_dir"], "queue_size": max(16, 2 * spec["n"]), "request_timeout": BENCH_TIMEOUT_SECONDS,
        "default_model": "fish", "lite_voice": False}, env={}, dotenv=None)  # fish: the checkpoint's model
    service = build_service(settings, warm_up=False)
    engine = service.engines.get("fish")
    result = {"load_s": time.perf_counter() - t0, "torch": torch.__version__, "threads": torch.get_num_threads(),
              "device": str(engine.device), "precision": str(engine.precision).removeprefix("torch."),
              "max_seq_len": engine.model.config.max_seq_len}
    try:
        asyncio.run(warm_up(service, plan["warmup"]))
        if spec["task"] in ("single", "all"):
            result["decode"] = decode_timing(engine, plan["throughput"][0])
            result["decode_bytes"] = decode_step_bytes(engine.model, result["decode"]["mid_position"])
            result.update(asyncio.run(single_stream(service, engine, plan, spec)))
        if spec["task"] == "all":
            result["concurrency"] = {
                str(n): {**asyncio.run(burst(service, engine, plan["throughput"][:n])), "peak_rss_mb": peak_rss_mb()}
                for n in spec["levels"]}
        elif spec["task"] != "single":
            result.update(asyncio.run(burst(service, engine, plan["throughput"][: spec["n"]])))
    finally:
        service.close(engines=True)
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def peak_rss_mb() -> float:
    """This process's peak RSS in MiB. Linux's VmHWM where there is one: `ru_maxrss` also counts the parent's
    peak, which a child inherits across fork and exec."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    import resource

    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


async def warm_up(service, spec: dict) -> None:
    """Through the service, so that its dispatcher thread is started and warm too."""
    from shoal.service import SpeechParams

    await service.synthesize(service.prepare(SpeechParams(**request_fields(spec))))


def request_fields(spec: dict) -> dict:
    keys = ("text", "seed", "temperature", "top_p", "repetition_penalty", "max_new_tokens")
    return {k: spec[k] for k in keys}


def decode_timing(engine, spec: dict) -> dict:
    """Per-frame timing of one request at batch 1, straight through the engine (no codec in the steps)."""
    from shoal.engines.base import SynthesisRequest

    request = SynthesisRequest(**request_fields(spec))
    stamps: list[float] = []
    t0 = time.perf_counter()
    result = engine.run(request, progress=lambda done, total: stamps.append(time.perf_counter()))
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    prompt = engine.build_prompt(spec["text"])
    return {"median_step_s": median(steps), "steps": len(steps), "first_frame_s": stamps[0] - t0,
            "frames": result.frames_generated, "tokens": int(result.codes.shape[1]), "total_s": result.seconds,
            "mid_position": prompt.shape[1] + len(stamps) // 2}


def decode_step_bytes(model, position: int) -> dict:
    """Bytes one decode step reads: every weight of the slow stack and its output head, the fast stack and its
    head once per codebook (fish runs it num_codebooks times per frame), and the embedding rows it looks up;
    plus, separately, the slow KV cache up to `position`. Bytes as stored: int8 weights (SHOAL_QUANTIZE) count
    one byte each, plus their scales."""
    from shoal.fish.quant import weight_bytes

    c = model.config
    size = model.embeddings.weight.element_size()
    head = model.embeddings.weight.numel() * size if c.tie_word_embeddings else weight_bytes(model.output)
    slow = sum(weight_bytes(layer) for layer in model.layers) + weight_bytes(model.norm) + head
    fast_once = (sum(weight_bytes(layer) for layer in model.fast_layers) + weight_bytes(model.fast_norm)
                 + weight_bytes(model.fast_output))
    rows = ((1 + c.num_codebooks) * c.dim + (c.num_codebooks - 1) * c.fast_dim) * size
    weights = slow + weight_bytes(model.fast_project_in) + c.num_codebooks * fast_once + rows
    kv = 2 * c.n_layer * c.n_local_heads * c.head_dim * position * size
    return {"weights": weights, "kv_mid": kv, "element_size": size, "position": position}


async def single_stream(service, engine, plan: dict, spec: dict) -> dict:
    from shoal.service import SpeechParams

    out = {}
    u = plan["utterance"]
    job = service.prepare(SpeechParams(**request_fields(u)))
    samples, first, t0 = 0, None, time.perf_counter()
    codec_frames = engine.stats().codec_frames
    async for chunk in service.stream(job):
        if first is None:
            first = time.perf_counter() - t0
        samples += len(chunk)
    total = time.perf_counter() - t0
    out["utterance"] = {"first_audio_s": first, "total_s": total, "tokens": samples // engine.frame_length,
                        "audio_s": samples / engine.sample_rate,
                        "codec_frames": engine.stats().codec_frames - codec_frames}
    t0 = time.perf_counter()  # the same request unstreamed: what streaming costs on top
    await service.synthesize(service.prepare(SpeechParams(**request_fields(u))))
    out["utterance"]["unstreamed_total_s"] = time.perf_counter() - t0

    v = plan["voice"]
    before = engine.encode_count
    t0 = time.perf_counter()
    service.add_voice(VOICE_ID, Path(spec["voice_clip"]).read_bytes(), v["clip_text"])
    voice = {"save_s": time.perf_counter() - t0, "encodes_at_save": engine.encode_count - before}
    for which in ("first", "second"):
        before = engine.encode_count
        job = service.prepare(SpeechParams(**request_fields(v), voice=VOICE_ID))
        t0 = time.perf_counter()
        audio = await service.synthesize(job)
        voice[f"{which}_request_s"] = time.perf_counter() - t0
        voice[f"encodes_{which}_request"] = engine.encode_count - before
    voice["tokens"] = len(audio) // engine.frame_length
    out["voice"] = voice
    return out


async def burst(service, engine, specs: list[dict]) -> dict:
    import asyncio

    from shoal.service import SpeechParams

    jobs = [service.prepare(SpeechParams(**request_fields(s))) for s in specs]
    t0 = time.perf_counter()

    async def one(job):
        audio = await service.synthesize(job)
        return len(audio), time.perf_counter() - t0

    done = await asyncio.gather(*(one(job) for job in jobs))
    wall = time.perf_counter() - t0
    tokens = [samples // engine.frame_length for samples, _ in done]
    audio_s = sum(samples for samples, _ in done) / engine.sample_rate
    return {"wall_s": wall, "tokens": sum(tokens), "audio_s": audio_s, "tokens_per_s": sum(tokens) / wall,
            "audio_s_per_s": audio_s / wall, "per_request_tokens": tokens,
            "latencies_s": [latency for _, latency in done]}


def write_full_size(directory: str, seed: str, model: str = "s1") -> None:
    from shoal.testing import write_full_size_checkpoint, write_full_size_s2_checkpoint

    (write_full_size_s2_checkpoint if model == "s2" else write_full_size_checkpoint)(directory, int(seed))


def main(argv: list[str]) -> int:
    command, rest = (argv[0], argv[1:]) if argv else ("", [])
    if command == "worker" and len(rest) == 2:
        return worker_main(*rest)
    if command == "bandwidth" and len(rest) in (1, 2):
        size = int(rest[0]) * 2**20
        print(json.dumps(measure_bandwidth(size) if rest[1:] in ([], ["cpu"]) else
                         measure_device_bandwidth(size, rest[1])))
        return 0
    if command == "write-full-size" and len(rest) in (2, 3):
        write_full_size(*rest)
        return 0
    print("internal entry points of `shoal bench`: worker SPEC OUT | bandwidth MIB [DEVICE] | write-full-size DIR SEED [MODEL]; "
          "run `shoal bench` instead", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
