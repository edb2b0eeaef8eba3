"""The coordinated autoscaling policy: small functions on literal tables, bounds and budget as properties,
the budget allocation against brute force."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.errors import ScalingConfigError
from cluster.policy import (
    PipelineObservation,
    PolicyConfig,
    StageObservation,
    StageSpec,
    StageState,
    apply_delay,
    arrival_rate_sample,
    backlogs,
    banded_target,
    bottleneck_allocation,
    demand_replicas,
    ewma,
    hysteresis_target,
    initial_state,
    noise_band,
    projected_backlogs,
    replica_rate_per_s,
    startup_allocation,
    step,
)


@pytest.mark.parametrize(
    ("previous", "sample", "weight", "expected"),
    [
        (10.0, 40.0, 0.5, 25.0),  # 10 + 0.5 * (40 - 10) = 25
        (10.0, 40.0, 1.0, 40.0),  # 10 + 1.0 * (40 - 10) = 40
        (100.0, 0.0, 0.3, 70.0),  # 100 + 0.3 * (0 - 100) = 70
    ],
)
def test_ewma(previous: float, sample: float, weight: float, expected: float) -> None:
    assert ewma(previous, sample, weight) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("service_ms", "batch", "expected"),
    [
        (100.0, 1, 10.0),  # 1 * 1000 / 100 = 10 requests/s
        (250.0, 8, 32.0),  # 8 * 1000 / 250 = 32
    ],
)
def test_replica_rate(service_ms: float, batch: int, expected: float) -> None:
    assert replica_rate_per_s(service_ms, batch) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("queued", "running", "completed", "previous", "dt_s", "expected"),
    [
        (30, 10, 50, 20, 1.0, 70.0),  # (40 - 20 + 50) / 1 = 70
        (0, 0, 20, 10, 2.0, 5.0),  # (0 - 10 + 20) / 2 = 5
        (5, 5, None, 10, 1.0, 50.0),  # completions by Little's law: 5 / 0.1 s = 50; (10 - 10 + 50) / 1 = 50
        (0, 4, None, 0, None, 40.0),  # first tick: running / service = 4 / 0.1 = 40
        (0, 0, 0, 50, 1.0, 0.0),  # a shrinking queue never gives a negative rate
    ],
)
def test_arrival_rate_sample(queued, running, completed, previous, dt_s, expected) -> None:
    entrance = StageObservation(queued=queued, running=running, target_replicas=1, completed=completed)
    assert arrival_rate_sample(entrance, previous, dt_s, service_ms=100.0) == pytest.approx(expected)


def test_backlogs_count_everything_upstream() -> None:
    stages = [StageObservation(q, r, 1) for q, r in [(10, 2), (3, 4), (0, 1)]]
    # stage 0: 10; stage 1: (10 + 2) + 3 = 15; stage 2: 12 + (3 + 4) + 0 = 19
    assert backlogs(stages) == [10, 15, 19]


@pytest.mark.parametrize(
    ("arrival", "backlog", "rate", "expected"),
    [
        (70.0, 0.0, 10.0, 10.0),  # 70 / (10 * 0.7) = 10
        (70.0, 100.0, 10.0, 11.0),  # 10 + 100 / (10 s * 10) = 11
        (0.0, 50.0, 5.0, 1.0),  # 0 + 50 / (10 * 5) = 1
    ],
)
def test_demand_replicas(arrival: float, backlog: float, rate: float, expected: float) -> None:
    config = PolicyConfig(stages=(StageSpec("s", 100.0),), target_utilisation=0.7, drain_time_s=10.0)
    assert demand_replicas(arrival, backlog, rate, config) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("desired", "current", "expected"),
    [
        (12, 10, 12),  # up: always
        (10, 10, 10),
        (9, 10, 10),  # 9 > 10 * (1 - 0.2) = 8: held
        (8, 10, 8),  # 8 <= 8: down
        (1, 2, 1),  # 1 <= 2 * 0.8 = 1.6
    ],
)
def test_hysteresis(desired: int, current: int, expected: int) -> None:
    assert hysteresis_target(desired, current, 0.2) == expected


@pytest.mark.parametrize(
    ("wanted", "current", "expected"),
    [
        (2.10, 2, 2),  # within 2 * 1.1 = 2.2: a high reading adds no replica
        (2.30, 2, 3),  # over the band: up to ceil(2.3)
        (2.10, 3, 2),  # 2.1 / 1.1 = 1.91: two carry it within the band, a downscale
        (2.30, 3, 3),  # 2.3 / 1.1 = 2.09: held
        (1.50, 3, 2),
        (0.30, 3, 1),  # never under the minimum
        (0.50, 0, 1),  # from none: up
    ],
)
def test_banded_target(wanted: float, current: int, expected: int) -> None:
    desired = max(1, math.ceil(wanted))
    assert banded_target(wanted, desired, current, 0.1, lowest=1) == expected
    assert banded_target(wanted, desired, current, 0.0, lowest=1) in (desired, current)  # no band: as before


@given(st.floats(0.01, 50.0), st.integers(0, 60), st.floats(0.0, 0.5))
def test_banded_target_moves_towards_demand_and_never_past_it(wanted: float, current: int, band: float) -> None:
    desired = max(1, math.ceil(wanted - 1e-9))
    n = banded_target(wanted, desired, current, band, lowest=1)
    assert n <= max(current, desired)  # never above the demand's ceiling, nor below what carries it in the band
    assert n >= min(current, max(1, math.ceil(wanted / (1 + band) - 1e-9)))
    assert n * (1 + band) >= wanted - 1e-9 or n == current  # what it moves to carries the demand within the band


def test_noise_band_is_poisson() -> None:
    assert noise_band(150.0, 1.5) == pytest.approx(1.5 / 150**0.5)  # 5/s over 30 s: 12%
    assert noise_band(None, 1.5) == noise_band(0.0, 1.5) == 0.0


def test_a_noisy_steady_rate_neither_adds_nor_holds_a_replica() -> None:
    # One stage at 1 request/s per replica, target 0.85: 5 +- 0.4 requests/s asks 5.4-6.4 replicas.
    config = PolicyConfig(stages=(StageSpec("s", 1000.0, max_replicas=10),), downscale_delay_s=0.0)

    def decide(rate: float, current: int, events: float | None) -> int:
        obs = PipelineObservation(
            time_s=10.0,
            stages=(StageObservation(queued=0.0, running=1.0, target_replicas=current),),
            arrival_rate_per_s=rate,
            rate_sampled_at_s=10.0,
            arrival_events=events,
        )
        return step(obs, config, initial_state(config))[0]["s"]

    # 5.4 asks 6.35: over 6 without the band, within 6 * 1.12 with it
    assert decide(5.4, 6, 150.0) == 6 and decide(5.4, 6, None) == 7
    # 5.2 asks 6.12: 7 are held without the band, 6 carry it within the band
    assert decide(5.2, 7, 150.0) == 6 and decide(5.2, 7, None) == 7


def starting(target: int, ready: int) -> StageObservation:
    return StageObservation(queued=0.0, running=0.0, target_replicas=target, ready_replicas=ready)


def test_startup_allocation_starts_the_bottleneck_first() -> None:
    rates = [2.0, 1.0, 4.0]  # requests/s per replica
    stages = [starting(1, 1), starting(1, 1), starting(1, 1)]
    # 6 new replicas wanted, 2 may start: the first to stage 1, the bottleneck (1 req/s against 2 and 4), then
    # stage 0 (2 req/s, tied with stage 1 at 2 replicas; the earlier stage first)
    assert startup_allocation([3, 4, 2], stages, rates, 2) == [2, 2, 1]
    # one already starting (stage 1's second) leaves one slot
    assert startup_allocation([3, 4, 2], [starting(1, 1), starting(2, 1), starting(1, 1)], rates, 2) == [2, 2, 1]
    assert startup_allocation([3, 4, 2], stages, rates, 6) == [3, 4, 2]  # all fit
    assert startup_allocation([1, 4, 1], [starting(3, 3), starting(1, 1), starting(2, 2)], rates, 1) == [1, 2, 1]


@given(
    st.lists(st.tuples(st.integers(0, 8), st.integers(0, 8), st.floats(0.1, 10.0)), min_size=1, max_size=5),
    st.integers(1, 6),
)
def test_startup_allocation_keeps_downscales_and_the_limit(
    stages: list[tuple[int, int, float]], max_starting: int
) -> None:
    obs = [starting(current, current) for current, _, _ in stages]
    desired = [d for _, d, _ in stages]
    got = startup_allocation(desired, obs, [mu for _, _, mu in stages], max_starting)
    for n, (current, want, _) in zip(got, stages):
        assert min(current, want) <= n <= max(current, want)
    assert sum(max(0, n - current) for n, (current, _, _) in zip(got, stages)) <= max_starting


def test_delays_wait_for_a_consistent_direction() -> None:
    config = PolicyConfig(stages=(StageSpec("s", 100.0),), upscale_delay_s=5.0, downscale_delay_s=20.0)
    state = StageState(service_ms=100.0)
    n, state = apply_delay(4, 2, state, 0.0, config)  # wants up at t=0: waits
    assert (n, state.pending_direction, state.pending_since_s) == (2, 1, 0.0)
    n, state = apply_delay(4, 2, state, 4.0, config)  # 4 - 0 < 5
    assert n == 2
    n, state = apply_delay(4, 2, state, 5.0, config)  # 5 - 0 >= 5: applied
    assert (n, state.pending_direction) == (4, 0)
    n, state = apply_delay(1, 4, state, 10.0, config)  # down from t=10
    n, state = apply_delay(5, 4, state, 15.0, config)  # direction flips: the down timer restarts
    assert (n, state.pending_direction, state.pending_since_s) == (4, 1, 15.0)


def test_validators_show_values() -> None:
    with pytest.raises(ScalingConfigError, match=r"max_replicas \(2\) must be >= min_replicas \(3\)"):
        StageSpec("s", 10.0, min_replicas=3, max_replicas=2)
    with pytest.raises(ScalingConfigError, match=r"target_utilisation \(1.5\)"):
        PolicyConfig(stages=(StageSpec("s", 10.0),), target_utilisation=1.5)
    with pytest.raises(ScalingConfigError, match=r"gpu_budget \(1.0\) is below .* need \(2\)"):
        PolicyConfig(stages=(StageSpec("a", 10.0), StageSpec("b", 10.0)), gpu_budget=1.0)


def _pipeline(n: int = 3, **kw) -> PolicyConfig:
    """Stages of 100, 200, 300 ms at a target utilisation of 0.7 (the figures in the tests' comments)."""
    stages = tuple(StageSpec(f"s{i}", 100.0 * (i + 1), max_replicas=50) for i in range(n))
    return PolicyConfig(stages=stages, **{"target_utilisation": 0.7, **kw})


def test_step_sets_all_stages_from_the_entrance_rate() -> None:
    config = _pipeline(rate_smoothing=1.0)
    # Entrance: 2 queued + 8 running; stage rates 10, 5, 3.33/s. First tick: lambda = 8 / 0.1 s = 80/s.
    obs = PipelineObservation(0.0, tuple(StageObservation(q, r, 1) for q, r in [(2, 8), (0, 1), (0, 0)]))
    decision, state = step(obs, config, initial_state(config))
    # s0: 80 / (10 * 0.7) + 2 / (10 * 10) = 11.45 -> 12; s1: 80 / 3.5 + 10 / 50 = 23.06 -> 24;
    # s2: 80 / (3.33 * 0.7) + 11 / 33.3 = 34.6 -> 35: downstream stages scale in the same tick
    assert decision == {"s0": 12, "s1": 24, "s2": 35}
    assert state.arrival_rate_per_s == pytest.approx(80.0)


def test_idle_goes_to_minimum_and_live_latency_moves_service_time() -> None:
    config = _pipeline(downscale_delay_s=0.0, latency_smoothing=0.5)
    idle = PipelineObservation(5.0, tuple(StageObservation(0, 0, 7, completed=0, service_ms=200.0) for _ in range(3)))
    decision, state = step(idle, config, initial_state(config))
    assert decision == {"s0": 1, "s1": 1, "s2": 1}
    # 100 + 0.5 * (200 - 100) = 150; 200 + 0.5 * (200 - 200) = 200; 300 + 0.5 * (200 - 300) = 250
    assert [s.service_ms for s in state.stages] == [150.0, 200.0, 250.0]


observations = st.lists(st.tuples(st.integers(0, 500), st.integers(0, 100), st.integers(0, 60)), min_size=3, max_size=3)


@settings(max_examples=150, deadline=None)
@given(observations, st.floats(1.0, 40.0), st.lists(st.floats(0.25, 2.0), min_size=3, max_size=3))
def test_decisions_respect_bounds_and_budget(stages, budget, gpus) -> None:
    specs = tuple(StageSpec(f"s{i}", 50.0 * (i + 1), 4, g, 0, 30) for i, g in enumerate(gpus))
    config = PolicyConfig(stages=specs, gpu_budget=budget, upscale_delay_s=0.0, downscale_delay_s=0.0)
    obs = PipelineObservation(1.0, tuple(StageObservation(q, r, 0) for q, r, _ in stages))
    decision, _ = step(obs, config, initial_state(config))
    assert all(s.min_replicas <= decision[s.name] <= s.max_replicas for s in specs)
    assert sum(decision[s.name] * s.gpu_fraction for s in specs) <= budget + 1e-9


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 2), st.integers(0, 4), st.floats(0.5, 20.0), st.sampled_from([0.25, 0.5, 1.0])),
        min_size=1,
        max_size=3,
    ),
    st.floats(0.5, 8.0),
)
def test_bottleneck_allocation_matches_brute_force(stages, budget) -> None:
    lower = [lo for lo, _, _, _ in stages]
    upper = [lo + extra for lo, extra, _, _ in stages]
    rates = [mu for _, _, mu, _ in stages]
    gpus = [g for _, _, _, g in stages]
    if sum(lo * g for lo, g in zip(lower, gpus)) > budget:
        return
    got = bottleneck_allocation(lower, upper, rates, gpus, budget)
    assert all(lo <= n <= up for lo, n, up in zip(lower, got, upper))
    assert sum(n * g for n, g in zip(got, gpus)) <= budget + 1e-9
    best = max(
        min(n * mu for n, mu in zip(r, rates))
        for r in itertools.product(*(range(lo, up + 1) for lo, up in zip(lower, upper)))
        if sum(n * g for n, g in zip(r, gpus)) <= budget + 1e-9
    )
    assert min(n * mu for n, mu in zip(got, rates)) == pytest.approx(best)


