"""Where stage replicas run: co-location groups of adjacent stages and GPU packing. Pure: no Ray, no I/O.

Mechanism: a co-location group ``g`` is a set of nodes labelled ``partserve.io/group=g`` (on Kubernetes: one
KubeRay worker group whose ``labels`` carry it; locally: ``ray start --labels``). Every stage of the group gets
``ray_actor_options.label_selector: {partserve.io/group: g}`` in the Serve config, so its replicas only land
on the group's nodes and the hand-offs inside the group stay on those nodes. Serve spreads replicas over the
nodes that qualify; GPU shares (``num_gpus``, fractional) pack replicas onto a node's GPUs as Ray accounts
them: two replicas asking 0.6 never share one GPU. Serve places replicas of different deployments
independently, so a group of several nodes keeps the group's stages on the group's nodes, not each pair on
one node; give a group exactly as many nodes as its GPUs need for that.
"""

from __future__ import annotations

import copy
from typing import Any

from cluster.errors import check
from partitions.plan import Plan
from serve_app.names import stage_name

GROUP_LABEL = "partserve.io/group"
_EPS = 1e-9


def colocation_groups(plan: Plan, min_transfer_bytes: int = 0, gpus_per_node: float = 1.0) -> list[list[int]]:
    """Adjacent stages grouped greedily, in stage order: a stage joins the group of the predecessor it receives
    the most bytes from (``transfer_bytes`` per batch, at least ``min_transfer_bytes``) while the group's GPU
    shares still fit ``gpus_per_node``; otherwise it starts a group."""
    group_of: dict[int, int] = {}
    groups: list[list[int]] = []
    share: list[float] = []
    for stage in plan.stages:
        heavy = [p for p in stage.after if plan.stages[p].transfer_bytes >= min_transfer_bytes]
        joined = False
        for p in sorted(heavy, key=lambda j: -plan.stages[j].transfer_bytes):
            g = group_of[p]
            if share[g] + stage.gpu_fraction <= gpus_per_node + _EPS:
                groups[g].append(stage.index)
                share[g] += stage.gpu_fraction
                group_of[stage.index] = g
                joined = True
                break
        if not joined:
            group_of[stage.index] = len(groups)
            groups.append([stage.index])
            share.append(stage.gpu_fraction)
    return groups


def parse_groups(text: str, num_stages: int) -> list[list[int]]:
    """``"0+2,1"`` -> ``[[0, 2], [1]]``: every stage exactly once."""
    try:
        groups = [[int(i) for i in part.split("+")] for part in text.split(",")]
    except ValueError:
        groups = []
    check(bool(groups), f"co-location groups {text!r} are not like 0+1,2", "join stages with + and groups with ,")
    seen = sorted(i for g in groups for i in g)
    check(
        seen == list(range(num_stages)),
        f"co-location groups {text!r} name stages {seen}, the plan has stages 0..{num_stages - 1}",
        "name every stage exactly once",
    )
    return groups


def placement_options(groups: list[list[int]]) -> dict[str, dict[str, Any]]:
    """Serve options per stage deployment that pin group ``g``'s replicas to nodes labelled ``g``."""
    return {
        stage_name(i): {"ray_actor_options": {"label_selector": {GROUP_LABEL: str(g)}}}
        for g, members in enumerate(groups)
        for i in members
    }


def apply_options(config: dict[str, Any], options: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A copy of the Serve ``config`` with ``options`` merged (one level deep) into the named deployments of
    every application."""
    out = copy.deepcopy(config)
    for app in out["applications"]:
        for deployment in app.get("deployments", []):
            for key, value in options.get(deployment["name"], {}).items():
                if isinstance(value, dict):
                    deployment[key] = {**deployment.get(key, {}), **value}
                else:
                    deployment[key] = value
    return out


def pack(shares: list[float], capacity: float = 1.0) -> list[list[float]]:
    """First-fit decreasing: the ``shares`` (GPUs per replica, each <= ``capacity``) packed into bins of
    ``capacity`` GPUs, as few as FFD finds; a share of 0 needs no bin."""
    check(all(s <= capacity + _EPS for s in shares), f"a GPU share in {shares} exceeds {capacity} GPUs per node")
    bins: list[list[float]] = []
    loads: list[float] = []
    for s in sorted((s for s in shares if s > 0), reverse=True):
        for b, load in enumerate(loads):
            if load + s <= capacity + _EPS:
                bins[b].append(s)
                loads[b] += s
                break
        else:
            bins.append([s])
            loads.append(s)
    return bins
