"""A small local Ray + Serve session for the reliability, fuzzing and security tests, always shut down."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import ray
from ray import serve

from cluster import local
from serve_app.app import AppArgs, build_app
from serve_app.ray_internals import serve_details
from tests.serve_fixtures import free_port

READY_TIMEOUT_S = 300.0
"""Seconds an application may take to answer after deploying (this machine is shared and slow)."""


@dataclass(frozen=True)
class Replica:
    deployment: str
    actor_name: str
    pid: int


@contextmanager
def serve_session(
    apps: dict[str, AppArgs], background: dict[str, AppArgs] | None = None, num_cpus: int = 4
) -> Iterator[str]:
    """Start Ray (``num_cpus`` logical CPUs, no dashboard) and Serve on a free 127.0.0.1 port, deploy
    ``apps`` and ``background`` (application name -> args) at ``/{name}``, wait until each of ``apps``
    answers, and yield the base URL; Serve and Ray are shut down on exit, whatever happened."""
    port = free_port()
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run_many(
            [
                serve.RunTarget(build_app(args), name=name, route_prefix=f"/{name}")
                for name, args in {**apps, **(background or {})}.items()
            ],
            wait_for_applications_running=False,
        )
        url = f"http://127.0.0.1:{port}"
        local.wait_running(list(apps), READY_TIMEOUT_S)
        for name in apps:
            local.wait_ready(f"{url}/{name}", READY_TIMEOUT_S)
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()


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
