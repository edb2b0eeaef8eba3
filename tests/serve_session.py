"""A local Ray + Serve for the serving tests (always shut down) and applications deployed on it (always deleted)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import ray
from ray import serve

from cluster import local
from serve_app.app import AppArgs, build_app
from serve_app.ports import free_port
from serve_app.ray_internals import serve_details

READY_TIMEOUT_S = 300.0
"""Seconds an application may take to answer after deploying (this machine is shared and slow)."""


@dataclass(frozen=True)
class Replica:
    deployment: str
    actor_name: str
    pid: int


@contextmanager
def ray_serve(num_cpus: int = 4, num_gpus: int = 4) -> Iterator[str]:
    """Start a new local Ray (``num_cpus`` CPUs and ``num_gpus`` logical GPUs, no dashboard, never one it
    happens to find) and Serve on a free 127.0.0.1 port, and yield the base URL; Serve and Ray are shut down
    on exit, whatever happened. The ``serve_instance`` fixture (tests/conftest.py) holds one for the session."""
    if ray.is_initialized():
        raise RuntimeError("Ray is already initialized in this process: a test left it running")
    port = free_port()
    ray.init(address="local", num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}"
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


@contextmanager
def serve_apps(
    url: str,
    apps: dict[str, AppArgs],
    background: dict[str, AppArgs] | None = None,
    timeout_s: float = READY_TIMEOUT_S,
) -> Iterator[str]:
    """On the running Serve at ``url``, deploy ``apps`` and ``background`` (application name -> args) at
    ``/{name}``, wait until each of ``apps`` answers (``timeout_s`` each), and yield ``url``; all of them are
    deleted on exit, whatever happened, so the next module finds Serve empty. Names are unique in the session."""
    names = [*apps, *(background or {})]
    try:
        serve.run_many(
            [
                serve.RunTarget(build_app(args), name=name, route_prefix=f"/{name}")
                for name, args in {**apps, **(background or {})}.items()
            ],
            wait_for_applications_running=False,
        )
        local.wait_running(list(apps), timeout_s)
        for name in apps:
            local.wait_ready(f"{url}/{name}", timeout_s)
        yield url
    finally:
        delete_apps(names)


def delete_apps(names: list[str]) -> None:
    """Delete the Serve applications ``names`` that exist (each waits until its replicas are gone)."""
    existing = serve.status().applications
    for name in names:
        if name in existing:
            serve.delete(name)


def replicas(app: str) -> list[Replica]:
    """The RUNNING replicas of application ``app``, with their actor names and worker pids."""
    details = serve_details()
    assert details is not None, "Serve is not running"
    return [
        Replica(name, r.actor_name, r.pid)
        for name, dep in details.applications[app].deployments.items()
        for r in dep.replicas
        if str(r.state).endswith("RUNNING") and r.actor_name and r.pid
    ]
