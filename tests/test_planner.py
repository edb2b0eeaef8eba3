"""The planner against literal tables and against brute force on random instances."""

from __future__ import annotations

import itertools
import random

import pytest

from partitions.errors import PlanError
from partitions.planner import Problem, min_stages, solve


def brute_force(pb: Problem, stages: int, cap: float) -> float:
    """Least bottleneck over every way to cut, straight from the definitions (no prefix sums)."""
    n = pb.n
    best = float("inf")

    def crossing(b: int) -> int:
        return sum(size for p, last, size in pb.edges if p < b <= last)

    def memory(a: int, b: int) -> int:
        live = [crossing(k) + pb.activation_bytes[k] for k in range(a, b)]
        return sum(pb.weight_bytes[a:b]) + max(live)

    for cuts in itertools.combinations(range(1, n), stages - 1):
        bounds = (0, *cuts, n)
        spans = list(zip(bounds[:-1], bounds[1:]))
        if any(memory(a, b) > cap for a, b in spans):
            continue
        costs = [sum(pb.compute_ms[a:b]) + (crossing(b) / pb.bandwidth_bytes_per_ms if b < n else 0) for a, b in spans]
        best = min(best, max(costs))
    return best


def random_problem(rng: random.Random) -> Problem:
    n = rng.randint(1, 9)
    edges = []
    for p in range(-1, n - 1):
        # A chain edge to the next node, sometimes a skip edge further on (residuals, model outputs).
        edges.append((p, p + 1, rng.randint(0, 50)))
        if rng.random() < 0.4:
            edges.append((p, rng.randint(p + 1, n), rng.randint(0, 80)))
    return Problem(
        compute_ms=[rng.choice([0.0, rng.uniform(0, 10)]) for _ in range(n)],
        weight_bytes=[rng.randint(0, 100) for _ in range(n)],
        activation_bytes=[rng.randint(0, 60) for _ in range(n)],
        edges=edges,
        bandwidth_bytes_per_ms=rng.choice([1.0, 10.0, 1e6]),
    )


@pytest.mark.parametrize("seed", range(300))
def test_matches_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    pb = random_problem(rng)
    stages = rng.randint(1, pb.n)
    cap = rng.choice([float("inf"), rng.randint(50, 400)])
    expected = brute_force(pb, stages, cap)
    max_bytes = None if cap == float("inf") else int(cap)
    if expected == float("inf"):
        with pytest.raises(PlanError):
            solve(pb, stages, max_bytes)
        return
    part = solve(pb, stages, max_bytes)
    assert part.stages == stages
    assert part.bottleneck_ms == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert all(m <= cap for m in part.memory_bytes)
    assert part.bounds[0] == 0 and part.bounds[-1] == pb.n
    assert all(a < b for a, b in zip(part.bounds[:-1], part.bounds[1:]))


@pytest.mark.parametrize("seed", range(100))
def test_fewest_stages_matches_brute_force(seed: int) -> None:
    rng = random.Random(1000 + seed)
    pb = random_problem(rng)
    cap = rng.randint(60, 400)
    feasible = [s for s in range(1, pb.n + 1) if brute_force(pb, s, cap) < float("inf")]
    if not feasible:
        with pytest.raises(PlanError):
            min_stages(pb, cap)
        return
    assert min_stages(pb, cap) == feasible[0]
    assert solve(pb, None, cap).stages == feasible[0]


def test_balanced_chain() -> None:
    # 8 nodes of 1 ms into 4 stages: 2 + 2 + 2 + 2, no transfer cost at infinite-ish bandwidth.
    pb = Problem([1.0] * 8, [0] * 8, [0] * 8, [(k, k + 1, 0) for k in range(-1, 8)])
    part = solve(pb, 4)
    assert part.bounds == (0, 2, 4, 6, 8)
    assert part.cost_ms == (2.0, 2.0, 2.0, 2.0)


def test_transfer_cost_moves_the_cut() -> None:
    # Costs 1,1,1,1; cutting after node 1 ships 100 bytes (10 ms at 10 B/ms), after node 2 ships 10 (1 ms).
    # Cut at 2: max(2 + 10, 2) = 12; cut at 3: max(3 + 1, 1) = 4; cut at 1: max(1 + 0.5, 3) = 3 (5 B).
    edges = [(-1, 0, 0), (0, 1, 5), (1, 2, 100), (2, 3, 10), (3, 4, 0)]
    pb = Problem([1.0] * 4, [0] * 4, [0] * 4, edges, bandwidth_bytes_per_ms=10.0)
    part = solve(pb, 2)
    assert part.bounds == (0, 1, 4)
    assert part.cost_ms == pytest.approx((1.5, 3.0))
    assert part.transfer_bytes == (5, 0)


def test_skip_edge_is_shipped_across_every_cut_it_spans() -> None:
    # A residual from node 0 to node 3 (40 B) crosses cuts after 1, 2 and 3; chain edges are 10 B each.
    edges = [(-1, 0, 0), (0, 1, 10), (1, 2, 10), (2, 3, 10), (0, 3, 40)]
    pb = Problem([1.0] * 4, [0] * 4, [0] * 4, edges)
    part = solve(pb, 4)
    assert part.transfer_bytes == (50, 50, 50, 0)  # 10 chain + 40 skip at each cut


def test_memory_cap_forces_more_stages() -> None:
    # Weights 10 each, no activations: a cap of 25 fits at most 2 nodes per stage -> 3 stages for 5 nodes.
    pb = Problem([1.0] * 5, [10] * 5, [0] * 5, [(k, k + 1, 0) for k in range(-1, 5)])
    assert min_stages(pb, 25) == 3
    part = solve(pb, None, 25)
    assert part.stages == 3
    assert max(part.memory_bytes) <= 25


def test_errors_name_the_fix() -> None:
    pb = Problem([1.0] * 3, [10] * 3, [0] * 3, [(k, k + 1, 0) for k in range(-1, 3)])
    with pytest.raises(PlanError, match="--stages 3 or fewer"):
        solve(pb, 4)
    with pytest.raises(PlanError, match="raise --max-stage-memory to at least 10"):
        solve(pb, None, 5)
    with pytest.raises(PlanError, match="at least 2 stages"):
        solve(pb, 1, 25)
