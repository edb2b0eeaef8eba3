"""The planner against literal tables and against brute force on random instances."""

from __future__ import annotations

import itertools
import random

import pytest

from partitions.errors import PlanError
from partitions.planner import Problem, min_stages, solve


def brute_force(pb: Problem, stages: int, cap: float, objective: str = "throughput", branches: bool = True) -> float:
    """Best objective over every segmentation, each segment sequential or split into its independent runs,
    computed straight from the definitions (no prefix sums, no dynamic program)."""
    n = pb.n
    edges = [(p, (c,) if isinstance(c, int) else tuple(c), size) for p, c, size in pb.edges]

    def crossing(b: int) -> int:
        return sum(size for p, cs, size in edges if p < b <= max(cs))

    def memory(a: int, b: int) -> int:
        return sum(pb.weight_bytes[a:b]) + max(crossing(k) + pb.activation_bytes[k] for k in range(a, b))

    def send_ms(size: int, b: int) -> float:
        return 0.0 if b == n else pb.hop_ms + size / pb.bandwidth_bytes_per_ms

    def free_points(a: int, b: int) -> list[int]:
        return [m for m in range(a + 1, b) if not any(a <= p < m <= c < b for p, cs, _ in edges for c in cs)]

    def options(a: int, b: int) -> list[tuple[int, float]]:
        """(stages used, segment time) for each way to run segment [a, b)."""
        out = []
        if memory(a, b) <= cap:
            out.append((1, sum(pb.compute_ms[a:b]) + send_ms(crossing(b), b)))
        points = free_points(a, b) if branches else []
        runs = list(zip([a, *points], [*points, b]))
        if points and all(memory(x, y) <= cap for x, y in runs):
            costs = []
            for x, y in runs:
                sent = sum(size for p, cs, size in edges if (x <= p < y or (x == a and p < a)) and max(cs) >= b)
                costs.append(sum(pb.compute_ms[x:y]) + send_ms(sent, b))
            out.append((len(runs), max(costs)))
        return out

    best = float("inf")
    for k in range(1, n + 1):
        for cuts in itertools.combinations(range(1, n), k - 1):
            bounds = (0, *cuts, n)
            for choice in itertools.product(*[options(a, b) for a, b in zip(bounds[:-1], bounds[1:])]):
                if sum(used for used, _ in choice) != stages:
                    continue
                times = [time for _, time in choice]
                best = min(best, max(times) if objective == "throughput" else sum(times))
    return best


def random_problem(rng: random.Random) -> Problem:
    n = rng.randint(1, 8)
    edges = []
    for p in range(-1, n - 1):
        # Usually a chain edge to the next node, sometimes skip edges further on (residuals, model
        # outputs) and sometimes none, which leaves independent runs (parallel branches).
        consumers = {p + 1} if rng.random() < 0.7 else set()
        consumers |= {rng.randint(p + 1, n) for _ in range(rng.choice([0, 0, 1, 2]))}
        if consumers:
            edges.append((p, tuple(sorted(consumers)), rng.randint(0, 80)))
    return Problem(
        compute_ms=[rng.choice([0.0, rng.uniform(0, 10)]) for _ in range(n)],
        weight_bytes=[rng.randint(0, 100) for _ in range(n)],
        activation_bytes=[rng.randint(0, 60) for _ in range(n)],
        edges=edges,
        bandwidth_bytes_per_ms=rng.choice([1.0, 10.0, 1e6]),
        hop_ms=rng.choice([0.0, 0.5]),
    )


@pytest.mark.parametrize("objective", ["throughput", "latency"])
@pytest.mark.parametrize("branches", [True, False])
@pytest.mark.parametrize("seed", range(100))
def test_matches_brute_force(seed: int, branches: bool, objective: str) -> None:
    rng = random.Random(seed)
    pb = random_problem(rng)
    if not branches:  # a chain: the last consumer alone, so no segment ever splits
        pb = Problem(
            pb.compute_ms,
            pb.weight_bytes,
            pb.activation_bytes,
            [(p, max(cs), size) for p, cs, size in pb.edges],
            pb.bandwidth_bytes_per_ms,
            pb.hop_ms,
        )
    stages = rng.randint(1, pb.n)
    cap = rng.choice([float("inf"), rng.randint(50, 400)])
    expected = brute_force(pb, stages, cap, objective, branches)
    max_bytes = None if cap == float("inf") else int(cap)
    if expected == float("inf"):
        with pytest.raises(PlanError):
            solve(pb, stages, max_bytes, objective, branches)
        return
    part = solve(pb, stages, max_bytes, objective, branches)
    assert part.stages == stages
    got = part.bottleneck_ms if objective == "throughput" else part.latency_ms
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert all(m <= cap for m in part.memory_bytes)
    covered = sorted(part.spans)
    assert covered[0][0] == 0 and covered[-1][1] == pb.n
    assert all(x[1] == y[0] for x, y in zip(covered[:-1], covered[1:]))  # every node in exactly one stage
    assert all(j < i for i, after in enumerate(part.after) for j in after)  # stages in dependency order
    if not branches:
        assert part.is_chain


