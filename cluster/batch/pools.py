"""Actor pools of a batch job, sized from the plan's stage times and the cluster's nodes (pure: no Ray).

A pool runs one stage, or, on a cluster with fewer CPUs than the plan has stages, a run of consecutive
stages back to back in each actor: four single-threaded stage processes on two cores would take turns on
them, and each turn costs CPU (caches refilled, one more Arrow batch handed on per stage); two processes of
two stages each do not (BENCHMARKS.md, "Batch"). The resources come in as arguments (CPUs per node, GPUs in
all), so the sizing is tested with tiny numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from cluster.batch.files import BatchInputError
from partitions.plan import Plan


@dataclass(frozen=True)
class Pool:
    """The actor pool of one stage, or of consecutive stages run back to back: actors, and what each asks
    of Ray."""

    stages: tuple[int, ...]
    actors: int
    num_cpus: float
    num_gpus: float
    threads: int

    @property
    def name(self) -> str:
        return pool_name(self.stages)


def pool_name(stages: Sequence[int]) -> str:
    """``stage-2``, or ``stages-0-1`` for a pool that runs stages 0 and 1: the step's name in the report."""
    return f"stage-{stages[0]}" if len(stages) == 1 else f"stages-{stages[0]}-{stages[-1]}"


def group_stages(costs: Sequence[float], groups: int) -> list[tuple[int, ...]]:
    """Split stages with ``costs`` (ms) into at most ``groups`` runs of consecutive stages whose largest total
    cost is the smallest possible (ties: the earliest split); one stage per run when ``groups`` >= stages."""
    n = len(costs)
    k = max(1, min(groups, n))
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    # best[j][i]: the smallest largest run cost of the first i stages in j runs; cut[j][i]: where the last starts
    best = [[math.inf] * (n + 1) for _ in range(k + 1)]
    cut = [[0] * (n + 1) for _ in range(k + 1)]
    best[0][0] = 0.0
    for j in range(1, k + 1):
        for i in range(j, n + 1):
            for s in range(j - 1, i):
                worst = max(best[j - 1][s], prefix[i] - prefix[s])
                if worst < best[j][i] - 1e-12:
                    best[j][i], cut[j][i] = worst, s
    runs: list[tuple[int, ...]] = []
    i = n
    for j in range(k, 0, -1):
        s = cut[j][i]
        runs.append(tuple(range(s, i)))
        i = s
    return runs[::-1]


def pool_sizes(costs: Sequence[float], slots: float, weights: Sequence[float] | None = None) -> list[int]:
    """Actors per stage: one each, then one more at a time to the stage with the highest cost per actor
    (the bottleneck) while the total weight (actors, or GPU shares with ``weights``) stays within ``slots``."""
    sizes = [1] * len(costs)
    w = list(weights) if weights is not None else [1.0] * len(costs)
    used = sum(w)
    while True:
        i = max(range(len(costs)), key=lambda j: (costs[j] / sizes[j], -j))
        if used + w[i] > slots + 1e-9:
            return sizes
        sizes[i] += 1
        used += w[i]


def actor_cpus(nodes: Sequence[float], actors: int) -> float:
    """The largest CPU request per actor such that ``actors`` actors pack onto nodes with ``nodes`` CPUs free
    each (whole actors per node: two nodes of 1 CPU hold three actors of 0.5, not of 0.67)."""
    best = 0.0
    for free in nodes:
        for k in range(1, actors + 1):
            x = free / k
            if x > best and sum(math.floor(c / x + 1e-9) for c in nodes) >= actors:
                best = x
    return best


def plan_pools(
    plan: Plan,
    cpus: float | Sequence[float],
    gpus: float = 0.0,
    use_gpus: bool = False,
    share_actors: bool = True,
) -> tuple[list[Pool], float]:
    """The pools for ``plan`` on nodes with ``cpus`` CPUs (one number: one node) and ``gpus`` GPUs in all
    (used with ``use_gpus``), and the CPUs each read task asks for. An eighth of each node's CPUs (at most one)
    is left to the read tasks and the driver; the rest goes to stage actors in equal fractional requests that
    pack onto the nodes. On CPUs, with ``share_actors`` and fewer CPUs in all (rounded) than stages,
    consecutive stages share a pool (:func:`group_stages`, one run per CPU); then there are as many actors as
    whole CPUs (at least one per pool), each running one torch thread per whole CPU it gets (at least one).
    On GPUs every stage has its own pool, each actor takes its stage's GPU share from the plan and pools grow
    while the shares fit."""
    nodes = [float(c) for c in ([cpus] if isinstance(cpus, (int, float)) else cpus) if c > 0]
    reserve = [min(1.0, 0.125 * c) for c in nodes]
    free = [c - r for c, r in zip(nodes, reserve)]
    costs = [max(s.run_ms or s.cost_ms, 1e-6) for s in plan.stages]
    runs: list[tuple[int, ...]] = [(i,) for i in range(len(costs))]
    if use_gpus:
        fractions = [max(s.gpu_fraction, 1e-3) for s in plan.stages]
        if gpus + 1e-9 < sum(fractions):
            raise BatchInputError(
                f"the plan's GPU shares add up to {sum(fractions):.2f} GPUs, the cluster has {gpus:g}",
                "run without --gpus, or on a cluster with more GPUs",
            )
        sizes = pool_sizes(costs, gpus, fractions)
    else:
        if share_actors:
            runs = group_stages(costs, max(1, math.floor(sum(nodes) + 0.5)))
            costs = [sum(costs[i] for i in run) for run in runs]
        fractions = [0.0] * len(runs)
        sizes = pool_sizes(costs, max(len(runs), sum(math.floor(c + 1e-9) for c in free)))
    per_actor = actor_cpus(free, sum(sizes))
    threads = max(1, math.floor(per_actor + 1e-9))
    pools = [Pool(run, n, per_actor, fractions[i], threads) for i, (run, n) in enumerate(zip(runs, sizes))]
    return pools, min(reserve) / 2
