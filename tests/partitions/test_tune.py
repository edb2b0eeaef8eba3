"""Engine tuning: the search steps (pure) and a tuned plan that serving reads."""

from __future__ import annotations

import shutil

import pytest

from partitions.storage import read_plan
from partitions.tune import NEAR, Trial, best_trial, next_threads, tune
from tests.serve_fixtures import MLP


def test_threads_grow_on_the_slowest_stage_within_the_cores() -> None:
    assert next_threads([1, 1], [3.0, 5.0], cores=4) == [1, 2]
    assert next_threads([2, 2], [3.0, 5.0], cores=4) is None  # 2 + 2 + 1 > 4
    assert next_threads([1, 1, 1, 1], [1.0, 2.0, 3.0, 4.0], cores=2) is None


def test_best_trial_prefers_the_smallest_batch_near_the_fastest() -> None:
    a = Trial(4, [1, 1], [10.0, 8.0])  # 4 / 10 ms = 400 samples/s
    b = Trial(8, [1, 1], [19.6, 15.0])  # 8 / 19.6 ms = 408: within 3% of it
    c = Trial(8, [2, 1], [12.0, 15.0])  # 8 / 15 ms = 533: the fastest
    assert best_trial([a, b]) is a
    assert best_trial([a, b, c]) is c


@pytest.mark.slow  # a process per stage, trials of a fraction of a second
def test_tune_writes_threads_and_batch_into_the_plan(planned, tmp_path) -> None:
    model = planned(MLP, stages=2)
    uri = str(tmp_path / "plan")
    shutil.copytree(model.uri, uri)  # the session's plan stays as planned
    result = tune(uri, batch_sizes=(1, 4), seconds=0.3, cores=2, call_overhead_ms=0.5)
    assert {t.batch_size for t in result.trials} >= {1, 4, model.plan.batch_size}
    assert result.before.threads == [1, 1] and result.before.batch_size == model.plan.batch_size
    # The plan's own setting is a trial: the kept one is at most NEAR slower (a smaller batch near the best).
    assert result.best.samples_per_s >= (1 - NEAR) * result.before.samples_per_s
    plan = read_plan(uri)
    assert plan.serve_batch_size == result.best.batch_size and plan.tuning["cores"] == 2
    assert plan.tuning["call_overhead_ms"] == 0.5 == result.to_json()["call_overhead_ms"]
    assert [s.engine.threads for s in plan.stages] == result.best.threads
