"""`shoal bench --replicas 1,2`: shoal on Ray Serve beside the plain server, on one checkpoint, one machine, one run.

Each configuration is a `shoal serve` of its own, started one after another, with one torch thread per engine:
the plain server first, then `shoal serve --replicas N` for each N. Each gets the same requests:

- **first byte**: `FIRST_BYTE_REQUESTS` streamed `POST /v1/tts`, one at a time, each timed to its first audio
  byte past the WAV header. The cluster's median minus the plain server's is what Serve adds (proxy, ingress,
  a `DeploymentHandle` stream from the replica);
- **aggregate throughput**: `concurrency` requests at once (seeds THROUGHPUT_SEED + i, so every configuration
  does the same work), `THROUGHPUT_ROUNDS` times; audio seconds produced per wall second, the median round.
  Each request's audio is compared with the plain server's: the same bytes mean the same work was done;
- **what one ingress carries**: the CPU seconds that Serve's HTTP proxy and shoal's ingress (the FastAPI app and
  its relay of the replicas' audio) spent over the throughput rounds, per request.

The figures are ratios within this run (N replicas against 1, the cluster against the plain server), so a busy
machine shifts both sides. The report goes to `bench/results/<date>-<label>-replicas.md` and `.json`.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import hashlib
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

#: Sequential streamed requests per configuration for the first-byte figure (after the warm-up).
FIRST_BYTE_REQUESTS = 12
FIRST_BYTE_TOKENS = 16
THROUGHPUT_ROUNDS = 3
THROUGHPUT_SEED = 100
DEFAULT_CONCURRENCY = 16
#: How long a configuration may take to come up: a local Ray, then each replica loading the checkpoint.
START_TIMEOUT_SECONDS = 600.0
REQUEST_TIMEOUT_SECONDS = 3600.0
#: Each engine gets one torch thread, so that N replicas use N cores.
ONE_THREAD = {"SHOAL_TORCH_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def progress(message: str) -> None:
    print(f"bench --replicas: {message}", file=sys.stderr, flush=True)


def parse_replicas(text: str) -> list[int]:
    """`1,2` → [1, 2]; ValueError with the reason otherwise."""
    try:
        counts = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise ValueError(f"--replicas must be comma-separated whole numbers, got {text!r}") from None
    if not counts or counts[0] < 1:
        raise ValueError("--replicas needs at least one count, each at least 1")
    return counts


def wait_for_replicas(url: str, count: int, timeout: float) -> None:
    """Until the ingress's /v1/health shows `count` engine replicas RUNNING."""
    import httpx

    deadline = time.monotonic() + timeout
    state = None
    while time.monotonic() < deadline:
        try:
            cluster = httpx.get(f"{url}/v1/health", timeout=5).json().get("cluster") or {}
            state = (cluster.get("deployment") or {}).get("replica_states", {})
            if state.get("RUNNING", 0) >= count:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{count} engine replicas were not running after {timeout:g} s (last state: {state})")


def tts(client, model: str, body: dict) -> bytes:
    response = client.post("/v1/tts", json=body, headers={"model": model})
    if response.status_code != 200:
        raise RuntimeError(f"POST /v1/tts answered {response.status_code}: {response.text[:300]}")
    return response.content


def wav_seconds(data: bytes) -> float:
    import soundfile as sf

    info = sf.info(io.BytesIO(data))
    return info.frames / info.samplerate


def burst(url: str, model: str, bodies: list[dict]) -> dict:
    """All `bodies` at once; wall time, audio seconds, and a digest of each request's audio."""
    import httpx

    with httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT_SECONDS,
                      limits=httpx.Limits(max_connections=len(bodies))) as client:
        with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
            t0 = time.perf_counter()
            audio = list(pool.map(lambda body: tts(client, model, body), bodies))
            wall = time.perf_counter() - t0
    seconds = sum(wav_seconds(a) for a in audio)
    digests = [hashlib.sha256(a).hexdigest()[:16] for a in audio]
    return {"wall_s": wall, "audio_s": seconds, "audio_s_per_s": seconds / wall, "digests": digests}


