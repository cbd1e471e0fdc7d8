"""`shoal cluster config` and deploy/kuberay/rayservice.yaml: the Serve config they hold is what shoal's settings
say, and Ray's own schema accepts it. Ray is needed only for the schema checks (skipped, with the reason, when it
cannot be imported); nothing here starts Ray."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from shoal.cluster_config import (DOWNSCALE_DELAY_S, ENGINE_DEPLOYMENT, IMPORT_PATH, INGRESS_DEPLOYMENT,
                                  INGRESS_MIN_ONGOING, UPSCALE_DELAY_S, Replicas, build_config, render)
from shoal.errors import BadRequest
from shoal.settings import Settings
from support import shoal

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
RAYSERVICE = REPO / "deploy" / "kuberay" / "rayservice.yaml"
#: The layout of deploy/kuberay/rayservice.yaml, as the command line that wrote its serveConfigV2.
KUBERAY_FLAGS = ("--checkpoint", "/data/checkpoints/openaudio-s1-mini", "--data-dir", "/data", "--min-replicas", "1",
                 "--max-replicas", "4", "--gpus-per-replica", "1", "--cpus-per-replica", "4")


def settings(env: dict[str, str] | None = None, **cli) -> Settings:
    return Settings.load(cli=cli, env=env or {}, dotenv=None)


def app(config: dict) -> dict:
    (application,) = config["applications"]
    return application


def deployments(config: dict) -> dict[str, dict]:
    return {d["name"]: d for d in app(config)["deployments"]}


def validate(config: dict):
    """Ray's own check of a `serve deploy` config, and of each autoscaling config in it."""
    schema = pytest.importorskip("ray.serve.schema", reason="ray[serve] is not installed (pip install -e '.[test]')")
    from ray.serve.config import AutoscalingConfig

    parse = getattr(schema.ServeDeploySchema, "model_validate", None) or schema.ServeDeploySchema.parse_obj
    parsed = parse(config)
    for deployment in app(config)["deployments"]:
        if "autoscaling_config" in deployment:
            AutoscalingConfig(**deployment["autoscaling_config"])
    return parsed


def cli(*args: str, tmp_path: Path, env: dict[str, str] | None = None):
    """`shoal cluster ARGS` in an empty folder, away from this machine's SHOAL_* settings and .env."""
    return shoal("cluster", *args, cwd=tmp_path, drop=("SHOAL_",), env=env, timeout=120)


# --- the writer ------------------------------------------------------------------------------------------------


def test_the_engine_options_come_from_the_queue_and_batch_settings():
    config = build_config(settings(checkpoint="/models/s1", data_dir="/shared",
                                   env={"SHOAL_QUEUE_SIZE": "24", "SHOAL_MAX_BATCH_SIZE": "8"}),
                          Replicas.parse("auto", 2, 6))
    assert config["proxy_location"] == "EveryNode"
    assert config["http_options"] == {"host": "0.0.0.0", "port": 8000}
    application = app(config)
    assert application["import_path"] == IMPORT_PATH == "shoal.cluster:build_app"
    assert application["route_prefix"] == "/"
    assert application["args"] == {"checkpoint": "/models/s1", "data_dir": "/shared", "queue_size": 24,
                                   "max_batch_size": 8}
    engine, ingress = deployments(config)[ENGINE_DEPLOYMENT], deployments(config)[INGRESS_DEPLOYMENT]
    assert engine["max_ongoing_requests"] == 24
    assert "num_replicas" not in engine
    assert engine["autoscaling_config"] == {"min_replicas": 2, "initial_replicas": 2, "max_replicas": 6,
                                            "target_ongoing_requests": 7, "upscale_delay_s": UPSCALE_DELAY_S,
                                            "downscale_delay_s": DOWNSCALE_DELAY_S}
    assert engine["ray_actor_options"] == {"num_cpus": 1, "num_gpus": 1}
    assert engine["graceful_shutdown_timeout_s"] == 30.0
    assert ingress["num_replicas"] == 1 and ingress["ray_actor_options"] == {"num_cpus": 0, "num_gpus": 0}
    assert ingress["max_ongoing_requests"] == max(INGRESS_MIN_ONGOING, 24 * 6 * 4)  # every engine queue, and more
    bigger = build_config(settings(env={"SHOAL_QUEUE_SIZE": "64"}), Replicas.parse("auto", 1, 8))
    assert deployments(bigger)[INGRESS_DEPLOYMENT]["max_ongoing_requests"] == 64 * 8 * 4
    validate(config)


