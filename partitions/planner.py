"""Optimal contiguous partition of a node chain into pipeline stages. Pure: standard library only.

Problem. Nodes ``0..n-1`` in topological order, each with compute time ``compute_ms[k]``, weights
``weight_bytes[k]`` and activation bytes ``activation_bytes[k]`` (what it writes while running). A tensor
edge ``(p, l, bytes)`` is made by node ``p`` (``-1`` = model input) and last read by node ``l`` (``n`` =
model output). A stage is a range ``[a, b)``; every edge with ``p < b <= l`` crosses the cut after it and is
shipped to the next stage (skip connections are carried through whole stages this way). Then

* ``cost(a, b) = sum(compute_ms[a:b]) + cut_bytes(b) / bandwidth`` (no transfer after the last stage),
* ``memory(a, b) = sum(weight_bytes[a:b]) + max_{a<=k<b} (live(k) + activation_bytes[k])`` where ``live(k)``
  is the bytes of edges alive when node ``k`` starts (``p < k <= l``),

and the plan minimises the bottleneck ``max_i cost(stage_i)`` subject to ``memory <= max_stage_bytes``.

Method. Phase 1 is the classic min-max linear partition dynamic program (Bokhari 1988, "Partitioning
problems in parallel, pipelined and distributed computing"; as in PipeDream, SOSP'19, without replication):
``F[s][b] = min_a max(F[s-1][a], cost(a, b))``. Because ``cost(a, b)`` and ``memory(a, b)`` only grow as
``a`` moves left, the scan over ``a`` stops once either passes the best value found, which keeps it exact.
Phase 2 breaks ties: among partitions whose every stage costs at most the optimal bottleneck, it takes the one
with the least total cost (latency), by a min-sum program under that bound. Both are O(S n^2) worst case.
The fewest stages under a memory cap is found greedily, which is exact because memory is monotone in the
range.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from math import inf

from partitions.errors import PlanError

REL_EPS = 1e-9
"""Relative slack when comparing float costs against the optimal bottleneck (rounding in sums)."""


@dataclass(frozen=True)
class Problem:
    compute_ms: Sequence[float]
    weight_bytes: Sequence[int]
    activation_bytes: Sequence[int]
    edges: Sequence[tuple[int, int, int]]
    """``(producer, last_consumer, bytes)``; producer -1 is a model input, consumer ``n`` a model output."""
    bandwidth_bytes_per_ms: float = 1e6
    """Link bandwidth between stages; 1e6 bytes/ms = 1 GB/s."""

    def __post_init__(self) -> None:
        n = len(self.compute_ms)
        if n == 0:
            raise PlanError("the graph has no nodes", "capture a model with at least one operation")
        if not (len(self.weight_bytes) == len(self.activation_bytes) == n):
            raise ValueError(
                f"compute_ms ({n}), weight_bytes ({len(self.weight_bytes)}) and activation_bytes "
                f"({len(self.activation_bytes)}) must have the same length"
            )
        for p, last, size in self.edges:
            if not (-1 <= p < last <= n) or size < 0:
                raise ValueError(f"edge ({p}, {last}, {size}) must have -1 <= producer < consumer <= {n}")
        if self.bandwidth_bytes_per_ms <= 0:
            raise ValueError(f"bandwidth ({self.bandwidth_bytes_per_ms}) must be > 0")

    @property
    def n(self) -> int:
        return len(self.compute_ms)


@dataclass(frozen=True)
class Partition:
    bounds: tuple[int, ...]
    """Stage ``i`` is nodes ``bounds[i]:bounds[i+1]``; ``bounds[0] == 0`` and ``bounds[-1] == n``."""
    cost_ms: tuple[float, ...]
    memory_bytes: tuple[int, ...]
    transfer_bytes: tuple[int, ...]
    """Bytes each stage sends to the next (0 for the last)."""

    @property
    def bottleneck_ms(self) -> float:
        return max(self.cost_ms)

    @property
    def stages(self) -> int:
        return len(self.cost_ms)


class _Tables:
    """Prefix sums and per-cut figures, so each ``cost``/``memory`` query is O(1) amortised."""

    def __init__(self, pb: Problem) -> None:
        n = pb.n
        self.n = n
        self.pb = pb
        self.compute = _prefix(pb.compute_ms)
        self.weights = _prefix(pb.weight_bytes)
        # delta[k]: change in crossing bytes at cut k (after node k-1); cut[b] = bytes with p < b <= l.
        delta = [0] * (n + 2)
        for p, last, size in pb.edges:
            delta[p + 1] += size
            delta[last + 1] -= size
        self.cut = [0] * (n + 1)
        running = 0
        for b in range(n + 1):
            running += delta[b]
            self.cut[b] = running
        # Live bytes while node k runs: edges with p < k <= l, i.e. the cut before k, plus its own output.
        self.during = [self.cut[k] + pb.activation_bytes[k] for k in range(n)]

    def transfer_ms(self, b: int) -> float:
        return 0.0 if b == self.n else self.cut[b] / self.pb.bandwidth_bytes_per_ms

    def cost(self, a: int, b: int) -> float:
        return self.compute[b] - self.compute[a] + self.transfer_ms(b)

    def memory(self, a: int, b: int) -> int:
        return self.weights[b] - self.weights[a] + max(self.during[a:b])


def _prefix(xs: Sequence[float]) -> list:
    out = [0] * (len(xs) + 1)
    for i, x in enumerate(xs):
        out[i + 1] = out[i] + x
    return out


def min_stages(pb: Problem, max_stage_bytes: int) -> int:
    """Fewest stages whose memory each fits ``max_stage_bytes`` (greedy: extend each stage while it fits)."""
    t = _Tables(pb)
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


def solve(pb: Problem, stages: int | None = None, max_stage_bytes: int | None = None) -> Partition:
    """The partition into ``stages`` stages (or the fewest that fit the cap) with the least bottleneck."""
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
    t = _Tables(pb)
    bottleneck = _min_bottleneck(t, stages, cap)
    if bottleneck == inf:
        need = min_stages(pb, int(cap))
        raise PlanError(
            f"no partition into {stages} stages fits {int(cap)} bytes per stage (at least {need} stages are needed)",
            f"pass --stages {need} or more, or raise --max-stage-memory",
        )
    bounds = _min_total_under(t, stages, cap, bottleneck)
    spans = list(zip(bounds[:-1], bounds[1:]))
    return Partition(
        bounds=tuple(bounds),
        cost_ms=tuple(t.cost(a, b) for a, b in spans),
        memory_bytes=tuple(t.memory(a, b) for a, b in spans),
        transfer_bytes=tuple(0 if b == pb.n else t.cut[b] for _, b in spans),
    )


def _min_bottleneck(t: _Tables, stages: int, cap: float) -> float:
    n = t.n
    prev = [inf] * (n + 1)
    prev[0] = 0.0
    for s in range(1, stages + 1):
        cur = [inf] * (n + 1)
        for b in range(s, n - (stages - s) + 1):
            best, peak = inf, 0
            xfer = t.transfer_ms(b)
            for a in range(b - 1, s - 2, -1):
                peak = max(peak, t.during[a])
                if t.weights[b] - t.weights[a] + peak > cap:
                    break  # memory only grows as the stage extends left
                c = t.compute[b] - t.compute[a] + xfer
                if c >= best:
                    break  # so does cost: no a further left can beat best
                best = min(best, max(prev[a], c))
            cur[b] = best
        prev = cur
    return prev[n]


def _min_total_under(t: _Tables, stages: int, cap: float, bottleneck: float) -> list[int]:
    """Bounds of the least-total-cost partition whose every stage costs <= ``bottleneck``."""
    n = t.n
    limit = bottleneck * (1 + REL_EPS) + REL_EPS
    total = [[inf] * (n + 1) for _ in range(stages + 1)]
    choice = [[-1] * (n + 1) for _ in range(stages + 1)]
    total[0][0] = 0.0
    for s in range(1, stages + 1):
        for b in range(s, n - (stages - s) + 1):
            peak = 0
            xfer = t.transfer_ms(b)
            for a in range(b - 1, s - 2, -1):
                peak = max(peak, t.during[a])
                c = t.compute[b] - t.compute[a] + xfer
                if t.weights[b] - t.weights[a] + peak > cap or c > limit:
                    break
                if total[s - 1][a] + c < total[s][b]:
                    total[s][b] = total[s - 1][a] + c
                    choice[s][b] = a
    bounds = [n]
    for s in range(stages, 0, -1):
        bounds.append(choice[s][bounds[-1]])
    assert bounds[-1] == 0, "phase 2 must find the partition phase 1 proved exists"
    return bounds[::-1]
