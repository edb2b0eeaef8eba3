"""DAG plans served under concurrency: diamonds, two levels of fan-out and fan-in, and two roots.

The entrance calls every stage at once on the (not yet computed) responses of the stages it reads from, so a
fork hands one ``DeploymentResponse`` to two stages and a join receives two. Ray Serve has hung on such
diamond-shaped chains of responses (ray-project/ray#51190, fixed in 2.46); these tests send many requests at
once through such plans, over HTTP and through the Python handle, with every wait bounded so that a hang
fails the test instead of blocking the run.

Planned (:func:`test_planner_picks_the_dag`), three models:

* ``diamond``: stage 0 -> stages 1 and 2 in parallel -> stage 3 (``tests.models:fork_join``, one block),
* ``double``: two diamonds in a row, the first join being the second fork (two blocks),
* ``roots``: ``tests.models:two_roots``, two root stages each reading its own model input, joined by a third.

Served, on the session's Ray + Serve (the ``serve_instance`` fixture), at ``/{name}``: ``double`` (its first
block is ``diamond``'s diamond, so a lone diamond adds no shape, only five replicas) and ``roots``, which is
also the two-input application (JSON and Arrow bodies, the handle, the errors for a missing input).

The models are small and their outputs well conditioned: stages batch concurrent requests, and a matrix
product's rounding depends on its batch, so rows computed within a batch of other requests match the
whole model run on the request alone only to float32 rounding (about 3e-7 here, under the 1e-6 bound). A
scalar output that nearly cancels, as ``demo-two-tower``'s score, breaks 1e-6 that way alone.
"""

from __future__ import annotations

import concurrent.futures
import io
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import numpy as np
import pytest
from ray import serve

from partitions.dtypes import from_oip, oip_datatype
from serve_app import codecs
from serve_app.app import AppArgs
from serve_app.names import stage_name
from tests.serve_fixtures import PlannedModel, Planner, rel_err
from tests.serve_session import serve_apps

pytestmark = pytest.mark.slow

MODELS = {
    "diamond": ("tests.models:fork_join", {"blocks": 1}, 4, [[], [0], [0], [1, 2]]),
    "double": ("tests.models:fork_join", {"blocks": 2}, 7, [[], [0], [0], [1, 2], [3], [3], [4, 5]]),
    "roots": ("tests.models:two_roots", {}, 3, [[], [], [0, 1]]),
}
"""name -> (model spec, options, stages, expected ``[s.after for s in plan.stages]``)."""
SERVED = ["double", "roots"]
"""The applications deployed (two diamonds in a row cover the lone diamond)."""
REQUEST_TIMEOUT_S = 60.0
WAVE_TIMEOUT_S = 120.0
"""Bound on a whole wave of concurrent requests: past it the test fails as hung."""


@dataclass
class Served:
    url: str
    models: dict[str, PlannedModel]


@pytest.fixture(scope="module")
def dags(planned: Planner) -> dict[str, PlannedModel]:
    """The three models planned for latency with free hops, so the planner takes every parallel branch."""
    return {
        name: planned((spec, options), stages=stages, objective="latency", hop_ms=0.0)
        for name, (spec, options, stages, _) in MODELS.items()
    }


@pytest.fixture(scope="module")
def served(serve_instance: str, dags: dict[str, PlannedModel]) -> Iterator[Served]:
    apps = {
        name: AppArgs(plan_uri=model.uri, model_name=name, num_cpus=0, batch_wait_timeout_s=0.002)
        for name, model in dags.items()
        if name in SERVED
    }
    with serve_apps(serve_instance, apps) as url:  # 12 replicas: a minute or more on a loaded 2-core machine
        yield Served(url, {name: dags[name] for name in SERVED})


