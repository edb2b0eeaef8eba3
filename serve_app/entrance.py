"""The ingress deployment: Open Inference Protocol (KServe v2) over HTTP, and a Python-handle method.

HTTP (the app's route prefix, usually ``/``):

* ``GET /v2/health/live``, ``GET /v2/health/ready``, ``GET /v2``: server liveness, readiness, metadata.
* ``GET /v2/models/{name}``, ``GET /v2/models/{name}/ready``: model metadata (inputs/outputs with name,
  datatype such as ``FP32``, shape with -1 for the batch) and readiness.
* ``POST /v2/models/{name}/infer``: OIP JSON (and its binary extension), ``.npy`` or Arrow IPC; see
  :mod:`serve_app.codecs`. The answer uses the request's format.

Errors answer ``{"error": "..."}`` naming the expected shape and dtype: 400 bad input, 401 missing or wrong
bearer token (when a token is set, see :mod:`serve_app.auth`), 404 unknown model, 413 body over
``max_body_bytes`` or a tensor declaring more than ``JSON_EXPANSION`` times that, 415 unknown Content-Type,
503 with ``Retry-After`` when the service cannot answer now (a full queue, or stage replicas that kept
dying under the request: see :mod:`serve_app.retry`; the same request may be sent again), 500 only for
failures inside the model. Serve's proxy itself answers 503 with ``Retry-After`` when the entrance's queue
is full (``AppArgs.entrance_max_queued_requests``).

Non-finite values (NaN, ±inf) in float inputs are data, passed to the model as they are (JSON reads and
writes them as ``NaN``, ``Infinity``, ``-Infinity``, as Python's ``json`` does).

Python: ``serve.get_app_handle(app_name).infer.remote(x)`` with ``x`` an array (single-input models) or a
dict of arrays by input name; it resolves to a dict of numpy outputs by output name, whatever their number,
or raises :class:`~serve_app.tensors.BadRequest` (fix the input) or, retryable,
:class:`~serve_app.retry.Unavailable` (``retry_after_s``) or Serve's ``BackPressureError`` (the entrance's
queue at this handle is full).
(``handle.remote(x)`` itself is the HTTP entry point: Serve gives ``__call__`` to the FastAPI app.)

The stages are chained without awaiting intermediates (``h1.remote(h0.remote(x))``; a stage reading from
several stages, in a DAG plan, gets all their responses): intermediate payloads go from stage to stage
through Ray's object store, and many requests are in flight at once.
"""

# No ``from __future__ import annotations``: FastAPI must see ``Request`` itself in the route signatures.

import asyncio
import logging
import math
from collections.abc import Mapping

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve.handle import DeploymentHandle, DeploymentResponse

from partitions.artifacts import read_plan
from partitions.plan import Plan
from partitions.runtime import outputs_of
from partitions.types import TensorSpec
from serve_app import codecs
from serve_app.auth import CHALLENGE, authorized, load_token
from serve_app.batching import PipelineBatcher, run_together
from serve_app.cache import ResultCache, input_key, plan_version
from serve_app.retry import RetryPolicy, Unavailable, call_with_retry
from serve_app.tensors import BadRequest, Payload, check_inputs, describe, oip_datatype

logger = logging.getLogger("ray.serve")
api = FastAPI(title="partserve", docs_url=None, redoc_url=None)


def _metadata(specs: list[TensorSpec]) -> list[dict[str, object]]:
    return [{"name": t.name, "datatype": oip_datatype(t.dtype), "shape": list(t.shape)} for t in specs]


