"""`shoal.cluster:build_app`, the import path of `serve run` and of Serve configs: shoal settings in, the two
deployments configured from them out (no Ray instance needed)."""

from __future__ import annotations

import pytest

from shoal.errors import BadRequest

pytestmark = pytest.mark.cluster


def engine_deployment(app):
    ingress = app._bound_deployment
    return ingress, ingress.init_args[0]._bound_deployment


def test_a_fixed_number_of_replicas_with_the_queue_as_the_cap(tmp_path):
    from shoal.cluster import build_app

    app = build_app({"checkpoint": str(tmp_path), "data_dir": str(tmp_path), "replicas": "2", "device": "cpu",
                     "queue_size": "7", "torch_threads": "1"})
    ingress, engine = engine_deployment(app)
    assert (ingress.name, engine.name) == ("ShoalIngress", "ShoalEngine")
    assert engine.num_replicas == 2 and engine.max_ongoing_requests == 7
    assert engine.ray_actor_options == {"num_cpus": 1, "num_gpus": 0}


def test_auto_scales_one_to_two_cpu_replicas_before_a_batch_is_full(tmp_path):
    from shoal.cluster import build_app

    app = build_app({"checkpoint": str(tmp_path), "data_dir": str(tmp_path), "device": "cpu",
                     "max_batch_size": 8})
    _, engine = engine_deployment(app)
    scaling = engine._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas, scaling.target_ongoing_requests) == (1, 2, 7)


@pytest.mark.parametrize("replicas", ["0", "-2"])
def test_replicas_must_be_positive(tmp_path, replicas):
    from shoal.cluster import build_app

    with pytest.raises(BadRequest, match="replicas"):
        build_app({"checkpoint": str(tmp_path), "data_dir": str(tmp_path), "replicas": replicas})
