"""Test tiers and the fixtures shared across folders.

Tiers (markers in pyproject.toml):

* ``slow``: starts Ray or Serve, a process that plans or serves, or exports a large model. Everything under
  ``tests/e2e/`` is marked here; elsewhere the test or module says so. ``python -m pytest -q -n 2 -m "not slow"``
  is the inner loop (pure logic, small plans, CLI errors); ``python -m pytest -q -n 2`` runs everything.
* ``gpu``: needs a CUDA device; skipped where torch sees none.
* ``own_ray``: starts a Ray in the test process (a multi-node cluster, Ray Data, other resources).

In parallel (``-n 2``, with ``--dist loadgroup`` from pyproject.toml): a process holds one Ray at a time, so the
tests on the shared Serve (``serve_instance``) run in one worker and the ``own_ray`` tests in one worker; every
other test runs wherever a worker is free. Two workers on 2 cores fill the time that one spends waiting (Serve's
delays, autoscaling windows, replica start-ups).

Fixtures:

* ``planned``: plans a small model once per session (``planned(MLP, stages=2)``), a read-only
  :class:`~tests.serve_fixtures.PlannedModel`; ``mlp``: the MLP in two stages.
* ``serve_instance``: one local Ray (4 CPUs, 4 logical GPUs) + Serve for the session, its base URL. Modules
  deploy their applications on it under their own names (:func:`tests.serve_session.serve_apps`) and delete
  them when done. Tests that use it run after all others, so that modules which start a Ray of their own
  (a multi-node cluster, ``ray start --head``, other resources) never find this one running.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

# No Ray started behind a test's back in this process: a Serve handle left from an earlier module's Ray keeps
# a metrics thread that outlives ray.shutdown(), and with auto-connect its next Ray call starts a local Ray of
# its own, racing the next module's ray.init ("node timed out during startup", then "ray.init twice").
# Ray reads the switch when it is imported; subprocesses (the CLI, `ray start`) get the environment unchanged.
_saved = os.environ.get("RAY_ENABLE_AUTO_CONNECT")
os.environ["RAY_ENABLE_AUTO_CONNECT"] = "0"
import ray  # noqa: E402, F401

if _saved is None:
    del os.environ["RAY_ENABLE_AUTO_CONNECT"]
else:
    os.environ["RAY_ENABLE_AUTO_CONNECT"] = _saved

from tests.serve_fixtures import MLP, PlannedModel, Planner, plan_model  # noqa: E402
from tests.serve_session import ray_serve  # noqa: E402

E2E = Path(__file__).parent / "e2e"
SHARED_SERVE = "serve_instance"


@pytest.hookimpl(tryfirst=True)  # before -m deselects, so that it sees the slow marks added here
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if E2E in item.path.parents:
            item.add_marker(pytest.mark.slow)
        if SHARED_SERVE in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group(SHARED_SERVE))
        elif item.get_closest_marker("own_ray"):
            item.add_marker(pytest.mark.xdist_group("own_ray"))
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if gpu:
        import torch

        if not torch.cuda.is_available():
            for item in gpu:
                item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
    # Stable sort, order kept otherwise: the shared Serve's tests last; before them the slow tests first, so that
    # with -n the short ones fill the workers' last minutes.
    items.sort(key=lambda it: (SHARED_SERVE in getattr(it, "fixturenames", ()), not it.get_closest_marker("slow")))


@pytest.fixture(scope="session")
def planned(tmp_path_factory: pytest.TempPathFactory) -> Planner:
    """``planned(model, stages=3, **plan_options)``: ``model`` (``(spec, options)``, as
    :data:`tests.serve_fixtures.MLP`) planned once per session; callers must not modify what it returns."""
    root = tmp_path_factory.mktemp("planned")
    cache: dict[str, PlannedModel] = {}

    def plan(model: tuple[str, dict[str, Any]], stages: int = 3, **plan_options: Any) -> PlannedModel:
        spec, options = model
        key = json.dumps([spec, options, stages, plan_options], sort_keys=True)
        if key not in cache:
            cache[key] = plan_model(spec, options, str(root / f"{len(cache)}"), stages=stages, **plan_options)
        return cache[key]

    return plan


@pytest.fixture(scope="session")
def mlp(planned: Planner) -> PlannedModel:
    """``demo-mlp`` (256 features -> 10 outputs) planned into two stages."""
    return planned(MLP, stages=2)


@pytest.fixture(scope="session")
def serve_instance() -> Iterator[str]:
    """The base URL of the session's local Ray + Serve (shut down at the end of the session)."""
    with ray_serve(num_cpus=4, num_gpus=4) as url:
        yield url
