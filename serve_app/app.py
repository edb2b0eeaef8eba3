"""The Serve application: an ``entrance`` deployment in front of ``stage-0`` ... ``stage-{N-1}``.

``build_app`` is the application builder (``import_path: serve_app.app:build_app`` in a Serve config, with
:class:`AppArgs` as ``args``); :func:`cluster.deploy.serve_config` writes such a config for ``serve deploy``.
"""

# No ``from __future__ import annotations``: Serve reads build_app's annotation to turn ``args`` into AppArgs.

import math
import os
import re
from typing import Any

import ray
from pydantic import BaseModel, ConfigDict, Field
from ray.serve import Application

from partitions.plan import Plan
from partitions.storage import read_plan
from serve_app.config import EntranceConfig, StageConfig
from serve_app.entrance import Entrance
from serve_app.names import ENTRANCE, stage_name
from serve_app.retry import RetryPolicy
from serve_app.serve_types import as_deployment
from serve_app.stage import StageDeployment
from serve_app.transport import BY_VALUE_MAX_BYTES

STAGE_MAX_ONGOING = 64
"""Requests (batches the entrance formed) a stage replica holds at once unless ``max_ongoing_requests`` says."""


class AppArgs(BaseModel):
    """Arguments of :func:`build_app`."""

    model_config = ConfigDict(extra="forbid")

    plan_uri: str
    """Plan directory: a local path or an s3://, gs://, hdfs:// URI readable from every node."""
    model_name: str | None = None
    """Name in ``/v2/models/{name}``; default: derived from the plan's model spec."""
    max_batch_size: int | None = Field(default=None, ge=1)
    """Samples per batch the entrance sends through the pipeline; default: the plan's batch size."""
    batch_wait_timeout_s: float | None = Field(default=None, ge=0)
    """Seconds a request waits at the entrance for others to fill its batch while the pipeline is busy (an
    idle pipeline takes it at once); default: the slowest stage's planned time for a batch, which a
    waiting batch could not start any sooner than."""
    max_concurrent_batches: int | None = Field(default=None, ge=1)
    """Batches each entrance replica keeps in the pipeline at once; default: :func:`in_flight_batches`, one
    per stage replica (at ``max_replicas``) that a device can run at the same time, plus one in transit."""
    torch_threads: int | None = Field(default=None, ge=1)
    """Intra-op threads of each stage replica on CPU; default: Ray's (one per reserved CPU, at least one),
    which lets stages run side by side on the cores."""
    stage_max_batch_size: int | None = Field(default=None, ge=1)
    """Samples a stage replica runs at once, merging what is waiting for it; default: 4 x max_batch_size."""
    entrance_replicas: int = Field(default=1, ge=1)
    cache_bytes: int = Field(default=0, ge=0)
    """Size of the entrance's result cache in bytes (0: off): repeated inputs skip the pipeline."""
    max_body_bytes: int = Field(default=64 * 2**20, ge=1)
    """Largest accepted HTTP request body, in bytes (larger: 413)."""
    max_inflight_bytes: int | None = Field(default=None, ge=1)
    """Bytes the requests in flight at an entrance replica may hold at once (bodies while read and decoded,
    then their tensors until answered); more: 503 with ``Retry-After``, so memory stays flat under overload.
    Default: 4 x max_body_bytes (256 MiB). At least ``max_body_bytes``."""
    by_value_max_bytes: int = Field(default=BY_VALUE_MAX_BYTES, ge=0)
    """Batches whose largest message between stages is estimated at most this many bytes travel by value over
    Serve's replica-to-replica gRPC, larger ones by reference through Ray's object store (0: all by
    reference; see :mod:`serve_app.transport`)."""
    request_timeout_s: float = Field(default=60.0, gt=0)
    """The deadline of a request, in seconds from its arrival at the entrance; clients may ask for less
    (header ``X-Request-Timeout-Ms``, OIP parameter ``timeout_ms``). Past it the caller gets 503 with
    ``Retry-After`` (504 for a deadline the client set; handle callers :class:`serve_app.retry.DeadlineExceeded`)
    and its batch leaves the pipeline. Serve's proxy timeout (:func:`proxy_timeout_s`) is set above it."""
    stage_hang_timeout_s: float | None = Field(default=None, gt=0)
    """A stage batch still running after this many seconds fails its replica's health check, and Serve
    replaces the replica; default: 2 x request_timeout_s, when no caller waits for it any more."""
    health_check_period_s: float | None = Field(default=None, gt=0)
    """Seconds between Serve's health checks of each stage replica (3 failures in a row replace it);
    default: Serve's (10 s)."""
    gpus: bool = False
    """Reserve GPUs: each stage replica asks for its planned ``gpu_fraction`` of one GPU."""
    num_gpus_per_stage: float | None = Field(default=None, ge=0)
    """With ``gpus``: the same GPU share for every stage instead of the planned fractions."""
    num_cpus: float = Field(default=1.0, ge=0)
    """CPUs reserved per replica (entrance and stages)."""
    max_ongoing_requests: int | None = Field(default=None, ge=1)
    """Requests (batches) per stage replica at once; default: :data:`STAGE_MAX_ONGOING`."""
    entrance_max_ongoing_requests: int = Field(default=256, ge=1)
    """Requests the entrance keeps in flight through the pipeline."""
    entrance_max_queued_requests: int = Field(default=256, ge=1)
    """Requests waiting for an entrance replica at each HTTP proxy or handle; more: HTTP 503 with
    ``Retry-After`` (``BackPressureError`` for handle callers)."""
    max_queued_requests: int | None = Field(default=None, ge=1)
    """Stage calls waiting for a stage replica at each entrance replica; more: the request answers 503
    (:class:`serve_app.retry.Unavailable`). Default: ``entrance_max_ongoing_requests``, so the entrance's own
    bound governs and this one only guards against a stage that stops answering."""
    retry_after_s: float = Field(default=1.0, ge=0)
    """``Retry-After`` of 503 answers, in seconds (rounded up to whole seconds on the wire)."""
    retry_attempts: int = Field(default=4, ge=1)
    """Tries of a request whose stage replica died under it (1: no retry), with backoff between tries."""
    access_log: bool = False
    """Serve's access log line per request at the entrance and every stage; off by default, as writing it
    costs CPU time on every request's path."""
    auth_token_file: str | None = None
    """File holding the bearer token HTTP clients must send (else ``$PARTSERVE_TOKEN``; neither: no auth);
    see :mod:`serve_app.auth`."""
    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=1, ge=1)


