"""A KubeRay RayService (``apiVersion: ray.io/v1``) for a plan: the Serve config plus the pods it needs.

* ``spec.serveConfigV2``: the Serve config :func:`cluster.deploy.serve_config` writes (as a YAML string), with
  ``args.plan_uri`` where the cluster reads the plan, the application's ``runtime_env`` when given and,
  with co-location groups, each stage's ``label_selector`` (:mod:`cluster.placement`).
* Head group: ``num-cpus: "0"``, so no replica runs on it (only the Serve controller and proxy).
* GPU worker groups (one GPU per pod): one for all stages, or one per co-location group, labelled for its
  stages' selectors. Pods = the stage replicas' GPU shares packed onto whole GPUs (first-fit decreasing),
  at the replicas' minimum (``minReplicas``) and maximum (``maxReplicas``); ``--gpu-budget`` caps the GPUs of
  all groups together, keeping the replicas that maximise the pipeline's bottleneck rate.
* A CPU worker group for the entrance.
* ``enableInTreeAutoscaling: true`` (autoscaler v2): replicas Serve adds bring pods of the group they need.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Any

import ray
import yaml

from cluster.deploy import serve_config
from cluster.errors import check
from cluster.placement import (
    GROUP_LABEL,
    apply_options,
    colocation_groups,
    pack,
    parse_groups,
    placement_options,
)
from cluster.policy import bottleneck_allocation, replica_rate_per_s
from partitions.plan import Plan
from partitions.storage import read_plan
from serve_app.names import ENTRANCE, stage_name

API_VERSION = "ray.io/v1"
RAY_VERSION = ray.__version__
DEFAULT_IMAGE = f"rayproject/ray:{RAY_VERSION}-py{sys.version_info.major}{sys.version_info.minor}-gpu"
"""The image matching this Ray and Python; it needs torch and partserve too (``runtime_env`` or a derived image)."""
GIB = 2**30
SERVE_PORT = 8000


@dataclass(frozen=True)
class ClusterOptions:
    name: str = "partserve"
    namespace: str | None = None
    image: str = DEFAULT_IMAGE
    gpu_budget: int | None = None
    """GPUs for all stage replicas together (whole GPUs, one per pod); None: as many as the replicas need."""
    head_cpus: int = 2
    head_memory_gib: int = 8
    env_secret: str | None = None
    """A Secret whose keys become environment variables of every Ray container (object-store credentials)."""


@dataclass(frozen=True)
class Replicas:
    """What one deployment's replicas reserve, and how many of them run."""

    num_gpus: float
    num_cpus: float
    min: int
    max: int


@dataclass(frozen=True)
class WorkerGroup:
    name: str
    deployments: list[str]
    min_pods: int
    max_pods: int
    cpus: int
    """CPUs per pod."""
    memory_gib: int
    """Memory per pod, GiB."""
    gpus: int = 1
    """GPUs per pod."""
    labels: dict[str, str] = field(default_factory=dict)
    """Ray node labels of the group's pods."""


def replicas_of(config: dict[str, Any]) -> dict[str, Replicas]:
    """Per deployment of the (single) application: reserved GPUs/CPUs and replica bounds."""
    out = {}
    for d in config["applications"][0]["deployments"]:
        actor = d.get("ray_actor_options", {})
        scaling = d.get("autoscaling_config") or {}
        fixed = d.get("num_replicas", 1)
        fixed = 1 if fixed == "auto" else fixed
        out[d["name"]] = Replicas(
            num_gpus=float(actor.get("num_gpus", 0)),
            num_cpus=float(actor.get("num_cpus", 1)),
            min=int(scaling.get("min_replicas", fixed)),
            max=int(scaling.get("max_replicas", fixed)),
        )
    return out


def gpus_needed(groups: list[list[int]], counts: list[int], shares: list[float]) -> int:
    """Whole GPUs for ``counts[i]`` replicas of each stage, packed within each co-location group."""
    return sum(len(pack([shares[i] for i in g for _ in range(counts[i])])) for g in groups)


