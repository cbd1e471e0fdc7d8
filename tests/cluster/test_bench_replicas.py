"""`shoal bench --replicas` as a user runs it: the plain server, then `shoal serve --replicas 1`, each a real
subprocess, the table and JSON written. It runs while the session's Ray is up, so it also shows that
`shoal serve --replicas` starts a Ray of its own instead of joining another one on the machine (joining would
fail: a Ray that is already running takes no object store size)."""

from __future__ import annotations

import json

import pytest

from support import shoal

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def test_bench_replicas_writes_its_table_and_json(cluster, fixture_dir, tmp_path):
    proc = shoal("bench", "--quick", "--fixture", str(fixture_dir), "--replicas", "1", "--concurrency", "2",
                 "--tokens", "8", "--out", str(tmp_path), timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [md] = tmp_path.glob("*-quick-replicas.md")
    [js] = tmp_path.glob("*-quick-replicas.json")
    report = json.loads(js.read_text())
    plain, one = report["runs"]
    assert (plain["replicas"], one["replicas"]) == (None, 1)
    for run in (plain, one):
        assert run["audio_s_per_s"] > 0 and len(run["first_byte_s"]) > 0 and min(run["first_byte_s"]) > 0
        assert all(len(r["digests"]) == 2 for r in run["rounds"])
    # every seeded request sounds the same through Serve as through the plain server
    assert one["same_audio_as_plain"] == 2 * len(one["rounds"])
    assert one["throughput_vs_one_replica"] == 1.0
    # what one ingress carries: Serve's proxy and shoal's ingress were found and their CPU counted
    assert set(one["cpu_s_per_request"]) == {"proxy", "ingress"} and min(one["cpu_s_per_request"].values()) > 0
    assert plain["cpu_s_per_request"] == {}
    assert "| replicas-1 |" in md.read_text() and "| plain |" in md.read_text()
