"""Plain Ray Serve setups that ``partserve bench --compare`` measures partserve against.

* :class:`WholeModel`: the whole model in one deployment with ``@serve.batch``, as a Serve user writes it.
* :class:`PlainChain`: one deployment per stage (the same :class:`~serve_app.stage.StageDeployment`s), chained
  per request by DeploymentResponse, with no batching before the first stage.

Both take a payload (dict of arrays by input name) through ``handle.remote(payload)`` and return the outputs
by name.
"""

from __future__ import annotations

import asyncio

import numpy as np
import torch
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle

from partitions.artifacts import read_plan
from partitions.runtime import pick_device
from partitions.source import load_model
from serve_app.batching import concat, split
from serve_app.entrance import run_stages
from serve_app.names import stage_name
from serve_app.stage import StageDeployment
from serve_app.tensors import Payload


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64)
class WholeModel:
    """The plan's model, whole, batched by ``@serve.batch`` (``max_batch_size`` requests)."""

    def __init__(self, plan_uri: str, max_batch_size: int, batch_wait_timeout_s: float) -> None:
        plan = read_plan(plan_uri)
        self.source = load_model(plan.model["spec"], plan.model["options"], plan.batch_size)
        self.device = pick_device()
        self.source.module.to(self.device)
        self.names = [t.name for t in plan.outputs]
        self.batch.set_max_batch_size(max_batch_size)
        self.batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    async def __call__(self, payload: Payload) -> dict[str, np.ndarray]:
        return await self.batch(payload)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def batch(self, payloads: list[Payload]) -> list[dict[str, np.ndarray]]:
        merged, sizes = concat(payloads)
        return split(await asyncio.to_thread(self._forward, merged), sizes)

    def _forward(self, payload: Payload) -> dict[str, np.ndarray]:
        inputs = {k: torch.from_numpy(np.array(v)).to(self.device) for k, v in payload.items()}
        outputs = self.source.forward_flat(inputs)
        return {name: t.cpu().numpy() for name, t in zip(self.names, outputs)}


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256)
class PlainChain:
    """Calls the stage deployments per request, each on the responses of the stages it reads from."""

    def __init__(self, stages: list[DeploymentHandle], plan_uri: str) -> None:
        self.stages = stages
        self.plan = read_plan(plan_uri)

    async def __call__(self, payload: Payload) -> dict[str, np.ndarray]:
        return await run_stages(self.plan, self.stages, payload)


def whole_model_app(plan_uri: str, max_batch_size: int, batch_wait_timeout_s: float) -> Application:
    return WholeModel.bind(plan_uri, max_batch_size, batch_wait_timeout_s)


def plain_chain_app(plan_uri: str, max_batch_size: int, batch_wait_timeout_s: float) -> Application:
    plan = read_plan(plan_uri)
    stages = [
        StageDeployment.options(name=stage_name(s.index), max_ongoing_requests=2 * max_batch_size).bind(
            plan_uri, s.index, max_batch_size, batch_wait_timeout_s
        )
        for s in plan.stages
    ]
    return PlainChain.bind(stages, plan_uri)