@pytest.mark.parametrize("seed", range(100))
def test_fewest_stages_matches_brute_force(seed: int) -> None:
    rng = random.Random(1000 + seed)
    pb = random_problem(rng)
    cap = rng.randint(60, 400)
    chain = Problem(pb.compute_ms, pb.weight_bytes, pb.activation_bytes, [(p, max(cs), b) for p, cs, b in pb.edges])
    feasible = [s for s in range(1, pb.n + 1) if brute_force(chain, s, cap, branches=False) < float("inf")]
    if not feasible:
        with pytest.raises(PlanError):
            min_stages(pb, cap)
        return
    assert min_stages(pb, cap) == feasible[0]
    assert solve(pb, None, cap, branches=False).stages == feasible[0]


def test_balanced_chain() -> None:
    # 8 nodes of 1 ms into 4 stages: 2 + 2 + 2 + 2, no transfer cost at infinite-ish bandwidth.
    pb = Problem([1.0] * 8, [0] * 8, [0] * 8, [(k, k + 1, 0) for k in range(-1, 8)])
    part = solve(pb, 4)
    assert part.spans == ((0, 2), (2, 4), (4, 6), (6, 8))
    assert part.cost_ms == (2.0, 2.0, 2.0, 2.0)
    assert part.is_chain


def test_transfer_cost_moves_the_cut() -> None:
    # Costs 1,1,1,1; cutting after node 1 ships 100 bytes (10 ms at 10 B/ms), after node 2 ships 10 (1 ms).
    # Cut at 2: max(2 + 10, 2) = 12; cut at 3: max(3 + 1, 1) = 4; cut at 1: max(1 + 0.5, 3) = 3 (5 B).
    edges = [(-1, 0, 0), (0, 1, 5), (1, 2, 100), (2, 3, 10), (3, 4, 0)]
    pb = Problem([1.0] * 4, [0] * 4, [0] * 4, edges, bandwidth_bytes_per_ms=10.0)
    part = solve(pb, 2)
    assert part.spans == ((0, 1), (1, 4))
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


def two_branches(branch_ms: float = 4.0) -> Problem:
    # fork (node 0) -> two equal branches (nodes 1-2 and 3-4) -> join (node 5); 1 ms fork and join.
    edges = [(-1, 0, 10), (0, (1, 3), 10), (1, 2, 10), (2, 5, 10), (3, 4, 10), (4, 5, 10), (5, 6, 10)]
    half = branch_ms / 2
    return Problem([1.0, half, half, half, half, 1.0], [0] * 6, [0] * 6, edges, hop_ms=0.1)


def test_latency_objective_runs_equal_branches_in_parallel() -> None:
    part = solve(two_branches(), 4, objective="latency")
    # fork | branch A, branch B | join: critical path (1 + 0.1) + max(4 + 0.1, 4 + 0.1) + 1 = 6.2 ms plus
    # 2 x 10 B at 1e6 B/ms, against 1 + 4 + 4 + 1 plus hops for any chain.
    assert part.spans == ((0, 1), (1, 3), (3, 5), (5, 6))
    assert part.after == ((), (0,), (0,), (1, 2))
    assert part.latency_ms == pytest.approx(6.2 + 2e-5)
    assert not part.is_chain


def test_sequential_cut_when_branches_are_cheap() -> None:
    # Branches of 0.2 ms: running them apart saves less than the hops it adds; two stages stay a chain.
    part = solve(two_branches(0.2), 2, objective="latency")
    assert part.is_chain


def test_errors_name_the_fix() -> None:
    pb = Problem([1.0] * 3, [10] * 3, [0] * 3, [(k, k + 1, 0) for k in range(-1, 3)])
    with pytest.raises(PlanError, match="--stages 3 or fewer"):
        solve(pb, 4)
    with pytest.raises(PlanError, match="raise --max-stage-memory to at least 10"):
        solve(pb, None, 5)
    with pytest.raises(PlanError, match="at least 2 stages"):
        solve(pb, 1, 25)
