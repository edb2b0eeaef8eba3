"""Run the application on this machine (or on a Ray cluster) and wait until it answers.

* ``start(plan_uri, ...) -> app name``: connects to Ray at ``address``, or starts a new local instance
  without the dashboard (never joins one it happens to find), starts Serve's HTTP proxy on ``host:port``
  (if Serve is not running yet) and deploys the app at ``route_prefix`` (``/``); returns once it runs.
* ``wait_ready(url, timeout_s)``: polls ``{url}/v2/health/ready`` until it answers 200.
* ``deploy_config(config, address)``: the same from a Serve config dict (see ``serve_app.app.serve_config``),
  the only way to apply an application-level autoscaling policy; ``wait_running(names)`` waits for it.
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

from serve_app.app import AppArgs, build_app


def start(
    plan_uri: str,
    *,
    name: str = "partserve",
    route_prefix: str = "/",
    address: str | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    num_gpus: float | None = None,
    **args: Any,
) -> str:
    """Deploy the plan at ``plan_uri`` as Serve app ``name`` and return ``name``.

    ``num_gpus``: GPUs of a new local Ray instance (ignored when joining ``address``); with ``gpus=True`` in
    ``args`` each stage reserves its planned share. ``args`` are further :class:`AppArgs` fields.
    """
    if not ray.is_initialized():
        ray.init(address=address or "local", num_gpus=num_gpus, include_dashboard=False)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(AppArgs(plan_uri=plan_uri, **args)), name=name, route_prefix=route_prefix)
    return name


def deploy_config(config: dict[str, Any], address: str | None = None, num_gpus: float | None = None) -> list[str]:
    """Deploy a Serve config (as ``serve run config.yaml`` does, so an application-level autoscaling policy
    applies) on the Ray at ``address``, or a new local one; returns the application names."""
    from ray.serve._private import api as serve_api
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(config)
    if not ray.is_initialized():
        ray.init(address=address or "local", num_gpus=num_gpus, include_dashboard=False)
    client = serve_api.serve_start(http_options=schema.http_options.model_dump(), proxy_location=schema.proxy_location)
    client.deploy_apps(schema, _blocking=False)
    return [app.name for app in schema.applications]


def wait_running(names: list[str], timeout_s: float = 120.0) -> None:
    """Wait until Serve reports every application in ``names`` RUNNING; raise on DEPLOY_FAILED or timeout."""
    deadline = time.monotonic() + timeout_s
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
