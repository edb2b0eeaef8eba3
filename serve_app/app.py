"""The Serve application: an ``entrance`` deployment in front of ``stage-0`` ... ``stage-{N-1}``.

``build_app`` is the application builder (``import_path: serve_app.app:build_app`` in a Serve config, with
:class:`AppArgs` as ``args``); ``serve_config`` writes such a config for ``serve deploy`` / ``serve run``.
"""

# No ``from __future__ import annotations``: Serve reads build_app's annotation to turn ``args`` into AppArgs.

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from ray.serve import Application

from partitions.artifacts import read_plan
from partitions.plan import Plan
from serve_app.entrance import Entrance
from serve_app.stage import StageDeployment

IMPORT_PATH = "serve_app.app:build_app"
ENTRANCE = "entrance"


def stage_name(index: int) -> str:
    return f"stage-{index}"


class AppArgs(BaseModel):
    """Arguments of :func:`build_app`."""

    model_config = ConfigDict(extra="forbid")

    plan_uri: str
    """Plan directory: a local path or an s3://, gs://, hdfs:// URI readable from every node."""
    model_name: str | None = None
    """Name in ``/v2/models/{name}``; default: derived from the plan's model spec."""
    max_batch_size: int | None = Field(None, ge=1)
    """Samples per batch the entrance sends through the pipeline; default: the plan's batch size."""
    batch_wait_timeout_s: float = Field(0.005, ge=0)
    """Seconds a batch (at the entrance and at each stage) waits for more requests after its first."""
    max_concurrent_batches: int | None = Field(None, ge=1)
    """Batches each entrance replica keeps in the pipeline at once; default: stages + 1, so every stage
    has work while the next batch forms."""
    entrance_replicas: int = Field(1, ge=1)
    cache_bytes: int = Field(0, ge=0)
    """Size of the entrance's result cache in bytes (0: off): repeated inputs skip the pipeline."""
    max_body_bytes: int = Field(64 * 2**20, ge=1)
    """Largest accepted HTTP request body, in bytes (larger: 413)."""
    gpus: bool = False
    """Reserve GPUs: each stage replica asks for its planned ``gpu_fraction`` of one GPU."""
    num_gpus_per_stage: float | None = Field(None, ge=0)
    """With ``gpus``: the same GPU share for every stage instead of the planned fractions."""
    num_cpus: float = Field(1.0, ge=0)
    """CPUs reserved per replica (entrance and stages)."""
    max_ongoing_requests: int | None = Field(None, ge=1)
    """Per stage replica; default: twice ``max_batch_size`` (one batch running, the next one forming)."""
    entrance_max_ongoing_requests: int = Field(256, ge=1)
    """Requests the entrance keeps in flight through the pipeline."""
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)


def default_model_name(plan: Plan) -> str:
    """``demo-mlp`` for a zoo spec; the last path or module component, URL-safe, for the others."""
    last = re.split(r"[/:\\]", str(plan.model["spec"]).rstrip("/"))[-1]
    return re.sub(r"[^A-Za-z0-9_.-]", "_", last) or "model"


def deployment_options(plan: Plan, args: AppArgs) -> dict[str, dict[str, Any]]:
    """Serve options per deployment name: ``ray_actor_options`` (num_cpus; num_gpus from the plan's
    ``gpu_fraction`` when ``args.gpus``), ``max_ongoing_requests`` and ``autoscaling_config``."""
    batch = args.max_batch_size or plan.batch_size
    scaling = {"min_replicas": args.min_replicas, "max_replicas": args.max_replicas}
    options = {
        ENTRANCE: {
            "ray_actor_options": {"num_cpus": args.num_cpus},
            "max_ongoing_requests": args.entrance_max_ongoing_requests,
            "num_replicas": args.entrance_replicas,
        }
    }
    for stage in plan.stages:
        actor: dict[str, float] = {"num_cpus": args.num_cpus}
        if args.gpus:
            actor["num_gpus"] = args.num_gpus_per_stage if args.num_gpus_per_stage is not None else stage.gpu_fraction
        options[stage_name(stage.index)] = {
            "ray_actor_options": actor,
            "max_ongoing_requests": args.max_ongoing_requests or 2 * batch,
            "autoscaling_config": scaling,
        }
    return options


def build_app(args: AppArgs) -> Application:
    """The application for ``args``; reads plan.json (not the shards) from ``args.plan_uri``."""
    plan = read_plan(args.plan_uri)
    options = deployment_options(plan, args)
    batch = args.max_batch_size or plan.batch_size
    stages = [
        StageDeployment.options(name=stage_name(s.index), **options[stage_name(s.index)]).bind(
            args.plan_uri, s.index, batch, args.batch_wait_timeout_s
        )
        for s in plan.stages
    ]
    model_name = args.model_name or default_model_name(plan)
    return Entrance.options(name=ENTRANCE, **options[ENTRANCE]).bind(
        stages,
        args.plan_uri,
        model_name,
        args.max_body_bytes,
        batch,
        args.batch_wait_timeout_s,
        args.max_concurrent_batches or len(plan.stages) + 1,
        args.cache_bytes,
    )


def pipeline_policy(plan: Plan, args: AppArgs, gpu_budget: float | None = None) -> dict[str, Any]:
    """The coordinated autoscaling policy (:mod:`cluster.serve_policy`) for this plan's stage deployments,
    starting from the profiled stage times."""
    from cluster.serve_policy import policy_section

    batch = args.max_batch_size or plan.batch_size
    stages = [
        {
            "name": stage_name(s.index),
            "service_ms": max(s.measured_ms * batch / plan.batch_size, 1e-3),
            "batch_size": batch,
            "gpu_fraction": s.gpu_fraction if args.gpus else 0.0,
            "min_replicas": args.min_replicas,
            "max_replicas": args.max_replicas,
        }
        for s in plan.stages
    ]
    return policy_section(stages, gpu_budget)


def serve_config(
    plan_uri: str,
    *,
    app_name: str = "partserve",
    route_prefix: str = "/",
    host: str = "0.0.0.0",
    port: int = 8000,
    autoscaling_policy: dict[str, Any] | None = None,
    **args: Any,
) -> dict[str, Any]:
    """A Serve config (the dict behind ``serve deploy config.yaml``) for the plan at ``plan_uri``.

    ``args`` are further :class:`AppArgs` fields (``gpus=True``, ``max_replicas=4``, ...). The per-deployment
    options are written out as well so they can be edited in the file. ``autoscaling_policy``
    (``{"policy_function": "module:callable", "policy_kwargs": {...}}``) is the application-level policy,
    which Serve only takes from the config; it overrides the deployments' own policies.
    """
    app_args = AppArgs(plan_uri=plan_uri, **args)
    plan = read_plan(plan_uri)
    options = deployment_options(plan, app_args)
    if autoscaling_policy is not None:
        for stage in plan.stages:  # the application policy's own delays govern, not Serve's defaults
            options[stage_name(stage.index)]["autoscaling_config"].update(upscale_delay_s=0, downscale_delay_s=0)
    app: dict[str, Any] = {
        "name": app_name,
        "route_prefix": route_prefix,
        "import_path": IMPORT_PATH,
        "args": app_args.model_dump(exclude_defaults=True),
        "deployments": [{"name": name, **opts} for name, opts in options.items()],
    }
    if autoscaling_policy is not None:
        app["autoscaling_policy"] = autoscaling_policy
    return {"proxy_location": "EveryNode", "http_options": {"host": host, "port": port}, "applications": [app]}
