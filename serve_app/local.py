"""Run the application on this machine (or on a Ray cluster) and wait until it answers.

* ``start(plan_uri, ...) -> app name``: connects to Ray (``address``; starts a local instance without the
  dashboard when none is running), starts Serve's HTTP proxy on ``host:port`` (if Serve is not running
  yet) and deploys the app at ``route_prefix`` (``/``). Returns once every deployment is running.
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
        ray.init(address=address, num_gpus=num_gpus, include_dashboard=False)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(AppArgs(plan_uri=plan_uri, **args)), name=name, route_prefix=route_prefix)
    return name


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


def stop() -> None:
    """Shut down Serve and disconnect from (or stop the local) Ray."""
    if ray.is_initialized():
        serve.shutdown()
        ray.shutdown()