def test_a_fixed_replica_count_on_cpus():
    config = build_config(settings(device="cpu", data_dir="/d", env={"SHOAL_TORCH_THREADS": "2"}),
                          Replicas.parse("2"))
    engine = deployments(config)[ENGINE_DEPLOYMENT]
    assert engine["num_replicas"] == 2 and "autoscaling_config" not in engine
    assert engine["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 0}  # SHOAL_DEVICE=cpu: no GPU asked for
    assert app(config)["args"] == {"device": "cpu", "torch_threads": 2, "data_dir": "/d", "queue_size": 16,
                                   "max_batch_size": 4}
    validate(config)


def test_args_hold_what_was_set_and_never_the_api_key_nor_the_address():
    config = build_config(settings(data_dir="/d", host="10.0.0.1", port=9000,
                                   env={"SHOAL_API_KEY": "sekrit", "SHOAL_MODEL_MAP": "s2-pro=s1",
                                        "SHOAL_EXTRA_CHECKPOINTS": "/a,/b", "SHOAL_UI": "false"}))
    args = app(config)["args"]
    assert args == {"extra_checkpoints": ["/a", "/b"], "data_dir": "/d", "ui": False, "queue_size": 16,
                    "max_batch_size": 4, "model_map": {"s2-pro": "s1"}}
    assert config["http_options"] == {"host": "10.0.0.1", "port": 9000}
    assert "sekrit" not in render(config)
    validate(config)


@pytest.mark.parametrize("queue, batch, target", [("2", "8", 2), ("16", "1", 1), ("16", "2", 1)])
def test_the_target_is_under_a_full_batch_never_zero_nor_above_the_cap(queue, batch, target):
    config = build_config(settings(env={"SHOAL_QUEUE_SIZE": queue, "SHOAL_MAX_BATCH_SIZE": batch}))
    engine = deployments(config)[ENGINE_DEPLOYMENT]
    assert engine["max_ongoing_requests"] == int(queue)
    assert engine["autoscaling_config"]["target_ongoing_requests"] == target
    validate(config)


@pytest.mark.parametrize("replicas, low, high, message", [
    ("0", None, None, "--replicas must be at least 1"),
    ("two", None, None, "--replicas must be a whole number or auto"),
    ("2", 1, None, "go with --replicas auto"),
    ("auto", 3, 2, "--min-replicas (3) is more than --max-replicas (2)"),
    ("auto", -1, None, "--min-replicas must be 0 or more"),
    ("auto", None, 0, "--max-replicas must be at least 1"),
])
def test_bad_replica_options_are_refused(replicas, low, high, message):
    with pytest.raises(BadRequest, match=message.replace("(", r"\(").replace(")", r"\)")):
        Replicas.parse(replicas, low, high)


def test_gpus_with_a_cpu_device_are_refused():
    with pytest.raises(BadRequest, match="SHOAL_DEVICE is cpu"):
        build_config(settings(device="cpu"), gpus_per_replica=1)
    with pytest.raises(BadRequest, match="--gpus-per-replica must be 0 or more"):
        build_config(settings(), gpus_per_replica=-1)


def test_the_writer_does_not_import_ray():
    import subprocess

    code = ("import sys; from shoal.cluster_config import build_config, render; from shoal.settings import Settings; "
            "render(build_config(Settings.load(env={}, dotenv=None))); assert 'ray' not in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


# --- the command -----------------------------------------------------------------------------------------------


def test_the_command_writes_the_file(tmp_path):
    out = tmp_path / "serve.yaml"
    proc = cli("config", "--checkpoint", "/models/s1", "--data-dir", "/shared", "--replicas", "3", "-o", str(out),
               tmp_path=tmp_path, env={"SHOAL_QUEUE_SIZE": "12"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "" and f"wrote {out}" in proc.stderr
    text = out.read_text()
    assert text.startswith("# Ray Serve config for shoal")
    config = yaml.safe_load(text)
    assert config == build_config(settings(checkpoint="/models/s1", data_dir="/shared",
                                           env={"SHOAL_QUEUE_SIZE": "12"}), Replicas.parse("3"))
    assert deployments(config)[ENGINE_DEPLOYMENT]["max_ongoing_requests"] == 12
    assert [p.name for p in tmp_path.iterdir()] == ["serve.yaml"]  # no temporary left beside it
    validate(config)


def test_the_command_reads_dotenv_and_prints_to_stdout(tmp_path):
    (tmp_path / ".env").write_text("SHOAL_MAX_BATCH_SIZE=6\nSHOAL_DATA_DIR=/from-dotenv\n")
    proc = cli("config", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    config = yaml.safe_load(proc.stdout)
    assert app(config)["args"]["data_dir"] == "/from-dotenv"
    assert deployments(config)[ENGINE_DEPLOYMENT]["autoscaling_config"]["target_ongoing_requests"] == 5


def test_no_data_dir_is_a_note(tmp_path):
    proc = cli("config", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "shoal: note: no --data-dir" in proc.stderr
    assert "data_dir" not in app(yaml.safe_load(proc.stdout))["args"]


@pytest.mark.parametrize("args, code, message", [
    (("--replicas", "0"), 2, "--replicas must be at least 1, not 0"),
    (("--min-replicas", "3", "--max-replicas", "2"), 2, "--min-replicas (3) is more than --max-replicas (2)"),
    (("--port", "0"), 2, "--port must be between 1 and 65535"),
    (("-o", "{tmp}/missing/serve.yaml"), 3, "directory {tmp}/missing does not exist"),
    (("-o", "{tmp}"), 2, "cannot write {tmp}"),
])
def test_bad_input_is_one_line_and_an_exit_code(tmp_path, args, code, message):
    proc = cli("config", *(a.format(tmp=tmp_path) for a in args), tmp_path=tmp_path)
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("shoal: error: "), proc.stderr
    assert message.format(tmp=tmp_path) in lines[0]
    assert proc.stdout == ""


def test_a_bad_setting_in_the_environment_is_one_line(tmp_path):
    proc = cli("config", tmp_path=tmp_path, env={"SHOAL_QUEUE_SIZE": "0"})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "SHOAL_QUEUE_SIZE" in proc.stderr


# --- the KubeRay example ---------------------------------------------------------------------------------------


def kuberay() -> dict[str, dict]:
    documents = [d for d in yaml.safe_load_all(RAYSERVICE.read_text()) if d]
    return {d["kind"]: d for d in documents}


def test_the_rayservice_has_its_parts():
    docs = kuberay()
    pvc = docs["PersistentVolumeClaim"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    service = docs["RayService"]
    assert service["apiVersion"] == "ray.io/v1"
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    head = cluster["headGroupSpec"]["template"]["spec"]
    (group,) = cluster["workerGroupSpecs"]
    worker = group["template"]["spec"]
    assert 1 <= group["minReplicas"] <= group["maxReplicas"]
    (worker_container,) = worker["containers"]
    assert worker_container["resources"]["limits"]["nvidia.com/gpu"] == 1
    for pod in (head, worker):
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
                  if "persistentVolumeClaim" in v}
        assert claims == {"shoal-data": pvc["metadata"]["name"]}
        for container in pod["containers"]:
            mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
            env = {e["name"]: e.get("value") for e in container["env"]}
            assert mounts["shoal-data"] == env["SHOAL_DATA_DIR"] == "/data"
            assert mounts["dshm"] == "/dev/shm"
    (init,) = head["initContainers"]
    assert init["command"][:2] == ["shoal", "download"]
    token = next(e for e in init["env"] if e["name"] == "HF_TOKEN")
    assert "secretKeyRef" in token["valueFrom"]
    # The serve config fits the worker group: one engine replica per GPU worker.
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    engine = deployments(config)[ENGINE_DEPLOYMENT]
    assert engine["ray_actor_options"]["num_gpus"] == worker_container["resources"]["limits"]["nvidia.com/gpu"]
    assert engine["autoscaling_config"]["max_replicas"] <= group["maxReplicas"]
    assert app(config)["args"]["checkpoint"] == init["command"][-1]
    assert "SHOAL_API_KEY" not in service["spec"]["serveConfigV2"]


def test_the_rayservice_serve_config_is_what_the_command_writes(tmp_path):
    proc = cli("config", *KUBERAY_FLAGS, tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load(kuberay()["RayService"]["spec"]["serveConfigV2"]) == yaml.safe_load(proc.stdout)


def test_the_rayservice_serve_config_validates_against_ray_s_schema():
    config = yaml.safe_load(kuberay()["RayService"]["spec"]["serveConfigV2"])
    parsed = validate(config)
    assert [a.import_path for a in parsed.applications] == [IMPORT_PATH]
