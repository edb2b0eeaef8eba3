"""What ``partserve status`` shows: the Serve applications on a running Ray cluster, their deployments'
replicas, and live figures of each pipeline stage.

* Applications and deployments come from the Serve controller (the details behind ``serve.status()``, which
  also carry each deployment's target replica count and its replicas' actor names).
* Stage figures come from each RUNNING replica of a ``stage-N`` deployment: its ``record_routing_stats``
  (:meth:`serve_app.stage.StageDeployment.record_routing_stats`), called on the replica actor directly so a
  saturated replica still answers at once. A stage's figures cover the last
  :data:`serve_app.metrics.WINDOW_S` seconds of all its replicas.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import asdict, dataclass, field
from typing import Any

import ray
from ray.serve.schema import ApplicationDetails, DeploymentDetails

from partitions.errors import PartserveError
from serve_app.metrics import merge_sketches, sketch_quantile
from serve_app.names import stage_index
from serve_app.ray_internals import SERVE_NAMESPACE, bootstrap_address, serve_details

CALL_TIMEOUT_S = 5.0
"""Seconds to wait for the replicas' figures; replicas that do not answer in time are left out."""


class StatusError(PartserveError):
    """No Ray cluster, no Serve instance or no application to report on."""


@dataclass(frozen=True)
class StageFigures:
    """One stage over the last window, all its reporting replicas together."""

    replicas_reporting: int
    window_s: float
    """Mean span the replicas' figures cover, seconds."""
    queued_requests: int
    """Requests waiting for a batch in the replicas now."""
    utilisation: float
    """Busy time / wall time, averaged over the replicas (0..1)."""
    requests_per_s: float
    latency_ms_p50: float | None
    """Median wall time of a batch, ms (None: no batch in the window)."""
    latency_ms_p99: float | None
    batch_requests: float | None
    """Mean requests per batch."""
    batch_samples: float | None
    """Mean samples per batch."""


@dataclass(frozen=True)
class DeploymentState:
    name: str
    status: str
    target_replicas: int
    replicas: dict[str, int]
    """Live replicas by state (RUNNING, STARTING, STOPPING, ...)."""
    message: str = ""
    stage: StageFigures | None = None
    """Figures of a stage deployment; None for the others (the entrance)."""


@dataclass(frozen=True)
class AppState:
    name: str
    status: str
    message: str
    deployments: list[DeploymentState] = field(default_factory=list)


def stage_figures(summaries: list[dict[str, Any]]) -> StageFigures:
    """Combine the replicas' ``record_routing_stats`` answers (see :func:`serve_app.metrics.window_summary`)."""
    batches = sum(s["batches"] for s in summaries)
    windows = [s["window_s"] for s in summaries if s["window_s"] > 0]
    sketch = merge_sketches(s["latency_sketch"] for s in summaries)
    return StageFigures(
        replicas_reporting=len(summaries),
        window_s=sum(windows) / len(windows) if windows else 0.0,
        queued_requests=sum(s["queued_requests"] for s in summaries),
        utilisation=sum(s["busy_s"] for s in summaries) / sum(windows) if windows else 0.0,
        requests_per_s=sum(s["requests"] / s["window_s"] for s in summaries if s["window_s"] > 0),
        latency_ms_p50=sketch_quantile(sketch, 0.5),
        latency_ms_p99=sketch_quantile(sketch, 0.99),
        batch_requests=sum(s["requests"] for s in summaries) / batches if batches else None,
        batch_samples=sum(s["samples"] for s in summaries) / batches if batches else None,
    )


def connect(address: str) -> bool:
    """Connect this process to the Ray cluster at ``address`` (``auto``, ``host:port`` or ``ray://...``) unless
    it is connected already; True when it connected (and should disconnect with ``ray.shutdown()``)."""
    if ray.is_initialized():
        return False
    if not address.startswith("ray://"):
        resolved = bootstrap_address(address)
        if resolved is None or not _listening(resolved):
            raise StatusError(
                f"no Ray cluster at {address}",
                "start one (partserve run, or ray start --head) or pass its address with --address",
            )
    try:
        ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR)
    except ConnectionError as exc:
        raise StatusError(f"cannot connect to the Ray cluster at {address} ({exc})", "check --address") from exc
    return True


def _listening(host_port: str, timeout_s: float = 2.0) -> bool:
    """Whether something accepts TCP connections at ``host:port`` (Ray hangs for minutes on a dead address)."""
    host, _, port = host_port.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


def gather(app: str | None = None) -> list[AppState]:
    """The applications (only ``app`` when given) on the connected cluster, with their stage figures."""
    details = serve_details()
    if details is None:
        raise StatusError("no Serve instance runs on this Ray cluster", "deploy with partserve run or serve deploy")
    apps = details.applications
    if not apps:
        raise StatusError("Serve runs but has no applications", "deploy with partserve run or serve deploy")
    if app is not None and app not in apps:
        raise StatusError(f"no application {app!r}", f"running: {', '.join(sorted(apps))}")
    chosen = [apps[app]] if app is not None else [apps[name] for name in sorted(apps)]
    figures = _stage_figures(chosen)
    return [_app_state(a, figures) for a in chosen]


def _ordered(app: ApplicationDetails) -> list[DeploymentDetails]:
    """The other deployments (the entrance) by name, then the stages by index."""

    def key(d: DeploymentDetails) -> tuple[int, int, str]:
        stage = stage_index(d.name)
        return (1, stage, "") if stage is not None else (0, 0, d.name)

    return sorted(app.deployments.values(), key=key)


def _stage_figures(apps: list[ApplicationDetails]) -> dict[tuple[str, str], StageFigures]:
    """Ask every RUNNING stage replica at once; figures by (application, deployment)."""
    calls: dict[ray.ObjectRef, tuple[str, str]] = {}
    for app in apps:
        for dep in app.deployments.values():
            if stage_index(dep.name) is None:
                continue
            for replica in dep.replicas:
                if replica.state != "RUNNING" or not replica.actor_name:
                    continue
                try:
                    actor = ray.get_actor(replica.actor_name, namespace=SERVE_NAMESPACE)
                except ValueError:  # stopped since the details were read
                    continue
                calls[actor.record_routing_stats.remote()] = (app.name, dep.name)
    if not calls:
        return {}
    ready, _ = ray.wait(list(calls), num_returns=len(calls), timeout=CALL_TIMEOUT_S)
    answers: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for ref in ready:
        try:
            answer = ray.get(ref)
        except ray.exceptions.RayError:  # the replica died meanwhile
            continue
        if answer:
            answers.setdefault(calls[ref], []).append(answer)
    return {key: stage_figures(summaries) for key, summaries in answers.items()}


def _app_state(app: ApplicationDetails, figures: dict[tuple[str, str], StageFigures]) -> AppState:
    deployments = []
    for dep in _ordered(app):
        states: dict[str, int] = {}
        for replica in dep.replicas:
            states[str(replica.state.value)] = states.get(str(replica.state.value), 0) + 1
        deployments.append(
            DeploymentState(
                name=dep.name,
                status=str(dep.status.value),
                target_replicas=dep.target_num_replicas,
                replicas=states,
                message=dep.message,
                stage=figures.get((app.name, dep.name)),
            )
        )
    return AppState(app.name, str(app.status.value), app.message, deployments)


def to_json(apps: list[AppState]) -> dict[str, Any]:
    """``{"applications": [...]}`` with every field of :class:`AppState`."""
    return {"applications": [asdict(a) for a in apps]}
