"""`shoal cluster config`: a Ray Serve config file (the `serve deploy` format) for shoal's cluster application.

Pure Python, Ray-free: a dict built from shoal's settings and the replica options, written with yaml.safe_dump.
The file names `shoal.cluster:build_app` as its import path and passes shoal's settings to it as `args`; its
`deployments` entries set each deployment's options, which override the ones in the code:

- the engine (`ShoalEngine`): one replica per device; `max_ongoing_requests` = SHOAL_QUEUE_SIZE (the cap a
  single shoal server has before its 429), the autoscaling target one under SHOAL_MAX_BATCH_SIZE (scaling starts
  before the replicas' batches fill and their queues grow), a GPU per replica unless SHOAL_DEVICE is cpu;
- the ingress (`ShoalIngress`): one replica holding the FastAPI app, with room for every engine replica's queue
  several times over (idle live WebSockets, health checks, UI pages; Ray's default of 5 would throttle open
  streams).

`engine_options` and `ingress_options` are plain dicts that shoal.cluster's `application()` passes to
serve.deployment as keyword arguments, so `shoal serve --replicas` and a deployed config never disagree.

Paths (checkpoint, data dir) are written as given: they are paths on the cluster's nodes, not checked here.
The API key is never written into the file: give the cluster SHOAL_API_KEY in its environment (a Secret).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from shoal.errors import BadRequest

IMPORT_PATH = "shoal.cluster:build_app"
#: What every entry point into the cluster mode says when Ray Serve is not installed.
NEEDS_RAY = "needs Ray Serve: install shoal[cluster] (pip install 'shoal[cluster]')"
APP_NAME = "shoal"
ENGINE_DEPLOYMENT = "ShoalEngine"
INGRESS_DEPLOYMENT = "ShoalIngress"
#: Serve's proxy port convention (KubeRay's serve Service points there); `--port` or SHOAL_PORT overrides it.
DEFAULT_SERVE_PORT = 8000
DEFAULT_MAX_REPLICAS = 4
#: Seconds of load above the target before a replica is added: short, since a TTS peak is short-lived.
UPSCALE_DELAY_S = 5.0
#: Seconds of load below the target before a replica is removed: longer, since a new replica reloads the model.
DOWNSCALE_DELAY_S = 120.0
HEALTH_CHECK_PERIOD_S = 10.0
#: Serve's own access log is off: the ingress writes shoal's (`shoal.access`, one line per request), and the
#: engine replicas' calls (a stream, a stats poll every few seconds) would only repeat it.
LOGGING = {"enable_access_log": False}
#: The ingress's smallest max_ongoing_requests: open streams, idle live WebSockets, health checks, UI pages.
INGRESS_MIN_ONGOING = 1000
#: Settings that are not shoal.cluster:build_app's args: the listening address is Serve's http_options, and the
#: API key is a secret that belongs in the cluster's environment, not in a config file.
NOT_ARGS = ("host", "port", "api_key")
#: Settings always written into args, so that the deployment options and the engine agree on them.
ALWAYS_ARGS = ("queue_size", "max_batch_size")


@dataclass(frozen=True)
class Replicas:
    """A fixed number of engine replicas (`count`), or autoscaling between `minimum` and `maximum`."""

    count: int | None = None
    minimum: int = 1
    maximum: int = DEFAULT_MAX_REPLICAS

    @classmethod
    def parse(cls, replicas: str | int | None, minimum: int | None = None, maximum: int | None = None) -> "Replicas":
        """`--replicas N|auto` (default auto) with `--min-replicas`/`--max-replicas`; BadRequest on bad input."""
        text = "auto" if replicas is None else str(replicas).strip().lower()
        if text != "auto":
            try:
                count = int(text)
            except ValueError:
                raise BadRequest(f"--replicas must be a whole number or auto, not {replicas!r}") from None
            if count < 1:
                raise BadRequest(f"--replicas must be at least 1, not {count}")
            if minimum is not None or maximum is not None:
                raise BadRequest("--min-replicas and --max-replicas go with --replicas auto, not a fixed count")
            return cls(count=count)
        low = 1 if minimum is None else minimum
        high = max(DEFAULT_MAX_REPLICAS, low) if maximum is None else maximum
        if low < 0:
            raise BadRequest(f"--min-replicas must be 0 or more, not {low}")
        if high < 1:
            raise BadRequest(f"--max-replicas must be at least 1, not {high}")
        if low > high:
            raise BadRequest(f"--min-replicas ({low}) is more than --max-replicas ({high})")
        return cls(minimum=low, maximum=high)

    @property
    def most(self) -> int:
        return self.count if self.count is not None else self.maximum


def settings_args(settings) -> dict[str, Any]:
    """shoal's settings as build_app's args: every setting that was set (flag, SHOAL_* variable or .env), plus
    ALWAYS_ARGS; values as plain YAML (paths as strings). Defaults are left to the cluster's own environment."""
    args: dict[str, Any] = {}
    for name in type(settings).model_fields:
        if name in NOT_ARGS or (name not in ALWAYS_ARGS and settings.source(name) == "default"):
            continue
        value = getattr(settings, name)
        if value is None:
            continue
        args[name] = _plain(value)
    return args


def notes(settings) -> list[str]:
    """What the user should know about a config built from these settings (one line each, for stderr)."""
    found = []
    if settings.source("data_dir") == "default":
        found.append("no --data-dir (SHOAL_DATA_DIR) given: each node uses its own default data dir, so replicas "
                     "on different nodes do not share voices; give a directory every node mounts")
    if settings.api_key is not None:
        found.append("SHOAL_API_KEY is not written into the config; give it to the cluster's nodes in their "
                     "environment")
    return found


