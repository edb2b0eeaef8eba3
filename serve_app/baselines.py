"""Plain Ray Serve setups that ``partserve bench --compare`` measures partserve against, each written as a
Ray Serve user would write it and configured on the same terms as partserve (:class:`SetupConfig`).

* :class:`WholeModel`: the whole model in one deployment, ``@serve.batch`` sized like partserve's batches,
  its replica given the machine's cores (``num_cpus``, so Ray sets the torch threads to match), or one
  replica per core with one thread each; exported to ONNX Runtime when the plan's stages run there.
* :class:`PlainChain`: one deployment per stage (the same :class:`~serve_app.stage.StageDeployment`s as
  partserve, with the same batching, threads and transport between stages), chained per request by
  DeploymentResponse, with no batching before the first stage.

Both answer ``handle.infer.remote(payload)`` (a dict of arrays by input name, as partserve's entrance does)
with the outputs by name, and HTTP ``POST`` of a ``.npy`` body (single-input models) with a ``.npy`` body.
"""

from __future__ import annotations

import asyncio
import io
from dataclasses import asdict, dataclass

import numpy as np
import torch
from ray import serve
from ray.serve import Application
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import Response

from partitions.dtypes import to_numpy, to_torch
from partitions.engines import EAGER, Runner, whole_model
from partitions.runtime import pick_device
from partitions.source import plan_model
from partitions.storage import read_plan
from partitions.types import Payload
from serve_app.batching import concat, split
from serve_app.config import StageConfig
from serve_app.entrance import send_batch
from serve_app.names import stage_name
from serve_app.serve_types import as_deployment, set_batching
from serve_app.stage import StageDeployment
from serve_app.transport import StageHandles


@dataclass(frozen=True)
class SetupConfig:
    """How one setup of the comparison runs: what a reader checks to see that the setups are on equal terms."""

    setup: str
    torch_threads: int
    """Intra-op threads of each replica (stage replicas: each)."""
    replica_cpus: float
    """CPUs each replica reserves (Ray sets ``OMP_NUM_THREADS`` from it)."""
    max_batch_size: int
    """Samples a batch holds at most where batches form (entrance or ``@serve.batch``)."""
    batch_wait_s: float
    """Seconds a batch waits for more requests after its first (partserve: only while the pipeline is busy)."""
    stage_max_batch_size: int | None
    """Samples a stage replica merges at most (setups with stages)."""
    stage_batch_wait_s: float | None
    max_ongoing_requests: int
    """Requests a (stage) replica takes at once."""
    in_flight_batches: int | None
    """Batches partserve's entrance keeps in the pipeline at once (None: not bounded by the setup)."""
    access_log: bool
    by_value_max_bytes: int | None = None
    """Setups with stages: batches whose messages between stages are estimated at most this many bytes go
    by value over Serve's gRPC, larger ones by reference (:mod:`serve_app.transport`)."""
    replicas: int = 1
    """Replicas of the deployment (setups with stages: of each stage)."""
    engine: str = EAGER
    """What runs the model: each stage's engine from the plan (setups with stages: the plan's ``engine``), or,
    for the whole model, the stages' engine (the whole model exported as the stages are) when they run one."""

    def row(self) -> dict[str, object]:
        """The configuration as flat ``cfg_*`` columns of a result row."""
        return {f"cfg_{k}": v for k, v in asdict(self).items() if k != "setup"}