PROXY_TIMEOUT_MARGIN_S = 10.0
"""Seconds Serve's proxy waits past the request deadline before it gives up itself (HTTP 408)."""


def proxy_timeout_s(args: AppArgs) -> float:
    """Serve's proxy ``request_timeout_s`` for ``args``: after the deadline, so that a late request gets
    the entrance's 503 or 504 with a body rather than the proxy's 408."""
    return args.request_timeout_s + PROXY_TIMEOUT_MARGIN_S


def default_model_name(plan: Plan) -> str:
    """``demo-mlp`` for a zoo spec; the last path or module component, URL-safe, for the others."""
    last = re.split(r"[/:\\]", str(plan.model["spec"]).rstrip("/"))[-1]
    return re.sub(r"[^A-Za-z0-9_.-]", "_", last) or "model"


def in_flight_batches(stage_replicas: int, devices: int) -> int:
    """Batches to keep in a pipeline whose ``stage_replicas`` replicas (all stages together) run on
    ``devices`` devices at once (GPUs, or CPU cores over threads per replica): one per replica that can
    run at the same time, and one moving between stages. More only splits the same requests into smaller
    batches that contend for the devices."""
    return min(stage_replicas, max(devices, 1)) + 1


def parallel_devices(plan: Plan, args: AppArgs) -> int:
    """Devices the stage replicas can run on at once: the GPUs their shares fill at ``max_replicas``
    (``args.gpus``), else the cluster's CPU cores over each replica's torch threads."""
    if args.gpus:
        share = args.num_gpus_per_stage
        shares = sum(share if share is not None else s.gpu_fraction for s in plan.stages)
        return math.ceil(shares * args.max_replicas - 1e-9)
    cores = int(ray.cluster_resources().get("CPU", 1)) if ray.is_initialized() else os.cpu_count() or 1
    return cores // (args.torch_threads or 1)


