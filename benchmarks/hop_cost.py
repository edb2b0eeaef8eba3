"""What a Serve hop costs with no model behind it: the p50 of a no-op call through a Python handle at one
request in flight, to one deployment, and to an entrance that chains four no-op deployments by
DeploymentResponse (partserve's path for a 4-stage plan). The second figure is the floor of partserve's idle
latency on this machine before any model compute::

    python3 benchmarks/hop_cost.py            # --requests N
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import ray
from ray import serve
from ray.serve.handle import DeploymentHandle

QUIET = {"ray_actor_options": {"num_cpus": 0}, "logging_config": {"enable_access_log": False}}


@serve.deployment(**QUIET)
class Noop:
    async def __call__(self, x: bytes) -> bytes:
        return x


@serve.deployment(**QUIET)
class Chain:
    def __init__(self, stages: list[DeploymentHandle]) -> None:
        self.stages = stages

    async def __call__(self, x: bytes) -> bytes:
        response = x
        for stage in self.stages:
            response = stage.remote(response)
        return await response


async def p50_ms(handle: DeploymentHandle, requests: int) -> float:
    """Median latency (ms) of ``requests`` calls one after another, after 30 unmeasured ones."""
    for _ in range(30):
        await handle.remote(b"x" * 64)
    latencies = []
    for _ in range(requests):
        start = time.perf_counter()
        await handle.remote(b"x" * 64)
        latencies.append((time.perf_counter() - start) * 1e3)
    return statistics.median(latencies)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    ray.init(include_dashboard=False, log_to_driver=False)
    try:
        one = serve.run(Noop.bind(), name="one", route_prefix=None)
        stages = [Noop.options(name=f"stage-{i}").bind() for i in range(4)]
        chain = serve.run(Chain.bind(stages), name="chain", route_prefix=None)
        print(
            f"no-op p50: one deployment {asyncio.run(p50_ms(one, args.requests)):.2f} ms; "
            f"an entrance and 4 chained deployments {asyncio.run(p50_ms(chain, args.requests)):.2f} ms"
        )
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