def serve_processes(pid: int) -> dict:
    """Serve's HTTP proxy and shoal's ingress among the processes of the `shoal serve` at `pid` (Ray names its
    workers after the actor they hold: `ray::ServeReplica:shoal:ShoalIngress`, `ray::ProxyActor`)."""
    import psutil

    from shoal.cluster_config import INGRESS_DEPLOYMENT

    found = {}
    for process in psutil.Process(pid).children(recursive=True):
        try:
            title = " ".join(process.cmdline())
        except psutil.Error:
            continue
        for role, mark in (("ingress", INGRESS_DEPLOYMENT), ("proxy", "ProxyActor")):
            if mark in title:
                found[role] = process
    return found


def cpu_seconds(processes: dict) -> dict[str, float]:
    return {role: sum(process.cpu_times()[:2]) for role, process in processes.items()}


def measure(url: str, model: str, options: dict, replicas: int, pid: int | None = None) -> dict:
    """Warm-up, then the first-byte series and the throughput rounds on one running configuration; with the pid
    of a cluster's `shoal serve`, the CPU its proxy and ingress spent over the rounds."""
    from shoal.bench import TEXTS
    from shoal.bench_live import http_first_audio

    tokens, concurrency = options["tokens"], options["cluster_concurrency"]
    # Not streamed: a one-shot decode gives the same bytes whatever the timing (a streamed one is decoded in chunks
    # that timing decides, equal only to float rounding), so the audio can be compared across configurations.
    bodies = [{"text": TEXTS[i % len(TEXTS)], "seed": THROUGHPUT_SEED + i, "max_new_tokens": tokens,
               "format": "wav", "streaming": False} for i in range(concurrency)]
    short = {"text": TEXTS[0], "seed": 1, "max_new_tokens": FIRST_BYTE_TOKENS, "format": "wav"}
    progress("warming up every engine (one burst, then a few streams)")
    burst(url, model, bodies[:max(2, 2 * replicas)])
    for _ in range(3):
        http_first_audio(url, model, short)
    progress(f"first byte: {FIRST_BYTE_REQUESTS} streamed requests, one at a time")
    first = [http_first_audio(url, model, short) for _ in range(FIRST_BYTE_REQUESTS)]
    processes = serve_processes(pid) if pid is not None else {}
    cpu_before = cpu_seconds(processes)
    rounds = []
    for r in range(THROUGHPUT_ROUNDS):
        progress(f"throughput: round {r + 1}/{THROUGHPUT_ROUNDS}, {concurrency} requests at once")
        rounds.append(burst(url, model, bodies))
    requests = THROUGHPUT_ROUNDS * concurrency
    cpu_per_request = {role: (used - cpu_before[role]) / requests for role, used in cpu_seconds(processes).items()}
    best = statistics.median(x["audio_s_per_s"] for x in rounds)
    return {"first_byte_s": first, "first_byte_p50_s": statistics.median(first), "rounds": rounds,
            "audio_s_per_s": best, "cpu_s_per_request": cpu_per_request}


def run_configuration(checkpoint: Path, root: Path, model: str, options: dict, replicas: int | None) -> dict:
    """One `shoal serve` (`replicas` None: the plain server), measured, then stopped."""
    from shoal.testing import Server

    extra = ["--device", options["device"], "--precision", options["precision"], "--no-ui"]
    if options["max_batch_size"]:
        extra += ["--max-batch-size", str(options["max_batch_size"])]
    if replicas is not None:
        extra += ["--replicas", str(replicas)]
    name = "plain" if replicas is None else f"replicas-{replicas}"
    progress(f"starting {name}")
    t0 = time.perf_counter()
    with Server(checkpoint, root / name, *extra, env=ONE_THREAD) as server:
        server.start(timeout=START_TIMEOUT_SECONDS)
        if replicas is not None:
            wait_for_replicas(server.url, replicas, START_TIMEOUT_SECONDS)
        ready = time.perf_counter() - t0
        figures = measure(server.url, model, options, replicas or 1,
                          server.proc.pid if replicas is not None else None)
    return {"name": name, "replicas": replicas, "ready_s": ready, **figures}


