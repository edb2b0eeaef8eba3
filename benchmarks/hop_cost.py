"""What a Serve hop costs with no model behind it, by reference (Ray's object store, Serve's default) and by
value (Serve's replica-to-replica gRPC): the p50 of a no-op call through a Python handle at one request in
flight, to one deployment, and to an entrance that chains two no-op deployments by DeploymentResponse
(partserve's path for a 2-stage plan), for float32 arrays of several sizes. The chained figure is the floor of
partserve's idle latency before any model compute; the sizes show where by value stops paying
(:data:`serve_app.transport.BY_VALUE_MAX_BYTES`). gRPC's message limit is raised to 1 GiB for the Ray this
starts, so that by value can be timed past its default 4 MiB::

    python3 benchmarks/hop_cost.py            # --requests N --sizes 64KiB,512KiB,2MiB,8MiB,32MiB
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time

import numpy as np
import ray
from ray import serve
from ray.serve.handle import DeploymentHandle

QUIET = {"ray_actor_options": {"num_cpus": 0}, "logging_config": {"enable_access_log": False}}
UNITS = {"KiB": 1 << 10, "MiB": 1 << 20}
GRPC_LIMIT = "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH"
"""By value, gRPC refuses larger messages (4 MiB unless set)."""


@serve.deployment(**QUIET)
class Noop:
    async def __call__(self, x: np.ndarray) -> np.ndarray:
        return x


@serve.deployment(**QUIET)
class Chain:
    def __init__(self, stages: list[DeploymentHandle], by_reference: bool) -> None:
        self.stages = [s.options(_by_reference=by_reference) for s in stages]

    async def __call__(self, x: np.ndarray) -> np.ndarray:
        response = x
        for stage in self.stages:
            response = stage.remote(response)
        return await response


def size_bytes(text: str) -> int:
    """``64KiB`` -> 65536."""
    for unit, factor in UNITS.items():
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


async def p50_ms(handle: DeploymentHandle, x: np.ndarray, requests: int) -> float:
    """Median latency (ms) of ``requests`` calls one after another, after a few unmeasured ones."""
    for _ in range(max(3, requests // 10)):
        await handle.remote(x)
    latencies = []
    for _ in range(requests):
        start = time.perf_counter()
        await handle.remote(x)
        latencies.append((time.perf_counter() - start) * 1e3)
    return statistics.median(latencies)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200, help="calls per figure (a quarter from 2 MiB up)")
    parser.add_argument("--sizes", default="64KiB,512KiB,2MiB,8MiB,32MiB")
    args = parser.parse_args()
    if GRPC_LIMIT not in os.environ:  # Serve reads it on import: this process and the Ray it starts need it
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, GRPC_LIMIT: str(1 << 30)})
    ray.init(include_dashboard=False, log_to_driver=False)
    try:
        one = serve.run(Noop.bind(), name="one", route_prefix=None)
        chains = {
            by_reference: serve.run(
                Chain.bind([Noop.options(name=f"stage-{i}").bind() for i in range(2)], by_reference),
                name=f"chain-{'ref' if by_reference else 'value'}",
                route_prefix=None,
            )
            for by_reference in (True, False)
        }
        print("size | one hop: by reference / by value (ms) | entrance + 2 chained stages: by reference / by value")
        for size in args.sizes.split(","):
            x = np.zeros(size_bytes(size) // 4, np.float32)
            n = args.requests if x.nbytes < 2 << 20 else max(10, args.requests // 4)
            one_ms = [asyncio.run(p50_ms(one.options(_by_reference=r), x, n)) for r in (True, False)]
            chain_ms = [asyncio.run(p50_ms(chains[r].options(_by_reference=r), x, n)) for r in (True, False)]
            print(f"{size} | {one_ms[0]:.2f} / {one_ms[1]:.2f} | {chain_ms[0]:.2f} / {chain_ms[1]:.2f}", flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
