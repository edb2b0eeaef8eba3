"""Profile each unit of a captured graph: parameters, FLOPs, activation bytes and measured latency."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import fx
from torch.utils.flop_counter import FlopCounterMode

from partitions.capture import CapturedGraph, get_attr, is_compute
from partitions.types import Bytes, Ms

Progress = Callable[[int], None]
"""Called with the number of finished passes over the graph."""


@dataclass
class NodeCost:
    """Costs of one unit at the plan's batch size."""

    name: str
    module: str
    op: str
    params: int
    param_bytes: Bytes
    flops: int
    activation_bytes: Bytes
    """Bytes of the new (non-view) tensors the unit writes."""
    latency_ms: Ms
    """Median over repeats of the summed per-node times, device-synchronised."""

    def to_json(self) -> dict:
        return asdict(self)


def device_sync(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


class _Recorder(fx.Interpreter):
    """Runs the graph and times (or counts FLOPs of) each compute node."""

    def __init__(self, gm: fx.GraphModule, sync: Callable[[], None], count_flops: bool) -> None:
        super().__init__(gm)
        self.sync = sync
        self.count_flops = count_flops
        self.ms: dict[str, float] = {}
        self.flops: dict[str, int] = {}
        self.out_bytes: dict[str, int] = {}

    def run_node(self, n: fx.Node):
        if not is_compute(n):
            return super().run_node(n)
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        call = getattr(self, n.op)
        if self.count_flops:
            with FlopCounterMode(display=False) as counter:
                out = call(n.target, args, kwargs)
            self.flops[n.name] = int(counter.get_total_flops())
            self.out_bytes[n.name] = _new_bytes(out)
            return out
        self.sync()
        start = time.perf_counter()
        out = call(n.target, args, kwargs)
        self.sync()
        self.ms[n.name] = (time.perf_counter() - start) * 1e3
        return out


def _new_bytes(out: object) -> int:
    tensors = out if isinstance(out, (list, tuple)) else [out]
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor) and not t._is_view())


def profile(
    cg: CapturedGraph,
    inputs: list[torch.Tensor],
    device: torch.device,
    repeats: int = 5,
    warmup: int = 2,
    progress: Progress | None = None,
) -> list[NodeCost]:
    """Cost of each unit of ``cg`` on ``device`` for ``inputs`` (the plan's batch)."""
    sync = device_sync(device)
    args = [x.to(device) for x in inputs]
    passes: list[dict[str, float]] = []
    with torch.inference_mode():
        counter = _Recorder(cg.gm, sync, count_flops=True)
        counter.run(*args)
        for i in range(warmup + repeats):
            rec = _Recorder(cg.gm, sync, count_flops=False)
            rec.run(*args)
            if i >= warmup:
                passes.append(rec.ms)
            if progress:
                progress(i + 1)
    node_ms = {name: statistics.median(p[name] for p in passes) for name in passes[0]}
    costs = []
    for unit in cg.units:
        tensors = [t for t in (get_attr(cg.gm, p) for p in unit.params) if isinstance(t, torch.Tensor)]
        costs.append(
            NodeCost(
                name=unit.name,
                module=unit.module,
                op=unit.op,
                params=sum(t.numel() for t in tensors),
                param_bytes=sum(t.numel() * t.element_size() for t in tensors),
                flops=sum(counter.flops.get(n, 0) for n in unit.nodes),
                activation_bytes=sum(counter.out_bytes.get(n, 0) for n in unit.nodes),
                latency_ms=sum(node_ms.get(n, 0.0) for n in unit.nodes),
            )
        )
    return costs


def measure_ms(fn: Callable[[], object], device: torch.device, repeats: int = 5, warmup: int = 2) -> Ms:
    """Median wall time of ``fn()`` in milliseconds, device-synchronised."""
    sync = device_sync(device)
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            sync()
            start = time.perf_counter()
            fn()
            sync()
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def gemm_gflops(device: torch.device, n: int = 1024, repeats: int = 5) -> float:
    """The device's measured fp32 matrix-multiply rate (GFLOP/s) at torch's current threads: the median
    time of an ``n x n`` by ``n x n`` product, ``2 n^3`` floating-point operations. The physical limit the
    stages' achieved rates are compared against."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    a, b = (torch.randn(n, n, generator=gen).to(device) for _ in range(2))
    ms = measure_ms(lambda: torch.mm(a, b), device, repeats=repeats, warmup=2)
    return 2 * n**3 / ms / 1e6