def _plain(value: Any) -> Any:
    if isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)  # Path


def build_config(settings, replicas: Replicas | None = None, *, gpus_per_replica: float | None = None,
                 cpus_per_replica: float | None = None, host: str | None = None, port: int | None = None,
                 route_prefix: str = "/") -> dict[str, Any]:
    """The Serve config (ServeDeploySchema's shape) for shoal's settings and these replica options.

    `gpus_per_replica` defaults to 1, or 0 when SHOAL_DEVICE is cpu; `cpus_per_replica` to SHOAL_TORCH_THREADS,
    else 1. `host` defaults to SHOAL_HOST when it was set, else 0.0.0.0 (every interface of the node); `port` to
    SHOAL_PORT when it was set, else 8000."""
    replicas = replicas or Replicas()
    if gpus_per_replica is None:
        gpus_per_replica = 0 if settings.device == "cpu" else 1
    if not math.isfinite(gpus_per_replica) or gpus_per_replica < 0:
        raise BadRequest(f"--gpus-per-replica must be 0 or more, not {gpus_per_replica}")
    if gpus_per_replica > 0 and settings.device in ("cpu", "mps"):
        raise BadRequest(f"--gpus-per-replica {gpus_per_replica:g} asks for GPUs, but SHOAL_DEVICE is "
                         f"{settings.device}: set it to auto or cuda, or give --gpus-per-replica 0")
    if cpus_per_replica is None:
        cpus_per_replica = settings.torch_threads or 1
    if not math.isfinite(cpus_per_replica) or cpus_per_replica < 0:
        raise BadRequest(f"--cpus-per-replica must be 0 or more, not {cpus_per_replica}")
    if host is None:
        host = settings.host if settings.source("host") != "default" else "0.0.0.0"
    if port is None:
        port = settings.port if settings.source("port") != "default" else DEFAULT_SERVE_PORT
    if not 1 <= port <= 65535:
        raise BadRequest(f"--port must be between 1 and 65535, not {port}")

    engine = engine_options(settings, replicas, gpus=gpus_per_replica, cpus=cpus_per_replica)
    ingress = ingress_options(settings, replicas)
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": host, "port": port},
        "applications": [{
            "name": APP_NAME,
            "route_prefix": route_prefix,
            "import_path": IMPORT_PATH,
            "args": settings_args(settings),
            "deployments": [engine, ingress],
        }],
    }


def autoscaling_target(settings) -> int:
    """Ongoing requests per engine replica that autoscaling aims at: one under a full batch, so that a replica is
    added before the replicas' batches fill and their queues make latency grow; never above the cap."""
    return min(max(1, settings.max_batch_size - 1), settings.queue_size)


def engine_options(settings, replicas: Replicas, *, gpus: float, cpus: float) -> dict[str, Any]:
    """The ShoalEngine deployment's options (a Serve config's `deployments` entry; also serve.deployment's
    keyword arguments)."""
    engine: dict[str, Any] = {"name": ENGINE_DEPLOYMENT, "max_ongoing_requests": settings.queue_size}
    if replicas.count is not None:
        engine["num_replicas"] = replicas.count
    else:
        engine["autoscaling_config"] = {
            "min_replicas": replicas.minimum,
            "initial_replicas": max(replicas.minimum, 1),
            "max_replicas": replicas.maximum,
            "target_ongoing_requests": autoscaling_target(settings),
            "upscale_delay_s": UPSCALE_DELAY_S,
            "downscale_delay_s": DOWNSCALE_DELAY_S,
        }
    engine["health_check_period_s"] = HEALTH_CHECK_PERIOD_S
    # In-flight streams get shoal's own SIGTERM grace before a replica being removed is killed.
    engine["graceful_shutdown_timeout_s"] = float(settings.shutdown_grace)
    engine["ray_actor_options"] = {"num_cpus": _number(cpus), "num_gpus": _number(gpus)}
    engine["logging_config"] = dict(LOGGING)
    return engine


def ingress_options(settings, replicas: Replicas) -> dict[str, Any]:
    """The ShoalIngress deployment's options: one replica, no GPU nor CPU reserved (it holds no model), room for
    every engine replica's queue several times over (idle live WebSockets, health checks, UI pages)."""
    return {"name": INGRESS_DEPLOYMENT, "num_replicas": 1,
            "max_ongoing_requests": max(INGRESS_MIN_ONGOING, settings.queue_size * replicas.most * 4),
            "ray_actor_options": {"num_cpus": 0, "num_gpus": 0}, "logging_config": dict(LOGGING)}


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


HEADER = """\
# Ray Serve config for shoal, written by `shoal cluster config`.
# Deploy it to a running Ray cluster with `serve deploy FILE` (every node needs shoal installed with its
# `cluster` extra, the checkpoint and the data dir at the paths in args), or paste it as a RayService's
# serveConfigV2 (see deploy/kuberay). The deployments' options below override the ones in shoal's code.
"""


def render(config: dict[str, Any]) -> str:
    import yaml

    return HEADER + yaml.safe_dump(config, sort_keys=False, default_flow_style=False)


def write_config(config: dict[str, Any], output: str | None) -> None:
    """Write the YAML to `output` atomically (a half-written config never lands), or to stdout for None/`-`."""
    import sys

    text = render(config)
    if output in (None, "-"):
        sys.stdout.write(text)
        return
    from shoal.files import atomic_write

    with atomic_write(output) as f:
        f.write(text.encode())
