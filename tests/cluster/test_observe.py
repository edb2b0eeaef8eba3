"""What Serve shows a policy, read into the coordinated policy's observation: counters, newest points,
fallbacks to Serve's window aggregates."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cluster.observe import DeploymentMetrics, counter_rate, newest, pipeline_observation


def test_counter_rate_differences_the_two_newest_points_of_each_replica() -> None:
    a = [(0.0, 0.0), (6.0, 30.0), (12.0, 90.0)]  # 5/s, then 10/s: 60 where 30 +- 5.5 was due, a change
    b = [(3.0, 5.0), (9.0, 35.0)]  # (35 - 5) / 6 = 5/s
    assert counter_rate([a, b]) == (pytest.approx(15.0), 12.0, 90.0)  # 60 + 30 counted
    assert counter_rate([[(0.0, 50.0), (6.0, 12.0)]]) == (2.0, 6.0, 12.0)  # restarted: counts from 0, 12 / 6
    assert counter_rate([[(1.0, 3.0)], []]) is None  # one point: no rate yet


def test_counter_rate_reads_a_steady_load_over_the_window() -> None:
    # 5/s with Poisson noise: the newest interval's 28 is within 3 sigma of the 30 due, so the rate is the
    # window's, 90 / 18, not the newest interval's 28 / 6.
    steady = [(0.0, 0.0), (6.0, 30.0), (12.0, 62.0), (18.0, 90.0)]
    assert counter_rate([steady]) == (pytest.approx(5.0), 18.0, 90.0)
    # The same window whose newest interval dropped to 6: a change, read at once.
    dropped = [(0.0, 0.0), (6.0, 30.0), (12.0, 62.0), (18.0, 68.0)]
    assert counter_rate([dropped]) == (pytest.approx(1.0), 18.0, 6.0)
    # Points from before a restart do not count towards the window.
    restarted = [(0.0, 500.0), (6.0, 0.0), (12.0, 30.0), (18.0, 58.0)]
    assert counter_rate([restarted]) == (pytest.approx(58 / 12), 18.0, 58.0)


@given(
    st.floats(min_value=0.5, max_value=200.0),
    st.lists(st.floats(min_value=-1.0, max_value=1.0), min_size=1, max_size=5),
)
def test_counter_rate_stays_between_the_window_and_newest_rates(rate: float, noise: list[float]) -> None:
    # Whatever the counts, the rate is either the newest interval's or the window's: never outside both.
    t, v, series = 0.0, 0.0, [(0.0, 0.0)]
    for e in noise:
        t, v = t + 6.0, v + max(0.0, rate * 6.0 * (1 + 0.5 * e))
        series.append((t, v))
    got, at, events = counter_rate([series])
    newest = (series[-1][1] - series[-2][1]) / 6.0
    window = series[-1][1] / series[-1][0]
    assert at == t and min(newest, window) - 1e-9 <= got <= max(newest, window) + 1e-9
    assert events == pytest.approx(got * (6.0 if got == newest and got != window else t))  # the counts read


def test_newest_sums_replicas_and_averages_their_times() -> None:
    assert newest([[(0.0, 1.0), (6.0, 4.0)], [(8.0, 2.0)]]) == (6.0, 7.0)
    assert newest([[], []]) is None


def stage(name: str, raw: dict) -> DeploymentMetrics:
    return DeploymentMetrics(
        name, current_replicas=2, target_replicas=3, total_requests=9.0, queued_requests=1.0, raw=raw
    )


def test_pipeline_observation_prefers_custom_metrics_and_falls_back_to_windows() -> None:
    with_metrics = stage(
        "stage-0",
        {
            "queued": [[(10.0, 4.0)], [(12.0, 2.0)]],
            "running": [[(10.0, 1.0)], [(12.0, 1.0)]],
            "full_batch_ms": [[(10.0, 80.0)], [(12.0, 100.0)]],
        },
    )
    without = stage("stage-1", {})
    entrance = DeploymentMetrics(
        "entrance", 1, 1, 0.0, raw={"arrived": [[(4.0, 10.0), (10.0, 40.0)]], "queued": [[(10.0, 3.0)]]}
    )
    obs = pipeline_observation(15.0, [with_metrics, without], entrance)
    s0, s1 = obs.stages
    # newest points: queued 4 + 2 (+ 1 queued at the handle), running 2, at 11 s; mean service 90 ms
    assert (s0.queued, s0.running, s0.sampled_at_s, s0.service_ms) == (7.0, 2.0, 11.0, 90.0)
    assert (s0.target_replicas, s0.ready_replicas) == (3, 2)
    # Serve's window aggregates: queued 1, running 9 - 1 = 8, as of now
    assert (s1.queued, s1.running, s1.sampled_at_s) == (1.0, 8.0, None)
    assert (obs.arrival_rate_per_s, obs.rate_sampled_at_s, obs.entrance_queued) == (5.0, 10.0, 3.0)
    assert pipeline_observation(15.0, [without]).arrival_rate_per_s is None  # no entrance: estimate the rate
