"""Names that the serving side writes and the cluster side reads: deployments, import paths, metric keys.

One home for each, so :mod:`cluster` (configs, policy, status) and :mod:`serve_app` (the replicas) cannot
drift apart. The import paths are a public contract: Serve configs already deployed name them.
"""

from __future__ import annotations

import re

APP_IMPORT_PATH = "serve_app.app:build_app"
"""``import_path`` of the application in Serve configs."""
POLICY_IMPORT_PATH = "cluster.serve_policy:PipelineAutoscalingPolicy"
"""``autoscaling_policy.policy_function`` of the coordinated policy in Serve configs."""
ENTRANCE = "entrance"
"""Deployment name of the ingress."""
FULL_BATCH_METRIC = "full_batch_ms"
"""Custom autoscaling metric of a stage replica: milliseconds of replica time per request (a batch)."""

_STAGE = re.compile(r"stage-(\d+)")


def stage_name(index: int) -> str:
    """Deployment name of stage ``index``: ``stage-0``, ``stage-1``, ..."""
    return f"stage-{index}"


def stage_index(name: str) -> int | None:
    """The stage index of deployment ``name`` (``stage-3`` -> 3); None for any other deployment."""
    match = _STAGE.fullmatch(name)
    return int(match.group(1)) if match else None
