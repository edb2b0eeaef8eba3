"""Run the application on this machine (or on a Ray cluster) and wait until it answers.

* ``deploy_config(config, address)``: deploys a Serve config (:func:`cluster.deploy.serve_config`) on the Ray
  at ``address``, or on a new local instance without the dashboard (never one it happens to find), as
  ``serve deploy`` would: the one deploy path, so the application-level autoscaling policy applies;
  ``wait_running(names)`` waits for it.
* ``start(plan_uri, ...) -> app name``: the same for one plan, returning once it runs.
* ``wait_ready(url, timeout_s)``: polls ``{url}/v2/health/ready`` until it answers 200.
* ``stop()``: removes every Serve app and shuts down the Ray instance this process started or joined.

Then ``serve.get_app_handle(name).infer.remote(x)`` runs the model from Python (see
:mod:`serve_app.entrance`), and ``http://host:port/v2/models/{model}/infer`` over HTTP.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import ray
from ray import serve

from cluster.deploy import serve_config
from serve_app.ray_internals import deploy_apps


def start(
    plan_uri: str,
    *,
    name: str = "partserve",
    route_prefix: str = "/",
    address: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    num_gpus: int | None = None,
    timeout_s: float = 120.0,
    **args: Any,
) -> str:
    """Deploy the plan at ``plan_uri`` as Serve app ``name`` and return ``name`` once it runs.

    ``num_gpus``: GPUs of a new local Ray instance (ignored when joining ``address``); ``args``: further
    :func:`cluster.deploy.serve_config` keywords (``gpus=True``, ``autoscale=True``, AppArgs fields)."""
    config = serve_config(plan_uri, app_name=name, route_prefix=route_prefix, host=host, port=port, **args)
    wait_running(deploy_config(config, address, num_gpus), timeout_s)
    return name


def deploy_config(
    config: dict[str, Any], address: str | None = None, num_gpus: int | None = None, log_to_driver: bool = True
) -> list[str]:
    """Deploy a Serve config (as ``serve deploy config.yaml`` does) on the Ray at ``address``, or a new local
    one with ``num_gpus`` logical GPUs; returns the application names without waiting for them.
    ``log_to_driver``: print the Ray processes' logs here (else they stay in Ray's session logs)."""
    if not ray.is_initialized():
        ray.init(address=address or "local", num_gpus=num_gpus, include_dashboard=False, log_to_driver=log_to_driver)
    return deploy_apps(config)


def wait_running(names: list[str], timeout_s: float = 120.0) -> None:
    """Wait until Serve reports every application in ``names`` RUNNING; raise on DEPLOY_FAILED or timeout."""
    deadline = time.monotonic() + timeout_s
    states: dict[str, str] = {}
    while time.monotonic() < deadline:
        apps = serve.status().applications
        states = {n: str(apps[n].status) if n in apps else "NOT_STARTED" for n in names}
        failed = [f"{n}: {apps[n].message}" for n, st in states.items() if st.endswith("DEPLOY_FAILED")]
        if failed:
            raise RuntimeError("deploy failed: " + "; ".join(failed))
        if all(st.endswith("RUNNING") for st in states.values()):
            return
        time.sleep(0.5)
    raise TimeoutError(f"applications {names} not running after {timeout_s:.0f} s ({states})")


def wait_ready(url: str, timeout_s: float = 60.0) -> None:
    """Poll ``{url}/v2/health/ready`` every 0.2 s; raise ``TimeoutError`` after ``timeout_s`` seconds."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{url.rstrip('/')}/v2/health/ready", timeout=5.0)
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}"
        except httpx.HTTPError as exc:
            last = str(exc) or type(exc).__name__
        time.sleep(0.2)
    raise TimeoutError(f"{url} not ready after {timeout_s:.0f} s ({last})")


def stop(names: list[str] | None = None) -> None:
    """Delete the applications ``names`` and disconnect (a shared cluster keeps running); with no names,
    shut down Serve and disconnect from (or stop the local) Ray."""
    if not ray.is_initialized():
        return
    if names is None:
        serve.shutdown()
    else:
        for name in names:
            serve.delete(name)
    ray.shutdown()
