"""The Serve application: `serve run deployments.app:app` or `serve run deployments/config.yaml`.

`app` is an application builder: Serve calls it with the config file's `args` (or the CLI's
`key=value` arguments), and MOLORA_* variables fill whatever the args leave unset
(deployments.config). It resolves the model, the one Redis of the app and the demo assets
(deployments.bootstrap), then binds

    Ingress (FastAPI)  --DeploymentHandle-->  ModelReplica x N  (adapter-affinity request router)
"""

from __future__ import annotations

from ray import serve
from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from deployments.bootstrap import config_args, prepare
from deployments.config import AppConfig
from deployments.ingress import Ingress
from deployments.replica import ModelReplica

ROUTER_CLASS = "deployments.request_router:AdapterAffinityRouter"


def build_app(cfg: AppConfig, *, heartbeat_s: float = 2.0, placement_interval_s: float = 5.0,
              routing_stats_period_s: float = 1.0) -> Application:
    """The application for an already resolved config (see `bootstrap.prepare`)."""
    args = config_args(cfg)
    replica_options = dict(
        ray_actor_options={"num_cpus": cfg.num_cpus_per_replica, "num_gpus": cfg.num_gpus_per_replica},
        # A replica takes its batch plus its engine queue; beyond that, requests wait in the
        # caller's queue of max_queue places, and past that Serve raises BackPressureError, which
        # the ingress answers with 429 + Retry-After instead of queueing without bound.
        max_ongoing_requests=cfg.max_batch + cfg.max_queue,
        max_queued_requests=cfg.max_queue,
        request_router_config=RequestRouterConfig(
            request_router_class=ROUTER_CLASS, request_routing_stats_period_s=routing_stats_period_s,
            request_routing_stats_timeout_s=max(routing_stats_period_s, 5.0),
        ),
        health_check_period_s=5.0,
    )
    if cfg.num_replicas is not None:
        replica_options["num_replicas"] = cfg.num_replicas
    else:
        replica_options["autoscaling_config"] = cfg.autoscaling_config()
    replica = serve.deployment(ModelReplica, name="ModelReplica").options(**replica_options).bind(args, heartbeat_s)
    ingress = serve.deployment(Ingress, name="Ingress").options(
        ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1024,
    )
    return ingress.bind(replica, args, placement_interval_s)


def app(args: dict | None = None) -> Application:
    """Serve's application builder: config args + MOLORA_* environment -> the application."""
    return build_app(prepare(AppConfig.from_sources(args or {})))