async def run_stages(plan: Plan, stages: list[DeploymentHandle], payload: Payload) -> dict[str, np.ndarray]:
    """Call every stage at once, each on the (not yet computed) responses of the stages it reads from (a
    first stage: on the model inputs it reads), then await the stages no other stage reads from:
    intermediates go stage to stage through the object store."""
    responses: dict[int, DeploymentResponse] = {}
    for stage in plan.stages:
        sources = [responses[j] for j in stage.after] or [{name: payload[name] for name in stage.reads}]
        responses[stage.index] = stages[stage.index].remote(*sources)
    merged: Payload = {}
    for sent in await asyncio.gather(*(responses[i] for i in plan.sinks())):
        merged.update(sent)
    return outputs_of(plan, merged)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _unavailable(exc: Unavailable) -> JSONResponse:
    """503 with ``Retry-After`` in whole seconds (rounded up)."""
    return _error(503, str(exc), {"Retry-After": str(max(0, math.ceil(exc.retry_after_s)))})


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress(api)
class Entrance:
    """Checks requests against the plan's inputs and sends them through the stage deployments."""

    def __init__(
        self,
        stages: list[DeploymentHandle],
        plan_uri: str,
        model_name: str,
        max_body_bytes: int,
        max_batch_size: int,
        batch_wait_timeout_s: float,
        max_concurrent_batches: int,
        cache_bytes: int = 0,
        retry: RetryPolicy | None = None,
        auth_token_file: str | None = None,
    ) -> None:
        """``max_batch_size``: samples per pipeline batch; ``batch_wait_timeout_s``: seconds a request waits
        for others to join its batch while the pipeline is busy (an idle pipeline takes it at once: see
        :class:`~serve_app.batching.PipelineBatcher`); ``max_concurrent_batches``: batches in the pipeline at
        once; ``cache_bytes``: size of the result cache (0: off);
        ``max_body_bytes``: largest body; ``retry``: how requests whose stage replica died are tried again;
        ``auth_token_file``: see :func:`serve_app.auth.load_token`."""
        self.stages = stages
        self.plan = read_plan(plan_uri)
        self.model_name = model_name
        self.max_body_bytes = max_body_bytes
        self.retry = retry or RetryPolicy()
        self.retries = 0
        self.token = load_token(auth_token_file)
        self.batcher: PipelineBatcher[dict[str, np.ndarray]] = PipelineBatcher(
            self._pipeline, max_batch_size, batch_wait_timeout_s, max_concurrent_batches
        )
        self.cache = ResultCache(cache_bytes) if cache_bytes else None
        self.version = plan_version(self.plan)

    async def infer(self, inputs: np.ndarray | Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model on ``inputs`` (an array for single-input models, or arrays by input name); returns
        the outputs by name. Raises :class:`BadRequest` for inputs that do not fit the plan and
        :class:`Unavailable` when the pipeline cannot answer now (retryable)."""
        if isinstance(inputs, np.ndarray):
            if len(self.plan.inputs) != 1:
                raise BadRequest(f"the model takes inputs {[t.name for t in self.plan.inputs]}: pass a dict")
            inputs = {self.plan.inputs[0].name: inputs}
        return await self._serve(check_inputs(self.plan.inputs, inputs))

    async def _serve(self, payload: Payload) -> dict[str, np.ndarray]:
        """One request: from the cache, or batched with others through the pipeline (a request as large as
        a batch goes alone)."""
        key = input_key(self.version, payload) if self.cache is not None else None
        if key is not None and (hit := self.cache.get(key)) is not None:
            return hit
        outputs = await self.batcher(payload)
        if key is not None:
            self.cache.put(key, outputs)
        return outputs

    async def _pipeline(self, payloads: list[Payload]) -> list[dict[str, np.ndarray] | Exception]:
        """Send requests through the pipeline as one batch (per-hop costs are paid per batch, not per sample);
        if the batch fails, each request goes alone so only the failing ones fail."""
        # Retries spent or overloaded (Unavailable): running each request alone would only add load.
        return await run_together(
            payloads,
            lambda payload, _requests: self._run(payload),
            alone_on=lambda exc: not isinstance(exc, Unavailable),
        )

    async def _run(self, payload: Payload) -> dict[str, np.ndarray]:
        """The pipeline's outputs, tried again while stage replicas die under it (see :mod:`serve_app.retry`)."""
        return await call_with_retry(
            lambda: run_stages(self.plan, self.stages, payload), self.retry, on_retry=self._retried
        )

    def _retried(self, exc: BaseException) -> None:
        self.retries += 1
        logger.warning("a stage replica failed under a request, retrying: %s", type(exc).__name__)

    def retry_stats(self) -> dict[str, int]:
        """``retries``: pipeline runs this replica tried again after a stage replica failed."""
        return {"retries": self.retries}

    def cache_stats(self) -> dict[str, int] | None:
        """Hits, misses, entries and bytes of the result cache; None when it is off."""
        return self.cache.stats() if self.cache is not None else None

    @api.get("/v2/health/live")
    def live(self) -> dict[str, bool]:
        return {"live": True}

    @api.get("/v2/health/ready")
    def ready(self) -> dict[str, bool]:
        return {"ready": True}

    @api.get("/v2")
    def server_metadata(self, request: Request) -> Response:
        if (denied := self._denied(request)) is not None:
            return denied
        return JSONResponse({"name": "partserve", "version": "1", "extensions": ["binary_tensor_data"]})

    @api.get("/v2/models/{name}")
    def model_metadata(self, name: str, request: Request) -> Response:
        if (denied := self._denied(request)) is not None:
            return denied
        if name != self.model_name:
            return self._unknown(name)
        return JSONResponse(
            {
                "name": self.model_name,
                "versions": ["1"],
                "platform": "pytorch_partserve",
                "inputs": _metadata(self.plan.inputs),
                "outputs": _metadata(self.plan.outputs),
            }
        )

    @api.get("/v2/models/{name}/ready")
    def model_ready(self, name: str, request: Request) -> Response:
        if (denied := self._denied(request)) is not None:
            return denied
        return self._unknown(name) if name != self.model_name else JSONResponse({"name": name, "ready": True})

    @api.post("/v2/models/{name}/infer")
    async def infer_http(self, name: str, request: Request) -> Response:
        if (denied := self._denied(request)) is not None:
            return denied
        if name != self.model_name:
            return self._unknown(name)
        try:
            body = await self._body(request)
            req = codecs.decode(
                body,
                request.headers.get("content-type"),
                request.headers.get(codecs.HEADER_LENGTH),
                self.plan.inputs,
                max_tensor_bytes=codecs.JSON_EXPANSION * self.max_body_bytes,
            )
            payload = check_inputs(self.plan.inputs, req.arrays)
        except BadRequest as exc:
            return _error(exc.status, str(exc))
        try:
            outputs = await self._serve(payload)
        except Unavailable as exc:
            return _unavailable(exc)
        except Exception as exc:
            logger.exception("inference failed")
            return _error(500, f"inference failed: {type(exc).__name__}: {exc}")
        try:
            out = codecs.encode(req, outputs, self.model_name)
        except BadRequest as exc:
            return _error(exc.status, str(exc))
        return Response(out.body, media_type=out.media_type, headers=out.headers)

    async def _body(self, request: Request) -> bytes:
        """The request body, refusing more than ``max_body_bytes`` before reading it all."""
        too_big = BadRequest(f"request body over the {self.max_body_bytes}-byte limit", 413)
        length = request.headers.get("content-length")
        if length is not None and codecs.is_count(length) and int(length) > self.max_body_bytes:
            raise too_big
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise too_big
            chunks.append(chunk)
        return b"".join(chunks)

    def _denied(self, request: Request) -> JSONResponse | None:
        """401 unless auth is off or the request carries the token; never echoes what was sent."""
        if authorized(request.headers.get("authorization"), self.token):
            return None
        return _error(401, "missing or wrong bearer token: send 'Authorization: Bearer <token>'", CHALLENGE)

    def _unknown(self, name: str) -> JSONResponse:
        return _error(
            404, f"unknown model {name!r}; this server has {self.model_name!r}, taking {describe(self.plan.inputs)}"
        )
