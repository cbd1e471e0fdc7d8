"""One local Ray and one Serve application for the whole session: 2 CPU engine replicas of the tiny checkpoint,
one torch thread each, behind the shoal ingress on a free port."""

from __future__ import annotations

import socket
import time

import httpx
import pytest

ray = pytest.importorskip("ray", reason="the cluster tests need shoal[cluster]")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def cluster(tmp_path_factory, tiny_checkpoint):
    from ray import serve

    from shoal import cluster as shoal_cluster
    from shoal.settings import Settings

    data_dir = tmp_path_factory.mktemp("cluster-data")
    port = free_port()
    settings = Settings.load(cli={"checkpoint": tiny_checkpoint, "data_dir": data_dir, "device": "cpu",
                                  "torch_threads": 1, "ui": False, "lite_voice": False, "port": port},
                             env={})
    ray.init(address="local", num_cpus=4, include_dashboard=False,
             object_store_memory=shoal_cluster.LOCAL_OBJECT_STORE_BYTES, namespace="shoal-tests",
             logging_level="WARNING")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(shoal_cluster.application(settings, replicas=2), name=shoal_cluster.APP_NAME, route_prefix="/")
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{url}/v1/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("the cluster did not become healthy in 180 s")
            time.sleep(0.5)
        yield {"url": url, "settings": settings, "data_dir": data_dir}
    finally:
        serve.shutdown()
        ray.shutdown()