def max_replicas_within(plan: Plan, replicas: dict[str, Replicas], groups: list[list[int]], budget: int) -> list[int]:
    """Per stage, the most replicas that pack onto ``budget`` GPUs: bottleneck-maximising
    (:func:`cluster.policy.bottleneck_allocation`), the fractional budget lowered until the packing fits."""
    stages = [replicas[stage_name(s.index)] for s in plan.stages]
    lower, upper = [r.min for r in stages], [r.max for r in stages]
    shares = [r.num_gpus for r in stages]
    floor = gpus_needed(groups, lower, shares)
    check(
        floor <= budget,
        f"gpu budget ({budget}) is below the {floor} GPUs the minimum replicas need",
        "raise --gpu-budget or lower --min-replicas",
    )
    rates = [replica_rate_per_s(max(s.cost_ms, 1e-3), plan.batch_size) for s in plan.stages]
    fractional = float(budget)
    while True:
        counts = bottleneck_allocation(lower, upper, rates, shares, fractional)
        if gpus_needed(groups, counts, shares) <= budget:
            return counts
        fractional = sum(n * g for n, g in zip(counts, shares)) - 0.01


def worker_groups(
    plan: Plan, replicas: dict[str, Replicas], groups: list[list[int]] | None, budget: int | None
) -> list[WorkerGroup]:
    """GPU groups (all stages in ``gpu``, or ``gpu-g{i}`` per co-location group) and the ``cpu`` group."""
    labelled = groups is not None
    if groups is None:
        groups = [[s.index for s in plan.stages]]
    stages = [replicas[stage_name(s.index)] for s in plan.stages]
    bad = [stage_name(i) for i, r in enumerate(stages) if r.num_gpus <= 0]
    check(not bad, f"deployments {bad} reserve no GPU", "serve with gpus=True (do not set num_gpus_per_stage=0)")
    shares = [r.num_gpus for r in stages]
    top = [r.max for r in stages] if budget is None else max_replicas_within(plan, replicas, groups, budget)
    out = []
    for g, members in enumerate(groups):
        bins = pack([shares[i] for i in members for _ in range(top[i])])
        per_gpu = max(len(b) for b in bins)
        heaviest = max(plan.stages[i].memory_bytes for i in members)
        out.append(
            WorkerGroup(
                name=f"gpu-g{g}" if labelled else "gpu",
                deployments=[stage_name(i) for i in members],
                min_pods=gpus_needed([members], [r.min for r in stages], shares),
                max_pods=len(bins),
                cpus=math.ceil(per_gpu * max(stages[i].num_cpus for i in members)) + 1,
                memory_gib=4 + math.ceil(2 * per_gpu * heaviest / GIB),
                labels={GROUP_LABEL: str(g)} if labelled else {},
            )
        )
    entrance = replicas[ENTRANCE]
    out.append(
        WorkerGroup(
            name="cpu",
            deployments=[ENTRANCE],
            min_pods=entrance.min,
            max_pods=entrance.max,
            cpus=math.ceil(entrance.num_cpus) + 1,
            memory_gib=4,
            gpus=0,
        )
    )
    return out