def npy_response(outputs: dict[str, np.ndarray]) -> Response:
    body = io.BytesIO()
    np.save(body, next(iter(outputs.values())), allow_pickle=False)
    return Response(body.getvalue(), media_type="application/x-npy")


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64)
class WholeModel:
    """The plan's model, whole, batched by ``@serve.batch`` (up to ``max_batch_size`` samples)."""

    def __init__(
        self, plan_uri: str, max_batch_size: int, batch_wait_timeout_s: float, torch_threads: int, engine: str = EAGER
    ) -> None:
        torch.set_num_threads(torch_threads)
        plan = read_plan(plan_uri)
        self.source = plan_model(plan)
        self.device = pick_device()
        self.source.module.to(self.device)
        self.input = plan.inputs[0].name
        self.names = [t.name for t in plan.outputs]
        self.engine = engine
        self.whole: Runner | None = None
        if engine != EAGER:
            args, kwargs = self.source.call_args(self.source.example_inputs)
            self.whole = whole_model(self.source.module, args, kwargs, self.device, torch_threads, engine)
        set_batching(self.batch, max_batch_size, batch_wait_timeout_s)

    async def infer(self, payload: Payload) -> dict[str, np.ndarray]:
        return await self.batch(payload)

    async def __call__(self, request: Request) -> Response:
        return npy_response(await self.batch({self.input: np.load(io.BytesIO(await request.body()))}))

    def torch_threads(self) -> int:
        """Intra-op threads this replica runs (what the comparison promises it)."""
        return torch.get_num_threads()

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def batch(self, payloads: list[Payload]) -> list[dict[str, np.ndarray]]:
        merged, sizes = concat(payloads)
        return split(await asyncio.to_thread(self._forward, merged), sizes)

    def _forward(self, payload: Payload) -> dict[str, np.ndarray]:
        if self.whole is not None:
            return dict(zip(self.names, self.whole([payload[k] for k in self.source.example_inputs])))
        with torch.inference_mode():
            inputs = {k: to_torch(np.array(v)).to(self.device) for k, v in payload.items()}
            outputs = self.source.forward_flat(inputs)
            return {name: to_numpy(t) for name, t in zip(self.names, outputs)}


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256)
class PlainChain:
    """Calls the stage deployments per request, each on the responses of the stages it reads from."""

    def __init__(self, stages: list[DeploymentHandle], plan_uri: str, by_value_max_bytes: int) -> None:
        self.plan = read_plan(plan_uri)
        self.stages = StageHandles(self.plan, stages, by_value_max_bytes)

    async def infer(self, payload: Payload) -> dict[str, np.ndarray]:
        return await send_batch(self.stages, payload)

    async def __call__(self, request: Request) -> Response:
        payload = {self.plan.inputs[0].name: np.load(io.BytesIO(await request.body()))}
        return npy_response(await send_batch(self.stages, payload))


def whole_model_app(plan_uri: str, config: SetupConfig) -> Application:
    """:class:`WholeModel` with ``config``'s replicas, batch, wait, threads and CPUs."""
    return (
        as_deployment(WholeModel)
        .options(
            num_replicas=config.replicas,
            ray_actor_options={"num_cpus": config.replica_cpus},
            max_ongoing_requests=config.max_ongoing_requests,
            logging_config={"enable_access_log": config.access_log},
        )
        .bind(plan_uri, config.max_batch_size, config.batch_wait_s, config.torch_threads, config.engine)
    )


def plain_chain_app(plan_uri: str, config: SetupConfig) -> Application:
    """:class:`PlainChain` over stage deployments batched and threaded as ``config`` says."""
    plan = read_plan(plan_uri)
    logging = {"enable_access_log": config.access_log}
    assert config.stage_max_batch_size is not None and config.stage_batch_wait_s is not None
    stages = [
        as_deployment(StageDeployment)
        .options(
            name=stage_name(s.index),
            ray_actor_options={"num_cpus": config.replica_cpus},
            max_ongoing_requests=config.max_ongoing_requests,
            logging_config=logging,
        )
        .bind(
            StageConfig(
                plan_uri=plan_uri,
                index=s.index,
                max_batch_size=config.stage_max_batch_size,
                batch_wait_timeout_s=config.stage_batch_wait_s,
                torch_threads=config.torch_threads,
            )
        )
        for s in plan.stages
    ]
    assert config.by_value_max_bytes is not None
    return as_deployment(PlainChain).options(logging_config=logging).bind(stages, plan_uri, config.by_value_max_bytes)
