"""Load and soak against a live server on loopback: bench/soak.py's quick plan (SHOAL_LOAD_FULL=1: the full one).

The driver is imported from bench/soak.py, so the figures in bench/results and these checks cannot drift. Only
correctness is asserted here (statuses, liveness, bounded memory, freed slots); timed targets such as health p99
are printed and recorded by `python bench/soak.py --full`, never asserted.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.load

SOAK_PATH = Path(__file__).resolve().parents[2] / "bench" / "soak.py"


def _driver():
    name = "shoal_bench_soak"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, SOAK_PATH)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the file executes
        spec.loader.exec_module(module)
    return sys.modules[name]


soak = _driver()
PLAN = soak.FULL if os.environ.get("SHOAL_LOAD_FULL") == "1" else soak.QUICK
ALLOWED = {str(code) for code in soak.ALLOWED}


@pytest.fixture(scope="module")
def scenario(tiny_checkpoint, tmp_path_factory):
    """Run one scenario against a server of its own; print its figures (pytest -s or -rP shows them)."""
    root = tmp_path_factory.mktemp("load")

    def run(name: str) -> dict:
        result = soak.run_scenario(name, tiny_checkpoint, root, PLAN)
        shown = {k: v for k, v in result.items() if k not in ("rss_over_time", "by_endpoint")}
        print(f"\n[{PLAN.label}] {name}: {json.dumps(shown, default=str)}")
        return result

    return run


def test_concurrency_statuses_and_health_liveness(scenario):
    r = scenario("concurrency")
    h = r["health"]
    print(f"health p50/p99/max {h['p50_ms']}/{h['p99_ms']}/{h['max_ms']} ms over {h['n']} polls "
          f"(target p99 < {h['p99_target_ms']:g} ms, not asserted); statuses {r['statuses']}")
    assert set(r["statuses"]) <= ALLOWED and not r["unexpected"], r["unexpected"]
    assert r["missing_retry_after"] == 0, "a 429 came without Retry-After"
    assert r["transport_error_count"] == 0, r["transport_errors"]
    assert r["statuses"].get("200", 0) > 0, "nothing succeeded under load"
    # Liveness, not speed: every poll answered with 200, each within the plan's generous bound.
    assert h["n"] >= 10 and h["failure_count"] == 0, h["failures"]
    assert h["max_ms"] < PLAN.health_timeout_s * 1000
    assert r["drained"]["idle"], "rows or queue slots still taken after the clients stopped"
    assert r["server_alive"]
    assert not r["server_log_errors"], r["server_log_errors"]


def test_memory_stays_bounded(scenario):
    r = scenario("memory")
    print(f"RSS {r['rss_before'] / 2**20:.1f} -> {r['rss_after'] / 2**20:.1f} MiB ({r['growth_pct']} %) over "
          f"{r['requests']} requests; samples " + ", ".join(f"{s['rss'] / 2**20:.0f}" for s in r["rss_over_time"]))
    assert not r["mismatches"], r["mismatches"]
    assert r["growth_pct"] < soak.RSS_GROWTH_LIMIT_PCT, r["rss_over_time"]
    assert r["idle_at_end"]
    assert r["server_alive"]
    assert not r["server_log_errors"], r["server_log_errors"]


def test_disconnects_free_every_slot(scenario):
    r = scenario("disconnects")
    q = r["queued"]
    print(f"after the first chunk: free {r['free_seconds']} s after the last disconnect, "
          f"{r['frames_per_request']} frames per request; given up while queued: free {q['free_seconds']} s, "
          f"{q['frames_per_request']} frames per request")
    assert set(r["statuses"]) <= ALLOWED and not r["unexpected"] and not r["errors"], (r["statuses"], r["errors"])
    assert r["statuses"].get("200", 0) > 0
    assert r["missing_retry_after"] == 0
    assert r["freed"], f"in_flight {r['in_flight_after']}, queue_depth {r['queue_depth_after']} after " \
                       f"{r['free_timeout_s']} s"
    assert r["in_flight_after"] == 0 and r["queue_depth_after"] == 0
    # Clients that give up before their first chunk: no errors, and everything is free in the end (how long
    # that takes is a recorded figure: see bench/results/*-load.md).
    assert not q["unexpected"] and not q["errors"], q["errors"]
    assert q["freed"], f"in_flight {q['in_flight_after']}, queue_depth {q['queue_depth_after']}"
    assert r["server_alive"]
    assert not r["server_log_errors"], r["server_log_errors"]
