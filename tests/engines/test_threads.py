"""The thread layout the README documents: one engine thread runs torch, with SHOAL_TORCH_THREADS intra-op threads,
and OpenMP workers that sleep between parallel regions unless the environment asks otherwise. Each check runs in a
fresh interpreter, because torch's thread settings are process-wide and OpenMP reads its environment once."""

from __future__ import annotations

import json
import os
import subprocess
import sys

PROBE = r"""
import json, os, sys, threading
import shoal  # first, as the CLI and the Python API import it
import numpy
import torch
from shoal.compose import build_service
from shoal.service import SpeechParams
from shoal.settings import Settings

env = dict(a.split("=", 1) for a in sys.argv[3:])
settings = Settings.load({"checkpoint": sys.argv[1], "lite_voice": False, "data_dir": sys.argv[2]}, env=env)
service = build_service(settings, warm_up=True)
fish = service.engines.get("fish")
flush, seen = fish.scheduler.after_step, set()

def watched_flush():
    seen.add(threading.current_thread().name)
    flush()

fish.scheduler.after_step = watched_flush
encode, encoded = fish._encode, set()

def watched_encode(audio):
    encoded.add(threading.current_thread().name)
    return encode(audio)

fish._encode = watched_encode
service.run(service.prepare(SpeechParams(text="Hi.", seed=1, max_new_tokens=4)))
fish.encode_audio(numpy.zeros(44100, "float32"))  # as saving a voice does, from this thread
print(json.dumps({"engine_threads": fish.scheduler.call(torch.get_num_threads), "step_threads": sorted(seen),
                  "encode_threads": sorted(encoded),
                  "main_threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}))
service.close(engines=True)
"""


def probe(fixture_dir, tmp_path, env_extra: dict, settings_env: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    args = [sys.executable, "-c", PROBE, str(fixture_dir), str(tmp_path)] + [f"{k}={v}" for k, v in settings_env.items()]
    out = subprocess.run(args, env={**env, **env_extra}, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_engine_thread_runs_the_steps_with_the_configured_torch_threads(fixture_dir, tmp_path):
    found = probe(fixture_dir, tmp_path, {}, {"SHOAL_TORCH_THREADS": "1"})
    assert found["step_threads"] == ["shoal-engine"]  # decode steps and the codec stage after them
    assert found["encode_threads"] == ["shoal-engine"]  # a reference encode asked for from another thread
    assert found["engine_threads"] == 1
    assert found["omp_wait_policy"] == "PASSIVE"


def test_an_explicit_openmp_wait_policy_is_kept(fixture_dir, tmp_path):
    found = probe(fixture_dir, tmp_path, {"OMP_WAIT_POLICY": "ACTIVE"}, {})
    assert found["omp_wait_policy"] == "ACTIVE"
    assert found["engine_threads"] == found["main_threads"] >= 1  # torch's default (one per core)