def _container(
    name: str,
    image: str,
    cpus: int,
    memory_gib: int,
    gpus: int,
    options: ClusterOptions,
    ports: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    amounts = {"cpu": str(cpus), "memory": f"{memory_gib}Gi", **({"nvidia.com/gpu": str(gpus)} if gpus else {})}
    container: dict[str, Any] = {"name": name, "image": image, "resources": {"limits": amounts, "requests": amounts}}
    if ports:
        container["ports"] = ports
    if options.env_secret:
        container["envFrom"] = [{"secretRef": {"name": options.env_secret}}]
    return container


def _worker_spec(group: WorkerGroup, options: ClusterOptions) -> dict[str, Any]:
    pod: dict[str, Any] = {
        "containers": [_container("ray-worker", options.image, group.cpus, group.memory_gib, group.gpus, options)]
    }
    if group.gpus:
        pod["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    spec: dict[str, Any] = {
        "groupName": group.name,
        "replicas": group.min_pods,
        "minReplicas": group.min_pods,
        "maxReplicas": group.max_pods,
        "rayStartParams": {},
        "template": {"spec": pod},
    }
    if group.labels:
        spec["labels"] = dict(group.labels)
    return spec


def rayservice(config: dict[str, Any], groups: list[WorkerGroup], options: ClusterOptions) -> dict[str, Any]:
    """The RayService manifest serving ``config`` on pods of ``groups``."""
    ports = [
        {"containerPort": 6379, "name": "gcs-server"},
        {"containerPort": 8265, "name": "dashboard"},
        {"containerPort": 10001, "name": "client"},
        {"containerPort": SERVE_PORT, "name": "serve"},
    ]
    head = _container("ray-head", options.image, options.head_cpus, options.head_memory_gib, 0, options, ports)
    metadata: dict[str, Any] = {"name": options.name, "labels": {"app.kubernetes.io/name": "partserve"}}
    if options.namespace:
        metadata["namespace"] = options.namespace
    return {
        "apiVersion": API_VERSION,
        "kind": "RayService",
        "metadata": metadata,
        "spec": {
            "upgradeStrategy": {"type": "NewCluster"},
            "serveConfigV2": dump(config),
            "rayClusterConfig": {
                "rayVersion": RAY_VERSION,
                "enableInTreeAutoscaling": True,
                "autoscalerOptions": {"version": "v2", "upscalingMode": "Default", "idleTimeoutSeconds": 60},
                "headGroupSpec": {
                    "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
                    "template": {"spec": {"containers": [head]}},
                },
                "workerGroupSpecs": [_worker_spec(g, options) for g in groups],
            },
        },
    }


def cluster_config(
    config: dict[str, Any],
    groups: list[list[int]] | None,
    runtime_env: dict[str, Any] | None,
) -> dict[str, Any]:
    """The Serve config as the cluster runs it: ``runtime_env`` and the co-location selectors added;
    everything else as ``config`` has it."""
    out = apply_options(config, placement_options(groups) if groups is not None else {})
    app = out["applications"][0]
    if runtime_env:
        app["runtime_env"] = runtime_env
    return out


class _Dumper(yaml.SafeDumper):
    """Block strings for multi-line text; no anchors (shared dicts are written out each time)."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _text(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_Dumper.add_representer(str, _text)


def dump(data: Any) -> str:
    """``data`` as YAML, keys in insertion order."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, width=120)


def generate(
    plan_dir: str,
    plan_uri: str | None = None,
    *,
    colocate: str = "none",
    runtime_env: dict[str, Any] | None = None,
    options: ClusterOptions = ClusterOptions(),
    **serve_args: Any,
) -> tuple[dict[str, Any], list[WorkerGroup]]:
    """The RayService for the plan in ``plan_dir`` (read here), served from ``plan_uri`` (default ``plan_dir``).

    ``colocate``: ``none`` (one GPU group), ``auto`` (:func:`cluster.placement.colocation_groups`) or groups
    like ``0+1,2``. ``serve_args``: :func:`cluster.deploy.serve_config` arguments; ``gpus`` defaults to True.
    """
    plan = read_plan(plan_dir)
    config = serve_config(
        plan_dir,
        plan_uri=plan_uri,
        **{"gpus": True, "autoscale": True, "gpu_budget": options.gpu_budget, **serve_args},
    )
    if colocate == "none":
        groups = None
    elif colocate == "auto":
        groups = colocation_groups(plan)
    else:
        groups = parse_groups(colocate, len(plan.stages))
    config = cluster_config(config, groups, runtime_env)
    pools = worker_groups(plan, replicas_of(config), groups, options.gpu_budget)
    return rayservice(config, pools, options), pools