def run_cluster_bench(options: dict, checkpoint: dict) -> dict:
    from shoal.cluster_config import NEEDS_RAY
    from shoal.layout import MODEL_NAMES

    try:
        import ray  # noqa: F401  (only to fail early: the configurations import it in their own processes)
    except ImportError:
        raise RuntimeError(f"--replicas {NEEDS_RAY}") from None
    model = MODEL_NAMES[options["model"]]
    started = datetime.datetime.now().astimezone()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="shoal-bench-replicas-") as tmp:
        runs = [run_configuration(Path(checkpoint["path"]), Path(tmp), model, options, None)]
        runs += [run_configuration(Path(checkpoint["path"]), Path(tmp), model, options, n)
                 for n in options["replicas"]]
    load_after = os.getloadavg()
    plain = runs[0]
    by_count = {run["replicas"]: run for run in runs[1:]}
    base = by_count.get(1)
    for run in runs:
        run["throughput_vs_plain"] = run["audio_s_per_s"] / plain["audio_s_per_s"]
        run["throughput_vs_one_replica"] = run["audio_s_per_s"] / base["audio_s_per_s"] if base else None
        run["first_byte_added_ms"] = (run["first_byte_p50_s"] - plain["first_byte_p50_s"]) * 1000
        run["same_audio_as_plain"] = sum(mine == theirs for r, p in zip(run["rounds"], plain["rounds"])
                                         for mine, theirs in zip(r["digests"], p["digests"]))
    return {
        "kind": "replicas",
        "label": options["label"],
        "started": started.isoformat(timespec="seconds"),
        "checkpoint": checkpoint,
        "device": options["device"], "precision": options["precision"],
        "max_new_tokens": options["tokens"], "concurrency": options["cluster_concurrency"],
        "cpus": os.cpu_count(),
        "load_average": {"before": load_before, "after": load_after},
        "runs": runs,
    }


def render_cluster_markdown(report: dict) -> str:
    lines = [
        f"# shoal bench --replicas: {report['label']}",
        "",
        f"{report['started']} · {report['checkpoint']['description']} · {report['device']} {report['precision']} · "
        f"{report['cpus']} CPUs · one torch thread per engine · max_new_tokens {report['max_new_tokens']} · "
        f"load average {report['load_average']['before'][0]:.2f} → {report['load_average']['after'][0]:.2f}",
        "",
        f"Throughput: {report['concurrency']} requests at once, {THROUGHPUT_ROUNDS} rounds, the median round's audio "
        f"seconds per wall second. First byte: {FIRST_BYTE_REQUESTS} streamed requests one at a time "
        f"({FIRST_BYTE_TOKENS} tokens), time to the first audio byte.",
        "",
        "| configuration | ready | throughput (audio s/s) | × 1 replica | × plain | first byte p50 | added by Serve | "
        "requests with the plain server's audio | CPU per request: proxy, ingress |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for run in report["runs"]:
        vs_one = f"{run['throughput_vs_one_replica']:.2f}×" if run["throughput_vs_one_replica"] else "–"
        added = "–" if run["replicas"] is None else f"{run['first_byte_added_ms']:+.0f} ms"
        lines.append(f"| {run['name']} | {run['ready_s']:.0f} s | {run['audio_s_per_s']:.2f} | {vs_one} | "
                     f"{run['throughput_vs_plain']:.2f}× | {run['first_byte_p50_s'] * 1000:.0f} ms | {added} | "
                     f"{run['same_audio_as_plain']} of {report['concurrency'] * THROUGHPUT_ROUNDS} | {cpu_cell(run)} |")
    lines += ["", "Rounds (audio s/s) and first-byte series (ms), per configuration:", ""]
    for run in report["runs"]:
        lines.append(f"- {run['name']}: " + ", ".join(f"{r['audio_s_per_s']:.2f}" for r in run["rounds"])
                     + "; " + ", ".join(f"{t * 1000:.0f}" for t in run["first_byte_s"]))
    return "\n".join(lines) + "\n"


def cpu_cell(run: dict) -> str:
    cpu = run["cpu_s_per_request"]
    if not cpu:
        return "–"
    return ", ".join(f"{cpu[role] * 1000:.0f} ms" if role in cpu else "not found" for role in ("proxy", "ingress"))


def write_cluster_report(report: dict, out: Path) -> Path:
    from shoal.bench import write_text

    stem = out / f"{report['started'][:10]}-{report['label']}-replicas"
    write_text(stem.with_suffix(".json"), json.dumps(report, indent=2) + "\n")
    write_text(stem.with_suffix(".md"), render_cluster_markdown(report))
    return stem