def batch_wait_s(plan: Plan, args: AppArgs) -> float:
    """``args.batch_wait_timeout_s``, or the slowest stage's planned time at the entrance's batch size."""
    if args.batch_wait_timeout_s is not None:
        return args.batch_wait_timeout_s
    batch = args.max_batch_size or plan.serve_batch_size
    return max(s.run_ms for s in plan.stages) * batch / plan.batch_size / 1e3


def deployment_options(plan: Plan, args: AppArgs) -> dict[str, dict[str, Any]]:
    """Serve options per deployment name: ``ray_actor_options`` (num_cpus; num_gpus from the plan's
    ``gpu_fraction`` when ``args.gpus``), ``logging_config`` (the access log), ``max_ongoing_requests``,
    ``max_queued_requests`` (with the entrance's ``backpressure_config``: Serve's proxy answers 503 with
    ``Retry-After``), ``autoscaling_config`` and the stages' ``health_check_period_s`` when set."""
    scaling = {"min_replicas": args.min_replicas, "max_replicas": args.max_replicas}
    logging = {"enable_access_log": args.access_log}
    options = {
        ENTRANCE: {
            "ray_actor_options": {"num_cpus": args.num_cpus},
            "logging_config": logging,
            "max_ongoing_requests": args.entrance_max_ongoing_requests,
            "max_queued_requests": args.entrance_max_queued_requests,
            "backpressure_config": {"status_code": 503, "retry_after_s": args.retry_after_s},
            "num_replicas": args.entrance_replicas,
        }
    }
    for stage in plan.stages:
        actor: dict[str, float] = {"num_cpus": args.num_cpus}
        if args.gpus:
            actor["num_gpus"] = args.num_gpus_per_stage if args.num_gpus_per_stage is not None else stage.gpu_fraction
        options[stage_name(stage.index)] = {
            "ray_actor_options": actor,
            "logging_config": logging,
            "max_ongoing_requests": args.max_ongoing_requests or STAGE_MAX_ONGOING,
            "max_queued_requests": args.max_queued_requests or args.entrance_max_ongoing_requests,
            "autoscaling_config": scaling,
        }
        if args.health_check_period_s is not None:
            options[stage_name(stage.index)]["health_check_period_s"] = args.health_check_period_s
    return options


def entrance_config(plan: Plan, args: AppArgs) -> EntranceConfig:
    """The entrance's config: ``args`` with their defaults resolved against ``plan``."""
    return EntranceConfig(
        plan_uri=args.plan_uri,
        model_name=args.model_name or default_model_name(plan),
        max_body_bytes=args.max_body_bytes,
        max_batch_size=args.max_batch_size or plan.serve_batch_size,
        batch_wait_timeout_s=batch_wait_s(plan, args),
        max_concurrent_batches=args.max_concurrent_batches
        or in_flight_batches(len(plan.stages) * args.max_replicas, parallel_devices(plan, args)),
        cache_bytes=args.cache_bytes,
        retry=RetryPolicy(attempts=args.retry_attempts, retry_after_s=args.retry_after_s),
        auth_token_file=args.auth_token_file,
        request_timeout_s=args.request_timeout_s,
        max_inflight_bytes=args.max_inflight_bytes,
        by_value_max_bytes=args.by_value_max_bytes,
    )


def stage_config(plan: Plan, args: AppArgs, index: int) -> StageConfig:
    """Stage ``index``'s config: ``args`` with their defaults resolved against ``plan``. A replica takes what
    is waiting for it (no wait: the entrance already formed the batches), up to ``stage_max_batch_size``."""
    return StageConfig(
        plan_uri=args.plan_uri,
        index=index,
        max_batch_size=args.stage_max_batch_size or 4 * (args.max_batch_size or plan.serve_batch_size),
        batch_wait_timeout_s=0.0,
        torch_threads=args.torch_threads,
        max_batch_s=args.stage_hang_timeout_s or 2 * args.request_timeout_s,
    )


def build_app(args: AppArgs) -> Application:
    """The application for ``args``; reads plan.json (not the shards) from ``args.plan_uri``."""
    plan = read_plan(args.plan_uri)
    options = deployment_options(plan, args)
    stages = [
        as_deployment(StageDeployment)
        .options(name=stage_name(s.index), **options[stage_name(s.index)])
        .bind(stage_config(plan, args, s.index))
        for s in plan.stages
    ]
    return as_deployment(Entrance).options(name=ENTRANCE, **options[ENTRANCE]).bind(stages, entrance_config(plan, args))