def post_arrow(url: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    r = httpx.post(
        url, content=codecs.encode_arrow(inputs), headers={"content-type": codecs.ARROW}, timeout=REQUEST_TIMEOUT_S
    )
    assert r.status_code == 200, r.text
    return codecs.read_arrow(r.content)


def oip_json(inputs: dict[str, np.ndarray]) -> dict:
    return {
        "inputs": [
            {"name": k, "shape": list(v.shape), "datatype": oip_datatype(v.dtype), "data": v.ravel().tolist()}
            for k, v in inputs.items()
        ]
    }


def post_json(url: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    r = httpx.post(url, json=oip_json(inputs), timeout=REQUEST_TIMEOUT_S)
    assert r.status_code == 200, r.text
    return {
        t["name"]: np.asarray(t["data"], dtype=from_oip(t["datatype"])).reshape(t["shape"]) for t in r.json()["outputs"]
    }


def by_handle(app: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return serve.get_app_handle(app).infer.remote(inputs).result(timeout_s=REQUEST_TIMEOUT_S)


def stage_samples(app: str, stages: int) -> list[int]:
    """Samples each stage of ``app`` has run so far."""
    out = []
    for i in range(stages):
        busy = serve.get_deployment_handle(stage_name(i), app).busy_intervals.remote()
        out.append(sum(samples for *_, samples in busy.result(timeout_s=REQUEST_TIMEOUT_S)))
    return out


def run_wave(served: Served, jobs: list[tuple[str, str, dict[str, np.ndarray]]]) -> list[dict[str, np.ndarray]]:
    """Send every ``(app, path, inputs)`` at once from its own thread (``path``: ``http`` or ``handle``); fail,
    naming what is still pending, if the wave does not finish within ``WAVE_TIMEOUT_S``."""
    pool = concurrent.futures.ThreadPoolExecutor(len(jobs))
    try:
        futures = [
            pool.submit(post_arrow, f"{served.url}/{app}/v2/models/{app}/infer", x)
            if path == "http"
            else pool.submit(by_handle, app, x)
            for app, path, x in jobs
        ]
        _, pending = concurrent.futures.wait(futures, timeout=WAVE_TIMEOUT_S)
        stuck = [job[:2] for job, f in zip(jobs, futures) if f in pending]
        assert not stuck, f"{len(stuck)} of {len(jobs)} requests hung past {WAVE_TIMEOUT_S:.0f} s: {stuck[:8]}"
        return [f.result() for f in futures]
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


def check(model: PlannedModel, inputs: dict[str, np.ndarray], got: dict[str, np.ndarray], what: str) -> None:
    want = model.reference(inputs)
    assert set(got) == set(want), what
    for name, expected in want.items():
        assert got[name].shape == expected.shape, (what, name)
        assert rel_err(got[name], expected) <= 1e-6, (what, name)


@pytest.mark.parametrize("name", list(MODELS))
def test_planner_picks_the_dag(dags: dict[str, PlannedModel], name: str) -> None:
    assert [s.after for s in dags[name].plan.stages] == MODELS[name][3]


@pytest.mark.parametrize("name", SERVED)
def test_concurrent_requests_through_the_dag(served: Served, name: str) -> None:
    """64 requests at once, half over HTTP and half through the handle, of 1 to 6 samples each (so stages
    batch requests together and split the results back); each stage runs every sample exactly once."""
    model = served.models[name]
    stages = len(model.plan.stages)
    before = stage_samples(name, stages)
    jobs = [(name, "http" if i % 2 else "handle", model.sample(1 + i % 6, seed=i)) for i in range(64)]
    answers = run_wave(served, jobs)
    for (_, path, x), got in zip(jobs, answers):
        check(model, x, got, f"{name} via {path}")
    sent = sum(len(next(iter(x.values()))) for *_, x in jobs)
    ran = [b - a for a, b in zip(before, stage_samples(name, stages))]
    assert ran == [sent] * stages, f"samples run per stage {ran}, {sent} sent"


def test_all_dags_at_once(served: Served) -> None:
    """Three waves of requests to the applications mixed, the handle and HTTP interleaved."""
    names = SERVED
    for wave in range(3):
        jobs = []
        for i in range(48):
            app = names[i % len(names)]
            path = "http" if (i // len(names)) % 2 else "handle"
            jobs.append((app, path, served.models[app].sample(2, seed=100 * wave + i)))
        for (app, path, x), got in zip(jobs, run_wave(served, jobs)):
            check(served.models[app], x, got, f"{app} via {path}, wave {wave}")


def test_two_inputs_by_json_arrow_and_handle(served: Served) -> None:
    """The two-input DAG over each path, and a body that lacks an input answers 400 naming it."""
    model = served.models["roots"]
    assert not model.plan.is_chain, "the planner made a chain: this test wants parallel stages"
    url = f"{served.url}/roots/v2/models/roots/infer"
    inputs = [model.sample(n, seed=n) for n in (1, 4, 6)]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        by_json = list(pool.map(lambda x: post_json(url, x), inputs))
        by_arrow = list(pool.map(lambda x: post_arrow(url, x), inputs))
    handle = serve.get_app_handle("roots")
    by_handles = [r.result(timeout_s=REQUEST_TIMEOUT_S) for r in [handle.infer.remote(x) for x in inputs]]
    for x, *answers in zip(inputs, by_json, by_arrow, by_handles):
        for path, got in zip(("json", "arrow", "handle"), answers):
            check(model, x, got, f"roots via {path}")
    r = httpx.post(url, json=oip_json({"left": inputs[0]["left"]}), timeout=REQUEST_TIMEOUT_S)
    assert r.status_code == 400 and "missing ['right']" in r.json()["error"]
    buf = io.BytesIO()
    np.save(buf, inputs[0]["left"])
    r = httpx.post(url, content=buf.getvalue(), headers={"content-type": codecs.NPY}, timeout=REQUEST_TIMEOUT_S)
    assert r.status_code == 400 and "takes 2" in r.json()["error"]
