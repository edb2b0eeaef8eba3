"""cluster.batch.pools: actors per stage from the stage times, consecutive stages sharing an actor where CPUs
are fewer than stages, CPU requests that pack onto the nodes."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cluster.batch.files import BatchInputError
from cluster.batch.pools import actor_cpus, group_stages, plan_pools, pool_sizes
from tests.serve_fixtures import PlannedModel


def test_pool_sizes_follow_stage_costs() -> None:
    assert pool_sizes([10, 10, 10, 10], 4) == [1, 1, 1, 1]
    assert pool_sizes([10, 10, 10, 10], 2) == [1, 1, 1, 1]  # one actor per stage at least
    # one each, then the highest cost per actor: 30/1, 30/2, 30/3 = 10/1 (a tie goes to the first), 10/1
    assert pool_sizes([30, 10, 10, 10], 8) == [4, 2, 1, 1]
    assert pool_sizes([30, 10, 20], 12) == [6, 2, 4]  # 30/6 = 10/2 = 20/4 = 5 ms per actor
    # GPU shares: pools grow while the shares fit in two GPUs
    assert pool_sizes([20, 10], 2.0, [0.5, 0.5]) == [3, 1]
    assert pool_sizes([20, 10], 0.9, [0.5, 0.4]) == [1, 1]


@given(st.lists(st.floats(0.1, 100.0), min_size=1, max_size=7), st.integers(1, 8))
def test_group_stages_is_the_best_split_into_consecutive_runs(costs: list[float], groups: int) -> None:
    runs = group_stages(costs, groups)
    assert [i for run in runs for i in run] == list(range(len(costs)))  # consecutive, each stage once, in order
    assert len(runs) == min(groups, len(costs)) and all(runs)
    worst = max(sum(costs[i] for i in run) for run in runs)
    n, k = len(costs), min(groups, len(costs))
    for cuts in itertools.combinations(range(1, n), k - 1):  # every split into k runs
        bounds = [0, *cuts, n]
        assert worst <= max(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:])) + 1e-9


def test_group_stages_examples() -> None:
    assert group_stages([222, 195, 167, 196], 2) == [(0, 1), (2, 3)]
    assert group_stages([10, 10, 10, 40], 2) == [(0, 1, 2), (3,)]
    assert group_stages([10, 20], 5) == [(0,), (1,)]


def test_plan_pools_fit_the_cpus(mlp: PlannedModel) -> None:
    pools, read_cpus = plan_pools(mlp.plan, 2.0)
    assert [p.actors for p in pools] == [1, 1] and [p.stages for p in pools] == [(0,), (1,)]
    assert sum(p.actors * p.num_cpus for p in pools) + 2 * read_cpus <= 2.0 + 1e-9
    assert all(p.threads == 1 and p.num_gpus == 0 for p in pools)
    pools, _ = plan_pools(mlp.plan, 16.0)
    assert 14 <= sum(p.actors for p in pools) <= 16
    pools, read_cpus = plan_pools(mlp.plan, [1.0, 1.0, 1.0])  # three 1-CPU nodes: the actors must pack
    assert sum(p.actors for p in pools) == 2 and pools[0].num_cpus == 0.875 and read_cpus == 0.0625
    assert actor_cpus([0.875, 0.875], 3) == 0.4375 and actor_cpus([3.5], 4) == 0.875
    pools, _ = plan_pools(mlp.plan, 4.0, gpus=1.0, use_gpus=True)
    assert [p.num_gpus for p in pools] == [s.gpu_fraction for s in mlp.plan.stages]


def test_stages_share_actors_only_where_cpus_are_fewer_than_stages(mlp: PlannedModel) -> None:
    """One CPU for two stages: one pool runs both, its actor gets the node's CPUs less the reserve; with
    ``share_actors=False`` each stage keeps its own pool and they share the CPU."""
    pools, _ = plan_pools(mlp.plan, 1.0)
    assert [(p.stages, p.actors, p.num_cpus, p.name) for p in pools] == [((0, 1), 1, 0.875, "stages-0-1")]
    pools, _ = plan_pools(mlp.plan, 1.0, share_actors=False)
    assert [(p.stages, p.actors, p.num_cpus, p.name) for p in pools] == [((0,), 1, 0.4375, "stage-0"),
                                                                          ((1,), 1, 0.4375, "stage-1")]  # fmt: skip
    pools, _ = plan_pools(mlp.plan, 1.0, gpus=1.0, use_gpus=True)  # GPU shares: a pool per stage
    assert [p.stages for p in pools] == [(0,), (1,)]
    with pytest.raises(BatchInputError, match="GPU"):
        plan_pools(mlp.plan, 4.0, gpus=0.0, use_gpus=True)