def test_budget_below_demand_balances_stage_throughputs() -> None:
    # Rates 10, 4, 6.67 requests/s per replica, 1 GPU each, 30 GPUs for a demand far above them.
    specs = tuple(StageSpec(f"s{i}", ms, max_replicas=100) for i, ms in enumerate([100.0, 250.0, 150.0]))
    config = PolicyConfig(stages=specs, gpu_budget=30.0, rate_smoothing=1.0)
    obs = PipelineObservation(0.0, (StageObservation(500, 50, 1), StageObservation(0, 0, 1), StageObservation(0, 0, 1)))
    decision, _ = step(obs, config, initial_state(config))
    throughput = [decision[s.name] * 1000.0 / s.service_ms for s in specs]
    assert sum(decision.values()) <= 30
    # 6 * 10 = 60, 15 * 4 = 60, 9 * 6.67 = 60: the bottleneck 60/s is the best 30 GPUs can do
    assert decision == {"s0": 6, "s1": 15, "s2": 9}
    assert max(throughput) <= 1.1 * min(throughput)


def test_backlogs_move_forward_from_their_sample_time() -> None:
    # Sampled 4 s ago at lambda = 30/s; stage 0: 2 ready x 10/s = 20/s, stage 1: 1 x 40/s (the bottleneck up
    # to it stays stage 0's 20/s); stage 2 sampled now. Entrance queue 5 upstream of all.
    stages = [
        StageObservation(10, 2, 2, ready_replicas=2, sampled_at_s=6.0),
        StageObservation(3, 1, 1, ready_replicas=1, sampled_at_s=6.0),
        StageObservation(0, 0, 4, sampled_at_s=None),
    ]
    got = projected_backlogs(stages, 30.0, [10.0, 40.0, 100.0], now_s=10.0, entrance_queued=5.0)
    # stage 0: 10 + 5 + (30 - 20) * 4 = 55; stage 1: (12 + 3) + 5 + 40 = 60; stage 2: (12 + 4 + 0) + 5 = 21
    assert got == pytest.approx([55.0, 60.0, 21.0])
    # a draining backlog shrinks, never below 0: 10 + (5 - 20) * 4 < 0
    assert projected_backlogs(stages[:1], 5.0, [10.0], now_s=10.0) == [0.0]


