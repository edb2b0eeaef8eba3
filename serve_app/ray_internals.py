"""Every private Ray API partserve uses, in one place, each with what it is for.

Checked against Ray :data:`CHECKED_RAY_VERSION`; Ray may change these without notice, so a Ray upgrade
starts here (the tests exercise each one). Code elsewhere imports Ray's public API only.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, cast

import ray
from ray.serve.schema import ServeDeploySchema, ServeInstanceDetails

from serve_app.stop_signals import STOP_SIGNALS

if TYPE_CHECKING:
    from ray._private.node import Node

CHECKED_RAY_VERSION = "2.60.0"
"""The Ray release these imports and signatures were read from (``site-packages/ray``)."""

SERVE_NAMESPACE: str = "serve"
"""Ray namespace of Serve's actors (``ray.serve._private.constants.SERVE_NAMESPACE``)."""


@contextlib.contextmanager
def stop_signals_held() -> Iterator[None]:
    """For starting Ray: SIGINT and SIGTERM that arrive inside the block are held and raise
    ``KeyboardInterrupt`` when it ends, and ``ray.init`` inside it leaves this process's handlers as they are
    (``ray._private.utils.set_sigterm_handler``, which ``ray.init`` calls to install handlers that exit on the
    spot). Stopped inside ``ray.init``, a process has started Ray's processes but holds no node to shut them
    down, and Ray's dashboard and runtime-env agents outlive it."""
    from ray._private import utils

    held: list[int] = []
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    install = utils.set_sigterm_handler
    utils.set_sigterm_handler = lambda handler: None
    for sig in STOP_SIGNALS:
        signal.signal(sig, lambda sig, _frame: held.append(sig))
    try:
        yield
    finally:
        utils.set_sigterm_handler = install
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if held:
        raise KeyboardInterrupt


def serve_details() -> ServeInstanceDetails | None:
    """What ``serve status`` and the dashboard show (applications, deployments, replicas with actor names and
    pids), from the connected cluster's Serve controller; None when no controller runs."""
    client = _serve_client()
    return None if client is None else ServeInstanceDetails(**client.get_serve_details())


def _serve_client() -> Any:
    """The connected cluster's Serve client (its ``_controller`` is the controller's actor handle); None when no
    controller runs."""
    from ray.serve.context import _get_global_client

    return _get_global_client(raise_if_no_controller_running=False)


def deploy_apps(config: dict[str, Any]) -> list[str]:
    """Apply a Serve config dict as ``serve deploy`` does (so an application-level ``autoscaling_policy``
    applies, which ``serve.run`` cannot set), starting Serve with the config's HTTP options if it is not
    running; returns the application names without waiting for them (``cluster.local.wait_running``). The
    public route goes through the dashboard's REST API, which a local Ray started without the dashboard does
    not have."""
    from ray.serve._private import api as serve_api

    schema = ServeDeploySchema.model_validate(config)
    client = serve_api.serve_start(http_options=schema.http_options.model_dump(), proxy_location=schema.proxy_location)
    client.deploy_apps(schema)
    return [app.name for app in schema.applications]


def bootstrap_address(address: str) -> str | None:
    """``auto`` or ``host:port`` resolved to the GCS ``host:port`` as ``ray.init`` would (None: none found)."""
    from ray._private.services import canonicalize_bootstrap_address

    try:
        return canonicalize_bootstrap_address(address)
    except ConnectionError:
        return None


def _driver_node() -> Node:
    """The node object of the Ray this driver started or joined (``ray._private.worker._global_node``)."""
    # Ray declares ``_global_node = None`` without an annotation, so mypy takes it for always None.
    node = cast("Node | None", ray._private.worker._global_node)
    if node is None:
        raise RuntimeError("Ray is not initialized in this process")
    return node


def session_dir() -> str:
    """The connected Ray session's directory (its ``logs/`` holds every process's log)."""
    return _driver_node().get_session_dir_path()


def raylet_pid() -> int:
    """Process id of the raylet of the Ray instance this driver started (its workers are its children)."""
    return _driver_node().all_processes["raylet"][0].process.pid


def metrics_export_port() -> int:
    """Port of this node's Prometheus endpoint (``/metrics``), where ``ray.util.metrics`` of every process on
    the node (the stage replicas' ``partserve_stage_*``) are exported."""
    return int(_driver_node().metrics_export_port)


def alive_actor_nodes(name_prefix: str) -> dict[str, str]:
    """``{actor name: node id}`` of the live actors whose name starts with ``name_prefix``, read from the GCS
    actor table (``ray.util.state`` needs the dashboard, which local test clusters run without)."""
    alive = ray._private.state.actors(actor_state_name="ALIVE").values()
    return {a["Name"]: a["Address"]["NodeID"] for a in alive if a["Name"].startswith(name_prefix)}


def handle_totals(app: str, deployments: list[str]) -> list[float | None]:
    """Each deployment's ongoing requests as Serve's controller aggregates them from the handles' pushes (the
    ``total_num_requests`` its default policy divides by ``target_ongoing_requests``;
    ``ServeController._get_total_num_requests_for_deployment_for_testing``); None for a deployment the
    controller keeps no autoscaling state for. The live twin polls it to compare with the simulator's view."""
    from ray.serve._private.common import DeploymentID

    client = _serve_client()
    if client is None:
        return [None] * len(deployments)
    ask = client._controller._get_total_num_requests_for_deployment_for_testing
    asked = [ask.remote(DeploymentID(name, app)) for name in deployments]  # all at once, answered in turn
    out: list[float | None] = []
    for ref in asked:
        try:
            out.append(float(ray.get(ref)))
        except KeyError:  # as in replica_metrics
            out.append(None)
    return out


def replica_metrics(app: str, deployment: str) -> dict[str, list[list[tuple[float, float]]]]:
    """What Serve's controller holds of a deployment's replica-recorded autoscaling metrics (the custom ones of
    ``record_autoscaling_stats``): ``{name: one series of (epoch s, value) per running replica}``, the points
    of the last push within the look-back window (``ServeController._get_metrics_for_deployment_for_testing``).
    The live twin reads from it when the entrance records and pushes, to simulate with the same phases. Empty
    for a deployment without an ``autoscaling_config`` (the controller keeps no autoscaling state for it)."""
    from ray.serve._private.common import DeploymentID

    client = _serve_client()
    if client is None:
        return {}
    try:
        held = ray.get(client._controller._get_metrics_for_deployment_for_testing.remote(DeploymentID(deployment, app)))
    except KeyError:  # Ray re-raises the controller's KeyError as a RayTaskError that is also a KeyError
        return {}
    return {name: [[(p.timestamp, float(p.value)) for p in s] for s in series] for name, series in held.items()}
