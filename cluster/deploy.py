"""The one builder of Serve deploy configs: ``partserve run``, ``build`` and ``k8s`` and the tests all use it.

``serve_config(plan_dir, plan_uri=...)`` reads plan.json from ``plan_dir`` (where the building machine sees
the plan) and writes ``plan_uri`` (where the cluster's nodes read it; default ``plan_dir``) into the
application's ``args``: the two differ when the plan was uploaded to object storage.

The application section is :func:`app_section`; the config around it adds only the HTTP options (the proxy's
``request_timeout_s`` after the application's request deadline: :func:`serve_app.app.proxy_timeout_s`). What a
command adds on top (``k8s``: ``runtime_env`` and co-location selectors) it adds to this section.
"""

from __future__ import annotations

from typing import Any

from cluster.serve_policy import policy_section
from partitions.plan import Plan
from partitions.storage import read_plan
from serve_app.app import AppArgs, deployment_options, proxy_timeout_s
from serve_app.names import APP_IMPORT_PATH, ENTRANCE, stage_name


def pipeline_policy(plan: Plan, args: AppArgs, gpu_budget: float | None = None) -> dict[str, Any]:
    """The coordinated autoscaling policy (:mod:`cluster.serve_policy`) for this plan's stage deployments.

    A stage request is a batch the entrance formed (``max_batch_size`` samples), so each stage serves one
    request at a time in the policy's terms; its service time starts from the profiled stage time scaled to
    that batch, and follows the replicas' measured time per request."""
    batch = args.max_batch_size or plan.serve_batch_size
    stages = [
        {
            "name": stage_name(s.index),
            "service_ms": max(s.run_ms * batch / plan.batch_size, 1e-3),
            "batch_size": 1,
            "gpu_fraction": s.gpu_fraction if args.gpus else 0.0,
            "min_replicas": args.min_replicas,
            "max_replicas": args.max_replicas,
        }
        for s in plan.stages
    ]
    return policy_section(stages, gpu_budget)


def app_section(
    plan: Plan,
    app_args: AppArgs,
    *,
    app_name: str = "partserve",
    route_prefix: str = "/",
    autoscaling_policy: dict[str, Any] | None = None,
    autoscale: bool = False,
    gpu_budget: float | None = None,
) -> dict[str, Any]:
    """One entry of the config's ``applications``: the import path, the flat ``args`` (as users edit them),
    every deployment's options written out, and the application-level ``autoscaling_policy``.

    ``autoscaling_policy`` (``{"policy_function": "module:callable", "policy_kwargs": {...}}``) overrides the
    deployments' own policies; Serve takes it only from a config. ``autoscale`` without one: the coordinated
    :func:`pipeline_policy` under ``gpu_budget`` GPUs."""
    if autoscale and autoscaling_policy is None:
        autoscaling_policy = pipeline_policy(plan, app_args, gpu_budget)
    options = deployment_options(plan, app_args)
    if autoscaling_policy is not None:
        for stage in plan.stages:  # the application policy's own delays govern, not Serve's defaults
            options[stage_name(stage.index)]["autoscaling_config"].update(upscale_delay_s=0, downscale_delay_s=0)
        # Serve shows a policy (and records custom metrics for) only deployments with an autoscaling_config:
        # the entrance gets one that keeps its replica count, so its arrival counter reaches the policy.
        entrance = options[ENTRANCE]
        replicas = entrance.pop("num_replicas")
        entrance["autoscaling_config"] = {"min_replicas": replicas, "max_replicas": replicas}
    app: dict[str, Any] = {
        "name": app_name,
        "route_prefix": route_prefix,
        "import_path": APP_IMPORT_PATH,
        "args": app_args.model_dump(exclude_defaults=True),
        "deployments": [{"name": name, **opts} for name, opts in options.items()],
    }
    if autoscaling_policy is not None:
        app["autoscaling_policy"] = autoscaling_policy
    return app


def serve_config(
    plan_dir: str,
    *,
    plan_uri: str | None = None,
    app_name: str = "partserve",
    route_prefix: str = "/",
    host: str = "0.0.0.0",
    port: int = 8000,
    autoscaling_policy: dict[str, Any] | None = None,
    autoscale: bool = False,
    gpu_budget: float | None = None,
    **args: Any,
) -> dict[str, Any]:
    """A Serve config (the dict behind ``serve deploy config.yaml``) for the plan in ``plan_dir``, served from
    ``plan_uri`` (default ``plan_dir``).

    ``args`` are further :class:`~serve_app.app.AppArgs` fields (``gpus=True``, ``max_replicas=4``, ...);
    the other keywords as :func:`app_section` takes them."""
    plan = read_plan(plan_dir)
    app_args = AppArgs(plan_uri=plan_uri or plan_dir, **args)
    app = app_section(
        plan,
        app_args,
        app_name=app_name,
        route_prefix=route_prefix,
        autoscaling_policy=autoscaling_policy,
        autoscale=autoscale,
        gpu_budget=gpu_budget,
    )
    http = {"host": host, "port": port, "request_timeout_s": proxy_timeout_s(app_args)}
    return {"proxy_location": "EveryNode", "http_options": http, "applications": [app]}