def test_a_measured_rate_is_taken_once_per_sample() -> None:
    config = _pipeline(counter_smoothing=0.5)
    state = initial_state(config)
    stages = tuple(StageObservation(0, 1, 1) for _ in range(3))
    decision, state = step(PipelineObservation(0.0, stages, 40.0, rate_sampled_at_s=-2.0), config, state)
    assert state.arrival_rate_per_s == 40.0  # the first sample as it is
    for t in (0.1, 0.2, 0.3):  # the controller's 0.1 s ticks see the same pushed point: no new information
        _, state = step(PipelineObservation(t, stages, 80.0, rate_sampled_at_s=-2.0), config, state)
    assert state.arrival_rate_per_s == 40.0
    _, state = step(PipelineObservation(1.0, stages, 80.0, rate_sampled_at_s=4.0), config, state)
    assert state.arrival_rate_per_s == pytest.approx(60.0)  # 40 + 0.5 * (80 - 40)
    # 60/s sizes all stages at once: 60 / (10 * 0.7) = 8.6 -> 9, 60 / 3.5 = 17.1 -> 18, 60 / 2.33 = 25.7 -> 26
    assert decision == {"s0": 6, "s1": 12, "s2": 18}  # the first tick's 40/s: 5.7 -> 6, 11.4 -> 12, 17.1 -> 18
