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
# The other custom autoscaling metrics (``record_autoscaling_stats``), read by :mod:`cluster.observe` as the
# newest raw points Serve keeps per replica. Serve records them only for deployments with an autoscaling_config.
ARRIVED_METRIC = "arrived"
"""Entrance replica: requests sent towards the pipeline since it started, in pipeline batches (samples / batch)."""
QUEUED_METRIC = "queued"
"""Stage replica: requests waiting in it for a batch; entrance replica: stage requests waiting to be sent."""
RUNNING_METRIC = "running"
"""Stage replica: requests in the batch it is running."""
BUSY_METRIC = "busy_s"
"""Stage replica: seconds spent running batches since it started (a counter; its rate is the utilisation)."""

_STAGE = re.compile(r"stage-(\d+)")


def stage_name(index: int) -> str:
    """Deployment name of stage ``index``: ``stage-0``, ``stage-1``, ..."""
    return f"stage-{index}"


def stage_index(name: str) -> int | None:
    """The stage index of deployment ``name`` (``stage-3`` -> 3); None for any other deployment."""
    match = _STAGE.fullmatch(name)
    return int(match.group(1)) if match else None
