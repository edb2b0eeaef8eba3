"""The baselines of ``partserve bench --compare`` run on the terms partserve runs on (no Ray started)."""

from __future__ import annotations

import math

import pytest

from serve_app.app import AppArgs, batch_wait_s
from serve_app.bench import setup_configs, summary, torch_bounds
from serve_app.transport import BY_VALUE_MAX_BYTES
from tests.serve_fixtures import MLP, PlannedModel


def test_baselines_get_partserves_batch_threads_and_log(mlp: PlannedModel) -> None:
    args = AppArgs(plan_uri=mlp.uri, num_cpus=0)
    configs = setup_configs(mlp.plan, args, cores=2)
    whole, chain, mine = configs["serve-whole"], configs["serve-chain"], configs["partserve"]
    # The whole model's replica gets every core, and as many torch threads, as num_cpus gives it.
    assert (whole.torch_threads, whole.replica_cpus) == (2, 2.0)
    # It batches like partserve's entrance: same samples per batch, same wait.
    assert (whole.max_batch_size, whole.batch_wait_s) == (mine.max_batch_size, mine.batch_wait_s)
    # Or the cores go to replicas: one per core, one core and one thread each, batching the same way.
    replicas = configs["serve-replicas"]
    assert (replicas.replicas, replicas.replica_cpus, replicas.torch_threads, whole.replicas) == (2, 1.0, 1, 1)
    assert (replicas.max_batch_size, replicas.batch_wait_s) == (whole.max_batch_size, whole.batch_wait_s)
    assert mine.max_batch_size == mlp.plan.batch_size and mine.batch_wait_s == batch_wait_s(mlp.plan, args)
    # The chain's stages batch, wait and thread as partserve's stages; max_ongoing_requests 2x the batch.
    assert (chain.stage_max_batch_size, chain.stage_batch_wait_s) == (mine.stage_max_batch_size, 0.0)
    assert chain.torch_threads == mine.torch_threads == 1  # num_cpus 0: Ray's one thread per replica
    assert chain.max_ongoing_requests == 2 * mine.max_batch_size
    # Batches go between the chain's stages as between partserve's: by value up to the same bound.
    assert chain.by_value_max_bytes == mine.by_value_max_bytes == BY_VALUE_MAX_BYTES
    assert not any(c.access_log for c in configs.values())
    # Options that change partserve change the baselines with it.
    more = setup_configs(mlp.plan, AppArgs(plan_uri=mlp.uri, torch_threads=2, max_batch_size=4, access_log=True), 2)
    assert more["serve-chain"].torch_threads == 2 and more["serve-whole"].max_batch_size == 4
    by_reference = setup_configs(mlp.plan, AppArgs(plan_uri=mlp.uri, by_value_max_bytes=0), 2)
    assert by_reference["serve-chain"].by_value_max_bytes == by_reference["partserve"].by_value_max_bytes == 0
    assert all(c.access_log for c in more.values())
    assert set(whole.row()) == {f"cfg_{k}" for k in whole.__dataclass_fields__ if k != "setup"}


def row(setup: str, level: int, tput: float, p50: float, p99: float, mode: str = "closed") -> dict[str, object]:
    path = "in-process" if mode.startswith("bound") else "handle"
    return {
        "setup": setup,
        "path": path,
        "mode": mode,
        "level": level,
        "throughput_samples_per_s": tput,
        "p50_ms": p50,
        "p99_ms": p99,
    }


def test_summary_compares_at_equal_load_and_under_the_slo() -> None:
    rows = [
        row("torch", 8, 100.0, 80.0, float("nan"), "bound"),
        row("torch-stages", 8, 90.0, 88.0, float("nan"), "bound"),
        row("torch-stages", 1, 25.0, 40.0, float("nan"), "bound-latency"),
        row("serve-whole", 1, 20.0, 50.0, 60.0),
        row("serve-whole", 16, 60.0, 250.0, 300.0),
        row("serve-replicas", 1, 24.0, 42.0, 55.0),
        row("serve-replicas", 16, 75.0, 200.0, 260.0),
        row("serve-chain", 1, 18.0, 55.0, 70.0),
        row("serve-chain", 16, 30.0, 500.0, 900.0),
        row("partserve", 1, 22.0, 44.0, 50.0),
        row("partserve", 16, 66.0, 240.0, 400.0),
    ]
    s = summary(rows)
    best = {r["setup"]: r for r in s["best"]}
    assert best["partserve"]["vs_torch"] == pytest.approx(0.66)  # 66 / 100
    assert best["partserve"]["vs_serve_chain"] == pytest.approx(2.2)  # 66 / 30
    (one, sixteen) = s["at_level"]
    assert one["partserve_vs_serve_whole"] == pytest.approx(1.1)  # 22 / 20, at the same level
    assert sixteen["partserve_vs_serve_whole"] == pytest.approx(1.1)  # 66 / 60
    assert sixteen["partserve_vs_serve_replicas"] == pytest.approx(0.88)  # 66 / 75
    assert best["partserve"]["vs_serve_replicas"] == pytest.approx(0.88)
    assert s["slo_ms"] == pytest.approx(320.0)  # 4 x the torch bound's 80 ms batch
    assert s["slo"]["partserve"]["throughput_samples_per_s"] == 22.0  # p99 400 > 320 at 16 in flight
    assert s["slo"]["serve-whole"]["throughput_samples_per_s"] == 60.0
    assert s["idle"]["vs_stages_in_process"] == pytest.approx(1.1)  # 44 / 40
    assert s["idle"]["vs_serve_whole"] == pytest.approx(0.88)  # 44 / 50


def test_summary_of_a_baseline_that_completed_nothing_at_a_level_has_no_ratio_there() -> None:
    rows = [row("serve-whole", 1, 0.0, float("nan"), float("nan")), row("partserve", 1, 22.0, 44.0, 50.0)]
    s = summary(rows)
    assert math.isnan(s["at_level"][0]["partserve_vs_serve_whole"])
    assert math.isnan({r["setup"]: r for r in s["best"]}["partserve"]["vs_serve_whole"])


@pytest.mark.slow  # plans on the engine and exports the whole model to it (inductor: compiles both)
@pytest.mark.parametrize("engine", ["onnxruntime", "inductor"])
def test_bounds_run_the_whole_model_on_the_stages_engine(engine: str, planned) -> None:
    if engine == "onnxruntime":
        pytest.importorskip("onnxruntime")
    model = planned(MLP, stages=2, engine=engine)
    assert [s.engine.name for s in model.plan.stages] == [engine, engine]
    rows = torch_bounds(model.plan, model.uri, samples_per_request=1, stage_threads=1, repeats=2)
    bounds = {r["setup"]: r for r in rows if r["mode"] == "bound"}
    assert set(bounds) == {"torch", f"torch-{engine}", "torch-stages"}
    assert all(r["throughput_samples_per_s"] > 0 for r in rows)
