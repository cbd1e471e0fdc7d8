"""One local Ray and one Serve application for the whole session: 2 CPU engine replicas of the tiny checkpoint,
one torch thread each, behind the shoal ingress on a free port."""

from __future__ import annotations

import pytest

from shoal.testing import free_port

from support import wait_healthy

ray = pytest.importorskip("ray", reason="the cluster tests need shoal[cluster]")


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
        wait_healthy(url)
        yield {"url": url, "settings": settings, "data_dir": data_dir}
    finally:
        serve.shutdown()
        ray.shutdown()
