"""Optimal partition of a topologically ordered graph into pipeline stages. Pure: standard library only.

Problem. Nodes ``0..n-1`` in topological order, each with compute time ``compute_ms[k]``, weights
``weight_bytes[k]`` and activation bytes ``activation_bytes[k]`` (what it writes while running). A tensor
edge ``(p, consumers, bytes)`` is made by node ``p`` (``-1`` = model input) and read by ``consumers`` (``n``
= model output); ``last`` is its largest consumer. A plan is a sequence of *segments*, contiguous ranges
``[a, b)`` of nodes. A segment is one stage, or, when it falls apart into independent runs (no edge from an
earlier run reaches a later one: parallel branches), one stage per run, all running at the same time. Then

* ``transfer(stage)``: the bytes it sends on, over ``bandwidth``: for a sequential stage every edge with
  ``p < b <= last`` (skip connections are carried through whole stages this way); for a branch run what it
  makes for later segments, and the first run also carries what crosses the segment,
* ``cost(stage) = sum(compute_ms of its nodes) + hop_ms + transfer / bandwidth`` (no hop or transfer after
  the last segment),
* ``memory(stage) = sum(weight_bytes) + max_k (live(k) + activation_bytes[k])``, ``live(k)`` the bytes of
  edges with ``p < k <= last``,
* objective ``throughput``: minimise the bottleneck ``max cost``; ``latency``: minimise the critical path,
  the sum over segments of their slowest stage; both subject to ``memory <= max_stage_bytes``.

Method. Dynamic programming over segment ends, the min-max linear partition of Bokhari (1988, "Partitioning
problems in parallel, pipelined and distributed computing") extended with parallel segments:
``F[s][b] = min over a of F[s-k][a] (+) cost(segment [a, b) using k stages)``, ``(+)`` being ``max`` or
``+``. Sequential costs and memory only grow as ``a`` moves left, so that scan stops once either passes the
best value, which keeps it exact. With the throughput objective a second pass breaks ties: among plans whose
every stage costs at most the optimal bottleneck it takes the least critical path. O(S n^2) for S stages;
parallel segments add one evaluation per (a, b) that splits. The fewest stages under a memory cap is found
greedily over sequential stages, exact because memory is monotone in the range.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from math import inf
from typing import Literal, TypeVar, get_args

from partitions.errors import PlanError

Objective = Literal["throughput", "latency"]
OBJECTIVES: tuple[Objective, ...] = get_args(Objective)
REL_EPS = 1e-9
"""Relative slack when comparing float costs against the optimum of the first pass (rounding in sums)."""

Edge = tuple[int, Sequence[int] | int, int]
Num = TypeVar("Num", int, float)


@dataclass(frozen=True)
class Problem:
    compute_ms: Sequence[float]
    weight_bytes: Sequence[int]
    activation_bytes: Sequence[int]
    edges: Sequence[Edge]
    """``(producer, consumers, bytes)``; producer -1 is a model input, consumer ``n`` a model output.
    ``consumers`` may be a single int (the last consumer) when branch detection is not wanted."""
    bandwidth_bytes_per_ms: float = 1e6
    """Link bandwidth between stages; 1e6 bytes/ms = 1 GB/s."""
    hop_ms: float = 0.0
    """Fixed cost of each hand-off between stages (a request through the serving layer), ms."""

    def __post_init__(self) -> None:
        n = len(self.compute_ms)
        if n == 0:
            raise PlanError("the graph has no nodes", "capture a model with at least one operation")
        if not (len(self.weight_bytes) == len(self.activation_bytes) == n):
            raise ValueError(
                f"compute_ms ({n}), weight_bytes ({len(self.weight_bytes)}) and activation_bytes "
                f"({len(self.activation_bytes)}) must have the same length"
            )
        for p, consumers, size in self.edges:
            cs = (consumers,) if isinstance(consumers, int) else tuple(consumers)
            if not cs or not all(-1 <= p < c <= n for c in cs) or size < 0:
                raise ValueError(f"edge ({p}, {consumers}, {size}) must have -1 <= producer < consumers <= {n}")
        if self.bandwidth_bytes_per_ms <= 0:
            raise ValueError(f"bandwidth ({self.bandwidth_bytes_per_ms}) must be > 0")
        if self.hop_ms < 0:
            raise ValueError(f"hop_ms ({self.hop_ms}) must be >= 0")

    @property
    def n(self) -> int:
        return len(self.compute_ms)


@dataclass(frozen=True)
class Partition:
    spans: tuple[tuple[int, int], ...]
    """Stage ``i`` runs nodes ``spans[i][0]:spans[i][1]``; stages are in node order."""
    after: tuple[tuple[int, ...], ...]
    """Stages whose outputs stage ``i`` receives (empty: it reads the model inputs)."""
    carries: tuple[bool, ...]
    """Whether stage ``i`` forwards what crosses its segment (the first stage of each segment does)."""
    segment_end: tuple[int, ...]
    """End node of the segment stage ``i`` belongs to (its own end unless it is a parallel branch)."""
    cost_ms: tuple[float, ...]
    memory_bytes: tuple[int, ...]
    transfer_bytes: tuple[int, ...]
    """Bytes each stage sends on per batch (0 after the last segment)."""
    latency_ms: float
    """Critical path: the sum over segments of their slowest stage."""

    @property
    def bottleneck_ms(self) -> float:
        return max(self.cost_ms)

    @property
    def stages(self) -> int:
        return len(self.cost_ms)

    @property
    def is_chain(self) -> bool:
        return all(after == ((i - 1,) if i else ()) for i, after in enumerate(self.after))


class _Tables:
    """Prefix sums and per-cut figures, so each sequential ``cost``/``memory`` query is O(1)."""

    def __init__(self, pb: Problem, branches: bool) -> None:
        n = pb.n
        self.n = n
        self.pb = pb
        self.compute = _prefix(pb.compute_ms)
        self.weights = _prefix(pb.weight_bytes)
        edges = [(p, (c,) if isinstance(c, int) else tuple(sorted(c)), size) for p, c, size in pb.edges]
        self.edges = [(p, cs[-1], size) for p, cs, size in edges]
        delta = [0] * (n + 2)  # cut[b]: bytes of edges with p < b <= last
        for p, last, size in self.edges:
            delta[p + 1] += size
            delta[last + 1] -= size
        self.cut = [0] * (n + 1)
        running = 0
        for b in range(n + 1):
            running += delta[b]
            self.cut[b] = running
        self.during = [self.cut[k] + pb.activation_bytes[k] for k in range(n)]
        self.splits = _free_splits(n, edges) if branches else {}

    def transfer_ms(self, b: int) -> float:
        return 0.0 if b == self.n else self.pb.hop_ms + self.cut[b] / self.pb.bandwidth_bytes_per_ms

    def send_ms(self, size: int, b: int) -> float:
        return 0.0 if b == self.n else self.pb.hop_ms + size / self.pb.bandwidth_bytes_per_ms

    def cost(self, a: int, b: int) -> float:
        return self.compute[b] - self.compute[a] + self.transfer_ms(b)

    def memory(self, a: int, b: int) -> int:
        return self.weights[b] - self.weights[a] + max(self.during[a:b])

    def sends(self, s: int, e: int, a: int, b: int) -> int:
        """Bytes branch run ``[s, e)`` of segment ``[a, b)`` sends on (the first run also carries)."""
        if b == self.n:
            return 0
        lo = a if s == a else s
        return sum(size for p, last, size in self.edges if (lo <= p < e or (s == a and p < a)) and last >= b)


def _prefix(xs: Sequence[Num]) -> list[Num]:
    out: list[Num] = [0] * (len(xs) + 1)
    for i, x in enumerate(xs):
        out[i + 1] = out[i] + x
    return out


def _free_splits(n: int, edges: list[tuple[int, tuple[int, ...], int]]) -> dict[tuple[int, int], list[int]]:
    """``(a, b) -> [m, ...]``: cut points inside ``[a, b)`` that no edge from ``[a, m)`` into ``[m, b)`` crosses.

    ``reach(m, a)`` is the first consumer at or after ``m`` of anything made in ``[a, m)``; ``m`` splits
    ``[a, b)`` when ``reach(m, a) >= b``. Only ``m`` with ``reach(m, a) > m`` can ever split.
    """
    consumers: list[list[int]] = [[] for _ in range(n)]
    for p, readers, _ in edges:
        if p >= 0:
            consumers[p].extend(readers)
    for readers_of_p in consumers:
        readers_of_p.sort()
    candidates: list[list[tuple[int, int]]] = [[] for _ in range(n)]
    for m in range(1, n):
        reach = n + 1
        for a in range(m - 1, -1, -1):
            cs = consumers[a]
            i = bisect.bisect_left(cs, m)
            if i < len(cs):
                reach = min(reach, cs[i])
            if reach <= m:
                break  # the unit at m reads from [a, m): no a further left can free it
            candidates[a].append((m, reach))
    splits: dict[tuple[int, int], list[int]] = {}
    for a, cands in enumerate(candidates):
        for m, reach in cands:
            for b in range(m + 1, min(reach, n) + 1):
                splits.setdefault((a, b), []).append(m)
    for points in splits.values():
        points.sort()
    return splits


def min_stages(pb: Problem, max_stage_bytes: int) -> int:
    """Fewest sequential stages whose memory each fits ``max_stage_bytes`` (greedy: extend while it fits)."""
    t = _Tables(pb, branches=False)
    for k in range(pb.n):
        alone = t.memory(k, k + 1)
        if alone > max_stage_bytes:
            raise PlanError(
                f"node {k} alone needs {alone} bytes, above the stage memory cap of {max_stage_bytes} bytes",
                f"raise --max-stage-memory to at least {alone} bytes or lower --batch-size",
            )
    stages, a = 0, 0
    while a < pb.n:
        b = a + 1
        while b < pb.n and t.memory(a, b + 1) <= max_stage_bytes:
            b += 1
        stages, a = stages + 1, b
    return stages


def solve(
    pb: Problem,
    stages: int | None = None,
    max_stage_bytes: int | None = None,
    objective: Objective = "throughput",
    branches: bool = True,
) -> Partition:
    """The partition into ``stages`` stages (or the fewest that fit the cap) that is best for ``objective``.

    ``branches``: also consider running independent runs of a segment as parallel stages.
    """
    cap = inf if max_stage_bytes is None else max_stage_bytes
    if stages is None:
        if max_stage_bytes is None:
            raise PlanError("neither a stage count nor a memory cap was given", "pass --stages or --max-stage-memory")
        stages = min_stages(pb, max_stage_bytes)
    if stages < 1:
        raise PlanError(f"stages ({stages}) must be >= 1", "pass --stages 1 or more")
    if stages > pb.n:
        raise PlanError(
            f"{stages} stages requested but the graph has only {pb.n} cuttable nodes", f"pass --stages {pb.n} or fewer"
        )
    t = _Tables(pb, branches)
    add = lambda x, y: x + y
    if objective == "throughput":
        best, _ = _program(t, stages, cap, max, inf)
        limit = best * (1 + REL_EPS) + REL_EPS
        value, choice = _program(t, stages, cap, add, limit)
    else:
        value, choice = _program(t, stages, cap, add, inf)
    if value == inf:
        need = min_stages(pb, int(cap))
        raise PlanError(
            f"no partition into {stages} stages fits {int(cap)} bytes per stage (at least {need} stages are needed)",
            f"pass --stages {need} or more, or raise --max-stage-memory",
        )
    return _assemble(t, stages, choice)


Choice = dict[tuple[int, int], tuple[int, tuple[int, ...]]]
"""``(stages used, segment end b) -> (segment start a, inner cut points)``; no cut points: one stage."""


def _program(
    t: _Tables, stages: int, cap: float, combine: Callable[[float, float], float], limit: float
) -> tuple[float, Choice]:
    """``F[s][b] = min_a combine(F[s-k][a], segment cost)``, every stage costing <= ``limit``."""
    n = t.n
    value = [[inf] * (n + 1) for _ in range(stages + 1)]
    value[0][0] = 0.0
    choice: Choice = {}
    parallel: dict[int, list[tuple[int, list[int]]]] = {}
    for (a, b), points in t.splits.items():
        parallel.setdefault(b, []).append((a, points))
    for s in range(1, stages + 1):
        for b in range(s, n - (stages - s) + 1):
            best = inf
            pick: tuple[int, tuple[int, ...]] | None = None
            peak, xfer = 0, t.transfer_ms(b)
            for a in range(b - 1, s - 2, -1):  # one sequential stage [a, b)
                peak = max(peak, t.during[a])
                c = t.compute[b] - t.compute[a] + xfer
                if t.weights[b] - t.weights[a] + peak > cap or c > limit or c >= best:
                    break  # memory and cost only grow as a moves left; combine(x, c) >= c
                v = combine(value[s - 1][a], c)
                if v < best:
                    best, pick = v, (a, ())
            for a, points in parallel.get(b, ()):  # independent runs of [a, b) as parallel stages
                k = len(points) + 1
                if k > s or value[s - k][a] == inf:
                    continue
                runs = list(zip([a, *points], [*points, b]))
                if any(t.memory(x, y) > cap for x, y in runs):
                    continue
                c = max(t.compute[y] - t.compute[x] + t.send_ms(t.sends(x, y, a, b), b) for x, y in runs)
                v = combine(value[s - k][a], c)
                if c <= limit and v < best:
                    best, pick = v, (a, tuple(points))
            value[s][b] = best
            if pick is not None:
                choice[(s, b)] = pick
    return value[stages][n], choice


def _assemble(t: _Tables, stages: int, choice: Choice) -> Partition:
    segments: list[tuple[int, int, tuple[int, ...]]] = []
    s, b = stages, t.n
    while b > 0:
        a, points = choice[(s, b)]
        segments.append((a, b, points))
        s, b = s - len(points) - 1, a
    assert s == 0, "the program must use exactly the requested stages"
    spans: list[tuple[int, int]] = []
    after: list[tuple[int, ...]] = []
    carries: list[bool] = []
    ends: list[int] = []
    cost: list[float] = []
    memory: list[int] = []
    sends: list[int] = []
    previous: tuple[int, ...] = ()
    latency = 0.0
    for a, b, points in reversed(segments):
        runs = list(zip([a, *points], [*points, b]))
        here = []
        for x, y in runs:
            sent = t.cut[y] if not points and y < t.n else t.sends(x, y, a, b) if points else 0
            here.append(len(spans))
            spans.append((x, y))
            after.append(previous)
            carries.append(x == a)
            ends.append(b)
            sends.append(sent)
            cost.append(t.compute[y] - t.compute[x] + t.send_ms(sent, b))
            memory.append(t.memory(x, y))
        latency += max(cost[i] for i in here)
        previous = tuple(here)
    return Partition(
        spans=tuple(spans),
        after=tuple(after),
        carries=tuple(carries),
        segment_end=tuple(ends),
        cost_ms=tuple(cost),
        memory_bytes=tuple(memory),
        transfer_bytes=tuple(sends),
        latency_ms=latency,
    )
